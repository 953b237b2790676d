"""Loading the live version: checksums verified, ScaNN searcher + document store (+ delta segments)
behind :class:`Index`.

A version's base segment (ScaNN, ``docs.sqlite``, ``embeddings.npy``, ``bm25/``) is usually shared by
the next versions, which only add delta segments and tombstones (:mod:`dssm.index.segments`). A
loaded base is kept while any :class:`Index` uses it, keyed by its files' identity (device, inode,
size, mtime): loading a later version that hard-links the very same files reuses the ScaNN searcher
and skips re-hashing them (those inodes were verified when first loaded), so a reload after a small
write costs what the write added.
"""

from __future__ import annotations

import collections
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from dssm.artifacts import load_npy, read_manifest, verify_manifest
from dssm.errors import ChecksumError, IndexNotFoundError, InputError
from dssm.index.ann import scann_pybind
from dssm.index.docstore import DocStore
from dssm.index.files import file_identity
from dssm.index.layout import DOCS_DB, EMBEDDINGS, MODEL_DIR, RERANKER_DIR, SCANN_DIR, WINDOWS_DIR
from dssm.index.recall import PROBE_DIR
from dssm.index.segments import (
    DELTA_DIR,
    MAX_SEGMENTS,
    DeltaSegment,
    RowMatrix,
    SegmentedBM25,
    SegmentedDocs,
    SegmentLayout,
    merge_hits,
    pending_rows,
    read_tombstones,
)
from dssm.index.versions import VersionLease, current_version_dir

__all__ = ["Index", "delta_scores", "load_index", "preload_base", "loaded_delta_segments", "delta_segments",
           "remember_delta_segment"]

_BM25_DIR = "bm25"  # dssm.bm25.BM25_DIR, named here so that loading does not import bm25s
# recall_probe/ is a base's too: linked forward by every delta write over it
_BASE_FILES = (SCANN_DIR, DOCS_DB, EMBEDDINGS, _BM25_DIR, PROBE_DIR)
# Queries scored against the delta at once: bounds the [queries, delta rows] score block.
_DELTA_QUERY_BLOCK = 256
# Delta rows per matrix product in :func:`delta_scores` (256 KB of a 128-wide matrix: stays in L2).
_DELTA_ROW_BLOCK = 512


class _Base:
    """A loaded base segment: its ScaNN searcher, and its BM25 state once asked for."""

    def __init__(self, scann: Any):
        self.scann = scann
        self._bm25: Any = None
        self._lock = threading.Lock()

    def bm25(self, version_dir: Path) -> Any:
        with self._lock:
            if self._bm25 is None:
                # deferred: bm25s and PyStemmer, imported only when this runs
                from dssm.bm25 import load_bm25_state

                self._bm25 = load_bm25_state(version_dir)
            return self._bm25


# Loaded parts by file identity; an entry lives as long as some Index holds the part, and the
# delta segments a writer used last stay (bounded) for its next write, which links them again.
_LOADED: weakref.WeakValueDictionary[tuple[Any, ...], Any] = weakref.WeakValueDictionary()
_RECENT: collections.deque[Any] = collections.deque(maxlen=MAX_SEGMENTS + 2)
_LOADED_LOCK = threading.Lock()


class Index:
    """A loaded, verified index version: ScaNN searcher + document store (+ the model directory path).

    With delta segments or tombstones (:mod:`dssm.index.segments`) ``docs`` is a
    :class:`~dssm.index.segments.SegmentedDocs` and rows are logical rows (base, then delta).
    """

    def __init__(self, *, version_dir: Path, manifest: dict[str, Any], scann: Any, docs: DocStore,
                 lease: VersionLease | None = None, deltas: tuple[DeltaSegment, ...] = (),
                 dead: np.ndarray | None = None, base: _Base | None = None):
        self.version_dir = version_dir
        self.lease = lease  # pruning skips this version while the Index lives
        self.manifest = manifest
        self.scann = scann
        self.layout = SegmentLayout.of(manifest, version_dir.name)
        self.deltas = deltas
        self.dead = np.zeros(self.layout.rows, bool) if dead is None else dead  # [rows]
        self.docs: Any = docs if self.layout.plain else SegmentedDocs(docs, deltas, self.dead)
        self.dim = int(manifest["dim"])
        self.size = int(manifest["counts"]["documents"])
        self.params = dict(manifest["scann"])
        self._base = base or _Base(scann)  # shared with later versions that link the same base files
        base_rows = self.layout.base_documents
        self._base_dead = int(self.dead[:base_rows].sum())
        live = np.flatnonzero(~self.dead[base_rows:])
        self._delta_rows = live + base_rows  # [live delta] logical rows
        self._delta_matrix = _stack_live(deltas, live, self.dim)  # [live delta, dim]
        self._matrix: Any = None  # the memory-mapped base matrix, opened on first use
        self._delta_all: np.ndarray | None = None  # [delta rows, dim], stacked on first use (hybrid, tagging)

    def shares_base(self, other: Any) -> bool:
        """Whether ``other`` (an :class:`Index`) uses this one's loaded base: same ScaNN searcher, same files."""
        return isinstance(other, Index) and other._base is self._base

    @property
    def pending_delta(self) -> int:
        """Live delta documents + tombstoned base rows: what compaction would fold (see ``max_delta``)."""
        return pending_rows(self.dead, self.layout.base_documents)

    @property
    def version(self) -> str:
        """The version name."""
        return self.version_dir.name

    @property
    def model_dir(self) -> Path | None:
        """The copied model directory, or ``None`` for a vector-only index."""
        path = self.version_dir / MODEL_DIR
        return path if path.is_dir() else None

    @property
    def reranker_dir(self) -> Path | None:
        """The attached re-ranker directory, or ``None``."""
        path = self.version_dir / RERANKER_DIR
        return path if path.is_dir() else None

    @property
    def windows_dir(self) -> Path | None:
        """The stored window vectors (:mod:`dssm.windows`), or ``None``."""
        path = self.version_dir / WINDOWS_DIR
        return path if path.is_dir() else None

    def embeddings(self, *, mmap: bool = True) -> Any:
        """The [rows, dim] float32 matrix by logical row (memory-mapped read-only by default).

        With delta segments this is a :class:`~dssm.index.segments.RowMatrix` (indexable by rows);
        tombstoned rows are still in it: :meth:`live_rows` lists the live ones.
        """
        if not mmap:
            base = load_npy(self.version_dir / EMBEDDINGS)
        else:  # once per Index: hybrid search asks on every query
            if self._matrix is None:
                self._matrix = load_npy(self.version_dir / EMBEDDINGS, mmap_mode="r")
            base = self._matrix
        if not self.deltas:
            return base
        if self._delta_all is None:
            self._delta_all = np.concatenate([d.matrix for d in self.deltas])
        return RowMatrix(base, self._delta_all)

    def live_rows(self) -> np.ndarray:
        """[size] int64 logical rows of the live documents, ascending."""
        return np.flatnonzero(~self.dead)

    def has_bm25(self) -> bool:
        """Whether the version carries BM25 state."""
        return (self.version_dir / _BM25_DIR / "params.json").is_file()

    def bm25(self) -> Any:
        """The BM25 state over every live row (:class:`dssm.bm25.BM25Index`, or a
        :class:`~dssm.index.segments.SegmentedBM25` with delta segments), or ``None`` without one."""
        if not self.has_bm25():
            return None
        base = self._base.bm25(self.version_dir)
        return base if self.layout.plain else SegmentedBM25(base, self.deltas, self.dead)

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k by dot product over the live documents.

        Args:
            queries: [q, dim] float32 (L2-normalised query embeddings).
            k: neighbours per query (clipped to the live documents).

        Returns:
            (rows [q, k'] int64, scores [q, k'] float32), best first, k' = min(k, size).
        """
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"query vectors must be [q, {self.dim}], got shape {queries.shape}")
        k = min(k, self.size)
        if self.layout.plain:
            return self._search_base(queries, k)
        parts = [self._search_segments(queries[s:s + _DELTA_QUERY_BLOCK], k)
                 for s in range(0, queries.shape[0], _DELTA_QUERY_BLOCK)]
        return np.concatenate([r for r, _ in parts]), np.concatenate([c for _, c in parts])

    def _search_segments(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Base top-k past its tombstones, merged with the exactly scored live delta rows."""
        base_rows = self.layout.base_documents
        full = min(base_rows, k + self._base_dead)  # enough to keep k live rows whatever was deleted
        # Most tombstones are far from most queries: ask for k + up to k more first, all of them if needed.
        depth = min(full, k + min(self._base_dead, k))
        rows, scores = self._search_base(queries, depth)
        scores_of_delta = delta_scores(queries, self._delta_matrix)  # [q, live delta]
        live = scores_of_delta.shape[1]
        # Only a query's k best delta rows (and rows tied with the k-th) can reach its top k: merging
        # those instead of the whole delta keeps a search O(delta), not O(delta log delta) (0.7 ms of
        # sorting per query at 10k delta documents).
        kth = np.partition(scores_of_delta, live - k, axis=1)[:, live - k] if live > k else None
        out_rows, out_scores = [], []
        for i in range(queries.shape[0]):
            r, c = rows[i], scores[i]
            keep = ~self.dead[r]
            if keep.sum() < k and depth < full:
                r, c = (a[0] for a in self._search_base(queries[i:i + 1], full))
                keep = ~self.dead[r]
            best = slice(None) if kth is None else np.flatnonzero(scores_of_delta[i] >= kth[i])
            merged = merge_hits(r[keep], c[keep], self._delta_rows[best], scores_of_delta[i][best], k)
            out_rows.append(merged[0])
            out_scores.append(merged[1])
        width = min(len(r) for r in out_rows)
        return (np.stack([r[:width] for r in out_rows]).astype(np.int64),
                np.stack([c[:width] for c in out_scores]).astype(np.float32))

    def _search_base(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ScaNN's top-k of the base segment: (rows [q, k], scores [q, k])."""
        if k < 1:
            return np.zeros((queries.shape[0], 0), np.int64), np.zeros((queries.shape[0], 0), np.float32)
        pre = max(k, self.params["reorder_k"]) if "reorder_k" in self.params else None
        # The build may have tuned this past what the serialized ScaNN config holds.
        leaves = self.params.get("num_leaves_to_search")
        if queries.shape[0] == 1:
            rows, scores = self.scann.search(queries[0], final_num_neighbors=k,
                                             pre_reorder_num_neighbors=-1 if pre is None else pre,
                                             leaves_to_search=-1 if leaves is None else leaves)
            return np.asarray(rows, dtype=np.int64)[None, :], np.asarray(scores, dtype=np.float32)[None, :]
        rows, scores = self.scann.search_batched(queries, final_num_neighbors=k, pre_reorder_num_neighbors=pre,
                                                 leaves_to_search=leaves)
        return np.asarray(rows, dtype=np.int64), np.asarray(scores, dtype=np.float32)


def _stack_live(deltas: tuple[DeltaSegment, ...], live: np.ndarray, dim: int) -> np.ndarray:
    """The [live, dim] rows ``live`` (offsets into the segments' stacked rows) as one C-contiguous
    matrix, copied once."""
    if not deltas:
        return np.zeros((0, dim), np.float32)
    if len(deltas) == 1:
        matrix = deltas[0].matrix
        return np.ascontiguousarray(matrix if live.size == matrix.shape[0] else matrix[live])
    if live.size == sum(d.matrix.shape[0] for d in deltas):
        return np.concatenate([d.matrix for d in deltas])
    out = np.empty((live.size, dim), np.float32)
    start = 0
    for segment in deltas:  # each segment's live rows (a slice of the sorted ``live``), straight into ``out``
        rows = segment.matrix.shape[0]
        lo, hi = np.searchsorted(live, [start, start + rows])
        np.take(segment.matrix, live[lo:hi] - start, axis=0, out=out[lo:hi])
        start += rows
    return out


def delta_scores(queries: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Exact dot products of a few queries with every row of a delta matrix.

    ``queries @ matrix.T`` is what this computes, but for 2-16 queries against ~20k rows the BLAS
    behind numpy picks a kernel that is 3-4x slower than reading the matrix once (1.35-1.55 ms vs
    0.40-0.73 ms at 20k x 128, one thread): the serving model thread batches a few concurrent
    queries, and at a 20k-row delta that product was a third of its time, halving the searches a
    server answered. Products over 512-row blocks (``block @ queries.T``, the matrix read once,
    each block from cache) keep it near one pass over the matrix.

    Args:
        queries: [q, dim] float32.
        matrix: [rows, dim] float32, C-contiguous.

    Returns:
        [q, rows] float32 scores.
    """
    if queries.shape[0] == 1:
        return (matrix @ queries[0])[None, :]
    out = np.empty((queries.shape[0], matrix.shape[0]), np.float32)
    columns = np.ascontiguousarray(queries.T)  # [dim, q]
    for start in range(0, matrix.shape[0], _DELTA_ROW_BLOCK):
        out[:, start:start + _DELTA_ROW_BLOCK] = (matrix[start:start + _DELTA_ROW_BLOCK] @ columns).T
    return out


def load_index(index_dir: str | Path, *, verify: bool = True, reranker: bool = True, model: bool = True,
               windows: bool = True) -> Index:
    """Load the version ``CURRENT`` points to, after checking every file's sha256.

    Files that are the same inodes as an already loaded base or delta segment are not hashed again
    (see the module docstring).

    Args:
        index_dir: the index directory.
        verify: check checksums (leave on; off only for benchmarks that just built the index).
        reranker: also verify the attached ``reranker/``; ``False`` leaves it unchecked, for a caller
            that will not use it (a corrupt re-ranker then does not stop the index from serving).
        model: also verify ``model/``; ``False`` for a caller that verifies it when it loads it
            (:func:`dssm.export.load_encoder` checks it against its own manifest) or never reads it
            (it brings its own query model), so a write's reload does not hash an unchanged model.
        windows: also verify ``windows/``; ``False`` for a caller that verifies it as it loads it
            (:meth:`dssm.windows.WindowRows.load`) or never reads it.

    Raises:
        IndexNotFoundError: no index / no ``CURRENT`` / missing version.
        ChecksumError: a file is missing, truncated or corrupted (the message names it).
    """
    version_dir = current_version_dir(index_dir)
    try:
        lease = VersionLease(version_dir)
    except FileNotFoundError as exc:
        raise IndexNotFoundError(f"index version {version_dir} was removed while loading; load again") from exc
    for name in (SCANN_DIR, DOCS_DB, EMBEDDINGS):
        if not (version_dir / name).exists():
            raise ChecksumError(f"index version {version_dir} lacks {name}")
    manifest = read_manifest(version_dir)
    layout = SegmentLayout.of(manifest, version_dir.name)
    base_key, base = _loaded_base(version_dir)
    known = loaded_delta_segments(version_dir, layout)
    if verify:
        skip = ((() if reranker else (RERANKER_DIR,)) + (() if model else (MODEL_DIR,))
                + (() if windows else (WINDOWS_DIR,))
                + (_BASE_FILES if base is not None else ()) + tuple(known))
        manifest = verify_manifest(version_dir, kind="index", skip=skip)
    reused = base is not None  # the same docs.sqlite inode was counted when it was first loaded
    base = base or _load_base(version_dir, base_key)
    deltas = delta_segments(version_dir, layout, known)
    docs = DocStore(version_dir / DOCS_DB, size=layout.base_documents if reused else None)
    if len(docs) != layout.base_documents:
        raise ChecksumError(f"{version_dir / DOCS_DB} holds {len(docs)} documents, manifest says "
                            f"{layout.base_documents}")
    return Index(version_dir=version_dir, manifest=manifest, scann=base.scann, docs=docs, lease=lease, deltas=deltas,
                 dead=read_tombstones(version_dir, layout), base=base)


def preload_base(version_dir: str | Path) -> Any:
    """Verify and load the base (ScaNN, doc store, matrix, BM25 files) of a complete version directory,
    staged or published, so that loading any version linking the same files reuses it.

    A compaction calls this through its ``staged`` hook before it publishes (``dssm compact
    --handshake``): the service's reload of the new version then skips the ScaNN load and the hashing
    of its base. The base stays reusable while the returned handle (or an :class:`Index` using it)
    is referenced.

    Raises:
        ChecksumError: a base file is missing or does not match the directory's manifest.
    """
    version_dir = Path(version_dir)
    key, base = _loaded_base(version_dir)
    if base is not None:
        return base
    manifest = read_manifest(version_dir)
    others = tuple({rel.split("/")[0] for rel in manifest["files"]} - set(_BASE_FILES))
    verify_manifest(version_dir, kind="index", skip=others)
    return _load_base(version_dir, key)


def _loaded_base(version_dir: Path) -> tuple[tuple[Any, ...], _Base | None]:
    """``(key, base)``: the base files' identity key, and the base already loaded from those very files."""
    key = ("base",) + file_identity(version_dir, _BASE_FILES)
    with _LOADED_LOCK:
        return key, _LOADED.get(key)


def _load_base(version_dir: Path, key: tuple[Any, ...]) -> _Base:
    scann_ops_pybind = scann_pybind()  # deferred: ScaNN, imported on first use (without TensorFlow)

    if (version_dir / SCANN_DIR / "scann_docids.pkl").exists():
        raise ChecksumError(f"{version_dir / SCANN_DIR} holds a pickled docids file; refusing to load it")
    base = _Base(scann_ops_pybind.load_searcher(str(version_dir / SCANN_DIR), assets_backcompat_shim=False))
    with _LOADED_LOCK:
        _LOADED[key] = base
    return base


def loaded_delta_segments(version_dir: Path, layout: SegmentLayout) -> dict[str, DeltaSegment]:
    """``{"delta/<name>": segment}`` for this version's delta segments already loaded in this process
    from the very same files (device, inode, size, mtime): verified then, not to be hashed again."""
    found = {}
    with _LOADED_LOCK:
        for name, _ in layout.delta:
            rel = f"{DELTA_DIR}/{name}"
            segment = _LOADED.get(("delta",) + file_identity(version_dir, (rel,)))
            if segment is not None:
                found[rel] = segment
    return found


def delta_segments(version_dir: Path, layout: SegmentLayout,
                   known: dict[str, DeltaSegment]) -> tuple[DeltaSegment, ...]:
    """This version's delta segments in order: ``known`` ones as they are, the others read (and
    remembered for the next version that links them). The caller has verified the files it reads.

    Raises:
        ChecksumError: a segment is unreadable or holds another number of rows than ``layout`` says.
    """
    out = []
    for name, rows in layout.delta:
        rel = f"{DELTA_DIR}/{name}"
        segment = known.get(rel)
        if segment is None:
            segment = DeltaSegment.load(version_dir / rel)
            if len(segment) != rows:
                raise ChecksumError(f"delta segment {version_dir / rel} holds {len(segment)} documents, the manifest "
                                    f"says {rows}")
            remember_delta_segment(version_dir, segment)
        out.append(segment)
    return tuple(out)


def remember_delta_segment(version_dir: Path, segment: DeltaSegment) -> None:
    """Register ``segment``, read from or just written to ``version_dir / delta / <name>``, as loaded.

    A writer registers the segment it stages: renaming the stage into ``versions/`` keeps the files'
    identity, so neither its own reload nor its next write reads (or re-hashes) its own bytes.
    """
    key = ("delta",) + file_identity(version_dir, (f"{DELTA_DIR}/{segment.name}",))
    with _LOADED_LOCK:
        _LOADED[key] = segment
        _RECENT.append(segment)
