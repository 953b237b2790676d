"""Writes in a child process (issue 14): ``dssm serve`` encodes and publishes upserts and deletes there.

A 100-document upsert is ~40 ms of Python and TensorFlow work (the document tower, the delta segment,
its manifest and checksums, fsyncs). In the server's process that work holds the interpreter lock
against the thread that answers searches, so every write stalled the searches queued behind it; in a
child it only competes for a core. The child is one long-lived process, so the document tower is
loaded once (again only when the live version's model changes), not per write.

The protocol is one JSON object per line on the child's stdin and on a private copy of its stdout (the
child points its own fd 1 at stderr, so a library that prints cannot corrupt an answer); no pickle.
Errors come back by class name and are raised in the parent as the same :mod:`dssm.errors` type, so an
HTTP client gets the 400/404 it would get from an in-process write. A child that dies is restarted by
the next write; the write it was running fails with :class:`WriterCrashedError` (it may or may not have
published; the backend's watcher serves whatever ``CURRENT`` names). The child starts with the first
write (which pays for importing TensorFlow and loading the tower, as an in-process first write did), so
a service that is never written to never runs one.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dssm.errors import ChecksumError, ConfigError, DSSMError, IndexNotFoundError, InputError

__all__ = ["HARD_LIMIT_FACTOR", "WriterCrashedError", "WriterProcess", "child_main"]

log = logging.getLogger(__name__)

_CHILD = "from serving.writer import child_main; child_main()"


#: A service write compacts inline only past this many times the library's ``max_delta``: below it the
#: background compactor (:mod:`serving.compaction`) folds the delta. At ``max_delta`` itself a write that
#: found a compaction running compacted the same rows again, inline, and made the running one moot: a
#: 16 s write and 31 s of wasted CPU in the write bench when the compaction was a rebalance.
HARD_LIMIT_FACTOR = 4


class WriterCrashedError(DSSMError):
    """The writer child exited mid-write, or failed with an error that is not one of :mod:`dssm.errors`."""


def _error_types() -> dict[str, type[DSSMError]]:
    from serving.searcher import DocumentNotFoundError  # deferred: the child imports this module first

    return {cls.__name__: cls for cls in (DocumentNotFoundError, InputError, ConfigError, ChecksumError,
                                          IndexNotFoundError, DSSMError)}


class WriterProcess:
    """One child process that runs :func:`dssm.index.writes.upsert_documents` / ``delete_documents``.

    Args:
        index_dir: the index directory the child writes to.
        tf_threads: TensorFlow intra- and inter-op threads in the child (0: TensorFlow's default).
        max_delta: the delta rows past which a write compacts inline (default :data:`HARD_LIMIT_FACTOR` x
            :func:`dssm.index.delta.default_max_delta` of the live base).
    """

    def __init__(self, index_dir: str | Path, *, tf_threads: int = 1, max_delta: int | None = None) -> None:
        if max_delta is not None and max_delta < 0:
            raise ConfigError(f"max_delta must be >= 0, got {max_delta}")
        self.index_dir = Path(index_dir)
        self.tf_threads = tf_threads
        self.max_delta = max_delta
        self._lock = threading.Lock()
        self._child: subprocess.Popen[str] | None = None

    def _ensure(self) -> subprocess.Popen[str]:
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(self.index_dir), str(self.tf_threads),
                 "" if self.max_delta is None else str(self.max_delta)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1)
        return self._child

    def upsert(self, documents: Sequence[tuple[str, str, str]]) -> str:
        """Add or replace ``(id, title, text)`` documents; returns the new live version."""
        return self._call({"op": "upsert", "documents": [list(d) for d in documents]})

    def delete(self, doc_ids: Sequence[str]) -> str:
        """Delete documents by id (all must exist); returns the new live version."""
        return self._call({"op": "delete", "ids": list(doc_ids)})

    def _call(self, request: dict[str, Any]) -> str:
        with self._lock:
            child = self._ensure()
            try:
                child.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
                child.stdin.flush()  # type: ignore[union-attr]
                line = child.stdout.readline()  # type: ignore[union-attr]
            except (BrokenPipeError, OSError):
                line = ""
            if not line:
                code = child.wait()
                self._child = None
                raise WriterCrashedError(f"the writer process exited with {code} during a {request['op']}; "
                                         "it may or may not have published (it restarts on the next write)")
        answer = json.loads(line)
        if "version" in answer:
            return str(answer["version"])
        known = _error_types()
        cls = next((known[name] for name in answer["types"] if name in known), WriterCrashedError)
        message = answer["message"] if cls is not WriterCrashedError else f"{answer['types'][0]}: {answer['message']}"
        raise cls(message)

    def close(self) -> None:
        """End the child (it exits at the end of its input) and wait for it."""
        with self._lock:
            child, self._child = self._child, None
        if child is None:
            return
        try:
            child.stdin.close()  # type: ignore[union-attr]
            child.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()


class _ChildState:
    """The child's side: the live version's document tower, reloaded when its model changes."""

    def __init__(self, index_dir: Path, max_delta: int | None) -> None:
        self.index_dir = index_dir
        self.max_delta = max_delta
        self._fingerprint: str | None = None
        self._encoder: Any = None
        self._pruning: threading.Thread | None = None

    def prune_later(self) -> threading.Thread | None:
        """Prune old versions in a thread, after the write's answer has gone (none while one runs).

        Deleting the last links to a replaced 1M base took 0.2-0.3 s inside a write at 1,000
        documents/s (``bench/write_http.py``); the next write runs beside it instead of after it.
        """
        from dssm.index.versions import DEFAULT_KEEP_VERSIONS, retain_versions

        if self._pruning is not None and self._pruning.is_alive():
            return None

        def prune() -> None:
            try:
                retain_versions(self.index_dir, DEFAULT_KEEP_VERSIONS)
            except Exception as exc:  # noqa: BLE001 - the next write prunes again
                log.warning("writer: pruning old versions of %s failed: %s", self.index_dir, exc)

        self._pruning = threading.Thread(target=prune, name="dssm-prune", daemon=True)
        self._pruning.start()
        return self._pruning

    def finish_pruning(self, timeout: float = 30.0) -> None:
        """Wait for a running prune to finish its deletes (the service is stopping)."""
        if self._pruning is not None:
            self._pruning.join(timeout=timeout)

    def encoder(self) -> Any:
        from dssm.export import load_encoder
        from dssm.index.layout import MODEL_DIR
        from dssm.index.versions import current_version_dir
        from serving.searcher import model_fingerprint

        model = current_version_dir(self.index_dir) / MODEL_DIR
        fingerprint = model_fingerprint(model)
        if fingerprint is None:  # no model/: upsert_documents says so
            return None
        if fingerprint != self._fingerprint:
            self._encoder = None
            gc.unfreeze()  # the previous tower's objects become collectable again
            self._encoder, self._fingerprint = load_encoder(model), fingerprint
            self._encoder.embed_documents(["warm up"])  # traces the graph: its objects are frozen below too
            # With TensorFlow and a SavedModel loaded a full collection walks ~400k objects, ~200 ms,
            # inside whichever write triggered it; frozen, they are skipped (the process keeps them anyway).
            gc.collect()
            gc.freeze()
        return self._encoder

    def limit(self) -> int:
        from dssm.artifacts import read_manifest
        from dssm.index.delta import default_max_delta
        from dssm.index.segments import SegmentLayout
        from dssm.index.versions import current_version_dir

        if self.max_delta is not None:
            return self.max_delta
        live = current_version_dir(self.index_dir)
        return HARD_LIMIT_FACTOR * default_max_delta(SegmentLayout.of(read_manifest(live), live.name).base_documents)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        from dssm.index.writes import delete_documents, upsert_documents

        try:
            if request["op"] == "upsert":
                docs = [tuple(d) for d in request["documents"]]
                result = upsert_documents(self.index_dir, docs, encoder=self.encoder(), max_delta=self.limit(),
                                          keep_versions=0)  # pruned by prune_later
            elif request["op"] == "delete":
                result = delete_documents(self.index_dir, request["ids"], max_delta=self.limit(), keep_versions=0)
            else:
                raise InputError(f"unknown writer operation {request['op']!r}")
            if getattr(result, "compacted", False):
                log.warning("writer: the delta outgrew the background compactions; this write compacted %s "
                            "itself (version %s, %s s)", self.index_dir, result.version, result.seconds)
            return {"version": result.version}
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent, by class name
            if not isinstance(exc, DSSMError):  # a bug, not bad input: the traceback goes to the server's log
                log.exception("writer: %s failed", request.get("op"))
            return {"types": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}


def child_main() -> None:
    """The child's loop (``sys.argv``: index directory, TensorFlow threads, max_delta or ""): one JSON line in,
    one out."""
    index_dir, tf_threads = Path(sys.argv[1]), int(sys.argv[2])
    max_delta = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, not into the protocol
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    import dssm  # noqa: F401 - sets TF_USE_LEGACY_KERAS before TensorFlow loads
    from serving.threads import limit_threads

    if tf_threads:
        limit_threads(tf_threads)
    state = _ChildState(index_dir, max_delta)
    try:
        state.encoder()  # load the tower now, not on the first write
    except Exception as exc:  # noqa: BLE001 - a write will report it
        log.warning("writer: could not load the document tower yet: %s", exc)
    for line in sys.stdin:
        if line.strip():
            answers.write(json.dumps(state.handle(json.loads(line))) + "\n")
            state.prune_later()
    state.finish_pruning()
