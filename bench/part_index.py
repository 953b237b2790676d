"""index: build a ScaNN index of 1,000,000 (and 100,000) documents; hnswlib and FAISS HNSW on the same vectors.

Vectors: synthetic, clustered like real embeddings (uniform random high-dimensional data has no
neighbourhood structure and makes every ANN method look bad). 128 dims (the default model's output
width); ``n / 100`` topic centres drawn from a standard normal; each document is its topic centre
plus Gaussian noise at the centre's scale per dimension, L2-normalised, so a document's cosine to
its own topic centre is about 0.7 and to other topics about 0 (two documents of one topic: about
0.5). Queries are 1,000 new draws from the same topics (not indexed documents). Texts for the doc
store are short synthetic strings.

Each system runs in its own child process (so the parent's arrays do not count), which reports its
peak RSS and build seconds:

- ours: what ``dssm index`` runs after encoding, :func:`dssm.index.build_index_from_shards` end to
  end from 8 Parquet shards (``bench.index_memory.write_shards``) — SQLite doc store, ``embeddings.npy``,
  ScaNN tree + AH + reorder (``auto`` mode), the build's recall gate with leaves tuning, BM25 state and
  the manifest's checksums — then the published version is loaded and searched. Its memory figures
  are the build's own (manifest ``build.memory``, per-stage VmHWM): peak RSS, peak above the RSS at
  the build's start (interpreter, TensorFlow, ScaNN: not the build's), and
  ``(peak − start − ScaNN's serialized structures) / raw float32 matrix`` (issue 4: ≤ 1.5);
- hnswlib (M=16, ef_construction=64) and FAISS ``IndexHNSWFlat`` (M=16, efConstruction=64), inner
  product, 2 threads to build (efConstruction 64 rather than the usual 100-200 keeps the two 1M HNSW
  builds inside the part's ~10-minute budget on 2 cores; the search sweep still reaches 0.95).

Search: recall@10 against exact search (ScaNN brute force over all rows) on the 1,000 queries, and
single-query latency, one thread, one query at a time (for ScaNN the ``scann_ops_pybind`` call only).
QPS at matched recall: each system's search knob (ScaNN ``leaves_to_search``, HNSW ``ef``) is swept
and the fastest setting reaching recall 0.90 / 0.95 is reported. Sizes: 1M and 100k; quick: 30k (ScaNN AH without the
tree: `make bench QUICK=1` has 5 minutes for every part).

**Real text** (issue 15: partition quality depends on the distribution): a second 1M set, ScaNN and
hnswlib only, whose vectors are a trained tower's embeddings of text — :func:`bench.real_vectors.trained_tower`
(default shape, 3 epochs on debian-dev's pairs) embedding 1M distinct word windows of the shared
datasets' documents, queried by 1,000 of their real queries (:func:`bench.real_vectors.windows`). Not in
quick mode.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import ROOT, Figure, Stats

__all__ = ["run", "make_vectors", "hnswlib_index", "child_main"]

DIM = 128
QUERIES = 1000
TARGETS = (0.90, 0.95)
# HNSW's ef sweep: a trained tower's embeddings of real text need ef ~200-250 for recall 0.95 at 1M.
EFS = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384]


def make_vectors(n: int, *, queries: int = QUERIES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors: (documents [n, DIM], queries [queries, DIM]) float32 (see the module doc)."""
    rng = np.random.default_rng(seed)
    topics = max(10, n // 100)
    centres = rng.standard_normal((topics, DIM), dtype=np.float32)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, DIM), np.float32)
        for start in range(0, count, 100_000):  # bounded temporaries
            m = min(100_000, count - start)
            block = centres[rng.integers(0, topics, m)] + rng.standard_normal((m, DIM), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start:start + m] = block
        return out

    return draw(n), draw(queries)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(found.tolist(), truth.tolist(), strict=True)]))


def _time_single(search: Any, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Run ``search(q) -> ids[k]`` per query; (ids [q, k], per-query seconds)."""
    ids, times = [], []
    for q in queries:
        start = time.perf_counter()
        found = search(q)
        times.append(time.perf_counter() - start)
        ids.append(np.asarray(found, dtype=np.int64)[:10])
    return np.stack(ids), times


def _sweep(search_with: Any, knobs: list[int], queries: np.ndarray, truth: np.ndarray) -> list[dict[str, float]]:
    """Recall, p50 latency and QPS of each knob value (single queries, one thread)."""
    points = []
    for knob in knobs:
        search = search_with(knob)
        _time_single(search, queries[:50])  # warm-up
        ids, times = _time_single(search, queries)
        points.append({"knob": knob, "recall": _recall(ids, truth), "p50_ms": statistics.median(times) * 1e3,
                       "qps": len(times) / sum(times)})
    return points


def _child_scann(work: Path, n: int) -> dict[str, Any]:
    import dssm  # noqa: F401
    from dssm import index as ix

    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    start = time.perf_counter()
    result = ix.build_index_from_shards(work / "index", shards=sorted((work / "shards").glob("*.parquet")),
                                        model_dir=None, progress=False)
    build = time.perf_counter() - start
    index = ix.load_index(work / "index")
    params = index.params
    pre = params.get("reorder_k", -1)
    leaves = params.get("num_leaves_to_search", -1)

    def with_leaves(knob: int) -> Any:
        return lambda q: index.scann.search(q, final_num_neighbors=10, pre_reorder_num_neighbors=pre,
                                            leaves_to_search=knob)[0]

    ids_found, times = _time_single(with_leaves(leaves), queries[:50])
    ids_found, times = _time_single(with_leaves(leaves), queries)
    total = params.get("num_leaves", 1)
    knobs = sorted({max(1, int(total * f)) for f in (0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)} | {leaves}) \
        if params["mode"] == "tree_ah" else [-1]
    size = sum(p.stat().st_size for p in (work / "index").rglob("*") if p.is_file())
    return {"build_s": build, "build_breakdown": result.seconds, "params": {k: v for k, v in params.items()
                                                                            if k != "leaves_tuning"},
            "recall": _recall(ids_found, truth), "p50_ms": statistics.median(times) * 1e3,
            "build_recall_gate": result.recall_at_10, "disk_bytes": size, "memory": result.memory,
            "sweep": _sweep(with_leaves, knobs, queries, truth)}


def hnswlib_index(vectors: np.ndarray, *, m: int = 16, ef_construction: int = 64) -> Any:
    """hnswlib's inner-product HNSW over ``vectors`` [n, dim], built on 2 threads, searched on one."""
    import hnswlib

    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=m, ef_construction=ef_construction, random_seed=0)
    index.add_items(vectors, np.arange(len(vectors)), num_threads=2)
    index.set_num_threads(1)
    return index


def _child_hnswlib(work: Path, n: int) -> dict[str, Any]:
    vectors = np.load(work / "docs.npy")
    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    start = time.perf_counter()
    index = hnswlib_index(vectors)
    build = time.perf_counter() - start

    def with_ef(ef: int) -> Any:
        index.set_ef(ef)
        return lambda q: index.knn_query(q, k=10)[0][0]

    return {"build_s": build, "sweep": _sweep(with_ef, EFS, queries, truth)}


def _child_faiss(work: Path, n: int) -> dict[str, Any]:
    import faiss

    vectors = np.load(work / "docs.npy")
    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    faiss.omp_set_num_threads(2)
    start = time.perf_counter()
    index = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 64
    index.add(vectors)
    build = time.perf_counter() - start
    faiss.omp_set_num_threads(1)

    def with_ef(ef: int) -> Any:
        index.hnsw.efSearch = ef
        return lambda q: index.search(q[None, :], 10)[1][0]

    return {"build_s": build, "sweep": _sweep(with_ef, EFS, queries, truth)}


def _child_real(work: Path, n: int) -> dict[str, Any]:
    """``docs.npy`` / ``queries.npy``: a trained tower's embeddings of ``n`` real-text windows and 1,000 queries."""
    from bench.real_vectors import embedded_windows, trained_tower

    _, _, docs, queries = embedded_windows(trained_tower(work / "tower"), n)
    np.save(work / "docs.npy", docs)
    np.save(work / "queries.npy", queries)
    shutil.rmtree(work / "tower")
    return {}


def _child_truth(work: Path, n: int) -> dict[str, Any]:
    import dssm  # noqa: F401
    from dssm.index import exact_top_k

    rows, _ = exact_top_k(np.load(work / "docs.npy", mmap_mode="r"), np.load(work / "queries.npy"), 10)
    np.save(work / "truth.npy", rows)
    return {}


def child_main(system: str, work: str, n: int) -> None:
    """Entry point of a child process: run one system, write ``<system>.json`` with its peak RSS."""
    result = {"_child_scann": _child_scann, "_child_hnswlib": _child_hnswlib, "_child_faiss": _child_faiss,
              "_child_truth": _child_truth, "_child_real": _child_real}[f"_child_{system}"](Path(work), n)
    # Our build resets the kernel's high-water mark at its stages (its manifest has the exact peak).
    memory = result.get("memory")
    result["peak_rss_mb"] = memory["peak_rss_bytes"] / 2**20 if memory else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (Path(work) / f"{system}.json").write_text(json.dumps(result, indent=1))


def _run_child(system: str, work: Path, n: int) -> dict[str, Any]:
    code = f"from bench.part_index import child_main; child_main({system!r}, {str(work)!r}, {n})"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode != 0:
        raise RuntimeError(f"bench child {system} (n={n}) failed:\n{done.stderr[-3000:]}")
    result = json.loads((work / f"{system}.json").read_text())
    print(f"  {system} n={n:,}: {time.perf_counter() - start:.0f} s in the child", flush=True)
    return result


def _at_recall(sweep: list[dict[str, float]], target: float) -> dict[str, float] | None:
    ok = [p for p in sweep if p["recall"] >= target]
    return max(ok, key=lambda p: p["qps"]) if ok else None


def _one(value: float) -> Stats:
    return Stats(value, value, value, 1)


def _size_figures(n: int, work: Path, *, peers: tuple[str, ...], real: bool = False) -> list[Figure]:
    """One set's figures: ``n`` synthetic vectors, or (``real``) a trained tower's embeddings of real text."""
    from bench.index_memory import write_shards

    if real:
        _run_child("real", work, n)
        docs = np.load(work / "docs.npy")
    else:
        docs, queries = make_vectors(n)
        np.save(work / "docs.npy", docs)
        np.save(work / "queries.npy", queries)
    (work / "shards").mkdir()
    write_shards(docs, work / "shards")
    del docs
    _run_child("truth", work, n)
    ours = _run_child("scann", work, n)
    others = {name: _run_child(name, work, n) for name in peers}
    print(json.dumps({"n": n, "real": real, "scann": ours, **others}, indent=1), flush=True)
    label = (f"{n // 1000:,}k" if n < 1_000_000 else f"{n // 1_000_000}M") + (" real-text" if real else "")
    hnsw = others.get("hnswlib")
    mem = ours["memory"]
    top = max(mem["stages_mib"], key=lambda stage: stage["peak"])
    figures = [
        Figure("index", f"build {label} docs (doc store + ScaNN + recall gate + BM25), 2 cores", "s",
               _one(ours["build_s"]), "hnswlib HNSW build" if hnsw else None,
               _one(hnsw["build_s"]) if hnsw else None, higher_is_better=False,
               note=f"ScaNN {ours['params']['mode']}; target ≤ 120 s at 1M"),
        Figure("index", f"peak RSS of the {label} build (child process)", "MB", _one(ours["peak_rss_mb"]),
               "hnswlib build" if hnsw else None, _one(hnsw["peak_rss_mb"]) if hnsw else None,
               higher_is_better=False, note=f"raw matrix {n * DIM * 4 / 2**20:,.0f} MB; ours includes "
                                            f"{mem['baseline_rss_bytes'] / 2**20:,.0f} MB of libraries at the start"),
        Figure("index", f"build memory of the {label} build: (peak − start − ScaNN) / raw matrix", "x",
               _one(mem["ratio"]), higher_is_better=False,
               note=f"peak {mem['peak_above_baseline_bytes'] / 2**20:,.0f} MB above the start; matrix "
                    f"{mem['matrix_bytes'] / 2**20:,.0f} MB, ScaNN {mem['scann_bytes'] / 2**20:,.0f} MB, BM25 "
                    f"{mem['bm25_bytes'] / 2**20:,.0f} MB; top stage {top['stage']}; target ≤ 1.5 at 1M "
                    "(small corpora: ~60 MB of SQLite/Arrow/Python dominate)"),
        Figure("index", f"index size on disk, {label}", "MB", _one(ours["disk_bytes"] / 2**20),
               higher_is_better=False, note="whole version dir: embeddings.npy, ScaNN, SQLite, BM25"),
        Figure("index", f"recall@10 vs exact, {label}, 1,000 new queries", "recall", _one(ours["recall"]),
               note=f"leaves_to_search tuned at build = {ours['params'].get('num_leaves_to_search')}"),
        Figure("index", f"single-query p50 latency, {label} (ScaNN search only)", "ms", _one(ours["p50_ms"]),
               higher_is_better=False, note="target ≤ 1 ms at recall@10 ≥ 0.95"),
    ]
    if "faiss" in others:
        figures.append(Figure("index", f"build {label}: FAISS HNSW beside hnswlib", "s",
                              _one(others["faiss"]["build_s"]), "hnswlib", _one(hnsw["build_s"]),
                              higher_is_better=False))
    for target in TARGETS:
        mine = _at_recall(ours["sweep"], target)
        for name, peer in others.items():
            theirs = _at_recall(peer["sweep"], target)
            if mine is None or theirs is None:
                continue
            figures.append(Figure(
                "index", f"QPS at recall@10 ≥ {target:.2f}, {label}, one thread", "queries/s", _one(mine["qps"]),
                f"{name} HNSW (ef={theirs['knob']}, recall {theirs['recall']:.3f})", _one(theirs["qps"]),
                note=f"ScaNN leaves={mine['knob']}, recall {mine['recall']:.3f}"))
    return figures


def run(*, quick: bool) -> list[Figure]:
    """Build and search ScaNN, hnswlib and FAISS HNSW at 1M and 100k documents (quick: 30k only)."""
    both = ("hnswlib", "faiss")
    sizes = [(30_000, both, False)] if quick else [(1_000_000, both, False), (100_000, both, False),
                                                   (1_000_000, ("hnswlib",), True)]
    figures: list[Figure] = []
    for n, peers, real in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"bench-index-{n}-"))
        try:
            figures.extend(_size_figures(n, work, peers=peers, real=real))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return figures
