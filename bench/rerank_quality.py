"""Issue 13's quality table: hybrid+rerank beside the first stages, by the commands a user runs.

Reuses the towers and indexes of ``make quality`` (``work/quality/SET/seedN/index``, built by
``bench/quality_table.py``) and, per set and seed, runs::

    dssm train-reranker --pairs PAIRS --index INDEX --output work/quality/SET/seedN/reranker-DESIGN \
        --design DESIGN --seed N --max-queries Q --epochs E
    dssm attach-reranker --index INDEX --reranker work/quality/SET/seedN/reranker-DESIGN
    dssm eval --index INDEX --data DATA --systems dssm,bm25,hybrid,hybrid+rerank --rerank R --json ...

PAIRS is the set's labelled pairs (quora-dev, debian-dev) or its label-free corpus pairs (the other
sets). Nothing is selected on evaluated queries: the trainer chooses its fusion weights on a hashed
tenth of the training pairs it does not train on, and the design is chosen by ``--select-design``
on seed 0 of the sets named there by that same held-out MRR@10 (printed, and saved in the JSON).

Writes ``docs/rerank.json`` (every figure and command) and ``docs/rerank.table.md``.

    python -m bench.rerank_quality [--sets quora-dev,debian-dev,cranfield,cisi,adi] [--design conv-knrm]

``--train-flags="--first-stage-term"`` passes more flags to ``dssm train-reranker``; ``--tag=-joint`` then
keeps that run's re-ranker directories and eval files apart from the default run's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets"
WORK = ROOT / "work" / "quality"
# quora-dev: the pairs the quality table's recipe fine-tuned on (bench.quality_table.USER_SPLIT: its own
# pairs split holds the evaluated queries); the re-ranker holds out a tenth of their train split.
LABELLED = {"quora-dev": "user-pairs", "debian-dev": "pairs"}
EVAL_FLAGS = {"quora-dev": ["--skip-self", "--holdout", str(WORK / "quora-dev" / "pairs")]}
SYSTEMS = ("dssm", "bm25", "hybrid", "hybrid+rerank")
# nDCG@10 is the figure; depth 10 keeps the re-ranked depth at --rerank (eval re-ranks max(rerank, depth)).
METRICS = "ndcg@10,mrr@10,recall@10"
DSSM = str(Path(sys.executable).parent / "dssm")


def _run(command: list[str], log: Path) -> None:
    with open(log, "a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
    began = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=sys.stderr)
    with open(log, "a") as handle:
        handle.write(f"# {time.perf_counter() - began:.0f} s\n")


def _held_out_mrr(reranker: Path) -> dict[str, Any]:
    history = json.loads((reranker / "history.json").read_text())
    config = json.loads((reranker / "config.json").read_text())
    hybrid = history["fusion_curves"].get("hybrid", {})
    curve = hybrid.get("mrr_at_10", {})
    share = config["fusion"].get("hybrid", 1.0)
    return {"queries": hybrid.get("queries", 0), "reranker_alone": curve.get("0.0"), "first_stage": curve.get("1.0"),
            "chosen_share": share, "chosen": curve.get(f"{share:.1f}"), "p_value": curve.get("p_value"),
            "first_stage_weight": config.get("first_stage_weight", 0.0), "training_seconds": history.get("seconds")}


def run_one(name: str, seed: int, design: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train, attach and evaluate one set/seed; returns nDCG@10 per system and the held-out curve."""
    seed_dir = WORK / name / f"seed{seed}"
    index, reranker = seed_dir / "index", seed_dir / f"reranker-{design}{args.tag}"
    pairs = WORK / name / LABELLED.get(name, "corpus_pairs")
    log = WORK / name / "rerank_commands.log"
    _run([DSSM, "train-reranker", "--pairs", str(pairs), "--index", str(index), "--output", str(reranker),
          "--design", design, "--seed", str(seed), "--max-queries", str(args.max_queries), "--epochs", str(args.epochs),
          "--overwrite", *args.train_flags.split()], log)
    _run([DSSM, "attach-reranker", "--index", str(index), "--reranker", str(reranker)], log)
    out = seed_dir / f"eval-rerank-{design}{args.tag}.json"
    _run([DSSM, "eval", "--index", str(index), "--data", str(DATA / name), "--systems", ",".join(SYSTEMS),
          "--metrics", METRICS,
          "--rerank", str(args.rerank), "--json", str(out), *EVAL_FLAGS.get(name, [])], log)
    report = json.loads(out.read_text())
    return {"ndcg@10": {s: report[s]["ndcg@10"] for s in SYSTEMS}, "queries": report["queries"],
            "significance": report.get("significance", {}), "held_out": _held_out_mrr(reranker)}


def _table(results: dict[str, Any]) -> str:
    lines = ["| set | design | queries | DSSM | BM25 | hybrid | hybrid+rerank | ÷ best first stage | held-out MRR@10 "
             "(first stage → fused, share) |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, entry in results["sets"].items():
        runs = entry["runs"]

        def stat(system: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [r["ndcg@10"][system] for r in runs]
            return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")

        best = max(statistics.mean(r["ndcg@10"][s] for r in runs) for s in ("dssm", "bm25", "hybrid"))
        ratio = statistics.mean(r["ndcg@10"]["hybrid+rerank"] for r in runs) / best
        held = ", ".join(f"{h['first_stage']:.3f}→{h['chosen']:.3f} ({h['chosen_share']})"
                         for h in (r["held_out"] for r in runs) if h["first_stage"] is not None)
        lines.append(f"| {name} | {entry['design']} | {runs[0]['queries']} | {stat('dssm')} | {stat('bm25')} | "
                     f"{stat('hybrid')} | {stat('hybrid+rerank')} | {ratio:.3f} | {held} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the table (see the module doc)."""
    parser = argparse.ArgumentParser(prog="python -m bench.rerank_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="debian-dev,quora-dev,cisi,cranfield,adi")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--design", default=None, help="skip the selection and use this design")
    parser.add_argument("--select-design", default="debian-dev", help="sets whose seed 0 chooses the design")
    parser.add_argument("--max-queries", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rerank", type=int, default=50)
    parser.add_argument("--output", default=str(ROOT / "docs" / "rerank"))
    parser.add_argument("--train-flags", default="", help="more `dssm train-reranker` flags, e.g. '--first-stage-term'")
    parser.add_argument("--tag", default="", help="suffix of the re-ranker directories and eval files, so runs with "
                        "other --train-flags keep theirs")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    results: dict[str, Any] = {"commit": commit, "settings": vars(args), "selection": {}, "sets": {}}
    design = args.design
    if design is None:
        for name in args.select_design.split(","):
            for candidate in ("knrm", "conv-knrm"):
                results["selection"][f"{name}/{candidate}"] = run_one(name, 0, candidate, args)
        design = max(("knrm", "conv-knrm"), key=lambda d: statistics.mean(
            results["selection"][f"{n}/{d}"]["held_out"]["chosen"] for n in args.select_design.split(",")))
        print(f"design chosen on held-out training queries: {design}", file=sys.stderr)
    results["design"] = design
    for name in args.sets.split(","):
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            reuse = results["selection"].get(f"{name}/{design}") if seed == 0 else None
            runs.append(reuse or run_one(name, seed, design, args))
        results["sets"][name] = {"design": design, "runs": runs}
        Path(args.output + ".json").write_text(json.dumps(results, indent=2) + "\n")
        Path(args.output + ".table.md").write_text(_table(results))
    print(_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
