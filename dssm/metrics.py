"""Retrieval metrics, runs and significance: the library part of evaluation (no file I/O).

Terms, as trec_eval uses them:

* a **run** is ``{query_id: [(doc_id, score), ...]}`` ranked best first. Metrics read the order only;
  scores are carried for reports. A doc id repeated within one ranking counts at its first position.
* **qrels** are ``{query_id: {doc_id: grade}}``. A document is *relevant* when its grade is > 0.
* The evaluated queries are those of the qrels with at least one relevant document; queries without
  one are skipped (no metric is defined for them: nDCG's ideal DCG and recall's denominator are 0).
  An evaluated query that is missing from the run scores 0 on every metric (trec_eval ``-c``), so a
  system cannot gain by returning nothing. Restrict the qrels to restrict the query set.

Metrics (``name@k``), per query, then averaged over the evaluated queries:

* ``recall@k``: relevant documents in the top k / all relevant documents of the query.
* ``precision@k``: relevant documents in the top k / k.
* ``mrr@k``: 1 / rank of the first relevant document within the top k, else 0.
* ``ndcg@k``: graded, with trec_eval's and pytrec_eval's (hence BEIR's) *linear* gain:
  ``DCG@k = sum_{r=1..k} grade(d_r) / log2(r + 1)``, divided by the DCG@k of the ideal ordering of all
  judged relevant documents. (Not the ``2^grade - 1`` "exponential" gain.) With binary qrels the two agree.
* ``map@k``: sum of precision@r over ranks r <= k holding a relevant document / all relevant documents.

Per-query values are kept (:class:`SystemResult.per_query`) for significance tests and plots.

Significance: :func:`paired_randomization_test` between every two systems on every metric.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dssm.errors import ConfigError, InputError

__all__ = [
    "grid_max_p_value",
    "DEFAULT_METRICS",
    "Run",
    "Qrels",
    "SystemResult",
    "SearchBatch",
    "parse_metric",
    "recall_at_k",
    "precision_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "average_precision_at_k",
    "evaluated_queries",
    "per_query_metrics",
    "mean_metrics",
    "evaluate_run",
    "metric_depth",
    "drop_self",
    "retrieve_run",
    "exact_run",
    "sample_queries",
    "select_queries",
    "reciprocal_rank_fusion",
    "paired_randomization_test",
    "significance",
    "split_tuning_queries",
    "trec_run_lines",
    "report_dict",
    "format_table",
]

Run = Mapping[str, Sequence[tuple[str, float]]]
Qrels = Mapping[str, Mapping[str, float]]

#: The metrics ``dssm eval`` reports by default: the end-to-end contract's five first, then issue 6's.
DEFAULT_METRICS: tuple[str, ...] = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "recall@5",
                                    "precision@10", "map@100")


# --------------------------------------------------------------------------------------------- metrics


def _unique(ranked: Iterable[str], k: int) -> list[str]:
    """The first ``k`` distinct ids in rank order (a repeat keeps its first position)."""
    seen: set[str] = set()
    out = []
    for doc_id in ranked:
        if doc_id not in seen:
            seen.add(doc_id)
            out.append(doc_id)
            if len(out) == k:
                break
    return out


def _relevant(grades: Mapping[str, float]) -> set[str]:
    return {d for d, g in grades.items() if g > 0}


def recall_at_k(ranked: Sequence[str], grades: Mapping[str, float], k: int) -> float:
    """Fraction of the query's relevant documents found in the top ``k``.

    Args:
        ranked: doc ids, best first.
        grades: the query's qrels, ``{doc_id: grade}``; relevant means grade > 0.
        k: cut-off.

    Returns:
        A value in [0, 1]; 0 when the query has no relevant document.
    """
    relevant = _relevant(grades)
    if not relevant:
        return 0.0
    return sum(d in relevant for d in _unique(ranked, k)) / len(relevant)


def precision_at_k(ranked: Sequence[str], grades: Mapping[str, float], k: int) -> float:
    """Relevant documents in the top ``k`` divided by ``k`` (a short ranking is not rewarded)."""
    relevant = _relevant(grades)
    return sum(d in relevant for d in _unique(ranked, k)) / k


def mrr_at_k(ranked: Sequence[str], grades: Mapping[str, float], k: int) -> float:
    """Reciprocal rank of the first relevant document within the top ``k``, else 0."""
    relevant = _relevant(grades)
    for rank, doc_id in enumerate(_unique(ranked, k), start=1):
        if doc_id in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[str], grades: Mapping[str, float], k: int) -> float:
    """Graded nDCG@k with linear gain ``grade / log2(rank + 1)`` (trec_eval ``ndcg_cut``, pytrec_eval, BEIR).

    Grades <= 0 give no gain. The ideal DCG orders all of the query's positive grades descending.

    Returns:
        A value in [0, 1]; 0 when the query has no relevant document.
    """
    ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, start=1))
    if idcg == 0:
        return 0.0
    dcg = sum(max(grades.get(d, 0), 0) / math.log2(rank + 1) for rank, d in enumerate(_unique(ranked, k), start=1))
    return dcg / idcg


def average_precision_at_k(ranked: Sequence[str], grades: Mapping[str, float], k: int) -> float:
    """AP cut at ``k`` (trec_eval ``map_cut``): sum of precision@r at relevant ranks r <= k / all relevant."""
    relevant = _relevant(grades)
    if not relevant:
        return 0.0
    hits = 0
    total = 0.0
    for rank, doc_id in enumerate(_unique(ranked, k), start=1):
        if doc_id in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


_METRIC_FUNCTIONS: dict[str, Callable[[Sequence[str], Mapping[str, float], int], float]] = {
    "recall": recall_at_k,
    "precision": precision_at_k,
    "mrr": mrr_at_k,
    "ndcg": ndcg_at_k,
    "map": average_precision_at_k,
}


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` → ``("ndcg", 10)``.

    Raises:
        ConfigError: unknown metric or a cut-off that is not a positive integer.
    """
    base, sep, cut = name.partition("@")
    if base not in _METRIC_FUNCTIONS or not sep or not cut.isdigit() or int(cut) < 1:
        raise ConfigError(f"unknown metric {name!r}; use NAME@K with NAME in {sorted(_METRIC_FUNCTIONS)}")
    return base, int(cut)


def metric_depth(metrics: Sequence[str]) -> int:
    """The ranking depth the metrics need (the largest cut-off)."""
    return max(parse_metric(m)[1] for m in metrics)


def evaluated_queries(qrels: Qrels) -> list[str]:
    """Query ids with at least one relevant (grade > 0) document, sorted; the others are skipped."""
    return sorted(q for q, grades in qrels.items() if _relevant(grades))


def per_query_metrics(run: Run, qrels: Qrels, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, dict[str, float]]:
    """Every metric for every evaluated query.

    Args:
        run: ``{qid: [(doc_id, score), ...]}`` ranked best first.
        qrels: ``{qid: {doc_id: grade}}``.
        metrics: names like ``"ndcg@10"``.

    Returns:
        ``{metric: {qid: value}}`` over :func:`evaluated_queries` (a qid missing from ``run`` scores 0).
    """
    parsed = [(m, *parse_metric(m)) for m in metrics]
    out: dict[str, dict[str, float]] = {m: {} for m in metrics}
    for qid in evaluated_queries(qrels):
        ranked = [hit[0] for hit in run.get(qid, ())]
        for name, base, k in parsed:
            out[name][qid] = _METRIC_FUNCTIONS[base](ranked, qrels[qid], k)
    return out


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean over queries of each metric (0.0 for a metric with no queries)."""
    return {m: (sum(v.values()) / len(v) if v else 0.0) for m, v in per_query.items()}


@dataclass(frozen=True)
class SystemResult:
    """One system's evaluation.

    Attributes:
        name: system name as reported (``"dssm"``, ``"bm25"``, ...).
        means: ``{metric: mean over queries}``.
        per_query: ``{metric: {qid: value}}`` (paired across systems by qid).
    """

    name: str
    means: dict[str, float]
    per_query: dict[str, dict[str, float]]

    @property
    def num_queries(self) -> int:
        return len(next(iter(self.per_query.values()), {}))


def evaluate_run(name: str, run: Run, qrels: Qrels, *, metrics: Sequence[str] = DEFAULT_METRICS) -> SystemResult:
    """Score ``run`` against ``qrels``: per-query values and their means (see the module docstring)."""
    per_query = per_query_metrics(run, qrels, metrics)
    return SystemResult(name=name, means=mean_metrics(per_query), per_query=per_query)


# ------------------------------------------------------------------------------------------------ runs


def drop_self(run: Run, *, k: int) -> dict[str, list[tuple[str, float]]]:
    """Remove each query's own id from its ranking and cut it to ``k``.

    Quora's retrieval view puts every query's own text in the corpus under the query's id; finding it
    is trivial and says nothing. Retrieve ``k + 1`` and apply this so the depth stays ``k``.
    """
    return {qid: [hit for hit in hits if hit[0] != qid][:k] for qid, hits in run.items()}


SearchBatch = Callable[[list[str], int], Sequence[Sequence[Any]]]


def retrieve_run(search_batch: SearchBatch, queries: Mapping[str, str], *, k: int, skip_self: bool = False,
                 batch_size: int = 256, show_progress: bool = False,
                 desc: str = "search") -> dict[str, list[tuple[str, float]]]:
    """Run a batch search function over queries and collect a run.

    Args:
        search_batch: ``(texts, k) -> [[hit, ...] per text]`` where ``hit[0]`` is the doc id and ``hit[1]``
            the score (``serving.searcher.Hit`` and ``BM25Index`` both fit).
        queries: ``{qid: text}``; searched in this order, ``batch_size`` at a time.
        k: ranking depth kept per query.
        skip_self: drop a hit whose id equals the query id; ``k + 1`` are fetched so depth stays ``k``.
        batch_size: queries per ``search_batch`` call.
        show_progress: draw a tqdm bar (on stderr) over batches.
        desc: the bar's label.

    Returns:
        ``{qid: [(doc_id, score), ...]}``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    qids = list(queries)
    fetch = k + 1 if skip_self else k
    starts = range(0, len(qids), batch_size)
    if show_progress:

        starts = tqdm(starts, desc=desc, unit="batch", total=len(starts), file=sys.stderr)
    run: dict[str, list[tuple[str, float]]] = {}
    for start in starts:
        batch = qids[start:start + batch_size]
        results = search_batch([queries[q] for q in batch], fetch)
        if len(results) != len(batch):
            raise InputError(f"{desc}: search_batch returned {len(results)} rankings for {len(batch)} queries")
        for qid, hits in zip(batch, results, strict=True):
            run[qid] = [(str(h[0]), float(h[1])) for h in hits]
    return drop_self(run, k=k) if skip_self else {q: hits[:k] for q, hits in run.items()}


def exact_run(query_ids: Sequence[str], query_vectors: np.ndarray, doc_ids: Sequence[str], doc_vectors: np.ndarray,
              *, k: int, skip_self: bool = False, block: int = 256) -> dict[str, list[tuple[str, float]]]:
    """Exact dot-product search of every query among every document, as a run (the order of tied scores is
    numpy's partition's: unspecified).

    Args:
        query_ids: ``[q]`` ids, one per row of ``query_vectors`` ``[q, dim]``.
        doc_ids: ``[n]`` ids, one per row of ``doc_vectors`` ``[n, dim]`` (unit rows give cosine).
        k: ranking depth kept per query.
        skip_self: drop a hit whose id equals the query id (one more is fetched, so depth stays ``k``).
        block: queries scored at a time (``[block, n]`` scores in memory).

    Returns:
        ``{qid: [(doc_id, score), ...]}``, best first.
    """
    depth = min(k + int(skip_self), len(doc_ids))
    run: dict[str, list[tuple[str, float]]] = {}
    if depth < 1:
        return {qid: [] for qid in query_ids}
    for start in range(0, len(query_ids), block):
        scores = query_vectors[start:start + block] @ doc_vectors.T
        top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        for i, row in enumerate(top):
            qid = query_ids[start + i]
            order = row[np.argsort(-scores[i, row], kind="stable")]
            hits = [(doc_ids[j], float(scores[i, j])) for j in order if not (skip_self and doc_ids[j] == qid)]
            run[qid] = hits[:k]
    return run


def sample_queries(qids: Iterable[str], n: int) -> list[str]:
    """A deterministic pseudo-random subset of ``n`` query ids (sha1 order of the id), sorted.

    Hashing rather than taking the first ``n`` avoids the bias of files sorted by topic or date, and
    the same id always gets the same position, so subsets of growing ``n`` are nested.
    """
    if n < 1:
        raise ConfigError(f"--max-queries must be >= 1, got {n}")
    ordered = sorted(qids, key=lambda q: hashlib.sha1(q.encode("utf-8")).hexdigest())
    return sorted(ordered[:n])


def select_queries(queries: Mapping[str, str], qrels: Qrels, *, keep: Callable[[str], bool] | None = None,
                   max_queries: int | None = None) -> list[str]:
    """The query ids to evaluate: in both the queries (with a non-blank text) and (with a relevant doc) the qrels.

    A blank query cannot be searched by any system; it is left out rather than stopping the run
    (``dssm eval`` warns with its count).

    Args:
        queries: ``{qid: text}``.
        qrels: ``{qid: {doc_id: grade}}``.
        keep: optional filter on the query text (e.g. "in the held-out split").
        max_queries: optional size of a deterministic subset (:func:`sample_queries`).

    Returns:
        Sorted query ids, possibly empty.
    """
    qids = [q for q in evaluated_queries(qrels) if q in queries and queries[q].strip()]
    if keep is not None:
        qids = [q for q in qids if keep(queries[q])]
    if max_queries is not None:
        qids = sample_queries(qids, max_queries)
    return qids


def reciprocal_rank_fusion(runs: Sequence[Run], *, k: int, rrf_k: float = 60.0) -> dict[str, list[tuple[str, float]]]:
    """Fuse rankings by reciprocal rank (Cormack et al. 2009): ``score(d) = sum_runs 1 / (rrf_k + rank(d))``.

    Args:
        runs: runs over the same queries (a query missing from a run contributes nothing from it).
        k: depth of the fused ranking.
        rrf_k: the damping constant (60 in the paper).

    Returns:
        The fused run; ties are broken by doc id so the result is deterministic.
    """
    fused: dict[str, list[tuple[str, float]]] = {}
    for qid in sorted({q for run in runs for q in run}):
        scores: dict[str, float] = {}
        for run in runs:
            hits = run.get(qid, ())
            for rank, doc_id in enumerate(_unique((h[0] for h in hits), len(hits)), 1):
                scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (rrf_k + rank)
        fused[qid] = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]
    return fused


def paired_randomization_test(a: Mapping[str, float], b: Mapping[str, float], *, trials: int = 10_000,
                              seed: int = 0) -> float:
    """Two-sided p-value that systems ``a`` and ``b`` have the same mean, by paired randomisation.

    Each trial swaps the two systems' values on a random half of the queries (sign flips of the
    per-query differences); p is the share of trials whose |mean difference| reaches the observed one
    (Smucker, Allan & Carterette 2007). Queries are paired by id.

    Args:
        a, b: per-query values of one metric, ``{qid: value}``, over the same query ids.
        trials: random permutations.
        seed: RNG seed (results repeat).

    Raises:
        InputError: the query sets differ or are empty.
    """

    if set(a) != set(b) or not a:
        raise InputError(f"paired test needs the same non-empty query set: {len(a)} vs {len(b)} queries, "
                         f"{len(set(a) ^ set(b))} not shared")
    qids = sorted(a)
    return grid_max_p_value(np.array([[a[q] - b[q] for q in qids]], dtype=np.float64), trials=trials, seed=seed)


def grid_max_p_value(differences: np.ndarray, *, trials: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of the grid's largest mean difference from the base, corrected for the grid.

    A setting picked as the best of many, then tested alone against the base, looks significant by
    chance far more often than ``alpha`` (on quora-dev's 401 held-out pairs the best of 23 settings
    gained +0.0057 MRR@10 at a single-test p of 0.044). Here every randomisation trial flips the sign
    of each query's differences in all settings at once (the paired test of
    :func:`dssm.metrics.paired_randomization_test`) and takes the largest |mean| over the grid; p is the
    share of trials reaching the observed largest |mean| (Westfall & Young's max-statistic correction:
    exact for the selection, and, unlike Bonferroni, not penalised by settings that rank alike). With
    one setting it is :func:`paired_randomization_test`, which calls it so (used by
    :func:`dssm.bm25_tuning.tune_bm25`).

    Args:
        differences: ``[settings, queries]`` per-query metric of each setting minus the base's.
        trials: random sign flips.
        seed: RNG seed (results repeat).

    Raises:
        ConfigError: no setting or no query.
    """
    differences = np.asarray(differences, dtype=np.float64)
    if differences.ndim != 2 or 0 in differences.shape:
        raise ConfigError(f"grid_max_p_value needs [settings, queries] differences, got shape {differences.shape}")
    observed = np.abs(differences.mean(axis=1)).max()
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, trials, 1000):  # blocks bound memory at 1000 x queries
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(1000, trials - start), differences.shape[1]))
        hits += int((np.abs(signs @ differences.T / differences.shape[1]).max(axis=1) >= observed - 1e-12).sum())
    return (hits + 1) / (trials + 1)  # the observed assignment counts, so p is never 0 (Phipson & Smyth 2010)


def significance(results: Sequence[SystemResult], *, trials: int = 10_000,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """Paired randomisation p-values between every two systems on every metric they share.

    Returns:
        ``{"A vs B": {metric: p}}`` for each pair in ``results`` order (A before B).
    """
    out: dict[str, dict[str, float]] = {}
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            shared = [m for m in a.per_query if m in b.per_query]
            out[f"{a.name} vs {b.name}"] = {m: paired_randomization_test(a.per_query[m], b.per_query[m],
                                                                         trials=trials, seed=seed) for m in shared}
    return out


def split_tuning_queries(qids: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split query ids into (tuning, evaluated), deterministically by sha1 of ``"tune:" + qid``.

    The same id always lands on the same side, whatever the other ids are.

    Raises:
        ConfigError: ``fraction`` outside (0, 1), or a side would be empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--tune-fraction must be in (0, 1), got {fraction}")
    tune, rest = [], []
    for qid in qids:
        bucket = int(hashlib.sha1(f"tune:{qid}".encode()).hexdigest()[:8], 16) / 0x100000000
        (tune if bucket < fraction else rest).append(qid)
    if not tune or not rest:
        raise ConfigError(f"--tune-fraction {fraction} of {len(qids)} queries leaves {len(tune)} for tuning and "
                          f"{len(rest)} to evaluate; both must be non-empty")
    return tune, rest


# ---------------------------------------------------------------------------------------------- report


def trec_run_lines(run: Run, *, system: str) -> list[str]:
    """The run in TREC format, ``qid Q0 docid rank score system``, so trec_eval users can check us.

    Scores are rewritten as strictly falling values when the run has ties, because trec_eval re-sorts by
    score (ties by doc id) and would otherwise change our order.
    """
    if not system or any(c.isspace() for c in system):
        raise ConfigError(f"TREC system tag must be one word, got {system!r}")
    lines = []
    for qid in sorted(run):
        hits = list(run[qid])
        scores = [float(h[1]) for h in hits]
        monotone = all(x > y for x, y in zip(scores, scores[1:], strict=False))
        for rank, hit in enumerate(hits, 1):
            doc_id = hit[0]
            if any(c.isspace() for c in str(qid) + str(doc_id)):
                raise InputError(f"TREC run ids cannot contain whitespace: query {qid!r}, document {doc_id!r}")
            score = scores[rank - 1] if monotone else float(len(hits) - rank + 1)
            lines.append(f"{qid} Q0 {doc_id} {rank} {score!r} {system}")  # repr: exact, so order survives
    return lines



def report_dict(results: Sequence[SystemResult], *, queries: int, docs: int) -> dict[str, Any]:
    """The ``dssm eval --json`` object: ``{system: {metric: mean}, "queries": N, "docs": N}``."""
    out: dict[str, Any] = {r.name: dict(r.means) for r in results}
    out["queries"] = queries
    out["docs"] = docs
    return out


def format_table(results: Sequence[SystemResult], *, queries: int | None = None, docs: int | None = None) -> str:
    """A fixed-width text table, one row per system, one column per metric."""
    if not results:
        return "(no systems)"
    metrics = list(results[0].means)
    width = max(8, *(len(r.name) for r in results))
    cols = {m: max(10, len(m)) for m in metrics}
    lines = [f"{'system':<{width}}  " + "  ".join(f"{m:>{cols[m]}}" for m in metrics)]
    lines += [f"{r.name:<{width}}  " + "  ".join(f"{r.means[m]:>{cols[m]}.4f}" for m in metrics) for r in results]
    if queries is not None or docs is not None:
        lines.append(f"queries: {queries}  docs: {docs}")
    return "\n".join(lines)


