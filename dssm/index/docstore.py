"""The SQLite document store of a version: row → id, title, text (our own id mapping, never ScaNN's)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from dssm.errors import IndexNotFoundError, InputError
from dssm.index.files import fsync_file
from dssm.index.layout import BATCH_ROWS

__all__ = ["Doc", "DocStoreWriter", "DocStore"]


class Doc(NamedTuple):
    """A stored document."""

    id: str
    title: str
    text: str


_SCHEMA = """
CREATE TABLE docs (
    row   INTEGER PRIMARY KEY,  -- = ScaNN datapoint index = embeddings.npy row
    id    TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    text  TEXT NOT NULL
);
PRAGMA user_version = 1;
"""


class DocStoreWriter:
    """Writes ``docs.sqlite`` in row order; duplicate ids are refused with both rows named.

    The file lives in a staging directory that is discarded if the build dies, so the bulk load runs
    without a journal; :meth:`close` commits and fsyncs.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists():
            raise InputError(f"document store {self.path} already exists")
        self._conn = sqlite3.connect(self.path)
        self._conn.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;" + _SCHEMA)
        self.count = 0

    def add(self, ids: Sequence[str], titles: Sequence[str], texts: Sequence[str], *,
            locations: Sequence[str] | None = None) -> None:
        """Append documents as rows ``count, count+1, ...``.

        Raises:
            InputError: an id is empty or already stored (naming the id, its row and source location).
        """
        start = self.count
        rows = []
        for offset, (doc_id, title, text) in enumerate(zip(ids, titles, texts, strict=True)):
            if not isinstance(doc_id, str) or not doc_id:
                where = f" ({locations[offset]})" if locations else ""
                raise InputError(f"document at row {start + offset}{where} has an empty or non-string id {doc_id!r}")
            rows.append((start + offset, doc_id, title or "", text or ""))
        try:
            self._conn.executemany("INSERT INTO docs (row, id, title, text) VALUES (?, ?, ?, ?)", rows)
        except sqlite3.IntegrityError as exc:
            self._conn.rollback()
            raise self._duplicate_error(rows, locations) from exc
        self._conn.commit()
        self.count += len(rows)

    def _duplicate_error(self, rows: list[tuple[int, str, str, str]], locations: Sequence[str] | None) -> InputError:
        seen: dict[str, int] = {}
        for offset, (row, doc_id, _, _) in enumerate(rows):
            where = f" ({locations[offset]})" if locations else ""
            earlier = self._conn.execute("SELECT row FROM docs WHERE id = ?", (doc_id,)).fetchone()
            first = earlier[0] if earlier else seen.get(doc_id)
            if first is not None:
                return InputError(f"duplicate document id {doc_id!r}: rows {first} and {row}{where}")
            seen[doc_id] = row
        return InputError(f"could not store documents at rows {rows[0][0]}..{rows[-1][0]}")

    def close(self) -> None:
        """Commit, close and fsync the database file."""
        self._conn.commit()
        self._conn.close()
        fsync_file(self.path)


class DocStore:
    """Read-only access to ``docs.sqlite``; safe to share between threads (one connection per thread).

    The version directory is immutable once published, so connections open with ``immutable=1``
    (no locking, no journal checks).
    """

    def __init__(self, path: str | Path, *, size: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise IndexNotFoundError(f"document store not found: {self.path}")
        self._local = threading.local()
        # ``size``: a caller that already counted this very file (the same inode) skips the scan.
        self._size = int(self._conn().execute("SELECT COUNT(*) FROM docs").fetchone()[0]) if size is None else size

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            uri = f"file:{self.path.resolve()}?mode=ro&immutable=1"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self._local.conn = conn
        return conn

    def __len__(self) -> int:
        return self._size

    def get(self, rows: Sequence[int]) -> list[Doc]:
        """Documents at ``rows``, in that order.

        Raises:
            IndexNotFoundError: a row is not in the store (index and store disagree).
        """
        wanted = [int(r) for r in rows]
        found = self._select("row", wanted)
        missing = sorted({r for r in wanted if r not in found})
        if missing:
            raise IndexNotFoundError(f"rows {missing[:5]} are not in the document store {self.path}")
        return [found[r] for r in wanted]

    def by_ids(self, doc_ids: Sequence[str]) -> list[Doc]:
        """Documents with these ids, in that order.

        Raises:
            IndexNotFoundError: an id is not in the store.
        """
        found = self._select("id", list(doc_ids))
        missing = sorted({i for i in doc_ids if i not in found})
        if missing:
            raise IndexNotFoundError(f"documents {missing[:5]} are not in the document store {self.path}")
        return [found[i] for i in doc_ids]

    def find(self, doc_ids: Sequence[str]) -> dict[str, Doc]:
        """``{id: Doc}`` for those of ``doc_ids`` that are in the store (the others are left out)."""
        return self._select("id", list(doc_ids))

    def _select(self, column: str, keys: list[Any]) -> dict[Any, Doc]:
        """``{key: Doc}`` for the distinct ``keys`` of ``column`` (``row`` or ``id``) that exist."""
        found: dict[Any, Doc] = {}
        unique = sorted(set(keys))
        # SQLite's default limit on bound parameters is 32766; stay well under it.
        for start in range(0, len(unique), 900):
            part = unique[start:start + 900]
            marks = ",".join("?" * len(part))
            for key, doc_id, title, text in self._conn().execute(
                    f"SELECT {column}, id, title, text FROM docs WHERE {column} IN ({marks})", part):
                found[key] = Doc(doc_id, title, text)
        return found

    def row_of(self, doc_id: str) -> int | None:
        """The row of document ``doc_id``, or ``None``."""
        result = self._conn().execute("SELECT row FROM docs WHERE id = ?", (doc_id,)).fetchone()
        return None if result is None else int(result[0])

    def iter_all(self, *, batch: int = BATCH_ROWS) -> Iterator[tuple[int, Doc]]:
        """All (row, Doc) in row order."""
        cursor = self._conn().execute("SELECT row, id, title, text FROM docs ORDER BY row")
        while chunk := cursor.fetchmany(batch):
            for row, doc_id, title, text in chunk:
                yield int(row), Doc(doc_id, title, text)
