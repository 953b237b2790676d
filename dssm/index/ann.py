"""ScaNN: the size-aware configuration, builds (whole or chunk by chunk), exact top-k, normalisation.

Every ScaNN searcher is built without ``docids`` (ScaNN would pickle them); row ``i`` is document row ``i``.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dssm.artifacts import load_npy
from dssm.config import field
from dssm.errors import ConfigError
from dssm.index.files import fsync_file
from dssm.index.layout import EMBEDDINGS, SCANN_DIR

__all__ = [
    "scann_pybind", "SCANN_MODES", "ScannConfig", "resolve_scann_params", "build_scann", "build_scann_in_chunks",
    "NpyRows", "npy_chunks", "l2_normalize_inplace", "exact_top_k", "share_scann_dataset",
]


SCANN_MODES = ("auto", "brute_force", "ah", "tree_ah")


def scann_pybind() -> Any:
    """ScaNN's numpy API (``scann.scann_ops.py.scann_ops_pybind``), imported without TensorFlow.

    ``scann/__init__.py`` also imports ScaNN's TensorFlow ops (``import tensorflow``, ~8 s and
    hundreds of MB), which the numpy API never uses: its extension links no TensorFlow library. So
    while ``scann`` is first imported, ``tensorflow`` is marked absent in ``sys.modules`` (the
    package's own ``try: import tensorflow ... except ModuleNotFoundError`` then skips the TF ops), and
    the mark is removed at once, so a later ``import tensorflow`` (documents to encode, non-ASCII
    queries) works as usual. A process that has TensorFlow loaded imports ScaNN normally.
    """
    name = "scann.scann_ops.py.scann_ops_pybind"
    if name in sys.modules or "tensorflow" in sys.modules:
        return importlib.import_module(name)
    sys.modules["tensorflow"] = None  # type: ignore[assignment]  # import tensorflow -> ModuleNotFoundError
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]


#: Vectors sampled to train the AH codebooks (and the tree, at least): ``ScannConfig.training_sample_size`` 0.
DEFAULT_TRAINING_SAMPLE = 100_000


@dataclass(frozen=True)
class ScannConfig:
    """How the ScaNN searcher is built; ``auto`` picks by corpus size (see :func:`resolve_scann_params`)."""

    mode: str = field("auto", "auto | brute_force | ah | tree_ah; auto: brute force < brute_force_below docs, "
                              "AH + reorder < tree_above, tree + AH + reorder above")
    # AH + reorder 100 answers 2.5-5x faster than brute force from ~5k rows on at recall@10 >= 0.999
    # (quora-dev's 19k questions: 0.055 vs 0.160 ms at 128 dims, 0.097 vs 0.505 ms at 256; 5k: 0.021
    # vs 0.066 ms), and the recall gate still checks every build (docs/scaling.md, "Exact search only
    # below 5k documents").
    brute_force_below: int = field(5_000, "auto mode: exact (brute-force) search below this many documents")
    tree_above: int = field(100_000, "auto mode: partition into a k-means tree at or above this many documents")
    num_leaves: int = field(0, "tree partitions; 0 = round(sqrt(n)). 4 x sqrt(n) searches ~3x faster at 1M "
                               "at the same recall but its build needs ~1 GB more memory (docs/scaling.md)")
    num_leaves_to_search: int = field(0, "partitions searched per query; 0 = start at max(8, num_leaves // 40) "
                                         "and grow it at build time until recall@10 reaches min_recall")
    spherical: bool = field(True, "tree: spherical k-means (centroids on the unit sphere, as the vectors are)")
    dims_per_block: int = field(2, "AH: dimensions per quantisation block (2 = 16 centres per 2 dims)")
    anisotropic_quantization_threshold: float = field(0.2, "AH: anisotropic (score-aware) quantisation threshold")
    reorder_k: int = field(100, "AH: candidates re-scored exactly before the final top-k")
    training_sample_size: int = field(0, "vectors sampled to train the tree and the AH codebooks; 0 = "
                                         "max(100,000, 100 per tree partition), at most n")
    num_neighbors: int = field(10, "default k stored in the ScaNN config (search passes its own k)")
    recall_sample: int = field(1000, "document-derived queries used to measure recall@10 after the build")
    min_recall: float = field(0.95, "fail the build if recall@10 against exact search is below this")
    seed: int = field(0, "seed for the recall sample")

    def __post_init__(self) -> None:
        if self.mode not in SCANN_MODES:
            raise ConfigError(f"ScaNN mode {self.mode!r} is not one of {SCANN_MODES}")
        for name in ("brute_force_below", "tree_above", "dims_per_block", "reorder_k", "num_neighbors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ScaNN {name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_leaves", "num_leaves_to_search", "recall_sample", "training_sample_size"):
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
    )
    if mode == "tree_ah":
        # sqrt(n) partitions. More are faster at 1M (4 x sqrt(n) = 4,000 spherical leaves: 5,621 vs
        # ~1,870 queries/s at recall@10 0.95, docs/scaling.md) but ScaNN's serialize then allocates
        # ~1 GB more (+92 MB at 1,000 leaves, +347 MB at 2,000), past the build-memory budget; a user
        # with the memory asks for them (`dssm index --scann-num-leaves 4000`).
        leaves = config.num_leaves or max(2, round(math.sqrt(n)))
        if leaves > n:
            raise ConfigError(f"num_leaves={leaves} exceeds the number of documents {n}")
        to_search = config.num_leaves_to_search or max(8, leaves // 40)
        params.update(num_leaves=leaves, num_leaves_to_search=min(to_search, leaves), spherical=config.spherical)
    sample = config.training_sample_size or max(DEFAULT_TRAINING_SAMPLE, 100 * params.get("num_leaves", 0))
    params["training_sample_size"] = min(sample, n)
    return params


def build_scann(matrix: np.ndarray, params: dict[str, Any]) -> Any:
    """Build a ScaNN searcher over ``matrix`` (never with ``docids``: ScaNN would pickle them).

    Args:
        matrix: [n, dim] float32, L2-normalised (dot product = cosine).
        params: from :func:`resolve_scann_params`.

    Returns:
        A ``scann_ops_pybind.ScannSearcher``.
    """
    # deferred: ScaNN (it loads TensorFlow), imported only when this runs
    scann_ops_pybind = scann_pybind()
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
                spherical=params.get("spherical", False),  # versions built before it was a setting: False
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


class NpyRows:
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


def npy_chunks(path: Path, *, chunk: int = 65536) -> Iterator[np.ndarray]:
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
    # deferred: ScaNN (it loads TensorFlow), imported only when this runs
    scann_ops_pybind = scann_pybind()

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


def share_scann_dataset(version_dir: Path, *, atol: float = 0.0, chunk: int = 65_536) -> bool:
    """Make ``embeddings.npy`` a hard link to ScaNN's serialized float rows when they are the same array.

    A tree-AH or brute-force searcher serializes the float32 rows it re-scores with
    (``scann/dataset.npy``): the same ``[n, dim]`` rows, in the same order, as ``embeddings.npy``,
    only with a differently spaced ``.npy`` header. At 1M x 128 that is 0.52 GB written, synced and
    hashed twice per version (when the manifest is written and when the version is loaded); one inode
    is hashed once (:func:`dssm.artifacts.write_manifest`). numpy reads ScaNN's header. The link is
    made only after comparing every row, and the file is synced, since a publish skips files with
    several links as already durable.

    Args:
        version_dir: a staged version directory.
        atol: largest difference per value still taken as the same rows: a mutated searcher stores its
            upserted rows as it normalised them again (within ~1e-7 of ours), and its copy, which
            search re-scores with, becomes the stored one.
        chunk: rows compared at a time.

    Returns:
        Whether the two are now one file.
    """
    ours, theirs = Path(version_dir) / EMBEDDINGS, Path(version_dir) / SCANN_DIR / "dataset.npy"
    if not (ours.is_file() and theirs.is_file()):
        return False
    a, b = load_npy(ours, mmap_mode="r"), load_npy(theirs, mmap_mode="r")
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    for start in range(0, a.shape[0], chunk):
        x, y = a[start:start + chunk], b[start:start + chunk]
        # Only the rows that differ at all are compared within atol (a compaction's upserted rows):
        # allclose over whole chunks took 0.57 s at 1M x 128 with 10k such rows, this 0.09 s.
        differ = np.flatnonzero((x != y).any(axis=1))
        if differ.size and not (atol > 0 and np.abs(x[differ] - y[differ]).max() <= atol):
            return False
    del a, b
    fsync_file(theirs)
    tmp = ours.with_name(f".{ours.name}.tmp-link-{os.getpid()}")
    os.link(theirs, tmp)
    os.replace(tmp, ours)
    return True
