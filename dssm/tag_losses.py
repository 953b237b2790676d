"""Tagging losses: texts × labels score matrices where each text has *several* target labels.

Retrieval losses (:mod:`dssm.score_losses`) have one positive per row. Tagging has a set of them: row
``i`` of ``logits`` ``[batch, num_labels]`` scores text ``i`` against every label, and ``targets``
``[batch, num_labels]`` (bool or 0/1) marks the labels it carries. The logits are the towers' cosines
times a scale plus a bias (:class:`dssm.tag_train.TagTrainConfig`).

* :func:`multilabel_softmax_loss` — the multi-label softmax cross-entropy (Su Jianlin's "softmax +
  cross-entropy for multi-label classification"): ``log(1 + Σ_neg e^{s}) + log(1 + Σ_pos e^{−s})``.
  It pushes every target label's logit above 0 and every other label's below 0 *as a ranking*: one
  logsumexp over the negatives and one over the positives, so the ~145 negatives of a text do not
  each get their own term, and 0 is the natural decision threshold.
* :func:`sigmoid_multilabel_loss` — per-label sigmoid cross-entropy, the usual baseline (one binary
  decision per label, averaged over labels).
* ``distill`` (:func:`tag_loss` with a ``teacher_temperature``) — no labels: ``targets`` are a teacher's
  cosines of each text with every label description, and the loss is retrieval distillation's KL
  (:func:`dssm.score_losses.distillation_loss`) from ``softmax(targets / teacher_temperature)`` to
  ``softmax(logits)`` over the labels; the towers learn to rank labels as the teacher does zero-shot.

Both are graph-safe and compute in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.errors import ConfigError
from dssm.score_losses import DEFAULT_TEMPERATURE, MASKED, check_reduction, distillation_loss, reduce_rows

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["TAG_LOSSES", "multilabel_softmax_loss", "sigmoid_multilabel_loss", "tag_loss"]

TAG_LOSSES = ("multilabel", "sigmoid", "distill")


def _as_float(logits: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    targets = tf.convert_to_tensor(targets)
    positive = targets if targets.dtype == tf.bool else tf.cast(targets, tf.float32) > 0.5
    return logits, positive


def multilabel_softmax_loss(logits: tf.Tensor, targets: tf.Tensor, *, reduction: str = "mean") -> tf.Tensor:
    """``log(1 + Σ_{j∉P} e^{s_j}) + log(1 + Σ_{i∈P} e^{−s_i})`` per row, ``P`` = the row's target labels.

    The ``1`` in each log is a zero logit appended to both sides: the threshold class at 0. A row with
    no target label gets only the negative term (all logits pushed below 0).

    Args:
        logits: ``[batch, num_labels]`` scores ``s``.
        targets: ``[batch, num_labels]`` bool or 0/1: the labels each text carries.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[batch]``).

    Returns:
        Scalar float32 (or ``[batch]``).
    """
    check_reduction(reduction)
    logits, positive = _as_float(logits, targets)
    zeros = tf.zeros_like(logits[:, :1])
    negatives = tf.concat([tf.where(positive, MASKED, logits), zeros], axis=1)
    positives = tf.concat([tf.where(positive, -logits, MASKED), zeros], axis=1)
    per_row = tf.reduce_logsumexp(negatives, axis=1) + tf.reduce_logsumexp(positives, axis=1)
    return reduce_rows(per_row, reduction)


def sigmoid_multilabel_loss(logits: tf.Tensor, targets: tf.Tensor, *, reduction: str = "mean") -> tf.Tensor:
    """Binary cross-entropy of ``sigmoid(s)`` against each label's 0/1 target, averaged over the labels.

    Args:
        logits: ``[batch, num_labels]``.
        targets: ``[batch, num_labels]`` bool or 0/1.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[batch]``, each the mean over labels).

    Returns:
        Scalar float32 (or ``[batch]``).
    """
    check_reduction(reduction)
    logits, positive = _as_float(logits, targets)
    per_entry = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(positive, tf.float32), logits=logits)
    return reduce_rows(tf.reduce_mean(per_entry, axis=1), reduction)


def tag_loss(name: str, *, teacher_temperature: float = DEFAULT_TEMPERATURE) -> Callable[..., tf.Tensor]:
    """The loss function ``(logits, targets) -> loss`` named ``name`` (one of :data:`TAG_LOSSES`).

    ``distill`` reads ``targets`` as the teacher's cosines, sharpened by ``teacher_temperature``; the
    logits (``scale · cos + bias``) are the student's scores as they are (temperature 1).
    """
    if name == "multilabel":
        return multilabel_softmax_loss
    if name == "sigmoid":
        return sigmoid_multilabel_loss
    if name == "distill":
        return functools.partial(distillation_loss, temperature=1.0, teacher_temperature=teacher_temperature)
    raise ConfigError(f"unknown tagging loss {name!r}; known: {', '.join(TAG_LOSSES)}")
