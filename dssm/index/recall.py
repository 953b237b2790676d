"""The recall gate: document-derived queries scored against exact search, and the leaves tuning it drives.

A compaction carries the probe of the version it folds (``recall_probe/`` in the version: the queries,
each one's exact top :data:`PROBE_DEPTH` rows and scores, and an upper bound on every row outside
them) instead of scoring its queries against the whole matrix again: only the rows the compaction
rewrote or appended are scored (:meth:`RecallProbe.carried`). At 1M x 128 that exact search was
3.4 s of a ~11 s compaction. A build saves the probe it gated with, so the queries stay the ones the
build drew (a version without a probe, from before builds saved one, gets a new one at its next
compaction); a query whose carried list runs short is searched in full again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dssm.artifacts import load_npy
from dssm.index.ann import exact_top_k

__all__ = ["MUTATED_FIRST_GROWTH", "PROBE_DEPTH", "PROBE_DIR", "RecallProbe", "carried_probe", "tune_leaves_to_search",
           "tune_reorder_k", "tune_search", "REORDER_GROWTH_LIMIT"]

#: The probe's directory in a version.
PROBE_DIR = "recall_probe"
#: Exact neighbours kept per probe query (twice the gate's k), so that deleted rows rarely force a rescan.
PROBE_DEPTH = 20
#: The first growth of the partitions searched when a compaction's update left recall just below the
#: target (see :func:`tune_leaves_to_search`'s ``first_growth``).
MUTATED_FIRST_GROWTH = 1.03
# The arrays a saved probe holds, one .npy file each.
_SAVED = ("queries", "rows", "scores", "bound")

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
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
        self._set(matrix, np.ascontiguousarray(matrix[rows], dtype=np.float32), k)
        if self.size:
            self.rows, self.scores = exact_top_k(matrix, self.queries, self.depth)
            self.bound = self._outside_bound(self.scores)
            self.threshold = self.scores[:, self.k - 1:self.k] - 1e-5

    def _set(self, matrix: np.ndarray, queries: np.ndarray, k: int) -> None:
        self.matrix, self.queries = matrix, queries
        self.k, self.depth, self.size = min(k, matrix.shape[0]), min(PROBE_DEPTH, matrix.shape[0]), queries.shape[0]

    def _outside_bound(self, scores: np.ndarray) -> np.ndarray:
        """[size] the most any row outside the kept lists can score (their last score; -inf if all rows are in)."""
        if self.depth == self.matrix.shape[0]:
            return np.full(self.size, -np.inf, np.float32)
        return scores[:, -1].astype(np.float32)

    @classmethod
    def carried(cls, matrix: np.ndarray, *, queries: np.ndarray, rows: np.ndarray, scores: np.ndarray,
                bound: np.ndarray, source: np.ndarray, k: int = 10) -> RecallProbe:
        """The probe of an earlier matrix brought up to date, scoring only the rows that changed.

        Args:
            matrix: [n, dim] float32, the updated matrix.
            queries: [s, dim] the probe's queries.
            rows: [s, d] int64 and ``scores`` [s, d] float32, their exact top rows in the earlier matrix.
            bound: [s] the most any earlier row outside those lists scored.
            source: [n] int64, per updated row the earlier row it still holds unchanged, or -1 (new or
                rewritten).
            k: cut-off.

        Queries whose carried rows no longer prove their k-th score (rows deleted or rewritten) are
        searched in full again.
        """
        probe = cls.__new__(cls)
        probe._set(matrix, np.ascontiguousarray(queries, dtype=np.float32), k)
        if probe.size == 0:
            return probe
        kept = source >= 0
        renamed = np.full(max(int(rows.max()), int(source.max(initial=-1))) + 1, -1, np.int64)
        renamed[source[kept]] = np.flatnonzero(kept)
        mapped = np.where(rows >= 0, renamed[np.maximum(rows, 0)], -1)  # [s, d] in the updated matrix; -1: gone
        changed = np.flatnonzero(~kept)
        candidates = np.concatenate([mapped, np.broadcast_to(changed, (probe.size, changed.size))], axis=1)
        values = np.concatenate([np.where(mapped >= 0, scores, -np.inf),
                                 probe.queries @ matrix[changed].T], axis=1).astype(np.float32)
        if values.shape[1] > probe.depth + 1:  # the best depth + 1 (one more bounds the rest), then in order
            best = np.argpartition(-values, probe.depth, axis=1)[:, :probe.depth + 1]
            candidates, values = np.take_along_axis(candidates, best, 1), np.take_along_axis(values, best, 1)
        order = np.lexsort((candidates, -values), axis=1)  # best first; ties by row, as exact_top_k orders them
        top_rows, top_scores = np.take_along_axis(candidates, order, 1), np.take_along_axis(values, order, 1)
        outside = np.maximum(bound, top_scores[:, probe.depth]) if top_scores.shape[1] > probe.depth else bound
        probe.rows, probe.scores = top_rows[:, :probe.depth], top_scores[:, :probe.depth]
        probe.bound = outside.astype(np.float32)
        proven = (probe.scores >= probe.bound[:, None]) & (probe.rows >= 0)
        short = np.flatnonzero(proven.sum(axis=1) < probe.k)
        if short.size:
            probe.rows[short], probe.scores[short] = exact_top_k(matrix, probe.queries[short], probe.depth)
            probe.bound[short] = probe._outside_bound(probe.scores[short])
        probe.threshold = probe.scores[:, probe.k - 1:probe.k] - 1e-5
        return probe

    def save(self, directory: Path) -> None:
        """Write ``queries.npy``, ``rows.npy``, ``scores.npy`` and ``bound.npy`` into ``directory`` (new)."""
        directory.mkdir()
        if self.size:
            for name in _SAVED:
                np.save(directory / f"{name}.npy", getattr(self, name), allow_pickle=False)

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


def carried_probe(base: Path, matrix: np.ndarray, source: np.ndarray, *, sample: int, seed: int) -> RecallProbe:
    """The base version's saved probe carried onto ``matrix`` (see :meth:`RecallProbe.carried`), or a new
    one when the base has none, or one of another width or sample size (the caller verified the base's
    checksums)."""
    directory = Path(base) / PROBE_DIR
    if all((directory / f"{name}.npy").is_file() for name in _SAVED):
        saved = {name: load_npy(directory / f"{name}.npy") for name in _SAVED}
        depth = min(PROBE_DEPTH, matrix.shape[0])
        if saved["queries"].shape == (min(sample, matrix.shape[0]), matrix.shape[1]) and \
                saved["rows"].ndim == 2 and saved["rows"].shape[1] == depth and saved["rows"].size:
            return RecallProbe.carried(matrix, source=source, **saved)
    return RecallProbe(matrix, k=10, sample=sample, seed=seed)


def tune_leaves_to_search(searcher: Any, probe: RecallProbe, *, start: int, num_leaves: int,
                          min_recall: float, start_recall: float | None = None, first_growth: float = 1.25
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
        first_growth: the first step's factor (at least one partition more; the step's growth then
            doubles, up to x1.25). A compaction, whose ``start`` met the target before the update,
            passes a small one: its recall is typically a hair below (0.9485 for 0.95 at 100k after a
            10k-row delta), and x1.25 then bisecting back took 5 probe searches to add 2 partitions
            (0.9 s of a 2.7 s compaction at 100k).

    Returns:
        (leaves_to_search, its recall, [(leaves, recall), ...] in the order tried).
    """
    leaves = max(1, min(start, num_leaves))
    recall = probe.recall(searcher, leaves_to_search=leaves) if start_recall is None else start_recall
    tried = [(leaves, recall)]
    missed = 0  # the largest count known to miss the target
    growth = first_growth
    while recall < min_recall and leaves < num_leaves:
        missed = leaves
        leaves = min(num_leaves, max(leaves + 1, int(leaves * growth)))
        growth = min(1.25, 2 * growth - 1)  # a small first step doubles its growth until x1.25
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
                measured: float | None = None, first_growth: float = 1.25) -> float:
    """The recall gate's search settings: the searcher's recall once tuned up to ``min_recall``.

    A tree grows its partitions searched first (when ``tune_leaves``: the user left it automatic),
    then AH grows ``reorder_k``; ``params`` gets the chosen values and the ``leaves_tuning`` /
    ``reorder_tuning`` trail. ``measured``: the recall at the current settings, if known;
    ``first_growth``: see :func:`tune_leaves_to_search`.
    """
    leaves = params.get("num_leaves_to_search")
    if params["mode"] == "tree_ah" and tune_leaves:
        leaves, recall, tried = tune_leaves_to_search(searcher, probe, start=leaves, num_leaves=params["num_leaves"],
                                                      min_recall=min_recall, start_recall=measured,
                                                      first_growth=first_growth)
        params.update(num_leaves_to_search=leaves, leaves_tuning=[[lv, round(r, 4)] for lv, r in tried])
    else:
        recall = probe.recall(searcher, leaves_to_search=leaves) if measured is None else measured
    if recall < min_recall and "reorder_k" in params:
        reorder, recall, tried = tune_reorder_k(searcher, probe, start=params["reorder_k"], min_recall=min_recall,
                                                start_recall=recall, leaves_to_search=leaves)
        params.update(reorder_k=reorder, reorder_tuning=[[r, round(v, 4)] for r, v in tried])
    return recall
