"""Writes through HTTP while clients search (issue 14): a ``dssm serve`` on 127.0.0.1, one writer, 8 searchers.

First 20 one-document ``PUT /v1/documents`` one after the other, nothing else running (p50, p99); then
five phases against the same server, ``seconds``, ``write_seconds``, ``seconds``, ``write_seconds`` and
``write_seconds`` long:

* **idle**: 8 clients send single searches (``POST /v1/search``, k=10) back to back, and one client
  fetches documents (``GET /v1/documents/{id}``) back to back;
* **paced writes**: the same, while one writer (its own process) ``PUT``s batches of ``batch`` new
  documents at ``rate`` documents/s (a batch every ``batch / rate`` s, sent at its slot on up to
  ``PACED_IN_FLIGHT`` connections whether or not the previous one was answered: an open loop
  since 2026-12-07; each answer means the new version is live). The search and GET tails of this
  phase are the figures the targets speak of: search p99 *while 1,000 documents/s are written* ≤ 2×
  idle, GET p99 then ≤ 20 ms. Its achieved rate is below ``rate`` when the service cannot keep up
  even with batches overlapping (``late_batches`` counts slots that found every connection busy).
  Until 2026-12-07 the writer waited for each answer before the next slot, so one slow batch (a swap
  behind a compaction) lowered the rate the phase imposed: at 1M it reached 856 documents/s of 1,000;
* **idle again**: every write folded into the base (:func:`settle`: compactions until the live version
  has no delta, then the service swaps it in), the idle phase once more on the grown index. The paced
  phase's tail is compared with the p99 of both idle phases' searches together, so that neither the
  host's drift between two windows a minute apart (the idle p99 alone moved by up to 40% between runs
  here) nor the index's growth during the writes (100k → ~160k documents) counts as the writes' cost.
  The idle p99 before the writes alone is reported too (``idle_search_p99_ms``: the figure until
  2026-12-07);
* **unthrottled writes**: the writer sends its next batch as soon as the last one is answered; the
  rate reached is the service's sustained write capacity beside searches (target ≥ 1,000 documents/s),
  and the search tail then is reported too (the searchers' price of writing as fast as possible);
* **concurrent writes**: ``concurrent`` writers (4), each as the unthrottled one: what a service with
  several writing clients sustains, where the writes queued behind a running one share its successor's
  version (group commit, :mod:`serving.group_commit`; ``merged`` counts the writes that shared one).

Until 2026-12-06 there was no paced phase: the search tail was measured beside the unthrottled
writer, so every gain in write speed made the search figure worse (at 100k, 1,648 documents/s made
search p99 3.6× idle), and it answered another question than the target's.

Each writes phase should span several compactions (one per ``max_delta / 2`` documents: 10,000 at 100k),
so that the rates are sustained ones, compactions included. The searchers and the GET client share one
asyncio loop on raw HTTP/1.1 connections (``bench.load_test._Connection``), so the client costs little
CPU; the writer is an httpx :class:`serving.client.SearchClient` in a child process (in a thread it
shared their interpreter lock, and the figure measured the client).
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["measure", "settle", "writer_main"]

_KEY = "bench-write-key"
#: Connections the paced writer may have waiting on answers at once (its batches overlap when one is slow).
PACED_IN_FLIGHT = 4


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


def _writer(url: str, texts: list[str], *, batch: int, seconds: float, rate: float, prefix: str) -> dict[str, Any]:
    """Upsert batches of new documents (ids ``prefix0``, ``prefix1``, ...) for ``seconds``: at ``rate``
    documents/s on a schedule (open loop), or back to back (0): {docs, seconds, batch_ms, ...}.

    Paced batches leave at their slot whether or not the previous one was answered, on up to
    :data:`PACED_IN_FLIGHT` connections: a closed-loop writer that waits for each answer caps the rate
    at one batch per latency, and a slow batch (a swap behind a compaction) then lowers the load the
    phase imposes, so the search tail would be measured at less than the rate it names (coordinated
    omission). When every connection is busy the next batch waits (``late``)."""
    from serving.client import SearchClient

    def send(client: SearchClient, first: int) -> float:
        tick = time.perf_counter()
        client.upsert([(f"{prefix}{first + j}", "", texts[first + j]) for j in range(batch)])
        return (time.perf_counter() - tick) * 1e3

    slots = len(texts) // batch
    start = time.perf_counter()
    if rate <= 0:
        client = SearchClient(url, api_key=_KEY, timeout=120.0)
        latencies = []
        while time.perf_counter() - start < seconds and len(latencies) < slots:
            latencies.append(send(client, len(latencies) * batch))
        return {"docs": len(latencies) * batch, "seconds": time.perf_counter() - start, "batch_ms": latencies}
    clients: queue.Queue[SearchClient] = queue.Queue()
    for _ in range(PACED_IN_FLIGHT):
        clients.put(SearchClient(url, api_key=_KEY, timeout=120.0))

    def paced(first: int) -> float:
        client = clients.get()  # blocks only when every connection is busy (counted as late below)
        try:
            return send(client, first)
        finally:
            clients.put(client)

    futures, late, interval = [], 0, batch / rate
    with ThreadPoolExecutor(max_workers=PACED_IN_FLIGHT) as pool:
        while len(futures) < slots and (slot := start + len(futures) * interval) - start < seconds:
            time.sleep(max(0.0, slot - time.perf_counter()))
            late += clients.empty()
            futures.append(pool.submit(paced, len(futures) * batch))
        latencies = [f.result() for f in futures]
    return {"docs": len(latencies) * batch, "seconds": time.perf_counter() - start, "batch_ms": latencies,
            "late_batches": late}


def writer_main(argv: list[str]) -> None:
    """The writer in its own process (so the searching clients' event loop does not slow it):
    ``URL SECONDS BATCH RATE PREFIX TEXTS_JSON_FILE``; prints its result as JSON."""
    url, seconds, batch, rate, prefix, path = argv
    texts = json.loads(Path(path).read_text())
    print(json.dumps(_writer(url, texts, batch=int(batch), seconds=float(seconds), rate=float(rate), prefix=prefix)))


def _writes_phase(port: int, url: str, queries: list[str], ids: list[str], texts_files: list[Path], *,
                  seconds: float, batch: int, rate: float, prefix: str, searchers: int) -> dict[str, Any]:
    """One writer process per texts file (each paced at ``rate``, or back to back at 0) beside the searching
    clients; the writers' documents/s added up."""
    writers = [subprocess.Popen([sys.executable, "-c", "import sys; from bench.write_http import writer_main; "
                                 "writer_main(sys.argv[1:])", url, str(seconds), str(batch), str(rate),
                                 f"{prefix}{w}-" if len(texts_files) > 1 else prefix, str(texts_file)],
                                stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
               for w, texts_file in enumerate(texts_files)]
    search_ms, get_ms, errors = _run_async_clients(port, queries, ids, seconds=seconds, searchers=searchers)
    wrote = [json.loads(writer.communicate(timeout=seconds + 300)[0].strip().splitlines()[-1]) for writer in writers]
    docs, spent = sum(w["docs"] for w in wrote), max(w["seconds"] for w in wrote)
    batch_ms = [ms for w in wrote for ms in w["batch_ms"]]
    p = np.percentile
    return {"search_p50_ms": float(p(search_ms, 50)), "search_p99_ms": float(p(search_ms, 99)),
            "get_p99_ms": float(p(get_ms, 99)), "docs_per_s": docs / spent, "writers": len(wrote),
            "docs_written": docs, "seconds": spent, "searches": len(search_ms), "errors": errors,
            "batch_p50_ms": float(p(batch_ms, 50)) if batch_ms else None,
            "batch_p99_ms": float(p(batch_ms, 99)) if batch_ms else None,
            "batch_max_ms": max(batch_ms, default=None),
            "late_batches": sum(w.get("late_batches", 0) for w in wrote),
            "in_flight": PACED_IN_FLIGHT if rate > 0 else 1}


def _counter(metrics: str, name: str) -> float:
    """A counter's value in the service's ``/metrics`` text (0 before it first counts)."""
    return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name)), 0.0)


def _compactions(url: str) -> float:
    """The service's background compactions so far (``dssm_index_compactions_total``)."""
    import httpx

    return _counter(httpx.get(url + "/metrics").text, "dssm_index_compactions_total")


def settle(index_dir: Path, url: str, *, timeout: float = 600.0) -> float:
    """Fold every pending write into the base and wait until the server serves that version; seconds taken.

    The idle baseline measured after the paced writes must describe the grown index at rest: no delta
    for every search to scan exactly, no compaction's CPU beside the searchers. A background compaction
    may still run when the writes stop (``compact_index`` then returns ``None``), so this compacts until
    the live version has no delta, then waits for the service's watcher to swap it in.
    """
    import httpx

    from dssm.artifacts import read_manifest
    from dssm.index import compact_index, current_version_dir
    from dssm.index.segments import SegmentLayout

    tick = time.perf_counter()
    while True:
        live = current_version_dir(index_dir)
        if SegmentLayout.of(read_manifest(live), live.name).plain:
            break
        if time.perf_counter() - tick > timeout:
            raise TimeoutError(f"{index_dir} still had a delta after {timeout:.0f} s of compactions")
        if compact_index(index_dir) is None:  # the service's compaction holds the slot: let it finish
            time.sleep(0.5)
    while httpx.get(url + "/readyz").json().get("version") != live.name:
        if time.perf_counter() - tick > timeout:
            raise TimeoutError(f"the service did not swap in {live.name} within {timeout:.0f} s")
        time.sleep(0.2)
    return time.perf_counter() - tick


def _run_async_clients(port: int, queries: list[str], ids: list[str], *, seconds: float, searchers: int
                       ) -> tuple[list[float], list[float], int]:
    from bench.load_test import _run_async

    return _run_async(_clients(port, queries, ids, seconds=seconds, searchers=searchers))


def measure(index_dir: Path, *, queries: list[str], ids: list[str], texts: list[str], seconds: float,
            write_seconds: float | None = None, batch: int = 100, rate: float = 1_000.0, searchers: int = 8,
            concurrent: int = 4) -> dict[str, Any]:
    """Run the phases against a fresh ``dssm serve`` of ``index_dir``; the figures as a dict.

    ``texts`` are split between the writers of the writes phases (ids ``p…`` paced, ``h…`` unthrottled,
    ``c<w>-…`` the ``concurrent`` writers), so every write adds a new document.
    """
    write_seconds = seconds if write_seconds is None else write_seconds
    from bench.load_test import _free_port, start_server

    port = _free_port()
    server = start_server(index_dir, port, server_args=("--api-key", _KEY))
    url = f"http://127.0.0.1:{port}"
    try:
        _run_async_clients(port, queries, ids, seconds=2.0, searchers=searchers)  # warm-up
        from serving.client import SearchClient

        # A worker's first write loads the document tower's graph (seconds): not part of the steady state.
        single = SearchClient(url, api_key=_KEY, timeout=120.0)
        single.upsert([("warm-up", "", texts[-1])])
        put_ms = []
        for i in range(20):  # one-document PUTs, nothing else running
            tick = time.perf_counter()
            single.upsert([(f"one{i}", "", texts[-2 - i])])
            put_ms.append((time.perf_counter() - tick) * 1e3)
        idle_search, idle_get, idle_errors = _run_async_clients(port, queries, ids, seconds=seconds,
                                                                searchers=searchers)
        share = (len(texts) - 21) // (2 + concurrent)
        phases: dict[str, Any] = {}
        for name, first, writers, phase_rate, prefix in (("paced", 0, 1, rate, "p"), ("unthrottled", 1, 1, 0.0, "h"),
                                                         ("concurrent", 2, concurrent, 0.0, "c")):
            files = []
            for w in range(writers):
                files.append(index_dir.parent / f"write-texts-{name}-{w}.json")
                files[-1].write_text(json.dumps(texts[(first + w) * share:(first + w + 1) * share]))
            before = _compactions(url)
            phases[name] = _writes_phase(port, url, queries, ids, files, seconds=write_seconds, batch=batch,
                                         rate=phase_rate, prefix=prefix, searchers=searchers)
            phases[name]["compactions"] = _compactions(url) - before  # started before the next phase, if any
            if name == "paced":  # the idle baseline again, on the grown index, before the next phase writes
                settle_s = settle(index_dir, url)
                after_search, after_get, after_errors = _run_async_clients(port, queries, ids, seconds=seconds,
                                                                           searchers=searchers)
                idle_errors += after_errors
        import httpx

        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=60)
    swaps = [line for line in metrics.splitlines() if line.startswith(("dssm_index_swaps_total",
                                                                       "dssm_index_compactions_total"))]
    merged = _counter(metrics, "dssm_merged_writes_total")
    p = np.percentile
    result = {
        "idle_search_p50_ms": float(p(idle_search, 50)), "idle_search_p99_ms": float(p(idle_search, 99)),
        "idle_get_p99_ms": float(p(idle_get, 99)), "idle_searches": len(idle_search),
        "idle_after_search_p99_ms": float(p(after_search, 99)), "idle_after_get_p99_ms": float(p(after_get, 99)),
        "idle_after_searches": len(after_search), "idle_seconds": seconds,
        "idle_both_search_p99_ms": float(p(idle_search + after_search, 99)),
        "idle_both_get_p99_ms": float(p(idle_get + after_get, 99)), "settle_s": settle_s,
        "put_p50_ms": float(p(put_ms, 50)), "put_p99_ms": float(p(put_ms, 99)), "rate": rate,
        "paced": phases["paced"], "unthrottled": phases["unthrottled"], "concurrent": phases["concurrent"],
        "errors": idle_errors + sum(ph["errors"] for ph in phases.values()), "swaps": swaps, "merged": merged,
    }
    print(f"  http: {json.dumps(result)}", flush=True)
    return result
