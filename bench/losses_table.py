"""Every ``dssm train --loss`` on the same data: quora-dev held-out retrieval and STS-B dev Spearman.

Regenerates the table of docs/losses.md (issue 3). Each loss trains the default tower (whatever
``ModelConfig()`` is at the commit measured) with the default trainer, except ``--loss`` and a fixed
number of epochs (``--epochs E --early-stopping-patience 0 --no-keep-best``: the pairs' validation
split *is* the held-out query set that ``dssm eval --holdout`` scores, so picking the epoch on it
would tune on the test queries); the numbers come from the same CLI commands a user runs:

quora-dev (``$DATA/quora-dev``), one split for every loss::

    dssm pairs --input $DATA/quora-dev/pairs.tsv --format quora --output $W/pairs --validation-fraction 0.2
    dssm pairs ... --output $W/pairs-negatives --negatives-as-third-input     # contrastive
    dssm mine --index $W/softmax/index --pairs $W/pairs --output $W/pairs-mined  # contrastive-mined
    dssm train --pairs $W/pairs --output $W/LOSS/model --loss LOSS --epochs E --early-stopping-patience 0 \
        --no-keep-best
    dssm index --model $W/LOSS/model --corpus $DATA/quora-dev/corpus.jsonl --output $W/LOSS/index
    dssm eval --index $W/LOSS/index --data $DATA/quora-dev --skip-self --holdout $W/pairs \\
        --json $W/LOSS/eval.json --report $W/LOSS/report

Every loss sees the same pairs file: the score-matrix losses and simcse its duplicate pairs (simcse
only their question texts, and the non-duplicates' too), cosent and classifier also the
non-duplicates (label 0). contrastive trains on the pairs with Quora's non-duplicates attached as
third inputs (few attach: a non-duplicate is attached only to a positive pair of the same question),
contrastive-mined on the same positives with one negative each mined by ``dssm mine`` from the
softmax model's index of the corpus (the top-ranked document that is not the pair's positive).
``dssm eval`` scores the held-out queries (their text in the pairs'
validation split) with dssm, bm25 and the hybrids; BM25 is the same for every loss. Each loss's
per-query nDCG@10 is compared with softmax's by the paired randomisation test of ``dssm eval``.

Hyperparameters: every loss runs with its defaults. In addition, one hyperparameter each of softmax
(temperature), triplet and hard-negative (margin), circle (gamma) and cosent (scale) is chosen on an *inner* split (the
train split's rows only, split again with ``--split-salt inner``) by the trainer's validation
MRR@10 after the fixed epochs; a choice other than the default is then trained on the whole train
split and evaluated on the held-out queries like the rest.

STS-B (``$DATA/stsb``): the ``split == train`` rows as ``text1, text2, score`` →
``dssm pairs --format quora`` (the score is the label) → ``dssm train --loss cosent`` (and
``--loss softmax --min-label 3`` for comparison: pairs scored above 3 as positives); then the
Spearman correlation between the cosine of the two sentences (query tower on both, as
``Searcher.similarity``) and the gold score on the ``dev`` rows. CoSENT's ``--cosent-scale`` is chosen
by Spearman on the STS-B validation split (the 10% of the train rows ``dssm pairs`` holds out; dev
plays no part), and every STS-B model is trained with ``--seed 0..N-1`` (mean, min, max reported).
The quora-trained models get the same (zero-shot) STS-B figure.

Seed spread on quora-dev: softmax and the best tuned setting of the other losses (by inner-split
validation MRR@10, not by held-out numbers) are retrained with ``--seed 1..N-1``.

    python bench/losses_table.py [--data DIR] [--work DIR] [--epochs 10] [--losses NAME ...] [--reuse]
                                 [--json docs/losses.json] [--markdown docs/losses_table.md]

``--reuse`` keeps whatever a previous run left in ``--work`` (pairs, models, evals) and only runs what
is missing; delete a loss's directory to redo it. Models, indexes and logs stay in ``--work``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import DATASETS, ROOT  # noqa: E402

__all__ = ["main", "spearman_on_stsb", "markdown"]

LOSS_ORDER = ("softmax", "triplet", "hard-negative", "circle", "contrastive", "contrastive-mined", "cosent",
              "classifier", "simcse")
_DSSM = Path(sys.executable).with_name("dssm")
#: One hyperparameter per loss, chosen by validation MRR@10 on the inner split: (flag, config field, values).
#: The default is whatever ModelConfig / LossConfig say at the commit measured.
GRID: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "softmax": ("--temperature", "temperature", (0.05, 0.1, 0.2)),
    "triplet": ("--margin", "margin", (0.1, 0.2, 0.4, 0.8)),
    "hard-negative": ("--margin", "margin", (0.1, 0.2, 0.4, 0.8)),
    "circle": ("--circle-gamma", "circle_gamma", (16.0, 32.0, 64.0, 256.0)),
    "cosent": ("--cosent-scale", "cosent_scale", (2.0, 5.0, 10.0, 20.0)),
}
#: CoSENT's scale on STS-B, chosen by Spearman on the STS-B validation split; 20 is Su 2022's value.
COSENT_SCALES = (2.0, 5.0, 10.0, 20.0)
PAPER_COSENT_SCALE = 20.0


def _default(field_name: str) -> float:
    from dssm.losses import LossConfig
    from dssm.model import ModelConfig

    for config in (ModelConfig(), LossConfig()):
        if hasattr(config, field_name):
            return float(getattr(config, field_name))
    raise KeyError(field_name)


def _shown(cmd: list[str], placeholders: dict[str, str]) -> str:
    """The command as docs show it: ``dssm ...`` with ``$DATA``/``$W`` for the directories."""
    text = " ".join(cmd)
    for value, name in placeholders.items():
        text = text.replace(value, name)
    return text.replace(str(_DSSM), "dssm")


def _run(cmd: list[str], *, log: Path, shown: list[str], placeholders: dict[str, str]) -> float:
    """Run a ``dssm`` command (output to ``log``), record it with ``$DATA``/``$W`` placeholders; seconds taken."""
    text = _shown(cmd, placeholders)
    shown.append(text)
    print(f"+ {text}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}), see {log}:\n{text}\n" + log.read_text()[-3000:])
    return seconds


def _stsb_rows(data: Path, split: str) -> list[tuple[str, str, float]]:
    with open(data / "stsb" / "pairs.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["text1"], r["text2"], float(r["score"])) for r in rows if r["split"] == split]


def spearman_on_stsb(model_dir: Path, rows: list[tuple[str, str, float]]) -> float:
    """Spearman correlation of cos(query tower(text1), query tower(text2)) with the gold scores."""
    import numpy as np
    from scipy.stats import spearmanr

    from dssm.export import load_encoder

    encoder = load_encoder(model_dir)
    a = encoder.embed_queries([r[0] for r in rows])
    b = encoder.embed_queries([r[1] for r in rows])
    return float(spearmanr(np.sum(a * b, axis=1), [r[2] for r in rows]).statistic)


def _inner_pairs(data: Path, quora: Path, run: Any) -> Path:
    """Pairs made from the *train* split's rows only, split again (salt "inner"): hyperparameters are
    chosen on its validation queries, so the held-out queries of the table never pick a setting."""
    from dssm.data import split_of

    inner = quora / "inner"
    inner.mkdir(parents=True, exist_ok=True)
    with open(data / "quora-dev" / "pairs.tsv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
                if split_of(r["text1"], validation_fraction=0.2) == "train"]
    (inner / "train-rows.tsv").write_text("text1\ttext2\tis_duplicate\n" + "".join(
        f"{r['text1']}\t{r['text2']}\t{r['is_duplicate']}\n" for r in rows))
    run(["pairs", "--input", str(inner / "train-rows.tsv"), "--format", "quora", "--output", str(inner / "pairs"),
         "--validation-fraction", "0.2", "--split-salt", "inner"], inner / "pairs.log",
        done=inner / "pairs" / "manifest.json", fresh=inner / "pairs")
    return inner / "pairs"


def _split_rows(pairs_dir: Path, split: str) -> list[tuple[str, str, float]]:
    """``(query text, document text, label)`` of every pair in a pairs directory's ``split`` shards."""
    import tensorflow as tf

    from dssm.inputs import pair_files

    rows = []
    for record in tf.data.TFRecordDataset(pair_files(pairs_dir, split), compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        rows.append((feature["query_text"].bytes_list.value[0].decode(),
                     feature["document_text"].bytes_list.value[0].decode(), feature["label"].float_list.value[0]))
    return rows


def _seed_mean_per_query(work: Path, names: list[str], metric: str = "ndcg@10") -> dict[str, float]:
    runs = [json.loads((work / "quora" / name / "report" / "per_query.json").read_text())["dssm"][metric]
            for name in names]
    return {q: sum(run[q] for run in runs) / len(runs) for q in runs[0]}


def _paired_p(a: dict[str, float], b: dict[str, float]) -> float:
    from dssm.metrics import paired_randomization_test

    return paired_randomization_test(a, b)


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


def _history(model_dir: Path) -> dict[str, Any]:
    history = json.loads((model_dir / "history.json").read_text())
    epochs = history.get("epoch", [])
    row = epochs.index(history["weights_epoch"]) if history.get("weights_epoch") in epochs else -1
    return {"epochs_trained": len(epochs), "weights_epoch": history.get("weights_epoch"),
            "stopped_early": history.get("stopped_early"), "train_pairs": history.get("train_pairs"),
            "val_recall_at_10": (history.get("val_recall_at_10") or [None])[row],
            "wall_seconds": history.get("wall_seconds")}


def _significance(work: Path, loss: str, metric: str = "ndcg@10") -> dict[str, float] | None:
    """Paired randomisation test of ``loss``'s dssm against softmax's dssm on the per-query ``metric``."""
    from dssm.metrics import paired_randomization_test

    if loss == "softmax":
        return None
    ours = json.loads((work / "quora" / loss / "report" / "per_query.json").read_text())["dssm"][metric]
    base = json.loads((work / "quora" / "softmax" / "report" / "per_query.json").read_text())["dssm"][metric]
    if set(ours) != set(base):
        raise SystemExit(f"{loss} and softmax were evaluated on different queries")
    diff = sum(ours[q] - base[q] for q in ours) / len(ours)
    return {"difference": diff, "p": paired_randomization_test(ours, base)}


def _vs(r: dict[str, Any]) -> str:
    sig = r.get("vs_softmax")
    return "—" if sig is None else f"{sig['difference']:+.4f} (p={sig['p']:.2g})"


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/losses.md from the JSON result."""
    q = result["quora"]
    bm25 = q["bm25"]
    lines = [f"quora-dev held-out queries: {q['queries']} queries, {q['docs']} documents. "
             f"BM25 on the same queries: nDCG@10 **{bm25['ndcg@10']:.4f}**, Recall@10 **{bm25['recall@10']:.4f}**.",
             "", "| loss | trained on | nDCG@10 | Recall@10 | MRR@10 | nDCG@10 − BM25 | vs softmax (p) "
             "| hybrid nDCG@10 | STS-B dev Spearman (zero-shot) | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name: str, r: dict[str, Any]) -> str:
        return (f"| {name} | {r['trained_on']} | {r['dssm']['ndcg@10']:.4f} | {r['dssm']['recall@10']:.4f} | "
                f"{r['dssm']['mrr@10']:.4f} | {r['dssm']['ndcg@10'] - bm25['ndcg@10']:+.4f} | {_vs(r)} | "
                f"{r['hybrid'].get('ndcg@10', float('nan')):.4f} | {r.get('stsb_dev_spearman', float('nan')):.4f} | "
                f"{r['train']['wall_seconds']:.0f} |")

    for loss in [name for name in LOSS_ORDER if name in q["losses"]]:
        lines.append(row(loss, q["losses"][loss]))
    tuning = q.get("tuning") or {}
    if tuning:
        lines += ["", "Tuned: one hyperparameter per loss chosen by validation MRR@10 on the *inner* split (the train "
                  "split's rows only; the held-out queries play no part); a choice other than the default trained "
                  "on the whole train split and evaluated as above:", "",
                  "| loss | flag | inner validation MRR@10 per value | chosen | held-out nDCG@10 | Recall@10 | "
                  "vs softmax (p) |", "|---|---|---|---:|---:|---:|---:|"]
        for loss, t in tuning.items():
            grid = ", ".join(f"{v}: {g['val_mrr_at_10']:.4f}{'*' if float(v) == t['default'] else ''}"
                             for v, g in t["grid"].items())
            r = t.get("held_out") or q["losses"][loss]
            lines.append(f"| {loss} | `{t['flag']}` | {grid} | {t['best']:g} | {r['dssm']['ndcg@10']:.4f} | "
                         f"{r['dssm']['recall@10']:.4f} | {_vs(r)} |")
        lines.append("")
        lines.append("(* the default value)")
    seeds = q.get("seeds") or {}
    if seeds:
        n = result["settings"]["seeds"]
        lines += ["", f"Seed spread ({n} seeds: `--seed 0..{n - 1}`, same data and split):", "",
                  "| setting | nDCG@10 mean (min–max) | Recall@10 mean (min–max) |", "|---|---:|---:|"]
        for name, r in seeds.items():
            lines.append(f"| {name} | {r['ndcg@10']['mean']:.4f} ({r['ndcg@10']['min']:.4f}–{r['ndcg@10']['max']:.4f}) "
                         f"| {r['recall@10']['mean']:.4f} ({r['recall@10']['min']:.4f}–{r['recall@10']['max']:.4f}) |")
        for name, r in seeds.items():
            if "vs_softmax" in r:
                sig = r["vs_softmax"]
                lines += ["", f"{name} − softmax, per-query nDCG@10 averaged over the {n} seeds first: "
                          f"{sig['difference']:+.4f} (paired randomisation test p={sig['p']:.2g}); "
                          "per seed: " + ", ".join(f"{x - y:+.4f}" for x, y in zip(
                              r["ndcg@10"]["values"], seeds["softmax"]["ndcg@10"]["values"], strict=True)) + "."]
    corpora = result.get("corpora") or {}
    if corpora:
        lines += ["", "The same settings on label-free corpora (`dssm pairs --format corpus`: title → body and "
                  "sentence → rest-of-document pairs; all queries evaluated, no held-out split needed):", "",
                  "| corpus | queries / documents | setting | nDCG@10 | Recall@10 | BM25 nDCG@10 |",
                  "|---|---|---|---:|---:|---:|"]
        for corpus, results in corpora.items():
            for name, r in results.items():
                lines.append(f"| {corpus} | {r['queries']} / {r['docs']} | {name} | {r['dssm']['ndcg@10']:.4f} | "
                             f"{r['dssm']['recall@10']:.4f} | {r['bm25']['ndcg@10']:.4f} |")
    st = result.get("stsb")
    if st:
        n = result["settings"]["seeds"]
        grid = ", ".join(f"{k}: {v:.4f}" for k, v in st["cosent_scale_grid"].items())
        lines += ["", f"STS-B: trained on the {st['train_rows']} `train` rows (`dssm pairs` keeps 10% of them as its "
                  f"validation split: {st['validation_rows']} pairs), Spearman on the {st['dev_rows']} `dev` rows "
                  "(cosine of the query tower's embeddings of both sentences vs the gold 0–5 score). cosent's "
                  f"`--cosent-scale` by Spearman on the validation split: {grid} → {st['cosent_scale']:g}.", "",
                  f"| model | trained on | STS-B dev Spearman, mean of {n} seeds (min–max) |", "|---|---|---:|"]
        for name, r in st["models"].items():
            sp = r["spearman"]
            lines.append(f"| {name} (`{r['flags']}`) | {r['trained_on']} | {sp['mean']:.4f} "
                         f"({sp['min']:.4f}–{sp['max']:.4f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATASETS, help="the shared datasets directory")
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "losses", help="artifacts and logs")
    parser.add_argument("--epochs", type=int, default=10, help="dssm train --epochs for every model")
    parser.add_argument("--losses", nargs="+", default=list(LOSS_ORDER), choices=LOSS_ORDER)
    parser.add_argument("--no-stsb", action="store_true", help="skip the STS-B part")
    parser.add_argument("--corpora", nargs="*", default=["cranfield", "cisi"],
                        help="label-free corpora (BEIR dirs in --data) on which softmax and the best tuned rival "
                             "are also compared (pairs --format corpus)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds (0..N-1) for the seed-spread rows (softmax, the best tuned rival, STS-B)")
    parser.add_argument("--no-tune", action="store_true",
                        help="skip choosing softmax/triplet/hard-negative/circle's hyperparameter on the inner split")
    parser.add_argument("--reuse", action="store_true", help="keep what --work already holds, run what is missing")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "losses.json")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    if "softmax" not in args.losses:
        parser.error("--losses must include softmax (every other loss is compared with it; its index is mined)")
    data, work = args.data.resolve(), args.work.resolve()
    if work.exists() and not args.reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    placeholders = {str(work): "$W", str(data): "$DATA"}
    commands: list[str] = []
    made: set[Path] = set()  # outputs written by this run (a second request for one reuses it)
    start = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]

    def run(cmd: list[str], log: Path, *, done: Path, fresh: Path) -> float:
        """Run ``dssm CMD`` unless ``--reuse`` and ``done`` exists; ``fresh`` is deleted first. Seconds taken."""
        if done.exists() and (args.reuse or done in made):
            commands.append(_shown([str(_DSSM), *cmd], placeholders))
            return 0.0
        shutil.rmtree(fresh, ignore_errors=True)
        made.add(done)
        return _run([str(_DSSM), *cmd], log=log, shown=commands, placeholders=placeholders)

    quora = work / "quora"
    pairs = {"plain": quora / "pairs", "negatives": quora / "pairs-negatives"}
    for kind, directory in pairs.items():
        run(["pairs", "--input", str(data / "quora-dev" / "pairs.tsv"), "--format", "quora", "--output",
             str(directory), "--validation-fraction", "0.2",
             *(["--negatives-as-third-input"] if kind == "negatives" else [])], quora / f"pairs-{kind}.log",
            done=directory / "manifest.json", fresh=directory)
    pair_stats = {kind: json.loads((d / "stats.json").read_text()) for kind, d in pairs.items()}

    stsb_dev = _stsb_rows(data, "dev") if not args.no_stsb else []
    def fixed_epochs(epochs: int) -> list[str]:
        return ["--epochs", str(epochs), "--early-stopping-patience", "0", "--no-keep-best", "--verbose", "2"]

    fixed = fixed_epochs(args.epochs)
    trained_on = {"softmax": "duplicate pairs", "triplet": "duplicate pairs", "hard-negative": "duplicate pairs",
                  "circle": "duplicate pairs",
                  "contrastive": f"duplicate pairs, {pair_stats['negatives'].get('with_negative', 0)} "
                                 "with an attached non-duplicate",
                  "contrastive-mined": "duplicate pairs, each with a mined negative",
                  "cosent": "duplicate + non-duplicate pairs (0/1)",
                  "classifier": "duplicate + non-duplicate pairs (0/1)",
                  "simcse": "question texts only (no labels)"}

    def quora_model(name: str, loss: str, source: Path, flags: list[str]) -> dict[str, Any]:
        """Train ``loss`` on ``source`` into ``quora/name``, index the corpus, evaluate the held-out queries."""
        w = quora / name
        model, index, report = w / "model", w / "index", w / "report"
        seconds: dict[str, float] = {}
        seconds["train"] = run(["train", "--pairs", str(source), "--output", str(model), "--loss", loss, *flags,
                                *fixed], w / "train.log", done=model / "manifest.json", fresh=w)
        seconds["index"] = run(["index", "--model", str(model), "--corpus", str(data / "quora-dev" / "corpus.jsonl"),
                                "--output", str(index)], w / "index.log", done=index / "CURRENT", fresh=index)
        # Always held out by the plain pairs' split: the other pairs runs split the same queries the same way.
        seconds["eval"] = run(["eval", "--index", str(index), "--data", str(data / "quora-dev"), "--skip-self",
                               "--holdout", str(pairs["plain"]), "--json", str(w / "eval.json"), "--report",
                               str(report)], w / "eval.log", done=w / "eval.json", fresh=report)
        metrics = json.loads((w / "eval.json").read_text())
        config = json.loads((model / "config.json").read_text())
        out = {"trained_on": trained_on[name.split("@")[0]], "flags": " ".join(flags), "dssm": metrics["dssm"],
               "bm25": metrics["bm25"], "hybrid": metrics.get("hybrid", {}), "queries": metrics["queries"],
               "docs": metrics["docs"], "train": _history(model), "model": config["model"],
               "loss_config": config.get("loss"), "seconds": seconds}
        if stsb_dev:
            out["stsb_dev_spearman"] = spearman_on_stsb(model, stsb_dev)
        print(f"  {name}: nDCG@10 {metrics['dssm']['ndcg@10']:.4f}  Recall@10 {metrics['dssm']['recall@10']:.4f}  "
              f"(bm25 {metrics['bm25']['ndcg@10']:.4f})", flush=True)
        return out

    losses: dict[str, Any] = {}
    for loss in [name for name in LOSS_ORDER if name in args.losses]:
        source = {"contrastive": pairs["negatives"], "contrastive-mined": quora / "pairs-mined"}.get(
            loss, pairs["plain"])
        if loss == "contrastive-mined":
            run(["mine", "--index", str(quora / "softmax" / "index"), "--pairs", str(pairs["plain"]), "--output",
                 str(source)], quora / "mine.log", done=source / "manifest.json", fresh=source)
        losses[loss] = quora_model(loss, loss.removesuffix("-mined"), source, [])

    tuning: dict[str, Any] = {}
    if not args.no_tune:
        inner = _inner_pairs(data, quora, run)
        for loss, (flag, field_name, values) in GRID.items():
            if loss not in losses:
                continue
            default = _default(field_name)
            grid = {}
            for value in values:
                w = quora / "inner" / f"{loss}@{flag.lstrip('-')}={value:g}"
                run(["train", "--pairs", str(inner), "--output", str(w / "model"), "--loss", loss, flag, f"{value:g}",
                     *fixed], w / "train.log", done=w / "model" / "manifest.json", fresh=w)
                history = json.loads((w / "model" / "history.json").read_text())
                grid[f"{value:g}"] = {"val_mrr_at_10": history["val_mrr_at_10"][-1],
                                      "val_recall_at_10": history["val_recall_at_10"][-1]}
            # A tie keeps the default.
            best = max(values, key=lambda v: (grid[f"{v:g}"]["val_mrr_at_10"], v == default))
            tuning[loss] = {"flag": flag, "default": default, "grid": grid, "best": best,
                            "name": f"{loss}@{flag.lstrip('-')}={best:g}" if best != default else loss}
            print(f"  inner split {loss}: {flag} {best:g} (val MRR@10 {grid[f'{best:g}']['val_mrr_at_10']:.4f})",
                  flush=True)
            if best != default:
                tuning[loss]["held_out"] = quora_model(tuning[loss]["name"], loss, pairs["plain"],
                                                       [flag, f"{best:g}"])

    # Seed spread of softmax and of the inner split's best setting of any other loss (chosen without
    # the held-out queries), each retrained with --seed 1..N-1.
    seeds: dict[str, Any] = {}
    if args.seeds > 1:
        rival = max((t for loss, t in tuning.items() if loss != "softmax"),
                    key=lambda t: t["grid"][f"{t['best']:g}"]["val_mrr_at_10"], default=None)
        picks = [("softmax", "softmax", [])]
        if rival is not None:
            loss = rival["name"].split("@")[0]
            flags = [rival["flag"], f"{rival['best']:g}"] if rival["best"] != rival["default"] else []
            picks.append((rival["name"], loss, flags))
        for name, loss, flags in picks:
            base = losses[name] if name in losses else tuning[loss]["held_out"]
            runs = [base] + [quora_model(f"{name}@seed={seed}", loss, pairs["plain"], [*flags, "--seed", str(seed)])
                             for seed in range(1, args.seeds)]
            seeds[name] = {metric: _spread([r["dssm"][metric] for r in runs]) for metric in ("ndcg@10", "recall@10")}
            seeds[name]["runs"] = [name] + [f"{name}@seed={seed}" for seed in range(1, args.seeds)]
        if rival is not None:
            # Per-query nDCG@10 averaged over the seeds (training noise averaged out), then the paired test.
            a, b = (_seed_mean_per_query(work, seeds[name]["runs"]) for name in (picks[1][0], "softmax"))
            seeds[picks[1][0]]["vs_softmax"] = {"difference": sum(a[q] - b[q] for q in a) / len(a),
                                                "p": _paired_p(a, b)}

    for loss in losses:
        losses[loss]["vs_softmax"] = _significance(work, loss)
    for entry in tuning.values():
        if "held_out" in entry:
            entry["held_out"]["vs_softmax"] = _significance(work, entry["name"])
    first = losses["softmax"]
    evaluated = list(losses.values()) + [t["held_out"] for t in tuning.values() if "held_out" in t]
    if any(r["queries"] != first["queries"] or r["bm25"] != first["bm25"] for r in evaluated):
        raise SystemExit("the losses were not evaluated on the same queries (BM25 differs)")

    result: dict[str, Any] = {
        "settings": {"train_flags": " ".join(fixed), "other flags": "defaults of the commit measured",
                     "validation_fraction": 0.2, "seeds": args.seeds},
        "quora": {"queries": first["queries"], "docs": first["docs"], "bm25": first["bm25"], "losses": losses,
                  "tuning": tuning, "seeds": seeds, "pairs": pair_stats},
    }
    if not args.no_stsb:
        stsb = work / "stsb"
        stsb.mkdir(exist_ok=True)
        train_rows = _stsb_rows(data, "train")
        tsv = stsb / "train.tsv"
        tsv.write_text("text1\ttext2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in train_rows))
        run(["pairs", "--input", str(tsv), "--format", "quora", "--output", str(stsb / "pairs")], stsb / "pairs.log",
            done=stsb / "pairs" / "manifest.json", fresh=stsb / "pairs")
        validation = _split_rows(stsb / "pairs", "validation")

        def stsb_model(name: str, flags: list[str]) -> Path:
            model = stsb / name / "model"
            run(["train", "--pairs", str(stsb / "pairs"), "--output", str(model), *flags, *fixed],
                stsb / name / "train.log", done=model / "manifest.json", fresh=stsb / name)
            return model

        # cosent's scale on the STS-B validation split (10% of the train rows; dev plays no part).
        default_scale = _default("cosent_scale")

        def cosent_name(scale: float) -> str:
            return "cosent" if scale == default_scale else f"cosent@cosent-scale={scale:g}"

        scale_grid = {}
        for scale in COSENT_SCALES:
            model = stsb_model(cosent_name(scale), ["--loss", "cosent", "--cosent-scale", f"{scale:g}"])
            scale_grid[f"{scale:g}"] = spearman_on_stsb(model, validation)
        chosen = max(COSENT_SCALES, key=lambda v: (scale_grid[f"{v:g}"], v == default_scale))
        print(f"  stsb validation: cosent --cosent-scale {chosen:g} (Spearman {scale_grid[f'{chosen:g}']:.4f})",
              flush=True)
        models: dict[str, Any] = {}
        for tag, flags, what in (
                ("cosent", ["--loss", "cosent"], f"all train pairs, graded 0–5 (default scale {default_scale:g})"),
                (cosent_name(chosen), ["--loss", "cosent", "--cosent-scale", f"{chosen:g}"],
                 "all train pairs, graded 0–5; scale chosen on the validation split"),
                (cosent_name(PAPER_COSENT_SCALE), ["--loss", "cosent", "--cosent-scale", f"{PAPER_COSENT_SCALE:g}"],
                 "all train pairs, graded 0–5; Su 2022's scale"),
                ("softmax", ["--loss", "softmax", "--min-label", "3"], "train pairs scored > 3 as positives")):
            if tag in models:
                continue
            spearman = []
            for seed in range(max(args.seeds, 1)):
                model = stsb_model(f"{tag}@seed={seed}" if seed else tag,
                                   [*flags, *(["--seed", str(seed)] if seed else [])])
                spearman.append(spearman_on_stsb(model, stsb_dev))
            models[tag] = {"trained_on": what, "flags": " ".join(flags), "spearman": _spread(spearman),
                           "train": _history(stsb / tag / "model")}
            print(f"  stsb {tag}: dev Spearman {models[tag]['spearman']['mean']:.4f} "
                  f"({models[tag]['spearman']['min']:.4f}-{models[tag]['spearman']['max']:.4f})", flush=True)
        result["stsb"] = {"train_rows": len(train_rows), "dev_rows": len(stsb_dev),
                          "validation_rows": len(validation), "cosent_scale_grid": scale_grid,
                          "cosent_scale": chosen, "models": models}
    if args.corpora and seeds:
        # Does the quora winner carry over? Label-free pairs cut from long-document corpora.
        settings = [("softmax", "softmax", [])]
        for name in seeds:
            if name != "softmax":
                t = tuning[name.split("@")[0]]
                settings.append((name, name.split("@")[0], [t["flag"], f"{t['best']:g}"] if "@" in name else []))
        corpora: dict[str, Any] = {}
        for corpus in args.corpora:
            w = work / corpus
            run(["pairs", "--input", str(data / corpus), "--format", "corpus", "--output", str(w / "pairs")],
                w / "pairs.log", done=w / "pairs" / "manifest.json", fresh=w / "pairs")
            corpora[corpus] = {}
            for name, loss, flags in settings:
                m = w / name
                run(["train", "--pairs", str(w / "pairs"), "--output", str(m / "model"), "--loss", loss, *flags,
                     *fixed], m / "train.log", done=m / "model" / "manifest.json", fresh=m)
                run(["index", "--model", str(m / "model"), "--corpus", str(data / corpus / "corpus.jsonl"), "--output",
                     str(m / "index")], m / "index.log", done=m / "index" / "CURRENT", fresh=m / "index")
                run(["eval", "--index", str(m / "index"), "--data", str(data / corpus), "--systems", "dssm,bm25",
                     "--json", str(m / "eval.json")], m / "eval.log", done=m / "eval.json", fresh=m / "eval.json")
                metrics = json.loads((m / "eval.json").read_text())
                corpora[corpus][name] = {"dssm": metrics["dssm"], "bm25": metrics["bm25"],
                                         "queries": metrics["queries"], "docs": metrics["docs"]}
                print(f"  {corpus} {name}: nDCG@10 {metrics['dssm']['ndcg@10']:.4f} "
                      f"(bm25 {metrics['bm25']['ndcg@10']:.4f})", flush=True)
        result["corpora"] = corpora
    result["commands"] = commands
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["load_average"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    result["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "dssm", "pipelines", "serving"],
                           capture_output=True, text=True).stdout.strip()
    result["commit"] = commit.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    table = markdown(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    print("\n" + table)
    print(f"wrote {args.json} in {result['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
