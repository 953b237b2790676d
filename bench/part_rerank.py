"""rerank: what the interaction re-ranker (issue 13) costs — 100 candidates for one query, and batch scoring.

Data: debian-dev (``DATASETS/debian-dev``): queries are package synopses (``queries.jsonl``), documents
the packages' long descriptions (``corpus.jsonl``, paragraphs of about 60 words, all under the
re-ranker's 200-word cut). Every candidate the re-ranker reads is a real document: the first stage's
top 100 for that query.

Model, index and re-rankers: the default-shape model exported with its initial weights
(:func:`bench.harness.export_untrained_model`), the whole corpus (34,090 documents) encoded and indexed
brute force (:func:`dssm.index.build_index`, ``ScannConfig(mode="brute_force")``: an untrained model's
near-tied embeddings would fail the ANN recall gate, and exact search is the first stage's upper
bound on cost at this size), and, for each design (``knrm``, ``conv-knrm``), a default-shape
re-ranker (``RerankConfig(design=...)``) started from the model's embedding table as ``dssm
train-reranker`` starts one but not trained (:func:`export_untrained_reranker`: the cost does not depend
on the weights), attached to the index with :func:`dssm.index.attach_reranker` (which also stores
every document's word ids for it, ``reranker/documents/``, as ``dssm attach-reranker`` does by
default) and loaded by ``Searcher.load`` as serving loads it. TensorFlow runs on one thread, as ``dssm serve`` runs each
worker (``--tf-threads 1``); the numpy path limits BLAS to one thread itself.

Figures per design, over ``QUERIES`` queries per run (after a warm-up), median of ``repeats`` runs with min
and max:

* re-rank 100 candidates for one query, p50 / p95 / p99: ``LoadedReranker.score(query, texts)`` on the
  texts of the query's first-stage top 100 (all but ~2% of debian-dev's documents are ASCII, which the
  numpy path, ``dssm.rerank_fast``, scores); beside it the first stage on the same queries,
  ``Searcher.search(text, k=100, mode="dense")`` (query tower + exact search + doc store). Target
  (issue 13): p50 ≤ 5 ms;
* the same through the SavedModel (the path of text with non-ASCII characters), p50 of one run;
* text → top 10 with ``rerank=100``, end to end (first stage + reading the candidates' texts +
  re-ranker + fusion), p50, beside the same search without ``rerank``;
* batch scoring throughput: ``LoadedReranker.score_pairs`` over every (query, candidate) pair of the
  runs' queries (``QUERIES`` × 100 pairs, in its batches of 512), in pairs/s. Target: ≥ 20,000 pairs/s.

Quick mode (a smoke check, not figures): the first 2,000 documents, 10 queries, a small model and a
small re-ranker.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import DATASETS, Figure, Stats, corpus_texts, export_untrained_model, measure

__all__ = ["run", "export_untrained_reranker", "read_queries", "latency_runs", "CANDIDATES", "QUERIES", "DATASET"]

DATASET = "debian-dev"
#: Candidates re-ranked per query (the issue's figure; ``dssm eval --rerank`` defaults to it too).
CANDIDATES = 100
#: Queries per latency run (full mode); their candidates are also the throughput's pairs.
QUERIES = 250
_PERCENTILES = (50, 95, 99)


def export_untrained_reranker(model_dir: Path, output: Path, *, config: Any = None,
                              corpus: Sequence[str] = ()) -> Path:
    """A re-ranker shaped by ``config`` (default ``RerankConfig()``) on ``model_dir``'s hashing, exported untrained.

    The recipe of ``dssm train-reranker``'s start (the tower's embedding table and bias as the word
    layer) without training or corpus idf; the head counts exact matches so scores are not all equal.
    Scoring costs the same whatever the weights are. As the trainer does, the vectors of the
    ``corpus``'s words are cached in the exported model (its serving path).
    """
    import dssm  # noqa: F401
    from dssm.export import SAVED_MODEL, read_model_configs
    from dssm.rerank import RerankConfig, Reranker
    from dssm.rerank_export import export_reranker

    import tensorflow as tf  # noqa: E402  isort: skip

    features, tower, _ = read_model_configs(model_dir)
    tf.keras.utils.set_random_seed(0)
    model = Reranker(config or RerankConfig(), feature_config=features, embedding_dim=tower.embedding_dim)
    model((tf.constant(["a"]), tf.constant(["b"])))  # build
    loaded = tf.saved_model.load(str(Path(model_dir) / SAVED_MODEL))
    model.init_from_tower(loaded.query_tower.bag.table, loaded.query_tower.bag_bias.numpy())
    model.head.kernel.assign(np.eye(model.head.kernel.shape[0], 1, dtype=np.float32))
    if corpus:
        words = {w for i in range(0, len(corpus), 1024)
                 for w in model.distinct_words(tf.constant(list(corpus[i:i + 1024]))).numpy().tolist()}
        model.cache_vocabulary(np.asarray(sorted(words), dtype=object))
    return export_reranker(model, output, fusion={"dense": 0.5, "bm25": 0.5, "hybrid": 0.5},
                           train={"untrained": "bench.part_rerank"}, history={}, overwrite=True)


def read_queries(name: str, limit: int) -> list[str]:
    """The first ``limit`` query texts of ``DATASETS/name/queries.jsonl``."""
    texts: list[str] = []
    with open(DATASETS / name / "queries.jsonl", encoding="utf-8") as handle:
        for line in handle:
            if len(texts) >= limit:
                break
            text = json.loads(line)["text"]
            if text.strip():
                texts.append(text)
    return texts


def _ms_since(tick: float) -> float:
    return (time.perf_counter() - tick) * 1e3


def _one_query(searcher: Any, text: str) -> tuple[dict[str, float], list[str]]:
    """Latencies (ms) of the four measured calls for one query, and the texts of its candidates."""
    tick = time.perf_counter()
    hits = searcher.search(text, k=CANDIDATES, mode="dense")
    first = _ms_since(tick)
    documents = searcher.document_texts([h.id for h in hits])
    tick = time.perf_counter()
    searcher.reranker.score(text, documents)
    rerank = _ms_since(tick)
    tick = time.perf_counter()
    searcher.search(text, k=10, mode="dense")
    plain = _ms_since(tick)
    tick = time.perf_counter()
    reranked = searcher.search(text, k=10, mode="dense", rerank=CANDIDATES)
    end_to_end = _ms_since(tick)
    if len(documents) != min(CANDIDATES, len(searcher)) or len(reranked) != min(10, len(searcher)):
        raise RuntimeError(f"query {text!r}: {len(documents)} candidates, {len(reranked)} re-ranked hits")
    return {"first": first, "rerank": rerank, "plain": plain, "end_to_end": end_to_end}, documents


def latency_runs(searcher: Any, queries: Sequence[str], *, repeats: int,
                 warmup: int) -> tuple[dict[str, list[dict[int, float]]], list[tuple[str, str]]]:
    """Per call kind, per run, the p50/p95/p99 in ms over ``queries``; and every (query, candidate) pair.

    Kinds: ``first`` (dense top 100), ``rerank`` (the re-ranker on those 100 texts), ``plain`` (top 10)
    and ``end_to_end`` (top 10 with ``rerank=100``).
    """
    for text in queries[:warmup]:
        _one_query(searcher, text)
    runs: dict[str, list[dict[int, float]]] = {"first": [], "rerank": [], "plain": [], "end_to_end": []}
    pairs: list[tuple[str, str]] = []
    for repeat in range(repeats):
        times: dict[str, list[float]] = {kind: [] for kind in runs}
        for text in queries:
            latencies, documents = _one_query(searcher, text)
            for kind, ms in latencies.items():
                times[kind].append(ms)
            if repeat == 0:
                pairs += [(text, doc) for doc in documents]
        for kind, values in times.items():
            runs[kind].append({p: float(np.percentile(values, p)) for p in _PERCENTILES})
    return runs, pairs


def _build(work: Path, *, quick: bool) -> tuple[Path, list[str], dict[str, Any]]:
    """Model and index of the corpus under ``work``; the model directory, the corpus texts and set-up facts."""
    from dssm.export import load_encoder
    from dssm.features import FeatureConfig
    from dssm.index import ScannConfig, build_index
    from dssm.model import ModelConfig

    if quick:
        model_dir = export_untrained_model(work / "model", feature_config=FeatureConfig(num_buckets=2**12),
                                           model_config=ModelConfig(embedding_dim=32, hidden_dims=(32,)))
    else:
        model_dir = export_untrained_model(work / "model")
    ids, texts = corpus_texts(DATASET, limit=2_000 if quick else None)
    tick = time.perf_counter()
    embeddings = load_encoder(model_dir).embed_documents(texts)
    encode_s = time.perf_counter() - tick
    build_index(work / "index", embeddings=embeddings, ids=ids, texts=texts, model_dir=model_dir,
                config=ScannConfig(mode="brute_force"))
    words = [len(t.split()) for t in texts]
    return model_dir, texts, {"documents": len(ids), "encode_seconds": round(encode_s, 1),
                              "mean_document_words": round(float(np.mean(words)), 1)}


def _attach(work: Path, model_dir: Path, texts: list[str], *, design: str, quick: bool) -> tuple[Any, dict[str, Any]]:
    """Attach an untrained ``design`` re-ranker to ``work/index``; the loaded ``Searcher`` and its shape."""
    from dssm.index import attach_reranker
    from dssm.rerank import RerankConfig
    from serving.searcher import Searcher

    config = RerankConfig(design=design, dim=16) if quick else RerankConfig(design=design)
    tick = time.perf_counter()
    attach_reranker(work / "index", export_untrained_reranker(model_dir, work / f"reranker-{design}", config=config,
                                                              corpus=texts))
    searcher = Searcher.load(work / "index")
    if searcher.reranker is None or searcher.reranker.fast is None:
        raise RuntimeError(f"the index at {work / 'index'} loaded without its re-ranker's numpy path")
    return searcher, {"design": design, "dim": config.dim, "kernels": config.kernels,
                      "max_document_words": config.max_document_words,
                      "reranker_seconds": round(time.perf_counter() - tick, 1)}


def _graph_p50(searcher: Any, pairs: list[tuple[str, str]]) -> Stats:
    """p50 (ms) of re-ranking each query's candidates through the SavedModel (the path of non-ASCII text)."""
    from dssm.rerank_export import load_reranker

    graph = load_reranker(searcher.reranker.directory, fast=False)
    by_query: dict[str, list[str]] = {}
    for query, document in pairs:
        by_query.setdefault(query, []).append(document)
    times = []
    for query, documents in by_query.items():
        tick = time.perf_counter()
        graph.score(query, documents)
        times.append(_ms_since(tick))
    return Stats.one(float(np.percentile(times[min(5, len(times) - 1):], 50)))


def _figures(runs: dict[str, list[dict[int, float]]], throughput: Stats, graph: Stats, *, setup: dict[str, Any],
             shape: dict[str, Any], queries: int, pairs: int) -> list[Figure]:
    def stats(kind: str, p: int) -> Stats:
        return Stats.of([run[p] for run in runs[kind]])

    design = shape["design"]
    label = (f"{queries} {DATASET} queries, {CANDIDATES} of {setup['documents']:,} docs "
             f"(~{setup['mean_document_words']:.0f} words) each")
    first = f"first stage: dense top-{CANDIDATES} (exact), p"
    figures = [
        Figure("rerank", f"re-rank {CANDIDATES} candidates for one query ({design}), p{p}", "ms", stats("rerank", p),
               f"{first}{p}", stats("first", p), higher_is_better=False,
               note=(f"LoadedReranker.score (numpy path, ASCII text), dim {shape['dim']}, {shape['kernels']} "
                     f"kernels, 1 thread; {label}; target p50 ≤ 5 ms") if p == 50 else "")
        for p in _PERCENTILES
    ]
    figures.append(Figure("rerank", f"re-rank {CANDIDATES} candidates ({design}), SavedModel path, p50", "ms", graph,
                          "numpy path, p50", stats("rerank", 50), higher_is_better=False,
                          note="the graph scores text with non-ASCII characters (one run over the same candidates)"))
    figures.append(Figure("rerank", f"text → top-10 with rerank={CANDIDATES} ({design}), end to end, p50", "ms",
                          stats("end_to_end", 50), "without rerank, p50", stats("plain", 50), higher_is_better=False,
                          note="Searcher.search: first stage + candidates' texts + re-ranker + fusion"))
    figures.append(Figure("rerank", f"batch scoring throughput ({design})", "pairs/s", throughput,
                          note=f"LoadedReranker.score_pairs over {pairs:,} (query, candidate) pairs, batches of "
                               "512; target ≥ 20,000 pairs/s"))
    return figures


def run(*, quick: bool) -> list[Figure]:
    """Per design: latency of re-ranking 100 real candidates beside the first stage's, and batch throughput."""
    import dssm  # noqa: F401
    from dssm.rerank import DESIGNS

    import tensorflow as tf  # noqa: E402  isort: skip

    # As `dssm serve` runs it (--tf-threads 1): the figures are one worker's work.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    repeats = 2 if quick else 3
    queries = read_queries(DATASET, 10 if quick else QUERIES)
    work = Path(tempfile.mkdtemp(prefix="bench-rerank-"))
    figures: list[Figure] = []
    try:
        model_dir, texts, setup = _build(work, quick=quick)
        print(f"  set-up: {json.dumps(setup)}", flush=True)
        for design in DESIGNS:
            searcher, shape = _attach(work, model_dir, texts, design=design, quick=quick)
            runs, pairs = latency_runs(searcher, queries, repeats=repeats, warmup=3 if quick else 20)
            print(f"  {design} latency (ms): {json.dumps(runs)}", flush=True)
            pair_queries, pair_documents = [q for q, _ in pairs], [d for _, d in pairs]
            throughput = measure(lambda: searcher.reranker.score_pairs(pair_queries, pair_documents),  # noqa: B023
                                 repeats=repeats, warmup=1, rate_of=len(pairs))
            print(f"  {design} score_pairs: {throughput.median:,.0f} pairs/s over {len(pairs):,} pairs", flush=True)
            graph = _graph_p50(searcher, pairs)
            figures += _figures(runs, throughput, graph, setup=setup, shape=shape, queries=len(queries),
                                pairs=len(pairs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures
