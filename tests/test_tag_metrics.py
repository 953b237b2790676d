"""Tagging metrics against values computed by hand, and the threshold choice (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest

from dssm.errors import InputError
from dssm.tag_metrics import best_threshold, per_label_table, tag_metrics

LABELS = ["a", "b", "c"]
IDS = ["t1", "t2", "t3"]
# t1 carries {a, b}, t2 {b}, t3 {c}.
TARGETS = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)
SCORES = np.array([[0.9, 0.2, 0.4],
                   [0.1, 0.8, 0.3],
                   [0.5, 0.1, 0.6]])


def test_threshold_metrics_by_hand():
    r = tag_metrics("s", SCORES, TARGETS, text_ids=IDS, labels=LABELS, threshold=0.5)
    # Predicted at 0.5: t1 {a}, t2 {b}, t3 {a, c}. TP: a1 b2 c3 = 3; FP: a3 = 1; FN: b1 = 1.
    assert r.means["micro_precision"] == pytest.approx(3 / 4)
    assert r.means["micro_recall"] == pytest.approx(3 / 4)
    assert r.means["micro_f1"] == pytest.approx(0.75)
    # Per label F1: a = 2·1/(2+1+0) = 2/3, b = 2/(2+0+1) = 2/3, c = 1.
    assert r.means["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert r.per_text["t1"]["f1"] == pytest.approx(2 / 3)  # 1 TP, 0 FP, 1 FN
    assert r.per_text["t3"]["f1"] == pytest.approx(2 / 3)  # 1 TP, 1 FP, 0 FN
    assert r.means["labels_per_text"] == pytest.approx(4 / 3)
    assert r.per_label["a"] == {"texts": 1, "ap": 1.0, "predicted": 2, "tp": 1, "f1": pytest.approx(2 / 3)}


def test_ranking_metrics_by_hand():
    r = tag_metrics("s", SCORES, TARGETS, text_ids=IDS, labels=LABELS, threshold=None)
    # Top-1: t1 a (hit), t2 b (hit), t3 c (hit).
    assert r.means["p@1"] == pytest.approx(1.0)
    assert r.means["r@1"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    # Top-3 covers every label: recall 1, precision = labels / 3.
    assert r.means["p@3"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert r.means["r@3"] == pytest.approx(1.0)
    # AP per label over texts: a ranks t1 (0.9, hit) first → 1; b ranks t2 (0.8 hit), t1 (0.2 hit),
    # t3 (0.1) → (1 + 1)/2 = 1; c ranks t3 (0.6, hit) first → 1. Swap b's scores of t1 and t3:
    assert r.means["map"] == pytest.approx(1.0)
    worse = SCORES.copy()
    worse[0, 1], worse[2, 1] = 0.1, 0.2  # b: t2 (hit), t3 (miss), t1 (hit) → (1 + 2/3)/2
    r2 = tag_metrics("s", worse, TARGETS, text_ids=IDS, labels=LABELS, threshold=None)
    assert r2.means["map"] == pytest.approx((1 + (1 + 2 / 3) / 2 + 1) / 3)
    assert "micro_f1" not in r2.means and "f1" not in r2.per_text["t1"]


def test_best_threshold_maximises_micro_f1():
    # micro-F1 = 2TP / (2TP + FP + FN): at 0.85 only a-of-t1 → 2/(2+0+3) = 0.4; at 0.5 → 0.75 (above);
    # at 0.35 (+ c-of-t1 wrong) → 6/9; at 0.15 (every target, + c-of-t1, c-of-t2, a-of-t3) → 8/11.
    assert best_threshold(SCORES, TARGETS, candidates=[0.85, 0.5, 0.35, 0.15]) == 0.5
    assert best_threshold(SCORES, TARGETS, candidates=[0.85, 0.35, 0.15]) == 0.15
    table = per_label_table(tag_metrics("s", SCORES, TARGETS, text_ids=IDS, labels=LABELS, threshold=0.5))
    assert table.splitlines()[2] == "| b | 2 | 1.000 | 1 | 0.667 |"


def test_metric_input_errors():
    with pytest.raises(InputError, match="same"):
        tag_metrics("s", SCORES[:, :2], TARGETS, text_ids=IDS, labels=LABELS, threshold=0.5)
    with pytest.raises(InputError, match="NaN"):
        tag_metrics("s", np.full((3, 3), np.nan), TARGETS, text_ids=IDS, labels=LABELS, threshold=0.5)
    with pytest.raises(InputError, match="2 ids"):
        tag_metrics("s", SCORES, TARGETS, text_ids=IDS[:2], labels=LABELS, threshold=0.5)
