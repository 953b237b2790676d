"""Background compaction for the HTTP service (issue 14).

After a write, if the live version's delta (live delta documents + tombstoned base rows) has reached
half of ``max_delta`` (:func:`dssm.index.delta.default_max_delta`), one background thread runs
``dssm compact`` in a child process and, once it has published, swaps the compacted version in. A
child process, because a compaction is seconds of CPU (ScaNN mutation, the recall probe, the BM25
state, checksums) that would otherwise hold this process's interpreter lock against the requests.
At the normal CPU priority: at ``nice 10`` a machine busy with searches starved it (a 100k
compaction took longer than the writes that filled the other half of ``max_delta``), so the write
that reached ``max_delta`` compacted inline and waited 4 s (``bench/write_http.py``).
The compaction holds the index's writers' lock only to read the live version and to publish,
so writes go on while it builds (it carries them onto the new base), and reads never wait: they
keep the version they started on. The compacting write that a client would otherwise meet at
``max_delta`` happens here instead, off any request.

The child runs with ``--handshake``: once the new base is complete and durable, and before it takes
the writers' lock to publish, it names the staged version, and this process loads that base
(:func:`dssm.index.preload_base`: ScaNN load and checksums, ~2 s at 1M documents, more under load)
while the old version keeps serving and writes keep publishing. The published version links the
same files, so the swap after it reuses the loaded base. Before, the swap loaded it under the
backend's load lock, and every write waiting to make its own version live (read-your-writes) waited
those seconds too (the 1M HTTP write bench's 4-5 s batches).
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dssm.index import preload_base
from dssm.index.delta import default_max_delta

__all__ = ["BackgroundCompactor", "compact_in_child"]

log = logging.getLogger(__name__)

_CHILD = "import sys; from dssm.cli import main; sys.exit(main(sys.argv[1:]))"


def compact_in_child(index_dir: Path, *, timeout: float = 3600.0, staged: Callable[[Path], Any] | None = None,
                     started: Callable[[subprocess.Popen[str]], Any] | None = None) -> dict[str, Any] | None:
    """``dssm compact --index index_dir --json`` in a child process.

    Args:
        index_dir: the index directory.
        timeout: seconds before the child is killed.
        staged: with it, the child runs with ``--handshake`` and this is called with the staged version
            directory before the child publishes (an error in it is logged; the child publishes anyway).
        started: called with the child process once it runs (so that its owner can end it).

    Returns:
        The compaction's summary, or ``None`` if there was nothing to compact.

    Raises:
        RuntimeError: the child failed (its stderr's last lines in the message).
    """
    command = [sys.executable, "-c", _CHILD, "compact", "--index", str(index_dir), "--json",
               *(["--handshake"] if staged is not None else [])]
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: nothing to drain while we read stdout
        child = subprocess.Popen(command, stdin=subprocess.PIPE if staged is not None else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=errors, text=True)
        if started is not None:
            started(child)
        watchdog = threading.Timer(timeout, child.kill)
        watchdog.start()
        lines = []
        try:
            for line in child.stdout:  # type: ignore[union-attr]
                if staged is not None and line.startswith("staged ") and child.stdin is not None:
                    try:
                        staged(Path(line[len("staged "):].strip()))
                    except Exception as exc:  # noqa: BLE001 - an optimisation: the swap loads it instead
                        log.warning("could not load the staged compaction %s ahead: %s", line.strip(), exc)
                    try:
                        child.stdin.write("go\n")
                        child.stdin.close()
                    except OSError:  # the child is gone (killed by close()): its exit code tells
                        pass
                else:
                    lines.append(line)
            code = child.wait()
        finally:
            watchdog.cancel()
            if child.stdin is not None and not child.stdin.closed:
                with contextlib.suppress(OSError):  # a broken pipe: the child is gone
                    child.stdin.close()
        errors.seek(0)
        stderr = errors.read()
    if code != 0:
        raise RuntimeError(f"dssm compact --index {index_dir} exited with {code}: "
                           + " | ".join(stderr.strip().splitlines()[-3:]))
    out = "".join(lines).strip()
    last = out.splitlines()[-1] if out else ""
    return json.loads(last) if last.startswith("{") else None


class BackgroundCompactor:
    """Starts at most one compaction at a time, when a write leaves the delta at half its limit.

    Args:
        index_dir: the index directory.
        reload: the backend's ``reload(force=True)``, to swap the compacted version in.
        max_delta: the writes' ``max_delta`` (default: :func:`dssm.index.delta.default_max_delta`).
        compact: runs one compaction, returns its summary or ``None`` (default: :func:`compact_in_child`,
            loading the staged base ahead of the swap with :func:`dssm.index.preload_base`).
        published: called after each compaction that published a version (the backend counts them).
    """

    def __init__(self, index_dir: Path, *, reload: Callable[..., Any], max_delta: int | None = None,
                 compact: Callable[[Path], dict[str, Any] | None] | None = None,
                 published: Callable[[], Any] | None = None) -> None:
        self.index_dir = index_dir
        self.max_delta = max_delta
        self._reload = reload
        self._compact = compact or self._compact_preloading
        self._preloaded: list[Any] = []  # the staged base, held until the swap has taken it
        self._child: subprocess.Popen[str] | None = None  # the running `dssm compact`, ended by close()
        self._closed = False
        self._published = published
        self._running = threading.Lock()
        self.compactions = 0
        self.last_error: str | None = None

    def _compact_preloading(self, index_dir: Path) -> dict[str, Any] | None:
        return compact_in_child(index_dir, staged=lambda stage: self._preloaded.append(preload_base(stage)),
                                started=self._started)

    def _started(self, child: subprocess.Popen[str]) -> None:
        self._child = child
        if self._closed:  # close() came first: the child must not outlive the service
            child.kill()

    def close(self) -> None:
        """End a running compaction child (the service is stopping): it must not write into the index
        after the service, and whatever it staged is cleaned by the next writer."""
        self._closed = True
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()

    def due(self, index: Any) -> bool:
        """Whether ``index`` (a loaded :class:`dssm.index.Index`) should be compacted now."""
        pending = getattr(index, "pending_delta", 0)  # 0 for a searcher without one index (shards)
        if not pending:
            return False
        limit = default_max_delta(index.layout.base_documents) if self.max_delta is None else self.max_delta
        return 2 * pending >= limit

    def after_write(self, index: Any) -> threading.Thread | None:
        """Start a compaction if ``index`` is due and none runs; the thread started, or ``None``."""
        if not self.due(index) or self._running.locked():
            return None
        thread = threading.Thread(target=self.run, name="dssm-compact", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """Compact now and swap the result in; errors are logged, not raised (the delta keeps serving)."""
        if not self._running.acquire(blocking=False):
            return
        try:
            tick = time.perf_counter()
            log.info("compacting %s in the background", self.index_dir)
            summary = self._compact(self.index_dir)
            if summary is None:
                log.info("the compaction of %s published nothing after %.1f s: nothing to compact, another "
                         "process compacting, or a write or build replaced its base meanwhile", self.index_dir,
                         time.perf_counter() - tick)
            else:
                self.compactions += 1
                if self._published is not None:
                    self._published()
                self._reload(force=True)
                log.info("compacted %s into version %s (%d documents, %d delta documents carried over) in %.1f s: %s",
                         self.index_dir, summary["version"], summary["documents"], summary.get("delta_documents", 0),
                         time.perf_counter() - tick, summary.get("seconds"))
            self.last_error = None
        except Exception as exc:  # the next write that finds the delta due tries again
            if self._closed:
                log.info("background compaction of %s ended with the service", self.index_dir)
                return
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("background compaction of %s failed: %s", self.index_dir, exc)
        finally:
            self._preloaded.clear()  # the swapped-in version holds it now (or the compaction was moot)
            self._running.release()
