"""Offline retrieval evaluation: metrics, runs, the BM25 baseline beside DSSM; ``main(argv)`` = ``dssm eval``.

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

Systems compared by ``dssm eval`` (``--systems``), all on the same queries:

* ``dssm``: the index's ScaNN search (what serving returns);
* ``dssm-exact``: brute force over the index's stored embeddings (``embeddings.npy``), so ANN loss
  shows as the gap to ``dssm`` (zero for brute-force indexes, which all indexes under 20k docs are);
* ``bm25``: :mod:`dssm.bm25` over ``--data``'s corpus;
* ``hybrid-rrf``: reciprocal-rank fusion of ``dssm`` and ``bm25`` (no parameter tuned);
* ``hybrid``: convex combination of per-query min-max normalised exact scores
  (:mod:`dssm.hybrid`) over the union of both systems' top-``depth`` candidates, with the DSSM weight
  tuned on nDCG@10 of *tuning queries*: a deterministic ``--tune-fraction`` of the selected queries
  (by sha1 of ``"tune:" + query id``), removed from the evaluated set, so the weight never sees an
  evaluated query. (The train split of ``--holdout`` is not used for tuning: DSSM was trained on
  those queries' pairs, so a weight tuned there would over-trust it.)

Significance: :func:`paired_randomization_test` between every two systems on every metric.

The library part (everything but :func:`main`) reads and writes no files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dssm.errors import ConfigError, InputError

__all__ = [
    "DEFAULT_METRICS",
    "Run",
    "Qrels",
    "SystemResult",
    "parse_metric",
    "holdout_filter",
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
    "sample_queries",
    "select_queries",
    "reciprocal_rank_fusion",
    "paired_randomization_test",
    "significance",
    "split_tuning_queries",
    "trec_run_lines",
    "report_dict",
    "format_table",
    "ALL_SYSTEMS",
    "main",
]

Run = Mapping[str, Sequence[tuple[str, float]]]
Qrels = Mapping[str, Mapping[str, float]]

#: The metrics ``dssm eval`` reports by default: the end-to-end contract's five first, then issue 6's.
DEFAULT_METRICS: tuple[str, ...] = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "recall@5",
                                    "precision@10", "map@100")
#: Every system ``dssm eval`` can compare, in report order.
ALL_SYSTEMS: tuple[str, ...] = ("dssm", "dssm-exact", "bm25", "hybrid-rrf", "hybrid")


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
        from tqdm.auto import tqdm

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
    """The query ids to evaluate: in both the queries and (with a relevant doc) the qrels.

    Args:
        queries: ``{qid: text}``.
        qrels: ``{qid: {doc_id: grade}}``.
        keep: optional filter on the query text (e.g. "in the held-out split").
        max_queries: optional size of a deterministic subset (:func:`sample_queries`).

    Returns:
        Sorted query ids, possibly empty.
    """
    qids = [q for q in evaluated_queries(qrels) if q in queries]
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
    import numpy as np

    if set(a) != set(b) or not a:
        raise InputError(f"paired test needs the same non-empty query set: {len(a)} vs {len(b)} queries, "
                         f"{len(set(a) ^ set(b))} not shared")
    qids = sorted(a)
    diff = np.array([a[q] - b[q] for q in qids], dtype=np.float64)
    observed = abs(diff.mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, trials, 1000):  # blocks bound memory at 1000 x n
        n = min(1000, trials - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(n, diff.size))
        hits += int((np.abs((signs * diff).mean(axis=1)) >= observed - 1e-12).sum())
    # +1 in both counts the observed assignment itself, so p is never 0 (Phipson & Smyth 2010).
    return (hits + 1) / (trials + 1)


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


# ------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from dssm.bm25 import BM25Config
    from dssm.config import add_config_arguments

    parser = argparse.ArgumentParser(
        prog="dssm eval",
        description="Retrieval metrics of DSSM (ANN and exact), BM25 and their hybrids on a BEIR directory, "
                    "on the same queries, with paired significance tests; --report writes JSON, Markdown, "
                    "TREC runs and plots.")
    parser.add_argument("--index", help="index directory written by `dssm index` (omit to evaluate BM25 only)")
    parser.add_argument("--data", required=True, help="BEIR directory: corpus.jsonl, queries.jsonl, qrels.tsv")
    parser.add_argument("--skip-self", action="store_true",
                        help="drop a hit whose id equals the query's id (Quora: each query is also a document)")
    parser.add_argument("--json", metavar="OUT", help="write the metrics as JSON to this file")
    parser.add_argument("--report", metavar="DIR",
                        help="write metrics.json, per_query.json, results.md, runs/SYSTEM.trec and PNG plots here")
    parser.add_argument("--holdout", metavar="PAIRS_DIR",
                        help="evaluate only queries that this pairs dataset put in its validation split")
    parser.add_argument("--max-queries", type=int, metavar="N",
                        help="evaluate a deterministic subset of N queries (by hash of the query id)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help="comma-separated NAME@K, NAME in recall, precision, mrr, ndcg, map "
                             "(default: %(default)s)")
    parser.add_argument("--systems", default=None,
                        help=f"comma-separated subset of {','.join(ALL_SYSTEMS)} (default: all with --index, "
                             "else bm25)")
    parser.add_argument("--no-bm25", action="store_true", help="skip BM25 and the hybrids")
    parser.add_argument("--hybrid-weight", choices=("index", "tune"), default="index",
                        help="index: the hybrid uses the weight stored in the index version (the label-free one "
                             "`dssm index` chose, or an earlier --save-weight), so every selected query is "
                             "evaluated, as `dssm search` ranks them; tune: tune it on --tune-fraction of the "
                             "queries, left out of the evaluation. An index without a stored weight is tuned "
                             "(default: %(default)s)")
    parser.add_argument("--tune-fraction", type=float, default=0.2,
                        help="share of the selected queries (by hash of the id) used only to tune the hybrid "
                             "weight and left out of the evaluation (default: %(default)s)")
    parser.add_argument("--tune-metric", default="ndcg@10", help="metric the hybrid weight maximises (default: "
                                                                  "%(default)s)")
    parser.add_argument("--normalization", choices=("minmax", "zscore"), default="minmax",
                        help="per-query score normalisation of the convex hybrid (default: %(default)s)")
    parser.add_argument("--rrf-k", type=float, default=60.0, help="RRF damping constant (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=10_000,
                        help="randomisation-test trials per comparison (default: %(default)s)")
    parser.add_argument("--save-weight", action="store_true",
                        help="store the tuned hybrid weight in the index (a new version with hybrid.json) so "
                             "search mode=hybrid uses it")
    parser.add_argument("--batch-size", type=int, default=256, help="queries per search call (default: 256)")
    add_config_arguments(parser, BM25Config, prefix="bm25-")
    return parser


def holdout_filter(pairs_dir: Path) -> Callable[[str], bool]:
    """``text -> in validation split``, the split ``dssm pairs`` made (``PAIRS_DIR/pairs_config.json``:
    ``validation_fraction`` and ``split_salt``, hashed by :func:`dssm.data.split_of` on the query text)."""
    from dssm.data import split_of

    path = pairs_dir / "pairs_config.json"
    if not path.is_file():
        raise InputError(f"--holdout {pairs_dir}: no pairs_config.json there (not a `dssm pairs` output?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    missing = [key for key in ("validation_fraction", "split_salt") if key not in config]
    if missing:
        raise InputError(f"{path} lacks {missing}; cannot reproduce its train/validation split")
    fraction, salt = float(config["validation_fraction"]), str(config["split_salt"])
    if fraction <= 0:
        raise InputError(f"{path}: validation_fraction is {fraction}, so there are no held-out queries")
    return lambda text: split_of(text, validation_fraction=fraction, salt=salt) == "validation"


def _check_index_covers(searcher: Any, qrels: Qrels, *, corpus_size: int, index: str, data: Path) -> None:
    """Refuse an index that holds none of the judged documents (built from another corpus); warn if partial."""
    relevant = sorted({d for grades in qrels.values() for d, g in grades.items() if g > 0})
    missing = [d for d in relevant if searcher.index.docs.row_of(d) is None]
    if relevant and len(missing) == len(relevant):
        raise InputError(f"--index {index} holds none of the {len(relevant)} relevant documents of --data {data} "
                         f"(e.g. id {missing[0]!r}): the index was built from another corpus")
    if missing:
        print(f"warning: {len(missing)} of {len(relevant)} relevant documents are not in the index "
              f"(e.g. id {missing[0]!r}); DSSM cannot retrieve them", file=sys.stderr)
    if len(searcher) != corpus_size:
        print(f"warning: the index holds {len(searcher)} documents, --data's corpus {corpus_size}; "
              "BM25 searches the corpus, DSSM the index", file=sys.stderr)


def _parse_systems(args: argparse.Namespace) -> list[str]:
    if args.systems is None:
        systems = list(ALL_SYSTEMS) if args.index is not None else ["bm25"]
    else:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in systems if s not in ALL_SYSTEMS]
        if unknown or not systems:
            raise ConfigError(f"--systems {args.systems!r}: unknown {unknown}; choose from {ALL_SYSTEMS}")
        systems = [s for s in ALL_SYSTEMS if s in systems]  # report order, no repeats
    if args.no_bm25:
        systems = [s for s in systems if s in ("dssm", "dssm-exact")]
    if not systems:
        raise InputError("nothing to evaluate: give --index, or drop --no-bm25")
    dense = [s for s in systems if s != "bm25"]
    if dense and args.index is None:
        raise InputError(f"systems {dense} need --index")
    return systems


def _embed_queries(searcher: Any, queries: Mapping[str, str], qids: Sequence[str], *, batch_size: int) -> Any:
    """[len(qids), dim] float32 query embeddings, batch by batch with a progress bar."""
    import numpy as np
    from tqdm.auto import tqdm

    if searcher.encoder is None:
        raise InputError("--index has no model/: it cannot embed query texts")
    for qid in qids:
        if not queries[qid].strip():
            raise InputError(f"query {qid!r} has an empty text")
    out = np.zeros((len(qids), searcher.index.dim), dtype=np.float32)
    for start in tqdm(range(0, len(qids), batch_size), desc="embed queries", unit="batch", file=sys.stderr):
        batch = qids[start:start + batch_size]
        out[start:start + len(batch)] = searcher.encoder.embed_queries([queries[q] for q in batch])
    return out


def _dense_runs(searcher: Any, vectors: Any, qids: Sequence[str], *, fetch: int, exact: bool,
                batch_size: int) -> dict[str, list[tuple[str, float]]]:
    """ScaNN (``exact=False``) or brute-force (``exact=True``) rankings of the index for query vectors."""
    from serving.index import exact_top_k

    run: dict[str, list[tuple[str, float]]] = {}
    if exact:
        rows, scores = exact_top_k(searcher.index.embeddings(), vectors, fetch)
        docs = searcher.index.docs.get(rows.ravel().tolist())
        width = rows.shape[1]
        for i, qid in enumerate(qids):
            run[qid] = [(docs[i * width + j].id, float(scores[i, j])) for j in range(width)]
        return run
    for start in range(0, len(qids), batch_size):
        hits = searcher.search_vectors(vectors[start:start + batch_size], fetch)
        for qid, row in zip(qids[start:start + batch_size], hits, strict=True):
            run[qid] = [(h.id, h.score) for h in row]
    return run


def _hybrid_candidates(searcher: Any, bm25: Any, vectors: Any, qids: Sequence[str], queries: Mapping[str, str],
                       dense_run: Run, sparse_run: Run) -> tuple[dict[str, dict[str, float]],
                                                                 dict[str, dict[str, float]]]:
    """Exact DSSM cosines and BM25 scores of every candidate (union of both runs) per query."""
    import numpy as np

    row_of = {doc.id: row for row, doc in searcher.index.docs.iter_all()}
    corpus_pos = {doc_id: i for i, doc_id in enumerate(bm25.ids)}
    embeddings = searcher.index.embeddings()
    dense: dict[str, dict[str, float]] = {}
    sparse: dict[str, dict[str, float]] = {}
    for i, qid in enumerate(qids):
        candidates = sorted({h[0] for h in dense_run.get(qid, ())} | {h[0] for h in sparse_run.get(qid, ())})
        in_index = [d for d in candidates if d in row_of]
        cosines = np.asarray(embeddings[[row_of[d] for d in in_index]], dtype=np.float32) @ vectors[i]
        dense[qid] = dict(zip(in_index, cosines.tolist(), strict=True))
        full = bm25.scores(queries[qid])
        sparse[qid] = {d: float(full[corpus_pos[d]]) if d in corpus_pos else 0.0 for d in candidates}
    return dense, sparse


def main(argv: list[str] | None = None) -> int:
    """``dssm eval``: evaluate the systems on a BEIR directory; print a table; write JSON / a report."""
    from dssm.bm25 import BM25Config, BM25Index, document_text
    from dssm.config import config_from_args
    from dssm.data import read_beir
    from dssm.hybrid import convex_fusion, tune_weight

    args = _parser().parse_args(argv)
    systems = _parse_systems(args)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    bm25_config = config_from_args(BM25Config, args, prefix="bm25-")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if not metrics:
        raise ConfigError("--metrics is empty")
    depth = metric_depth(metrics)  # also validates every name
    parse_metric(args.tune_metric)
    if args.save_weight and "hybrid" not in systems:
        raise ConfigError("--save-weight needs the hybrid system (it saves the weight tuned for it)")
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise InputError(f"--data {data_dir}: no such directory (expected a BEIR directory)")
    for flag, value in (("--json", args.json), ("--report", args.report)):
        if value and not Path(value).resolve().parent.is_dir():
            raise InputError(f"{flag} {value}: directory {Path(value).resolve().parent} does not exist")
    # Load the index before the (slower) corpus read, so a bad --index fails fast.
    searcher = None
    if args.index is not None:
        from serving.searcher import Searcher

        searcher = Searcher.load(args.index)

    dataset = read_beir(data_dir)
    corpus, queries, qrels = dataset.corpus, dataset.queries, dataset.qrels
    keep = holdout_filter(Path(args.holdout)) if args.holdout else None
    qids = select_queries(queries, qrels, keep=keep, max_queries=args.max_queries)
    if not qids:
        judged = evaluated_queries(qrels)
        why = (f"{len(judged)} queries have relevant documents in qrels.tsv, "
               f"{sum(q in queries for q in judged)} of them are in queries.jsonl")
        if keep is not None:
            why += f", none of those is in the validation split of {args.holdout}"
        raise InputError(f"--data {data_dir}: no query to evaluate ({why})")
    if searcher is not None:
        _check_index_covers(searcher, {q: qrels[q] for q in qids}, corpus_size=len(corpus), index=args.index,
                            data=data_dir)
    tune_qids: list[str] = []
    stored_weight = None
    if "hybrid" in systems and args.hybrid_weight == "index" and searcher is not None:
        stored_weight = searcher.stored_hybrid_config
        if stored_weight is None:
            print(f"index version {searcher.version} stores no hybrid weight: tuning it on queries "
                  "(--hybrid-weight tune)", file=sys.stderr)
    if args.save_weight and stored_weight is not None:
        raise ConfigError("--save-weight saves a weight tuned on queries, and this index version already stores "
                          "one (its hybrid.json): pass --hybrid-weight tune to tune and replace it")
    if "hybrid" in systems and stored_weight is None:
        tune_qids, qids = split_tuning_queries(qids, args.tune_fraction)
    sel_qrels = {q: qrels[q] for q in qids}
    print(f"evaluating {len(qids)} queries against {len(corpus)} documents"
          f"{' (skip-self)' if args.skip_self else ''}"
          f"{f'; {len(tune_qids)} other queries tune the hybrid weight' if tune_qids else ''}", file=sys.stderr)

    all_qids = qids + tune_qids
    fetch = depth + 1 if args.skip_self else depth
    runs: dict[str, dict[str, list[tuple[str, float]]]] = {}
    seconds: dict[str, float] = {}

    def finish(run: dict[str, list[tuple[str, float]]]) -> dict[str, list[tuple[str, float]]]:
        return drop_self(run, k=depth) if args.skip_self else {q: hits[:depth] for q, hits in run.items()}

    vectors = None
    if searcher is not None:
        tick = time.perf_counter()
        vectors = _embed_queries(searcher, queries, all_qids, batch_size=args.batch_size)
        embed_seconds = time.perf_counter() - tick
        for name, exact in (("dssm", False), ("dssm-exact", True)):
            if name in systems or (name == "dssm" and {"hybrid", "hybrid-rrf"} & set(systems)):
                tick = time.perf_counter()
                runs[name] = finish(_dense_runs(searcher, vectors, all_qids, fetch=fetch, exact=exact,
                                                batch_size=args.batch_size))
                seconds[name] = time.perf_counter() - tick + embed_seconds
    bm25 = None
    if {"bm25", "hybrid", "hybrid-rrf"} & set(systems):
        tick = time.perf_counter()
        ids = list(corpus)
        bm25 = BM25Index.build(ids, [document_text(corpus[i].title, corpus[i].text) for i in ids], config=bm25_config)
        runs["bm25"] = retrieve_run(bm25.search_batch, {q: queries[q] for q in all_qids}, k=depth,
                                    skip_self=args.skip_self, batch_size=args.batch_size, show_progress=True,
                                    desc="bm25")
        seconds["bm25"] = time.perf_counter() - tick
    if "hybrid-rrf" in systems:
        tick = time.perf_counter()
        runs["hybrid-rrf"] = reciprocal_rank_fusion([runs["dssm"], runs["bm25"]], k=depth, rrf_k=args.rrf_k)
        seconds["hybrid-rrf"] = time.perf_counter() - tick + seconds["dssm"] + seconds["bm25"]
    hybrid_info: dict[str, Any] | None = None
    if "hybrid" in systems:
        tick = time.perf_counter()
        dense_c, sparse_c = _hybrid_candidates(searcher, bm25, vectors, all_qids, queries, runs["dssm"], runs["bm25"])
        tune_set = set(tune_qids)
        tune_qrels = {q: qrels[q] for q in tune_qids}

        def tuned_score(weight: float) -> float:
            run = convex_fusion({q: v for q, v in dense_c.items() if q in tune_set},
                                {q: v for q, v in sparse_c.items() if q in tune_set},
                                weight=weight, k=depth, normalization=args.normalization)
            return evaluate_run("tune", run, tune_qrels, metrics=(args.tune_metric,)).means[args.tune_metric]

        if stored_weight is None:
            weight, curve = tune_weight(tuned_score)
            normalization = args.normalization
        else:
            weight, curve, normalization = stored_weight.weight, {}, stored_weight.normalization
        eval_set = set(qids)
        runs["hybrid"] = convex_fusion({q: v for q, v in dense_c.items() if q in eval_set},
                                       {q: v for q, v in sparse_c.items() if q in eval_set},
                                       weight=weight, k=depth, normalization=normalization)
        seconds["hybrid"] = time.perf_counter() - tick + seconds["dssm"] + seconds["bm25"]
        if stored_weight is None:
            hybrid_info = {"weight": weight, "normalization": args.normalization, "source": "tuned on queries",
                           "tuning_queries": len(tune_qids), "tuning_metric": args.tune_metric,
                           "tuning_curve": {f"{w:.2f}": v for w, v in curve.items()},
                           "tuning_split": f"sha1('tune:' + query id) < {args.tune_fraction}; disjoint from the "
                                           "evaluated queries"}
            print(f"hybrid: weight {weight:.2f} on DSSM ({args.normalization}), tuned on {len(tune_qids)} queries "
                  f"({args.tune_metric} {curve[weight]:.4f})", file=sys.stderr)
        else:
            hybrid_info = {"weight": weight, "normalization": normalization, "tuning_queries": 0,
                           "source": f"stored in index version {searcher.version} (no query tuned it)",
                           "index_tuning": searcher.index.manifest.get("hybrid_tuning")}
            print(f"hybrid: weight {weight:.2f} on DSSM ({normalization}), stored in the index",
                  file=sys.stderr)

    eval_set = set(qids)
    results = []
    for name in systems:
        run = {q: hits for q, hits in runs[name].items() if q in eval_set}
        runs[name] = run
        results.append(evaluate_run(name, run, sel_qrels, metrics=metrics))
        print(f"{name}: {seconds[name]:.1f} s for {len(all_qids)} queries "
              f"({len(all_qids) / max(seconds[name], 1e-9):.0f} queries/s)", file=sys.stderr)
    tests = significance(results, trials=args.trials) if len(results) > 1 else {}

    print(format_table(results, queries=len(qids), docs=len(corpus)))
    for pair, values in tests.items():
        if "bm25" in pair.split(" vs ") or pair == "dssm vs dssm-exact":
            first = metrics[0]
            print(f"p({pair}, {first}) = {values[first]:.4g}")
    report = report_dict(results, queries=len(qids), docs=len(corpus))
    if len(results) > 1:
        report["significance"] = tests
        report["significance_trials"] = args.trials
    if hybrid_info is not None:
        report["hybrid_tuning"] = hybrid_info
    if args.json:
        from dssm.artifacts import write_json_atomic

        write_json_atomic(Path(args.json), report)
    if args.report:
        from dssm.report import write_report

        written = write_report(Path(args.report), results=results, runs=runs, qrels=sel_qrels, report=report,
                               title=f"dssm eval on {data_dir.name}")
        print(f"report: {len(written)} files in {args.report}", file=sys.stderr)
    if args.save_weight:
        from dssm.config import config_to_dict
        from dssm.hybrid import HYBRID_FILE, HybridConfig
        from dssm.thresholds import publish_index_files

        settings = config_to_dict(HybridConfig(weight=hybrid_info["weight"], normalization=args.normalization))
        version = publish_index_files(args.index, files={HYBRID_FILE: settings}, manifest_updates={"hybrid": settings})
        print(f"saved hybrid weight {hybrid_info['weight']:.2f} in {args.index} as version {version}", file=sys.stderr)
    return 0
