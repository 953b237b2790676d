"""Screen a lever of issue 11: a document scored by its whole cosine *plus* its best window's (MaxP).

``python -m bench.passage_screen --model MODEL --data BEIR_DIR [--pairs PAIRS_TSV | --holdout PAIRS_DIR
--skip-self] [--window 8] [--stride 4] [--bm25-k1 1.5 --bm25-b 0.75] [--weight 0.4] [--out FILE.json]``

The towers embed a long document into one vector, in which a short query's few matching words are
diluted by every other word. This screen cuts each document into windows of ``--window`` words
(``--stride`` apart; a document no longer than a window is one window), embeds them with the same
document tower, and scores a (query, document) pair as ``cos(q, d) + max_window cos(q, w)``. Nothing
here is built into the index: it measures, by exact search over the whole corpus, whether the lever
is worth one (what it would need: docs/quality.md, "Windows of a document").

Systems (every one on the same queries, exact scores, ties by corpus order):

* ``dssm``: the document's cosine, what the index ranks by.
* ``dssm+windows``: cosine + best window's cosine, every document scored.
* ``dssm+windows@100``: the same, re-scoring only the ``dssm`` top 100 (what an index would do over
  its ANN candidates); the others keep their order below them.
* ``bm25`` (``--bm25-k1``/``--bm25-b``: give the index's ``bm25/params.json`` settings to match it),
  ``hybrid`` (``w · minmax(dssm) + (1 − w) · minmax(bm25)`` over the union of both top 100, as
  :func:`dssm.hybrid.rank_candidates`; ``--weight`` is the index's ``hybrid.json`` weight) and
  ``hybrid+windows`` (the same with ``dssm+windows`` as the dense score; ``hybrid+windows@100``: the
  dense candidates are still ``dssm``'s top 100, as an index's ANN would give them).

Queries: the BEIR directory's judged queries (``--holdout``/``--skip-self`` as ``dssm eval``'s, for a
Quora-style view), or with ``--pairs`` a labelled pairs table's validation
split (the rows ``dssm pairs`` would put there: :func:`dssm.data.split_of` of the query with
``--validation-fraction``), each pair's ``--doc-id-column`` the one relevant document. The second is
training data, so a choice may be made on it; the first is evaluated data and only describes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from dssm.bm25 import BM25Config, BM25Index
from dssm.data import document_text, holdout_filter, iter_rows, read_beir, split_of
from dssm.errors import InputError
from dssm.hybrid import rank_candidates
from dssm.metrics import evaluate_run, format_table, paired_randomization_test, select_queries
from dssm.windows import window_texts

__all__ = ["window_texts", "best_window_scores", "screen", "main"]

CANDIDATES = 100


def best_window_scores(queries: np.ndarray, windows: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Each document's best window cosine per query.

    Args:
        queries: [q, dim] unit query vectors.
        windows: [m, dim] unit window vectors, every document's windows contiguous, in document order.
        owners: [m] int the document row of each window (non-decreasing, every row from 0 present).

    Returns:
        [q, n] float32, n = owners[-1] + 1.
    """
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    return np.maximum.reduceat(queries @ windows.T, starts, axis=1)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


def _hybrid_top(dense: np.ndarray, sparse: np.ndarray, *, weight: float, k: int,
                candidates_by: np.ndarray | None = None) -> np.ndarray:
    """The hybrid's top ``k``, ranked as search ranks (:func:`dssm.hybrid.rank_candidates`); its dense
    candidates are ``candidates_by``'s top 100 (default: ``dense``'s)."""
    rows = np.union1d(_top(dense if candidates_by is None else candidates_by, CANDIDATES), _top(sparse, CANDIDATES))
    return rank_candidates(rows, dense[rows], sparse[rows], weight=weight, normalization="minmax", k=k)[0]


def _rescored_top(whole: np.ndarray, combined: np.ndarray, k: int) -> np.ndarray:
    candidates = _top(whole, CANDIDATES)
    order = candidates[np.lexsort((candidates, -combined[candidates]))]
    return order[:k]


def screen(*, embed_documents: Callable[[list[str]], np.ndarray], embed_queries: Callable[[list[str]], np.ndarray],
           texts: Sequence[str], ids: Sequence[str], queries: Mapping[str, str],
           qrels: Mapping[str, Mapping[str, float]], bm25: BM25Index, window: int, stride: int, weight: float,
           k: int = 10, skip_self: bool = False, batch: int = 256) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """Every system's top ``k`` for every query (the module docstring says what each system is).

    Args:
        embed_documents: texts -> [len, dim] unit document-tower vectors.
        embed_queries: texts -> [len, dim] unit query-tower vectors.
        texts: the corpus's documents, row order; ``ids`` their ids.
        queries: qid -> text, ``qrels`` qid -> {doc id: grade}; queries without judgements are skipped.
        bm25: a BM25 index of ``texts`` (same rows).
        window, stride: see :func:`window_texts`.
        weight: the hybrid's share of the dense side.
        skip_self: a query's own id is not a hit (Quora's retrieval view holds every question as a document).

    Returns:
        ``{system: {qid: [(doc id, rank score)]}}``, the rank score ``k - rank`` (the order is what counts).
    """
    owners, pieces = [], []
    for row, text in enumerate(texts):
        cut = window_texts(text, window=window, stride=stride)
        owners += [row] * len(cut)
        pieces += cut
    documents, windows = embed_documents(list(texts)), embed_documents(pieces)
    qids = [q for q in qrels if q in queries]
    runs: dict[str, dict[str, list[tuple[str, float]]]] = {}

    depth = k + 1 if skip_self else k

    def put(system: str, qid: str, rows: np.ndarray) -> None:
        hits = [ids[r] for r in rows if not (skip_self and ids[r] == qid)][:k]
        runs.setdefault(system, {})[qid] = [(doc, float(k - i)) for i, doc in enumerate(hits)]

    for start in range(0, len(qids), batch):
        chunk = qids[start:start + batch]
        vectors = embed_queries([queries[q] for q in chunk])
        whole = vectors @ documents.T
        combined = whole + best_window_scores(vectors, windows, np.asarray(owners))
        for j, qid in enumerate(chunk):
            sparse = bm25.scores(queries[qid])
            put("dssm", qid, _top(whole[j], depth))
            put("dssm+windows", qid, _top(combined[j], depth))
            put("dssm+windows@100", qid, _rescored_top(whole[j], combined[j], depth))
            put("bm25", qid, _top(sparse, depth))
            put("hybrid", qid, _hybrid_top(whole[j], sparse, weight=weight, k=depth))
            put("hybrid+windows", qid, _hybrid_top(combined[j], sparse, weight=weight, k=depth))
            put("hybrid+windows@100", qid, _hybrid_top(combined[j], sparse, weight=weight, k=depth,
                                                         candidates_by=whole[j]))
    return runs


def validation_queries(pairs: str | Path, *, corpus_ids: set[str], fraction: float, query_column: str = "query",
                       doc_id_column: str = "doc_id") -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """A labelled pairs table's validation split as queries and qrels (pairs whose document is in the corpus).

    Raises:
        InputError: a row without the columns, or no validation pair left.
    """
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, float]] = {}
    for row in iter_rows(pairs):
        query, doc_id = row.fields.get(query_column), row.fields.get(doc_id_column)
        if row.error is not None or query is None or doc_id is None:
            raise InputError(f"{row.location}: needs columns {query_column!r} and {doc_id_column!r} "
                             f"({row.error or 'missing'})")
        if split_of(str(query), validation_fraction=fraction) == "validation" and str(doc_id) in corpus_ids:
            qid = f"validation-{len(queries)}"
            queries[qid], qrels[qid] = str(query), {str(doc_id): 1.0}
    if not queries:
        raise InputError(f"{pairs}: no validation pair (fraction {fraction}) whose document is in the corpus")
    return queries, qrels


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.passage_screen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (dssm train / dssm lsa / dssm select)")
    parser.add_argument("--data", required=True, type=Path, help="BEIR directory (corpus.jsonl, queries, qrels)")
    parser.add_argument("--pairs", default=None, help="labelled pairs table: score its validation split instead")
    parser.add_argument("--validation-fraction", type=float, default=0.05, help="as `dssm pairs` (default 0.05)")
    parser.add_argument("--holdout", default=None, metavar="PAIRS_DIR", help="judged queries in this `dssm pairs` "
                        "output's validation split only (as `dssm eval --holdout`)")
    parser.add_argument("--skip-self", action="store_true", help="a query's own id is not a hit (as `dssm eval`)")
    parser.add_argument("--window", type=int, default=8, help="words per window (default 8)")
    parser.add_argument("--stride", type=int, default=4, help="words between window starts (default 4)")
    parser.add_argument("--bm25-k1", type=float, default=BM25Config().k1)
    parser.add_argument("--bm25-b", type=float, default=BM25Config().b)
    parser.add_argument("--weight", type=float, default=0.4, help="the hybrid's dense share (default 0.4)")
    parser.add_argument("--out", type=Path, default=None, help="write the means and p-values here as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the screen; print the table and the paired p-values (and with ``--out`` write them as JSON)."""
    from dssm.export import load_encoder  # deferred: TensorFlow

    args = _parser().parse_args(argv)
    data = read_beir(args.data)
    ids = list(data.corpus)
    texts = [document_text(d.title, d.text) for d in data.corpus.values()]
    queries, qrels = data.queries, data.qrels
    if args.holdout:
        keep = select_queries(queries, qrels, keep=holdout_filter(args.holdout))
        queries, qrels = {q: queries[q] for q in keep}, {q: qrels[q] for q in keep}
    if args.pairs:
        queries, qrels = validation_queries(args.pairs, corpus_ids=set(ids), fraction=args.validation_fraction)
    encoder = load_encoder(args.model)
    bm25 = BM25Index.build(ids, texts, config=BM25Config(k1=args.bm25_k1, b=args.bm25_b))
    runs = screen(embed_documents=encoder.embed_documents, embed_queries=encoder.embed_queries, texts=texts,
                  ids=ids, queries=queries, qrels=qrels, bm25=bm25, window=args.window, stride=args.stride,
                  weight=args.weight, skip_self=args.skip_self)
    results = [evaluate_run(name, run, qrels, metrics=("ndcg@10", "mrr@10", "recall@10")) for name, run in runs.items()]
    by_name = {r.name: r for r in results}
    p_values = {f"{b} vs {a}": paired_randomization_test(by_name[a].per_query["ndcg@10"],
                                                          by_name[b].per_query["ndcg@10"])
                for a, b in (("dssm", "dssm+windows"), ("dssm", "dssm+windows@100"), ("hybrid", "hybrid+windows"),
                             ("hybrid", "hybrid+windows@100"))}
    report = {"model": str(args.model), "data": str(args.data), "pairs": args.pairs, "window": args.window,
              "stride": args.stride, "bm25": {"k1": args.bm25_k1, "b": args.bm25_b}, "weight": args.weight,
              "queries": len(next(iter(runs.values()))), "means": {r.name: r.means for r in results},
              "p_ndcg@10": p_values}
    print(format_table(results, queries=report["queries"], docs=len(ids)))
    for name, p in p_values.items():
        print(f"p({name}, ndcg@10) = {p:.4g}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
