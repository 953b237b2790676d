"""The recall gate: document-derived queries scored against exact search, and the leaves tuning it drives."""

from __future__ import annotations

from typing import Any

import numpy as np

from dssm.index.ann import exact_top_k

__all__ = ["RecallProbe", "tune_leaves_to_search"]


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


def tune_leaves_to_search(searcher: Any, probe: RecallProbe, *, start: int, num_leaves: int,
                          min_recall: float, start_recall: float | None = None
                          ) -> tuple[int, float, list[tuple[int, float]]]:
    """Grow the number of tree partitions searched (x1.25 a step) until recall reaches ``min_recall``.

    Searching more partitions is a query-time setting, so no rebuild is needed; the chosen value is
    stored in the manifest and used by every search.

    Args:
        start_recall: the probe's recall at ``start`` when the caller has just measured it (a
            compaction does): not searched again (a probe search over 1M rows is ~0.6 s).

    Returns:
        (leaves_to_search, its recall, [(leaves, recall), ...] tried).
    """
    leaves = max(1, min(start, num_leaves))
    recall = probe.recall(searcher, leaves_to_search=leaves) if start_recall is None else start_recall
    tried = [(leaves, recall)]
    while recall < min_recall and leaves < num_leaves:
        leaves = min(num_leaves, max(leaves + 1, int(leaves * 1.25)))
        recall = probe.recall(searcher, leaves_to_search=leaves)
        tried.append((leaves, recall))
    return leaves, recall, tried
