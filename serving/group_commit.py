"""Group commit: writes that queue behind a running one are published together, as one index version.

A write costs the index about the same whatever its size (a delta segment, a manifest, the version's
directories and their fsyncs; the server's swap to the new version), so concurrent writers that each
published their own version paid that cost once per request. Here the first writer to take the lock
commits what every writer queued meanwhile: consecutive writes of one kind are merged into one
(upserts: the later document of an id wins, as applied one after the other; deletes: a delete that
names an id an earlier one in the group deletes starts a new group, so it is refused as it would be
in sequence), and each writer's answer is the version its own documents went live in. Nothing is
answered before that version is live (read-your-writes is unchanged).

A failure is its own writer's: each write's check runs against the live version before merging,
and if a merged commit fails, its writes are committed again one at a time, so only the one at fault
fails. This is the usual group commit of databases (one log flush for the transactions waiting on
it), applied to index versions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GroupCommit"]


@dataclass(eq=False)
class _Write:
    method: str
    items: list[Any]
    check: Callable[[], None] | None
    version: str | None = None
    error: BaseException | None = None
    finished: bool = False


class GroupCommit:
    """Serialises writes and merges the ones that queue up.

    Args:
        commit: ``(method, items) -> version``: applies one write (``"upsert"`` documents or
            ``"delete"`` ids) and returns the version it published, live when it returns.
        key: ``(method, item) -> id``: the document id an item names.
        merged: called with the number of writes of each commit that carried more than one.
    """

    def __init__(self, commit: Callable[[str, list[Any]], str], *, key: Callable[[str, Any], str],
                 merged: Callable[[int], Any] | None = None) -> None:
        self._commit = commit
        self._key = key
        self._merged = merged
        self._lock = threading.Lock()      # one commit at a time
        self._queue_lock = threading.Lock()
        self._queue: list[_Write] = []

    def write(self, method: str, items: Sequence[Any], *, check: Callable[[], None] | None = None) -> str:
        """Apply ``method`` to ``items`` (alone or with writes queued beside it); the version it went live in.

        Args:
            method: ``"upsert"`` or ``"delete"``.
            items: the documents or ids.
            check: raises to refuse this write; run against the live version just before it commits.

        Raises:
            Whatever ``check`` or the commit of this write raised.
        """
        write = _Write(method, list(items), check)
        with self._queue_lock:
            self._queue.append(write)
        with self._lock:
            if not write.finished:  # else a writer ahead of us committed it
                with self._queue_lock:
                    queued, self._queue = self._queue, []
                try:
                    for group in self._groups(queued):
                        self._commit_group(group)
                finally:
                    for other in queued:  # an error in this machinery must not leave a writer without an answer
                        if not other.finished:
                            other.error = other.error or RuntimeError("the write group stopped before this write")
                            other.finished = True
        if write.error is not None:
            raise write.error
        assert write.version is not None
        return write.version

    def _groups(self, queued: list[_Write]) -> list[list[_Write]]:
        """Runs of consecutive writes of one kind; a delete naming an id already deleted in the run starts
        another."""
        groups: list[list[_Write]] = []
        ids: set[str] = set()
        for write in queued:
            keys = {self._key(write.method, item) for item in write.items}
            if groups and groups[-1][0].method == write.method and not (write.method == "delete" and keys & ids):
                groups[-1].append(write)
                ids |= keys
            else:
                groups.append([write])
                ids = keys
        return groups

    def _commit_group(self, group: list[_Write]) -> None:
        valid = [write for write in group if self._checked(write)]
        try:
            if len(valid) > 1:
                items = {self._key(w.method, item): item for w in valid for item in w.items}  # later ids win
                try:
                    version = self._commit(valid[0].method, list(items.values()))
                except Exception:  # noqa: BLE001 - find the write at fault: each alone, in order, checked again
                    for write in valid:
                        if self._checked(write):
                            self._commit_one(write)
                    return
                if self._merged is not None:
                    self._merged(len(valid))
                for write in valid:
                    write.version = version
            elif valid:
                self._commit_one(valid[0])
        finally:
            for write in group:
                write.finished = True

    def _commit_one(self, write: _Write) -> None:
        try:
            write.version = self._commit(write.method, write.items)
        except Exception as exc:  # noqa: BLE001 - handed to the writer that sent it
            write.error = exc

    def _checked(self, write: _Write) -> bool:
        if write.check is None:
            return True
        try:
            write.check()
        except Exception as exc:  # noqa: BLE001 - handed to the writer that sent it
            write.error = exc
            return False
        return True
