"""Duplicate detection: cosine thresholds on labelled pairs; ``main(argv)`` = ``dssm thresholds``.

Scoring: both texts of a pair go through the **query tower** and the score is the cosine of the two
L2-normalised embeddings. Duplicate questions are two texts of the same kind, which is what the query
tower was trained on (the query side of Quora duplicate pairs); with shared (Siamese) towers, the
default, the query and document towers are one and the same anyway. ``Searcher.similarity`` and the
HTTP ``/v1/similarity`` score the same way, so a saved threshold means the same thing there.

Sweep: a pair is predicted duplicate when ``score >= t``. Every distinct score is a candidate ``t``
(plus ``+inf``, "nothing is a duplicate"), so the sweep is exact, not a grid. Best accuracy and best
F1 are each taken on the *tuning* part of the pairs and reported on the *test* part (both parts also
in the JSON). Average precision is the step-wise area under the precision-recall curve over distinct
thresholds (``sum (R_i - R_{i-1}) P_i``, as scikit-learn computes it).

Split: with ``--holdout PAIRS_DIR`` only pairs whose first text was in the validation split of the
model's training pairs are used (the model never saw them); those are split into tuning and test
parts by a hash of the first text (``dssm.data.split_of`` with salt ``"thresholds"``), so the same
question never lands in both.

``--save`` stores the chosen threshold in the index as a new version: the live version is copied
with hard links, ``thresholds.json`` is added and the manifest gains the ``duplicate_threshold`` key
that ``serving.backend`` and ``Searcher.duplicate_threshold`` read; then the version is published
atomically (:func:`dssm.index.publish_index_files`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dssm.artifacts import write_json_atomic
from dssm.data import holdout_filter, iter_rows, read_columns, split_of
from dssm.errors import ConfigError, InputError
from dssm.index import publish_index_files
from serving.searcher import Searcher

__all__ = [
    "THRESHOLDS_FILE",
    "SweepPoint",
    "classification_at",
    "threshold_sweep",
    "best_point",
    "average_precision",
    "read_labelled_pairs",
    "tuning_mask",
    "plot_score_histogram",
    "main",
]

THRESHOLDS_FILE = "thresholds.json"
_OBJECTIVES = ("accuracy", "f1")


@dataclass(frozen=True)
class SweepPoint:
    """Classification figures at one threshold (duplicate iff score >= threshold)."""

    threshold: float
    accuracy: float
    precision: float
    recall: float
    f1: float


def _figures(tp: int, fp: int, fn: int, tn: int, threshold: float) -> SweepPoint:
    precision = tp / (tp + fp) if tp + fp else 1.0  # no positive prediction: no false positive either
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return SweepPoint(float(threshold), (tp + tn) / (tp + fp + fn + tn), precision, recall, f1)


def _check(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape or s.ndim != 1 or s.size == 0:
        raise InputError(f"need equally long, non-empty scores and labels, got {s.shape} and {y.shape}")
    bad = [v for v in np.unique(y).tolist() if v not in (0, 1)]
    if bad:
        raise InputError(f"labels must be 0 or 1, got {bad[:3]}")
    if not np.isfinite(s).all():
        raise InputError("scores must be finite")
    return s, y.astype(np.int64)


def classification_at(scores: Sequence[float], labels: Sequence[int], threshold: float) -> SweepPoint:
    """Accuracy, precision, recall and F1 when ``score >= threshold`` means duplicate."""
    s, y = _check(scores, labels)
    predicted = s >= threshold
    tp = int((predicted & (y == 1)).sum())
    fp = int((predicted & (y == 0)).sum())
    fn = int((~predicted & (y == 1)).sum())
    return _figures(tp, fp, fn, int(y.size - tp - fp - fn), threshold)


def threshold_sweep(scores: Sequence[float], labels: Sequence[int]) -> list[SweepPoint]:
    """Figures at every distinct score used as threshold (highest first), then at ``+inf``.

    Args:
        scores: [n] cosines.
        labels: [n] 1 = duplicate, 0 = not.

    Returns:
        One :class:`SweepPoint` per distinct score, descending, plus ``threshold=inf`` first.
    """
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    positives = int(y.sum())
    points = [_figures(0, 0, positives, y.size - positives, math.inf)]
    tp = fp = 0
    i = 0
    while i < s.size:
        j = i
        while j < s.size and s[j] == s[i]:  # a tied group crosses the threshold together
            tp += int(y[j])
            fp += int(1 - y[j])
            j += 1
        points.append(_figures(tp, fp, positives - tp, y.size - positives - fp, s[i]))
        i = j
    return points


def best_point(sweep: Sequence[SweepPoint], objective: str) -> SweepPoint:
    """The sweep point with the highest ``objective`` (``accuracy`` or ``f1``); ties: the higher threshold."""
    if objective not in _OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is not one of {_OBJECTIVES}")
    return max(sweep, key=lambda p: (getattr(p, objective), p.threshold))


def average_precision(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the step-wise precision-recall curve: ``sum_i (R_i - R_{i-1}) * P_i`` over distinct thresholds."""
    sweep = threshold_sweep(scores, labels)
    ap, previous = 0.0, 0.0
    for point in sweep[1:]:
        ap += (point.recall - previous) * point.precision
        previous = point.recall
    return ap


# ------------------------------------------------------------------------------------------- pairs


def read_labelled_pairs(path: str | Path) -> list[tuple[str, str, int, str]]:
    """Labelled pairs from CSV/TSV/JSONL/Parquet with ``text1,text2`` (or ``question1,question2``) and ``is_duplicate``.

    Returns:
        ``(text1, text2, label, location)`` per row.

    Raises:
        InputError: missing file or columns, an unparsable row, an empty text or a label not 0/1
            (each names the row).
    """

    columns = read_columns(path)
    first, second = ("text1", "text2") if "text1" in columns else ("question1", "question2")
    missing = [c for c in (first, second, "is_duplicate") if c not in columns]
    if missing:
        raise InputError(f"pairs file {path} lacks column(s) {missing}; it has {columns}")
    pairs = []
    for row in iter_rows(path):
        if row.error:
            raise InputError(f"{row.location}: {row.error}")
        a, b, label = (row.fields.get(c) for c in (first, second, "is_duplicate"))
        if not (isinstance(a, str) and a.strip() and isinstance(b, str) and b.strip()):
            raise InputError(f"{row.location}: empty text in {first!r} or {second!r}")
        if str(label).strip() not in ("0", "1"):
            raise InputError(f"{row.location}: is_duplicate must be 0 or 1, got {label!r}")
        pairs.append((a, b, int(str(label).strip()), row.location))
    if not pairs:
        raise InputError(f"pairs file {path} has no rows")
    return pairs


# ---------------------------------------------------------------------------------- index versions


def tuning_mask(pairs: Sequence[tuple[str, ...]], fraction: float) -> np.ndarray:
    """[n] bool: the pairs that choose the threshold (``split_of``'s "validation" side of the first
    text, salt ``thresholds``); the rest are the test pairs it is reported on."""

    return np.array([split_of(p[0], validation_fraction=fraction, salt="thresholds") == "validation" for p in pairs],
                    dtype=bool)


# ------------------------------------------------------------------------------------------ plots


def plot_score_histogram(path: str | Path, scores: Sequence[float], labels: Sequence[int], *,
                         thresholds: Mapping[str, float], title: str) -> Path:
    """Histogram of duplicate vs non-duplicate cosines with the chosen thresholds as vertical lines."""
    # deferred: matplotlib, imported only when this runs
    import matplotlib

    matplotlib.use("Agg")
    # deferred: matplotlib, imported only when this runs
    import matplotlib.pyplot as plt

    s, y = _check(scores, labels)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    bins = np.linspace(min(s.min(), 0.0), 1.0, 51)
    ax.hist(s[y == 0], bins=bins, alpha=0.6, label=f"not duplicate ({int((y == 0).sum())})", color="tab:red")
    ax.hist(s[y == 1], bins=bins, alpha=0.6, label=f"duplicate ({int(y.sum())})", color="tab:blue")
    styles = iter(["-", "--", ":"])
    for name, value in thresholds.items():
        ax.axvline(value, color="black", linestyle=next(styles, "-."), linewidth=1, label=f"{name} {value:.3f}")
    ax.set_xlabel("cosine of the two texts' query-tower embeddings")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dssm thresholds",
        description="Score labelled pairs by cosine (query tower on both texts), sweep the duplicate threshold, "
                    "report best accuracy / F1 and average precision; --save stores the threshold in the index.")
    parser.add_argument("--index", required=True, help="index directory (its model scores the pairs)")
    parser.add_argument("--pairs", required=True,
                        help="CSV/TSV/JSONL/Parquet with text1,text2 (or question1,question2) and is_duplicate")
    parser.add_argument("--holdout", metavar="PAIRS_DIR",
                        help="use only pairs whose first text is in the validation split of this `dssm pairs` "
                             "output (the model's training pairs), so the model never saw them")
    parser.add_argument("--tune-fraction", type=float, default=0.5,
                        help="share of the pairs (by hash of the first text) used to choose thresholds; the rest "
                             "reports them (default: %(default)s)")
    parser.add_argument("--objective", choices=_OBJECTIVES, default="accuracy",
                        help="which best threshold --save stores (default: %(default)s)")
    parser.add_argument("--json", metavar="OUT", help="write the figures as JSON")
    parser.add_argument("--plot", metavar="PNG", help="write the score histogram here")
    parser.add_argument("--save", action="store_true",
                        help="store the chosen threshold in the index (new version) for similarity is_duplicate")
    parser.add_argument("--batch-size", type=int, default=1024, help="texts per model call (default: 1024)")
    return parser


def _summary(scores: np.ndarray, labels: np.ndarray, chosen: Mapping[str, SweepPoint]) -> dict[str, Any]:
    out: dict[str, Any] = {"pairs": int(labels.size), "duplicates": int(labels.sum()),
                           "average_precision": average_precision(scores, labels)}
    for name, point in chosen.items():
        at = classification_at(scores, labels, point.threshold)
        out[f"at_best_{name}_threshold"] = {"threshold": point.threshold if math.isfinite(point.threshold) else None,
                                            "accuracy": at.accuracy,
                                            "precision": at.precision, "recall": at.recall, "f1": at.f1}
    return out


def main(argv: list[str] | None = None) -> int:
    """``dssm thresholds``: print the figures; ``--json``, ``--plot``, ``--save`` as asked."""

    args = _parser().parse_args(argv)
    if not 0.0 < args.tune_fraction < 1.0:
        raise ConfigError(f"--tune-fraction must be in (0, 1), got {args.tune_fraction}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag, value in (("--json", args.json), ("--plot", args.plot)):
        if value and not Path(value).resolve().parent.is_dir():
            raise InputError(f"{flag} {value}: directory {Path(value).resolve().parent} does not exist")
    searcher = Searcher.load(args.index)
    if searcher.encoder is None:
        raise InputError(f"--index {args.index} has no model/: it cannot embed texts")
    pairs = read_labelled_pairs(args.pairs)
    if args.holdout:
        keep = holdout_filter(Path(args.holdout))
        pairs = [p for p in pairs if keep(p[0])]
        if not pairs:
            raise InputError(f"no pair of {args.pairs} has its first text in the validation split of {args.holdout}")
    tune = tuning_mask(pairs, args.tune_fraction)
    if tune.all() or not tune.any():
        raise InputError(f"{len(pairs)} pairs cannot be split into tuning and test parts (all on one side)")
    texts1, texts2 = [p[0] for p in pairs], [p[1] for p in pairs]
    labels = np.array([p[2] for p in pairs], dtype=np.int64)
    scores = np.empty(len(pairs), dtype=np.float64)
    for start in tqdm(range(0, len(pairs), args.batch_size), desc="score pairs", unit="batch", file=sys.stderr):
        stop = start + args.batch_size
        a = searcher.encoder.embed_queries(texts1[start:stop])
        b = searcher.encoder.embed_queries(texts2[start:stop])
        scores[start:stop] = np.einsum("nd,nd->n", np.asarray(a, np.float64), np.asarray(b, np.float64))
    sweep = threshold_sweep(scores[tune], labels[tune])
    chosen = {name: best_point(sweep, name) for name in _OBJECTIVES}
    result: dict[str, Any] = {
        "index": str(args.index), "pairs_file": str(args.pairs), "holdout": args.holdout,
        "scoring": "cosine of query-tower embeddings of both texts",
        "split": f"tuning = split_of(text1, validation_fraction={args.tune_fraction}, salt='thresholds') "
                 "== 'validation'; test = the rest",
        "objective": args.objective,
        "threshold": chosen[args.objective].threshold if math.isfinite(chosen[args.objective].threshold) else None,
        "tuning": _summary(scores[tune], labels[tune], chosen),
        "test": _summary(scores[~tune], labels[~tune], chosen),
    }
    test = result["test"][f"at_best_{args.objective}_threshold"]
    print(f"pairs: {tune.sum()} tuning, {(~tune).sum()} test ({int(labels[~tune].sum())} duplicates)")
    print(f"{'threshold from tuning':<24}{'threshold':>10}{'accuracy':>10}{'precision':>10}{'recall':>10}{'f1':>10}"
          "   (on the test pairs)")
    for name in _OBJECTIVES:
        at = result["test"][f"at_best_{name}_threshold"]
        print(f"{'best ' + name:<24}{at['threshold']:>10.4f}{at['accuracy']:>10.4f}{at['precision']:>10.4f}"
              f"{at['recall']:>10.4f}{at['f1']:>10.4f}")
    print(f"average precision (test): {result['test']['average_precision']:.4f}")
    if args.plot:
        plot_score_histogram(args.plot, scores[~tune], labels[~tune],
                             thresholds={f"best {n} (tuning)": chosen[n].threshold for n in _OBJECTIVES},
                             title=f"cosine of pair texts, {int((~tune).sum())} test pairs")
        result["plot"] = str(args.plot)
    if args.save:
        threshold = chosen[args.objective].threshold
        if not math.isfinite(threshold):
            raise InputError("the best threshold is +inf (no duplicates in the tuning pairs?); nothing to save")
        record = {"duplicate_threshold": threshold, "objective": args.objective, "test": test,
                  "pairs_file": str(args.pairs), "scoring": result["scoring"], "split": result["split"]}
        version = publish_index_files(args.index, files={THRESHOLDS_FILE: record},
                                      manifest_updates={"duplicate_threshold": threshold})
        result["saved_version"] = version
        print(f"saved duplicate_threshold {threshold:.4f} in {args.index} as version {version}")
    if args.json:

        write_json_atomic(Path(args.json), result)
    return 0
