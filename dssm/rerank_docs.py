"""A re-ranker's view of an index's documents, computed once: each document's word ids (issue 13).

Re-ranking reads the full text of ~100 candidates per query. Splitting them and looking their ~6,000
words up in the re-ranker's vocabulary was the largest single step of a numpy re-ranking call (~2 ms
of ~7.5 on debian-dev). The words of an indexed document do not change, so ``dssm attach-reranker``
computes them once for every document of the version (:meth:`DocumentRows.build`, the numpy
re-ranker's own split, :meth:`dssm.rerank_fast.NumpyReranker.word_rows`) and stores them in
``reranker/documents/``; a candidate found there costs a fingerprint and a slice.

Documents are keyed by their text (FarmHash64 fingerprint of its UTF-8 bytes, and its length in
characters), not by id or row: the store stays right through upserts (a replaced document's new text
is simply not found), deletes and compactions, which carry ``reranker/`` along unchanged. A text that
is not found — written after the attach, or holding a word outside the vocabulary — is split as
before. Files: ``keys.npy`` (``[n]`` uint64, sorted), ``lengths.npy`` (``[n]`` int64), ``offsets.npy``
(``[n + 1]`` int64) and ``rows.npy`` (``[total]`` int32, vocabulary rows), memory-mapped, with a
``manifest.json`` (kind ``reranker-documents``) that checksums them and names the re-ranker (the
sha256 of its ``manifest.json``) they were computed for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import farmhash
import numpy as np

from dssm.artifacts import MANIFEST, load_npy, sha256_file, verify_manifest, write_manifest
from dssm.errors import ChecksumError

__all__ = ["DocumentRows", "CombinedRows", "DOCUMENTS_DIR", "DOCUMENTS_KIND", "text_key", "text_keys"]

#: Inside a re-ranker directory of an index version.
DOCUMENTS_DIR = "documents"
DOCUMENTS_KIND = "reranker-documents"
_ARRAYS = ("keys", "lengths", "offsets", "rows")


def text_key(text: str) -> int:
    """FarmHash64 fingerprint of ``text``'s UTF-8 bytes (lone surrogates kept, as the re-ranker reads them)."""
    return farmhash.fingerprint64(text.encode("utf-8", "surrogatepass"))


def text_keys(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``([n] uint64 :func:`text_key`, [n] int64 lengths)`` of ``texts`` (a non-string: key 0, length -1,
    found nowhere)."""
    keys = np.fromiter((text_key(t) if isinstance(t, str) else 0 for t in texts), np.uint64, len(texts))
    lengths = np.fromiter((len(t) if isinstance(t, str) else -1 for t in texts), np.int64, len(texts))
    return keys, lengths


class DocumentRows:
    """Word ids of documents, looked up by their text.

    Args:
        keys: ``[n]`` uint64 :func:`text_key` of each document, sorted, distinct.
        lengths: ``[n]`` int64 each text's length in characters (a second check beside the fingerprint).
        offsets: ``[n + 1]`` int64, document ``i``'s ids are ``rows[offsets[i]:offsets[i + 1]]``.
        rows: ``[total]`` int32 vocabulary rows, each document's already cut as the re-ranker cuts it.
    """

    #: The manifest's kind, the field naming the artifact the rows belong to, and the rows' dtype
    #: (:class:`dssm.windows.WindowRows` stores ``[total, dim]`` window vectors the same way).
    KIND, OWNER_FIELD, DTYPE = DOCUMENTS_KIND, "reranker", np.int32
    #: The arrays :meth:`save` writes and :meth:`load` maps (``<name>.npy``), and those a store may lack
    #: (a subclass's additions that older stores were written without: ``None`` when missing).
    ARRAYS: tuple[str, ...] = _ARRAYS
    OPTIONAL_ARRAYS: tuple[str, ...] = ()

    def __init__(self, *, keys: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> None:
        n = len(keys)
        if lengths.shape != (n,) or offsets.shape != (n + 1,) or (n and int(offsets[-1]) != len(rows)):
            raise ChecksumError(f"document rows do not fit together: {n} keys, lengths {lengths.shape}, "
                                f"offsets {offsets.shape}, {len(rows)} rows")
        # plain ndarray views of memory maps: slicing a np.memmap goes through its Python __getitem__
        self.keys, self.lengths = np.asarray(keys), np.asarray(lengths)
        self.offsets, self.rows = np.asarray(offsets), np.asarray(rows)
        self.manifest: dict[str, Any] = {}  # the loaded manifest (:meth:`load`)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, texts: Iterable[str], word_rows: Callable[[Sequence[str]], list[np.ndarray | None]], *,
              batch: int = 1024, progress: Callable[[int], None] | None = None) -> DocumentRows:
        """Every text's word ids by ``word_rows`` (``None``: a word outside the vocabulary, left out).

        Args:
            texts: the documents' full texts (title and body, as search hands them to the re-ranker).
            word_rows: texts → each one's vocabulary rows, or ``None``
                (:meth:`dssm.rerank_fast.NumpyReranker.word_rows`).
            batch: texts split per call.
            progress: called with the number of texts done after each batch.
        """
        keys: dict[int, tuple[int, np.ndarray]] = {}
        chunk: list[str] = []

        def flush() -> None:
            for text, rows in zip(chunk, word_rows(chunk), strict=True):
                if rows is not None:
                    keys.setdefault(text_key(text), (len(text), rows.astype(cls.DTYPE)))
            if progress is not None:
                progress(len(chunk))
            chunk.clear()

        for text in texts:
            chunk.append(text)
            if len(chunk) >= batch:
                flush()
        if chunk:
            flush()
        order = sorted(keys)
        parts = [keys[k][1] for k in order]
        offsets = np.zeros(len(order) + 1, np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        return cls(keys=np.asarray(order, np.uint64), lengths=np.asarray([keys[k][0] for k in order], np.int64),
                   offsets=offsets, rows=np.concatenate(parts) if parts else np.zeros(0, cls.DTYPE))

    def save(self, directory: str | Path, *, owner: str, extra: dict[str, Any] | None = None) -> None:
        """Write the arrays and a manifest into ``directory`` (created); ``owner``: the sha256 of the
        ``manifest.json`` of the artifact these rows belong to (:meth:`owner`); ``extra``: more manifest keys."""
        directory = Path(directory)
        directory.mkdir(parents=True)
        for name in (*self.ARRAYS, *self.OPTIONAL_ARRAYS):
            if getattr(self, name) is not None:
                np.save(directory / f"{name}.npy", getattr(self, name), allow_pickle=False)
        self.write_manifest(directory, owner=owner, documents=len(self), rows=len(self.rows), extra=extra)

    @classmethod
    def write_manifest(cls, directory: Path, *, owner: str, documents: int, rows: int,
                       extra: dict[str, Any] | None = None) -> None:
        """The store's ``manifest.json`` over the arrays written into ``directory`` (:meth:`save`, or a
        subclass that writes its arrays as it makes them)."""
        write_manifest(directory, kind=cls.KIND,
                       extra={cls.OWNER_FIELD: owner, "documents": documents, "rows": rows, **(extra or {})})

    @classmethod
    def load(cls, directory: str | Path, *, owner: str) -> Self:
        """Verify ``directory``'s manifest and memory-map its arrays.

        Raises:
            ChecksumError: a file is missing or changed (named), or the rows were computed for another
                artifact than the one whose manifest has sha256 ``owner``.
        """
        directory = Path(directory)
        manifest = verify_manifest(directory, kind=cls.KIND)
        if manifest.get(cls.OWNER_FIELD) != owner:
            raise ChecksumError(f"{directory} holds rows for the {cls.OWNER_FIELD} whose manifest has sha256 "
                                f"{manifest.get(cls.OWNER_FIELD)!r}, not this one's ({owner!r})")
        arrays = {name: load_npy(directory / f"{name}.npy", mmap_mode="r") for name in cls.ARRAYS}
        arrays |= {name: load_npy(directory / f"{name}.npy", mmap_mode="r") if f"{name}.npy" in manifest["files"]
                   else None for name in cls.OPTIONAL_ARRAYS}  # only a file the manifest checksums is read
        store = cls(**arrays)
        store.manifest = manifest
        return store

    @staticmethod
    def owner(artifact_dir: str | Path) -> str:
        """What a store of ``artifact_dir``'s rows must name: the sha256 of its ``manifest.json``."""
        return sha256_file(Path(artifact_dir) / MANIFEST)

    def entries(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts)]`` int64: each text's entry (its rows are ``rows[offsets[e]:offsets[e + 1]]``), or -1."""
        if not len(self.keys) or not len(texts):
            return np.full(len(texts), -1, np.int64)
        return self.find(*text_keys(texts))

    def find(self, keys: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """:meth:`entries` of texts already fingerprinted (:func:`text_keys`): one fingerprint per text
        whatever the number of stores it is looked up in."""
        out = np.full(len(keys), -1, np.int64)
        if not len(self.keys) or not len(keys):
            return out
        where = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = (self.keys[where] == keys) & (self.lengths[where] == lengths)
        out[found] = where[found]
        return out

    def lookup(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """Each text's stored rows (a view: word ids, or window vectors), or ``None`` where it is not stored."""
        offsets = self.offsets
        return [None if e < 0 else self.rows[offsets[e]:offsets[e + 1]] for e in self.entries(texts).tolist()]


class CombinedRows:
    """Several stores of the same re-ranker read as one (the shards of a sharded index): a text is looked
    up in each until one holds it."""

    def __init__(self, stores: Sequence[DocumentRows]) -> None:
        self.stores = list(stores)

    def __len__(self) -> int:
        return sum(len(store) for store in self.stores)

    def lookup(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """Each text's word ids from the first store that holds it, or ``None``."""
        out: list[np.ndarray | None] = [None] * len(texts)
        for store in self.stores:
            missing = [i for i, rows in enumerate(out) if rows is None]
            if not missing:
                break
            for i, rows in zip(missing, store.lookup([texts[i] for i in missing]), strict=True):
                out[i] = rows
        return out
