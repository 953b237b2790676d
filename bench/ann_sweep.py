"""ScaNN configurations at 1M vectors: build once per configuration, sweep leaves and reorder depth (issue 15 part 1).

Not a ``make bench`` part: a tool for choosing the size-aware defaults. Vectors are the index part's
synthetic clusters (``synthetic``, :func:`bench.part_index.make_vectors`) or a float32 ``.npy`` with
its queries beside it (``X.npy`` + ``X.queries.npy``, e.g. from ``python -m bench.real_vectors``).
Exact top-10 comes from :func:`dssm.index.ann.exact_top_k` (cached beside the vectors). Each
configuration is a JSON object::

    {"leaves": 4000, "train": 400000, "iters": 12, "spherical": true, "soar_lambda": 1.0,
     "quantize_centroids": false, "dpb": 2, "hash": "lut16", "aqt": 0.2, "reorder": 100,
     "sweep": [20, 40, 80], "pres": [100, 200]}

and prints its build seconds, then recall@10, QPS and p50 for every ``sweep`` × ``pres`` pair (single
queries, one thread, after 50 warm-up queries). ``{"hnsw": 16, "efc": 64, "efs": [16, 32, 64]}`` builds
hnswlib's HNSW instead (M, ef_construction; 2 build threads, as the index part) and sweeps ``ef``, so
the peer is measured on the same vectors in the same run. Run alone on a quiet machine::

    python -m bench.ann_sweep synthetic '{"leaves": 4000, "train": 400000, "spherical": true, ...}'
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "build", "build_hnsw", "sweep"]


def build(docs: np.ndarray, spec: dict[str, Any]) -> Any:
    """A ScaNN searcher over ``docs`` [n, dim] from one configuration (see the module doc)."""
    from scann.scann_ops.py.scann_builder import ReorderType  # noqa: PLC0415  (after scann_pybind)

    from dssm.index.ann import scann_pybind

    builder = scann_pybind().builder(docs, 10, "dot_product")
    train = spec.get("train", 100_000)
    if spec.get("leaves"):
        tree = {"num_leaves": spec["leaves"], "num_leaves_to_search": spec.get("search", 10),
                "training_sample_size": train, "training_iterations": spec.get("iters", 12)}
        tree.update({k: spec[k] for k in ("spherical", "soar_lambda", "overretrieve_factor", "avq",
                                          "quantize_centroids") if k in spec})
        builder = builder.tree(**tree)
    quantize = {"f32": ReorderType.FLOAT32, "int8": ReorderType.INT8,
                "bf16": ReorderType.BFLOAT16}[spec.get("rq", "f32")]
    return (builder.score_ah(spec.get("dpb", 2), anisotropic_quantization_threshold=spec.get("aqt", 0.2),
                             training_sample_size=train, hash_type=spec.get("hash", "lut16"))
            .reorder(spec.get("reorder", 100), quantize=quantize).build())


def build_hnsw(docs: np.ndarray, spec: dict[str, Any]) -> Any:
    """hnswlib's HNSW over ``docs`` as the index part builds it (``spec["hnsw"]`` = M, ``spec["efc"]``)."""
    from bench.part_index import hnswlib_index

    return hnswlib_index(docs, m=spec["hnsw"], ef_construction=spec.get("efc", 64))


def sweep(searcher: Any, queries: np.ndarray, truth: np.ndarray, *, leaves: int, pre: int) -> dict[str, float]:
    """Recall@10, QPS and p50 ms of single queries at one ``leaves_to_search`` / reorder depth (HNSW: ``ef`` =
    ``leaves``)."""
    def one(q: np.ndarray) -> np.ndarray:
        if not hasattr(searcher, "search"):  # hnswlib
            return searcher.knn_query(q, k=10)[0][0]
        return searcher.search(q, final_num_neighbors=10, pre_reorder_num_neighbors=pre, leaves_to_search=leaves)[0]

    if not hasattr(searcher, "search"):
        searcher.set_ef(leaves)
    for q in queries[:50]:
        one(q)
    found, times = [], []
    for q in queries:
        start = time.perf_counter()
        ids = one(q)
        times.append(time.perf_counter() - start)
        found.append(set(np.asarray(ids)[:10].tolist()))
    recall = float(np.mean([len(f & set(t)) / 10 for f, t in zip(found, truth.tolist(), strict=True)]))
    return {"recall": recall, "qps": len(times) / sum(times), "p50_ms": statistics.median(times) * 1e3}


def _vectors(source: str) -> tuple[np.ndarray, np.ndarray, Path]:
    if source == "synthetic":
        from bench.part_index import make_vectors

        docs, queries = make_vectors(1_000_000)
        return docs, queries, Path("work") / "ann-sweep-synthetic-truth.npy"
    path = Path(source)
    return (np.ascontiguousarray(np.load(path), dtype=np.float32), np.load(path.with_suffix(".queries.npy")),
            path.with_suffix(".truth.npy"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__)
        return 2
    from dssm.index.ann import exact_top_k

    docs, queries, truth_path = _vectors(args[0])
    if truth_path.exists():
        truth = np.load(truth_path)
    else:
        truth = exact_top_k(docs, queries, 10)[0]
        truth_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(truth_path, truth)
    for text in args[1:]:
        spec = json.loads(text)
        start = time.perf_counter()
        searcher = build_hnsw(docs, spec) if "hnsw" in spec else build(docs, spec)
        print(json.dumps({"config": spec, "build_s": round(time.perf_counter() - start, 1)}), flush=True)
        for leaves in spec.get("efs", spec.get("sweep", [spec.get("search", 10)])):
            for pre in spec.get("pres", [spec.get("reorder", 100)]):
                row = sweep(searcher, queries, truth, leaves=leaves, pre=pre)
                knob = "ef" if "hnsw" in spec else "leaves"
                print(f"  {knob}={leaves:5d} pre={pre:4d} recall={row['recall']:.4f} qps={row['qps']:8.0f} "
                      f"p50={row['p50_ms']:.3f}ms", flush=True)
        del searcher
    return 0


if __name__ == "__main__":
    sys.exit(main())
