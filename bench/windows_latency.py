"""Single-query latency of an index with windows, by how its window vectors are stored (issue 11).

``python -m bench.windows_latency --index DIR --queries queries.jsonl`` loads the index's ``Searcher``
and times single in-process searches, dense and hybrid, with its ``windows/`` as stored (int16 with a
scale per window) and with the same vectors held as float16 (the format of stores written before
2026-12-07), alternating rounds so both see the same machine state. Same queries, same candidates:
only the gather-and-convert of each query's ~1,300 window rows differs. Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["main", "time_searches"]


def time_searches(searcher: Any, queries: Sequence[str], *, mode: str, warmup: int) -> dict[str, float]:
    """p50 and p99 (ms) of ``searcher.search(q, k=10, mode=mode)`` over ``queries`` after ``warmup`` of them."""
    for text in queries[:warmup]:
        searcher.search(text, k=10, mode=mode)
    seconds = []
    for text in queries[warmup:]:
        start = time.perf_counter()
        searcher.search(text, k=10, mode=mode)
        seconds.append(time.perf_counter() - start)
    return {"p50_ms": round(float(np.median(seconds)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(seconds, 99)) * 1e3, 3)}


def main(argv: list[str] | None = None) -> int:
    from dssm.windows import WindowRows, WindowScorer
    from serving.searcher import Searcher

    parser = argparse.ArgumentParser(prog="python -m bench.windows_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="an index whose version stores windows/")
    parser.add_argument("--queries", required=True, help="a BEIR queries.jsonl (its first --count texts)")
    parser.add_argument("--count", type=int, default=1200, help="queries per timing, the first 200 warming up")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with open(args.queries) as handle:
        queries = [json.loads(line)["text"] for line in handle][:args.count]
    searcher = Searcher.load(args.index)
    if searcher.windows is None:
        raise SystemExit(f"{args.index}: its version stores no windows/ (dssm index --windows on)")
    stored = searcher.windows.store
    if stored.scales is None:
        raise SystemExit(f"{args.index}: its windows/ is already float16 (written before 2026-12-07)")
    as_float16 = WindowRows(keys=stored.keys, lengths=stored.lengths, offsets=stored.offsets,
                            rows=(stored.rows * stored.scales[:, None]).astype(np.float16))
    embed = searcher.windows.embed_documents
    scorers = {"int16 (stored)": searcher.windows,
               "float16": WindowScorer(as_float16, config=stored.config, embed_documents=embed)}
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for _ in range(args.rounds):
        for name, scorer in scorers.items():
            searcher.windows = scorer
            searcher.__dict__.pop("row_windows", None)  # a cached property bound to the scorer's store
            for mode in ("dense", "hybrid"):
                results.setdefault(name, {}).setdefault(mode, []).append(
                    time_searches(searcher, queries, mode=mode, warmup=200))
    report = {"index": str(args.index), "queries": len(queries) - 200, "windows": len(stored.rows),
              "results": results}
    print(json.dumps(report, indent=1))
    print("\n| window rows | mode | p50 ms per round | p99 ms per round |\n|---|---|---|---|")
    for name, modes in results.items():
        for mode, runs in modes.items():
            print(f"| {name} | {mode} | {', '.join(str(r['p50_ms']) for r in runs)} | "
                  f"{', '.join(str(r['p99_ms']) for r in runs)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
