"""Writes through HTTP while clients search (issue 14): a ``dssm serve`` on 127.0.0.1, one writer, 8 searchers.

First 20 one-document ``PUT /v1/documents`` one after the other, nothing else running (p50, p99); then
two phases against the same server, ``seconds`` and ``write_seconds`` long:

* **idle**: 8 clients send single searches (``POST /v1/search``, k=10) back to back, and one client
  fetches documents (``GET /v1/documents/{id}``) back to back;
* **writes**: the same, while one writer (its own process) ``PUT``s batches of ``batch`` new documents
  as fast as the service answers (each answer means the new version is live).

Reported: search p99 in each phase, document GET p99 in each phase, and the writer's documents/s. The
writes phase should span several compactions (one per ``max_delta / 2`` documents: 10,000 at 100k), so
that the rate is a sustained one, compactions included.
Targets (issue 14): ≥ 1,000 documents/s; search p99 during writes ≤ 2× idle; GET p99 during writes
≤ 20 ms. The searchers and the GET client share one asyncio loop on raw HTTP/1.1 connections
(``bench.load_test._Connection``), so the client costs little CPU; the writer is an httpx
:class:`serving.client.SearchClient` in a child process (in a thread it shared their interpreter
lock, and the figure measured the client).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["measure", "writer_main"]

_KEY = "bench-write-key"


async def _clients(port: int, queries: list[str], ids: list[str], *, seconds: float, searchers: int
                   ) -> tuple[list[float], list[float], int]:
    """(search latencies, GET latencies, errors) of ``searchers`` search clients and one GET client."""
    from bench.load_test import _Connection, _request

    host = f"127.0.0.1:{port}"
    search_ms: list[float] = []
    get_ms: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def search(worker: int) -> None:
        nonlocal errors
        conn, i = _Connection("127.0.0.1", port), worker
        while time.perf_counter() < deadline:
            request = _request("/v1/search", {"query": queries[i % len(queries)], "k": 10}, host)
            tick = time.perf_counter()
            status = await conn.post(request)
            search_ms.append((time.perf_counter() - tick) * 1e3)
            errors += status != 200
            i += searchers
        conn.close()

    async def fetch() -> None:
        nonlocal errors
        conn, rng = _Connection("127.0.0.1", port), np.random.default_rng(0)
        while time.perf_counter() < deadline:
            doc_id = ids[int(rng.integers(len(ids)))]
            request = f"GET /v1/documents/{doc_id} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            tick = time.perf_counter()
            status = await conn.post(request)
            get_ms.append((time.perf_counter() - tick) * 1e3)
            errors += status != 200
        conn.close()

    await asyncio.gather(*(search(w) for w in range(searchers)), fetch())
    return search_ms, get_ms, errors


def _writer(url: str, texts: list[str], *, batch: int, seconds: float) -> dict[str, Any]:
    """Upsert batches of new documents back to back for ``seconds``: {docs, seconds, batch_ms}."""
    from serving.client import SearchClient

    client = SearchClient(url, api_key=_KEY, timeout=120.0)
    written, i, start = 0, 0, time.perf_counter()
    latencies = []
    while time.perf_counter() - start < seconds and i + batch <= len(texts):
        tick = time.perf_counter()
        client.upsert([(f"h{i + j}", "", texts[i + j]) for j in range(batch)])
        latencies.append((time.perf_counter() - tick) * 1e3)
        written += batch
        i += batch
    return {"docs": written, "seconds": time.perf_counter() - start, "batch_ms": latencies}


def writer_main(argv: list[str]) -> None:
    """The writer in its own process (so the searching clients' event loop does not slow it):
    ``URL SECONDS BATCH TEXTS_JSON_FILE``; prints its result as JSON."""
    url, seconds, batch, path = argv
    texts = json.loads(Path(path).read_text())
    print(json.dumps(_writer(url, texts, batch=int(batch), seconds=float(seconds))))


def measure(index_dir: Path, *, queries: list[str], ids: list[str], texts: list[str], seconds: float,
            write_seconds: float | None = None, batch: int = 100, searchers: int = 8) -> dict[str, Any]:
    """Run both phases against a fresh ``dssm serve`` of ``index_dir``; the figures as a dict."""
    write_seconds = seconds if write_seconds is None else write_seconds
    from bench.load_test import _free_port, _run_async, start_server

    port = _free_port()
    server = start_server(index_dir, port, server_args=("--api-key", _KEY))
    url = f"http://127.0.0.1:{port}"
    try:
        _run_async(_clients(port, queries, ids, seconds=2.0, searchers=searchers))  # warm-up
        from serving.client import SearchClient

        # A worker's first write loads the document tower's graph (seconds): not part of the steady state.
        single = SearchClient(url, api_key=_KEY, timeout=120.0)
        single.upsert([("warm-up", "", texts[-1])])
        put_ms = []
        for i in range(20):  # one-document PUTs, nothing else running
            tick = time.perf_counter()
            single.upsert([(f"one{i}", "", texts[-2 - i])])
            put_ms.append((time.perf_counter() - tick) * 1e3)
        idle_search, idle_get, idle_errors = _run_async(_clients(port, queries, ids, seconds=seconds,
                                                                 searchers=searchers))
        texts_file = index_dir.parent / "write-texts.json"
        texts_file.write_text(json.dumps(texts))
        writer = subprocess.Popen([sys.executable, "-c", "import sys; from bench.write_http import writer_main; "
                                   "writer_main(sys.argv[1:])", url, str(write_seconds), str(batch), str(texts_file)],
                                  stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
        busy_search, busy_get, busy_errors = _run_async(_clients(port, queries, ids, seconds=write_seconds,
                                                                 searchers=searchers))
        out, _ = writer.communicate(timeout=write_seconds + 300)
        wrote = json.loads(out.strip().splitlines()[-1])
        import httpx

        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=60)
    swaps = [line for line in metrics.splitlines() if line.startswith(("dssm_index_swaps_total",
                                                                       "dssm_index_compactions_total"))]
    p = np.percentile
    result = {
        "idle_search_p50_ms": float(p(idle_search, 50)), "busy_search_p50_ms": float(p(busy_search, 50)),
        "idle_search_p99_ms": float(p(idle_search, 99)), "busy_search_p99_ms": float(p(busy_search, 99)),
        "idle_get_p99_ms": float(p(idle_get, 99)), "busy_get_p99_ms": float(p(busy_get, 99)),
        "put_p50_ms": float(p(put_ms, 50)), "put_p99_ms": float(p(put_ms, 99)),
        "write_docs_per_s": wrote["docs"] / wrote["seconds"], "docs_written": wrote["docs"],
        "write_batch_p50_ms": float(p(wrote["batch_ms"], 50)) if wrote["batch_ms"] else None,
        "write_batch_p99_ms": float(p(wrote["batch_ms"], 99)) if wrote["batch_ms"] else None,
        "write_batch_max_ms": max(wrote["batch_ms"], default=None), "write_seconds": wrote["seconds"],
        "searches": [len(idle_search), len(busy_search)], "errors": idle_errors + busy_errors, "swaps": swaps,
    }
    print(f"  http: {json.dumps(result)}", flush=True)
    return result
