"""The checks every write runs before it takes the writers' lock (:func:`dssm.index.update_index`,
:func:`dssm.index.compact_index`): settings, ids, shapes, finite vectors. Each names the offending value."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dssm.errors import ConfigError, IndexNotFoundError, InputError
from dssm.index.ann import l2_normalize_inplace

__all__ = ["checked_vectors", "checked_update_settings"]


def checked_vectors(ids: Sequence[str], titles: Sequence[str], texts: Sequence[str],
                    upsert_vectors: np.ndarray | None, deletes: Sequence[str], dim: int) -> np.ndarray:
    """The upserts' vectors as a private [n, dim] float32 copy, L2-normalised, after every input check."""
    vectors = np.zeros((0, dim), np.float32) if upsert_vectors is None else \
        np.array(upsert_vectors, dtype=np.float32, copy=True, order="C")
    _check_update_input(ids, titles, texts, vectors, deletes, dim)
    if not ids and not deletes:
        raise InputError("nothing to update: no documents to upsert and no ids to delete")
    l2_normalize_inplace(vectors)
    return vectors


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


def checked_update_settings(index_dir: str | Path, *, rebalance_fraction: float, keep_versions: int) -> Path:
    """``index_dir`` as a Path once the settings are valid and an index directory exists there."""
    if not 0.0 < rebalance_fraction <= 1.0:
        raise ConfigError(f"rebalance_fraction must be in (0, 1], got {rebalance_fraction}")
    if keep_versions < 0:
        raise ConfigError(f"keep_versions must be >= 0 (0 keeps every version), got {keep_versions}")
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise IndexNotFoundError(f"no index at {index_dir} (build one with `dssm index`)")
    return index_dir
