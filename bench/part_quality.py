"""quality: the default recipe on quora-dev, cranfield and cisi (seed 0): DSSM alone and the default search vs BM25.

The same commands as ``make quality`` (:func:`bench.quality_table.recipe`: what a user of the README
runs, nothing tuned on an evaluated query), for seed 0 only and in a temporary work directory:

* quora-dev: label-free pre-training on BM25-neighbour pairs of the corpus, fine-tuning on the
  labelled pairs outside the evaluated 20% (a mined second round that ``dssm select`` must approve),
  ``dssm index`` with the hybrid weight tuned on a tenth of those pairs, ``dssm eval --skip-self
  --holdout``;
* cranfield and cisi, label-free: towers pre-trained on pairs cut from the corpus and a ``dssm lsa``
  fit, the one ``dssm select`` prefers on the corpus pairs' split, ``dssm index`` (label-free hybrid
  weight), ``dssm eval``.

Quick mode runs the label-free recipe on adi (82 documents, 35 queries) instead: a smoke check of the
chain, not a quality figure. Figures: nDCG@10 of ``dssm`` (the index's ANN search, DSSM alone) and of
``hybrid`` (the default search: the fusion at the weight ``dssm index`` stored) beside ``bm25``
(bm25s, Lucene's k1 1.5 and b 0.75), and Recall@100 of dssm beside bm25's; the note gives the paired
randomisation p-value of the difference. Three seeds with MiniLM beside: docs/quality.md.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import DATASETS, Figure, Stats

__all__ = ["run"]

SEED = 0


def _p(report: dict[str, Any], a: str, b: str, metric: str) -> float | None:
    tests = report.get("significance", {})
    found = tests.get(f"{a} vs {b}") or tests.get(f"{b} vs {a}")
    return None if found is None else found.get(metric)


def _figures(name: str, report: dict[str, Any]) -> list[Figure]:
    label = f"{name} ({report['queries']} queries, {report['docs']:,} docs, seed {SEED})" if "docs" in report else name
    out = []
    for system, metric in (("dssm", "ndcg@10"), ("hybrid", "ndcg@10"), ("dssm", "recall@100")):
        if system not in report or metric not in report[system]:
            continue
        p = _p(report, system, "bm25", metric)
        note = "DSSM alone" if system == "dssm" else "the default search"
        note += f"; p = {p:.2g} (paired randomisation)" if p is not None else ""
        if system == "hybrid" and "hybrid_tuning" in report:
            note += f"; weight {report['hybrid_tuning']['weight']:.2f} on DSSM, stored by dssm index"
        out.append(Figure("quality", f"{metric} {system}, {label}", metric, Stats.one(report[system][metric]),
                          "BM25 (bm25s)", Stats.one(report["bm25"][metric]), note=note))
    return out


def _in_process(argv: list[str], log: Path) -> float:
    """One ``dssm`` command in this process (the part's output shows it; ``log`` names it)."""
    from dssm.cli import main as dssm

    with open(log, "a") as handle:
        handle.write("$ dssm " + " ".join(argv) + "\n")
    print(f"+ dssm {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = dssm(argv)
    if code != 0:
        raise RuntimeError(f"dssm {' '.join(argv)} exited with {code}")
    return time.perf_counter() - start


def run(*, quick: bool) -> list[Figure]:
    """Run the default recipe on each set (seed 0); nDCG@10 and Recall@100 beside BM25's."""
    from bench.quality_table import run_set

    names = ["adi"] if quick else ["quora-dev", "cranfield", "cisi"]
    figures: list[Figure] = []
    root = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        for name in names:
            run_set(name, seeds=[SEED], work=root, reuse=False, data_root=DATASETS, run_command=_in_process)
            report = json.loads((root / name / f"seed{SEED}" / "eval.json").read_text())
            figures += _figures(name, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures
