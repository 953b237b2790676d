"""``dssm eval-tags``: tagging figures of one or more tags indexes on labelled texts, with paired tests.

Each system is a tags index (``--index NAME=DIR``; all must hold the same labels). For every
labelled text it scores every label (:class:`serving.tagger.Tagger`), then reports
(:func:`dssm.tag_metrics.tag_metrics`) micro/macro F1 at the index's stored threshold (or
``--threshold``), precision@k and recall@k, and mAP over labels; a paired randomisation test between
every two systems on the per-text F1 and precision@1; and a per-label table. Output, as ``dssm eval``:
``metrics.json``, ``per_text.json``, ``results.md`` (tables), ``precision_recall_at_k.png``, and a
readable table on stdout.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dssm.artifacts import write_json_atomic
from dssm.errors import InputError
from dssm.metrics import paired_randomization_test
from dssm.report import pyplot
from dssm.tag_data import label_matrix, read_tagged
from dssm.tag_metrics import RANK_CUTS, TagResult, per_label_table, tag_metrics
from serving.searcher import Searcher
from serving.tagger import TAG_MODES, Tagger

__all__ = ["evaluate_taggers", "tag_significance", "format_tag_table", "write_tag_report", "main"]

_TABLE_METRICS = ("micro_f1", "macro_f1", "micro_precision", "micro_recall", "p@1", "p@3", "r@5", "map")
_PAIRED = ("f1", "p@1")


def evaluate_taggers(taggers: Mapping[str, Tagger], data: str | Path, *, threshold: float | None = None,
                     text_column: str = "text", labels_column: str = "labels",
                     separator: str = ",") -> tuple[list[TagResult], int]:
    """Every system's :class:`TagResult` on the labelled texts in ``data``; ``(results, number of texts)``.

    Raises:
        InputError: the indexes hold different labels, or ``data`` names a label they lack.
    """
    first = next(iter(taggers.values()))
    for name, tagger in taggers.items():
        if sorted(tagger.labels) != sorted(first.labels):
            raise InputError(f"tags index {name!r} holds other labels than the first one "
                             f"({len(tagger.labels)} vs {len(first.labels)})")
    texts = read_tagged(data, known_labels=first.labels, text_column=text_column, labels_column=labels_column,
                        separator=separator)
    ids = [t.id for t in texts]
    results = []
    for name, tagger in taggers.items():
        scores = tagger.scores([t.text for t in texts])
        chosen = tagger.threshold if threshold is None else threshold
        results.append(tag_metrics(name, scores, label_matrix(texts, tagger.labels), text_ids=ids,
                                   labels=tagger.labels, threshold=chosen))
    return results, len(texts)


def tag_significance(results: Sequence[TagResult], *, trials: int = 10_000) -> dict[str, dict[str, float]]:
    """``{"A vs B": {metric: p}}``: paired randomisation over texts, per-text F1 and precision@1."""
    out: dict[str, dict[str, float]] = {}
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            tests = {}
            for metric in _PAIRED:
                va = {t: v[metric] for t, v in a.per_text.items() if metric in v}
                vb = {t: v[metric] for t, v in b.per_text.items() if metric in v}
                if va and set(va) == set(vb):
                    tests[metric] = paired_randomization_test(va, vb, trials=trials)
            out[f"{a.name} vs {b.name}"] = tests
    return out


def format_tag_table(results: Sequence[TagResult]) -> str:
    """Markdown table: one row per system, the threshold and :data:`_TABLE_METRICS`."""
    lines = ["| system | threshold | " + " | ".join(_TABLE_METRICS) + " |",
             "|---|---:|" + "---:|" * len(_TABLE_METRICS)]
    for r in results:
        threshold = "" if r.threshold is None else f"{r.threshold:.4f}"
        cells = [f"{r.means[m]:.4f}" if m in r.means else "" for m in _TABLE_METRICS]
        lines.append(f"| {r.name} | {threshold} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(path: Path, results: Sequence[TagResult]) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, r in enumerate(results):
        ax.plot(RANK_CUTS, [r.means[f"p@{k}"] for k in RANK_CUTS], marker="o", linestyle="-",
                color=f"C{i}", label=f"{r.name} precision@k")
        ax.plot(RANK_CUTS, [r.means[f"r@{k}"] for k in RANK_CUTS], marker="s", linestyle="--",
                color=f"C{i}", label=f"{r.name} recall@k")
    ax.set_xticks(RANK_CUTS)
    ax.set_ylim(0, 1)
    ax.set_xlabel("k (labels returned)")
    ax.set_title("Tagging: precision@k and recall@k")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_tag_report(directory: str | Path, results: Sequence[TagResult], *, report: dict[str, Any]) -> list[Path]:
    """``metrics.json``, ``per_text.json``, ``results.md`` and the precision/recall plot in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "metrics.json", report)
    write_json_atomic(directory / "per_text.json", {r.name: r.per_text for r in results})
    plot = _plot(directory / "precision_recall_at_k.png", results)
    parts = [f"# Tagging, {report['texts']} texts, {report['labels']} labels", "", format_tag_table(results), ""]
    if report["significance"]:
        parts += ["Paired randomisation p-values (per-text F1, precision@1):", ""]
        parts += [f"- {pair}: " + ", ".join(f"{m} p = {p:.4f}" for m, p in tests.items())
                  for pair, tests in report["significance"].items()]
        parts.append("")
    parts += [f"![precision and recall at k]({plot.name})", ""]
    for r in results:
        parts += [f"## Per label: {r.name}", "", per_label_table(r), ""]
    (directory / "results.md").write_text("\n".join(parts))
    return [directory / "metrics.json", directory / "per_text.json", plot, directory / "results.md"]


def _systems(values: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name, path = (name, path) if sep else (Path(value).name, value)
        if name in out:
            raise InputError(f"system name {name!r} given twice (use --index NAME=DIR)")
        out[name] = Path(path)
    return out


def main(argv: list[str] | None = None) -> int:
    """``dssm eval-tags --data FILE --index [NAME=]DIR [--index ...] [--output DIR] [--threshold X] [--json]``."""
    parser = argparse.ArgumentParser(prog="dssm eval-tags", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="labelled texts to evaluate on (as `dssm train-tags --train`)")
    parser.add_argument("--index", action="append", required=True,
                        help="a tags index, NAME=DIR or DIR (repeat to compare systems)")
    parser.add_argument("--output", help="report directory (metrics.json, per_text.json, results.md, plot)")
    parser.add_argument("--threshold", type=float, help="decision threshold for every system (default: each "
                        "index's stored one; an index without one gets ranking metrics only)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--labels-column", default="labels")
    parser.add_argument("--separator", default=",", help="between labels in a CSV/TSV cell")
    parser.add_argument("--json", action="store_true", help="print metrics.json instead of the table")
    parser.add_argument("--mode", choices=TAG_MODES, default="dense",
                        help="tagging mode of every system (see `dssm tag --mode`)")
    args = parser.parse_args(argv)
    taggers = {name: Tagger(Searcher.load(path), mode=args.mode) for name, path in _systems(args.index).items()}
    results, count = evaluate_taggers(taggers, args.data, threshold=args.threshold, text_column=args.text_column,
                                      labels_column=args.labels_column, separator=args.separator)
    report = {"data": str(args.data), "texts": count, "labels": len(next(iter(taggers.values())).labels),
              "systems": [r.as_dict() for r in results], "significance": tag_significance(results)}
    if args.output:
        write_tag_report(args.output, results, report=report)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_tag_table(results))
        for pair, tests in report["significance"].items():
            print(f"{pair}: " + ", ".join(f"{m} p = {p:.4f}" for m, p in tests.items()))
    return 0
