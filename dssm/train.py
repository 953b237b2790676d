"""Training: pair shards → tf.data → the two-tower model → an exported model directory.

``dssm train --pairs PAIRS_DIR --output MODEL_DIR [--epochs N] [--batch-size B] [--resume] [model/train flags]``

This module owns :class:`TrainConfig`, the training loop (:func:`train`) and ``dssm train`` (:func:`main`). The
input is the directory ``dssm pairs`` writes, read by :mod:`dssm.inputs`: GZIP TFRecord shards of hashed bags and
``features.json``, the :class:`~dssm.features.FeatureConfig` the shards were hashed with. The model is built with
that same config, so the exported SavedModel hashes raw strings exactly like the shards. The optimizers that
update only the embedding rows a batch touches are in :mod:`dssm.optim`.

Each epoch ends with an exact-search validation (:mod:`dssm.validation`): up to ``validation_queries`` validation
queries are scored against every document of the validation split with the current towers, logged as
``val_recall_at_10`` / ``val_mrr_at_10``. Training stops early when ``val_recall_at_10`` has not improved for
``early_stopping_patience`` epochs, and the model returned (and exported) is the best epoch's. With a checkpoint
directory (:mod:`dssm.checkpoints`; ``last/`` after every epoch, ``best/`` at every new best), ``resume=True``
continues an interrupted run with the same batches (epoch ``e`` shuffles with a seed derived from ``(seed, e)``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm import validation
from dssm.artifacts import verify_manifest, write_json_atomic
from dssm.checkpoints import RUN_CONFIG, Checkpoints, build_for_restore, check_resumable, pairs_digest
from dssm.config import add_config_arguments, config_from_args, config_to_dict, field
from dssm.errors import ConfigError, InputError
from dssm.export import SAVED_MODEL, export_model, read_model_configs
from dssm.features import FeatureConfig
from dssm.inputs import (
    count_pairs,
    has_negatives,
    loss_data,
    make_dataset,
    pair_files,
    read_document_ids,
    read_feature_config,
    teacher_dim,
)
from dssm.losses import LossConfig, loss_help
from dssm.model import DSSMModel, ModelConfig, apply_loss_defaults, bag_groups
from dssm.optim import OPTIMIZERS, make_optimizer
from dssm.validation import MONITOR, RetrievalValidation, ValidationSet, monitored_value, read_validation_set

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["TrainConfig", "select_strategy", "build_model", "load_towers", "train", "main"]


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained. Saved as ``config.json["train"]`` beside the model."""

    epochs: int = field(10, "passes over the training pairs")
    batch_size: int = field(256, "global batch: the in-batch softmax scores each query against this many documents")
    learning_rate: float = field(0.05, "optimizer learning rate")
    optimizer: str = field(
        "rowwise_adagrad", f"one of {OPTIMIZERS}; all but adam update only the embedding rows a batch touches "
        "(adam decays the whole table every step). rowwise_adagrad keeps one accumulator per table row: "
        "same quora-dev quality as adagrad (nDCG@10 0.704 both), about half the optimizer time")
    seed: int = field(0, "seed for initialisation, shuffling and dropout (runs repeat on CPU)")
    validation: bool = field(True, "after each epoch, compute the loss and val_recall_at_10/val_mrr_at_10 on the "
                             "validation-* shards")
    validation_queries: int = field(2000, "validation queries searched each epoch (a seeded sample; exact search "
                                    "against all validation documents); 0 = no retrieval validation")
    validation_corpus: str = field("", "also search the validation queries among this corpus file's documents (the "
                                   "corpus to index: BEIR corpus.jsonl or a table), a haystack like the real one")
    validation_corpus_columns: str = field("", "ID,TEXT[,TITLE] columns of a --validation-corpus table named otherwise")
    validation_distractors: int = field(50_000, "at most this many --validation-corpus documents (a seeded sample)")
    early_stopping_patience: int = field(3, "stop after this many epochs without a better val_recall_at_10 "
                                         "(0 = train all epochs)")
    keep_best: bool = field(True, "return/export the weights of the epoch with the best val_recall_at_10, not the "
                            "last epoch's")
    min_label: float = field(0.0, "pairs with label <= this are dropped (explicit negatives are no in-batch positives)")
    shuffle_buffer: int = field(100_000, "shuffle buffer in pairs when streaming (--no-cache); with the cache "
                                "every epoch is a full shuffle")
    cache: bool = field(True, "hold the parsed positive pairs in memory and cut each epoch's batches from a seeded "
                        "permutation: about half the input pipeline's CPU per pair of unbatch/shuffle/batch")
    negatives: bool = field(True, "use the shards' explicit negatives (negative_ids) as extra softmax columns "
                            "when they have them")
    topic_batches: bool = field(False, "fill each batch from one cluster of lexically close pairs (TAS-B, dssm.topics);"
                                " needs the cache. Lost on debian-dev (val R@10 0.737 -> 0.689; docs/quality.md)")
    mixed_precision: bool = field(False, "compute in float16 on GPU / bfloat16 on CPU; variables stay float32")
    xla: bool = field(False, "compile the towers' dense layers with XLA (the sparse bag has no XLA kernels)")
    steps_per_execution: int = field(1, "train steps per tf.function call (fewer Python round trips)")
    verbose: int = field(1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch")
    init_from: str = field("", "start from the tower weights of this model directory (a `dssm train` output with the "
                           "same features, e.g. one pre-trained label-free on the corpus to index; `dssm train` takes "
                           "its tower shape unless set by flags); '' = random init")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.shuffle_buffer < 1 or self.steps_per_execution < 1:
            raise ConfigError("shuffle_buffer and steps_per_execution must be >= 1, got "
                              f"{self.shuffle_buffer} and {self.steps_per_execution}")
        if min(self.validation_queries, self.early_stopping_patience, self.validation_distractors) < 0:
            raise ConfigError("validation_queries, early_stopping_patience, validation_distractors must be >= 0, got "
                              f"{self.validation_queries}/{self.early_stopping_patience}/{self.validation_distractors}")


def select_strategy() -> tf.distribute.Strategy:
    """``MirroredStrategy`` over all GPUs when there are any, else the default (single-device) strategy."""
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy([g.name for g in gpus]) if gpus else tf.distribute.get_strategy()


@contextlib.contextmanager
def _dtype_policy(mixed_precision: bool) -> Iterator[None]:
    """Set the Keras mixed-precision policy while layers are built, then restore the previous one."""
    if not mixed_precision:
        yield
        return
    previous = tf.keras.mixed_precision.global_policy()
    policy = "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def build_model(model_config: ModelConfig, feature_config: FeatureConfig, train_config: TrainConfig, *,
                loss_config: LossConfig | None = None) -> DSSMModel:
    """A compiled :class:`DSSMModel` (call inside the strategy's scope when distributing)."""
    with _dtype_policy(train_config.mixed_precision):
        model = DSSMModel(model_config, feature_config=feature_config, loss_config=loss_config)
        # Not compile(jit_compile=...): the whole step cannot be XLA-compiled (ragged ids, unique,
        # string ids); the towers' dense layers can.
        model.query_tower.jit_dense = model.document_tower.jit_dense = train_config.xla
        model.compile(optimizer=make_optimizer(train_config), steps_per_execution=train_config.steps_per_execution)
    return model


class _Throughput(tf.keras.callbacks.Callback):
    """``pairs_per_sec`` in the logs: the pairs trained so far over the seconds since the epoch began
    (the progress bar), and at its end the epoch's pairs over the seconds to its last train batch."""

    def __init__(self, pairs_per_epoch: int, batch_size: int) -> None:
        super().__init__()
        self._supports_tf_logs = True  # it only writes a float: no reason to copy the logs to numpy per batch
        self.pairs_per_epoch = pairs_per_epoch
        self.batch_size = batch_size
        self._start = self._last = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._last = time.perf_counter()
        if logs is not None:
            # `batch` is the 0-based index of the last step run (steps_per_execution may run several).
            seen = min((batch + 1) * self.batch_size, self.pairs_per_epoch)
            logs["pairs_per_sec"] = seen / max(self._last - self._start, 1e-9)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["pairs_per_sec"] = self.pairs_per_epoch / max(self._last - self._start, 1e-9)


def _new_state() -> dict[str, Any]:
    """A new run's state (what :class:`_RunTracker` keeps and the checkpoints save)."""
    return {"history": {}, "best_epoch": None, "best_value": None, "wait": 0, "stopped_early": False,
            "wall_seconds": 0.0}


class _RunTracker(tf.keras.callbacks.Callback):
    """History across resumed sessions, the best epoch by :data:`MONITOR`, early stopping, checkpoints.

    Runs after the callbacks that add metrics to the epoch's logs. Without checkpoints, the best
    epoch's weights are kept in memory (``best_weights``) when ``snapshot`` is set.
    """

    def __init__(self, state: dict[str, Any], *, patience: int, checkpoints: Checkpoints | None,
                 snapshot: bool, session_start: float, baseline: Callable[[], float] | None = None) -> None:
        super().__init__()
        self.state = state
        self.patience = patience
        self.checkpoints = checkpoints
        self.snapshot = snapshot
        self.best_weights: list[np.ndarray] | None = None
        self.baseline = baseline
        self.start_weights: list[np.ndarray] | None = None
        self.last_epoch = max(state["history"].get("epoch", [0]))
        self.session_start = session_start
        self.wall_before = float(state["wall_seconds"])  # earlier sessions of a resumed run
        self._epoch_start = 0.0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # The starting point's score (random or --init-from weights), so keep_best can end where it
        # began when no epoch beats it (issue 11: on a tiny corpus training can make the towers worse).
        # Only for a fresh run: a resumed session no longer holds the starting weights.
        if self.baseline is not None and not self.state["history"]:
            self.state["start_value"] = float(self.baseline())
            if not self.model.built:  # towers build on first use; the snapshot must hold every weight
                self.model.embed_queries(tf.constant(["build"]))
                self.model.embed_documents(tf.constant(["build"]))
            self.start_weights = self.model.get_weights()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = dict(logs or {})
        history = self.state["history"]
        history.setdefault("epoch", []).append(epoch + 1)
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))
        history.setdefault("epoch_seconds", []).append(time.perf_counter() - self._epoch_start)
        self.last_epoch = epoch + 1
        value = logs.get(MONITOR)
        improved = False
        if value is not None:
            improved = self.state["best_value"] is None or float(value) > self.state["best_value"]
            if improved:
                self.state.update(best_value=float(value), best_epoch=epoch + 1, wait=0)
            else:
                self.state["wait"] += 1
        if self.patience and self.state["wait"] >= self.patience:
            self.state["stopped_early"] = True
            self.model.stop_training = True
        self.state["wall_seconds"] = self.wall_before + time.perf_counter() - self.session_start
        if self.checkpoints is not None:
            self.checkpoints.save(epoch=epoch + 1, state=self.state, best=improved)
        elif improved and self.snapshot:
            self.best_weights = self.model.get_weights()


def _run_config(feature_config: FeatureConfig, model_config: ModelConfig, train_config: TrainConfig,
                loss_config: LossConfig, digest: str) -> dict[str, Any]:
    """What ``run.json`` records: everything that decides what a run computes (``digest``: :func:`pairs_digest`)."""
    return {"pairs_sha256": digest, "features": config_to_dict(feature_config), "model": config_to_dict(model_config),
            "train": config_to_dict(train_config), "loss": config_to_dict(loss_config)}


# ModelConfig fields that decide the towers' variables; the rest (loss, temperature, dropout...) may change.
_TOWER_FIELDS = ("embedding_dim", "hidden_dims", "activation", "bag_combiner", "shared_towers", "side_dim",
                 "side_weight")


def load_towers(model: DSSMModel, model_dir: str | Path, *, batch: dict[str, tf.Tensor] | None) -> None:
    """Set ``model``'s towers to the weights of the exported model in ``model_dir`` (a warm start).

    Args:
        model: a compiled model, not yet trained.
        model_dir: a :func:`~dssm.export.export_model` directory; its manifest is verified first.
        batch: a training batch, to build the towers' variables (one forward pass, no update); None
            builds them on one text.

    Raises:
        ConfigError: ``model_dir``'s features or tower shape differ from ``model``'s (both are named).
        IndexNotFoundError / ChecksumError: ``model_dir`` is not a finished, intact model directory.
    """
    verify_manifest(model_dir, kind="model")
    features, source, _ = read_model_configs(model_dir)
    if features != model.feature_config:
        raise ConfigError(f"init_from {model_dir}: its features {config_to_dict(features)} differ from this run's "
                          f"{config_to_dict(model.feature_config)} (the pairs' features.json)")
    differ = {name: (getattr(source, name), getattr(model.config, name)) for name in _TOWER_FIELDS
              if getattr(source, name) != getattr(model.config, name)}
    if differ:
        raise ConfigError(f"init_from {model_dir}: its towers differ from this run's: "
                          + ", ".join(f"{name} {old!r} there vs {new!r} here" for name, (old, new) in differ.items()))
    if batch is None:  # a trainer without pair batches (dssm.tag_train): build the towers on one text
        model.query_tower.embed_texts(tf.constant(["x"]))
        model.document_tower.embed_texts(tf.constant(["x"]))
    else:
        model.compute_loss(batch, training=False)
    # The SavedModel's variables are an object-based checkpoint rooted at the serving module, whose
    # query_tower/document_tower attributes are the towers; they are matched by that path. read(), not
    # restore(): restore would also expect the checkpoint's own save_counter, which a SavedModel lacks.
    checkpoint = tf.train.Checkpoint(query_tower=model.query_tower, document_tower=model.document_tower)
    status = checkpoint.read(str(Path(model_dir) / SAVED_MODEL / "variables" / "variables"))
    status.expect_partial().assert_existing_objects_matched()  # every tower variable got a value


@dataclass(frozen=True)
class _Sources:
    """What a run reads and where it saves: the pairs' shards and hashing, its checkpoints."""

    train_files: list[str]
    validation_files: list[str]
    feature_config: FeatureConfig
    checkpoints: Checkpoints | None
    first_epoch: int  # epochs completed by the checkpoint a resumed run continues (else 0)
    run_config: dict[str, Any]  # what run.json records (empty without checkpoints)


def _open_run(pairs_dir: str | Path, *, model_config: ModelConfig, train_config: TrainConfig, loss_config: LossConfig,
              feature_config: FeatureConfig | None, checkpoint_dir: str | Path | None, resume: bool) -> _Sources:
    """Check the pairs and the checkpoint directory before any data is read or model built (see :func:`train`)."""
    train_files = pair_files(pairs_dir, "train")
    if feature_config is None:
        feature_config = read_feature_config(pairs_dir)
    if not train_files:
        raise InputError(f"no train-*.tfrecord.gz shards in {pairs_dir}")
    # The manifest is written last by `dssm pairs`: this refuses unfinished and corrupted shards.
    pairs_manifest = verify_manifest(pairs_dir, kind="pairs")
    validation_files = pair_files(pairs_dir, "validation") if train_config.validation else []
    checkpoints = Checkpoints(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and checkpoints is None:
        raise InputError("resume needs the checkpoint directory of the run to continue")
    if checkpoints is not None and not resume and checkpoints.exists():
        raise InputError(f"checkpoint directory {checkpoint_dir} holds another run's checkpoints (resume it, or "
                         "delete it to start over)")
    first_epoch = checkpoints.completed_epochs() if resume and checkpoints is not None else 0
    run_config: dict[str, Any] = {}
    if checkpoints is not None:
        run_config = _run_config(feature_config, model_config, train_config, loss_config,
                                 pairs_digest(pairs_manifest))
        run_path = checkpoints.directory / RUN_CONFIG
        if resume and not run_path.is_file():
            raise InputError(f"nothing to resume: no {RUN_CONFIG} in {checkpoint_dir}")
        if resume:  # before any data is read or model built: a mismatch fails fast
            check_resumable(json.loads(run_path.read_text()), run_config, run_path)
    return _Sources(train_files=train_files, validation_files=validation_files, feature_config=feature_config,
                    checkpoints=checkpoints, first_epoch=first_epoch, run_config=run_config)


@dataclass(frozen=True)
class _Data:
    """A run's datasets and their sizes."""

    train: tf.data.Dataset  # the epochs still to train, back to back
    validation: tf.data.Dataset | None  # for val_loss; None without validation pairs
    config: TrainConfig  # what the datasets were made with (the loss decides min_label)
    negatives: bool  # whether the batches carry explicit negatives
    teacher: int  # width of the batches' teacher vectors (0: none)
    steps: int  # train steps per epoch
    pairs_per_epoch: int


def _make_data(pairs_dir: str | Path, sources: _Sources, *, model_config: ModelConfig, loss_config: LossConfig,
               train_config: TrainConfig, replicas: int) -> _Data:
    """The train and validation datasets for ``replicas`` replicas, from the checkpoint's epoch on.

    Raises:
        InputError: no train pair for the loss to learn from (at least one batch with several replicas).
    """
    train_files = sources.train_files
    # Replicas all-gather their candidates, which needs equal local batches: drop a short last batch.
    drop = replicas > 1
    batch = train_config.batch_size
    # The loss decides which rows it learns from (data_config.min_label) and whether negatives are read.
    data_config, negatives = loss_data(model_config.loss, train_config, train_files,
                                       negatives=train_config.negatives and has_negatives(train_files),
                                       num_classes=loss_config.num_classes)
    teacher = teacher_dim(train_files, required=loss_config.distils)
    n_train = count_pairs(train_files, min_label=data_config.min_label)
    steps = n_train // batch if drop else -(-n_train // batch)
    if steps == 0:
        raise InputError(f"the train shards in {pairs_dir} hold {n_train} pairs with label > "
                         f"{data_config.min_label}; need at least {batch if drop else 1}")
    first_epoch = sources.first_epoch
    epochs_left = max(train_config.epochs - first_epoch, 1)
    # Bag plans come from the input pipeline with one replica (distributing a dataset splits every tensor).
    groups = bag_groups(model_config, ["query", "document"] + (["negative"] if negatives else [])) \
        if replicas == 1 else []
    shape = {"batch_size": batch, "config": data_config, "drop_remainder": drop, "negatives": negatives,
             "bag_groups": groups, "teacher": teacher}
    train_ds = make_dataset(train_files, training=True, epochs=(first_epoch, first_epoch + epochs_left), **shape)
    train_ds = train_ds.apply(tf.data.experimental.assert_cardinality(steps * epochs_left))
    validation_ds = None
    n_validation = count_pairs(sources.validation_files, min_label=data_config.min_label)
    validation_steps = n_validation // batch if drop else -(-n_validation // batch)
    if validation_steps:
        validation_ds = make_dataset(sources.validation_files, training=False, **shape)
        validation_ds = validation_ds.apply(tf.data.experimental.assert_cardinality(validation_steps))
    return _Data(train=train_ds, validation=validation_ds, config=data_config, negatives=negatives, teacher=teacher,
                 steps=steps, pairs_per_epoch=steps * batch if drop else n_train)


def _small_batch(sources: _Sources, data: _Data) -> dict[str, tf.Tensor]:
    """A 2-pair training batch, to build the model's variables (one forward pass, no update)."""
    return next(iter(make_dataset(sources.train_files, batch_size=2, training=False, config=data.config,
                                  negatives=data.negatives, teacher=data.teacher)))


def _resume_or_start(model: DSSMModel, sources: _Sources, data: _Data, *, resume: bool,
                     strategy: tf.distribute.Strategy) -> tuple[int, dict[str, Any]]:
    """``(first epoch, run state)``: restored from the last checkpoint, or a new run's (``run.json`` written)."""
    checkpoints = sources.checkpoints
    if checkpoints is None:
        return sources.first_epoch, _new_state()
    if resume and sources.first_epoch > 0:
        with strategy.scope():
            build_for_restore(model, _small_batch(sources, data))
        checkpoints.attach(model)
        return checkpoints.restore_last()
    if not resume:  # (a resumed run that stopped before its first checkpoint starts again, same run.json)
        checkpoints.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(checkpoints.directory / RUN_CONFIG, sources.run_config)
    checkpoints.attach(model)
    return sources.first_epoch, _new_state()


def _callbacks(model: DSSMModel, retrieval: ValidationSet | None, state: dict[str, Any], sources: _Sources,
               data: _Data, *, train_config: TrainConfig, tensorboard_dir: str | Path | None,
               session_start: float) -> tuple[_RunTracker, list[tf.keras.callbacks.Callback]]:
    """The run's tracker (history, best epoch, early stopping, checkpoints) and every callback of ``fit``."""
    patience = train_config.early_stopping_patience if retrieval is not None else 0
    keep_start = train_config.keep_best and retrieval is not None
    tracker = _RunTracker(state, patience=patience, checkpoints=sources.checkpoints, snapshot=keep_start,
                          session_start=session_start,
                          baseline=(lambda: monitored_value(model, retrieval)) if keep_start else None)
    # Order matters: every callback after one that adds metrics sees them in the same logs dict.
    callbacks: list[tf.keras.callbacks.Callback] = []
    if retrieval is not None:
        callbacks.append(RetrievalValidation(retrieval))
    callbacks.append(_Throughput(data.pairs_per_epoch, train_config.batch_size))
    if train_config.verbose:
        # Our own progress bar, after _Throughput, so it shows the running pairs_per_sec as is.
        callbacks.append(tf.keras.callbacks.ProgbarLogger(count_mode="steps", stateful_metrics=["pairs_per_sec"]))
    callbacks.append(tracker)
    if tensorboard_dir is not None:
        callbacks.append(tf.keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir), histogram_freq=0,
                                                        write_graph=False, update_freq="epoch", profile_batch=0))
    return tracker, callbacks


def _keep_weights(model: DSSMModel, tracker: _RunTracker, checkpoints: Checkpoints | None,
                  train_config: TrainConfig) -> tuple[int, int]:
    """Set ``model`` to the weights the run returns; ``(best epoch, epoch of those weights)``, 0 = the start."""
    state = tracker.state
    best_epoch = state["best_epoch"] if state["best_epoch"] is not None else tracker.last_epoch
    weights_epoch = tracker.last_epoch
    start_value = state.get("start_value")
    if tracker.start_weights is not None and start_value is not None and (
            state["best_value"] is None or state["best_value"] <= start_value):
        # No epoch beat the starting point on the validation split: return the starting weights.
        model.set_weights(tracker.start_weights)
        best_epoch = weights_epoch = 0
    elif train_config.keep_best and best_epoch != tracker.last_epoch:
        if checkpoints is not None:
            checkpoints.restore_best()
            weights_epoch = best_epoch
        elif tracker.best_weights is not None:
            model.set_weights(tracker.best_weights)
            weights_epoch = best_epoch
    return best_epoch, weights_epoch


def train(pairs_dir: str | Path, *, model_config: ModelConfig, train_config: TrainConfig,
          feature_config: FeatureConfig | None = None, checkpoint_dir: str | Path | None = None,
          tensorboard_dir: str | Path | None = None, resume: bool = False,
          loss_config: LossConfig | None = None) -> tuple[DSSMModel, dict[str, Any]]:
    """Train a model on the pair shards in ``pairs_dir``.

    After each epoch the validation split gives ``val_loss`` and, by exact search of up to
    ``train_config.validation_queries`` queries among its documents (and ``validation_corpus``'s),
    ``val_recall_at_10`` and ``val_mrr_at_10``. Training stops after ``early_stopping_patience``
    epochs without a better ``val_recall_at_10``; ``keep_best`` returns the best epoch's weights.

    Args:
        pairs_dir: a ``dssm pairs`` output directory.
        model_config: tower shape and loss settings.
        train_config: optimisation settings.
        feature_config: override for ``pairs_dir/features.json`` (must match the shards' hashing).
        checkpoint_dir: save ``last/``, ``best/`` and ``run.json`` here; None = no checkpoints.
        tensorboard_dir: write TensorBoard scalars (per epoch) here; None = none.
        resume: continue the run checkpointed in ``checkpoint_dir`` (same configuration but ``epochs``,
            ``verbose`` and ``early_stopping_patience``).
        loss_config: the losses' hyperparameters (``model_config.loss`` picks the loss); defaults if None.

    Returns:
        ``(model, history)``. ``history`` holds per-epoch lists (``epoch`` 1-based, ``loss``,
        ``val_loss``, ``val_recall_at_10``, ``val_mrr_at_10``, ``pairs_per_sec``, ``epoch_seconds``...,
        across resumed sessions) and ``best_epoch`` (1-based; the last epoch without retrieval
        validation), ``monitor``, ``best_value``, ``stopped_early``, ``wall_seconds`` (all sessions),
        ``train_pairs``, ``validation_queries``, ``validation_documents``.

    Raises:
        InputError: the directory, ``features.json`` or training shards are missing, no shard holds
            a positive pair, ``checkpoint_dir`` holds another run (without ``resume``) or nothing to resume.
        ConfigError: ``resume`` with a configuration or pairs that differ from the checkpointed run's.
        IndexNotFoundError: no ``manifest.json`` (the pairs job did not finish).
        ChecksumError: a shard does not match its checksum.
    """
    session_start = time.perf_counter()
    loss_config = loss_config if loss_config is not None else LossConfig()
    sources = _open_run(pairs_dir, model_config=model_config, train_config=train_config, loss_config=loss_config,
                        feature_config=feature_config, checkpoint_dir=checkpoint_dir, resume=resume)
    tf.keras.utils.set_random_seed(train_config.seed)
    strategy = select_strategy()
    data = _make_data(pairs_dir, sources, model_config=model_config, loss_config=loss_config,
                      train_config=train_config, replicas=strategy.num_replicas_in_sync)
    with strategy.scope():
        model = build_model(model_config, sources.feature_config, train_config, loss_config=loss_config)
    if train_config.init_from and sources.first_epoch == 0:  # a resumed run's checkpoint holds the weights
        load_towers(model, train_config.init_from, batch=_small_batch(sources, data))
    if loss_config.logq_correction:
        model.set_sampling_probabilities(read_document_ids(sources.train_files, min_label=data.config.min_label))
    wanted = train_config.validation_distractors if sources.validation_files and train_config.validation_queries else 0
    distractors = validation.corpus_distractors(train_config.validation_corpus, features=sources.feature_config,
                                                limit=wanted, seed=train_config.seed,
                                                columns=train_config.validation_corpus_columns)
    retrieval = read_validation_set(sources.validation_files, min_label=train_config.min_label, seed=train_config.seed,
                                    max_queries=train_config.validation_queries, distractors=distractors)
    first_epoch, state = _resume_or_start(model, sources, data, resume=resume, strategy=strategy)
    tracker, callbacks = _callbacks(model, retrieval, state, sources, data, train_config=train_config,
                                    tensorboard_dir=tensorboard_dir, session_start=session_start)
    done = first_epoch >= train_config.epochs or (tracker.patience and state["wait"] >= tracker.patience)
    if not done:
        model.fit(data.train, validation_data=data.validation, epochs=train_config.epochs, initial_epoch=first_epoch,
                  steps_per_epoch=data.steps, callbacks=callbacks, verbose=train_config.verbose)
    best_epoch, weights_epoch = _keep_weights(model, tracker, sources.checkpoints, train_config)
    history: dict[str, Any] = dict(state["history"])
    history.update(
        best_epoch=best_epoch, weights_epoch=weights_epoch, monitor=MONITOR if retrieval is not None else None,
        best_value=state["best_value"], start_value=state.get("start_value"),
        stopped_early=bool(state["stopped_early"]), train_pairs=data.pairs_per_epoch,
        validation_queries=retrieval.num_queries if retrieval is not None else 0,
        validation_documents=retrieval.num_documents if retrieval is not None else 0,
        wall_seconds=tracker.wall_before + time.perf_counter() - session_start)
    return model, history


def _parser() -> argparse.ArgumentParser:
    # Raw epilog: the --loss choices one per line (the flags' help texts still wrap as usual).
    parser = argparse.ArgumentParser(prog="dssm train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="losses (--loss NAME):\n" + loss_help())
    parser.add_argument("--pairs", required=True, help="directory written by `dssm pairs`")
    parser.add_argument("--output", required=True, help="model directory to write (SavedModel, configs, manifest)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory (and start "
                        "its checkpoints and, inside OUTPUT, its TensorBoard logs afresh)")
    parser.add_argument("--resume", action="store_true", help="continue the run checkpointed in --checkpoint-dir "
                        "from its last epoch (same pairs and settings; --epochs and --early-stopping-patience may "
                        "change)")
    parser.add_argument("--checkpoint-dir", help="checkpoints after every epoch (last/) and of the best epoch "
                        "(best/), '' for none (default: OUTPUT/checkpoints)")
    parser.add_argument("--tensorboard-dir", help="TensorBoard scalars per epoch, '' for none (default: OUTPUT/logs)")
    add_config_arguments(parser, ModelConfig)
    add_config_arguments(parser, TrainConfig)
    add_config_arguments(parser, LossConfig)
    return parser


def _run_dir(value: str | None, default: Path) -> Path | None:
    return default if value is None else (Path(value) if value else None)


def main(argv: list[str] | None = None) -> int:
    """``dssm train``: train on ``--pairs`` and export to ``--output``; prints the exported epoch's metrics."""
    args = _parser().parse_args(argv)
    start = replace(ModelConfig(), **{n: getattr(read_model_configs(args.init_from)[1], n) for n in _TOWER_FIELDS}) \
        if args.init_from else None  # a warm start keeps its towers' shape unless a flag sets it here
    model_config, notes = apply_loss_defaults(config_from_args(ModelConfig, args, base=start))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    train_config = config_from_args(TrainConfig, args)
    loss_config = config_from_args(LossConfig, args)
    output = Path(args.output)
    checkpoint_dir = _run_dir(args.checkpoint_dir, output / "checkpoints")
    tensorboard_dir = _run_dir(args.tensorboard_dir, output / "logs")
    if args.resume and checkpoint_dir is None:
        raise InputError("--resume needs the checkpoint directory of the run (--checkpoint-dir '' turns them off)")
    # Run directories inside OUTPUT survive the export that replaces the model files around them.
    keep = [d.name for d in (checkpoint_dir, tensorboard_dir)
            if d is not None and d.absolute().parent == output.absolute()]
    if output.exists() and any(output.iterdir()) and not (args.overwrite or args.resume):
        raise InputError(f"output directory {output} exists and is not empty (pass --overwrite to replace it, or "
                         "--resume to continue its checkpointed run)")
    if args.overwrite and not args.resume:
        if checkpoint_dir is not None:
            Checkpoints(checkpoint_dir).clear()
        if tensorboard_dir is not None and tensorboard_dir.name in keep:
            shutil.rmtree(tensorboard_dir, ignore_errors=True)
    feature_config = read_feature_config(args.pairs)
    model, history = train(args.pairs, model_config=model_config, train_config=train_config,
                           feature_config=feature_config, checkpoint_dir=checkpoint_dir,
                           tensorboard_dir=tensorboard_dir, resume=args.resume, loss_config=loss_config)
    export_model(model, output, train_config=train_config, history=history | {"pairs": str(Path(args.pairs).resolve())},
                 overwrite=args.overwrite or args.resume, keep=keep)  # the pairs: `dssm index` reads their split
    epoch = history["weights_epoch"]
    row = history["epoch"].index(epoch) if epoch in history.get("epoch", []) else -1
    metrics = {key: values[row] for key, values in history.items()
               if isinstance(values, list) and values and key not in ("epoch",)}
    print(f"wrote {output}: weights of epoch {epoch} (best by {history['monitor'] or 'last epoch'}; "
          f"{len(history.get('epoch', []))} trained{', stopped early' if history['stopped_early'] else ''}), "
          + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) + validation.hint(history, train_config))
    return 0
