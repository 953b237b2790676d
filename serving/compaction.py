"""Background compaction for the HTTP service (issue 14).

After a write, if the live version's delta (live delta documents + tombstoned base rows) has reached
half of ``max_delta`` (:func:`dssm.index.delta.default_max_delta`), one background thread folds it
into a new base with :func:`dssm.index.compact_index` and the backend swaps that version in. The
compaction holds the index's writers' lock only to read the live version and to publish, so writes
go on while it builds (it carries them onto the new base), and reads never wait: they keep the
version they started on. The compacting write that a client would otherwise meet at ``max_delta``
happens here instead, off any request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dssm.index import compact_index
from dssm.index.delta import default_max_delta

__all__ = ["BackgroundCompactor"]

log = logging.getLogger(__name__)


class BackgroundCompactor:
    """Starts at most one compaction at a time, when a write leaves the delta at half its limit.

    Args:
        index_dir: the index directory.
        write_lock: the backend's lock around writes (held while the compacted version is swapped in,
            so that it does not interleave with a write's own reload).
        reload: the backend's ``reload(force=True)``, to swap the compacted version in.
        max_delta: the writes' ``max_delta`` (default: :func:`dssm.index.delta.default_max_delta`).
    """

    def __init__(self, index_dir: Path, *, write_lock: threading.Lock, reload: Callable[..., Any],
                 max_delta: int | None = None) -> None:
        self.index_dir = index_dir
        self.max_delta = max_delta
        self._write_lock = write_lock
        self._reload = reload
        self._running = threading.Lock()
        self.compactions = 0
        self.last_error: str | None = None

    def due(self, index: Any) -> bool:
        """Whether ``index`` (a loaded :class:`dssm.index.Index`) should be compacted now."""
        pending = getattr(index, "pending_delta", 0)
        limit = default_max_delta(index.layout.base_documents) if self.max_delta is None else self.max_delta
        return bool(pending) and 2 * pending >= limit

    def after_write(self, index: Any) -> threading.Thread | None:
        """Start a compaction if ``index`` is due and none runs; the thread started, or ``None``."""
        if not self.due(index) or self._running.locked():
            return None
        thread = threading.Thread(target=self.run, name="dssm-compact", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """Compact now (under the write lock) and swap the result in; errors are logged, not raised."""
        if not self._running.acquire(blocking=False):
            return
        try:
            result = compact_index(self.index_dir)  # writes go on meanwhile: it carries them over
            if result is not None:
                self.compactions += 1
                with self._write_lock:  # a write's read-your-writes reload is not interleaved with ours
                    self._reload(force=True)
                log.info("compacted %s into version %s (%d documents)", self.index_dir, result.version,
                         result.documents)
            self.last_error = None
        except Exception as exc:  # a failed compaction leaves the delta version serving; the next write retries
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("background compaction of %s failed: %s", self.index_dir, exc)
        finally:
            self._running.release()
