"""The score-matrix losses: pure TensorFlow functions on in-batch similarity matrices, and their helpers.

This module owns the functions every retrieval loss is made of. Most take the in-batch score matrix
``scores`` ``[batch, num_candidates]``: row ``i`` holds the cosines of query ``i`` with every
candidate, its positive sits on the diagonal (column ``i``), and every other allowed column is a
negative. ``num_candidates >= batch``: the first ``batch`` columns are the batch's documents and any
further columns are extra negatives (explicit hard negatives, or the documents of other replicas).
Which columns count as negatives can be narrowed by

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
them (what :class:`dssm.losses.RetrievalLoss` returns, the model divides by the global batch),
``"none"`` returns the ``[batch]`` per-row losses. SimCSE is here too: it is the softmax loss on the
score matrix of two dropout views. The losses on labelled pairs (CoSENT, the classifier) are in
:mod:`dssm.pair_losses`; the ``--loss`` registry is :mod:`dssm.losses`.
"""

from __future__ import annotations

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.errors import ConfigError, InputError

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = [
    "MASKED",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_MARGIN",
    "DEFAULT_CIRCLE_M",
    "DEFAULT_CIRCLE_GAMMA",
    "similarity_matrix",
    "pair_cosines",
    "negative_mask",
    "check_reduction",
    "reduce_rows",
    "softmax_loss",
    "triplet_loss",
    "hard_negative_loss",
    "circle_loss",
    "contrastive_loss",
    "simcse_loss",
    "distillation_loss",
]


# Same value as tfrs.layers.loss.MIN_FLOAT: exp(MASKED - max) is exactly 0 in float32, and unlike
# -inf it never produces inf - inf = NaN when a whole row is masked.
MASKED = float(np.finfo(np.float32).min / 100.0)

_REDUCTIONS = ("mean", "sum", "none")

DEFAULT_TEMPERATURE = 0.05
DEFAULT_MARGIN = 0.2
DEFAULT_CIRCLE_M = 0.25
DEFAULT_CIRCLE_GAMMA = 256.0


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


def _as_scores(scores: tf.Tensor, name: str = "scores", *, diagonal: bool = True) -> tf.Tensor:
    """float32 ``[batch, num_candidates]``; with ``diagonal`` (row i's positive is column i) at least as many
    columns as rows."""
    scores = tf.cast(tf.convert_to_tensor(scores), tf.float32)
    rank = scores.shape.rank
    if rank is not None and rank != 2:
        raise InputError(f"{name} must be a [batch, num_candidates] matrix, got shape {scores.shape}")
    rows, cols = scores.shape[0], scores.shape[1]
    if diagonal and rows is not None and cols is not None and cols < rows:
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


def check_reduction(reduction: str) -> None:
    """Raise ``ConfigError`` unless ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``."""
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def reduce_rows(per_row: tf.Tensor, reduction: str) -> tf.Tensor:
    """``[batch]`` per-row losses → their mean, their sum, or themselves (``"none"``)."""
    if reduction == "mean":
        return tf.reduce_mean(per_row)
    if reduction == "sum":
        return tf.reduce_sum(per_row)
    return per_row


def _softmax_rows(logits: tf.Tensor, valid: tf.Tensor, label_smoothing: float = 0.0) -> tf.Tensor:
    """Cross-entropy of each row with its diagonal as the label, over the positive and ``valid`` columns.

    ``-log softmax(logits)[i, i] = logsumexp(kept logits of row i) - logits[i, i]``. With label smoothing
    ``e`` the target is ``1 - e`` on the diagonal plus ``e`` spread evenly over the row's kept columns
    (the diagonal included), scaled by ``1 / (1 - e)`` so that the positive's term keeps its weight: the
    row's loss is ``that + e / (1 - e) * (logsumexp - mean of the kept logits)``. (Unscaled, Adagrad's
    first steps shrink with the loss; on debian-dev's fine-tuning that cost 0.012 of the gain.)
    """
    kept = tf.logical_or(valid, _positive_mask(logits))
    masked = tf.where(kept, logits, MASKED)
    total = tf.reduce_logsumexp(masked, axis=1)
    rows = total - _diagonal(logits)
    if not label_smoothing:
        return rows
    kept_mean = tf.reduce_sum(tf.where(kept, logits, 0.0), axis=1) / tf.reduce_sum(tf.cast(kept, tf.float32), axis=1)
    return rows + label_smoothing / (1.0 - label_smoothing) * (total - kept_mean)


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _logq(logits: tf.Tensor, candidate_sampling_probability: tf.Tensor) -> tf.Tensor:
    """Subtract ``log p_j`` from column ``j`` (clipped to [1e-6, 1] like TFRS's correction)."""
    p = tf.cast(candidate_sampling_probability, tf.float32)
    return logits - tf.math.log(tf.clip_by_value(p, 1e-6, 1.0))[tf.newaxis, :]


# --------------------------------------------------------------------------------------------------
# Losses on the score matrix


def softmax_loss(scores: tf.Tensor, *, temperature: float = DEFAULT_TEMPERATURE, keys: tf.Tensor | None = None,
                 score_mask: tf.Tensor | None = None, candidate_sampling_probability: tf.Tensor | None = None,
                 label_smoothing: float = 0.0, reduction: str = "mean") -> tf.Tensor:
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
        label_smoothing: ``e`` in [0, 1): the share of each row's target spread evenly over its kept
            columns instead of on the positive alone (Szegedy et al. 2016), the row's loss scaled by
            ``1 / (1 - e)`` (the positive's term as without smoothing).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[batch]``).

    Returns:
        Scalar float32 (or ``[batch]`` with ``reduction="none"``).
    """
    check_reduction(reduction)
    _check_smoothing(label_smoothing)
    scores = _as_scores(scores)
    logits = scores / temperature
    if candidate_sampling_probability is not None:
        logits = _logq(logits, candidate_sampling_probability)
    valid = _valid_negatives(scores, keys, score_mask)
    return reduce_rows(_softmax_rows(logits, valid, label_smoothing), reduction)


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
    check_reduction(reduction)
    scores = _as_scores(scores)
    valid = _valid_negatives(scores, keys, score_mask)
    positive = _diagonal(scores)[:, tf.newaxis]
    hinge = tf.where(valid, tf.nn.relu(scores - positive + margin), 0.0)
    count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1)
    return reduce_rows(tf.math.divide_no_nan(tf.reduce_sum(hinge, axis=1), count), reduction)


def hard_negative_loss(scores: tf.Tensor, *, margin: float = DEFAULT_MARGIN, keys: tf.Tensor | None = None,
                       score_mask: tf.Tensor | None = None, reduction: str = "mean") -> tf.Tensor:
    """The Siamese-network loss ``L1 + L2`` from our notes.

    ``L1 = max(mean_neg - s_ii + margin, 0)`` with ``mean_neg`` the mean of the row's negatives;
    ``L2 = max(closest_neg - s_ii + margin, 0)`` with ``closest_neg`` the largest negative that is still
    strictly below the positive (the hardest negative the model already ranks correctly), or the row's
    largest negative when none is below. A row with no negative contributes 0.

    Arguments, shapes and the result are as for :func:`triplet_loss`.
    """
    check_reduction(reduction)
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
    return reduce_rows(per_row, reduction)


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
    check_reduction(reduction)
    scores = _as_scores(scores)
    valid = _valid_negatives(scores, keys, score_mask)
    s_p = _diagonal(scores)
    alpha_p = tf.stop_gradient(tf.nn.relu(1.0 + m - s_p))
    alpha_n = tf.stop_gradient(tf.nn.relu(scores + m))
    logit_n = tf.where(valid, gamma * alpha_n * (scores - m), MASKED)
    logit_p = -gamma * alpha_p * (s_p - (1.0 - m))
    per_row = tf.nn.softplus(tf.reduce_logsumexp(logit_n, axis=1) + logit_p)
    return reduce_rows(per_row, reduction)


def contrastive_loss(scores: tf.Tensor, negative_scores: tf.Tensor, *, negative_mask: tf.Tensor | None = None,
                     temperature: float = DEFAULT_TEMPERATURE, keys: tf.Tensor | None = None,
                     negative_keys: tf.Tensor | None = None, score_mask: tf.Tensor | None = None,
                     candidate_sampling_probability: tf.Tensor | None = None, label_smoothing: float = 0.0,
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
        label_smoothing: as :func:`softmax_loss`; the explicit negatives are columns like the others.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Scalar float32 (or ``[batch]``).
    """
    check_reduction(reduction)
    _check_smoothing(label_smoothing)
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
    return reduce_rows(_softmax_rows(logits, valid, label_smoothing), reduction)


# --------------------------------------------------------------------------------------------------
# Two dropout views of the same texts (the score matrix of the views)


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


def distillation_loss(scores: tf.Tensor, teacher_scores: tf.Tensor, *, temperature: float = DEFAULT_TEMPERATURE,
                      teacher_temperature: float = DEFAULT_TEMPERATURE, score_mask: tf.Tensor | None = None,
                      reduction: str = "mean") -> tf.Tensor:
    """KL divergence from the teacher's in-batch score distribution to the student's, per row.

    Row ``i``: ``sum_j p_ij (log p_ij - log q_ij)`` with ``p = softmax(teacher_scores_i / t_teacher)``
    and ``q = softmax(scores_i / t)`` over the same kept columns (the positive, and every column
    ``score_mask`` allows). The student learns how much *more* alike the teacher finds each in-batch
    pair than the others, not only which one is the positive (Hinton et al. 2015; the in-batch form
    of Hofstätter et al.'s cross-architecture distillation).

    Args:
        scores: ``[batch, num_candidates]`` the student's cosines, positives on the diagonal; without
            ``score_mask`` no column is special, so any candidate set works (a text against every
            label: ``dssm.tag_losses``, with more texts than labels allowed).
        teacher_scores: ``[batch, num_candidates]`` the teacher's cosines of the same pairs.
        temperature: the student's ``t``.
        teacher_temperature: the teacher's ``t``: lower sharpens its distribution.
        score_mask: optional ``[batch, num_candidates]`` bool; False leaves the column out of both
            distributions (accidental hits, missing negatives).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[batch]``).

    Returns:
        Scalar float32 (or ``[batch]``); 0 when the two distributions agree.
    """
    check_reduction(reduction)
    diagonal = score_mask is not None  # only the mask reads the positives on the diagonal
    scores = _as_scores(scores, diagonal=diagonal)
    teacher_scores = _as_scores(teacher_scores, "teacher_scores", diagonal=diagonal)
    kept = tf.ones_like(scores, dtype=tf.bool)
    if score_mask is not None:
        kept = tf.logical_or(_positive_mask(scores), tf.cast(score_mask, tf.bool))
    student_log = tf.nn.log_softmax(tf.where(kept, scores / temperature, MASKED), axis=1)
    teacher_log = tf.nn.log_softmax(tf.where(kept, teacher_scores / teacher_temperature, MASKED), axis=1)
    # Masked columns have p = 0 exactly; where() keeps 0 * (MASKED - MASKED) style terms out of the sum.
    per_entry = tf.where(kept, tf.exp(teacher_log) * (teacher_log - student_log), 0.0)
    return reduce_rows(tf.reduce_sum(per_entry, axis=1), reduction)
