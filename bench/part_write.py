"""write: what a live write costs (issue 14) — one-document and 1,000-document upserts into a 100k index,
writes through HTTP under search load, and one-document upserts into a 1M index.

Index: ``bench.load_test``'s synthetic corpus (100,000 texts of 8–40 words drawn from adi's vocabulary;
quick: 5,000), encoded by the default-shape model with its initial weights and indexed by
:func:`bench.load_test.build_synthetic_index` (ScaNN ``auto`` at the recall gate 0.95), as the query
part builds it. Writes go through ``Searcher.upsert`` — what ``PUT /v1/documents`` runs in the
service: the new documents encoded by the document tower, then :func:`dssm.index.update_index`
publishing a new version under the writers' lock (and the default retention of 10 versions).
Written documents are new synthetic texts (another seed) with new ids.

Figures, median of ``repeats`` runs with min and max:

* one-document upsert, p50 and p99 over ``WRITES`` writes per run (after one warm-up write).
  Targets (issue 14): p50 ≤ 50 ms, p99 ≤ 200 ms;
* disk per one-document write: the bytes of the new version's files that are not hard links to an
  earlier version's (``st_nlink == 1``), median over the run's writes. Target: ≤ 1 MB;
* 1,000-document upsert, documents/s (one call, encoding included);
* through HTTP (:mod:`bench.write_http`, once, after the runs above), while 8 clients search: writes in
  batches of 100 paced at 1,000 documents/s for 60 s (search p99 then vs idle, 20 s; document GET p99
  then), and back to back for 60 s (the writer's documents/s: the sustained capacity, the background
  compactions and the ScaNN rebuilds the rebalance rule asks for as the index grows included).
  Targets: ≥ 1,000 documents/s; search p99 while 1,000 documents/s are written ≤ 2× idle; GET p99 ≤ 20 ms.

* the one-document upsert p50/p99, disk per write and the HTTP figures again on a 1,000,000-document
  index (full mode only; one run, the build takes minutes).

Quick mode (a smoke check, not figures): 5,000 documents, 3 writes per run, a 100-document batch.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import Figure, Stats, export_untrained_model

__all__ = ["run", "new_bytes", "WRITES", "BATCH"]

#: One-document writes per run (full mode).
WRITES = 20
#: Documents in the batch write (full mode).
BATCH = 1_000


def new_bytes(version_dir: Path) -> int:
    """Bytes of the files under ``version_dir`` that no other directory links to (written by this version)."""
    total = 0
    for root, _, files in os.walk(version_dir):
        for name in files:
            stat = os.lstat(os.path.join(root, name))
            if stat.st_nlink == 1:
                total += stat.st_size
    return total


def _one_document_writes(index_dir: Path, texts: list[str], *, start: int) -> tuple[list[float], list[int]]:
    """Upsert each text as a new document, one call each; (ms per write, new bytes per write)."""
    from dssm.index import current_version_dir
    from serving.searcher import Searcher

    searcher = Searcher.load(index_dir)
    times, sizes = [], []
    for offset, text in enumerate(texts):
        tick = time.perf_counter()
        searcher.upsert([(f"w{start + offset}", "", text)])
        times.append((time.perf_counter() - tick) * 1e3)
        sizes.append(new_bytes(current_version_dir(index_dir)))
        if offset == 0:  # the first write loaded the document tower: freeze it, as the writer child does
            _freeze_heap()
    return times, sizes


def _freeze_heap() -> None:
    """``gc.freeze()`` what this process holds, as ``serving.writer``'s child does after loading the tower.

    With TensorFlow loaded a full collection walks ~400k objects (~200 ms); one of them used to land
    inside a timed write of this process (p99 289-298 ms at 1M, 149-154 ms for a PUT, whose client is
    this process), where the service's writer child, frozen, does not pay it.
    """
    gc.collect()
    gc.freeze()


def run(*, quick: bool) -> list[Figure]:
    """One-document upsert latency and disk, and a batch upsert's rate, on a synthetic 100k index."""
    import dssm  # noqa: F401
    from bench import load_test, write_http
    from serving.searcher import Searcher

    import tensorflow as tf  # noqa: E402  isort: skip

    # As `dssm serve` runs it (--tf-threads 1): one worker's write.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    docs, writes, batch, repeats = (5_000, 3, 100, 2) if quick else (100_000, WRITES, BATCH, 3)
    new_texts = load_test.synthetic_texts(repeats * (writes + 1) + repeats * batch, seed=2)
    work = Path(tempfile.mkdtemp(prefix="bench-write-"))
    runs: dict[str, list[float]] = {"p50": [], "p99": [], "bytes": [], "batch_rate": []}
    try:
        model_dir = export_untrained_model(work / "model")
        _, setup = load_test.build_synthetic_index(work / "index", model_dir, docs, scann_mode="auto",
                                                   reorder_k=1500, min_recall=0.95)
        print(f"  index: {json.dumps(setup)}", flush=True)
        used = 0
        for _ in range(repeats):
            times, sizes = _one_document_writes(work / "index", new_texts[used:used + writes + 1], start=used)
            used += writes + 1
            times, sizes = times[1:], sizes[1:]  # the first write of a run loads the encoder's graph
            runs["p50"].append(float(np.percentile(times, 50)))
            runs["p99"].append(float(np.percentile(times, 99)))
            runs["bytes"].append(float(statistics.median(sizes)))
            chunk = new_texts[used:used + batch]
            searcher = Searcher.load(work / "index")
            searcher.upsert([(f"warm{used}", "", chunk[0])])  # loads the document graph, as a first write does
            tick = time.perf_counter()
            searcher.upsert([(f"w{used + i}", "", text) for i, text in enumerate(chunk)])
            runs["batch_rate"].append(len(chunk) / (time.perf_counter() - tick))
            used += batch
            print(f"  run: {json.dumps({k: v[-1] for k, v in runs.items()})}", flush=True)
        http = write_http.measure(work / "index", queries=load_test.synthetic_texts(500, seed=1),
                                  ids=[f"s{i}" for i in range(docs)], texts=load_test.synthetic_texts(480_000, seed=3),
                                  seconds=5.0 if quick else 20.0, write_seconds=5.0 if quick else 60.0)
        shutil.rmtree(work / "index")
        million = [] if quick else _million(work, model_dir, load_test.synthetic_texts(writes + 1, seed=4))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    corpus = f"{docs:,} synthetic docs, {setup['scann']['mode']}"
    note = "Searcher.upsert (= PUT /v1/documents): encode + update_index + publish, 1 TF thread"
    return [
        Figure("write", f"one-document upsert, p50, {corpus}", "ms", Stats.of(runs["p50"]), higher_is_better=False,
               note=f"{note}; {writes} writes per run; target ≤ 50 ms"),
        Figure("write", f"one-document upsert, p99, {corpus}", "ms", Stats.of(runs["p99"]), higher_is_better=False,
               note="target ≤ 200 ms"),
        Figure("write", "disk per one-document write", "MB", Stats.of([b / 1e6 for b in runs["bytes"]]),
               higher_is_better=False,
               note="bytes of the new version's files not hard-linked to an earlier version's; target ≤ 1 MB"),
        Figure("write", f"{batch:,}-document upsert", "docs/s", Stats.of(runs["batch_rate"]),
               note="one Searcher.upsert call, encoding included"),
        *_http_figures(http, corpus),
        *million,
    ]


def _million(work: Path, model_dir: Path, texts: list[str]) -> list[Figure]:
    """One run of one-document upserts, then the HTTP phases, on a 1M-document index (built once: minutes)."""
    from bench import load_test

    docs = 1_000_000
    _, setup = load_test.build_synthetic_index(work / "index-1m", model_dir, docs, scann_mode="auto", reorder_k=1500,
                                               min_recall=0.95)
    print(f"  index: {json.dumps(setup)}", flush=True)
    times, sizes = _one_document_writes(work / "index-1m", texts, start=0)
    times, sizes = times[1:], sizes[1:]  # the first write loads the encoder's graph
    corpus = f"{docs:,} synthetic docs, {setup['scann']['mode']}"
    from bench import write_http

    http = write_http.measure(work / "index-1m", queries=load_test.synthetic_texts(500, seed=1),
                              ids=[f"s{i}" for i in range(docs)], texts=load_test.synthetic_texts(480_000, seed=5),
                              seconds=20.0, write_seconds=60.0)
    return [
        *_http_figures(http, corpus, size=", 1M"),
        Figure("write", f"one-document upsert, p50, {corpus}", "ms", Stats.one(float(np.percentile(times, 50))),
               higher_is_better=False, note=f"one run of {len(times)} writes; target ≤ 50 ms"),
        Figure("write", f"one-document upsert, p99, {corpus}", "ms", Stats.one(float(np.percentile(times, 99))),
               higher_is_better=False, note="target ≤ 200 ms"),
        Figure("write", f"disk per one-document write, {corpus}", "MB",
               Stats.one(statistics.median(sizes) / 1e6), higher_is_better=False, note="target ≤ 1 MB"),
    ]


def _http_figures(http: dict, corpus: str, *, size: str = "") -> list[Figure]:
    """The HTTP phases' figures (one measurement each: no spread); ``size`` tells a second index's apart."""
    paced, free, many = http["paced"], http["unthrottled"], http["concurrent"]
    rate = f"{http['rate']:,.0f}"
    idle_s = f"{http['idle_seconds']:.0f}"

    def phase_note(phase: dict) -> str:
        return (f"dssm serve, 1 worker; 8 clients searching back to back, 1 fetching documents; "
                f"{phase['seconds']:.0f} s of writes, {phase['compactions']:.0f} background compactions, "
                f"slowest batch {(phase['batch_max_ms'] or 0) / 1e3:.1f} s")

    idle = Stats.one(http["idle_search_p99_ms"])
    return [
        Figure("write", f"one-document PUT /v1/documents through HTTP, p50, {corpus}", "ms",
               Stats.one(http["put_p50_ms"]), higher_is_better=False,
               note="20 PUTs one after the other, nothing else running; target ≤ 50 ms"),
        Figure("write", f"one-document PUT through HTTP, p99{size}", "ms", Stats.one(http["put_p99_ms"]),
               higher_is_better=False, note="target ≤ 200 ms"),
        Figure("write", f"HTTP writes in batches of 100, back to back, while 8 clients search, {corpus}", "docs/s",
               Stats.one(free["docs_per_s"]),
               note=f"the writer sends its next batch when the last is live; {phase_note(free)}; "
                    "target ≥ 1,000 docs/s"),
        Figure("write", f"search p99 during those writes{size}", "ms", Stats.one(free["search_p99_ms"]),
               peer_name="the same clients, no writes", peer=idle, higher_is_better=False,
               note="what writing as fast as the service allows costs the searchers (no target)"),
        Figure("write", f"HTTP writes in batches of 100 from {many['writers']} writers back to back, while 8 clients "
                        f"search{size}", "docs/s", Stats.one(many["docs_per_s"]),
               peer_name="one writer", peer=Stats.one(free["docs_per_s"]),
               note=f"each writer as the one above; the writes queued behind a running one share its successor's "
                    f"version (group commit: {http['merged']:,.0f} writes shared one, over the run); "
                    f"{phase_note(many)}; search p99 then {many['search_p99_ms']:.1f} ms"),
        Figure("write", f"HTTP writes paced at {rate} docs/s in batches of 100 while 8 clients search{size}", "docs/s",
               Stats.one(paced["docs_per_s"]),
               note=f"a batch every {100 / http['rate'] * 1e3:.0f} ms, sent at its slot on up to "
                    f"{paced.get('in_flight', 1)} connections (open loop; {paced.get('late_batches', 0)} slots "
                    f"found all busy); {phase_note(paced)}; below {rate} if the service cannot keep up"),
        Figure("write", f"search p99 during the paced writes{size}", "ms", Stats.one(paced["search_p99_ms"]),
               peer_name="the same clients, no writes, before and after",
               peer=Stats.one(http["idle_both_search_p99_ms"]), higher_is_better=False,
               note=f"target ≤ 2× idle while {rate} documents/s are written; idle = the searches of "
                    f"{idle_s} s before the writes and {idle_s} s after them, once every write was compacted "
                    f"(p99 {http['idle_search_p99_ms']:.1f} ms before, {http['idle_after_search_p99_ms']:.1f} ms "
                    f"after: {paced['search_p99_ms'] / http['idle_search_p99_ms']:.2f}× the first alone)"),
        Figure("write", f"document GET p99 during the paced writes{size}", "ms", Stats.one(paced["get_p99_ms"]),
               peer_name="no writes", peer=Stats.one(http["idle_both_get_p99_ms"]), higher_is_better=False,
               note="target ≤ 20 ms"),
    ]
