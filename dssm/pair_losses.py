"""The losses on labelled pairs: CoSENT on graded labels, and Sentence-BERT's classifier with its head.

This module owns the two ``--loss`` choices that learn from each pair's ``label`` rather than from an
in-batch score matrix: :func:`cosent_loss` ranks the batch's pairs by their cosines against their
graded labels, and :func:`classifier_loss` is the cross-entropy of the :class:`PairClassifier` head
over ``[u, v, |u - v|]``. Both are graph-safe and compute in float32, like the score-matrix losses
of :mod:`dssm.score_losses` whose masking and reduction helpers they share.
"""

from __future__ import annotations

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.errors import ConfigError, InputError
from dssm.score_losses import MASKED, check_reduction, reduce_rows

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["DEFAULT_COSENT_SCALE", "cosent_loss", "classifier_loss", "PairClassifier"]

DEFAULT_COSENT_SCALE = 20.0


def cosent_loss(cosines: tf.Tensor, labels: tf.Tensor, *, scale: float = DEFAULT_COSENT_SCALE) -> tf.Tensor:
    """CoSENT (Su 2022) for graded pairs: ``log(1 + sum_{label_i < label_j} exp(scale (cos_i - cos_j)))``.

    Every ordered pair of the batch whose labels say ``i`` is less similar than ``j`` is penalised
    when ``cos_i`` is not below ``cos_j``; equal labels give no term. Computed as a logsumexp over the
    terms with an extra 0 (the ``1 +``), so large ``scale`` cannot overflow.

    Args:
        cosines: ``[batch]`` cosine of each query with its own document (:func:`~dssm.score_losses.pair_cosines`).
        labels: ``[batch]`` graded scores (STS 0-5) or 0/1 labels; only their order matters.
        scale: ``lambda``.

    Returns:
        Scalar float32: one loss for the whole batch (there is no per-row form). Under
        ``tf.distribute`` each replica computes it over its own pairs.
    """
    cosines = tf.cast(tf.convert_to_tensor(cosines), tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.float32)
    if cosines.shape.rank not in (None, 1) or labels.shape.rank not in (None, 1):
        raise InputError(f"cosent_loss takes [batch] cosines and labels, got shapes {cosines.shape} and "
                         f"{labels.shape}")
    diff = scale * (cosines[:, tf.newaxis] - cosines[tf.newaxis, :])
    ordered = labels[:, tf.newaxis] < labels[tf.newaxis, :]
    terms = tf.reshape(tf.where(ordered, diff, MASKED), [-1])
    return tf.reduce_logsumexp(tf.concat([tf.zeros([1]), terms], axis=0))


def classifier_loss(logits: tf.Tensor, labels: tf.Tensor, *, reduction: str = "mean") -> tf.Tensor:
    """Sentence-BERT's classification objective: cross-entropy of :class:`PairClassifier` logits.

    Args:
        logits: ``[batch, num_classes]`` from ``PairClassifier()((u, v))``.
        labels: ``[batch]`` class indices in ``[0, num_classes)``, int or whole-valued float (the pair
            shards store 1.0 duplicate / 0.0 not). Other values fail with ``InvalidArgumentError``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar float32 (or ``[batch]``).
    """
    check_reduction(reduction)
    logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    labels = tf.convert_to_tensor(labels)
    num_classes = tf.shape(logits, out_type=tf.int64)[-1]
    if labels.dtype.is_floating:
        checks = [tf.debugging.assert_equal(labels, tf.round(labels),
                                            message="classifier labels must be whole class indices")]
        with tf.control_dependencies(checks):
            labels = tf.cast(labels, tf.int64)
    labels = tf.cast(labels, tf.int64)
    checks = [
        tf.debugging.assert_non_negative(labels, message="classifier labels must be >= 0"),
        tf.debugging.assert_less(labels, num_classes, message="classifier labels must be < num_classes"),
    ]
    with tf.control_dependencies(checks):
        per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return reduce_rows(per_row, reduction)


class PairClassifier(tf.keras.layers.Layer):
    """Sentence-BERT's classifier head: ``softmax(W [u, v, |u - v|] + b)`` over ``num_classes``.

    Only trained alongside the towers (the trainer adds its variables); at search time the towers are
    used by cosine as usual and this head is dropped.

    Args:
        num_classes: output classes (2: duplicate / not).
    """

    def __init__(self, num_classes: int = 2, *, name: str | None = None, dtype: object = None,
                 trainable: bool = True) -> None:
        super().__init__(name=name, dtype=dtype, trainable=trainable)
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.dense = tf.keras.layers.Dense(num_classes, name="logits")

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        """Args: ``(u, v)``, each ``[batch, dim]``. Returns ``[batch, num_classes]`` logits."""
        u, v = inputs
        return self.dense(tf.concat([u, v, tf.abs(u - v)], axis=-1))

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "num_classes": self.num_classes}

