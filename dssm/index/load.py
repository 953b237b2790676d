"""Loading the live version: checksums verified, ScaNN searcher + document store behind :class:`Index`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dssm.artifacts import read_manifest, verify_manifest
from dssm.errors import ChecksumError, IndexNotFoundError, InputError
from dssm.index.ann import scann_pybind
from dssm.index.docstore import DocStore
from dssm.index.layout import DOCS_DB, EMBEDDINGS, MODEL_DIR, RERANKER_DIR, SCANN_DIR
from dssm.index.versions import VersionLease, current_version_dir

__all__ = ["Index", "load_index"]


class Index:
    """A loaded, verified index version: ScaNN searcher + document store (+ the model directory path)."""

    def __init__(self, *, version_dir: Path, manifest: dict[str, Any], scann: Any, docs: DocStore,
                 lease: VersionLease | None = None):
        self.version_dir = version_dir
        self.lease = lease  # pruning skips this version while the Index lives
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

    @property
    def reranker_dir(self) -> Path | None:
        """The attached re-ranker directory, or ``None``."""
        path = self.version_dir / RERANKER_DIR
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


def load_index(index_dir: str | Path, *, verify: bool = True, reranker: bool = True, model: bool = True) -> Index:
    """Load the version ``CURRENT`` points to, after checking every file's sha256.

    Args:
        index_dir: the index directory.
        verify: check checksums (leave on; off only for benchmarks that just built the index).
        reranker: also verify the attached ``reranker/``; ``False`` leaves it unchecked, for a caller
            that will not use it (a corrupt re-ranker then does not stop the index from serving).
        model: also verify ``model/``; ``False`` for a caller that verifies it when it loads it
            (:func:`dssm.export.load_encoder` checks it against its own manifest) or never reads it
            (it brings its own query model), so a write's reload does not hash an unchanged model.

    Raises:
        IndexNotFoundError: no index / no ``CURRENT`` / missing version.
        ChecksumError: a file is missing, truncated or corrupted (the message names it).
    """
    scann_ops_pybind = scann_pybind()  # deferred: ScaNN, imported on first use (without TensorFlow)

    version_dir = current_version_dir(index_dir)
    try:
        lease = VersionLease(version_dir)
    except FileNotFoundError as exc:
        raise IndexNotFoundError(f"index version {version_dir} was removed while loading; load again") from exc
    skip = (() if reranker else (RERANKER_DIR,)) + (() if model else (MODEL_DIR,))
    manifest = verify_manifest(version_dir, kind="index", skip=skip) if verify else read_manifest(version_dir)
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
    return Index(version_dir=version_dir, manifest=manifest, scann=scann, docs=docs, lease=lease)
