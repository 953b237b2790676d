"""Load test of the search service on loopback: p50/p99 latency and QPS at 1, 8 and 64 concurrent clients.

    python -m bench.load_test [--index INDEX_DIR | --model MODEL_DIR] [--docs 100000] [--clients 1 8 64]
                              [--requests 2000] [--seconds 20] [--batch-size 32] [--json OUT]

Without ``--index`` it builds a synthetic index of ``--docs`` documents (texts drawn from adi's
vocabulary, deterministic; ScaNN ``--scann-mode``, brute force by default) with ``--model``'s
document tower, or, without ``--model``, with a small model trained here on adi's pairs. The server is ``dssm serve`` in
a subprocess on 127.0.0.1 (so clients and server do not share a GIL); clients are asyncio tasks on
one httpx connection pool each. Every scenario is bounded by ``--requests`` and ``--seconds``.

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

__all__ = ["main"]


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

    make_pairs(["--input", str(ADI), "--output", str(workdir / "pairs"), "--validation-fraction", "0",
                "--num-buckets", "4096"])
    config = TrainConfig(epochs=3, batch_size=16, verbose=0)
    model, history = train(workdir / "pairs", model_config=ModelConfig(embedding_dim=32, hidden_dims=(32,)),
                           train_config=config)
    return export_model(model, workdir / "model", train_config=config, history=history)


def build_synthetic_index(index_dir: Path, model_dir: Path, docs: int, *,
                          scann_mode: str) -> tuple[list[str], dict[str, Any]]:
    from dssm.export import load_encoder
    from serving.index import ScannConfig, build_index

    texts = synthetic_texts(docs)
    encoder = load_encoder(model_dir)
    tick = time.perf_counter()
    embeddings = encoder.embed_documents(texts)
    encode_s = time.perf_counter() - tick
    # The recall gate is off: a small model's embeddings of random-word texts are nearly tied, so
    # quantised modes cannot reach 0.95 on them; the measured recall is reported instead.
    result = build_index(index_dir, embeddings=embeddings, ids=[f"s{i}" for i in range(docs)], texts=texts,
                         model_dir=model_dir, config=ScannConfig(mode=scann_mode, min_recall=0.0))
    build_seconds = {k: round(v, 2) for k, v in result.seconds.items()}
    return texts, {"documents": docs, "encode_seconds": round(encode_s, 2), "scann": result.scann,
                   "recall@10": result.recall_at_10, "build_seconds": build_seconds}


def _summary(name: str, latencies: list[float], *, seconds: float, errors: int, shed: int,
             queries_per_request: int, clients: int) -> dict[str, Any]:
    lat = np.asarray(latencies) * 1000.0
    done = len(latencies)
    return {
        "scenario": name, "clients": clients, "requests": done, "errors": errors, "shed_429": shed,
        "p50_ms": round(float(np.percentile(lat, 50)), 3) if done else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 3) if done else None,
        "requests_per_s": round(done / seconds, 1) if seconds else None,
        "queries_per_s": round(done * queries_per_request / seconds, 1) if seconds else None,
        "seconds": round(seconds, 2),
    }


def in_process(index_dir: Path, queries: list[str], *, requests: int, seconds: float, batch: int) -> list[dict]:
    from serving.searcher import Searcher

    searcher = Searcher.load(index_dir)
    for q in queries[:20]:
        searcher.search(q, k=10)
    out = []
    for name, size in (("in-process single", 1), (f"in-process batch of {batch}", batch)):
        latencies, start, i = [], time.perf_counter(), 0
        while len(latencies) < requests and time.perf_counter() - start < seconds:
            chunk = [queries[(i + j) % len(queries)] for j in range(size)]
            tick = time.perf_counter()
            if size == 1:
                searcher.search(chunk[0], k=10)
            else:
                searcher.search_batch(chunk, k=10)
            latencies.append(time.perf_counter() - tick)
            i += size
        out.append(_summary(name, latencies, seconds=time.perf_counter() - start, errors=0, shed=0,
                            queries_per_request=size, clients=1))
    return out


async def _http_scenario(url: str, queries: list[str], *, clients: int, batch: int, requests: int,
                         seconds: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = shed = 0
    issued = 0
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(seed: int, client: httpx.AsyncClient) -> None:
        nonlocal errors, shed, issued
        rng = random.Random(seed)
        while issued < requests and time.perf_counter() - start < seconds:
            issued += 1
            if batch == 1:
                path, body = "/v1/search", {"query": rng.choice(queries), "k": 10}
            else:
                path, body = "/v1/search:batch", {"queries": rng.sample(queries, batch), "k": 10}
            tick = time.perf_counter()
            try:
                response = await client.post(path, json=body)
            except httpx.HTTPError:
                errors += 1
                continue
            if response.status_code == 200:
                latencies.append(time.perf_counter() - tick)
            elif response.status_code == 429:
                shed += 1
            else:
                errors += 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        await asyncio.gather(*(worker(i, client) for i in range(clients)))
    name = "http single" if batch == 1 else f"http batch of {batch}"
    return _summary(name, latencies, seconds=time.perf_counter() - start, errors=errors, shed=shed,
                    queries_per_request=batch, clients=clients)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _table(rows: list[dict[str, Any]]) -> str:
    cols = ["scenario", "clients", "requests", "errors", "shed_429", "p50_ms", "p99_ms", "requests_per_s",
            "queries_per_s"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="an existing index directory (else a synthetic one is built)")
    parser.add_argument("--model", type=Path, help="model directory for the synthetic index (else one is trained)")
    parser.add_argument("--docs", type=int, default=100_000, help="documents in the synthetic index")
    parser.add_argument("--scann-mode", default="brute_force", choices=("auto", "brute_force", "ah", "tree_ah"),
                        help="ScaNN mode of the synthetic index (default: brute_force, exact)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2000, help="requests per scenario at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per scenario at most")
    parser.add_argument("--batch-size", type=int, default=32, help="queries per batch request")
    parser.add_argument("--max-in-flight", type=int, default=64, help="server's in-flight limit")
    parser.add_argument("--threads", type=int, default=8, help="server's worker threads")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--workdir", type=Path, help="keep the built model/index here (default: a temp dir)")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dssm-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    setup: dict[str, Any] = {}
    queries = synthetic_texts(2000, seed=1)
    if args.index is None:
        model_dir = args.model or train_small_model(workdir)
        index_dir = workdir / "index"
        if index_dir.exists():
            shutil.rmtree(index_dir)
        print(f"building a {args.docs}-document synthetic index in {index_dir}", flush=True)
        _, setup = build_synthetic_index(index_dir, model_dir, args.docs, scann_mode=args.scann_mode)
    else:
        index_dir = args.index

    results = in_process(index_dir, queries, requests=args.requests, seconds=args.seconds, batch=args.batch_size)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    dssm_bin = shutil.which("dssm", path=str(Path(sys.executable).parent)) or "dssm"
    server = subprocess.Popen([dssm_bin, "serve", "--index", str(index_dir), "--port", str(port), "--log-level",
                               "warning", "--max-in-flight", str(args.max_in_flight), "--threads", str(args.threads)],
                              env=dict(os.environ))
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dssm serve did not become ready (exit code {server.poll()})")
            time.sleep(0.2)
        asyncio.run(_http_scenario(url, queries, clients=4, batch=1, requests=200, seconds=5))  # warm-up
        for batch in (1, args.batch_size):
            for clients in args.clients:
                row = asyncio.run(_http_scenario(url, queries, clients=clients, batch=batch,
                                                 requests=args.requests if batch == 1 else max(1, args.requests // 4),
                                                 seconds=args.seconds))
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {"setup": setup, "index": str(index_dir), "cpu_count": os.cpu_count(), "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
