"""Evaluation reports: Markdown tables, TREC run files, PNG plots (matplotlib, Agg backend).

``dssm eval --report DIR`` calls :func:`write_report`, which writes::

    DIR/metrics.json          the --json object (systems, queries, docs, significance, hybrid_tuning)
    DIR/per_query.json        {system: {metric: {query id: value}}}
    DIR/results.md            the metrics table, p-values, tuning, the plots embedded
    DIR/runs/SYSTEM.trec      one TREC run per system ("qid Q0 docid rank score system")
    DIR/recall_at_k.png       Recall@k against k, one curve per system
    DIR/ndcg_diff_A_vs_B.png  per-query nDCG@10 of A minus B, sorted (A = dssm and hybrid, B = bm25;
                              and each re-ranked system X+rerank against its first stage X)

Plot and table functions take the data and a path; nothing here decides what to evaluate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dssm.artifacts import write_json_atomic
from dssm.errors import InputError
from dssm.metrics import Qrels, Run, SystemResult, mean_metrics, per_query_metrics, trec_run_lines

__all__ = [
    "pyplot",
    "RECALL_CUTS",
    "recall_curve",
    "markdown_table",
    "markdown_significance",
    "markdown_report",
    "plot_recall_curves",
    "plot_metric_difference",
    "write_report",
]

#: Cut-offs of the Recall@k plot.
RECALL_CUTS: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 30, 50, 100)
_ALPHA = 0.05


def recall_curve(run: Run, qrels: Qrels, cuts: Sequence[int] = RECALL_CUTS) -> dict[int, float]:
    """Mean Recall@k of ``run`` for each ``k`` in ``cuts``."""
    means = mean_metrics(per_query_metrics(run, qrels, [f"recall@{k}" for k in cuts]))
    return {k: means[f"recall@{k}"] for k in cuts}


def markdown_table(results: Sequence[SystemResult]) -> str:
    """Systems as rows, metrics as columns, the best value of each column in bold."""
    if not results:
        return "(no systems)"
    metrics = list(results[0].means)
    best = {m: max(r.means[m] for r in results) for m in metrics}
    lines = ["| system | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for r in results:
        cells = [f"**{r.means[m]:.4f}**" if r.means[m] >= best[m] - 1e-12 else f"{r.means[m]:.4f}" for m in metrics]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_significance(results: Sequence[SystemResult], tests: Mapping[str, Mapping[str, float]], *,
                          pairs: Sequence[tuple[str, str]]) -> str:
    """p-values (paired randomisation) for chosen pairs: one row per pair, the mean difference's sign.

    Each cell is ``+0.0123 (p=0.004)``: mean of A minus mean of B, and the two-sided p-value; cells
    with p < 0.05 are bold.
    """
    by_name = {r.name: r for r in results}
    rows = [(a, b) for a, b in pairs if a in by_name and b in by_name and (f"{a} vs {b}" in tests
                                                                            or f"{b} vs {a}" in tests)]
    if not rows:
        return "(no comparisons)"
    metrics = list(results[0].means)
    lines = ["| A vs B | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for a, b in rows:
        values = tests.get(f"{a} vs {b}") or tests[f"{b} vs {a}"]
        cells = []
        for m in metrics:
            diff = by_name[a].means[m] - by_name[b].means[m]
            cell = f"{diff:+.4f} (p={values[m]:.3g})"
            cells.append(f"**{cell}**" if values[m] < _ALPHA else cell)
        lines.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _default_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    pairs = [(n, "bm25") for n in names if n != "bm25"]
    if "dssm" in names and "dssm-exact" in names:
        pairs.append(("dssm", "dssm-exact"))
    if "hybrid" in names and "hybrid-rrf" in names:
        pairs.append(("hybrid", "hybrid-rrf"))
    return pairs + _reranked_pairs(names)


def _reranked_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """``(X+rerank, X)`` for every re-ranked system whose first stage X is also in ``names``."""
    return [(n, n.removesuffix("+rerank")) for n in names
            if n.endswith("+rerank") and n.removesuffix("+rerank") in names]


def markdown_report(results: Sequence[SystemResult], report: Mapping[str, Any], *, title: str,
                    images: Sequence[tuple[str, str]] = (), heading: str = "##") -> str:
    """A Markdown section: metrics table, significance, hybrid tuning, embedded images.

    Args:
        results: the systems.
        report: the ``dssm eval`` JSON object (for counts, significance and tuning).
        title: section title.
        images: ``(caption, relative path)`` pairs to embed.
        heading: Markdown heading level of the section.
    """
    names = [r.name for r in results]
    out = [f"{heading} {title}", "",
           f"{report.get('queries')} queries, {report.get('docs')} documents.", "", markdown_table(results), ""]
    tests = report.get("significance") or {}
    if tests:
        trials = int(report.get("significance_trials", 10_000))
        out += [f"Mean difference and two-sided p-value of a paired randomisation test ({trials:,} random sign "
                f"flips of the per-query differences; the smallest reachable p is 1/{trials + 1:,} = "
                f"{1 / (trials + 1):.2g}; bold: p < 0.05):", "",
                markdown_significance(results, tests, pairs=_default_pairs(names)), ""]
    tuning = report.get("hybrid_tuning")
    if tuning:
        # a weight tuned on queries names its split; one stored in the index (`dssm index`) names its source
        source = (f"weight tuned for {tuning['tuning_metric']} on {tuning['tuning_queries']} tuning queries "
                  f"({tuning['tuning_split']})" if "tuning_metric" in tuning else f"weight {tuning['source']}")
        out += [f"`hybrid` = {tuning['weight']:.2f} x DSSM + {1 - tuning['weight']:.2f} x BM25 "
                f"({tuning['normalization']} per query), {source}.", ""]
    for caption, path in images:
        out += [f"![{caption}]({path})", ""]
    return "\n".join(out)


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    # deferred: matplotlib, imported only when this runs
    import matplotlib

    matplotlib.use("Agg")
    # deferred: matplotlib, imported only when this runs
    import matplotlib.pyplot as plt

    return plt


def plot_recall_curves(path: str | Path, curves: Mapping[str, Mapping[int, float]], *, title: str) -> Path:
    """Recall@k against k (log axis), one line per system; writes a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    markers = "osD^vP*X"
    for i, (name, curve) in enumerate(curves.items()):
        ks = sorted(curve)
        # Distinct markers and dashes, so identical curves (ANN = exact on small indexes) stay visible.
        ax.plot(ks, [curve[k] for k in ks], marker=markers[i % len(markers)], markersize=5 + (i % 2) * 2,
                linestyle="--" if i % 2 else "-", label=name, alpha=0.85)
    ax.set_xscale("log")
    ks = sorted({k for c in curves.values() for k in c})
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_ylim(0, 1)
    ax.set_xlabel("k")
    ax.set_ylabel("mean Recall@k")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_metric_difference(path: str | Path, a: SystemResult, b: SystemResult, *, metric: str = "ndcg@10",
                           title: str) -> Path:
    """Per-query ``metric`` of ``a`` minus ``b``, sorted descending, as bars; wins/ties/losses in the legend."""

    if metric not in a.per_query or metric not in b.per_query:
        raise InputError(f"metric {metric!r} is not in both systems' results")
    qids = sorted(a.per_query[metric])
    diff = np.sort(np.array([a.per_query[metric][q] - b.per_query[metric].get(q, 0.0) for q in qids]))[::-1]
    wins, losses = int((diff > 1e-12).sum()), int((diff < -1e-12).sum())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    x = np.arange(diff.size)
    colors = np.where(diff > 0, "tab:blue", np.where(diff < 0, "tab:red", "tab:gray"))
    ax.bar(x, diff, width=1.0, color=colors, linewidth=0)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(float(diff.mean()), color="tab:green", linestyle="--", linewidth=1,
               label=f"mean {diff.mean():+.4f}")
    ax.set_xlim(-0.5, diff.size - 0.5)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel(f"queries, sorted ({wins} {a.name} better, {diff.size - wins - losses} tied, "
                  f"{losses} {b.name} better)")
    ax.set_ylabel(f"{metric}: {a.name} - {b.name}")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(directory: str | Path, *, results: Sequence[SystemResult], runs: Mapping[str, Run], qrels: Qrels,
                 report: Mapping[str, Any], title: str) -> list[Path]:
    """Write every report file (see the module docstring) into ``directory`` (created).

    Returns:
        The paths written.
    """

    directory = Path(directory)
    (directory / "runs").mkdir(parents=True, exist_ok=True)
    written = []
    write_json_atomic(directory / "metrics.json", dict(report))
    write_json_atomic(directory / "per_query.json", {r.name: r.per_query for r in results})
    written += [directory / "metrics.json", directory / "per_query.json"]
    for r in results:
        path = directory / "runs" / f"{r.name}.trec"
        path.write_text("\n".join(trec_run_lines(runs[r.name], system=r.name)) + "\n")
        written.append(path)
    images = []
    depth = max(int(m.partition("@")[2]) for m in results[0].means)
    cuts = [k for k in RECALL_CUTS if k <= depth]
    curves = {r.name: recall_curve(runs[r.name], qrels, cuts) for r in results}
    written.append(plot_recall_curves(directory / "recall_at_k.png", curves, title=f"Recall@k, {title}"))
    images.append(("Recall@k per system", "recall_at_k.png"))
    by_name = {r.name: r for r in results}
    if "ndcg@10" in results[0].means:
        pairs = [(name, "bm25") for name in ("dssm", "hybrid") if name in by_name and "bm25" in by_name]
        for a, b in pairs + _reranked_pairs(list(by_name)):
            file = f"ndcg_diff_{a}_vs_{b}.png"
            written.append(plot_metric_difference(directory / file, by_name[a], by_name[b],
                                                  title=f"per-query nDCG@10, {a} - {b}, {title}"))
            images.append((f"per-query nDCG@10 difference, {a} vs {b}", file))
    (directory / "results.md").write_text(markdown_report(results, report, title=title, images=images,
                                                          heading="#") + "\n")
    written.append(directory / "results.md")
    return written
