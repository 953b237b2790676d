"""Load test of the search service on loopback: p50/p99 latency and QPS at 1, 8 and 64 concurrent clients.

    python -m bench.load_test [--index INDEX_DIR | --model MODEL_DIR] [--docs 100000] [--clients 1 8 64] [--workers 2]
                              [--requests 5000] [--seconds 10] [--repeats 3] [--batch-size 32] [--json OUT]

Without ``--index`` it builds (once) a synthetic index of ``--docs`` documents (texts drawn from adi's
vocabulary, deterministic) with ``--model``'s document tower, or, without ``--model``, with a small
model trained here on adi's pairs, and keeps both under ``--workdir`` (default: a fixed directory in
the system temp dir), so later runs reuse them (``--rebuild`` starts over). ``--scann-mode auto`` (the
default) builds what ``dssm index`` builds for that many documents (tree + AH + reorder at 100k, with
``--reorder-k`` candidates re-scored so that recall@10 reaches ``--min-recall`` on these near-tied
synthetic embeddings); ``brute_force`` is exact search.

The server is ``dssm serve`` (``--workers`` processes) in a subprocess on 127.0.0.1. The load
generator is one asyncio process speaking plain HTTP/1.1 over one persistent connection per client
with pre-encoded bodies (no HTTP library on the client's hot path), because the two share the
machine's cores: a heavy client would measure itself. Each scenario is closed-loop (every client
sends its next request when the previous answer arrives), bounded by ``--requests`` and
``--seconds``, and repeated ``--repeats`` times; the table shows the median of the repeats. The CPU
time the generator and the server used during a scenario is reported next to it (seconds of CPU per
second of wall time; 2.0 = both cores), with the server's CPU time per answered request, which other
jobs on a shared machine move much less than they move latency.

Reports, per scenario (in-process Searcher, HTTP single query, HTTP batch): requests, errors (any
non-200 other than 429), deliberate 429s, p50/p99 latency in ms, requests/s and queries/s — as JSON
and as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

ROOT = Path(__file__).resolve().parent.parent
ADI = ROOT.parent / "shared" / "datasets" / "adi"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "dssm-load-test"

__all__ = ["synthetic_texts", "train_small_model", "build_synthetic_index", "untrained_synthetic_index",
           "http_scenario", "start_server", "main"]


def _vocabulary() -> list[str]:
    words: set[str] = set()
    with open(ADI / "corpus.jsonl") as handle:
        for line in handle:
            words.update(w for w in json.loads(line)["text"].lower().split() if w.isalpha())
    return sorted(words)


def synthetic_texts(n: int, *, seed: int = 0) -> list[str]:
    """``n`` texts of 8–40 words drawn from adi's vocabulary (deterministic)."""
    vocab = _vocabulary()
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 41, size=n)
    picks = rng.integers(0, len(vocab), size=int(lengths.sum()))
    texts, pos = [], 0
    for length in lengths:
        texts.append(" ".join(vocab[i] for i in picks[pos:pos + length]))
        pos += length
    return texts


def train_small_model(workdir: Path) -> Path:
    """The serving tests' recipe: adi pairs → 3 epochs of a 32-wide tower → exported model."""
    from dssm.export import export_model
    from dssm.model import ModelConfig
    from dssm.train import TrainConfig, train
    from pipelines.make_pairs import run as make_pairs

    if (workdir / "pairs").exists():
        shutil.rmtree(workdir / "pairs")
    make_pairs(["--input", str(ADI), "--output", str(workdir / "pairs"), "--validation-fraction", "0",
                "--num-buckets", "4096"])
    config = TrainConfig(epochs=3, batch_size=16, verbose=0)
    model, history = train(workdir / "pairs", model_config=ModelConfig(embedding_dim=32, hidden_dims=(32,)),
                           train_config=config)
    return export_model(model, workdir / "model", train_config=config, history=history, overwrite=True)


def build_synthetic_index(index_dir: Path, model_dir: Path, docs: int, *, scann_mode: str, reorder_k: int,
                          min_recall: float) -> tuple[list[str], dict[str, Any]]:
    """Encode ``docs`` synthetic texts with the model's document tower and build an index of them.

    A small model's embeddings of random-word texts are nearly tied, so the quantised modes need far
    more exactly re-scored candidates than real text does (``dssm index`` defaults to 100, which gives
    recall@10 about 0.7 here); ``reorder_k`` (default 1500) lets the build reach ``min_recall`` and the
    latency below is measured at that recall, not at a cheaper, worse one. Besides the build's own
    recall (document-derived queries) the setup reports recall@10 of the benchmark's queries against
    exact search.
    """
    from dssm.export import load_encoder
    from dssm.index import ScannConfig, build_index, load_index

    texts = synthetic_texts(docs)
    encoder = load_encoder(model_dir)
    tick = time.perf_counter()
    embeddings = encoder.embed_documents(texts)
    encode_s = time.perf_counter() - tick
    result = build_index(index_dir, embeddings=embeddings, ids=[f"s{i}" for i in range(docs)], texts=texts,
                         model_dir=model_dir,
                         config=ScannConfig(mode=scann_mode, reorder_k=reorder_k, min_recall=min_recall))
    build_seconds = {k: round(v, 2) for k, v in result.seconds.items()}
    queries = encoder.embed_queries(synthetic_texts(200, seed=1))
    exact = np.argpartition(-(queries @ embeddings.T), 9, axis=1)[:, :10]  # the top 10 as sets
    served, _ = load_index(index_dir).search_vectors(queries, 10)
    query_recall = float(np.mean([len(set(a) & set(b)) / 10
                                  for a, b in zip(served.tolist(), exact.tolist(), strict=True)]))
    return texts, {"documents": docs, "encode_seconds": round(encode_s, 2), "scann": result.scann,
                   "recall@10": result.recall_at_10, "query_recall@10": round(query_recall, 4),
                   "build_seconds": build_seconds}


def untrained_synthetic_index(work: Path, docs: int) -> tuple[Path, list[str], dict[str, Any]]:
    """The speed parts' set-up: the default-shape model with its initial weights in ``work/model`` and a
    ``docs``-document synthetic index of it in ``work/index`` (ScaNN ``auto``, 1,500 re-scored, recall
    gate 0.95); returns ``(index_dir, texts, setup)`` and prints the setup."""
    from bench.harness import export_untrained_model

    model_dir = export_untrained_model(work / "model")
    texts, setup = build_synthetic_index(work / "index", model_dir, docs, scann_mode="auto", reorder_k=1500,
                                         min_recall=0.95)
    print(f"  {docs:,}-document index: {json.dumps(setup)}", flush=True)
    return work / "index", texts, setup


def _reusable(path: Path, kind: str, check: Any = None) -> bool:
    from dssm.artifacts import read_manifest

    try:
        manifest = read_manifest(path)
    except Exception:  # noqa: BLE001 - anything unreadable is rebuilt
        return False
    return manifest.get("kind") == kind and (check is None or check(manifest))


def prepare_index(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The index to serve: ``--index``, or the synthetic one in ``--workdir`` (built when missing)."""
    from dssm.index import current_version_dir

    if args.index is not None:
        return args.index, {"index": str(args.index)}
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or workdir / "model"
    if args.model is None and (args.rebuild or not _reusable(model_dir, "model")):
        print(f"training a small model in {model_dir}", flush=True)
        train_small_model(workdir)
    index_dir = workdir / f"index-{args.docs}-{args.scann_mode}-r{args.reorder_k}"
    setup_file = index_dir / "bench-setup.json"

    def same(manifest: dict[str, Any]) -> bool:
        return manifest["counts"]["documents"] == args.docs

    reuse = not args.rebuild and setup_file.is_file()
    if reuse:
        try:
            reuse = _reusable(current_version_dir(index_dir), "index", same)
        except Exception:  # noqa: BLE001 - a broken index is rebuilt
            reuse = False
    if reuse:
        setup = json.loads(setup_file.read_text())
        print(f"reusing the {args.docs}-document synthetic index in {index_dir}", flush=True)
    else:
        if index_dir.exists():
            shutil.rmtree(index_dir)
        print(f"building a {args.docs}-document synthetic index in {index_dir}", flush=True)
        _, setup = build_synthetic_index(index_dir, model_dir, args.docs, scann_mode=args.scann_mode,
                                         reorder_k=args.reorder_k, min_recall=args.min_recall)
        setup_file.write_text(json.dumps(setup) + "\n")
    return index_dir, setup


# --------------------------------------------------------------------------------------------------
# Measurement


def _summary(name: str, latencies: list[float], *, seconds: float, errors: int, shed: int,
             queries_per_request: int, clients: int, cpu: dict[str, float] | None = None) -> dict[str, Any]:
    lat = np.asarray(latencies) * 1000.0
    done = len(latencies)
    row = {
        "scenario": name, "clients": clients, "requests": done, "errors": errors, "shed_429": shed,
        "p50_ms": round(float(np.percentile(lat, 50)), 3) if done else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 3) if done else None,
        "requests_per_s": round(done / seconds, 1) if seconds else None,
        "queries_per_s": round(done * queries_per_request / seconds, 1) if seconds else None,
        "seconds": round(seconds, 2),
    }
    row.update(cpu or {})
    return row


def in_process(index_dir: Path, queries: list[str], *, requests: int, seconds: float, batch: int,
               repeats: int, mode: str | None = None) -> list[dict]:
    """The Searcher called directly: one query at a time, then batches of ``batch``, ``repeats`` times.

    ``mode``: the search mode (``None``: the index's default search, what a client gets without one).
    """
    from serving.searcher import Searcher

    searcher = Searcher.load(index_dir)
    for q in queries[:50]:
        searcher.search(q, k=10, mode=mode)
    searcher.search_batch(queries[:batch], k=10, mode=mode)
    out = []
    for name, size in [("in-process single", 1), (f"in-process batch of {batch}", batch)] * repeats:
        latencies, i = [], 0
        cpu0, start = time.process_time(), time.perf_counter()
        while len(latencies) < requests and time.perf_counter() - start < seconds:
            chunk = [queries[(i + j) % len(queries)] for j in range(size)]
            tick = time.perf_counter()
            if size == 1:
                searcher.search(chunk[0], k=10, mode=mode)
            else:
                searcher.search_batch(chunk, k=10, mode=mode)
            latencies.append(time.perf_counter() - tick)
            i += size
        wall = time.perf_counter() - start
        out.append(_summary(name, latencies, seconds=wall, errors=0, shed=0, queries_per_request=size,
                            clients=1, cpu={"process_cpu": round((time.process_time() - cpu0) / wall, 2)}))
    return out


class _Connection:
    """One persistent HTTP/1.1 connection speaking just enough of the protocol for the load test."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> int:
        """Send a complete pre-encoded request; returns the status once the whole answer is read."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            raise ConnectionError(f"answer without Content-Length: {head[:200]!r}")
        length = int(lower[at + 17:lower.index(b"\r\n", at + 2)])
        await self.reader.readexactly(length)
        if b"\r\nconnection: close" in lower:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _request(path: str, body: dict[str, Any], host: str) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (Linux /proc), e.g. ``dssm serve --workers N``'s workers."""
    out, stack = [], [pid]
    while stack:
        current = stack.pop()
        out.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def _proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process and its descendants (Linux /proc), in seconds."""
    total, found = 0.0, False
    for member in _descendants(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found = True
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total if found else None


async def http_scenario(host: str, port: int, queries: list[str], *, clients: int, batch: int, requests: int,
                        seconds: float, server_pid: int | None = None, seed: int = 0) -> dict[str, Any]:
    """``clients`` closed-loop clients on their own connections; single queries or batches of ``batch``."""
    rng = random.Random(seed)
    authority = f"{host}:{port}"
    if batch == 1:
        bodies = [_request("/v1/search", {"query": q, "k": 10}, authority) for q in queries]
    else:
        bodies = [_request("/v1/search:batch", {"queries": rng.sample(queries, batch), "k": 10}, authority)
                  for _ in range(min(len(queries), 256))]
    latencies: list[float] = []
    errors = shed = issued = 0
    connections = [_Connection(host, port) for _ in range(clients)]
    for conn in connections:  # connect before the clock starts
        await conn.post(bodies[0])

    async def worker(conn: _Connection, offset: int) -> None:
        nonlocal errors, shed, issued
        i = offset
        while issued < requests and time.perf_counter() - start < seconds:
            issued += 1
            request = bodies[i % len(bodies)]
            i += 7
            tick = time.perf_counter()
            try:
                status = await conn.post(request)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                errors += 1
                conn.close()
                continue
            if status == 200:
                latencies.append(time.perf_counter() - tick)
            elif status == 429:
                shed += 1
            else:
                errors += 1

    server_cpu0 = _proc_cpu_seconds(server_pid) if server_pid else None
    cpu0, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(conn, i * 131) for i, conn in enumerate(connections)))
    wall = time.perf_counter() - start
    cpu = {"client_cpu": round((time.process_time() - cpu0) / wall, 2)}
    if server_cpu0 is not None:
        server_cpu1 = _proc_cpu_seconds(server_pid)
        if server_cpu1 is not None:
            cpu["server_cpu"] = round((server_cpu1 - server_cpu0) / wall, 2)
            # CPU the server spent per answered request: the figure least moved by other jobs on the machine.
            answered = len(latencies) + shed
            if answered:
                cpu["server_cpu_ms_per_request"] = round((server_cpu1 - server_cpu0) * 1000 / answered, 3)
    for conn in connections:
        conn.close()
    name = "http single" if batch == 1 else f"http batch of {batch}"
    return _summary(name, latencies, seconds=wall, errors=errors, shed=shed, queries_per_request=batch,
                    clients=clients, cpu=cpu)


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_MEDIAN_KEYS = ("p50_ms", "p99_ms", "requests_per_s", "queries_per_s", "client_cpu", "server_cpu",
                "server_cpu_ms_per_request", "process_cpu")


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for repeated runs of a scenario: medians of the rates, sums of the counts."""
    row = dict(runs[0])
    for key in ("requests", "errors", "shed_429"):
        row[key] = sum(r[key] for r in runs)
    for key in _MEDIAN_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = round(statistics.median(values), 3) if values else None
    row["repeats"] = len(runs)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    cols = ["scenario", "clients", "requests", "errors", "shed_429", "p50_ms", "p99_ms", "requests_per_s",
            "queries_per_s", "client_cpu", "server_cpu", "server_cpu_ms_per_request"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(r.get(c, "")) for c in cols) for r in rows]
    return "\n".join(lines)


def _ready_workers(url: str) -> int:
    """How many worker processes have an index loaded (``/metrics``: one ``dssm_index_documents`` per worker)."""
    import httpx

    text = httpx.get(url + "/metrics").text
    return sum(1 for line in text.splitlines() if line.startswith("dssm_index_documents"))


def start_server(index_dir: Path, port: int, *, max_in_flight: int = 64, tf_threads: int = 1, workers: int = 1,
                 server_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """``dssm serve`` on 127.0.0.1:``port`` in a child process, returned once every worker has loaded the index."""
    import httpx

    dssm_bin = shutil.which("dssm", path=str(Path(sys.executable).parent)) or "dssm"
    command = [dssm_bin, "serve", "--index", str(index_dir), "--port", str(port), "--log-level", "warning",
               "--max-in-flight", str(max_in_flight), "--tf-threads", str(tf_threads), "--workers", str(workers),
               *server_args]
    server = subprocess.Popen(command, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/readyz").status_code == 200 and (workers == 1 or _ready_workers(url) >= workers):
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"dssm serve did not become ready (exit code {server.poll()})")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="an existing index directory (else a synthetic one is used)")
    parser.add_argument("--model", type=Path, help="model directory for the synthetic index (else one is trained)")
    parser.add_argument("--docs", type=int, default=100_000, help="documents in the synthetic index")
    parser.add_argument("--scann-mode", default="auto", choices=("auto", "brute_force", "ah", "tree_ah"),
                        help="ScaNN mode of the synthetic index (default: auto, as `dssm index` builds it)")
    parser.add_argument("--reorder-k", type=int, default=1500,
                        help="candidates re-scored exactly by the quantised modes (see build_synthetic_index)")
    parser.add_argument("--min-recall", type=float, default=0.95, help="recall@10 the synthetic build must reach")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"where the synthetic model and index are kept and reused (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--rebuild", action="store_true", help="train and build again even if the workdir has them")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=5000, help="requests per run of a scenario at most")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per run of a scenario at most")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every scenario (the table shows medians)")
    parser.add_argument("--batch-size", type=int, default=32, help="queries per batch request")
    parser.add_argument("--max-in-flight", type=int, default=64, help="server's in-flight limit (per worker)")
    parser.add_argument("--workers", type=int, default=1, help="`dssm serve --workers`: server processes")
    parser.add_argument("--tf-threads", type=int, default=1,
                        help="TensorFlow intra/inter-op threads, in this process (in-process scenarios) and the "
                             "server's --tf-threads (default: 1, as `dssm serve`; 0 = TensorFlow's default)")
    parser.add_argument("--skip-in-process", action="store_true", help="only the HTTP scenarios")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("server_args", nargs="*", help="extra `dssm serve` flags (after --)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.requests < 1 or args.seconds <= 0:
        parser.error("--repeats, --requests and --seconds must be positive")

    if args.tf_threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.tf_threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.tf_threads)
    index_dir, setup = prepare_index(args)
    queries = synthetic_texts(2000, seed=1)
    runs: list[dict[str, Any]] = []
    if not args.skip_in_process:
        runs += in_process(index_dir, queries, requests=args.requests, seconds=args.seconds,
                           batch=args.batch_size, repeats=args.repeats)
    port = _free_port()
    server = start_server(index_dir, port, max_in_flight=args.max_in_flight, tf_threads=args.tf_threads,
                          workers=args.workers, server_args=tuple(args.server_args))
    try:
        _run_async(http_scenario("127.0.0.1", port, queries, clients=4, batch=1, requests=300, seconds=5))  # warm-up
        for repeat in range(args.repeats):
            for batch in (1, args.batch_size):
                for clients in args.clients:
                    row = _run_async(http_scenario(
                        "127.0.0.1", port, queries, clients=clients, batch=batch, server_pid=server.pid,
                        requests=args.requests if batch == 1 else max(1, args.requests // 4), seconds=args.seconds,
                        seed=repeat))
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    order: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in runs:
        order.setdefault((row["scenario"], row["clients"]), []).append(row)
    results = [median_of(group) for group in order.values()]
    report = {"setup": setup, "index": str(index_dir), "cpu_count": os.cpu_count(), "workers": args.workers,
              "load_average": os.getloadavg(), "results": results, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
