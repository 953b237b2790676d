"""The ``--loss`` choices: their hyperparameters, the registry that names them, and the model's adapter.

This module owns :class:`LossConfig` (the margins and scales, saved as ``config.json["loss"]``), the
registry :data:`LOSSES` that maps each ``--loss`` name to a :class:`LossSpec` (function, which inputs
it needs, which :class:`LossConfig` fields it reads), :func:`get_loss`, which binds a config's
hyperparameters to the function, and :class:`RetrievalLoss`, a score-matrix loss behind
``tfrs.tasks.Retrieval``'s call signature. The loss functions themselves are in
:mod:`dssm.score_losses` (softmax, triplet, hard-negative, circle, contrastive, simcse; the score
matrix's conventions are described there) and :mod:`dssm.pair_losses` (cosent, classifier).

The temperature is not in :class:`LossConfig`: it is ``ModelConfig.temperature`` (it predates this
module, is in every saved model's config and has one ``--temperature`` flag), passed to
:func:`get_loss` / :class:`RetrievalLoss` by the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.config import field
from dssm.errors import ConfigError
from dssm.pair_losses import classifier_loss, cosent_loss
from dssm.score_losses import (
    DEFAULT_CIRCLE_M,
    DEFAULT_TEMPERATURE,
    circle_loss,
    contrastive_loss,
    hard_negative_loss,
    simcse_loss,
    similarity_matrix,
    softmax_loss,
    triplet_loss,
)

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["LossConfig", "LossSpec", "LOSSES", "LOSS_NAMES", "SCORE_MATRIX_INPUTS", "get_loss", "loss_help",
           "RetrievalLoss"]

#: The ``LossSpec.inputs`` kinds trained through a score matrix (:class:`RetrievalLoss`).
SCORE_MATRIX_INPUTS = ("scores", "scores+negatives", "scores+graded")


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
    cosent_weight: float = field(
        1.0, "softmax+cosent: weight of the CoSENT term beside the in-batch softmax (1: the two terms as they are)")
    logq_correction: bool = field(
        False,
        "subtract log(sampling probability) of each in-batch document from its logit (softmax and "
        "contrastive); the trainer passes the probabilities, estimated from document frequency")

    label_smoothing: float = field(
        0.0, "softmax, contrastive, softmax+cosent: the share of each query's target spread evenly over its in-batch "
        "columns instead of on its document alone (0: off). Fine-tuning on debian-dev's pairs, 0.5 lifted the towers "
        "alone (val R@10 among the corpus 0.753 -> 0.770, 3 seeds) but not the hybrid (docs/quality.md)")
    distill_weight: float = field(
        0.0, "weight of the teacher-distillation term (KL from the teacher's in-batch score distribution to "
        "the towers', beside the loss); needs pairs made with `dssm pairs --teacher minilm`. 0: off")
    teacher_temperature: float = field(
        0.05, "temperature on the teacher's cosines in the distillation term (lower: sharper teacher)")
    distill_pairs_weight: float = field(
        0.0, "weight of the pair-distillation term: CoSENT over the batch's (query, document) pairs with the "
        "teacher's cosine of each pair as its graded label, so the towers order pairs across queries as the "
        "teacher does (what one duplicate threshold reads); needs teacher vectors like --distill-weight. 0: off")

    @property
    def distils(self) -> bool:
        """Whether a teacher term is on (either weight > 0): the batches then need teacher vectors."""
        return self.distill_weight > 0 or self.distill_pairs_weight > 0

    def __post_init__(self) -> None:
        if not self.distill_weight >= 0:
            raise ConfigError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if not self.distill_pairs_weight >= 0:
            raise ConfigError(f"distill_pairs_weight must be >= 0, got {self.distill_pairs_weight}")
        if not self.teacher_temperature > 0:
            raise ConfigError(f"teacher_temperature must be > 0, got {self.teacher_temperature}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.margin >= 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")
        if not self.cosent_scale > 0:
            raise ConfigError(f"cosent_scale must be > 0, got {self.cosent_scale}")
        if not 0 <= self.circle_m < 1:
            raise ConfigError(f"circle_m must be in [0, 1), got {self.circle_m}")
        if not self.circle_gamma > 0:
            raise ConfigError(f"circle_gamma must be > 0, got {self.circle_gamma}")
        if not self.cosent_weight > 0:
            raise ConfigError(f"cosent_weight must be > 0, got {self.cosent_weight}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")


# --------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class LossSpec:
    """One ``--loss`` choice.

    Attributes:
        name: the ``--loss`` value.
        function: the loss function (:mod:`dssm.score_losses` or :mod:`dssm.pair_losses`).
        inputs: what the trainer must feed it:
            ``"scores"``: ``fn(scores [batch, n], *, keys=, score_mask=, reduction=)`` (softmax also takes
            ``candidate_sampling_probability=``);
            ``"scores+negatives"``: ``fn(scores, negative_scores [batch] | [batch, n_neg], *, negative_mask=,
            keys=, negative_keys=, score_mask=, candidate_sampling_probability=, reduction=)``;
            ``"graded"``: ``fn(cosines [batch], labels [batch])``, one scalar per batch;
            ``"scores+graded"``: the ``"scores"`` form over the rows with ``label > 0`` (positives),
            plus ``LossConfig.cosent_weight`` times cosent over every labelled pair of the batch;
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


# The softmax family's hyperparameters: (keyword of the function, attribute of ModelConfig / LossConfig).
_SMOOTHING = ("label_smoothing", "label_smoothing")
_SOFTMAX_PARAMETERS = (("temperature", "temperature"), _SMOOTHING)
LOSSES: dict[str, LossSpec] = {
    spec.name: spec for spec in (
        LossSpec("softmax", softmax_loss, "scores", _SOFTMAX_PARAMETERS, True,
                 "DSSM/InfoNCE in-batch softmax with --temperature, accidental hits masked, optional logQ"),
        LossSpec("triplet", triplet_loss, "scores", (("margin", "margin"),), False,
                 "max(s(A,N) - s(A,P) + margin, 0) averaged over all in-batch negatives (--margin)"),
        LossSpec("hard-negative", hard_negative_loss, "scores", (("margin", "margin"),), False,
                 "L1 (mean negative) + L2 (closest negative below the positive) hinge losses (--margin)"),
        LossSpec("cosent", cosent_loss, "graded", (("scale", "cosent_scale"),), False,
                 "CoSENT ranking loss on labelled pairs (STS scores or 0/1; label-0 rows kept)"),
        LossSpec("circle", circle_loss, "scores", (("m", "circle_m"), ("gamma", "circle_gamma")), False,
                 "Circle loss (Sun et al. 2020) on the in-batch scores (--circle-m, --circle-gamma)"),
        LossSpec("contrastive", contrastive_loss, "scores+negatives", _SOFTMAX_PARAMETERS, True,
                 "in-batch softmax plus explicit negatives (needs `dssm pairs --negatives-as-third-input`)"),
        LossSpec("simcse", simcse_loss, "views", (("temperature", "temperature"),), False,
                 "label-free SimCSE: two dropout views of each query text (--dropout, 0.1 if unset)"),
        LossSpec("classifier", classifier_loss, "classifier", (), False,
                 "Sentence-BERT classifier over [u, v, |u-v|] on 0/1 pairs (head not exported)"),
        LossSpec("softmax+cosent", softmax_loss, "scores+graded", _SOFTMAX_PARAMETERS, False,
                 "in-batch softmax on the duplicates plus --cosent-weight x CoSENT on every labelled pair "
                 "(non-duplicates kept): retrieval and duplicate detection from one model"),
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
    if config.label_smoothing and _SMOOTHING not in spec.hyperparameters:
        with_smoothing = [n for n, s in LOSSES.items() if _SMOOTHING in s.hyperparameters]
        raise ConfigError(f"label_smoothing is not available for loss {name!r}; only for {with_smoothing}")
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
        if spec.inputs not in SCORE_MATRIX_INPUTS:
            usable = [n for n, s in LOSSES.items() if s.inputs in SCORE_MATRIX_INPUTS]
            raise ConfigError(f"loss {name!r} needs {spec.inputs!r} inputs, not a score matrix; "
                              f"RetrievalLoss takes {usable}")
        self.name = name
        self.config = config if config is not None else LossConfig()
        # contrastive on the model's layout (explicit negatives as extra columns) is exactly softmax;
        # softmax+cosent's score-matrix term is the softmax (the model adds the CoSENT term).
        self._function = get_loss("softmax" if name in ("contrastive", "softmax+cosent") else name, config=self.config,
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
