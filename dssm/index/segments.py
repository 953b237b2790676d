"""Delta segments: recent writes searched exactly beside the base, deletes as tombstones (issue 14).

A version is its **base segment** (``embeddings.npy``, ``docs.sqlite``, ``scann/``, ``bm25/``: what a
full build or a compaction wrote), zero or more **delta segments** (``delta/<name>/embeddings.npy``
``[n, dim]`` float32 L2-normalised and ``delta/<name>/docs.jsonl``, one ``{"id", "title", "text"}``
per row) and **tombstones** (``tombstones.npy``: sorted int64 logical rows that are no longer live).

Logical rows number the base's rows ``0 .. B-1`` and then each delta segment's rows in order. A
delete tombstones the id's live row; an upsert tombstones the id's old row (if any) and appends the
document to a new delta segment. The manifest's ``segments`` key (:class:`SegmentLayout`) lists
the parts; a version without it is a base alone. Segments are never modified: a write links the
unchanged ones into its new version and adds one.

Search asks ScaNN for the base's top ``k`` plus the base tombstones that could displace them, drops
the tombstoned rows, scores every live delta row exactly, and merges by score. BM25 scores a delta
document with the base's statistics (N, document frequency, mean length, see
:class:`SegmentedBM25`), so its scores compare with the base's; the base's own weights keep the IDF
of its build until a compaction rebuilds them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dssm.artifacts import load_npy
from dssm.errors import ChecksumError, IndexNotFoundError
from dssm.index.docstore import Doc, DocStore

__all__ = ["DELTA_DIR", "TOMBSTONES", "MERGE_FACTOR", "MAX_SEGMENTS", "SEGMENTS_KEY", "merge_start",
           "SegmentLayout", "DeltaSegment", "SegmentedDocs", "RowMatrix", "SegmentedBM25", "merge_hits",
           "pending_rows", "read_tombstones"]

DELTA_DIR = "delta"
TOMBSTONES = "tombstones.npy"
#: Segments of one size tier (rows in [F^t, F^(t+1))) that a write merges into one (:func:`merge_start`).
MERGE_FACTOR = 4
#: The most delta segments a version holds: MERGE_FACTOR - 1 per tier, for tiers up to 4^12 rows.
MAX_SEGMENTS = (MERGE_FACTOR - 1) * 13
SEGMENTS_KEY = "segments"
_DOCS = "docs.jsonl"
_VECTORS = "embeddings.npy"


@dataclass(frozen=True)
class SegmentLayout:
    """What a version is made of (the manifest's ``segments`` key).

    Attributes:
        base_version: the version whose full build or compaction wrote the base segment.
        base_documents: B, the base's rows.
        delta: ``(name, rows)`` of each delta segment, oldest first.
        tombstones: logical rows that are no longer live.
    """

    base_version: str
    base_documents: int
    delta: tuple[tuple[str, int], ...] = ()
    tombstones: int = 0

    @classmethod
    def of(cls, manifest: dict[str, Any], version: str) -> SegmentLayout:
        """The layout a manifest records; a manifest without one is a base alone."""
        data = manifest.get(SEGMENTS_KEY)
        if not data:
            return cls(base_version=version, base_documents=int(manifest["counts"]["documents"]))
        return cls(base_version=str(data["base_version"]), base_documents=int(data["base_documents"]),
                   delta=tuple((str(name), int(rows)) for name, rows in data["delta"]),
                   tombstones=int(data["tombstones"]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {"base_version": self.base_version, "base_documents": self.base_documents,
                "delta": [[name, rows] for name, rows in self.delta], "tombstones": self.tombstones}

    @property
    def delta_rows(self) -> int:
        """Rows in the delta segments (tombstoned ones included)."""
        return sum(rows for _, rows in self.delta)

    @property
    def rows(self) -> int:
        """Logical rows: base + delta."""
        return self.base_documents + self.delta_rows

    @property
    def live(self) -> int:
        """Live documents."""
        return self.rows - self.tombstones

    @property
    def plain(self) -> bool:
        """Whether the version is its base alone (no delta, no tombstones)."""
        return not self.delta and not self.tombstones


class DeltaSegment:
    """One immutable delta segment: documents and their [n, dim] embeddings, held in memory.

    Args:
        name: the segment's directory name under ``delta/``.
        docs: its documents, row order.
        matrix: [n, dim] float32 L2-normalised embeddings.
    """

    def __init__(self, name: str, docs: Sequence[Doc], matrix: np.ndarray):
        if matrix.ndim != 2 or matrix.shape[0] != len(docs):
            raise ChecksumError(f"delta segment {name}: {len(docs)} documents but embeddings of shape {matrix.shape}")
        self.name = name
        self.docs = list(docs)
        self.matrix = matrix
        self.rows_by_id = {doc.id: i for i, doc in enumerate(self.docs)}  # an id is once in a segment
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.docs)

    @classmethod
    def load(cls, directory: Path) -> DeltaSegment:
        """Read ``directory`` (checksums are the caller's: the version manifest covers the files).

        Raises:
            ChecksumError: the files are unreadable or disagree.
        """
        try:
            # One JSON array, not a json.loads per line: half the time (a 6,400-document merged
            # segment is read by every server that swaps in the write that merged it). Lines end at
            # "\n" only: json.dumps(ensure_ascii=False) leaves U+2028 or U+0085 in a text as they are,
            # and str.splitlines() broke a line there.
            lines = (directory / _DOCS).read_text(encoding="utf-8").split("\n")[:-1]
            docs = [Doc(str(record["id"]), str(record["title"]), str(record["text"]))
                    for record in json.loads("[" + ",".join(lines) + "]")]
            matrix = load_npy(directory / _VECTORS)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ChecksumError(f"delta segment {directory} is unreadable: {exc}") from exc
        if matrix.dtype != np.float32:
            raise ChecksumError(f"delta segment {directory}: embeddings are {matrix.dtype}, expected float32")
        return cls(directory.name, docs, matrix)

    def write(self, directory: Path) -> None:
        """Write the segment into ``directory`` (created; must not exist)."""
        directory.mkdir(parents=True)
        lines = (json.dumps({"id": d.id, "title": d.title, "text": d.text}, ensure_ascii=False) for d in self.docs)
        (directory / _DOCS).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        np.save(directory / _VECTORS, np.ascontiguousarray(self.matrix, dtype=np.float32), allow_pickle=False)

    def postings(self, config: Any) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """``{term: (rows int64, term counts float64)}`` and the [n] token counts, built once."""
        if self._postings is None:
            # deferred: bm25s and PyStemmer, imported only when this runs
            from dssm.bm25 import term_counts
            from dssm.data import document_text

            vocab: dict[str, int] = {}
            rows, terms, counts, sizes = term_counts([document_text(d.title, d.text) for d in self.docs], vocab,
                                                     config)
            order = np.argsort(terms, kind="stable")  # term-major, rows ascending within a term
            rows, counts = rows[order].astype(np.int64), counts[order].astype(np.float64)
            starts = np.concatenate([[0], np.cumsum(np.bincount(terms, minlength=len(vocab)))])
            self._lengths = sizes.astype(np.float64)
            self._postings = {term: (rows[starts[i]:starts[i + 1]], counts[starts[i]:starts[i + 1]])
                              for i, term in enumerate(vocab)}
        assert self._lengths is not None
        return self._postings, self._lengths


class SegmentedDocs:
    """The documents of base + delta segments by logical row and by id, tombstones left out.

    Same reading methods as :class:`dssm.index.DocStore`. An id lives in at most one live row: a
    write tombstones the old row of an id it upserts.
    """

    def __init__(self, base: DocStore, deltas: Sequence[DeltaSegment], dead: np.ndarray):
        self.base = base
        self.deltas = list(deltas)
        self.base_rows = len(base)
        self.offsets = np.cumsum([self.base_rows] + [len(d) for d in self.deltas]).tolist()
        self.dead = dead  # [rows] bool
        self._size = int(dead.size - dead.sum())

    def __len__(self) -> int:
        return self._size

    def _delta_doc(self, row: int) -> Doc:
        part = int(np.searchsorted(self.offsets, row, side="right")) - 1
        if not 0 <= part < len(self.deltas) or row >= self.offsets[-1]:
            raise IndexNotFoundError(f"row {row} is not in the delta segments (rows {self.base_rows}.."
                                     f"{self.offsets[-1] - 1})")
        return self.deltas[part].docs[row - self.offsets[part]]

    def get(self, rows: Sequence[int]) -> list[Doc]:
        """Documents at logical ``rows``, in that order (tombstoned rows too: a caller asks for rows it found)."""
        wanted = [int(r) for r in rows]
        base = [r for r in wanted if r < self.base_rows]
        found = dict(zip(base, self.base.get(base), strict=True)) if base else {}
        return [found[r] if r < self.base_rows else self._delta_doc(r) for r in wanted]

    def row_of(self, doc_id: str) -> int | None:
        """The live logical row of ``doc_id``, or ``None``."""
        for offset, segment in zip(reversed(self.offsets[:-1]), reversed(self.deltas), strict=True):
            local = segment.rows_by_id.get(doc_id)
            if local is not None and not self.dead[offset + local]:
                return offset + local
        row = self.base.row_of(doc_id)
        return None if row is None or self.dead[row] else row

    def by_ids(self, doc_ids: Sequence[str]) -> list[Doc]:
        """Live documents with these ids, in that order.

        Raises:
            IndexNotFoundError: an id is not live.
        """
        rows = [self.row_of(doc_id) for doc_id in doc_ids]
        missing = [doc_id for doc_id, row in zip(doc_ids, rows, strict=True) if row is None]
        if missing:
            raise IndexNotFoundError(f"documents {sorted(missing)[:5]} are not in the index")
        return self.get([r for r in rows if r is not None])

    def iter_all(self) -> Iterator[tuple[int, Doc]]:
        """Every live ``(logical row, Doc)``: the base's in row order, then each delta segment's."""
        for row, doc in self.base.iter_all():
            if not self.dead[row]:
                yield row, doc
        for offset, segment in zip(self.offsets, self.deltas, strict=False):
            for i, doc in enumerate(segment.docs):
                if not self.dead[offset + i]:
                    yield offset + i, doc


class RowMatrix:
    """The [rows, dim] embeddings of base + delta, indexed by logical row without copying the base.

    Args:
        base: [B, dim] (memory-mapped) base matrix.
        delta: [D, dim] the delta segments' matrices stacked.
    """

    def __init__(self, base: np.ndarray, delta: np.ndarray):
        self.base = base
        self.delta = delta
        self.shape = (base.shape[0] + delta.shape[0], base.shape[1])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty(rows.shape + (self.shape[1],), np.float32)
        in_base = rows < self.base.shape[0]
        out[in_base] = self.base[rows[in_base]]
        out[~in_base] = self.delta[rows[~in_base] - self.base.shape[0]]
        return out


class SegmentedBM25:
    """BM25 over base + delta segments: the base's stored weights, the delta's computed per query.

    A delta document's weight uses N = base documents + delta rows, a term's base document frequency
    plus its delta frequency, and the base's mean document length (the delta's own for a base state
    written before ``avgdl`` was stored), with the base's k1, b and method. Tombstoned rows score 0.
    Same reading methods as :class:`dssm.bm25.BM25Index` (``scores``, ``search_rows_batch``, ``size``).
    """

    def __init__(self, base: Any, deltas: Sequence[DeltaSegment], dead: np.ndarray):
        self.base = base
        self.config = base.config
        self.deltas = list(deltas)
        self.dead = dead
        self._dead_rows = np.flatnonzero(dead)  # once: each query zeroes these, not a pass over the [rows] mask
        self.size = int(dead.size)
        self._reference = base.reference
        self._starts = np.cumsum([0] + [len(s) for s in self.deltas])[:-1].tolist()  # first delta row of each
        self._avg = float(self._reference.avgdl or 0.0)
        if not self._avg:  # a base state from before avgdl was stored: the delta's own mean length
            lengths = np.concatenate([s.postings(self.config)[1] for s in self.deltas]) if self.deltas else []
            self._avg = float(np.mean(lengths)) if len(lengths) else 1.0

    def __len__(self) -> int:
        return self.size

    def _delta_scores(self, tokens: list[str]) -> np.ndarray:
        """[delta rows] float64 scores of the delta documents (tombstones included) for query terms."""
        # deferred: bm25s, imported only when this runs
        from dssm.bm25 import idf_function

        out = np.zeros(self.size - self.base.size, np.float64)
        ref, cfg = self._reference, self.config
        idf_fn = idf_function(cfg.method)
        for term in tokens:  # a repeated query term counts again, as in bm25s
            hits = []
            for start, segment in zip(self._starts, self.deltas, strict=True):
                postings, lengths = segment.postings(cfg)
                if term in postings:
                    rows, tf = postings[term]
                    hits.append((start + rows, tf, lengths[rows]))
            if not hits:
                continue
            df = sum(rows.size for rows, _, _ in hits) + (int(ref.df[ref.vocab[term]]) if term in ref.vocab else 0)
            idf = float(np.float32(idf_fn(df, N=ref.documents + out.size)))
            for rows, tf, lengths in hits:
                norm = cfg.k1 * ((1 - cfg.b) + cfg.b * lengths / self._avg)
                tfc = tf * (cfg.k1 + 1) / (tf + norm) if cfg.method == "atire" else tf / (norm + tf)
                out[rows] += idf * tfc
        return out

    def _tokens(self, text: str) -> list[str]:
        # deferred: bm25s and PyStemmer, imported only when this runs
        from dssm.bm25 import tokenize

        return tokenize([text], stopwords=self.config.stopwords, stem=self.config.stem)[0]  # once for both parts

    def _logical(self, base_scores: np.ndarray, tokens: list[str]) -> np.ndarray:
        """[rows] float32: the base's scores, then the delta's, tombstones 0."""
        scores = np.concatenate([base_scores, self._delta_scores(tokens).astype(np.float32)])
        scores[self._dead_rows] = 0.0
        return scores

    def query(self, text: str) -> Any:
        """One query's scores over the logical rows and the rows that can score (a
        :class:`dssm.bm25_postings.BM25Query`)."""
        # deferred: bm25s, imported only when this runs
        from dssm.bm25_postings import BM25Query

        tokens = self._tokens(text)
        base = self.base.token_query(tokens)
        scores = self._logical(base.scores, tokens)
        in_delta = np.flatnonzero(scores[self.base.size:]) + self.base.size  # live delta rows with a query term
        return BM25Query(scores, np.concatenate([base.candidates, in_delta]), max(base.repeats, 1))

    def scores(self, text: str) -> np.ndarray:
        """BM25 score of every logical row for one query: [rows] float32 (0 for tombstones)."""
        tokens = self._tokens(text)
        return self._logical(self.base.token_scores(tokens), tokens)

    def search_rows_batch(self, texts: Sequence[str], k: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-``k`` logical rows per query with a score > 0 (see :meth:`dssm.bm25.BM25Index.search_rows_batch`)."""
        # deferred: bm25s and PyStemmer, imported only when this runs
        from dssm.bm25 import rows_by_score

        return rows_by_score(self.query, texts, k)


def _tier(rows: int) -> int:
    return int(math.log(max(rows, 1), MERGE_FACTOR))


def merge_start(sizes: Sequence[int]) -> int:
    """Size-tiered merging (Lucene's tiered policy, LSM trees): which delta segments a write merges.

    ``sizes`` are the live rows of the delta segments, oldest first, the write's new segment last.
    When the newest segments hold :data:`MERGE_FACTOR` of one size tier (or smaller), they become one
    segment of the next tier, and so on up. A document is rewritten about log_F(delta / batch) times
    over its life, instead of on every merge-everything (which rewrote the whole delta every few
    writes: 0.2-0.3 s spikes at 10k delta documents); a search still scans one stacked matrix.

    Returns:
        The index of the first segment to merge with the ones after it (``len(sizes) - 1``: none).
    """
    start = len(sizes) - 1
    rows = sizes[start] if sizes else 0
    while start > 0:
        run = start
        while run > 0 and _tier(sizes[run - 1]) <= _tier(rows):
            run -= 1
        if start - run + 1 < MERGE_FACTOR:
            break
        rows += sum(sizes[run:start])
        start = run
    return max(start, 0)


def pending_rows(dead: np.ndarray, base_rows: int) -> int:
    """Live delta rows + tombstoned base rows of ``dead`` ([rows] bool): what a compaction folds, and
    what ``max_delta`` bounds."""
    return int(dead[:base_rows].sum() + (~dead[base_rows:]).sum())


def merge_hits(base_rows: np.ndarray, base_scores: np.ndarray, delta_rows: np.ndarray, delta_scores: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """One query's base candidates (tombstones already dropped) and scored delta rows, best ``k`` first.

    Ties go by row, as exact search orders them.
    """
    rows = np.concatenate([base_rows, delta_rows])
    scores = np.concatenate([base_scores, delta_scores]).astype(np.float32)
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def read_tombstones(version_dir: Path, layout: SegmentLayout) -> np.ndarray:
    """[rows] bool: True for a tombstoned logical row of the version in ``version_dir``.

    Raises:
        ChecksumError: ``tombstones.npy`` is unreadable or disagrees with ``layout``.
    """
    dead = np.zeros(layout.rows, bool)
    if not layout.tombstones:
        return dead
    try:
        rows = load_npy(version_dir / TOMBSTONES)
    except (OSError, ValueError) as exc:
        raise ChecksumError(f"{version_dir / TOMBSTONES} is unreadable: {exc}") from exc
    if rows.ndim != 1 or rows.size != layout.tombstones or (rows.size and not 0 <= rows.min() <= rows.max()
                                                              < layout.rows):
        raise ChecksumError(f"{version_dir / TOMBSTONES} does not hold {layout.tombstones} rows below {layout.rows}")
    dead[rows] = True
    if int(dead.sum()) != layout.tombstones:
        raise ChecksumError(f"{version_dir / TOMBSTONES} repeats a row")
    return dead
