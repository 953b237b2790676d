"""The recall gate: document-derived queries scored against exact search, and the leaves tuning it drives."""

from __future__ import annotations

from typing import Any

import numpy as np

from dssm.index.ann import exact_top_k

__all__ = ["RecallProbe", "tune_leaves_to_search", "tune_reorder_k", "tune_search", "REORDER_GROWTH_LIMIT"]

# How far the gate may grow reorder_k past the configured value (x2 a step) before the build fails.
REORDER_GROWTH_LIMIT = 16


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
    """The fewest tree partitions searched (from ``start`` up) whose recall reaches ``min_recall``.

    Grows ``start`` x1.25 a step until the recall is reached, then bisects between the last count
    that missed and the first that reached it (to within 2%): the growth alone overshot by up to a
    quarter (at 1M synthetic documents, 175 leaves at recall 0.970 where ~150 reach 0.95), and query
    time grows with the leaves searched. Recall grows with the leaves searched, so the bisection
    keeps the smallest count that reached the target among those it tried.

    Searching more partitions is a query-time setting, so no rebuild is needed; the chosen value is
    stored in the manifest and used by every search.

    Args:
        start_recall: the probe's recall at ``start`` when the caller has just measured it (a
            compaction does): not searched again (a probe search over 1M rows is ~0.6 s).

    Returns:
        (leaves_to_search, its recall, [(leaves, recall), ...] in the order tried).
    """
    leaves = max(1, min(start, num_leaves))
    recall = probe.recall(searcher, leaves_to_search=leaves) if start_recall is None else start_recall
    tried = [(leaves, recall)]
    missed = 0  # the largest count known to miss the target
    while recall < min_recall and leaves < num_leaves:
        missed = leaves
        leaves = min(num_leaves, max(leaves + 1, int(leaves * 1.25)))
        recall = probe.recall(searcher, leaves_to_search=leaves)
        tried.append((leaves, recall))
    if recall < min_recall:
        return leaves, recall, tried
    while leaves - missed > max(1, leaves // 50) and missed:
        middle = (missed + leaves) // 2
        measured = probe.recall(searcher, leaves_to_search=middle)
        tried.append((middle, measured))
        if measured >= min_recall:
            leaves, recall = middle, measured
        else:
            missed = middle
    return leaves, recall, tried


def tune_reorder_k(searcher: Any, probe: RecallProbe, *, start: int, min_recall: float, start_recall: float,
                   leaves_to_search: int | None = None) -> tuple[int, float, list[tuple[int, float]]]:
    """Double the candidates re-scored exactly (AH's ``reorder_k``) until recall reaches ``min_recall``.

    Embeddings whose scores crowd together (many near-ties, as a linear LSA tower gives on a corpus
    of tens of thousands) need more than the default 100 candidates for recall@10 0.95. Like the
    partitions searched, this is a query-time setting: no rebuild; serving reads the stored value.
    At most :data:`REORDER_GROWTH_LIMIT` x ``start``.

    Returns:
        (reorder_k, its recall, [(reorder_k, recall), ...] tried, ``start`` first).
    """
    reorder, recall = start, start_recall
    tried = [(reorder, recall)]
    while recall < min_recall and reorder < start * REORDER_GROWTH_LIMIT:
        reorder *= 2
        recall = probe.recall(searcher, leaves_to_search=leaves_to_search, pre_reorder=reorder)
        tried.append((reorder, recall))
    return reorder, recall, tried


def tune_search(searcher: Any, probe: RecallProbe, params: dict[str, Any], *, tune_leaves: bool, min_recall: float,
                measured: float | None = None) -> float:
    """The recall gate's search settings: the searcher's recall once tuned up to ``min_recall``.

    A tree grows its partitions searched first (when ``tune_leaves``: the user left it automatic),
    then AH grows ``reorder_k``; ``params`` gets the chosen values and the ``leaves_tuning`` /
    ``reorder_tuning`` trail. ``measured``: the recall at the current settings, if known.
    """
    leaves = params.get("num_leaves_to_search")
    if params["mode"] == "tree_ah" and tune_leaves:
        leaves, recall, tried = tune_leaves_to_search(searcher, probe, start=leaves, num_leaves=params["num_leaves"],
                                                      min_recall=min_recall, start_recall=measured)
        params.update(num_leaves_to_search=leaves, leaves_tuning=[[lv, round(r, 4)] for lv, r in tried])
    else:
        recall = probe.recall(searcher, leaves_to_search=leaves) if measured is None else measured
    if recall < min_recall and "reorder_k" in params:
        reorder, recall, tried = tune_reorder_k(searcher, probe, start=params["reorder_k"], min_recall=min_recall,
                                                start_recall=recall, leaves_to_search=leaves)
        params.update(reorder_k=reorder, reorder_tuning=[[r, round(v, 4)] for r, v in tried])
    return recall
