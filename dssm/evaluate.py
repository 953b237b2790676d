"""``dssm eval``: recall/MRR/nDCG of an index on a BEIR directory, with BM25 and hybrids beside it.

Metrics, runs and significance tests are :mod:`dssm.metrics` (its docstring defines every term).

Systems compared by ``dssm eval`` (``--systems``), all on the same queries:

* ``dssm``: the index's ScaNN search (what serving returns: with the version's window vectors,
  ``dssm index --windows``, its top 100 re-scored by cosine + best window's, :mod:`serving.windowing`);
* ``dssm-exact``: brute force over the index's stored embeddings (``embeddings.npy``), so ANN loss
  shows as the gap to ``dssm`` (zero for brute-force indexes, which all indexes under 20k docs are);
* ``bm25``: :mod:`dssm.bm25` over ``--data``'s corpus;
* ``hybrid-rrf``: reciprocal-rank fusion of ``dssm`` and ``bm25`` (no parameter tuned);
* ``hybrid``: convex combination of per-query min-max normalised exact scores (the dense side with
  the version's windows as search scores it; :mod:`dssm.hybrid`) over the union of both systems'
  top-``candidates`` documents (the index's hybrid config, 100 by default, as search fuses them; at
  least the metrics' depth), with the DSSM weight stored in the index or tuned on nDCG@10 of *tuning queries*: a
  deterministic ``--tune-fraction`` of the selected queries (by sha1 of ``"tune:" + query id``),
  removed from the evaluated set, so the weight never sees an evaluated query. (The train split of
  ``--holdout`` is not used for tuning: DSSM was trained on those queries' pairs, so a weight tuned
  there would over-trust it.)
* ``dssm+rerank``, ``bm25+rerank``, ``hybrid+rerank`` (only when named in ``--systems``; the index
  version needs a re-ranker, ``dssm attach-reranker``): what ``dssm search --rerank N`` returns, i.e.
  :meth:`serving.searcher.Searcher.search_batch` with ``mode`` ``dense``, ``bm25`` or ``hybrid`` and
  ``rerank=N`` (``--rerank``) at the metrics' depth, so the re-ranker re-orders the top ``max(N,
  depth)`` of that first stage (:mod:`serving.reranking`). Their first stages are the searcher's: ScaNN
  as ``dssm``; the index's own BM25 state (not ``--data``'s corpus with ``--bm25-*``, which ``bm25``
  reads); the index's stored hybrid weight (or the defaults), not a weight ``hybrid`` tunes on queries.
  They run on the evaluated queries only.

Significance: :func:`dssm.metrics.paired_randomization_test` between every two systems on every metric.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dssm.artifacts import write_json_atomic
from dssm.config import add_config_arguments, config_from_args, config_to_dict
from dssm.data import document_text, holdout_filter, read_beir
from dssm.errors import ConfigError, IndexNotFoundError, InputError
from dssm.hybrid import HYBRID_FILE, HybridConfig, convex_fusion, tune_weight
from dssm.index import exact_top_k, publish_index_files
from dssm.metrics import (
    DEFAULT_METRICS,
    Qrels,
    Run,
    drop_self,
    evaluate_run,
    evaluated_queries,
    format_table,
    metric_depth,
    parse_metric,
    reciprocal_rank_fusion,
    report_dict,
    retrieve_run,
    select_queries,
    significance,
    split_tuning_queries,
)
from dssm.report import write_report
from serving.reranking import MAX_RERANK
from serving.searcher import Searcher

__all__ = ["ALL_SYSTEMS", "DEFAULT_SYSTEMS", "RERANKED", "main"]

#: A re-ranked system → the searcher mode of its first stage.
RERANKED: dict[str, str] = {"dssm+rerank": "dense", "bm25+rerank": "bm25", "hybrid+rerank": "hybrid"}
#: What ``--systems`` defaults to with ``--index``: every first stage (a re-ranked system only when named).
DEFAULT_SYSTEMS: tuple[str, ...] = ("dssm", "dssm-exact", "bm25", "hybrid-rrf", "hybrid")
#: Every system ``dssm eval`` can compare, in report order.
ALL_SYSTEMS: tuple[str, ...] = (*DEFAULT_SYSTEMS, *RERANKED)


# ------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    # deferred: bm25s and PyStemmer, imported only when this runs
    from dssm.bm25 import BM25Config

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
                        help=f"comma-separated subset of {','.join(ALL_SYSTEMS)} (default with --index: "
                             f"{','.join(DEFAULT_SYSTEMS)}; else bm25); the +rerank systems need an index "
                             "with a re-ranker (dssm attach-reranker)")
    parser.add_argument("--rerank", type=int, default=100, metavar="N",
                        help=f"candidates the +rerank systems re-order, 1..{MAX_RERANK}: the top max(N, depth) "
                             "of each first stage, depth being the deepest metric cut-off (default: %(default)s)")
    parser.add_argument("--no-bm25", action="store_true", help="skip BM25 and the hybrids (with and without "
                                                               "re-ranking)")
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
        systems = list(DEFAULT_SYSTEMS) if args.index is not None else ["bm25"]
    else:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in systems if s not in ALL_SYSTEMS]
        if unknown or not systems:
            raise ConfigError(f"--systems {args.systems!r}: unknown {unknown}; choose from {ALL_SYSTEMS}")
        systems = [s for s in ALL_SYSTEMS if s in systems]  # report order, no repeats
    if args.no_bm25:
        systems = [s for s in systems if s in ("dssm", "dssm-exact", "dssm+rerank")]
    if not systems:
        raise InputError("nothing to evaluate: give --index, or drop --no-bm25")
    dense = [s for s in systems if s != "bm25"]
    if dense and args.index is None:
        raise InputError(f"systems {dense} need --index")
    return systems


def _embed_queries(searcher: Any, queries: Mapping[str, str], qids: Sequence[str], *, batch_size: int) -> Any:
    """[len(qids), dim] float32 query embeddings, batch by batch with a progress bar."""

    if searcher.encoder is None:
        raise InputError("--index has no model/: it cannot embed query texts")
    out = np.zeros((len(qids), searcher.index.dim), dtype=np.float32)
    for start in tqdm(range(0, len(qids), batch_size), desc="embed queries", unit="batch", file=sys.stderr):
        batch = qids[start:start + batch_size]
        out[start:start + len(batch)] = searcher.encoder.embed_queries([queries[q] for q in batch])
    return out


def _dense_runs(searcher: Any, vectors: Any, qids: Sequence[str], *, fetch: int, exact: bool,
                batch_size: int) -> dict[str, list[tuple[str, float]]]:
    """ScaNN (``exact=False``) or brute-force (``exact=True``) rankings of the index for query vectors."""

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

    row_of = {doc.id: row for row, doc in searcher.index.docs.iter_all()}
    corpus_pos = {doc_id: i for i, doc_id in enumerate(bm25.ids)}
    embeddings = searcher.index.embeddings()
    dense: dict[str, dict[str, float]] = {}
    sparse: dict[str, dict[str, float]] = {}
    for i, qid in enumerate(qids):
        candidates = sorted({h[0] for h in dense_run.get(qid, ())} | {h[0] for h in sparse_run.get(qid, ())})
        in_index = [d for d in candidates if d in row_of]
        rows = np.asarray([row_of[d] for d in in_index], np.int64)
        cosines = np.asarray(embeddings[rows], dtype=np.float32) @ vectors[i]
        if searcher.row_windows is not None:  # the dense side as search scores it (serving.windowing)
            cosines = searcher.row_windows.scores(vectors[i:i + 1], [rows], [cosines])[0]
        dense[qid] = dict(zip(in_index, cosines.tolist(), strict=True))
        full = bm25.scores(queries[qid])
        sparse[qid] = {d: float(full[corpus_pos[d]]) if d in corpus_pos else 0.0 for d in candidates}
    return dense, sparse


def main(argv: list[str] | None = None) -> int:
    """``dssm eval``: evaluate the systems on a BEIR directory; print a table; write JSON / a report."""
    args = _parser().parse_args(argv)
    systems, metrics, depth, data_dir = _check_args(args)
    # Load the index before the (slower) corpus read, so a bad --index fails fast.
    reranked = [s for s in systems if s in RERANKED]
    searcher = None
    if args.index is not None:
        searcher = Searcher.load(args.index, reranker=bool(reranked))  # a re-ranker is loaded only to be used
        if reranked:
            _check_reranker(searcher, reranked, index=args.index)
    dataset = read_beir(data_dir)
    qids, tune_qids, stored_weight = _select_queries(args, systems, searcher, dataset, data_dir)
    # The hybrid fuses what search fuses: each side's top `candidates` (the stored config's, or the default's),
    # however shallow the metrics; fused over the top `depth` only, it ranked otherwise than search.
    hybrid_depth = max(depth, (stored_weight or HybridConfig()).candidates)
    runs, seconds, candidates = _first_stage_runs(args, systems, searcher, dataset, qids + tune_qids, depth,
                                                  hybrid_depth=hybrid_depth)
    hybrid_info: dict[str, Any] | None = None
    if "hybrid" in systems:
        tick = time.perf_counter()
        runs["hybrid"], hybrid_info = _hybrid_run(args, candidates, dataset.qrels, qids, tune_qids, depth,
                                                  stored_weight=stored_weight, searcher=searcher)
        seconds["hybrid"] = time.perf_counter() - tick + seconds["dssm"] + seconds["bm25"]
    rerank_info = _reranked_runs(args, reranked, searcher, dataset.queries, qids, depth, runs=runs, seconds=seconds)
    n_run = {name: len(qids) if name in RERANKED else len(qids) + len(tune_qids) for name in systems}
    _report(args, systems, runs, seconds, dataset, qids, n_run=n_run, metrics=metrics,
            extra={"hybrid_tuning": hybrid_info, "rerank": rerank_info}, data_dir=data_dir)
    if args.save_weight:
        settings = config_to_dict(HybridConfig(weight=hybrid_info["weight"], normalization=args.normalization))
        version = publish_index_files(args.index, files={HYBRID_FILE: settings}, manifest_updates={"hybrid": settings})
        print(f"saved hybrid weight {hybrid_info['weight']:.2f} in {args.index} as version {version}", file=sys.stderr)
    return 0


def _check_args(args: argparse.Namespace) -> tuple[list[str], tuple[str, ...], int, Path]:
    """Validate the flags: ``(systems, metrics, depth, data_dir)``."""
    systems = _parse_systems(args)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    if not 1 <= args.rerank <= MAX_RERANK:
        raise ConfigError(f"--rerank must be in 1..{MAX_RERANK} (candidates re-ranked per query), got {args.rerank}")
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
    return systems, metrics, depth, data_dir


def _select_queries(args: argparse.Namespace, systems: Sequence[str], searcher: Any, dataset: Any,
                    data_dir: Path) -> tuple[list[str], list[str], Any]:
    """``(evaluated query ids, hybrid tuning query ids, the index's stored HybridConfig or None)``."""
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
    blank = [q for q in evaluated_queries(qrels) if q in queries and not queries[q].strip()]
    if blank:
        print(f"warning: {len(blank)} judged queries have a blank text and are not evaluated (e.g. id {blank[0]!r})",
              file=sys.stderr)
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
    print(f"evaluating {len(qids)} queries against {len(corpus)} documents"
          f"{' (skip-self)' if args.skip_self else ''}"
          f"{f'; {len(tune_qids)} other queries tune the hybrid weight' if tune_qids else ''}", file=sys.stderr)
    return qids, tune_qids, stored_weight


def _first_stage_runs(args: argparse.Namespace, systems: Sequence[str], searcher: Any, dataset: Any,
                      all_qids: list[str], depth: int, *, hybrid_depth: int
                      ) -> tuple[dict[str, Any], dict[str, float], Any]:
    """Dense, exact and BM25 runs (and RRF) over every query: ``(runs, seconds, hybrid candidates or None)``.

    The runs are ``depth`` deep; the hybrid's candidates are each side's top ``hybrid_depth`` (>= depth).
    """
    # deferred: bm25s and PyStemmer, imported only when this runs
    from dssm.bm25 import BM25Config, BM25Index

    corpus, queries = dataset.corpus, dataset.queries
    fetch = depth + 1 if args.skip_self else depth
    runs: dict[str, dict[str, list[tuple[str, float]]]] = {}
    seconds: dict[str, float] = {}
    vectors = None
    if searcher is not None:
        tick = time.perf_counter()
        vectors = _embed_queries(searcher, queries, all_qids, batch_size=args.batch_size)
        embed_seconds = time.perf_counter() - tick
        for name, exact in (("dssm", False), ("dssm-exact", True)):
            if name in systems or (name == "dssm" and {"hybrid", "hybrid-rrf"} & set(systems)):
                tick = time.perf_counter()
                run = _dense_runs(searcher, vectors, all_qids, fetch=fetch, exact=exact, batch_size=args.batch_size)
                runs[name] = drop_self(run, k=depth) if args.skip_self else {q: h[:depth] for q, h in run.items()}
                seconds[name] = time.perf_counter() - tick + embed_seconds
    bm25 = None
    if {"bm25", "hybrid", "hybrid-rrf"} & set(systems):
        tick = time.perf_counter()
        ids = list(corpus)
        bm25 = BM25Index.build(ids, [document_text(corpus[i].title, corpus[i].text) for i in ids],
                               config=config_from_args(BM25Config, args, prefix="bm25-"))
        runs["bm25"] = retrieve_run(bm25.search_batch, {q: queries[q] for q in all_qids}, k=depth,
                                    skip_self=args.skip_self, batch_size=args.batch_size, show_progress=True,
                                    desc="bm25")
        seconds["bm25"] = time.perf_counter() - tick
    if "hybrid-rrf" in systems:
        tick = time.perf_counter()
        runs["hybrid-rrf"] = reciprocal_rank_fusion([runs["dssm"], runs["bm25"]], k=depth, rrf_k=args.rrf_k)
        seconds["hybrid-rrf"] = time.perf_counter() - tick + seconds["dssm"] + seconds["bm25"]
    candidates = None
    if "hybrid" in systems:
        # hybrid is what search serves: BM25 with the index's own settings (which `dssm index --hybrid-pairs`
        # may have tuned, dssm.bm25_tuning), while the bm25 system keeps --bm25-*'s (Lucene's by default).
        served, sparse_run, dense_run = _served_bm25(searcher, bm25, corpus), runs["bm25"], runs["dssm"]
        if served is not bm25 or hybrid_depth > depth:
            sparse_run = retrieve_run(served.search_batch, {q: queries[q] for q in all_qids}, k=hybrid_depth,
                                      skip_self=args.skip_self, batch_size=args.batch_size, show_progress=False)
        if hybrid_depth > depth:
            fetch = hybrid_depth + 1 if args.skip_self else hybrid_depth
            deep = _dense_runs(searcher, vectors, all_qids, fetch=fetch, exact=False, batch_size=args.batch_size)
            dense_run = drop_self(deep, k=hybrid_depth) if args.skip_self else deep
        candidates = _hybrid_candidates(searcher, served, vectors, all_qids, queries, dense_run, sparse_run)
    return runs, seconds, candidates


def _served_bm25(searcher: Any, bm25: Any, corpus: Mapping[str, Any]) -> Any:
    """``bm25``, or the same corpus indexed with the index version's BM25 settings where they differ."""
    # deferred: bm25s and PyStemmer, imported only when this runs
    from dssm.bm25 import BM25Index

    stored = getattr(searcher.bm25, "config", None) if searcher is not None else None
    if stored is None or stored == bm25.config:
        return bm25
    print(f"hybrid: BM25 with the index's settings (k1 {stored.k1:g}, b {stored.b:g}, {stored.method}); the bm25 "
          f"system keeps k1 {bm25.config.k1:g}, b {bm25.config.b:g}", file=sys.stderr)
    return BM25Index.build(bm25.ids, [document_text(corpus[i].title, corpus[i].text) for i in bm25.ids], config=stored)


def _hybrid_run(args: argparse.Namespace, candidates: Any, qrels: Qrels, qids: list[str], tune_qids: list[str],
                depth: int, *, stored_weight: Any, searcher: Any) -> tuple[Run, dict[str, Any]]:
    """The convex fusion run over the evaluated queries, with the weight stored or tuned: ``(run, info)``."""
    dense_c, sparse_c = candidates
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
    run = convex_fusion({q: v for q, v in dense_c.items() if q in eval_set},
                        {q: v for q, v in sparse_c.items() if q in eval_set},
                        weight=weight, k=depth, normalization=normalization)
    if stored_weight is None:
        print(f"hybrid: weight {weight:.2f} on DSSM ({args.normalization}), tuned on {len(tune_qids)} queries "
              f"({args.tune_metric} {curve[weight]:.4f})", file=sys.stderr)
        return run, {"weight": weight, "normalization": args.normalization, "source": "tuned on queries",
                     "tuning_queries": len(tune_qids), "tuning_metric": args.tune_metric,
                     "tuning_curve": {f"{w:.2f}": v for w, v in curve.items()},
                     "tuning_split": f"sha1('tune:' + query id) < {args.tune_fraction}; disjoint from the "
                                     "evaluated queries"}
    print(f"hybrid: weight {weight:.2f} on DSSM ({normalization}), stored in the index", file=sys.stderr)
    return run, {"weight": weight, "normalization": normalization, "tuning_queries": 0,
                 "source": f"stored in index version {searcher.version} (no query tuned it)",
                 "index_tuning": searcher.index.manifest.get("hybrid_tuning"),
                 "bm25_tuning": searcher.index.manifest.get("bm25_tuning")}


def _check_reranker(searcher: Any, reranked: Sequence[str], *, index: str) -> None:
    """Refuse re-ranked systems the index version cannot serve (no re-ranker; no BM25 state for bm25/hybrid)."""
    if searcher.reranker is None:
        raise IndexNotFoundError(f"--index {index} (version {searcher.version}) has no re-ranker, which --systems "
                                 f"{','.join(reranked)} need: train one with `dssm train-reranker` and attach it "
                                 "with `dssm attach-reranker`, or drop the +rerank systems")
    sparse = [s for s in reranked if RERANKED[s] != "dense"]
    if sparse and searcher.bm25 is None:
        raise IndexNotFoundError(f"--index {index} (version {searcher.version}) holds no BM25 state, which "
                                 f"{','.join(sparse)} need (their first stage is the searcher's bm25/hybrid mode): "
                                 "rebuild the index with `dssm index`, or evaluate dssm+rerank only")


def _reranked_runs(args: argparse.Namespace, reranked: Sequence[str], searcher: Any, queries: Mapping[str, str],
                   qids: list[str], depth: int, *, runs: dict[str, Any],
                   seconds: dict[str, float]) -> dict[str, Any] | None:
    """Add each re-ranked system's run (``Searcher.search_batch(..., rerank=N)``) to ``runs``; returns the
    report's ``rerank`` entry (``None`` without re-ranked systems)."""
    if not reranked:
        return None
    fetch = depth + 1 if args.skip_self else depth  # retrieve_run asks for one more to drop the query's own id
    if args.rerank < depth:
        print(f"note: the +rerank systems re-order the top {fetch} of each first stage, not --rerank "
              f"{args.rerank}: the searcher re-ranks max(rerank, k) and the metrics need depth {depth}",
              file=sys.stderr)
    texts = {q: queries[q] for q in qids}
    for name in reranked:
        mode = RERANKED[name]

        def search_batch(batch: list[str], k: int, mode: str = mode) -> Any:
            return searcher.search_batch(batch, k, mode=mode, rerank=args.rerank)

        tick = time.perf_counter()
        runs[name] = retrieve_run(search_batch, texts, k=depth, skip_self=args.skip_self, batch_size=args.batch_size,
                                  show_progress=True, desc=name)
        seconds[name] = time.perf_counter() - tick
    if "hybrid+rerank" in reranked:
        config = searcher.hybrid_config
        print(f"hybrid+rerank: first stage = the searcher's hybrid, weight {config.weight:.2f} on DSSM "
              f"({'stored in the index' if searcher.stored_hybrid_config is not None else 'the default'})",
              file=sys.stderr)
    reranker = searcher.reranker
    return {"rerank": args.rerank, "reranked_per_query": max(args.rerank, fetch), "index_version": searcher.version,
            "fusion": {RERANKED[name]: reranker.weight(RERANKED[name]) for name in reranked},
            "first_stage": {name: f"Searcher.search_batch mode={RERANKED[name]}" for name in reranked}}


def _report(args: argparse.Namespace, systems: Sequence[str], runs: dict[str, Any], seconds: dict[str, float],
            dataset: Any, qids: list[str], *, n_run: Mapping[str, int], metrics: Sequence[str],
            extra: Mapping[str, Any], data_dir: Path) -> None:
    """Score the evaluated queries, print the table and p-values, write ``--json`` and ``--report``.

    ``extra``: more report entries (``hybrid_tuning``, ``rerank``); ``None`` values are left out.
    """
    eval_set = set(qids)
    sel_qrels = {q: dataset.qrels[q] for q in qids}
    results = []
    for name in systems:
        run = {q: hits for q, hits in runs[name].items() if q in eval_set}
        runs[name] = run
        results.append(evaluate_run(name, run, sel_qrels, metrics=metrics))
        print(f"{name}: {seconds[name]:.1f} s for {n_run[name]} queries "
              f"({n_run[name] / max(seconds[name], 1e-9):.0f} queries/s)", file=sys.stderr)
    tests = significance(results, trials=args.trials) if len(results) > 1 else {}
    docs = len(dataset.corpus)
    print(format_table(results, queries=len(qids), docs=docs))
    for pair, values in tests.items():
        a, _, b = pair.partition(" vs ")
        if "bm25" in (a, b) or pair == "dssm vs dssm-exact" or f"{a}+rerank" == b:
            print(f"p({pair}, {metrics[0]}) = {values[metrics[0]]:.4g}")
    report = report_dict(results, queries=len(qids), docs=docs)
    if len(results) > 1:
        report["significance"] = tests
        report["significance_trials"] = args.trials
    report.update({key: value for key, value in extra.items() if value is not None})
    if args.json:
        write_json_atomic(Path(args.json), report)
    if args.report:
        written = write_report(Path(args.report), results=results, runs={name: runs[name] for name in systems},
                               qrels=sel_qrels, report=report, title=f"dssm eval on {data_dir.name}")
        print(f"report: {len(written)} files in {args.report}", file=sys.stderr)
