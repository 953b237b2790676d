"""Memory of ``dssm index``'s build from Parquet shards, stage by stage (issue 4's budget).

The parent writes ``n`` synthetic documents (:func:`bench.part_index.make_vectors`: clustered unit
vectors, 128 dims; short synthetic texts) as 8 Parquet shards of the encode job's schema, then a
child process imports what ``dssm index`` has loaded when its build starts (dssm, TensorFlow, ScaNN,
bm25s, pyarrow), and runs :func:`dssm.index.build_index_from_shards` (``auto`` ScaNN, recall gate,
BM25 state). The build's own ``build.memory`` manifest section is printed: RSS at the build's start
(baseline, not the build's), peak and end RSS of each stage above it, the raw float32 matrix, ScaNN's
serialized structures and ``ratio = (peak − baseline − ScaNN) / matrix`` (budget ≤ 1.5).

Usage: ``.venv/bin/python -m bench.index_memory --n 1000000`` (about 2 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import ROOT

__all__ = ["write_shards", "child_main", "measure", "table", "main"]


def write_shards(vectors: np.ndarray, directory: Path, *, shards: int = 8) -> list[Path]:
    """Write ``vectors`` ([n, dim] float32) with synthetic ids/titles/texts as the encode job's Parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim = vectors.shape
    paths = []
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        rows = range(lo, hi)
        offsets = pa.array(np.arange(0, (hi - lo + 1) * dim, dim, dtype=np.int32))
        table = pa.table({
            "id": pa.array([f"doc-{i}" for i in rows], pa.string()),
            "title": pa.array([f"title {i % 5003}" for i in rows], pa.string()),
            "text": pa.array([f"synthetic document {i} about topic {i % 997}" for i in rows], pa.string()),
            "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors[lo:hi].reshape(-1))),
        })
        paths.append(directory / f"embeddings-{s:05d}-of-{shards:05d}.parquet")
        pq.write_table(table, paths[-1])
    return paths


def child_main(work: str) -> None:
    """Child process: load what ``dssm index`` has loaded, build from the shards, write ``result.json``."""
    import importlib

    import dssm  # noqa: F401  (before TensorFlow: sets TF_USE_LEGACY_KERAS)
    from dssm.index import build_index_from_shards

    for name in ("tensorflow", "scann", "bm25s", "pyarrow.parquet"):  # in the baseline, as in `dssm index`
        importlib.import_module(name)

    work_dir = Path(work)
    shards = sorted(work_dir.glob("embeddings-*.parquet"))
    start = time.perf_counter()
    result = build_index_from_shards(work_dir / "index", shards=shards, model_dir=None, progress=False)
    out = {"build_s": time.perf_counter() - start, "documents": result.documents, "seconds": result.seconds,
           "memory": result.memory, "scann": {k: v for k, v in result.scann.items() if k != "leaves_tuning"},
           "recall@10": result.recall_at_10}
    (work_dir / "result.json").write_text(json.dumps(out, indent=1))


def measure(n: int, *, shards: int = 8) -> dict[str, Any]:
    """Write the shards, run the build in a child, return its result (``memory`` = the manifest's section)."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-index-memory-{n}-"))
    try:
        from bench.part_index import make_vectors

        vectors, _ = make_vectors(n, queries=1)
        write_shards(vectors, work, shards=shards)
        del vectors
        code = f"from bench.index_memory import child_main; child_main({str(work)!r})"
        cpu = os.times()
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode != 0:
            raise RuntimeError(f"index_memory child (n={n}) failed:\n{done.stderr[-3000:]}")
        after = os.times()
        result = json.loads((work / "result.json").read_text())
        result["child_cpu_s"] = round((after.children_user - cpu.children_user)
                                      + (after.children_system - cpu.children_system), 1)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(result: dict[str, Any]) -> str:
    """A readable table of one measurement."""
    mem, mib = result["memory"], 2**20
    lines = [f"documents {result['documents']:,}, build {result['build_s']:.1f} s wall, "
             f"child CPU {result['child_cpu_s']} s, load average {os.getloadavg()[0]:.2f}",
             f"baseline RSS at build start (libraries): {mem['baseline_rss_bytes'] / mib:,.0f} MiB", "",
             f"{'stage':<16}{'peak MiB':>10}{'end MiB':>10}   (above the baseline)"]
    for stage in mem["stages_mib"]:
        end = "-" if stage["end"] is None else f"{stage['end']:,.0f}"
        lines.append(f"{stage['stage']:<16}{stage['peak']:>10,.0f}{end:>10}")
    lines += ["",
              f"peak RSS {mem['peak_rss_bytes'] / mib:,.0f} MiB = baseline + "
              f"{mem['peak_above_baseline_bytes'] / mib:,.0f} MiB",
              f"raw float32 matrix {mem['matrix_bytes'] / mib:,.0f} MiB; ScaNN structures (serialized) "
              f"{mem['scann_bytes'] / mib:,.0f} MiB; BM25 state {mem['bm25_bytes'] / mib:,.0f} MiB",
              f"ratio (peak - baseline - ScaNN) / matrix = {mem['ratio']:.2f} (budget 1.5)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m bench.index_memory [--n N] [--shards S]``; prints JSON then the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="documents")
    parser.add_argument("--shards", type=int, default=8, help="Parquet shards")
    args = parser.parse_args(argv)
    result = measure(args.n, shards=args.shards)
    print(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
