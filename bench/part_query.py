"""query: text → top-10 latency, in process and over HTTP (1, 8, 64 clients), beside bm25s on the same corpus.

Corpus: quora-dev's 19,056 questions (quick: the first 2,000), indexed as ``dssm index`` would
(``serving.index.build_index``: exact ScaNN under 20k documents, doc store, BM25 state) with the
default-shape model exported with its initial weights (latency does not depend on the weights).
Queries: quora-dev's 4,709 query texts, the same for every system.

* in process: :func:`bench.load_test.in_process` (``Searcher.search(text, k=10)``, one query at a
  time: featurize + query tower + ScaNN + doc store);
* over HTTP: ``dssm serve`` on loopback in a child process, :func:`bench.load_test.http_scenario`'s
  closed-loop clients (1, 8, 64), single-query ``POST /v1/search``; the peer is the in-process figure,
  so the ratio is what HTTP and concurrency add;
* bm25s: the same corpus indexed by ``bm25s`` as its README does it (``bm25s.tokenize`` with English
  stop words and the Snowball stemmer, ``BM25().index``), one query at a time, tokenize + ``retrieve(k=10)``
  on one thread.

Every scenario runs ``repeats`` times after a warm-up (each run bounded by a request count and
seconds); a figure is the median of the runs' p50 (or p99), with min and max.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import DATASETS, Figure, Stats, corpus_texts, export_untrained_model

__all__ = ["run", "bm25s_latencies", "start_server"]

CLIENTS = (1, 8, 64)


def _queries() -> list[str]:
    with open(DATASETS / "quora-dev" / "queries.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def bm25s_latencies(texts: list[str], queries: list[str], *, requests: int, seconds: float,
                    repeats: int) -> list[tuple[float, float]]:
    """``(p50_ms, p99_ms)`` of single bm25s queries (tokenize + retrieve top 10), per run, after a warm-up."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    k = min(10, len(texts))

    def search(query: str) -> Any:
        tokens = bm25s.tokenize([query], stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
        return retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)

    for q in queries[:50]:
        search(q)
    runs = []
    for repeat in range(repeats):
        latencies, start, i = [], time.perf_counter(), repeat * requests
        while len(latencies) < requests and time.perf_counter() - start < seconds:
            tick = time.perf_counter()
            search(queries[i % len(queries)])
            latencies.append(time.perf_counter() - tick)
            i += 1
        ms = np.asarray(latencies) * 1e3
        runs.append((float(np.percentile(ms, 50)), float(np.percentile(ms, 99))))
    return runs


def start_server(index_dir: Path, port: int) -> subprocess.Popen:
    """``dssm serve`` on 127.0.0.1:``port`` (64 in flight, 1 TF thread), ready; see bench.load_test.start_server."""
    from bench import load_test

    return load_test.start_server(index_dir, port, max_in_flight=64)


def _in_process_runs(load_test: Any, index_dir: Path, queries: list[str], *, requests: int, seconds: float,
                     repeats: int) -> list[dict[str, Any]]:
    """load_test.in_process's single-query rows, ``repeats`` of them (its ``repeats=`` where it has one)."""
    if "repeats" in inspect.signature(load_test.in_process).parameters:
        rows = load_test.in_process(index_dir, queries, requests=requests, seconds=seconds, batch=32, repeats=repeats)
    else:  # the load test before it repeated scenarios itself
        rows = [row for _ in range(repeats)
                for row in load_test.in_process(index_dir, queries, requests=requests, seconds=seconds, batch=32)]
    return [r for r in rows if r["scenario"] == "in-process single"]


def _http_run(load_test: Any, port: int, queries: list[str], *, clients: int, requests: int, seconds: float,
              server_pid: int, seed: int) -> dict[str, Any]:
    """One run of load_test's HTTP scenario (single queries); adapts to the older ``_http_scenario(url, ...)``."""
    if hasattr(load_test, "http_scenario"):
        return asyncio.run(load_test.http_scenario("127.0.0.1", port, queries, clients=clients, batch=1,
                                                   requests=requests, seconds=seconds, server_pid=server_pid,
                                                   seed=seed))
    return asyncio.run(load_test._http_scenario(f"http://127.0.0.1:{port}", queries, clients=clients,  # noqa: SLF001
                                                batch=1, requests=requests, seconds=seconds))


def _stats(rows: list[dict[str, Any]], key: str) -> Stats:
    return Stats.of([r[key] for r in rows])


def run(*, quick: bool) -> list[Figure]:
    """In-process and HTTP latency of our search, and bm25s's, on one corpus and one query set."""
    import dssm  # noqa: F401
    from bench import load_test
    from dssm.export import load_encoder
    from serving.index import build_index

    docs = 2_000 if quick else None
    repeats = 2 if quick else 3
    requests, seconds = (200, 3.0) if quick else (2000, 10.0)
    ids, texts = corpus_texts("quora-dev", docs)
    queries = _queries()
    work = Path(tempfile.mkdtemp(prefix="bench-query-"))
    server = None
    try:
        model_dir = export_untrained_model(work / "model")
        embeddings = load_encoder(model_dir).embed_documents(texts)
        build_index(work / "index", embeddings=embeddings, ids=ids, texts=texts, model_dir=model_dir)
        single = _in_process_runs(load_test, work / "index", queries, requests=requests, seconds=seconds,
                                  repeats=repeats)
        print(f"  in process: {json.dumps(single)}", flush=True)
        bm25 = bm25s_latencies(texts, queries, requests=requests, seconds=seconds, repeats=repeats)
        print(f"  bm25s: {bm25}", flush=True)

        port = load_test._free_port()  # noqa: SLF001 - the load test's own helper
        server = start_server(work / "index", port)
        _http_run(load_test, port, queries, clients=4, requests=300, seconds=5, server_pid=server.pid,
                  seed=99)  # warm-up
        http: dict[int, list[dict[str, Any]]] = {c: [] for c in CLIENTS}
        for repeat in range(repeats):
            for clients in CLIENTS:
                row = _http_run(load_test, port, queries, clients=clients, requests=requests, seconds=seconds,
                                server_pid=server.pid, seed=repeat)
                print(f"  http: {json.dumps(row)}", flush=True)
                if not row["requests"] or row["errors"]:
                    raise RuntimeError(f"HTTP scenario with {clients} clients failed: {row}")
                http[clients].append(row)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    corpus = f"{len(texts):,} quora-dev questions"
    bm25_name = "bm25s (stemmed, stop words), tokenize + retrieve, 1 thread"
    figures = [
        Figure("query", f"text → top-10 in process, p50, {corpus}", "ms", _stats(single, "p50_ms"), bm25_name,
               Stats.of([p50 for p50, _ in bm25]), higher_is_better=False,
               note="Searcher.search: featurize + query tower + ScaNN (exact) + doc store"),
        Figure("query", f"text → top-10 in process, p99, {corpus}", "ms", _stats(single, "p99_ms"), bm25_name,
               Stats.of([p99 for _, p99 in bm25]), higher_is_better=False),
    ]
    for clients in CLIENTS:
        rows_c = http[clients]
        qps = Stats.of([r["queries_per_s"] for r in rows_c])
        shed = sum(r["shed_429"] for r in rows_c)
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            figures.append(Figure(
                "query", f"text → top-10 over HTTP, {clients} client{'s' if clients > 1 else ''}, {label}", "ms",
                _stats(rows_c, key), f"in process, {label}", _stats(single, key), higher_is_better=False,
                note=f"{qps.median:,.0f} queries/s" + (f", {shed} answered 429" if shed else "")
                if key == "p50_ms" else ""))
    return figures
