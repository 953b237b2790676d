"""Assemble docs/results.md from the reports ``bench/results_report.sh`` wrote (called by that script).

Reads ``WORK/{quora,cranfield,cisi}/report/{metrics,per_query}.json``, the models' ``config.json`` and
``history.json``, the pairs' ``stats.json`` and ``WORK/quora/thresholds.json``; writes one Markdown page
whose images point at ``docs/results/NAME/*.png`` (the script copies them there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

from dssm.evaluate import ALL_SYSTEMS
from dssm.metrics import SystemResult
from dssm.report import markdown_report

__all__ = ["main"]

_DATASETS = (
    ("quora", "quora-dev (held-out queries)",
     "The default recipe: label-free pre-training on BM25-neighbour pairs of the corpus (`dssm pairs --format "
     "neighbours`), then fine-tuning (`--init-from`, a fixed 10 epochs, so the held-out queries choose nothing) "
     "on the duplicate pairs of the 80% of first questions in the train split of `dssm pairs --format quora "
     "--validation-fraction 0.2`. The held-out queries' texts are corpus documents, so pre-training has seen "
     "them (without their labels); docs/losses.md measures the recipe on unseen query texts too. Evaluated on the "
     "retrieval view's queries whose text is in the held-out 20% (`--holdout`), with `--skip-self` (each "
     "query's own text is in the corpus under its id)."),
    ("cranfield", "cranfield (label-free)",
     "Label-free: `dssm pairs --format corpus` cuts (title → body, sentence → rest) pairs from the corpus "
     "alone; no query or relevance judgement is used for training. Graded qrels (1–4) for nDCG."),
    ("cisi", "cisi (label-free)",
     "Label-free, as for cranfield. CISI's queries are long library-science requests; binary qrels."),
)

_COMMANDS = {
    "quora": ["dssm pairs --input $DATA/quora-dev/corpus.jsonl --format neighbours --output $W/neighbours "
              "--validation-fraction 0.05",
              "dssm train --pairs $W/neighbours --output $W/pretrained",
              "dssm pairs --input $DATA/quora-dev/pairs.tsv --format quora --output $W/pairs --validation-fraction 0.2",
              "dssm train --pairs $W/pairs --output $W/model --init-from $W/pretrained --epochs 10 "
              "--early-stopping-patience 0 --no-keep-best",
              "dssm index --model $W/model --corpus $DATA/quora-dev/corpus.jsonl --output $W/index",
              "dssm eval --index $W/index --data $DATA/quora-dev --skip-self --holdout $W/pairs --report $W/report "
              "--save-weight",
              "dssm thresholds --index $W/index --pairs $DATA/quora-dev/pairs.tsv --holdout $W/pairs "
              "--json $W/thresholds.json --plot $W/report/thresholds.png --save"],
    "corpus": ["dssm pairs --input $DATA/NAME --format corpus --output $W/pairs",
               "dssm train --pairs $W/pairs --output $W/model",
               "dssm index --model $W/model --corpus $DATA/NAME/corpus.jsonl --output $W/index",
               "dssm eval --index $W/index --data $DATA/NAME --report $W/report --save-weight"],
}


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


# Display order (the JSON files are written with sorted keys).
_METRIC_ORDER = ("recall@1", "recall@5", "recall@10", "recall@100", "precision@10", "mrr@10", "ndcg@10", "map@100")


def _results(report_dir: Path) -> tuple[list[SystemResult], dict[str, Any]]:
    report = _load(report_dir / "metrics.json")
    per_query = _load(report_dir / "per_query.json")
    results = []
    for name in (n for n in ALL_SYSTEMS if n in per_query):
        metrics = [m for m in _METRIC_ORDER if m in report[name]] + sorted(set(report[name]) - set(_METRIC_ORDER))
        results.append(SystemResult(name=name, means={m: report[name][m] for m in metrics},
                                    per_query={m: per_query[name][m] for m in metrics}))
    return results, report


def _p(report: dict[str, Any], a: str, b: str, metric: str) -> float:
    tests = report["significance"]
    return (tests.get(f"{a} vs {b}") or tests[f"{b} vs {a}"])[metric]


def _summary(work: Path) -> list[str]:
    lines = ["## Summary", "",
             "nDCG@10 per system; the differences to BM25 with their paired-randomisation p-values.", "",
             "| dataset | queries | dssm | bm25 | hybrid-rrf | hybrid (w) | dssm − bm25 | hybrid − bm25 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, title, _ in _DATASETS:
        report = _load(work / name / "report" / "metrics.json")
        m = "ndcg@10"
        d, h = report["dssm"][m] - report["bm25"][m], report["hybrid"][m] - report["bm25"][m]
        lines.append(f"| {title} | {report['queries']} | {report['dssm'][m]:.4f} | {report['bm25'][m]:.4f} | "
                     f"{report['hybrid-rrf'][m]:.4f} | {report['hybrid'][m]:.4f} "
                     f"({report['hybrid_tuning']['weight']:.2f}) | {d:+.4f} (p={_p(report, 'dssm', 'bm25', m):.2g}) | "
                     f"{h:+.4f} (p={_p(report, 'hybrid', 'bm25', m):.2g}) |")
    data = _load(work / "quora" / "thresholds.json")
    at = data["test"][f"at_best_{data['objective']}_threshold"]
    lines += ["", f"Quora duplicate classification on held-out test pairs at the saved threshold "
                  f"{at['threshold']:.4f} (best {data['objective']} on the tuning pairs): accuracy "
                  f"{at['accuracy']:.4f}, F1 {at['f1']:.4f}; average precision "
                  f"{data['test']['average_precision']:.4f}.",
              ""]
    return lines


def _training(work: Path) -> str:
    config = _load(work / "model" / "config.json")
    history = _load(work / "model" / "history.json")
    stats = _load(work / "pairs" / "stats.json")
    train, model = config.get("train", {}), config.get("model", {})
    loss = history.get("loss", [None])[-1] if isinstance(history, dict) else None
    parts = [f"{stats.get('train', '?')} training pairs ({stats.get('validation', '?')} validation)",
             f"{train.get('epochs', '?')} epochs, batch {train.get('batch_size', '?')}, "
             f"{train.get('optimizer', '?')} lr {train.get('learning_rate', '?')}",
             f"towers {'shared' if model.get('shared_towers', True) else 'separate'}, "
             f"output dim {(model.get('hidden_dims') or ['?'])[-1]}"]
    if isinstance(loss, float):
        parts.append(f"final training loss {loss:.4f}")
    return "; ".join(parts)


def _thresholds_section(path: Path) -> list[str]:
    data = _load(path)
    objective = data["objective"]
    out = ["## Quora duplicate classification", "",
           "`dssm thresholds` scores each labelled pair of quora-dev's `pairs.tsv` by the cosine of the two "
           "questions' query-tower embeddings (the towers are shared, so either tower gives the same vector). "
           "Only pairs whose first question is in the held-out split of the model's training pairs are used; "
           f"they are split into tuning and test parts ({data['split']}). Thresholds are chosen on the tuning "
           "part; the figures below are on the **test** part.", "",
           "| threshold chosen for (on tuning pairs) | threshold | accuracy | precision | recall | F1 |",
           "|---|---:|---:|---:|---:|---:|"]
    for name in ("accuracy", "f1"):
        at = data["test"][f"at_best_{name}_threshold"]
        mark = " (saved)" if name == objective else ""
        out.append(f"| best {name}{mark} | {at['threshold']:.4f} | {at['accuracy']:.4f} | {at['precision']:.4f} | "
                   f"{at['recall']:.4f} | {at['f1']:.4f} |")
    test = data["test"]
    out += ["", f"{test['pairs']} test pairs ({test['duplicates']} duplicates), "
                f"{data['tuning']['pairs']} tuning pairs. Average precision on the test pairs: "
                f"{test['average_precision']:.4f}. The chosen threshold ({objective}) is stored in the index "
                "(`--save`: `duplicate_threshold` in the manifest, `thresholds.json`), so `Searcher.similarity` "
                "and `/v1/similarity` return `is_duplicate`.", "",
            "![cosine histogram of duplicate and non-duplicate test pairs](results/quora/thresholds.png)", ""]
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the page. Returns 0."""
    parser = argparse.ArgumentParser(prog="results_md", description=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="the script's work directory")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--seconds", type=int, default=None, help="wall time of the whole script")
    args = parser.parse_args(argv)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Results: DSSM against BM25, hybrids, duplicate detection",
        "",
        f"Generated by `bench/results_report.sh` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC at commit "
        f"`{commit or 'unknown'}`"
        + (f", {args.seconds / 60:.1f} minutes end to end on 2 shared CPU cores" if args.seconds else "")
        + ". Every number below comes from the commands listed per dataset (`$DATA` = `../shared/datasets`, "
        "`$W` = `work/results/NAME`); rerun the script to regenerate this page. Models use the default "
        "recipe of that commit: on quora-dev, label-free pre-training on the corpus then fine-tuning on the "
        "labelled pairs; on cranfield and cisi, `dssm train` without flags on pairs cut from the corpus. "
        "The script keeps that recipe (trained towers only; the hybrid weight tuned on a fifth of the "
        "queries) for its per-system comparisons, plots and TREC runs; today's default recipe (a `dssm lsa` fit "
        "where `dssm select` prefers it, a mined second round, the weight `dssm index` stores) is measured in "
        "[quality.md](quality.md) (3 seeds, MiniLM beside) and, for one seed, by `make bench PART=quality`.",
        "",
        "Systems (all on the same queries): `dssm` = the index's ScaNN search; `dssm-exact` = brute force over "
        "the stored embeddings (ANN loss = the gap to `dssm`; these corpora are under 20k documents, so the "
        "index is itself brute force and the two coincide); `bm25` = bm25s, Lucene scoring, k1 1.5, b 0.75, "
        "Elasticsearch-english-like tokenisation (`dssm/bm25.py`); `hybrid-rrf` = reciprocal-rank fusion "
        "(k = 60) of dssm and bm25; `hybrid` = convex combination w·DSSM + (1−w)·BM25 of per-query min-max "
        "normalised exact scores over the union of both top-100 lists, w tuned for nDCG@10 on a "
        "deterministic 20% of the queries (sha1 of the query id) that are then left out of every system's "
        "evaluation (`--save-weight` stores it in the index, so `dssm search --mode hybrid` uses it). Metrics "
        "follow trec_eval (nDCG with linear gain; see `dssm/evaluate.py`).",
        "",
    ]
    lines += _summary(args.work)
    for name, title, setup in _DATASETS:
        work = args.work / name
        results, report = _results(work / "report")
        images = [("Recall@k per system", f"results/{name}/recall_at_k.png"),
                  ("per-query nDCG@10, dssm minus bm25", f"results/{name}/ndcg_diff_dssm_vs_bm25.png"),
                  ("per-query nDCG@10, hybrid minus bm25", f"results/{name}/ndcg_diff_hybrid_vs_bm25.png")]
        commands = _COMMANDS["quora" if name == "quora" else "corpus"]
        lines += [markdown_report(results, report, title=title, images=[]), "", setup, "",
                  f"Training: {_training(work)}.", "", "```", *(c.replace("NAME", name) for c in commands), "```", ""]
        lines += [f"![{caption}]({path})" + "\n" for caption, path in images]
    lines += _thresholds_section(args.work / "quora" / "thresholds.json")
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    return 0
