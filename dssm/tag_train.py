"""Train the towers to tag: texts × label descriptions with a multi-label loss (``dssm train-tags``).

A text goes through the query tower, every label's *description* through the document tower, and the
logit of (text, label) is ``scale · cosine + bias`` (``bias`` one trained scalar). Each step scores
the batch's texts against **all** labels (a few hundred descriptions per step is cheap) with
:func:`dssm.tag_losses.multilabel_softmax_loss` (default) or the per-label sigmoid baseline. Because
labels are scored through their descriptions, the exported model is an ordinary two-tower model: a
label never seen in training is scored the same way (zero-shot), and a new label needs no retraining.

The decision threshold is chosen on a held-out split of the *training* texts (``validation_fraction``,
by a hash of each text's id): the cosine with the best micro-F1 there, beside the loss's natural one
(logit 0, i.e. ``cosine = −bias/scale``). Both go to ``history.json["tagging"]``; ``dssm tag --labels``
copies them into the tags index, so ``dssm tag`` can return "every label above the threshold".
The same split picks the epoch kept (``keep_best``, by micro-F1 at its own best threshold).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.config import field
from dssm.data import split_of
from dssm.errors import ConfigError, InputError
from dssm.export import export_model, read_model_configs
from dssm.features import FeatureConfig
from dssm.model import DSSMModel, ModelConfig
from dssm.optim import OPTIMIZERS, make_optimizer
from dssm.tag_losses import TAG_LOSSES, tag_loss
from dssm.tag_metrics import best_threshold, micro_f1
from dssm.train import load_towers

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["TagTrainConfig", "TagTrainer", "train_tagger", "export_tagger", "split_mask"]


@dataclass(frozen=True)
class TagTrainConfig:
    """How the towers are trained to tag. Saved as ``config.json["train"]`` beside the model."""

    loss: str = field("multilabel", f"tagging loss, one of {TAG_LOSSES}: multilabel = the multi-label softmax "
                      "cross-entropy log(1+Σ_neg e^s) + log(1+Σ_pos e^-s); sigmoid = per-label binary cross-entropy; "
                      "distill = no labels, KL from a teacher's zero-shot label distribution (train-tags --teacher)")
    teacher_temperature: float = field(0.05, "distill: the teacher's distribution is softmax(cosine / this); 0.05 "
                                       "matches the towers' scale 20 (and dssm train's --teacher-temperature)")
    scale: float = field(20.0, "logit = scale · cosine + bias (bias is trained)")
    epochs: int = field(10, "passes over the training texts")
    batch_size: int = field(64, "texts per step (each is scored against every label)")
    learning_rate: float = field(0.002, "optimizer learning rate")
    optimizer: str = field(
        "lazy_adam", f"one of {OPTIMIZERS} (as dssm train). lazy_adam at 0.002 is the default: on debtags' held-out "
        "training texts, micro-F1 0.660 after 10 epochs vs 0.566 for rowwise_adagrad at 0.05 (0.603 after 25)")
    seed: int = field(0, "seed for initialisation and shuffling")
    validation_fraction: float = field(
        0.1, "share of the training texts (by a hash of the id) held out to choose the threshold and the epoch")
    keep_best: bool = field(True, "keep the epoch with the best held-out micro-F1, not the last")
    label_vectors: bool = field(
        True, "learn a vector per label, added to its description's embedding (like a linear classifier's "
        "weights, but starting from the description); a label without one (added later) uses its description alone")
    hidden_dims: tuple[int, ...] = field(
        (300, 512), "the towers' dense layers (the last is the output dim) when starting from random init. "
        "(300, 512) with relu is the default: on debtags' held-out training texts, micro-F1 0.673 (mean of 3 "
        "seeds) vs 0.654 for the retrieval towers' (300, 128) with tanh (3 seeds); ignored with init_from")
    activation: str = field("relu", "activation after every dense layer when starting from random init; "
                            "ignored with init_from")
    init_from: str = field("", "start from this model directory's towers (e.g. `dssm train` on the texts), "
                           "their shape included; '' = random init with the default features and hidden_dims")
    verbose: int = field(1, "0 silent, 1 a progress bar per epoch, 2 one line per epoch")

    def __post_init__(self) -> None:
        if self.loss not in TAG_LOSSES:
            raise ConfigError(f"loss must be one of {TAG_LOSSES}, got {self.loss!r}")
        if not self.teacher_temperature > 0:
            raise ConfigError(f"teacher_temperature must be > 0, got {self.teacher_temperature}")
        if not self.scale > 0 or self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ConfigError(f"scale, epochs, batch_size and learning_rate must be positive, got {self.scale}, "
                              f"{self.epochs}, {self.batch_size}, {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        ModelConfig(hidden_dims=self.hidden_dims, activation=self.activation)  # a bad shape fails here, not mid-run


def split_mask(ids: Sequence[str], fraction: float) -> np.ndarray:
    """``[len(ids)]`` bool, True for the held-out texts (a stable hash of each id, as ``dssm pairs``' split)."""
    return np.array([split_of(i, validation_fraction=fraction, salt="tags") == "validation" for i in ids])


class TagTrainer:
    """The towers, the trained bias and one compiled training step.

    Args:
        model: a :class:`DSSMModel` (its towers are trained; its pair loss is not used).
        label_texts: ``[num_labels]`` descriptions.
        config: the run's settings.
    """

    def __init__(self, model: DSSMModel, label_texts: Sequence[str], config: TagTrainConfig) -> None:
        self.model = model
        self.config = config
        self.labels = tf.constant(list(label_texts))
        self.loss_fn = tag_loss(config.loss, teacher_temperature=config.teacher_temperature)
        self.bias = tf.Variable(0.0, dtype=tf.float32, name="tag_bias")
        self.residual = (tf.Variable(tf.zeros([len(label_texts), model.config.output_dim]), name="label_vectors")
                         if config.label_vectors else None)
        self.optimizer = make_optimizer(config)
        self.step = tf.function(self._step, reduce_retracing=True)

    def logits(self, texts: tf.Tensor, *, training: bool) -> tf.Tensor:
        """``[batch]`` strings → ``[batch, num_labels]`` logits ``scale · cos + bias``."""
        model = self.model
        n = tf.shape(texts)[0]
        if model.query_tower is model.document_tower:
            # One tower call on texts and labels together: one gather of the table per step, so its
            # gradient has unique rows (what the sparse optimizers expect, dssm.optim).
            ids, counts = model.featurizer.bags(tf.concat([texts, self.labels], axis=0))
            both = model.query_tower((ids, counts), training=training)
            queries, labels = both[:n], both[n:]
        else:
            queries = model.query_tower(model.featurizer.bags(texts), training=training)
            labels = model.document_tower(model.featurizer.bags(self.labels), training=training)
        return self.config.scale * tf.matmul(queries, self._label_vectors(labels), transpose_b=True) + self.bias

    def _label_vectors(self, description_embeddings: tf.Tensor) -> tf.Tensor:
        if self.residual is None:
            return description_embeddings
        return tf.math.l2_normalize(description_embeddings + self.residual, axis=-1)

    def label_matrix(self) -> np.ndarray:
        """``[num_labels, dim]`` float32 unit vectors the tags index stores: descriptions (+ learned vectors)."""
        tower = self.model.document_tower
        return self._label_vectors(tower(self.model.featurizer.bags(self.labels), training=False)).numpy()

    def _step(self, texts: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = self.loss_fn(self.logits(texts, training=True), targets)
        variables = self.model.query_tower.trainable_variables + [self.bias]
        if self.residual is not None:
            variables.append(self.residual)
        if self.model.document_tower is not self.model.query_tower:
            variables += self.model.document_tower.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    def predict(self, texts: Sequence[str], *, batch_size: int = 1024) -> np.ndarray:
        """``[len(texts), num_labels]`` float32 logits (no dropout)."""
        parts = [self.logits(tf.constant(list(texts[i:i + batch_size])), training=False).numpy()
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, int(self.labels.shape[0])), np.float32)

    def threshold_cosines(self, logit_threshold: float) -> float:
        """The cosine at which the logit equals ``logit_threshold``."""
        return float((logit_threshold - float(self.bias.numpy())) / self.config.scale)


def _epoch(trainer: TagTrainer, texts: list[str], targets: np.ndarray, rng: np.random.Generator,
           epoch: int) -> float:
    config = trainer.config
    order = rng.permutation(len(texts))
    bar = tf.keras.utils.Progbar(len(order), verbose=config.verbose, unit_name="text",
                                 stateful_metrics=["loss"]) if config.verbose == 1 else None
    if bar is not None:
        print(f"Epoch {epoch}/{config.epochs}")
    losses = []
    for start in range(0, len(order), config.batch_size):
        rows = order[start:start + config.batch_size]
        loss = float(trainer.step(tf.constant([texts[i] for i in rows]), tf.constant(targets[rows])))
        losses.append(loss * len(rows))
        if bar is not None:
            bar.add(len(rows), values=[("loss", loss)])
    return float(sum(losses) / max(len(order), 1))


def train_tagger(texts: Sequence[str], targets: np.ndarray, *, ids: Sequence[str], label_texts: Sequence[str],
                 config: TagTrainConfig, model_config: ModelConfig | None = None,
                 feature_config: FeatureConfig | None = None) -> tuple[TagTrainer, dict[str, Any]]:
    """Train the towers on labelled texts; choose the threshold on the held-out split.

    Args:
        texts: ``n`` training texts.
        targets: ``[n, num_labels]`` bool (:func:`dssm.tag_data.label_matrix`); with ``loss="distill"``
            float: the teacher's cosines of each text with each description (:func:`dssm.tagging.train_tags`).
        ids: ``n`` text ids (the held-out split hashes them).
        label_texts: ``num_labels`` descriptions, in ``targets``' column order.
        config: the run's settings.
        model_config, feature_config: tower shape and hashing; with ``config.init_from`` they are read
            from that model (giving them too is an error), else the defaults (the tower's dense layers
            from ``config.hidden_dims`` and ``config.activation``).

    Returns:
        ``(trainer, history)``; ``history`` has per-epoch ``loss`` and ``val_micro_f1`` lists,
        ``best_epoch``, ``wall_seconds`` and ``tagging`` (``threshold`` and ``natural_threshold`` as
        cosines, ``scale``, ``bias``, ``loss``, ``validation_texts``, ``val_micro_f1`` at each).

    Raises:
        InputError: lengths differ, or no training text is left after the held-out split.
        ConfigError: ``init_from`` with explicit configs.
    """
    # size: the run's whole sequence (configs, split, epochs, keep-best, threshold) in one readable place
    # distill: the teacher's cosines, which the loss turns into its distribution; its best label stands in
    # for the labels where a decision is needed (the held-out micro-F1 that picks the epoch, the threshold).
    soft = config.loss == "distill"
    targets = np.asarray(targets, dtype=np.float32 if soft else bool)
    decisions = _one_hot_best(targets) if soft else targets
    if not (len(texts) == len(ids) == targets.shape[0]) or targets.shape[1] != len(label_texts):
        raise InputError(f"{len(texts)} texts, {len(ids)} ids and targets {targets.shape} for "
                         f"{len(label_texts)} labels do not match")
    tick = time.perf_counter()
    if config.init_from:
        if model_config is not None or feature_config is not None:
            raise ConfigError("init_from reads the tower shape and features from the model; do not pass them")
        feature_config, model_config, _ = read_model_configs(config.init_from)
    model_config = model_config or ModelConfig(hidden_dims=config.hidden_dims, activation=config.activation)
    feature_config = feature_config or FeatureConfig()
    held = split_mask(ids, config.validation_fraction) if config.validation_fraction else np.zeros(len(ids), bool)
    train_rows, val_rows = np.flatnonzero(~held), np.flatnonzero(held)
    if not len(train_rows):
        raise InputError(f"no training text left after holding out {config.validation_fraction:.0%}")
    tf.keras.utils.set_random_seed(config.seed)
    # One device: TensorFlow places the step on a GPU when there is one (a few hundred labels and a
    # small batch leave nothing to split across replicas).
    model = DSSMModel(model_config, feature_config=feature_config)
    trainer = TagTrainer(model, label_texts, config)
    if config.init_from:
        load_towers(model, config.init_from, batch=None)
    if config.loss == "sigmoid":
        # Start at the labels' base rate: most (text, label) decisions are "no".
        rate = float(np.clip(targets[train_rows].mean(), 1e-4, 0.5))
        trainer.bias.assign(float(np.log(rate / (1 - rate))))
    train_texts = [texts[i] for i in train_rows]
    val_texts, val_targets = [texts[i] for i in val_rows], decisions[val_rows]
    history: dict[str, Any] = {"epoch": [], "loss": [], "val_micro_f1": []}
    rng = np.random.default_rng(config.seed)
    best: tuple[float, int, list[np.ndarray] | None] = (-1.0, 0, None)
    for epoch in range(1, config.epochs + 1):
        loss = _epoch(trainer, train_texts, targets[train_rows], rng, epoch)
        history["epoch"].append(epoch)
        history["loss"].append(loss)
        if len(val_rows):
            logits = trainer.predict(val_texts)
            f1 = micro_f1(logits, val_targets, best_threshold(logits, val_targets))
            history["val_micro_f1"].append(f1)
            if config.verbose:
                print(f"epoch {epoch}: loss {loss:.4f}, held-out micro-F1 {f1:.4f}")
            if f1 > best[0]:
                weights = [v.numpy() for v in _variables(trainer)] if config.keep_best else None
                best = (f1, epoch, weights)
    if config.keep_best and best[2] is not None and best[1] != config.epochs:
        for variable, value in zip(_variables(trainer), best[2], strict=True):
            variable.assign(value)
    tagging = {"loss": config.loss, "scale": config.scale, "bias": float(trainer.bias.numpy()),
               "natural_threshold": trainer.threshold_cosines(0.0), "threshold": trainer.threshold_cosines(0.0),
               "validation_texts": int(len(val_rows)), "threshold_source": "natural (no held-out texts)"}
    if len(val_rows):
        logits = trainer.predict(val_texts)
        tuned = best_threshold(logits, val_targets)
        tagging.update(threshold=trainer.threshold_cosines(tuned), threshold_source="held-out training texts",
                       val_micro_f1=micro_f1(logits, val_targets, tuned),
                       val_micro_f1_natural=micro_f1(logits, val_targets, 0.0))
    history.update(best_epoch=best[1] if config.keep_best and best[2] is not None else config.epochs,
                   train_texts=int(len(train_rows)), wall_seconds=time.perf_counter() - tick, tagging=tagging)
    return trainer, history


def _one_hot_best(scores: np.ndarray) -> np.ndarray:
    """``[n, labels]`` → bool, True at each row's best-scored label."""
    out = np.zeros(scores.shape, bool)
    if scores.size:
        out[np.arange(len(scores)), scores.argmax(axis=1)] = True
    return out


def _variables(trainer: TagTrainer) -> list[tf.Variable]:
    towers = {id(t): t for t in (trainer.model.query_tower, trainer.model.document_tower)}
    extra = [trainer.bias] + ([trainer.residual] if trainer.residual is not None else [])
    return [v for tower in towers.values() for v in tower.variables] + extra


def export_tagger(trainer: TagTrainer, model_dir: str | Path, *, history: dict[str, Any],
                  overwrite: bool = False) -> Path:
    """Export the trained towers like ``dssm train`` does (``history.json["tagging"]`` holds the threshold)."""
    return export_model(trainer.model, model_dir, train_config=trainer.config, history=history, overwrite=overwrite)
