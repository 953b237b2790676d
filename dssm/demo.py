"""``dssm demo``: the main job end to end on real data, through the same commands a user runs.

pairs → train → index → eval → three sample searches, on a quora-dev-style directory (``pairs.tsv``
with ``text1 text2 is_duplicate`` plus the BEIR retrieval view). Training sees the duplicate pairs of
the queries in the train split only; evaluation runs on the held-out rest (``--holdout``), with BM25
beside DSSM on the same queries.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dssm.errors import InputError

__all__ = ["main"]


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _call(module: str, argv: list[str]) -> None:
    import importlib

    print("$ dssm", {"pipelines.make_pairs": "pairs", "dssm.train": "train", "pipelines.encode_corpus": "index",
                     "dssm.evaluate": "eval", "serving.searcher": "search"}[module], " ".join(argv), flush=True)
    code = importlib.import_module(module).main(argv)
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    """Run the demo. Returns 0 on success."""
    parser = argparse.ArgumentParser(prog="dssm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="quora-dev-style directory: pairs.tsv + corpus.jsonl, queries.jsonl, qrels.tsv")
    parser.add_argument("--workdir", type=Path, default=Path("work/demo"), help="where artifacts are written")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the trainer's)")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of queries held out from training and used for evaluation")
    args = parser.parse_args(argv)

    for name in ("pairs.tsv", "corpus.jsonl", "queries.jsonl", "qrels.tsv"):
        if not (args.data / name).is_file():
            raise InputError(f"demo data directory {args.data} lacks {name}")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    pairs, model, index = work / "pairs", work / "model", work / "index"
    timings = {}

    start = _step("1/5 pairs: Quora pairs → hashed letter-trigram TFRecord shards (Beam, DirectRunner)")
    _call("pipelines.make_pairs", ["--input", str(args.data / "pairs.tsv"), "--format", "quora",
                                   "--output", str(pairs), "--validation-fraction", str(args.validation_fraction)])
    timings["pairs"] = time.perf_counter() - start

    start = _step("2/5 train: two-tower DSSM on the train split's duplicate pairs")
    # --overwrite: the demo is re-runnable on the same workdir (a fresh model and checkpoints each time).
    _call("dssm.train", ["--pairs", str(pairs), "--output", str(model), "--overwrite"]
          + (["--epochs", str(args.epochs)] if args.epochs else []))
    timings["train"] = time.perf_counter() - start

    start = _step("3/5 index: encode the corpus with the document tower, build ScaNN")
    _call("pipelines.encode_corpus", ["--model", str(model), "--corpus", str(args.data / "corpus.jsonl"),
                                      "--output", str(index)])
    timings["index"] = time.perf_counter() - start

    start = _step("4/5 eval: held-out queries, DSSM vs BM25")
    report = work / "eval.json"
    _call("dssm.evaluate", ["--index", str(index), "--data", str(args.data), "--skip-self",
                            "--holdout", str(pairs), "--json", str(report)])
    timings["eval"] = time.perf_counter() - start

    start = _step("5/5 search: three held-out queries")
    from dssm.data import read_queries, split_of

    config = json.loads((pairs / "pairs_config.json").read_text())
    held_out = [text for text in read_queries(args.data / "queries.jsonl").values()
                if split_of(text, validation_fraction=config["validation_fraction"],
                            salt=config.get("split_salt", "")) == "validation"]
    for text in held_out[:3]:
        _call("serving.searcher", ["--index", str(index), "-k", "3", text])
    timings["search"] = time.perf_counter() - start

    print("\nseconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; total {sum(timings.values()):.0f}")
    print(f"artifacts in {work}/: pairs/, model/, index/, eval.json")
    return 0
