"""cold: what a *new* process costs before its first answer (issue 15 §2): `dssm search`, a server worker.

Index: ``bench.load_test``'s synthetic corpus (100,000 texts; quick: 5,000), encoded by the
default-shape model with its initial weights, ScaNN ``auto`` at the recall gate 0.95 — the query
part's index. Each figure is measured in fresh processes (nothing warm but the OS page cache, which
the first, discarded run fills), beside the same with ``--no-fast-queries``: TensorFlow imported and
the SavedModel loaded at start, which is what every search and worker did before the model carried
numpy weights (``dssm.query_numpy``).

* ``dssm search --index IDX "query"``: wall time from spawn to exit (default mode: dense on this
  index, which stores no hybrid weight). Target ≤ 1.5 s. The note counts its stderr lines
  (TensorFlow and CUDA start-up noise: target none).
* ``dssm serve --index IDX``: wall time from spawn to the first ``200`` of ``GET /readyz`` (the index
  loaded, checksums verified, warm-up query done). Target ≤ 3 s.
* that server's resident memory (``VmRSS``) after 200 single searches over HTTP. Target: at least
  30% below ``--no-fast-queries``.

Median of ``REPEATS`` runs with min and max.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT, Figure, Stats

__all__ = ["run", "REPEATS"]

REPEATS = 5
DSSM = str(Path(sys.executable).parent / "dssm")
QUERY = "how do magnetic fields bend light near heavy stars"


def _search_once(index: Path, fast: bool) -> tuple[float, int]:
    flags = [] if fast else ["--no-fast-queries"]
    tick = time.perf_counter()
    done = subprocess.run([DSSM, "search", "--index", str(index), "-k", "10", "--json", *flags, QUERY],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    seconds = time.perf_counter() - tick
    return seconds, len([line for line in done.stderr.splitlines() if line.strip()])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _serve_once(index: Path, fast: bool, queries: int) -> tuple[float, float]:
    """(seconds from spawn to ready, resident MB after ``queries`` searches) of one ``dssm serve``."""
    import httpx

    port = _free_port()
    flags = [] if fast else ["--no-fast-queries"]
    tick = time.perf_counter()
    proc = subprocess.Popen([DSSM, "serve", "--index", str(index), "--port", str(port), "--log-level", "warning",
                             *flags], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = None
        while ready is None:
            if proc.poll() is not None:
                raise RuntimeError(f"dssm serve exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                    ready = time.perf_counter() - tick
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        with httpx.Client(base_url=url, timeout=10.0) as client:
            for i in range(queries):
                client.post("/v1/search", json={"query": f"{QUERY} {i}", "k": 10}).raise_for_status()
        return ready, _rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(*, quick: bool) -> list[Figure]:
    """Cold `dssm search` and a server worker's start and memory, fast queries vs the SavedModel at start."""
    from bench import load_test

    docs, repeats, queries = (5_000, 2, 20) if quick else (100_000, REPEATS, 200)
    work = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    try:
        index, _, setup = load_test.untrained_synthetic_index(work, docs)
        runs: dict[str, list[float]] = {}
        for fast in (True, False):
            key = "fast" if fast else "graph"
            _search_once(index, fast)  # fills the page cache; not counted
            searches = [_search_once(index, fast) for _ in range(repeats)]
            runs[f"search_{key}"] = [s for s, _ in searches]
            runs[f"stderr_{key}"] = [float(n) for _, n in searches]
            served = [_serve_once(index, fast, queries) for _ in range(repeats)]
            runs[f"ready_{key}"] = [r for r, _ in served]
            runs[f"rss_{key}"] = [m for _, m in served]
            print(f"  {key}: {json.dumps({k: v for k, v in runs.items() if k.endswith(key)})}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    corpus = f"{docs:,} synthetic docs"
    peer = "--no-fast-queries (TensorFlow + SavedModel at start)"
    noise = f"stderr lines: {max(runs['stderr_fast']):.0f} (vs {max(runs['stderr_graph']):.0f} with the SavedModel)"
    return [
        Figure("cold", f"`dssm search` wall time, cold process, {corpus}", "s", Stats.of(runs["search_fast"]),
               peer, Stats.of(runs["search_graph"]), higher_is_better=False, note=f"target ≤ 1.5 s; {noise}"),
        Figure("cold", f"`dssm serve` spawn to ready, {corpus}", "s", Stats.of(runs["ready_fast"]), peer,
               Stats.of(runs["ready_graph"]), higher_is_better=False, note="target ≤ 3 s"),
        Figure("cold", f"serving process resident memory after {queries} searches", "MB", Stats.of(runs["rss_fast"]),
               peer, Stats.of(runs["rss_graph"]), higher_is_better=False, note="target ≥ 30% below the peer"),
    ]
