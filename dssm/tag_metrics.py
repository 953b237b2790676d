"""Multi-label tagging metrics on a texts × labels score matrix, and the per-text values paired tests use.

Given ``scores`` ``[n_texts, n_labels]`` (any real scores: cosines, logits, probabilities) and
``targets`` ``[n_texts, n_labels]`` bool, :func:`tag_metrics` returns

* at a decision ``threshold`` (a label is predicted when its score ≥ threshold): micro precision /
  recall / F1 (over all text-label decisions) and macro-F1 (the mean of per-label F1 over the labels
  that carry at least one evaluated text; a label never predicted has F1 0);
* ranking metrics, threshold-free: ``p@k`` / ``r@k`` per text (over texts with at least one label;
  precision@k divides by k, recall@k by the text's label count) and ``map`` — the mean over labels of
  the average precision of that label's ranking of the texts (a label's AP is what a user gets who
  asks "which texts carry this tag?").

``per_text`` holds each text's F1 at the threshold and its ``p@k``/``r@k``, keyed by text id, so two
systems' figures can be compared by :func:`dssm.metrics.paired_randomization_test`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dssm.errors import InputError

__all__ = ["RANK_CUTS", "TagResult", "tag_metrics", "micro_f1", "best_threshold", "per_label_table"]

RANK_CUTS = (1, 3, 5)


@dataclass(frozen=True)
class TagResult:
    """One system's tagging figures (see the module docstring)."""

    name: str
    threshold: float | None
    means: dict[str, float]
    per_text: dict[str, dict[str, float]] = field(repr=False)
    per_label: dict[str, dict[str, float]] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON form (per-text values left out; they are written separately)."""
        return {"name": self.name, "threshold": self.threshold, "means": self.means, "per_label": self.per_label}


def _check(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=bool)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise InputError(f"scores {scores.shape} and targets {targets.shape} must be the same [texts, labels] shape")
    if not np.isfinite(scores).all():
        raise InputError("scores hold NaN or infinite values")
    return scores, targets


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def _average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``[n_labels]`` AP of each label's ranking of the texts (NaN for a label without a positive text)."""
    order = np.argsort(-scores, axis=0, kind="stable")
    hits = np.take_along_axis(targets, order, axis=0).astype(np.float64)
    ranks = np.arange(1, scores.shape[0] + 1, dtype=np.float64)[:, None]
    precision_at_hit = np.cumsum(hits, axis=0) / ranks * hits
    positives = targets.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, precision_at_hit.sum(axis=0) / positives, np.nan)


def tag_metrics(name: str, scores: np.ndarray, targets: np.ndarray, *, text_ids: Sequence[str],
                labels: Sequence[str], threshold: float | None) -> TagResult:
    """Every tagging figure of one system (see the module docstring).

    Args:
        name: the system's name.
        scores: ``[n_texts, n_labels]``.
        targets: ``[n_texts, n_labels]`` bool.
        text_ids: ``n_texts`` ids (keys of ``per_text``).
        labels: ``n_labels`` names (keys of ``per_label``).
        threshold: decision threshold on ``scores``; None = ranking metrics only.

    Raises:
        InputError: shapes differ, or non-finite scores.
    """
    scores, targets = _check(scores, targets)
    if len(text_ids) != scores.shape[0] or len(labels) != scores.shape[1]:
        raise InputError(f"{len(text_ids)} ids and {len(labels)} labels for scores of shape {scores.shape}")
    means: dict[str, float] = {}
    per_text: dict[str, dict[str, float]] = {t: {} for t in text_ids}
    counts = targets.sum(axis=1)
    labelled = counts > 0
    order = np.argsort(-scores, axis=1, kind="stable")
    for k in RANK_CUTS:
        hits = np.take_along_axis(targets, order[:, :k], axis=1).sum(axis=1)
        precision, recall = hits / k, np.where(labelled, hits / np.maximum(counts, 1), 0.0)
        means[f"p@{k}"] = float(precision[labelled].mean()) if labelled.any() else 0.0
        means[f"r@{k}"] = float(recall[labelled].mean()) if labelled.any() else 0.0
        for i in np.flatnonzero(labelled):
            per_text[text_ids[i]].update({f"p@{k}": float(precision[i]), f"r@{k}": float(recall[i])})
    ap = _average_precision(scores, targets)
    present = targets.sum(axis=0) > 0
    means["map"] = float(np.nanmean(ap)) if present.any() else 0.0
    per_label = {label: {"texts": int(targets[:, j].sum()), "ap": None if np.isnan(ap[j]) else float(ap[j])}
                 for j, label in enumerate(labels)}
    if threshold is not None:
        predicted = scores >= threshold
        tp = (predicted & targets).sum(axis=0)
        fp = (predicted & ~targets).sum(axis=0)
        fn = (~predicted & targets).sum(axis=0)
        label_f1 = _f1(tp, fp, fn)
        means["micro_precision"] = float(tp.sum() / max(tp.sum() + fp.sum(), 1))
        means["micro_recall"] = float(tp.sum() / max(tp.sum() + fn.sum(), 1))
        means["micro_f1"] = float(_f1(tp.sum(), fp.sum(), fn.sum()))
        means["macro_f1"] = float(label_f1[present].mean()) if present.any() else 0.0
        means["labels_per_text"] = float(predicted.sum(axis=1).mean())
        text_f1 = _f1((predicted & targets).sum(axis=1), (predicted & ~targets).sum(axis=1),
                      (~predicted & targets).sum(axis=1))
        for i, text_id in enumerate(text_ids):
            per_text[text_id]["f1"] = float(text_f1[i]) if (labelled[i] or predicted[i].any()) else 1.0
        for j, label in enumerate(labels):
            per_label[label].update(predicted=int(predicted[:, j].sum()), tp=int(tp[j]), f1=float(label_f1[j]))
    return TagResult(name, threshold, means, per_text, per_label)


def micro_f1(scores: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    """Micro-F1 of predicting every label whose score is ≥ ``threshold``: ``2·TP / (predicted + actual)``."""
    predicted = scores >= threshold
    return float(2 * (predicted & targets).sum() / max(float(predicted.sum()) + float(targets.sum()), 1.0))


def best_threshold(scores: np.ndarray, targets: np.ndarray, *, candidates: Sequence[float] | None = None) -> float:
    """The threshold with the best micro-F1 on ``(scores, targets)`` (ties → the lower threshold).

    Meant for held-out *training* texts, never for evaluated ones.

    Args:
        scores: ``[n_texts, n_labels]``.
        targets: ``[n_texts, n_labels]`` bool.
        candidates: thresholds to try; default 200 quantiles of the scores.
    """
    scores, targets = _check(scores, targets)
    if candidates is None:
        candidates = np.unique(np.quantile(scores, np.linspace(0.5, 0.9999, 200)))
    best, best_f1 = float(candidates[0]), -1.0
    for t in candidates:
        f1 = micro_f1(scores, targets, t)
        if f1 > best_f1 + 1e-12:
            best, best_f1 = float(t), f1
    return best


def per_label_table(result: TagResult, *, limit: int | None = None) -> str:
    """Markdown table of the per-label figures, most frequent label first."""
    rows = sorted(result.per_label.items(), key=lambda item: (-item[1]["texts"], item[0]))[:limit]
    lines = ["| label | texts | AP | predicted | F1 |", "|---|---:|---:|---:|---:|"]
    for label, row in rows:
        ap = "" if row["ap"] is None else f"{row['ap']:.3f}"
        f1 = f"{row['f1']:.3f}" if "f1" in row else ""
        lines.append(f"| {label} | {row['texts']} | {ap} | {row.get('predicted', '')} | {f1} |")
    return "\n".join(lines)
