"""The ScaNN index: build from embeddings, publish a version atomically, load and verify it.

Layout (see ``docs/design.md``)::

    INDEX_DIR/CURRENT                       one line: the live version's name
    INDEX_DIR/versions/<version>/model/     copy of the model directory (the query tower serves from it)
    INDEX_DIR/versions/<version>/scann/     ScaNN's own files, built without ``docids`` (they would be pickled)
    INDEX_DIR/versions/<version>/docs.sqlite  row → id, title, text (SQLite, our own id mapping)
    INDEX_DIR/versions/<version>/embeddings.npy  [n, dim] float32, L2-normalised, row order = docs.sqlite
    INDEX_DIR/versions/<version>/manifest.json   kind "index": counts, dim, ScaNN config, recall, sha256s
    INDEX_DIR/.staging/<version>/           a build in progress (never read; safe to delete when no build runs)

A build writes the whole version under ``.staging``, renames it into ``versions/`` and only then
replaces ``CURRENT`` (write ``CURRENT.tmp-*``, fsync, ``os.replace``, fsync the directory). A build
killed at any point therefore leaves the previous version live. Loading follows ``CURRENT`` and checks
every file against the manifest's sha256 before use.

Row ``i`` of ``embeddings.npy``, ScaNN's datapoint ``i`` and ``docs.sqlite`` row ``i`` are the same
document; ids live only in SQLite.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import resource
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dssm.artifacts import MANIFEST, read_manifest, verify_manifest, write_json_atomic, write_manifest
from dssm.config import config_to_dict, field
from dssm.errors import ChecksumError, ConfigError, IndexNotFoundError, InputError

__all__ = [
    "SCANN_MODES",
    "ScannConfig",
    "Doc",
    "DocStore",
    "DocStoreWriter",
    "BuildResult",
    "Index",
    "resolve_scann_params",
    "build_scann",
    "build_scann_in_chunks",
    "l2_normalize_inplace",
    "exact_top_k",
    "RecallProbe",
    "measure_recall",
    "tune_leaves_to_search",
    "new_version_name",
    "staging_dir",
    "publish_version",
    "IndexWriteLock",
    "check_added_file_name",
    "current_version_dir",
    "list_versions",
    "prune_versions",
    "build_index",
    "build_index_from_shards",
    "build_index_from_documents",
    "count_shard_rows",
    "load_index",
    "UpdateResult",
    "shard_of",
    "parse_shard_spec",
    "update_index",
    "upsert_documents",
    "delete_documents",
]

SCANN_MODES = ("auto", "brute_force", "ah", "tree_ah")
CURRENT = "CURRENT"
VERSIONS = "versions"
STAGING = ".staging"
DOCS_DB = "docs.sqlite"
EMBEDDINGS = "embeddings.npy"
SCANN_DIR = "scann"
MODEL_DIR = "model"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Rows per SQLite transaction / Arrow batch while streaming shards: bounded memory whatever n is.
_BATCH_ROWS = 8192


@dataclass(frozen=True)
class ScannConfig:
    """How the ScaNN searcher is built; ``auto`` picks by corpus size (see :func:`resolve_scann_params`)."""

    mode: str = field("auto", "auto | brute_force | ah | tree_ah; auto: brute force < brute_force_below docs, "
                              "AH + reorder < tree_above, tree + AH + reorder above")
    brute_force_below: int = field(20_000, "auto mode: exact (brute-force) search below this many documents")
    tree_above: int = field(100_000, "auto mode: partition into a k-means tree at or above this many documents")
    num_leaves: int = field(0, "tree partitions; 0 = round(sqrt(n))")
    num_leaves_to_search: int = field(0, "partitions searched per query; 0 = start at max(8, num_leaves // 10) "
                                         "and grow it at build time until recall@10 reaches min_recall")
    dims_per_block: int = field(2, "AH: dimensions per quantisation block (2 = 16 centres per 2 dims)")
    anisotropic_quantization_threshold: float = field(0.2, "AH: anisotropic (score-aware) quantisation threshold")
    reorder_k: int = field(100, "AH: candidates re-scored exactly before the final top-k")
    training_sample_size: int = field(100_000, "vectors sampled to train the tree and the AH codebooks")
    num_neighbors: int = field(10, "default k stored in the ScaNN config (search passes its own k)")
    recall_sample: int = field(1000, "document-derived queries used to measure recall@10 after the build")
    min_recall: float = field(0.95, "fail the build if recall@10 against exact search is below this")
    seed: int = field(0, "seed for the recall sample")

    def __post_init__(self) -> None:
        if self.mode not in SCANN_MODES:
            raise ConfigError(f"ScaNN mode {self.mode!r} is not one of {SCANN_MODES}")
        for name in ("brute_force_below", "tree_above", "dims_per_block", "reorder_k", "training_sample_size",
                     "num_neighbors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ScaNN {name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_leaves", "num_leaves_to_search", "recall_sample"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ScaNN {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_recall <= 1.0:
            raise ConfigError(f"min_recall must be in [0, 1], got {self.min_recall}")


def resolve_scann_params(config: ScannConfig, n: int) -> dict[str, Any]:
    """The concrete ScaNN parameters for ``n`` documents (what goes into the manifest).

    Args:
        config: the requested configuration.
        n: number of documents.

    Returns:
        ``{"mode": ..., ...}`` with every ``auto``/``0`` resolved.

    Raises:
        ConfigError: the forced mode cannot work for ``n`` (AH needs 16+ vectors; a tree needs
            at least as many vectors as leaves).
    """
    mode = config.mode
    if mode == "auto":
        if n < config.brute_force_below:
            mode = "brute_force"
        elif n < config.tree_above:
            mode = "ah"
        else:
            mode = "tree_ah"
    params: dict[str, Any] = {"mode": mode, "distance": "dot_product", "num_neighbors": config.num_neighbors}
    if mode == "brute_force":
        return params
    if n < 16:
        raise ConfigError(f"ScaNN mode {mode!r} needs at least 16 documents to train its codebooks, got {n}")
    params.update(
        dims_per_block=config.dims_per_block,
        anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
        reorder_k=config.reorder_k,
        training_sample_size=min(config.training_sample_size, n),
    )
    if mode == "tree_ah":
        leaves = config.num_leaves or max(2, round(math.sqrt(n)))
        if leaves > n:
            raise ConfigError(f"num_leaves={leaves} exceeds the number of documents {n}")
        to_search = config.num_leaves_to_search or max(8, leaves // 10)
        params.update(num_leaves=leaves, num_leaves_to_search=min(to_search, leaves))
    return params


def build_scann(matrix: np.ndarray, params: dict[str, Any]) -> Any:
    """Build a ScaNN searcher over ``matrix`` (never with ``docids``: ScaNN would pickle them).

    Args:
        matrix: [n, dim] float32, L2-normalised (dot product = cosine).
        params: from :func:`resolve_scann_params`.

    Returns:
        A ``scann_ops_pybind.ScannSearcher``.
    """
    from scann.scann_ops.py import scann_ops_pybind

    builder = scann_ops_pybind.builder(matrix, params["num_neighbors"], params["distance"])
    mode = params["mode"]
    if mode == "brute_force":
        builder = builder.score_brute_force()
    else:
        if mode == "tree_ah":
            builder = builder.tree(
                num_leaves=params["num_leaves"],
                num_leaves_to_search=params["num_leaves_to_search"],
                training_sample_size=params["training_sample_size"],
            )
        builder = builder.score_ah(
            params["dims_per_block"],
            anisotropic_quantization_threshold=params["anisotropic_quantization_threshold"],
            training_sample_size=params["training_sample_size"],
        ).reorder(params["reorder_k"])
    return builder.build()


def build_scann_in_chunks(sample: np.ndarray, rows: Iterable[np.ndarray], params: dict[str, Any]) -> Any:
    """Build a ScaNN searcher from a training sample, then add every row in order, chunk by chunk.

    ``builder.build()`` over the whole matrix peaks inside ScaNN at about 2.3x the matrix (at 1M x
    128: its 554 MB of final structures plus 574 MB of temporaries), on top of the caller's copy.
    ScaNN trains its tree and AH codebooks on a sample of ``training_sample_size`` rows anyway, so
    training on ``sample`` and then upserting the rows (each is assigned to its nearest partition
    and encoded with the trained codebooks) needs ScaNN's final structures plus one chunk; it costs
    about 25% more CPU. Datapoint ``i`` is the ``i``-th row yielded.

    Args:
        sample: [s, dim] float32 training rows (drawn at random from the corpus).
        rows: [chunk, dim] float32 blocks of all rows, in row order.
        params: from :func:`resolve_scann_params` (``ah`` or ``tree_ah``).

    Returns:
        A ``scann_ops_pybind.ScannSearcher`` over the rows.
    """
    searcher = build_scann(np.ascontiguousarray(sample, dtype=np.float32), params)
    # Delete from the end: ScaNN fills a deleted slot with its last point, which this avoids.
    searcher.searcher.delete(list(range(sample.shape[0] - 1, -1, -1)))
    for block in rows:
        block = np.ascontiguousarray(block, dtype=np.float32)
        # Batches of 256: the same tokens, AH codes and row order as one at a time (checked on
        # 200k rows), ~18% less CPU.
        searcher.searcher.upsert([None] * block.shape[0], block, 256)
    return searcher


class _NpyRows:
    """Rows of a 2-d ``.npy`` fetched with ``pread``, indexable like the array (``rows[found]``).

    A memory map of ``embeddings.npy`` (even with MADV_RANDOM) added ~500 MB of resident file pages
    to the recall gate at 1M documents: the kernel maps pages around each of its ~10,000 scattered
    rows per try.
    """

    def __init__(self, path: Path):
        with open(path, "rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            (self._n, self._dim), _, self._dtype = reader(handle)
            self._offset = handle.tell()
        self._row_bytes = self._dim * self._dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY)

    def __getitem__(self, rows: Any) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
        out = np.empty((unique.size, self._dim), self._dtype)
        for i, row in enumerate(unique.tolist()):
            out[i] = np.frombuffer(os.pread(self._fd, self._row_bytes, self._offset + row * self._row_bytes),
                                   self._dtype)
        return out[inverse].reshape(*rows.shape, self._dim)

    def close(self) -> None:
        """Close the file (idempotent; also on garbage collection, e.g. when a build fails first)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    __del__ = close


def _npy_chunks(path: Path, *, chunk: int = 65536) -> Iterator[np.ndarray]:
    """[chunk, dim] blocks of a 2-d float32 ``.npy`` read with plain reads (pages stay in the page
    cache, not in this process's RSS as a memory map's would)."""
    with open(path, "rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        (n, dim), _, dtype = reader(handle)
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            yield np.fromfile(handle, dtype=dtype, count=rows * dim).reshape(rows, dim)


def l2_normalize_inplace(matrix: np.ndarray, *, chunk: int = 65536) -> int:
    """L2-normalise the rows of ``matrix`` in place, chunk by chunk (no full-size temporary).

    Zero rows stay zero (they score 0 against every query).

    Args:
        matrix: [n, dim] float32.

    Returns:
        Number of zero rows.
    """
    zeros = 0
    for start in range(0, matrix.shape[0], chunk):
        block = matrix[start:start + chunk]
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        zero = norms[:, 0] == 0.0
        zeros += int(zero.sum())
        norms[zero] = 1.0
        block /= norms
    return zeros


def exact_top_k(matrix: np.ndarray, queries: np.ndarray, k: int, *,
                chunk: int = 131072) -> tuple[np.ndarray, np.ndarray]:
    """Exact dot-product top-k: a float32 brute-force ScaNN searcher per chunk of rows, merged.

    ScaNN's brute force scores in float32 without quantisation (exact up to summation order) and
    selects top-k with SIMD, about 9x faster than numpy's argpartition over [queries, n] scores;
    building one per chunk copies only ``chunk`` rows at a time, so memory stays O(chunk × dim).

    Args:
        matrix: [n, dim] float32.
        queries: [q, dim] float32.
        k: neighbours per query (clipped to n).
        chunk: rows per brute-force searcher.

    Returns:
        (rows [q, k] int64, scores [q, k] float32), best first.
    """
    from scann.scann_ops.py import scann_ops_pybind

    n = matrix.shape[0]
    k = min(k, n)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_rows = np.zeros((queries.shape[0], 0), dtype=np.int64)
    best_scores = np.zeros((queries.shape[0], 0), dtype=np.float32)
    for start in range(0, n, chunk):
        part = np.ascontiguousarray(matrix[start:start + chunk], dtype=np.float32)
        kk = min(k, part.shape[0])
        brute = scann_ops_pybind.builder(part, kk, "dot_product").score_brute_force().build()
        rows, scores = brute.search_batched(queries, final_num_neighbors=kk)
        del brute
        scores = np.concatenate([best_scores, np.asarray(scores, dtype=np.float32)], axis=1)
        rows = np.concatenate([best_rows, np.asarray(rows, dtype=np.int64) + start], axis=1)
        if scores.shape[1] > k:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores = np.take_along_axis(scores, top, axis=1)
            rows = np.take_along_axis(rows, top, axis=1)
        best_scores, best_rows = scores, rows
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_rows, order, axis=1), np.take_along_axis(best_scores, order, axis=1)


class RecallProbe:
    """Document-derived queries with their exact top-k scores, computed once to score search settings.

    A returned row counts as correct when its exact score reaches the k-th exact score (minus 1e-5),
    so exact ties (duplicate documents) are not counted as misses whichever tied row either side picks.

    Args:
        matrix: [n, dim] float32, the indexed vectors.
        k: cut-off.
        sample: number of query rows drawn from ``matrix`` (all rows if n is smaller).
        seed: sampling seed.
    """

    def __init__(self, matrix: np.ndarray, *, k: int = 10, sample: int = 1000, seed: int = 0):
        n = matrix.shape[0]
        self.matrix = matrix
        self.k = min(k, n)
        self.size = min(sample, n)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=self.size, replace=False))
        self.queries = np.ascontiguousarray(matrix[rows], dtype=np.float32)
        if self.size:
            _, exact_scores = exact_top_k(matrix, self.queries, self.k)
            self.threshold = exact_scores[:, self.k - 1:self.k] - 1e-5

    def recall(self, searcher: Any, *, leaves_to_search: int | None = None, pre_reorder: int | None = None) -> float:
        """Mean recall@k of ``searcher`` (a ScaNN searcher over ``matrix``) in [0, 1].

        Args:
            searcher: the searcher to score.
            leaves_to_search: tree partitions searched; ``None`` for the searcher's default.
            pre_reorder: candidates before exact reordering; ``None`` for the searcher's default.
        """
        if self.size == 0:
            return 1.0
        found, _ = searcher.search_batched(self.queries, final_num_neighbors=self.k,
                                           pre_reorder_num_neighbors=pre_reorder, leaves_to_search=leaves_to_search)
        found = np.asarray(found, dtype=np.int64)
        true_scores = np.einsum("qd,qkd->qk", self.queries, self.matrix[found])
        hits = np.minimum((true_scores >= self.threshold).sum(axis=1), self.k)
        return float(hits.mean() / self.k)


def measure_recall(searcher: Any, matrix: np.ndarray, *, k: int = 10, sample: int = 1000, seed: int = 0,
                   leaves_to_search: int | None = None, pre_reorder: int | None = None) -> float:
    """Recall@k of ``searcher`` against exact search on ``sample`` documents used as queries.

    See :class:`RecallProbe` (use it directly to score several settings against one exact search).
    """
    return RecallProbe(matrix, k=k, sample=sample, seed=seed).recall(
        searcher, leaves_to_search=leaves_to_search, pre_reorder=pre_reorder)


def tune_leaves_to_search(searcher: Any, probe: RecallProbe, *, start: int, num_leaves: int,
                          min_recall: float) -> tuple[int, float, list[tuple[int, float]]]:
    """Grow the number of tree partitions searched (x1.5 a step) until recall reaches ``min_recall``.

    Searching more partitions is a query-time setting, so no rebuild is needed; the chosen value is
    stored in the manifest and used by every search.

    Returns:
        (leaves_to_search, its recall, [(leaves, recall), ...] tried).
    """
    leaves = max(1, min(start, num_leaves))
    recall = probe.recall(searcher, leaves_to_search=leaves)
    tried = [(leaves, recall)]
    while recall < min_recall and leaves < num_leaves:
        leaves = min(num_leaves, max(leaves + 1, int(leaves * 1.5)))
        recall = probe.recall(searcher, leaves_to_search=leaves)
        tried.append((leaves, recall))
    return leaves, recall, tried


# --------------------------------------------------------------------------------------------------
# Document store


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
        _fsync_file(self.path)


class DocStore:
    """Read-only access to ``docs.sqlite``; safe to share between threads (one connection per thread).

    The version directory is immutable once published, so connections open with ``immutable=1``
    (no locking, no journal checks).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise IndexNotFoundError(f"document store not found: {self.path}")
        self._local = threading.local()
        self._size = int(self._conn().execute("SELECT COUNT(*) FROM docs").fetchone()[0])

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
        if not wanted:
            return []
        found: dict[int, Doc] = {}
        unique = sorted(set(wanted))
        # SQLite's default limit on bound parameters is 32766; stay well under it.
        for start in range(0, len(unique), 900):
            part = unique[start:start + 900]
            marks = ",".join("?" * len(part))
            for row, doc_id, title, text in self._conn().execute(
                    f"SELECT row, id, title, text FROM docs WHERE row IN ({marks})", part):
                found[row] = Doc(doc_id, title, text)
        missing = [r for r in unique if r not in found]
        if missing:
            raise IndexNotFoundError(f"rows {missing[:5]} are not in the document store {self.path}")
        return [found[r] for r in wanted]

    def row_of(self, doc_id: str) -> int | None:
        """The row of document ``doc_id``, or ``None``."""
        result = self._conn().execute("SELECT row FROM docs WHERE id = ?", (doc_id,)).fetchone()
        return None if result is None else int(result[0])

    def iter_all(self, *, batch: int = _BATCH_ROWS) -> Iterator[tuple[int, Doc]]:
        """All (row, Doc) in row order."""
        cursor = self._conn().execute("SELECT row, id, title, text FROM docs ORDER BY row")
        while chunk := cursor.fetchmany(batch):
            for row, doc_id, title, text in chunk:
                yield int(row), Doc(doc_id, title, text)


# --------------------------------------------------------------------------------------------------
# Versions and publication


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_dir(Path(root))


def new_version_name() -> str:
    """A sortable, unique version name: UTC time to the microsecond plus a random suffix.

    Example: ``20250101T120000.123456Z-1a2b3c``; names sort in build order.
    """
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
    return f"{stamp}.{now // 1000 % 10**6:06d}Z-{secrets.token_hex(3)}"


def staging_dir(index_dir: str | Path, version: str) -> Path:
    """Where a build of ``version`` writes before publication (same filesystem, so rename is atomic)."""
    return Path(index_dir) / STAGING / version


def _drop_staging(index_dir: Path, version: str) -> None:
    shutil.rmtree(staging_dir(index_dir, version), ignore_errors=True)
    try:  # only if empty: a concurrent build may be staging beside us
        (index_dir / STAGING).rmdir()
    except OSError:
        pass


_UPDATE_LOCK = ".update.lock"


class IndexWriteLock:
    """The one lock every writer of ``INDEX_DIR/CURRENT`` holds: an exclusive ``flock`` on ``.update.lock``.

    Full builds (around the publish), updates, derived versions (thresholds, hybrid weight) and
    pruning all take it, and a writer that derives a version from the live one reads ``CURRENT``
    *under* it, so no publish is built on a base another writer has since replaced (issue 12).
    Re-entrant within a thread (``update_index`` holds it and calls :func:`publish_version`, which
    takes it too); other threads and processes wait.
    """

    _held = threading.local()

    def __init__(self, index_dir: str | Path):
        self.path = Path(index_dir) / _UPDATE_LOCK
        self._key = str(Path(index_dir).resolve())

    def __enter__(self) -> IndexWriteLock:
        import fcntl

        held = self._held.__dict__.setdefault("locks", {})
        if self._key in held:
            held[self._key][1] += 1
            return self
        if not self.path.parent.is_dir():
            raise IndexNotFoundError(f"no index at {self.path.parent} (build one with `dssm index`)")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        held[self._key] = [fd, 1]
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        held = self._held.__dict__["locks"]
        entry = held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del held[self._key]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])


def publish_version(index_dir: str | Path, staged: str | Path, version: str) -> Path:
    """Move a complete staged version into ``versions/`` and point ``CURRENT`` at it, atomically.

    Args:
        index_dir: the index directory.
        staged: a complete version directory (with its manifest) on the same filesystem.
        version: its name.

    Returns:
        The published version directory.
    """
    index_dir = Path(index_dir)
    if not _VERSION_RE.match(version):
        raise ConfigError(f"invalid index version name {version!r}")
    read_manifest(staged)  # refuse to publish a version whose manifest was never written
    versions = index_dir / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    final = versions / version
    _fsync_tree(Path(staged))
    with IndexWriteLock(index_dir):
        os.rename(staged, final)
        _fsync_dir(versions)
        tmp = index_dir / f"{CURRENT}.tmp-{version}"
        with open(tmp, "w") as handle:
            handle.write(version + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, index_dir / CURRENT)
        _fsync_dir(index_dir)
    return final


def current_version_dir(index_dir: str | Path) -> Path:
    """The directory ``CURRENT`` points to.

    Raises:
        IndexNotFoundError: no index at ``index_dir``, or ``CURRENT`` names a missing version.
    """
    index_dir = Path(index_dir)
    pointer = index_dir / CURRENT
    if not pointer.is_file():
        raise IndexNotFoundError(f"no index at {index_dir}: {pointer} not found (build one with `dssm index`)")
    version = pointer.read_text().strip()
    if not _VERSION_RE.match(version):
        raise IndexNotFoundError(f"{pointer} holds {version!r}, which is not a version name")
    directory = index_dir / VERSIONS / version
    if not directory.is_dir():
        raise IndexNotFoundError(f"{pointer} names version {version!r} but {directory} does not exist")
    return directory


def list_versions(index_dir: str | Path) -> list[str]:
    """Published version names, oldest first."""
    versions = Path(index_dir) / VERSIONS
    if not versions.is_dir():
        return []
    return sorted(p.name for p in versions.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


def prune_versions(index_dir: str | Path, *, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions, never the one ``CURRENT`` names.

    Returns:
        Names of deleted versions.
    """
    if keep < 1:
        raise ConfigError(f"keep must be >= 1, got {keep}")
    with IndexWriteLock(index_dir):  # CURRENT cannot move to a version we are about to delete
        current = current_version_dir(index_dir).name
        names = list_versions(index_dir)
        doomed = [v for v in names[:-keep] if v != current]
        for name in doomed:
            shutil.rmtree(Path(index_dir) / VERSIONS / name)
    return doomed


# --------------------------------------------------------------------------------------------------
# Build


@dataclass(frozen=True)
class BuildResult:
    """What a build produced."""

    index_dir: Path
    version: str
    version_dir: Path
    documents: int
    dim: int
    scann: dict[str, Any]
    recall_at_10: float
    seconds: dict[str, float]
    peak_rss_bytes: int
    matrix_bytes: int
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary."""
        data = dataclasses.asdict(self)
        data["index_dir"] = str(self.index_dir)
        data["version_dir"] = str(self.version_dir)
        return data


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes ({} where /proc is missing)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024  # kB
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    # Linux >= 4.0: writing 5 to clear_refs resets the high-water mark (VmHWM, and ru_maxrss with it).
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _load_build_libraries() -> None:
    # Imported before the memory baseline: ScaNN pulls in TensorFlow (~600 MB resident), which is
    # the process's, not the build's (`dssm index` has it loaded already to encode).
    from scann.scann_ops.py import scann_ops_pybind  # noqa: F401

    import dssm.bm25  # noqa: F401


class _MemoryTrace:
    """Resident memory of a build, stage by stage, from the kernel's own counters.

    tracemalloc sees neither numpy's nor ScaNN's C++ allocations, so each stage boundary reads the
    process's VmRSS and high-water mark (VmHWM) from ``/proc/self/status`` and resets the mark, which
    makes each stage's peak exact (including memory allocated and freed inside the stage). Side effect:
    the process's ``ru_maxrss`` restarts at the build's start. Where the reset is refused (no ``/proc``),
    the peaks are the process's lifetime high-water mark and ``peak_is_lifetime`` says so.

    Attributes:
        baseline: RSS when the build started, after importing ScaNN (and TensorFlow with it) and
            bm25s: the interpreter, libraries and the caller's data, not the build's.
    """

    def __init__(self) -> None:
        _load_build_libraries()
        self.exact = _reset_peak_rss()
        self.baseline = _proc_status().get("VmRSS") or _peak_rss_bytes()
        self.stages: list[dict[str, Any]] = []

    def mark(self, stage: str) -> None:
        """Close ``stage``: record its peak and end RSS, and start the next stage's peak."""
        status = _proc_status()
        peak = status.get("VmHWM") if self.exact else None
        self.stages.append({"stage": stage, "peak_rss_bytes": peak or _peak_rss_bytes(),
                            "end_rss_bytes": status.get("VmRSS")})
        if self.exact:
            _reset_peak_rss()

    @property
    def peak(self) -> int:
        """The highest RSS seen during the build (bytes)."""
        return max([s["peak_rss_bytes"] for s in self.stages] or [self.baseline])

    def report(self, *, matrix_bytes: int, scann_bytes: int, bm25_bytes: int) -> dict[str, Any]:
        """The manifest's ``build.memory`` section.

        ``ratio`` = (peak − baseline − ScaNN's structures) / raw matrix: what the build holds beside
        ScaNN's own copy of the data, in units of the float32 matrix (budget: ≤ 1.5).
        """
        mib = 2**20
        peak = self.peak
        return {
            "baseline_rss_bytes": self.baseline,
            "peak_rss_bytes": peak,
            "peak_above_baseline_bytes": peak - self.baseline,
            "matrix_bytes": matrix_bytes,
            "scann_bytes": scann_bytes,
            "bm25_bytes": bm25_bytes,
            "ratio": round((peak - self.baseline - scann_bytes) / max(matrix_bytes, 1), 3),
            "peak_is_lifetime": not self.exact,
            "stages_mib": [{"stage": s["stage"], "peak": round((s["peak_rss_bytes"] - self.baseline) / mib, 1),
                            "end": None if s["end_rss_bytes"] is None else
                            round((s["end_rss_bytes"] - self.baseline) / mib, 1)} for s in self.stages],
        }


def _release_free_memory() -> None:
    # glibc keeps freed heap (ScaNN's and numpy's temporaries) mapped; malloc_trim returns it to the
    # OS so the next stage starts from what is really held. A no-op elsewhere.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _check_finite(matrix: np.ndarray, store_path: Path, *, chunk: int = 65536) -> None:
    # Chunked: a whole-matrix isfinite() would allocate an [n, dim] bool temporary.
    bad = np.concatenate([start + np.flatnonzero(~np.isfinite(matrix[start:start + chunk]).all(axis=1))
                          for start in range(0, matrix.shape[0], chunk)] or [np.zeros(0, np.int64)])
    if bad.size:
        row = int(bad[0])
        conn = sqlite3.connect(store_path)
        found = conn.execute("SELECT id FROM docs WHERE row = ?", (row,)).fetchone()
        conn.close()
        doc_id = found[0] if found else f"row {row}"
        raise InputError(f"embedding of document {doc_id!r} (and {bad.size - 1} more) is not finite (NaN/inf)")


def check_added_file_name(name: str) -> None:
    """Refuse a name for a JSON file added to a version (a finalize hook's, ``publish_index_files``'):
    a plain top-level name, not the manifest, not hidden.

    Raises:
        ConfigError: naming it.
    """
    if "/" in name or name in ("", MANIFEST) or name.startswith("."):
        raise ConfigError(f"cannot add index file {name!r}")


#: ``stage -> ({file name: JSON data}, {manifest key: value})``: see :func:`build_index_from_shards`.
Finalize = Callable[[Path], tuple[Mapping[str, Any], Mapping[str, Any]]]


def _finish_version(*, index_dir: Path, version: str, stage: Path, matrix: np.ndarray, store: DocStoreWriter,
                    model_dir: str | Path | None, config: ScannConfig, extra: dict[str, Any] | None,
                    timings: dict[str, float], trace: _MemoryTrace, finalize: Finalize | None = None) -> BuildResult:
    """Normalise, save, build ScaNN, measure recall, copy the model, write the manifest, publish.

    ``matrix`` is released after the exact search (ScaNN then reads ``embeddings.npy`` in chunks; see
    :func:`build_scann_in_chunks`): callers that pass their only reference (``matrix=box.pop()``)
    get it freed before ScaNN builds.
    """
    n, dim = matrix.shape
    matrix_bytes = int(matrix.nbytes)
    store.close()
    if n == 0:
        raise InputError("the corpus has no documents to index")
    _check_finite(matrix, store.path)
    zero_rows = l2_normalize_inplace(matrix)

    tick = time.perf_counter()
    np.save(stage / EMBEDDINGS, matrix, allow_pickle=False)
    timings["save_embeddings"] = time.perf_counter() - tick
    trace.mark("normalise_save")

    # The exact side of the recall gate runs now, while the matrix is the only large array: after
    # the ScaNN build it would sit beside ScaNN's copy of the data.
    tick = time.perf_counter()
    probe = RecallProbe(matrix, k=10, sample=config.recall_sample, seed=config.seed)
    timings["exact_search"] = time.perf_counter() - tick
    params = resolve_scann_params(config, n)
    chunked = params["mode"] != "brute_force" and n > params["training_sample_size"]
    if chunked:
        sample_rows = np.sort(np.random.default_rng(config.seed).choice(n, params["training_sample_size"],
                                                                        replace=False))
        sample = matrix[sample_rows]
        del matrix  # ScaNN reads the rows back from embeddings.npy, a chunk at a time
    # The gate scores the few rows ScaNN returns, read back from the file.
    probe.matrix = rows_on_disk = _NpyRows(stage / EMBEDDINGS)
    _release_free_memory()
    trace.mark("exact_search")

    tick = time.perf_counter()
    if chunked:
        searcher = build_scann_in_chunks(sample, _npy_chunks(stage / EMBEDDINGS), params)
        del sample
    else:
        searcher = build_scann(matrix, params)
        del matrix
    timings["scann_build"] = time.perf_counter() - tick
    _release_free_memory()
    trace.mark("scann_build")
    (stage / SCANN_DIR).mkdir()
    searcher.serialize(str(stage / SCANN_DIR), relative_path=True)
    _release_free_memory()
    trace.mark("scann_serialize")

    tick = time.perf_counter()
    if params["mode"] == "tree_ah" and config.num_leaves_to_search == 0:
        leaves, recall, tried = tune_leaves_to_search(searcher, probe, start=params["num_leaves_to_search"],
                                                      num_leaves=params["num_leaves"], min_recall=config.min_recall)
        params.update(num_leaves_to_search=leaves, leaves_tuning=[[lv, round(r, 4)] for lv, r in tried])
    else:
        recall = probe.recall(searcher, leaves_to_search=params.get("num_leaves_to_search"))
    timings["recall"] = time.perf_counter() - tick
    rows_on_disk.close()
    del searcher, probe
    _release_free_memory()
    trace.mark("recall")
    if recall < config.min_recall:
        raise ConfigError(f"ScaNN recall@10 {recall:.4f} against exact search is below --min-recall "
                          f"{config.min_recall} with {params}; search more leaves or raise reorder_k")

    model_info: dict[str, Any] | None = None
    if model_dir is not None:
        model_dir = Path(model_dir)
        model_manifest = verify_manifest(model_dir, kind="model")
        # Only the model's own files: `dssm train` keeps its checkpoints/ and logs/ (hundreds of MB,
        # not in the manifest) in the model directory.
        listed = {rel.split("/", 1)[0] for rel in model_manifest["files"]} | {MANIFEST}
        shutil.copytree(model_dir, stage / MODEL_DIR, ignore=lambda d, names: [
            n for n in names if Path(d) == model_dir and n not in listed])
        model_info = {"source": str(model_dir.resolve()), "created": model_manifest.get("created"),
                      "files": len(model_manifest.get("files", {}))}
    trace.mark("model_copy")

    # BM25 state for Searcher mode="hybrid"/"bm25" (dssm/bm25.py owns the format); written before
    # the manifest so the manifest checksums it.
    from dssm.bm25 import BM25_DIR, write_bm25_state

    tick = time.perf_counter()
    write_bm25_state(stage, (doc for _, doc in DocStore(stage / DOCS_DB).iter_all()))
    timings["bm25"] = time.perf_counter() - tick
    trace.mark("bm25")
    added: dict[str, Any] = {}
    if finalize is not None:
        tick = time.perf_counter()
        files, added = finalize(stage)
        for name, data in files.items():
            check_added_file_name(name)
            if (stage / name).exists():
                raise ConfigError(f"cannot add index file {name!r}: the version already has one")
            write_json_atomic(stage / name, data)
        timings["finalize"] = time.perf_counter() - tick

    memory = trace.report(matrix_bytes=matrix_bytes, scann_bytes=_tree_bytes(stage / SCANN_DIR),
                          bm25_bytes=_tree_bytes(stage / BM25_DIR))
    peak = memory["peak_rss_bytes"]
    manifest_extra = {
        "version": version,
        "counts": {"documents": n, "zero_embeddings": zero_rows},
        "dim": dim,
        "scann": params,
        "scann_config": config_to_dict(config),
        "recall@10": recall,
        "recall_sample": min(config.recall_sample, n),
        "model": model_info,
        "build": {"seconds": {k: round(v, 3) for k, v in timings.items()}, "peak_rss_bytes": peak,
                  "matrix_bytes": matrix_bytes, "memory": memory},
        **(extra or {}),
        **added,
    }
    write_manifest(stage, kind="index", extra=manifest_extra)
    final = publish_version(index_dir, stage, version)
    return BuildResult(index_dir=index_dir, version=version, version_dir=final, documents=n, dim=dim, scann=params,
                       recall_at_10=recall, seconds=timings, peak_rss_bytes=peak, matrix_bytes=matrix_bytes,
                       memory=memory)


def build_index(
    index_dir: str | Path,
    *,
    embeddings: np.ndarray,
    ids: Sequence[str],
    texts: Sequence[str],
    titles: Sequence[str] | None = None,
    model_dir: str | Path | None = None,
    config: ScannConfig = ScannConfig(),  # noqa: B008 - frozen, immutable
    version: str | None = None,
    extra: dict[str, Any] | None = None,
    copy: bool = True,
) -> BuildResult:
    """Build and publish an index version from an in-memory embedding matrix.

    Args:
        index_dir: the index directory (created if missing).
        embeddings: [n, dim] float; copied once into float32 unless ``copy=False``.
        ids: n unique document ids.
        texts: n document texts.
        titles: n titles, or ``None`` for empty titles.
        model_dir: the model directory to copy into the version (its manifest is verified);
            ``None`` builds a vector-only index (search by vector; no text queries).
        config: ScaNN configuration.
        version: version name; default :func:`new_version_name`.
        extra: more manifest keys.
        copy: ``False`` normalises a float32 C-contiguous ``embeddings`` in place instead of copying it
            (no second [n, dim] matrix for callers that own the array).

    Returns:
        The :class:`BuildResult`.

    Raises:
        InputError: no documents, mismatched lengths, a duplicate or empty id, non-finite embeddings.
        ConfigError: recall below ``config.min_recall``, or a ScaNN mode impossible for n.
    """
    trace = _MemoryTrace()  # before the copy: a copied matrix is the build's memory
    matrix = np.array(embeddings, dtype=np.float32, copy=True, order="C") if copy else \
        np.ascontiguousarray(embeddings, dtype=np.float32)
    if matrix.ndim != 2:
        raise InputError(f"embeddings must be a [n, dim] matrix, got shape {matrix.shape}")
    n = matrix.shape[0]
    titles = [""] * n if titles is None else titles
    for name, values in (("ids", ids), ("texts", texts), ("titles", titles)):
        if len(values) != n:
            raise InputError(f"{len(values)} {name} for {n} embeddings")
    index_dir = Path(index_dir)
    version = version or new_version_name()
    stage = staging_dir(index_dir, version) / "version"
    stage.mkdir(parents=True)
    try:
        tick = time.perf_counter()
        store = DocStoreWriter(stage / DOCS_DB)
        for start in range(0, n, _BATCH_ROWS):
            stop = start + _BATCH_ROWS
            store.add(list(ids[start:stop]), list(titles[start:stop]), list(texts[start:stop]))
        timings = {"docs": time.perf_counter() - tick}
        trace.mark("docs")
        box = [matrix]  # the callee frees a copy it alone holds (copy=False: the caller's array stays)
        del matrix
        return _finish_version(index_dir=index_dir, version=version, stage=stage, matrix=box.pop(), store=store,
                               model_dir=model_dir, config=config, extra=extra, timings=timings, trace=trace)
    finally:
        _drop_staging(index_dir, version)


def build_index_from_documents(
    index_dir: str | Path,
    *,
    model_dir: str | Path,
    documents: Sequence[Any],
    config: ScannConfig = ScannConfig(),  # noqa: B008 - frozen, immutable
    batch_size: int = 4096,
    version: str | None = None,
    progress: bool = True,
) -> BuildResult:
    """Encode documents in this process with the model's document tower, then :func:`build_index`.

    The in-process counterpart of the ``dssm index`` Beam job, for corpora that fit in memory.

    Args:
        index_dir: the index directory.
        model_dir: the model directory (verified, then copied into the version).
        documents: objects with ``id``, ``title``, ``text`` (e.g. :class:`dssm.data.Document`).
        config: ScaNN configuration.
        batch_size: texts per call into the document tower.
        version: version name; default :func:`new_version_name`.
        progress: show a tqdm bar.
    """
    from tqdm import tqdm

    from dssm.bm25 import document_text
    from dssm.export import load_encoder

    if not documents:
        raise InputError("the corpus has no documents to index")
    encoder = load_encoder(model_dir, batch_size=batch_size)
    matrix = np.empty((len(documents), encoder.dim), dtype=np.float32)
    tick = time.perf_counter()
    with tqdm(total=len(documents), desc="encoding", unit="doc", disable=not progress) as bar:
        for start in range(0, len(documents), batch_size):
            chunk = documents[start:start + batch_size]
            matrix[start:start + len(chunk)] = encoder.embed_documents([document_text(d.title, d.text) for d in chunk])
            bar.update(len(chunk))
    seconds = time.perf_counter() - tick
    return build_index(index_dir, embeddings=matrix, ids=[d.id for d in documents], texts=[d.text for d in documents],
                       titles=[d.title for d in documents], model_dir=model_dir, config=config, version=version,
                       copy=False,
                       extra={"encode": {"encoded": len(documents), "seconds": round(seconds, 3), "in_process": True,
                                         "docs_per_second": round(len(documents) / max(seconds, 1e-9), 1)}})


def count_shard_rows(shards: Iterable[str | Path]) -> tuple[int, int | None]:
    """Rows in Parquet embedding shards (from their footers) and the embedding width of the first row.

    Returns:
        (rows, dim) — dim is ``None`` if every shard is empty.
    """
    import pyarrow.parquet as pq

    total, dim = 0, None
    for path in shards:
        file = pq.ParquetFile(path)
        total += file.metadata.num_rows
        if dim is None and file.metadata.num_rows:
            first = next(file.iter_batches(batch_size=1, columns=["embedding"]))
            dim = len(first.column(0)[0])
    return total, dim


def build_index_from_shards(
    index_dir: str | Path,
    *,
    shards: Sequence[str | Path],
    model_dir: str | Path | None,
    config: ScannConfig = ScannConfig(),  # noqa: B008 - frozen, immutable
    version: str | None = None,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
    finalize: Finalize | None = None,
) -> BuildResult:
    """Stream Parquet shards (``id``, ``title``, ``text``, ``embedding``) into a published index version.

    The matrix is preallocated once from the shards' row counts and filled batch by batch, so the
    only full-size array is the [n, dim] float32 matrix itself (plus ScaNN's structures).

    Args:
        index_dir: the index directory.
        shards: Parquet files written by the encode job.
        model_dir: model directory copied into the version (``None``: vector-only index).
        config: ScaNN configuration.
        version: version name; default :func:`new_version_name`.
        extra: more manifest keys (e.g. the encode job's counts).
        progress: show a tqdm bar.
        finalize: called with the complete staged version (embeddings, doc store, model, BM25) before
            its manifest is written; returns ``(files, manifest keys)``: small JSON files added to the
            version and checksummed with it (``dssm index`` stores the label-free hybrid weight so).

    Raises:
        InputError: no documents, a missing column, an embedding of the wrong width (naming the id),
            a duplicate id (naming it and both rows), non-finite embeddings.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    shards = [Path(s) for s in shards]
    has_record = True  # the encode job's source locations, for error messages
    for path in shards:
        if not path.is_file():
            raise InputError(f"embedding shard not found: {path}")
        names = pq.read_schema(path).names
        has_record = has_record and "record" in names
        missing = [c for c in ("id", "title", "text", "embedding") if c not in names]
        if missing:
            raise InputError(f"embedding shard {path} lacks column(s) {missing}; it has {names}")
    n, dim = count_shard_rows(shards)
    if n == 0 or dim is None:
        raise InputError("the corpus has no documents to index (every embedding shard is empty)")
    index_dir = Path(index_dir)
    version = version or new_version_name()
    stage = staging_dir(index_dir, version) / "version"
    stage.mkdir(parents=True)
    trace = _MemoryTrace()
    try:
        tick = time.perf_counter()
        matrix = np.empty((n, dim), dtype=np.float32)
        store = DocStoreWriter(stage / DOCS_DB)
        pos = 0
        with tqdm(total=n, desc="loading shards", unit="doc", disable=not progress) as bar:
            for path in shards:
                shard_row = 0
                wanted = ["id", "title", "text", "embedding"] + (["record"] if has_record else [])
                for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=wanted):
                    ids = batch.column(0).to_pylist()
                    column = batch.column(3)
                    lengths = np.diff(np.asarray(column.offsets))
                    wrong = np.flatnonzero(lengths != dim)
                    if wrong.size:
                        raise InputError(f"{path}: document {ids[int(wrong[0])]!r} has a {int(lengths[wrong[0]])}"
                                         f"-dim embedding, expected {dim}")
                    if column.null_count:
                        raise InputError(f"{path}: a document has a null embedding")
                    rows = len(ids)
                    if pos + rows > n:
                        raise InputError(f"{path} holds more rows than its footer said ({pos + rows} > {n})")
                    values = column.flatten().to_numpy(zero_copy_only=False)
                    matrix[pos:pos + rows] = values.reshape(rows, dim)
                    store.add(ids, batch.column(1).to_pylist(), batch.column(2).to_pylist(),
                              locations=(batch.column(4).to_pylist() if has_record
                                         else [f"{path.name} row {shard_row + i}" for i in range(rows)]))
                    shard_row += rows
                    pos += rows
                    bar.update(rows)
        if pos != n:
            raise InputError(f"embedding shards held {pos} rows, their footers said {n}")
        del batch, values, column
        pa.default_memory_pool().release_unused()  # Arrow keeps freed batches for reuse
        _release_free_memory()
        timings = {"load_shards": time.perf_counter() - tick}
        trace.mark("load_shards")
        box = [matrix]  # so that _finish_version can free it once ScaNN has its copy
        del matrix
        return _finish_version(index_dir=index_dir, version=version, stage=stage, matrix=box.pop(), store=store,
                               model_dir=model_dir, config=config, extra=extra, timings=timings, trace=trace,
                               finalize=finalize)
    finally:
        _drop_staging(index_dir, version)


# --------------------------------------------------------------------------------------------------
# Load


class Index:
    """A loaded, verified index version: ScaNN searcher + document store (+ the model directory path)."""

    def __init__(self, *, version_dir: Path, manifest: dict[str, Any], scann: Any, docs: DocStore):
        self.version_dir = version_dir
        self.manifest = manifest
        self.scann = scann
        self.docs = docs
        self.dim = int(manifest["dim"])
        self.size = int(manifest["counts"]["documents"])
        self.params = dict(manifest["scann"])

    @property
    def version(self) -> str:
        """The version name."""
        return self.version_dir.name

    @property
    def model_dir(self) -> Path | None:
        """The copied model directory, or ``None`` for a vector-only index."""
        path = self.version_dir / MODEL_DIR
        return path if path.is_dir() else None

    def embeddings(self, *, mmap: bool = True) -> np.ndarray:
        """The [n, dim] float32 matrix (memory-mapped read-only by default)."""
        return np.load(self.version_dir / EMBEDDINGS, mmap_mode="r" if mmap else None, allow_pickle=False)

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k by dot product.

        Args:
            queries: [q, dim] float32 (L2-normalised query embeddings).
            k: neighbours per query (clipped to the index size).

        Returns:
            (rows [q, k'] int64, scores [q, k'] float32), best first, k' = min(k, size).
        """
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"query vectors must be [q, {self.dim}], got shape {queries.shape}")
        k = min(k, self.size)
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


def load_index(index_dir: str | Path, *, verify: bool = True) -> Index:
    """Load the version ``CURRENT`` points to, after checking every file's sha256.

    Args:
        index_dir: the index directory.
        verify: check checksums (leave on; off only for benchmarks that just built the index).

    Raises:
        IndexNotFoundError: no index / no ``CURRENT`` / missing version.
        ChecksumError: a file is missing, truncated or corrupted (the message names it).
    """
    from scann.scann_ops.py import scann_ops_pybind

    version_dir = current_version_dir(index_dir)
    manifest = verify_manifest(version_dir, kind="index") if verify else read_manifest(version_dir)
    for name in (SCANN_DIR, DOCS_DB, EMBEDDINGS):
        if not (version_dir / name).exists():
            raise ChecksumError(f"index version {version_dir} lacks {name}")
    if (version_dir / SCANN_DIR / "scann_docids.pkl").exists():
        raise ChecksumError(f"{version_dir / SCANN_DIR} holds a pickled docids file; refusing to load it")
    docs = DocStore(version_dir / DOCS_DB)
    if len(docs) != manifest["counts"]["documents"]:
        raise ChecksumError(f"{version_dir / DOCS_DB} holds {len(docs)} documents, manifest says "
                            f"{manifest['counts']['documents']}")
    scann = scann_ops_pybind.load_searcher(str(version_dir / SCANN_DIR), assets_backcompat_shim=False)
    return Index(version_dir=version_dir, manifest=manifest, scann=scann, docs=docs)


# --------------------------------------------------------------------------------------------------
# Incremental updates


@dataclass(frozen=True)
class UpdateResult:
    """What an incremental update produced."""

    index_dir: Path
    base_version: str
    version: str
    version_dir: Path
    documents: int
    deleted: int
    inserted: int
    replaced: int
    rebalanced: bool
    rebalance_reason: str | None
    recall_at_10: float
    rows_changed_since_build: int
    seconds: dict[str, float]

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary."""
        data = dataclasses.asdict(self)
        data["index_dir"] = str(self.index_dir)
        data["version_dir"] = str(self.version_dir)
        return data


# Files of a version an update regenerates; everything else (model/, thresholds.json, hybrid.json, ...)
# is hard-linked from the base version, which is never modified in place.
_REGENERATED = {SCANN_DIR, DOCS_DB, EMBEDDINGS, "bm25", "manifest.json"}


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link ``source`` into ``target`` (copy if the filesystem refuses links)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=link)
    else:
        link(str(source), str(target))


def _check_update_input(ids: Sequence[str], titles: Sequence[str], texts: Sequence[str], vectors: np.ndarray,
                        deletes: Sequence[str], dim: int) -> None:
    if vectors.ndim != 2 or vectors.shape[0] != len(ids) or (len(ids) and vectors.shape[1] != dim):
        raise InputError(f"upsert vectors must be [{len(ids)}, {dim}], got shape {vectors.shape}")
    if not len(titles) == len(texts) == len(ids):
        raise InputError(f"{len(ids)} ids, {len(titles)} titles and {len(texts)} texts to upsert")
    seen: set[str] = set()
    for doc_id in ids:
        if not isinstance(doc_id, str) or not doc_id:
            raise InputError(f"upsert document has an empty or non-string id {doc_id!r}")
        if doc_id in seen:
            raise InputError(f"document id {doc_id!r} appears twice in one upsert")
        seen.add(doc_id)
    gone: set[str] = set()
    for doc_id in deletes:
        if doc_id in seen:
            raise InputError(f"document id {doc_id!r} is both upserted and deleted in one update")
        if doc_id in gone:
            raise InputError(f"document id {doc_id!r} appears twice in one delete")
        gone.add(doc_id)
    if len(ids):
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if bad.size:
            raise InputError(f"embedding of document {ids[int(bad[0])]!r} is not finite (NaN/inf)")


def update_index(
    index_dir: str | Path,
    *,
    upsert_ids: Sequence[str] = (),
    upsert_titles: Sequence[str] = (),
    upsert_texts: Sequence[str] = (),
    upsert_vectors: np.ndarray | None = None,
    delete_ids: Sequence[str] = (),
    rebalance: bool | None = None,
    rebalance_fraction: float = 0.2,
    min_recall: float | None = None,
    version: str | None = None,
) -> UpdateResult:
    """Delete and upsert documents into a new version of the live index, without re-encoding the rest.

    The base version is never modified. Row bookkeeping follows ScaNN's own mutation semantics so
    that ``embeddings.npy`` row ``i``, ScaNN datapoint ``i`` and ``docs.sqlite`` row ``i`` stay one
    document: a delete moves the last row into the hole (in the order given), an upsert of a known id
    overwrites its row in place, a new id is appended. ScaNN is mutated through its pybind searcher
    with our row numbers (never ``docids``, which it would pickle), and the rows it reports are
    checked against ours.

    Rebalancing (rebuilding the ScaNN partitions, codebooks and leaves tuning from the updated matrix,
    no re-encoding) happens when ``rebalance`` is ``True``; or, when it is ``None``, if the rows changed
    since the last full build exceed ``rebalance_fraction`` of the documents that build held (the
    k-means tree and AH codebooks were trained on the old distribution, and appended points sit in
    partitions whose centres no longer describe them), if the ``auto`` ScaNN mode would now pick
    another structure for the new size, or if recall@10 of the updated searcher falls below
    ``min_recall``. ``rebalance=False`` never rebalances (the recall gate then fails the update).

    Args:
        index_dir: the index directory (its ``CURRENT`` version is the base).
        upsert_ids: ids to add or replace.
        upsert_titles: their titles.
        upsert_texts: their texts.
        upsert_vectors: [len(upsert_ids), dim] float embeddings (L2-normalised here).
        delete_ids: ids to delete; each must be in the base version.
        rebalance: force (``True``) or forbid (``False``) a rebalance; ``None`` decides as above.
        rebalance_fraction: drift threshold for the automatic rebalance, in (0, 1].
        min_recall: recall@10 gate; default the base build's ``min_recall``.
        version: new version name; default :func:`new_version_name`.

    Returns:
        The :class:`UpdateResult`.

    Raises:
        InputError: an id to delete is not in the index, duplicate ids, wrong shapes, non-finite vectors,
            or the update would leave no documents.
        ConfigError: recall below ``min_recall``, or ScaNN's row bookkeeping disagrees with ours.
    """
    from scann.scann_ops.py import scann_ops_pybind

    from dssm.bm25 import write_bm25_state

    if not 0.0 < rebalance_fraction <= 1.0:
        raise ConfigError(f"rebalance_fraction must be in (0, 1], got {rebalance_fraction}")
    index_dir = Path(index_dir)
    ids, deletes = list(upsert_ids), list(delete_ids)
    timings: dict[str, float] = {}
    if not index_dir.is_dir():
        raise IndexNotFoundError(f"no index at {index_dir} (build one with `dssm index`)")
    with IndexWriteLock(index_dir):
        tick = time.perf_counter()
        base = current_version_dir(index_dir)
        manifest = verify_manifest(base, kind="index")
        dim, n = int(manifest["dim"]), int(manifest["counts"]["documents"])
        vectors = np.zeros((0, dim), np.float32) if upsert_vectors is None else \
            np.array(upsert_vectors, dtype=np.float32, copy=True, order="C")
        _check_update_input(ids, list(upsert_titles), list(upsert_texts), vectors, deletes, dim)
        if not ids and not deletes:
            raise InputError("nothing to update: no documents to upsert and no ids to delete")
        l2_normalize_inplace(vectors)
        version = version or new_version_name()
        stage = staging_dir(index_dir, version) / "version"
        stage.mkdir(parents=True)
        try:
            for child in base.iterdir():
                if child.name not in _REGENERATED:
                    _link_tree(child, stage / child.name)
            shutil.copyfile(base / DOCS_DB, stage / DOCS_DB)
            matrix = np.load(base / EMBEDDINGS, allow_pickle=False)  # a private, writable copy
            timings["load"] = time.perf_counter() - tick

            tick = time.perf_counter()
            conn = sqlite3.connect(stage / DOCS_DB)
            conn.execute("PRAGMA journal_mode = OFF")
            size = n
            delete_rows: list[int] = []
            moved_from: list[int] = []
            for doc_id in deletes:
                found = conn.execute("SELECT row FROM docs WHERE id = ?", (doc_id,)).fetchone()
                if found is None:
                    raise InputError(f"document id {doc_id!r} is not in index version {base.name}; nothing was "
                                     "deleted")
                row, last = int(found[0]), size - 1
                conn.execute("DELETE FROM docs WHERE row = ?", (row,))
                if row != last:
                    conn.execute("UPDATE docs SET row = ? WHERE row = ?", (row, last))
                    matrix[row] = matrix[last]
                delete_rows.append(row)
                moved_from.append(last)
                size -= 1
            upsert_rows: list[int | None] = []
            new_rows: list[int] = []
            replaced = 0
            titles, texts = list(upsert_titles), list(upsert_texts)
            for j, doc_id in enumerate(ids):
                found = conn.execute("SELECT row FROM docs WHERE id = ?", (doc_id,)).fetchone()
                if found is None:
                    conn.execute("INSERT INTO docs (row, id, title, text) VALUES (?, ?, ?, ?)",
                                 (size + len(new_rows), doc_id, titles[j] or "", texts[j] or ""))
                    upsert_rows.append(None)
                    new_rows.append(j)
                else:
                    row = int(found[0])
                    conn.execute("UPDATE docs SET title = ?, text = ? WHERE row = ?", (titles[j] or "", texts[j] or "",
                                                                                       row))
                    matrix[row] = vectors[j]
                    upsert_rows.append(row)
                    replaced += 1
            final = size + len(new_rows)
            if final == 0:
                raise InputError(f"the update would delete every document of index version {base.name}")
            conn.commit()
            conn.close()
            _fsync_file(stage / DOCS_DB)
            matrix = np.concatenate([matrix[:size], vectors[new_rows]]) if new_rows else matrix[:size]
            np.save(stage / EMBEDDINGS, matrix, allow_pickle=False)
            timings["store"] = time.perf_counter() - tick

            config_dict = dict(manifest.get("scann_config") or {})
            config = ScannConfig(**{k: v for k, v in config_dict.items()
                                    if k in {f.name for f in dataclasses.fields(ScannConfig)}})
            if min_recall is None:
                min_recall = config.min_recall
            history = dict(manifest.get("updates") or {})
            at_build = int(history.get("documents_at_build", n))
            changed = int(history.get("rows_changed_since_build", 0)) + len(deletes) + len(ids)
            params = dict(manifest["scann"])
            reason: str | None = None
            if rebalance:
                reason = "requested"
            elif rebalance is None:
                if changed > rebalance_fraction * at_build:
                    reason = (f"{changed} rows changed since the last full build of {at_build} "
                              f"(> {rebalance_fraction:.0%})")
                elif config.mode == "auto" and resolve_scann_params(config, final)["mode"] != params["mode"]:
                    reason = f"auto mode picks {resolve_scann_params(config, final)['mode']} for {final} documents"

            tick = time.perf_counter()
            probe = RecallProbe(matrix, k=10, sample=config.recall_sample, seed=config.seed)
            timings["exact"] = time.perf_counter() - tick
            recall = 0.0
            if reason is None:
                tick = time.perf_counter()
                searcher = scann_ops_pybind.load_searcher(str(base / SCANN_DIR), assets_backcompat_shim=False)
                if delete_rows:
                    got = [int(r) for r in searcher.searcher.delete(delete_rows)]
                    if got != moved_from:
                        raise ConfigError(f"ScaNN moved rows {got[:5]}... on delete, we expected {moved_from[:5]}...")
                if upsert_rows:
                    got = [int(r) for r in searcher.searcher.upsert(upsert_rows, vectors, 1)]
                    expected, appended = [], size
                    for row in upsert_rows:
                        expected.append(appended if row is None else row)
                        appended += row is None
                    if got != expected:
                        raise ConfigError(f"ScaNN placed upserts at rows {got[:5]}..., we expected {expected[:5]}...")
                if int(searcher.size()) != final:
                    raise ConfigError(f"ScaNN holds {searcher.size()} points after the update, the store {final}")
                timings["scann_update"] = time.perf_counter() - tick
                recall = probe.recall(searcher, leaves_to_search=params.get("num_leaves_to_search"))
                # Keep the recall the last full build reached (within 0.01), not just the gate: points
                # added to stale partitions cost recall first, and searching more partitions is a
                # query-time setting, cheaper than re-partitioning.
                target = max(min_recall, min(1.0, float(history.get("recall_at_build", manifest["recall@10"]))) - 0.01)
                if recall < target and params["mode"] == "tree_ah" and config.num_leaves_to_search == 0:
                    leaves, recall, tried = tune_leaves_to_search(
                        searcher, probe, start=params["num_leaves_to_search"], num_leaves=params["num_leaves"],
                        min_recall=target)
                    params.update(num_leaves_to_search=leaves, leaves_tuning=[[lv, round(r, 4)] for lv, r in tried])
                if recall < min_recall and rebalance is None:
                    reason = f"recall@10 {recall:.4f} below {min_recall} after the in-place update"
            if reason is not None:
                tick = time.perf_counter()
                params = resolve_scann_params(config, final)
                searcher = build_scann(matrix, params)
                timings["scann_rebuild"] = time.perf_counter() - tick
                if params["mode"] == "tree_ah" and config.num_leaves_to_search == 0:
                    leaves, recall, tried = tune_leaves_to_search(
                        searcher, probe, start=params["num_leaves_to_search"], num_leaves=params["num_leaves"],
                        min_recall=min_recall)
                    params.update(num_leaves_to_search=leaves, leaves_tuning=[[lv, round(r, 4)] for lv, r in tried])
                else:
                    recall = probe.recall(searcher, leaves_to_search=params.get("num_leaves_to_search"))
                history = {"documents_at_build": final, "rows_changed_since_build": 0, "last_build": version,
                           "recall_at_build": recall}
            else:
                history = {"documents_at_build": at_build, "rows_changed_since_build": changed,
                           "last_build": history.get("last_build", base.name),
                           "recall_at_build": history.get("recall_at_build", manifest["recall@10"])}
            if recall < min_recall:
                raise ConfigError(f"ScaNN recall@10 {recall:.4f} after the update is below {min_recall} with {params}"
                                  + ("" if rebalance is not False else "; rebalancing was forbidden"))
            (stage / SCANN_DIR).mkdir()
            searcher.serialize(str(stage / SCANN_DIR), relative_path=True)

            tick = time.perf_counter()
            write_bm25_state(stage, (doc for _, doc in DocStore(stage / DOCS_DB).iter_all()))
            timings["bm25"] = time.perf_counter() - tick

            new_manifest = {k: v for k, v in manifest.items()
                            if k not in ("kind", "format_version", "created", "files")}
            new_manifest.update(
                version=version,
                counts={"documents": final, "zero_embeddings": int((~matrix.any(axis=1)).sum())},
                scann=params,
                **{"recall@10": recall, "recall_sample": min(config.recall_sample, final)},
                updates={**history, "base_version": base.name, "deleted": len(deletes),
                         "inserted": len(new_rows), "replaced": replaced, "rebalanced": reason is not None,
                         "rebalance_reason": reason, "rebalance_fraction": rebalance_fraction,
                         "seconds": {k: round(v, 3) for k, v in timings.items()}},
            )
            write_manifest(stage, kind="index", extra=new_manifest)
            published = publish_version(index_dir, stage, version)
        finally:
            _drop_staging(index_dir, version)
    return UpdateResult(index_dir=index_dir, base_version=base.name, version=version, version_dir=published,
                        documents=final, deleted=len(deletes), inserted=len(new_rows), replaced=replaced,
                        rebalanced=reason is not None, rebalance_reason=reason, recall_at_10=recall,
                        rows_changed_since_build=history["rows_changed_since_build"], seconds=timings)


def _document_encoder(index_dir: Path, encoder: Any | None) -> Any:
    if encoder is not None:
        return encoder
    from dssm.export import load_encoder

    model = current_version_dir(index_dir) / MODEL_DIR
    if not model.is_dir():
        raise IndexNotFoundError(f"index version {model.parent} has no model/: upsert vectors with update_index")
    return load_encoder(model)


def upsert_documents(index_dir: str | Path, documents: Sequence[Any], *, encoder: Any | None = None,
                     rebalance: bool | None = None, rebalance_fraction: float = 0.2,
                     batch_size: int = 4096) -> UpdateResult:
    """Add or replace documents, encoding only them with the live version's document tower.

    Args:
        index_dir: the index directory.
        documents: ``(id, title, text)`` tuples or objects with ``id``, ``title``, ``text``.
        encoder: an object with ``embed_documents(texts) -> [n, dim]``; default the live version's
            ``model/`` (the model its other rows were encoded with).
        rebalance: see :func:`update_index`.
        rebalance_fraction: see :func:`update_index`.
        batch_size: texts per model call.

    Returns:
        The :class:`UpdateResult` (the new version is live).
    """
    from dssm.bm25 import document_text

    index_dir = Path(index_dir)
    docs = []
    for d in documents:
        if hasattr(d, "id") and hasattr(d, "text"):
            docs.append(Doc(d.id, getattr(d, "title", "") or "", d.text))
        elif isinstance(d, (tuple, list)) and len(d) == 3:
            docs.append(Doc(*d))
        else:
            raise InputError(f"a document must be (id, title, text) or have id/title/text attributes, got {d!r:.80}")
    if not docs:
        raise InputError("no documents to upsert")
    for d in docs:
        if not isinstance(d.text, str) or not isinstance(d.title or "", str):
            raise InputError(f"document {d.id!r}: title and text must be strings, got {type(d.text).__name__}")
    current_version_dir(index_dir)  # a clear error before loading a model
    encoder = _document_encoder(index_dir, encoder)
    texts = [document_text(d.title or "", d.text) for d in docs]
    vectors = np.concatenate([np.asarray(encoder.embed_documents(texts[s:s + batch_size]), dtype=np.float32)
                              for s in range(0, len(texts), batch_size)])
    return update_index(index_dir, upsert_ids=[d.id for d in docs], upsert_titles=[d.title or "" for d in docs],
                        upsert_texts=[d.text for d in docs], upsert_vectors=vectors, rebalance=rebalance,
                        rebalance_fraction=rebalance_fraction)


def delete_documents(index_dir: str | Path, ids: Sequence[str], *, rebalance: bool | None = None,
                     rebalance_fraction: float = 0.2) -> UpdateResult:
    """Delete documents by id into a new live version (every id must exist; otherwise nothing changes)."""
    if isinstance(ids, str):
        raise InputError("delete_documents takes a list of ids, got one string")
    return update_index(index_dir, delete_ids=list(ids), rebalance=rebalance, rebalance_fraction=rebalance_fraction)


# --------------------------------------------------------------------------------------------------
# Sharding (see docs/scaling.md)


def shard_of(doc_id: str, num_shards: int) -> int:
    """The index shard of a document: the first 8 bytes of sha1(id) modulo ``num_shards``.

    Stable across processes, machines and Python versions (unlike ``hash``), so every encode job,
    upsert and delete routes an id to the same shard.
    """
    import hashlib

    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    digest = hashlib.sha1(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def parse_shard_spec(spec: str) -> tuple[int, int]:
    """``"i/N"`` → ``(i, N)`` with ``0 <= i < N``.

    Raises:
        ConfigError: not of that form.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"shard must be 'i/N' with 0 <= i < N, got {spec!r}")
    return int(match.group(1)), int(match.group(2))
