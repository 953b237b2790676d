"""quality: the eval report on quora-dev, cranfield and cisi — DSSM and the hybrid beside BM25.

The commands of ``bench/results_report.sh`` (which regenerates docs/results.md from the same runs), in
one process and a temporary work directory, with the default trainer (``dssm train`` without flags):

* quora-dev, the default recipe: ``dssm pairs --format neighbours`` on the corpus and ``dssm train``
  (label-free pre-training), ``dssm pairs --format quora --validation-fraction 0.2`` and ``dssm train
  --init-from PRETRAINED --epochs 10 --early-stopping-patience 0 --no-keep-best``, ``dssm index``,
  ``dssm eval --skip-self --holdout PAIRS`` (the held-out 20% of the questions);
* cranfield and cisi, label-free: ``dssm pairs --format corpus`` (pairs cut from the corpus alone),
  ``dssm train``, ``dssm index``, ``dssm eval``.

Quick mode runs the label-free recipe on adi (82 documents, 35 queries) instead: a smoke check of the
chain, not a quality figure. Figures are measured once (training is seeded and repeats on CPU):
nDCG@10 of ``dssm`` (the ScaNN index) and of ``hybrid`` (DSSM + BM25, weight tuned on 20% of the
queries, which are then left out of every system's evaluation) beside ``bm25`` (bm25s, Lucene scoring,
Elasticsearch-english-like tokenisation), and Recall@100 of dssm beside bm25's; the note gives the
paired-randomisation p-value of the difference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import DATASETS, Figure, Stats

__all__ = ["run", "commands"]


def commands(name: str, data: Path, work: Path) -> list[list[str]]:
    """The ``dssm`` command lines (without ``dssm``) results_report.sh runs for dataset ``name``."""
    pairs, model, index = str(work / "pairs"), str(work / "model"), str(work / "index")
    if name == "quora-dev":
        # The default recipe (dssm demo, docs/losses.md): label-free pre-training on BM25-neighbour
        # pairs of the corpus, then fine-tuning on the labelled pairs for a fixed 10 epochs, so the
        # held-out queries (the pairs' validation split) choose nothing.
        neighbours, pretrained = str(work / "neighbours"), str(work / "pretrained")
        return [["pairs", "--input", str(data / "corpus.jsonl"), "--format", "neighbours", "--output", neighbours,
                 "--validation-fraction", "0.05"],
                ["train", "--pairs", neighbours, "--output", pretrained, "--verbose", "2"],
                ["pairs", "--input", str(data / "pairs.tsv"), "--format", "quora", "--output", pairs,
                 "--validation-fraction", "0.2"],
                ["train", "--pairs", pairs, "--output", model, "--verbose", "2", "--init-from", pretrained,
                 "--epochs", "10", "--early-stopping-patience", "0", "--no-keep-best"],
                ["index", "--model", model, "--corpus", str(data / "corpus.jsonl"), "--output", index],
                ["eval", "--index", index, "--data", str(data), "--skip-self", "--holdout", pairs,
                 "--json", str(work / "eval.json")]]
    return [["pairs", "--input", str(data), "--format", "corpus", "--output", pairs],
            ["train", "--pairs", pairs, "--output", model, "--verbose", "2"],
            ["index", "--model", model, "--corpus", str(data / "corpus.jsonl"), "--output", index],
            ["eval", "--index", index, "--data", str(data), "--json", str(work / "eval.json")]]


def _p(report: dict[str, Any], a: str, b: str, metric: str) -> float | None:
    tests = report.get("significance", {})
    found = tests.get(f"{a} vs {b}") or tests.get(f"{b} vs {a}")
    return None if found is None else found.get(metric)


def _figures(name: str, report: dict[str, Any]) -> list[Figure]:
    label = f"{name} ({report['queries']} queries, {report['docs']:,} docs)" if "docs" in report else name
    out = []
    for system, metric in (("dssm", "ndcg@10"), ("hybrid", "ndcg@10"), ("dssm", "recall@100")):
        if system not in report or metric not in report[system]:
            continue
        p = _p(report, system, "bm25", metric)
        note = f"p = {p:.2g} (paired randomisation)" if p is not None else ""
        if system == "hybrid" and "hybrid_tuning" in report:
            note += f"; weight {report['hybrid_tuning']['weight']:.2f} on DSSM"
        out.append(Figure("quality", f"{metric} {system}, {label}", metric, Stats.one(report[system][metric]),
                          "BM25 (bm25s)", Stats.one(report["bm25"][metric]), note=note))
    return out


def run(*, quick: bool) -> list[Figure]:
    """Train, index and evaluate each dataset; nDCG@10 and Recall@100 beside BM25's."""
    from dssm.cli import main as dssm

    names = ["adi"] if quick else ["quora-dev", "cranfield", "cisi"]
    figures: list[Figure] = []
    root = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        for name in names:
            work = root / name
            for argv in commands(name, DATASETS / name, work):
                print(f"+ dssm {' '.join(argv)}", flush=True)
                code = dssm(argv)
                if code != 0:
                    raise RuntimeError(f"dssm {' '.join(argv)} exited with {code}")
            report = json.loads((work / "eval.json").read_text())
            figures += _figures(name, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures
