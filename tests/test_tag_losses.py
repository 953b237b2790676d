"""The tagging losses against values computed by hand (issue 16)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dssm.errors import ConfigError
from dssm.tag_losses import multilabel_softmax_loss, sigmoid_multilabel_loss, tag_loss


def test_multilabel_softmax_loss_by_hand():
    # Row 0: positives {0, 2}, negatives {1, 3}. Row 1: positive {1}, negatives {0, 2, 3}.
    logits = np.array([[2.0, -1.0, 0.5, 1.0],
                       [0.0, 3.0, -2.0, -0.5]], dtype=np.float32)
    targets = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=bool)
    row0 = math.log(1 + math.exp(-1.0) + math.exp(1.0)) + math.log(1 + math.exp(-2.0) + math.exp(-0.5))
    row1 = math.log(1 + math.exp(0.0) + math.exp(-2.0) + math.exp(-0.5)) + math.log(1 + math.exp(-3.0))
    per_row = multilabel_softmax_loss(logits, targets, reduction="none").numpy()
    np.testing.assert_allclose(per_row, [row0, row1], rtol=1e-6)
    assert float(multilabel_softmax_loss(logits, targets)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert float(multilabel_softmax_loss(logits, targets.astype(np.float32), reduction="sum")) == pytest.approx(
        row0 + row1, rel=1e-6)


def test_multilabel_softmax_loss_edges():
    # No target label: only the negative term; it goes to 0 as every logit goes far below 0.
    logits = np.array([[-1.0, 0.0]], dtype=np.float32)
    none = np.zeros((1, 2), dtype=bool)
    assert float(multilabel_softmax_loss(logits, none)) == pytest.approx(
        math.log(1 + math.exp(-1.0) + 1.0) + math.log(1.0), rel=1e-6)
    assert float(multilabel_softmax_loss(np.array([[-30.0, -30.0]]), none)) < 1e-12
    # Every label a target, far above 0: loss ~ 0; a huge logit stays finite (logsumexp).
    assert float(multilabel_softmax_loss(np.array([[40.0, 1e4]]), np.ones((1, 2), bool))) < 1e-12


def test_sigmoid_multilabel_loss_by_hand():
    logits = np.array([[2.0, -1.0], [0.0, 3.0]], dtype=np.float32)
    targets = np.array([[1, 0], [0, 1]], dtype=bool)

    def bce(s: float, y: int) -> float:
        p = 1 / (1 + math.exp(-s))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    rows = [(bce(2.0, 1) + bce(-1.0, 0)) / 2, (bce(0.0, 0) + bce(3.0, 1)) / 2]
    np.testing.assert_allclose(sigmoid_multilabel_loss(logits, targets, reduction="none").numpy(), rows, rtol=1e-6)
    assert float(sigmoid_multilabel_loss(logits, targets)) == pytest.approx(sum(rows) / 2, rel=1e-6)


def test_tag_loss_registry():
    assert tag_loss("multilabel") is multilabel_softmax_loss
    assert tag_loss("sigmoid") is sigmoid_multilabel_loss
    with pytest.raises(ConfigError, match="'softmax'"):
        tag_loss("softmax")
    with pytest.raises(ConfigError, match="reduction"):
        multilabel_softmax_loss(np.zeros((1, 2)), np.zeros((1, 2)), reduction="max")


def test_distillation_tag_loss_by_hand():
    # The teacher's cosines over temperature 0.5: row 0 [0.3, 0.3] -> [1/2, 1/2]; rows 1-2
    # [0.5 ln 3, 0] -> [3/4, 1/4]. The student: softmax([0, ln 2]) = [1/3, 2/3]. Three texts, two
    # labels: a batch may hold more texts than there are labels.
    loss = tag_loss("distill", teacher_temperature=0.5)
    logits = np.array([[0.0, math.log(2.0)]] * 3, dtype=np.float32)
    teacher = np.array([[0.3, 0.3], [0.5 * math.log(3.0), 0.0], [0.5 * math.log(3.0), 0.0]], dtype=np.float32)
    row0 = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    row1 = 0.75 * math.log(0.75 / (1 / 3)) + 0.25 * math.log(0.25 / (2 / 3))
    np.testing.assert_allclose(loss(logits, teacher, reduction="none").numpy(), [row0, row1, row1], rtol=1e-5)
    assert float(loss(logits, teacher)) == pytest.approx((row0 + 2 * row1) / 3, rel=1e-5)
    # a bias on every logit of a row cancels; the teacher's own distribution as logits gives 0
    assert float(loss(logits + 5.0, teacher, reduction="sum")) == pytest.approx(row0 + 2 * row1, rel=1e-5)
    assert abs(float(loss(teacher / 0.5, teacher))) < 1e-6
