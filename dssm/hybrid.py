"""Hybrid retrieval: DSSM (dense) and BM25 (sparse) fused per query.

Two fusions:

* **Reciprocal-rank fusion** (:func:`dssm.evaluate.reciprocal_rank_fusion`): ranks only, no weight;
  ``score(d) = sum 1 / (60 + rank(d))``.
* **Convex combination** of normalised scores (:func:`fuse_scores`, :func:`convex_fusion`):
  ``score(d) = w * norm(dense(d)) + (1 - w) * norm(bm25(d))`` with ``w`` the weight of DSSM.
  Candidates are the union of both systems' top ``candidates`` documents; each system's score is
  computed *exactly* for every candidate (cosine from the stored embeddings, BM25 from the full score
  vector; a document without any query term has BM25 score 0), so no score is guessed.
  Normalisation is per query over the candidate set: ``minmax`` (default) maps each system's scores to
  [0, 1] (``(s - min) / (max - min)``), ``zscore`` to ``(s - mean) / std``; a constant score vector
  maps to zeros (it cannot reorder anything). Min-max is the default because BM25 scores are
  unbounded and heavy-tailed while cosines sit in [-1, 1]; after min-max both span [0, 1] per query.

The weight is tuned on validation queries only (:func:`tune_weight`); ``dssm eval`` tunes it on a
deterministic subset of queries disjoint from the evaluated ones and says which.

At search time :func:`fused_rows` is what ``Searcher.search(..., mode="hybrid")`` runs; its weight and
normalisation come from the index version's ``hybrid.json`` (:data:`HYBRID_FILE`) when present,
else :data:`DEFAULT_WEIGHT` and ``minmax``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dssm.config import field
from dssm.errors import ChecksumError, ConfigError

__all__ = [
    "SEARCH_MODES",
    "NORMALIZATIONS",
    "DEFAULT_WEIGHT",
    "HYBRID_FILE",
    "HybridConfig",
    "normalize_scores",
    "fuse_scores",
    "convex_fusion",
    "tune_weight",
    "read_hybrid_config",
    "fused_rows",
]

SEARCH_MODES = ("dense", "bm25", "hybrid")
NORMALIZATIONS = ("minmax", "zscore")
DEFAULT_WEIGHT = 0.5
#: File in an index version holding the tuned :class:`HybridConfig` (written by ``dssm eval --save-weight``).
HYBRID_FILE = "hybrid.json"


@dataclass(frozen=True)
class HybridConfig:
    """How dense and BM25 scores are combined at search time."""

    weight: float = field(DEFAULT_WEIGHT, "weight of the DSSM score; 1 - weight goes to BM25")
    normalization: str = field("minmax", "per-query score normalisation: minmax or zscore")
    candidates: int = field(100, "top documents taken from each system before fusing")

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"hybrid weight must be in [0, 1], got {self.weight}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization {self.normalization!r} is not one of {NORMALIZATIONS}")
        if self.candidates < 1:
            raise ConfigError(f"hybrid candidates must be >= 1, got {self.candidates}")


def normalize_scores(scores: np.ndarray, method: str = "minmax") -> np.ndarray:
    """Normalise one query's candidate scores.

    Args:
        scores: [n] scores of one system over the query's candidates.
        method: ``minmax`` → [0, 1]; ``zscore`` → mean 0, std 1 (population std).

    Returns:
        [n] float64; zeros when the scores are constant (or n == 0).
    """
    if method not in NORMALIZATIONS:
        raise ConfigError(f"normalization {method!r} is not one of {NORMALIZATIONS}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    if method == "minmax":
        low, span = scores.min(), scores.max() - scores.min()
        return (scores - low) / span if span > 0 else np.zeros_like(scores)
    std = scores.std()
    return (scores - scores.mean()) / std if std > 0 else np.zeros_like(scores)


def fuse_scores(dense: np.ndarray, sparse: np.ndarray, *, weight: float, normalization: str = "minmax") -> np.ndarray:
    """``weight * norm(dense) + (1 - weight) * norm(sparse)`` over aligned candidates.

    Args:
        dense: [n] DSSM cosines of the candidates.
        sparse: [n] BM25 scores of the same candidates.
        weight: in [0, 1], the DSSM share.
        normalization: ``minmax`` or ``zscore``.

    Returns:
        [n] fused scores.
    """
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"hybrid weight must be in [0, 1], got {weight}")
    dense, sparse = np.asarray(dense), np.asarray(sparse)
    if dense.shape != sparse.shape:
        raise ConfigError(f"dense and BM25 scores must align, got shapes {dense.shape} and {sparse.shape}")
    return weight * normalize_scores(dense, normalization) + (1 - weight) * normalize_scores(sparse, normalization)


def convex_fusion(dense: Mapping[str, Mapping[str, float]], sparse: Mapping[str, Mapping[str, float]], *,
                  weight: float, k: int, normalization: str = "minmax") -> dict[str, list[tuple[str, float]]]:
    """Fuse two systems' candidate scores per query into a run.

    Args:
        dense: ``{qid: {doc_id: cosine}}``.
        sparse: ``{qid: {doc_id: bm25}}``.
        weight: DSSM share in [0, 1].
        k: depth of the fused ranking.
        normalization: ``minmax`` or ``zscore``.

    The candidates of a query are the union of both dicts' doc ids. Pass exact scores for every
    candidate on both sides (``dssm eval`` does); a candidate missing from one side gets that side's
    lowest score for the query (0 for BM25 when the side is empty), i.e. the bottom of its scale.

    Returns:
        ``{qid: [(doc_id, fused), ...]}`` best first; ties broken by doc id.
    """
    out: dict[str, list[tuple[str, float]]] = {}
    for qid in sorted(set(dense) | set(sparse)):
        d, s = dense.get(qid, {}), sparse.get(qid, {})
        docs = sorted(set(d) | set(s))
        if not docs:
            out[qid] = []
            continue
        d_fill = min(d.values()) if d else 0.0
        s_fill = min(s.values()) if s else 0.0
        fused = fuse_scores(np.array([d.get(x, d_fill) for x in docs]), np.array([s.get(x, s_fill) for x in docs]),
                            weight=weight, normalization=normalization)
        ranked = sorted(zip(docs, fused.tolist(), strict=True), key=lambda item: (-item[1], item[0]))
        out[qid] = ranked[:k]
    return out


def tune_weight(score: Callable[[float], float], *,
                grid: Sequence[float] | None = None) -> tuple[float, dict[float, float]]:
    """Pick the weight with the best validation score.

    Args:
        score: ``weight -> mean metric on the validation queries`` (higher is better).
        grid: weights to try; default 0, 0.05, ..., 1.

    Returns:
        ``(best weight, {weight: score})``; among equal scores the weight nearest 0.5 wins (then the
        smaller), so a flat curve does not drift to an extreme.
    """
    grid = [round(i * 0.05, 2) for i in range(21)] if grid is None else list(grid)
    if not grid:
        raise ConfigError("tune_weight needs at least one weight")
    curve = {float(w): float(score(float(w))) for w in grid}
    best = max(curve.values())
    winners = [w for w, v in curve.items() if v >= best - 1e-12]
    return min(winners, key=lambda w: (abs(w - 0.5), w)), curve


def read_hybrid_config(version_dir: str | Path) -> HybridConfig:
    """The version's ``hybrid.json``, or the defaults when the version has none.

    Raises:
        ChecksumError: the file exists but is not a valid :class:`HybridConfig`.
    """
    from dssm.config import config_from_dict

    path = Path(version_dir) / HYBRID_FILE
    if not path.is_file():
        return HybridConfig()
    try:
        return config_from_dict(HybridConfig, json.loads(path.read_text()))
    except (json.JSONDecodeError, ConfigError, TypeError) as exc:
        raise ChecksumError(f"{path} is not a valid hybrid configuration: {exc}") from exc


def fused_rows(*, query_vectors: np.ndarray, texts: Sequence[str], k: int, mode: str, ann: Any, embeddings: np.ndarray,
               bm25: Any, config: HybridConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows and scores per query for ``mode`` ``bm25`` or ``hybrid`` over one index version.

    Args:
        query_vectors: [q, dim] float32 query embeddings (``hybrid`` only; may be ``None`` for ``bm25``).
        texts: the q query texts (for BM25).
        k: results per query.
        mode: ``bm25`` or ``hybrid``.
        ann: ``(vectors [q, dim], k) -> (rows [q, k], scores [q, k])`` (the index's ScaNN search).
        embeddings: [n, dim] float32 stored document embeddings (row order of the index).
        bm25: the version's :class:`dssm.bm25.BM25Index` (rows, no ids needed).
        config: weight, normalisation and candidate depth.

    Returns:
        Per query ``(rows int64 [<=k], scores float64 [<=k])`` best first. ``bm25`` returns only
        documents with a query term (score > 0); ``hybrid`` scores are fused values.
    """
    if mode == "bm25":
        return [(rows[:k], scores[:k].astype(np.float64)) for rows, scores in bm25.search_rows_batch(texts, k)]
    if mode != "hybrid":
        raise ConfigError(f"mode {mode!r} is not one of {SEARCH_MODES}")
    depth = max(k, config.candidates)
    dense_rows, _ = ann(query_vectors, depth)
    sparse = bm25.search_rows_batch(texts, depth)
    out = []
    for i, text in enumerate(texts):
        rows = np.union1d(np.asarray(dense_rows[i], dtype=np.int64), sparse[i][0])
        cosines = np.asarray(embeddings[rows], dtype=np.float32) @ query_vectors[i]
        bm25_scores = bm25.scores(text)[rows]
        fused = fuse_scores(cosines, bm25_scores, weight=config.weight, normalization=config.normalization)
        order = np.lexsort((rows, -fused))[:k]  # by fused score, ties by row
        out.append((rows[order], fused[order]))
    return out
