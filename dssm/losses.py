"""Training losses for the two towers, as pure TensorFlow functions on in-batch similarity matrices.

Most losses take the in-batch score matrix ``scores`` ``[batch, num_candidates]``: row ``i`` holds the
cosines of query ``i`` with every candidate, its positive sits on the diagonal (column ``i``), and
every other allowed column is a negative. ``num_candidates >= batch``: the first ``batch`` columns are
the batch's documents and any further columns are extra negatives (explicit hard negatives, or the
documents of other replicas). Which columns count as negatives can be narrowed by

* ``keys`` ``[num_candidates]`` (document ids or text hashes, string or int): an *accidental hit*, a
  column whose key equals the row's positive key (``keys[i]``), is not a negative;
* ``score_mask`` ``[batch, num_candidates]`` bool: False drops that score (e.g. a missing explicit
  negative). The positive itself is always kept.

Masked logits are set to a large negative finite number (TFRS's ``MIN_FLOAT``) rather than ``-inf``,
so a row with no negatives left gives a finite loss and zero, not NaN, gradients.

Every function is graph-safe (no Python loops over the batch, no host round trips), so it runs
inside ``tf.function``, under ``jit_compile`` (with integer keys: XLA has no string comparison) and
per replica under ``tf.distribute``. All arithmetic is float32 whatever the input dtype, so the mask
value and ``exp`` cannot overflow under mixed precision.

Reductions: ``reduction="mean"`` (default) averages the per-row losses over the rows, ``"sum"`` adds
them (what :class:`RetrievalLoss` returns, the model divides by the global batch), ``"none"`` returns
the ``[batch]`` per-row losses. CoSENT is a loss over all pairs of the batch and has no per-row form.

The registry :data:`LOSSES` maps each ``--loss`` name to a :class:`LossSpec` (function, which inputs
it needs, which :class:`LossConfig` fields it reads); :func:`get_loss` binds a config's
hyperparameters to the function. The temperature is not in :class:`LossConfig`: it is
``ModelConfig.temperature`` (it predates this module, is in every saved model's config and has one
``--temperature`` flag), passed to :func:`get_loss` / :class:`RetrievalLoss` by the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.config import field
from dssm.errors import ConfigError, InputError

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = [
    "LossConfig",
    "LossSpec",
    "LOSSES",
    "LOSS_NAMES",
    "get_loss",
    "loss_help",
    "similarity_matrix",
    "pair_cosines",
    "negative_mask",
    "softmax_loss",
    "triplet_loss",
    "hard_negative_loss",
    "cosent_loss",
    "circle_loss",
    "contrastive_loss",
    "simcse_loss",
    "classifier_loss",
    "PairClassifier",
    "RetrievalLoss",
]

# Same value as tfrs.layers.loss.MIN_FLOAT: exp(MASKED - max) is exactly 0 in float32, and unlike
# -inf it never produces inf - inf = NaN when a whole row is masked.
MASKED = float(np.finfo(np.float32).min / 100.0)

_REDUCTIONS = ("mean", "sum", "none")

DEFAULT_TEMPERATURE = 0.05
DEFAULT_MARGIN = 0.2
DEFAULT_COSENT_SCALE = 20.0
DEFAULT_CIRCLE_M = 0.25
DEFAULT_CIRCLE_GAMMA = 256.0


@dataclass(frozen=True)
class LossConfig:
    """Hyperparameters of the losses (each loss reads only its own). Saved as ``config.json["loss"]``.

    Which loss trains is ``ModelConfig.loss``; the softmax / contrastive / simcse temperature is
    ``ModelConfig.temperature``.
    """

    # The defaults below are the values chosen on validation splits only (docs/losses.md,
    # bench/losses_table.py): the papers' values suit pre-trained encoders, not these from-scratch towers.
    margin: float = field(
        0.4,
        "triplet / hard-negative margin alpha on cosine similarity: a negative is penalised until it is "
        "alpha below the positive; 0.4 beat 0.1/0.2 for both on a quora-dev inner validation split "
        "(hard-negative did a little better still at 0.8)")
    cosent_scale: float = field(
        5.0, "CoSENT's lambda: scale of cosine differences inside exp; Su 2022's 20 left these towers stuck "
        "(STS-B validation Spearman 0.49 vs 0.72 at 5, seeds spread 0.37-0.57 on dev)")
    circle_m: float = field(
        DEFAULT_CIRCLE_M, "Circle loss relaxation m: optima O_p=1+m, O_n=-m, margins 1-m and m (paper: 0.25)")
    circle_gamma: float = field(
        32.0,
        "Circle loss scale gamma; the paper's 256 (face recognition, Sun et al. 2020 sec. 4.1) gave "
        "quora-dev inner validation MRR@10 0.815 vs 0.876 at 32")
    num_classes: int = field(2, "classes of the Sentence-BERT pair classifier (2: duplicate / not)")
    logq_correction: bool = field(
        False,
        "subtract log(sampling probability) of each in-batch document from its logit (softmax and "
        "contrastive); the trainer passes the probabilities, estimated from document frequency")

    def __post_init__(self) -> None:
        if not self.margin >= 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")
        if not self.cosent_scale > 0:
            raise ConfigError(f"cosent_scale must be > 0, got {self.cosent_scale}")
        if not 0 <= self.circle_m < 1:
            raise ConfigError(f"circle_m must be in [0, 1), got {self.circle_m}")
        if not self.circle_gamma > 0:
            raise ConfigError(f"circle_gamma must be > 0, got {self.circle_gamma}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")


# --------------------------------------------------------------------------------------------------
# Helpers


def similarity_matrix(query: tf.Tensor, document: tf.Tensor) -> tf.Tensor:
    """In-batch scores of L2-normalised embeddings (so dot product = cosine).

    Args:
        query: ``[batch, dim]`` L2-normalised query embeddings (tower outputs).
        document: ``[num_candidates, dim]`` L2-normalised document embeddings; row ``i`` is query
            ``i``'s positive for ``i < batch``.

    Returns:
        ``[batch, num_candidates]`` float32 cosines, positives on the diagonal.
    """
    return tf.linalg.matmul(tf.cast(query, tf.float32), tf.cast(document, tf.float32), transpose_b=True)


def pair_cosines(query: tf.Tensor, document: tf.Tensor) -> tf.Tensor:
    """Cosine of each query with its own document (the diagonal of :func:`similarity_matrix`, cheaply).

    Args:
        query: ``[batch, dim]`` L2-normalised.
        document: ``[batch, dim]`` L2-normalised.

    Returns:
        ``[batch]`` float32.
    """
    return tf.reduce_sum(tf.cast(query, tf.float32) * tf.cast(document, tf.float32), axis=-1)


def _as_scores(scores: tf.Tensor, name: str = "scores") -> tf.Tensor:
    scores = tf.cast(tf.convert_to_tensor(scores), tf.float32)
    rank = scores.shape.rank
    if rank is not None and rank != 2:
        raise InputError(f"{name} must be a [batch, num_candidates] matrix, got shape {scores.shape}")
    rows, cols = scores.shape[0], scores.shape[1]
    if rows is not None and cols is not None and cols < rows:
        raise InputError(f"{name} has fewer candidates than rows (shape {scores.shape}): the positive of "
                         f"row i must be column i")
    return scores


def _positive_mask(scores: tf.Tensor) -> tf.Tensor:
    """``[batch, num_candidates]`` bool, True exactly on the diagonal (works for rectangular matrices)."""
    shape = tf.shape(scores)
    return tf.equal(tf.range(shape[0])[:, tf.newaxis], tf.range(shape[1])[tf.newaxis, :])


def _diagonal(scores: tf.Tensor) -> tf.Tensor:
    """``[batch]``: ``scores[i, i]`` (rectangular-safe: gather rather than ``diag_part`` padding)."""
    rows = tf.range(tf.shape(scores)[0])
    return tf.gather_nd(scores, tf.stack([rows, rows], axis=1))


def negative_mask(scores: tf.Tensor, *, keys: tf.Tensor | None = None,
                  score_mask: tf.Tensor | None = None) -> tf.Tensor:
    """Which entries of ``scores`` count as negatives.

    Args:
        scores: ``[batch, num_candidates]``, positives on the diagonal.
        keys: optional ``[num_candidates]`` document keys (ids or text hashes, string or int); a column
            whose key equals ``keys[i]`` (row ``i``'s positive) is an accidental hit, not a negative.
        score_mask: optional ``[batch, num_candidates]`` bool; False drops that entry.

    Returns:
        ``[batch, num_candidates]`` bool: off-diagonal, allowed by ``score_mask`` and not an accidental hit.
    """
    return _valid_negatives(_as_scores(scores), keys, score_mask)


def _valid_negatives(scores: tf.Tensor, keys: tf.Tensor | None, score_mask: tf.Tensor | None) -> tf.Tensor:
    valid = tf.logical_not(_positive_mask(scores))
    if score_mask is not None:
        valid = tf.logical_and(valid, tf.cast(score_mask, tf.bool))
    if keys is not None:
        keys = tf.convert_to_tensor(keys)
        row_keys = keys[: tf.shape(scores)[0]]
        hit = tf.equal(row_keys[:, tf.newaxis], keys[tf.newaxis, :])
        valid = tf.logical_and(valid, tf.logical_not(hit))
    return valid


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(per_row: tf.Tensor, reduction: str) -> tf.Tensor:
    if reduction == "mean":
        return tf.reduce_mean(per_row)
    if reduction == "sum":
        return tf.reduce_sum(per_row)
    return per_row


def _softmax_rows(logits: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """Cross-entropy of each row with its diagonal as the label, over the positive and ``valid`` columns.

    ``-log softmax(logits)[i, i] = logsumexp(kept logits of row i) - logits[i, i]``.
    """
    kept = tf.logical_or(valid, _positive_mask(logits))
    masked = tf.where(kept, logits, MASKED)
    return tf.reduce_logsumexp(masked, axis=1) - _diagonal(logits)


def _logq(logits: tf.Tensor, candidate_sampling_probability: tf.Tensor) -> tf.Tensor:
    """Subtract ``log p_j`` from column ``j`` (clipped to [1e-6, 1] like TFRS's correction)."""
    p = tf.cast(candidate_sampling_probability, tf.float32)
    return logits - tf.math.log(tf.clip_by_value(p, 1e-6, 1.0))[tf.newaxis, :]


# --------------------------------------------------------------------------------------------------
# Losses on the score matrix


def softmax_loss(scores: tf.Tensor, *, temperature: float = DEFAULT_TEMPERATURE, keys: tf.Tensor | None = None,
                 score_mask: tf.Tensor | None = None, candidate_sampling_probability: tf.Tensor | None = None,
                 reduction: str = "mean") -> tf.Tensor:
    """DSSM / InfoNCE in-batch softmax: ``-log(exp(s_ii/t) / sum_j exp(s_ij/t))`` over kept columns.

    Args:
        scores: ``[batch, num_candidates]`` cosines, positives on the diagonal.
        temperature: ``t``; DSSM's smoothing factor is ``gamma = 1/t``.
        keys: optional ``[num_candidates]`` keys; accidental hits (same key as the row's positive) are
            left out of the denominator.
        score_mask: optional ``[batch, num_candidates]`` bool; False leaves the entry out.
        candidate_sampling_probability: optional ``[num_candidates]`` probability that each candidate
            is sampled into a batch; logQ correction ``logit_ij = s_ij/t - log p_j`` (applied after the
            temperature, to every column including the positive, as ``tfrs.tasks.Retrieval`` does).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[batch]``).

    Returns:
        Scalar float32 (or ``[batch]`` with ``reduction="none"``).
    """
    _check_reduction(reduction)
    scores = _as_scores(scores)
    logits = scores / temperature
    if candidate_sampling_probability is not None:
        logits = _logq(logits, candidate_sampling_probability)
    valid = _valid_negatives(scores, keys, score_mask)
    return _reduce(_softmax_rows(logits, valid), reduction)


def triplet_loss(scores: tf.Tensor, *, margin: float = DEFAULT_MARGIN, keys: tf.Tensor | None = None,
                 score_mask: tf.Tensor | None = None, reduction: str = "mean") -> tf.Tensor:
    """Triplet loss against every in-batch negative: row ``i`` is ``mean_j max(s_ij - s_ii + margin, 0)``.

    The mean is over the row's negatives (after accidental hits and ``score_mask``); a row with no
    negative contributes 0.

    Args:
        scores: ``[batch, num_candidates]`` cosines, positives on the diagonal.
        margin: ``alpha``.
        keys: optional ``[num_candidates]`` keys for accidental-hit masking.
        score_mask: optional ``[batch, num_candidates]`` bool.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar float32 (or ``[batch]``).
    """
    _check_reduction(reduction)
    scores = _as_scores(scores)
    valid = _valid_negatives(scores, keys, score_mask)
    positive = _diagonal(scores)[:, tf.newaxis]
    hinge = tf.where(valid, tf.nn.relu(scores - positive + margin), 0.0)
    count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1)
    return _reduce(tf.math.divide_no_nan(tf.reduce_sum(hinge, axis=1), count), reduction)


def hard_negative_loss(scores: tf.Tensor, *, margin: float = DEFAULT_MARGIN, keys: tf.Tensor | None = None,
                       score_mask: tf.Tensor | None = None, reduction: str = "mean") -> tf.Tensor:
    """The Siamese-network loss ``L1 + L2`` from our notes.

    ``L1 = max(mean_neg - s_ii + margin, 0)`` with ``mean_neg`` the mean of the row's negatives;
    ``L2 = max(closest_neg - s_ii + margin, 0)`` with ``closest_neg`` the largest negative that is still
    strictly below the positive (the hardest negative the model already ranks correctly), or the row's
    largest negative when none is below. A row with no negative contributes 0.

    Args:
        scores: ``[batch, num_candidates]`` cosines, positives on the diagonal.
        margin: ``alpha``.
        keys: optional ``[num_candidates]`` keys for accidental-hit masking.
        score_mask: optional ``[batch, num_candidates]`` bool.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar float32 (or ``[batch]``).
    """
    _check_reduction(reduction)
    scores = _as_scores(scores)
    valid = _valid_negatives(scores, keys, score_mask)
    positive = _diagonal(scores)
    count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1)
    mean_neg = tf.math.divide_no_nan(tf.reduce_sum(tf.where(valid, scores, 0.0), axis=1), count)
    below = tf.logical_and(valid, scores < positive[:, tf.newaxis])
    closest_below = tf.reduce_max(tf.where(below, scores, MASKED), axis=1)
    row_max = tf.reduce_max(tf.where(valid, scores, MASKED), axis=1)
    closest = tf.where(tf.reduce_any(below, axis=1), closest_below, row_max)
    l1 = tf.nn.relu(mean_neg - positive + margin)
    l2 = tf.nn.relu(closest - positive + margin)
    per_row = tf.where(count > 0, l1 + l2, 0.0)
    return _reduce(per_row, reduction)


def circle_loss(scores: tf.Tensor, *, m: float = DEFAULT_CIRCLE_M, gamma: float = DEFAULT_CIRCLE_GAMMA,
                keys: tf.Tensor | None = None, score_mask: tf.Tensor | None = None,
                reduction: str = "mean") -> tf.Tensor:
    """Circle loss (Sun et al. 2020, "Circle Loss: A Unified Perspective of Pair Similarity Optimization").

    Per row, with ``s_p`` the diagonal and ``s_n`` the row's negatives:
    ``O_p = 1+m, O_n = -m, D_p = 1-m, D_n = m``, ``a_p = relu(O_p - s_p)``, ``a_n = relu(s_n - O_n)``,
    ``loss = softplus(logsumexp_n(gamma a_n (s_n - D_n)) - gamma a_p (s_p - D_p))``
    (one positive per row, so its logsumexp is the single term). As in the paper's reference code the
    weights ``a_p, a_n`` are treated as constants for the gradient. A row with no negative gives 0.

    Args:
        scores: ``[batch, num_candidates]`` cosines, positives on the diagonal.
        m: relaxation (paper: 0.25 for face recognition, 0.4 for fine-grained retrieval).
        gamma: scale (paper's default: 256 with m=0.25, sec. 4.1).
        keys: optional ``[num_candidates]`` keys for accidental-hit masking.
        score_mask: optional ``[batch, num_candidates]`` bool.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar float32 (or ``[batch]``).
    """
    _check_reduction(reduction)
    scores = _as_scores(scores)
    valid = _valid_negatives(scores, keys, score_mask)
    s_p = _diagonal(scores)
    alpha_p = tf.stop_gradient(tf.nn.relu(1.0 + m - s_p))
    alpha_n = tf.stop_gradient(tf.nn.relu(scores + m))
    logit_n = tf.where(valid, gamma * alpha_n * (scores - m), MASKED)
    logit_p = -gamma * alpha_p * (s_p - (1.0 - m))
    per_row = tf.nn.softplus(tf.reduce_logsumexp(logit_n, axis=1) + logit_p)
    return _reduce(per_row, reduction)


def contrastive_loss(scores: tf.Tensor, negative_scores: tf.Tensor, *, negative_mask: tf.Tensor | None = None,
                     temperature: float = DEFAULT_TEMPERATURE, keys: tf.Tensor | None = None,
                     negative_keys: tf.Tensor | None = None, score_mask: tf.Tensor | None = None,
                     candidate_sampling_probability: tf.Tensor | None = None,
                     reduction: str = "mean") -> tf.Tensor:
    """In-batch softmax plus each query's own explicit negatives (e.g. Quora non-duplicates).

    Row ``i``'s softmax runs over its positive, its in-batch negatives (as :func:`softmax_loss`) and
    its explicit negatives ``negative_scores[i]``.

    Args:
        scores: ``[batch, num_candidates]`` in-batch cosines, positives on the diagonal.
        negative_scores: ``[batch]`` (one explicit negative per query) or ``[batch, n_neg]`` cosines of
            query ``i`` with its explicit negative documents.
        negative_mask: optional, same shape as ``negative_scores``, bool; False = that query has no
            such explicit negative (the score is ignored).
        temperature: softmax temperature.
        keys: optional ``[num_candidates]`` keys for accidental hits among the in-batch columns.
        negative_keys: optional keys of the explicit negatives (shape of ``negative_scores``); with
            ``keys``, an explicit negative whose key equals the row's positive key is ignored.
        score_mask: optional ``[batch, num_candidates]`` bool for the in-batch columns.
        candidate_sampling_probability: optional ``[num_candidates]`` logQ correction of the in-batch
            columns (explicit negatives are chosen per query, not sampled by frequency, so uncorrected).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar float32 (or ``[batch]``).
    """
    _check_reduction(reduction)
    scores = _as_scores(scores)
    negatives = tf.cast(tf.convert_to_tensor(negative_scores), tf.float32)
    one_per_row = negatives.shape.rank == 1
    if one_per_row:
        negatives = negatives[:, tf.newaxis]
    elif negatives.shape.rank != 2:
        raise InputError(f"negative_scores must be [batch] or [batch, n_neg], got shape {negatives.shape}")

    def per_negative(mask: tf.Tensor) -> tf.Tensor:
        mask = tf.convert_to_tensor(mask)
        return mask[:, tf.newaxis] if one_per_row else mask

    neg_valid = tf.ones_like(negatives, dtype=tf.bool)
    if negative_mask is not None:
        neg_valid = tf.logical_and(neg_valid, tf.cast(per_negative(negative_mask), tf.bool))
    if keys is not None and negative_keys is not None:
        row_keys = tf.convert_to_tensor(keys)[: tf.shape(scores)[0]]
        neg_valid = tf.logical_and(neg_valid, tf.not_equal(row_keys[:, tf.newaxis], per_negative(negative_keys)))

    in_batch = scores / temperature
    if candidate_sampling_probability is not None:
        in_batch = _logq(in_batch, candidate_sampling_probability)
    logits = tf.concat([in_batch, negatives / temperature], axis=1)
    valid = tf.concat([_valid_negatives(scores, keys, score_mask), neg_valid], axis=1)
    return _reduce(_softmax_rows(logits, valid), reduction)


# --------------------------------------------------------------------------------------------------
# Losses on other inputs


def cosent_loss(cosines: tf.Tensor, labels: tf.Tensor, *, scale: float = DEFAULT_COSENT_SCALE) -> tf.Tensor:
    """CoSENT (Su 2022) for graded pairs: ``log(1 + sum_{label_i < label_j} exp(scale (cos_i - cos_j)))``.

    Every ordered pair of the batch whose labels say ``i`` is less similar than ``j`` is penalised
    when ``cos_i`` is not below ``cos_j``; equal labels give no term. Computed as a logsumexp over the
    terms with an extra 0 (the ``1 +``), so large ``scale`` cannot overflow.

    Args:
        cosines: ``[batch]`` cosine of each query with its own document (:func:`pair_cosines`).
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


def simcse_loss(first: tf.Tensor, second: tf.Tensor, *, temperature: float = DEFAULT_TEMPERATURE,
                keys: tf.Tensor | None = None, reduction: str = "mean") -> tf.Tensor:
    """Unsupervised SimCSE (Gao et al. 2021): two dropout views of the same texts are each other's positive.

    Row ``i`` is a softmax over ``cos(first_i, second_j) / temperature`` with ``j = i`` the positive.

    Args:
        first: ``[batch, dim]`` tower outputs of the texts with one dropout mask.
        second: ``[batch, dim]`` the same texts through the tower again (another dropout mask). Both
            are L2-normalised here, so raw (unnormalised) outputs are fine.
        temperature: 0.05 in the paper.
        keys: optional ``[batch]`` text keys: a repeated text elsewhere in the batch is not a negative.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar float32 (or ``[batch]``).
    """
    first = tf.math.l2_normalize(tf.cast(first, tf.float32), axis=-1)
    second = tf.math.l2_normalize(tf.cast(second, tf.float32), axis=-1)
    return softmax_loss(similarity_matrix(first, second), temperature=temperature, keys=keys, reduction=reduction)


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
    _check_reduction(reduction)
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
    return _reduce(per_row, reduction)


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


# --------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class LossSpec:
    """One ``--loss`` choice.

    Attributes:
        name: the ``--loss`` value.
        function: the loss function in this module.
        inputs: what the trainer must feed it:
            ``"scores"``: ``fn(scores [batch, n], *, keys=, score_mask=, reduction=)`` (softmax also takes
            ``candidate_sampling_probability=``);
            ``"scores+negatives"``: ``fn(scores, negative_scores [batch] | [batch, n_neg], *, negative_mask=,
            keys=, negative_keys=, score_mask=, candidate_sampling_probability=, reduction=)``;
            ``"graded"``: ``fn(cosines [batch], labels [batch])``, one scalar per batch;
            ``"views"``: ``fn(first [batch, dim], second [batch, dim], *, keys=, reduction=)``, the same
            texts through the tower twice with dropout on;
            ``"classifier"``: ``fn(logits [batch, num_classes], labels [batch], *, reduction=)`` with
            logits from ``PairClassifier(config.num_classes)((q, d))``.
        hyperparameters: ``(function keyword, LossConfig field)`` pairs that :func:`get_loss` binds;
            the field ``"temperature"`` stands for the temperature passed to :func:`get_loss`.
        logq: whether the loss accepts ``candidate_sampling_probability`` (logQ correction).
        summary: one line for ``--help`` and docs.
    """

    name: str
    function: Callable[..., tf.Tensor]
    inputs: str
    hyperparameters: tuple[tuple[str, str], ...]
    logq: bool
    summary: str


LOSSES: dict[str, LossSpec] = {
    spec.name: spec for spec in (
        LossSpec("softmax", softmax_loss, "scores", (("temperature", "temperature"),), True,
                 "DSSM/InfoNCE in-batch softmax with --temperature, accidental hits masked, optional logQ"),
        LossSpec("triplet", triplet_loss, "scores", (("margin", "margin"),), False,
                 "max(s(A,N) - s(A,P) + margin, 0) averaged over all in-batch negatives (--margin)"),
        LossSpec("hard-negative", hard_negative_loss, "scores", (("margin", "margin"),), False,
                 "L1 (mean negative) + L2 (closest negative below the positive) hinge losses (--margin)"),
        LossSpec("cosent", cosent_loss, "graded", (("scale", "cosent_scale"),), False,
                 "CoSENT ranking loss on labelled pairs (STS scores or 0/1; label-0 rows kept)"),
        LossSpec("circle", circle_loss, "scores", (("m", "circle_m"), ("gamma", "circle_gamma")), False,
                 "Circle loss (Sun et al. 2020) on the in-batch scores (--circle-m, --circle-gamma)"),
        LossSpec("contrastive", contrastive_loss, "scores+negatives", (("temperature", "temperature"),), True,
                 "in-batch softmax plus explicit negatives (needs `dssm pairs --negatives-as-third-input`)"),
        LossSpec("simcse", simcse_loss, "views", (("temperature", "temperature"),), False,
                 "label-free SimCSE: two dropout views of each query text (--dropout, 0.1 if unset)"),
        LossSpec("classifier", classifier_loss, "classifier", (), False,
                 "Sentence-BERT classifier over [u, v, |u-v|] on 0/1 pairs (head not exported)"),
    )
}

LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def _spec(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}") from None


def loss_help() -> str:
    """The ``--loss`` choices, one per line (``name  summary``), for ``dssm train --help``."""
    width = max(len(name) for name in LOSS_NAMES)
    return "\n".join(f"  {name:<{width}}  {spec.summary}" for name, spec in LOSSES.items())


def get_loss(name: str, *, config: LossConfig | None = None,
             temperature: float = DEFAULT_TEMPERATURE) -> Callable[..., tf.Tensor]:
    """The loss function ``name`` with ``config``'s hyperparameters bound as keyword defaults.

    The result still takes every tensor argument listed for its ``LossSpec.inputs``; a bound
    hyperparameter can be overridden per call by keyword.

    Args:
        name: a key of :data:`LOSSES`.
        config: the margins and scales; defaults when None.
        temperature: bound for the losses that take one (softmax, contrastive, simcse); the model
            passes ``ModelConfig.temperature``.

    Raises:
        ConfigError: ``name`` is not in :data:`LOSSES` (the message lists the known names), or
            ``config.logq_correction`` is set for a loss without logQ correction.
    """
    spec = _spec(name)
    config = config if config is not None else LossConfig()
    if config.logq_correction and not spec.logq:
        with_logq = [n for n, s in LOSSES.items() if s.logq]
        raise ConfigError(f"logq_correction is not available for loss {name!r}; only for {with_logq}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    bound = {keyword: temperature if attribute == "temperature" else getattr(config, attribute)
             for keyword, attribute in spec.hyperparameters}
    return functools.partial(spec.function, **bound)


class RetrievalLoss:
    """A score-matrix loss behind ``tfrs.tasks.Retrieval``'s call signature (``dssm.model.PairLoss``).

    ``DSSMModel`` builds one for every score-matrix loss (``ModelConfig.loss``).
    Scores are ``query_embeddings @ candidate_embeddings^T`` (the towers L2-normalise). Candidates past
    the batch (explicit negatives appended by the model, other replicas' documents) are negatives for
    every row unless ``score_mask`` drops them, so ``contrastive`` here is the in-batch softmax with the
    explicit negatives as extra columns. Returns the *sum* of the per-row losses (times
    ``sample_weight``); the model divides by the global batch.

    Args:
        name: one of the losses whose ``inputs`` are ``"scores"`` or ``"scores+negatives"``.
        config: hyperparameters.
        temperature: for softmax / contrastive (``ModelConfig.temperature``).

    Raises:
        ConfigError: unknown name, or a loss that needs other inputs (cosent, simcse, classifier).
    """

    def __init__(self, name: str, *, config: LossConfig | None = None,
                 temperature: float = DEFAULT_TEMPERATURE) -> None:
        spec = _spec(name)
        if spec.inputs not in ("scores", "scores+negatives"):
            usable = [n for n, s in LOSSES.items() if s.inputs in ("scores", "scores+negatives")]
            raise ConfigError(f"loss {name!r} needs {spec.inputs!r} inputs, not a score matrix; "
                              f"RetrievalLoss takes {usable}")
        self.name = name
        self.config = config if config is not None else LossConfig()
        # contrastive on the model's layout (explicit negatives as extra columns) is exactly softmax.
        self._function = get_loss("softmax" if name == "contrastive" else name, config=self.config,
                                  temperature=temperature)
        self._logq = spec.logq

    def __call__(self, query_embeddings: tf.Tensor, candidate_embeddings: tf.Tensor, *,
                 sample_weight: tf.Tensor | None = None,
                 candidate_sampling_probability: tf.Tensor | None = None,
                 candidate_ids: tf.Tensor | None = None, score_mask: tf.Tensor | None = None,
                 compute_metrics: bool = False, compute_batch_metrics: bool = False) -> tf.Tensor:
        """Loss of a batch.

        Args:
            query_embeddings: ``[batch, dim]``.
            candidate_embeddings: ``[num_candidates, dim]``, row ``i`` the positive of query ``i``.
            sample_weight: optional ``[batch]`` weights of the rows.
            candidate_sampling_probability: ``[num_candidates]``; required when
                ``config.logq_correction`` is set, refused for losses without logQ.
            candidate_ids: optional ``[num_candidates]`` keys for accidental-hit masking.
            score_mask: optional ``[batch, num_candidates]`` bool.
            compute_metrics: accepted for signature compatibility; this adapter keeps no metrics.
            compute_batch_metrics: likewise.

        Returns:
            Scalar float32: sum over rows of ``sample_weight * loss``.
        """
        del compute_metrics, compute_batch_metrics
        scores = similarity_matrix(query_embeddings, candidate_embeddings)
        extra = {}
        if candidate_sampling_probability is not None:
            if not self._logq:
                raise ConfigError(f"loss {self.name!r} has no logQ correction; got candidate_sampling_probability")
            extra["candidate_sampling_probability"] = candidate_sampling_probability
        elif self.config.logq_correction:
            raise ConfigError(f"logq_correction is set for loss {self.name!r} but no "
                              "candidate_sampling_probability was passed")
        per_row = self._function(scores, keys=candidate_ids, score_mask=score_mask, reduction="none", **extra)
        if sample_weight is not None:
            per_row = per_row * tf.cast(sample_weight, tf.float32)
        return tf.reduce_sum(per_row)
