"""Training: pair shards → tf.data → the two-tower model → an exported model directory.

``dssm train --pairs PAIRS_DIR --output MODEL_DIR [--epochs N] [--batch-size B] [--resume] [model/train flags]``

The input is the directory ``dssm pairs`` writes (see docs/design.md): GZIP TFRecord shards
``train-*.tfrecord.gz`` / ``validation-*.tfrecord.gz`` of ``tf.train.Example`` with hashed bags, and
``features.json``, the :class:`~dssm.features.FeatureConfig` the shards were hashed with. The model is
built with that same config, so the exported SavedModel hashes raw strings exactly like the shards.

Optimizers and the embedding table: the table is ``[num_buckets, embedding_dim]`` (2^18 × 300 floats,
315 MB, by default) and each batch touches a few tens of thousands of its rows. Keras' Adam applies
its moment decay to the *whole* table every step even for sparse gradients, which dominates the
step; ``adagrad`` and ``lazy_adam`` (:class:`LazyAdam`, Adam restricted to the rows in the batch)
update only the rows a batch touches.

Each epoch ends with an exact-search validation: up to ``validation_queries`` validation queries are
scored against every document of the validation split (de-duplicated by ``document_id``) with the
current towers, logged as ``val_recall_at_10`` / ``val_mrr_at_10``. Training stops early when
``val_recall_at_10`` has not improved for ``early_stopping_patience`` epochs, and the model returned
(and exported) is the best epoch's. With a checkpoint directory, the model, optimizer, epoch counter
and run state are saved after every epoch (``last/``) and at every new best (``best/``), and
``resume=True`` continues an interrupted run from ``last/``: epoch ``e`` shuffles its pairs with a
seed derived from ``(seed, e)``, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.artifacts import verify_manifest, write_json_atomic
from dssm.config import add_config_arguments, config_from_args, config_to_dict, field, load_config
from dssm.errors import ConfigError, InputError
from dssm.export import SAVED_MODEL, export_model, read_model_configs
from dssm.features import FeatureConfig
from dssm.losses import LOSSES, LossConfig, loss_help
from dssm.metrics import mrr_at_k, recall_at_k
from dssm.model import (
    BAG_PLANS,
    CSR_PLAN_KEYS,
    DSSMModel,
    ModelConfig,
    apply_loss_defaults,
    bag_groups,
    bag_plan_csr,
    gathered_rows,
    plan_key,
)

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["TrainConfig", "SparseAdagrad", "RowwiseAdagrad", "LazyAdam", "make_optimizer", "pair_files",
           "read_text_pairs", "read_feature_config", "make_dataset", "add_bag_plans", "has_negatives",
           "select_strategy", "build_model", "count_pairs", "load_towers",
           "ValidationSet", "read_validation_set", "evaluate_retrieval", "MONITOR", "RUN_CONFIG", "train", "main"]

_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "lazy_adam", "adam", "sgd")
# The metric early stopping and the best checkpoint follow (higher is better).
MONITOR = "val_recall_at_10"
# Written in the checkpoint directory when a run starts; `resume` compares the new run against it.
RUN_CONFIG = "run.json"
_K = 10
# TrainConfig fields that may change when a run is resumed: they decide how far it goes and what it
# prints, not what the epochs already trained computed.
_RESUMABLE_CHANGES = frozenset({"epochs", "verbose", "early_stopping_patience"})
# Only what training reads is parsed; raw texts stay in the shards for mining/eval tools.
_PARSE_SPEC = {
    "label": tf.io.FixedLenFeature([], tf.float32, default_value=1.0),
    "document_id": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "query_ids": tf.io.RaggedFeature(tf.int64),
    "query_counts": tf.io.RaggedFeature(tf.float32),
    "document_ids": tf.io.RaggedFeature(tf.int64),
    "document_counts": tf.io.RaggedFeature(tf.float32),
}
# Written by `dssm pairs --negatives-as-third-input`; an empty bag means "this pair has no negative".
_NEGATIVE_SPEC = {
    "negative_id": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "negative_ids": tf.io.RaggedFeature(tf.int64),
    "negative_counts": tf.io.RaggedFeature(tf.float32),
}


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained. Saved as ``config.json["train"]`` beside the model."""

    epochs: int = field(10, "passes over the training pairs")
    batch_size: int = field(256, "global batch: the in-batch softmax scores each query against this many documents")
    learning_rate: float = field(0.05, "optimizer learning rate")
    optimizer: str = field(
        "rowwise_adagrad", f"one of {_OPTIMIZERS}; all but adam update only the embedding rows a batch touches "
        "(adam decays the whole table every step). rowwise_adagrad keeps one accumulator per table row: "
        "same quora-dev quality as adagrad (nDCG@10 0.704 both), about half the optimizer time")
    seed: int = field(0, "seed for initialisation, shuffling and dropout (runs repeat on CPU)")
    validation: bool = field(True, "after each epoch, compute the loss and val_recall_at_10/val_mrr_at_10 on the "
                             "validation-* shards")
    validation_queries: int = field(2000, "validation queries searched each epoch (a seeded sample; exact search "
                                    "against all validation documents); 0 = no retrieval validation")
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
    mixed_precision: bool = field(False, "compute in float16 on GPU / bfloat16 on CPU; variables stay float32")
    xla: bool = field(False, "compile the towers' dense layers with XLA (the sparse bag has no XLA kernels)")
    steps_per_execution: int = field(1, "train steps per tf.function call (fewer Python round trips)")
    verbose: int = field(1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch")
    init_from: str = field("", "start from the tower weights of this model directory (a `dssm train` output with the "
                           "same features and tower shape, e.g. one pre-trained label-free on the corpus to index); "
                           "'' = random init")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.shuffle_buffer < 1 or self.steps_per_execution < 1:
            raise ConfigError("shuffle_buffer and steps_per_execution must be >= 1, got "
                              f"{self.shuffle_buffer} and {self.steps_per_execution}")
        if self.validation_queries < 0 or self.early_stopping_patience < 0:
            raise ConfigError("validation_queries and early_stopping_patience must be >= 0, got "
                              f"{self.validation_queries} and {self.early_stopping_patience}")


class _UniqueRows:
    """Skips Keras' sparse-gradient de-duplication when the rows are already unique (a cheap check).

    Keras runs ``unique`` + ``unsorted_segment_sum`` over every sparse gradient before applying it.
    :class:`~dssm.model.DSSMModel` gathers each table once per step, so its gradients have unique
    rows and the segment sum would copy ``[rows, dim]`` for nothing; it still runs if they are not.
    """

    def _deduplicate_sparse_grad(self, grads: list[Any]) -> list[Any]:
        return [_unique_rows(grad) if isinstance(grad, tf.IndexedSlices) else grad for grad in grads]


def _unique_rows(grad: tf.IndexedSlices) -> tf.IndexedSlices:
    """``grad`` with each row once (duplicates summed), copying nothing when the rows are already distinct.

    An :class:`~dssm.model.EmbeddingBag`'s own gradient (marked, see :func:`dssm.model.gathered_rows`)
    has distinct rows by construction and passes as is; strictly ascending indices are confirmed by
    one comparison of neighbours; anything else (e.g. gradients concatenated across replicas) goes
    through ``unique``, and the segment sum runs only if something repeats.
    """
    indices = grad.indices
    if gathered_rows(indices) is not None:
        return grad

    def merged() -> tuple[tf.Tensor, tf.Tensor]:
        # unique keeps first-appearance order, so when nothing repeats `rows` equals the indices.
        rows, position = tf.unique(indices)
        values = tf.cond(tf.size(rows) == tf.size(indices), lambda: grad.values,
                         lambda: tf.math.unsorted_segment_sum(grad.values, position, tf.size(rows)))
        return values, rows

    ascending = tf.reduce_all(indices[1:] > indices[:-1])
    values, rows = tf.cond(ascending, lambda: (grad.values, indices), merged)
    return tf.IndexedSlices(values, rows, grad.dense_shape)


class SparseAdagrad(_UniqueRows, tf.keras.optimizers.Adagrad):
    """Adagrad whose sparse update is TF's fused ``ResourceSparseApplyAdagradV2`` kernel.

    One pass over the touched rows instead of Keras' five (square, scatter-add, gather, divide,
    scatter-add). The update is ``var -= lr * g / (sqrt(accum) + epsilon)`` (Keras puts epsilon
    inside the square root; with epsilon = 1e-7 the difference is below float32 resolution).
    """

    def update_step(self, gradient: Any, variable: tf.Variable) -> None:
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        accumulator = self._accumulators[self._index_dict[self._var_key(variable)]]
        tf.raw_ops.ResourceSparseApplyAdagradV2(
            var=variable.handle, accum=accumulator.handle, lr=tf.cast(self.learning_rate, variable.dtype),
            epsilon=tf.cast(self.epsilon, variable.dtype), grad=gradient.values, indices=gradient.indices,
            use_locking=False)
        return None


def _is_embedding_table(variable: tf.Variable) -> bool:
    return variable.shape.rank == 2 and "embedding_bag/table" in variable.name


class RowwiseAdagrad(_UniqueRows, tf.keras.optimizers.Adagrad):
    """Adagrad with one accumulator per embedding-table *row* (dense layers keep Keras' Adagrad).

    For the tables (:class:`~dssm.model.EmbeddingBag`), ``acc[row] += mean(g[row]^2)`` and
    ``table[row] -= lr * g[row] / sqrt(acc[row] + epsilon)``: the update writes only the touched
    table rows and reads a ``[num_buckets]`` accumulator, instead of reading and writing a second
    ``[num_buckets, dim]`` accumulator at random rows, which roughly halves the optimizer's share of
    the step. This is the row-wise Adagrad that large recommender embedding tables use (e.g. DLRM).
    """

    def build(self, var_list: list[tf.Variable]) -> None:
        tf.keras.optimizers.Optimizer.build(self, var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._accumulators = []
        for var in var_list:
            shape = [var.shape[0]] if _is_embedding_table(var) else var.shape
            self._accumulators.append(self.add_variable_from_reference(
                var, "accumulator", initial_value=tf.fill(shape, tf.cast(self.initial_accumulator_value, var.dtype))))

    def update_step(self, gradient: Any, variable: tf.Variable) -> None:
        if not _is_embedding_table(variable):
            return super().update_step(gradient, variable)
        accumulator = self._accumulators[self._index_dict[self._var_key(variable)]]
        lr = tf.cast(self.learning_rate, variable.dtype)
        if isinstance(gradient, tf.IndexedSlices):
            rows, values = gradient.indices, gradient.values
            acc = tf.gather(accumulator, rows) + _row_mean_square(values)
            accumulator.scatter_update(tf.IndexedSlices(acc, rows))
            # Gather, update, scatter_update: TF's scatter_sub kernel costs about three times a
            # gather plus a (memcpy) scatter_update of the same rows. Rows are unique here.
            old = gathered_rows(rows)
            if old is None or old.dtype != variable.dtype:
                old = tf.gather(variable, rows)
            new = old - values * (lr * tf.math.rsqrt(acc + self.epsilon))[:, None]
            variable.scatter_update(tf.IndexedSlices(new, rows))
        else:
            accumulator.assign_add(_row_mean_square(gradient))
            variable.assign_sub(gradient * (lr * tf.math.rsqrt(accumulator + self.epsilon))[:, None])
        return None


def _row_mean_square(values: tf.Tensor) -> tf.Tensor:
    """``[rows, dim]`` → ``[rows]`` mean of the squares of each row.

    As the squared Euclidean norm: one fused pass (``reduce_mean(square(x))`` writes and rereads a
    ``[rows, dim]`` temporary, ~3x the CPU time for a batch's ~18k table rows); the sqrt and square
    round it by about an ulp.
    """
    return tf.square(tf.math.reduce_euclidean_norm(values, axis=1)) / tf.cast(tf.shape(values)[1], values.dtype)


class LazyAdam(_UniqueRows, tf.keras.optimizers.Adam):
    """Adam whose sparse update reads and writes only the rows in the gradient.

    For ``tf.IndexedSlices`` gradients the moments of the touched rows are decayed and updated and
    only those rows of the variable move; untouched rows keep stale moments (as in TF-Addons'
    LazyAdam). Dense gradients take Keras' Adam path unchanged.
    """

    def update_step(self, gradient: Any, variable: tf.Variable) -> None:
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        lr = tf.cast(self.learning_rate, variable.dtype)
        step = tf.cast(self.iterations + 1, variable.dtype)
        beta_1 = tf.cast(self.beta_1, variable.dtype)
        beta_2 = tf.cast(self.beta_2, variable.dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        key = self._var_key(variable)
        m = self._momentums[self._index_dict[key]]
        v = self._velocities[self._index_dict[key]]
        rows = gradient.indices  # unique: de-duplicated before update_step
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * gradient.values
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(gradient.values)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))
        return None


def make_optimizer(config: TrainConfig) -> tf.keras.optimizers.Optimizer:
    """The optimizer ``config.optimizer`` names, at ``config.learning_rate``."""
    if config.optimizer == "adagrad":
        return SparseAdagrad(config.learning_rate)
    if config.optimizer == "rowwise_adagrad":
        return RowwiseAdagrad(config.learning_rate)
    if config.optimizer == "lazy_adam":
        return LazyAdam(config.learning_rate)
    if config.optimizer == "adam":
        return tf.keras.optimizers.Adam(config.learning_rate)
    return tf.keras.optimizers.SGD(config.learning_rate)


def pair_files(pairs_dir: str | Path, split: str) -> list[str]:
    """Sorted shard paths of one split (``train`` or ``validation``); may be empty.

    Raises:
        InputError: ``pairs_dir`` is not a directory.
    """
    if not Path(pairs_dir).is_dir():
        raise InputError(f"pairs directory not found: {pairs_dir} (make one with `dssm pairs`)")
    return sorted(glob.glob(os.path.join(glob.escape(str(pairs_dir)), f"{split}-*.tfrecord.gz")))


def read_feature_config(pairs_dir: str | Path) -> FeatureConfig:
    """The :class:`FeatureConfig` the shards in ``pairs_dir`` were hashed with (``features.json``)."""
    path = Path(pairs_dir) / "features.json"
    if not path.is_file():
        raise InputError(f"{path} not found: {pairs_dir} is not a `dssm pairs` output directory")
    return load_config(FeatureConfig, path)


def has_negatives(files: list[str]) -> bool:
    """Whether the shards carry explicit negatives (looks at the first record)."""
    for record in tf.data.TFRecordDataset(files[:1], compression_type="GZIP").take(1):
        example = tf.train.Example.FromString(record.numpy())
        return "negative_ids" in example.features.feature
    return False


def _epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of ``epoch`` (0-based): a function of the run's seed and the epoch only."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def _concatenate(parts: list[tf.data.Dataset]) -> tf.data.Dataset:
    """``parts[0]`` then ``parts[1]``...; a balanced tree of ``concatenate`` so many epochs nest shallowly.

    ``concatenate`` opens its second input only when the first is exhausted, so an in-memory
    ``cache()`` shared by the parts is complete before the second epoch reads it.
    """
    if len(parts) == 1:
        return parts[0]
    middle = len(parts) // 2
    return _concatenate(parts[:middle]).concatenate(_concatenate(parts[middle:]))


# Parsed blocks (1024 records each) per in-memory element: 16M pairs (ragged_batch preallocates per slot).
_MAX_BLOCKS = 1 << 14


def make_dataset(files: list[str], *, batch_size: int, training: bool, config: TrainConfig,
                 drop_remainder: bool = False, negatives: bool = False, epochs: tuple[int, int] = (0, 1),
                 bag_groups: Sequence[Sequence[str]] = ()) -> tf.data.Dataset:
    """Batches of positive pairs for :meth:`DSSMModel.compute_loss`.

    Records are parsed in blocks (``parse_example`` is vectorised), pairs with ``label <= min_label``
    dropped, then regrouped into batches of ``batch_size`` pairs. With ``config.cache`` (training)
    the parsed pairs are held in memory as one ragged table and every batch is one vectorised gather
    of a permutation's slice: no per-pair work in tf.data (unbatch/shuffle/batch of single pairs cost
    ~15 µs of CPU per pair, a third of a core at 20k pairs/s), and every epoch is a full shuffle.

    Args:
        files: GZIP TFRecord shards.
        batch_size: pairs per batch.
        training: shuffle and cache if ``config.cache``; the result holds the epochs ``range(*epochs)``
            back to back, epoch ``e`` shuffled with a seed derived from ``(config.seed, e)``, so
            epoch ``e``'s batches do not depend on how many epochs ran before in this process (a
            resumed run sees the batches an uninterrupted one would).
        config: shuffle buffer (without cache), seed, label threshold.
        drop_remainder: drop a last short batch (needed when replicas must see equal batches).
        negatives: also read ``negative_id``/``negative_ids``/``negative_counts``.
        epochs: ``(first, end)`` 0-based epochs to hold when ``training`` (ignored otherwise).
        bag_groups: bags the model embeds in one tower call (:func:`dssm.model.bag_groups`); each
            batch gets their :func:`dssm.model.bag_plan_csr` under ``batch[BAG_PLANS][plan_key(group)]``,
            computed here so it overlaps with the previous train step instead of running inside it.
            Only for a single replica: distributing a dataset splits every tensor of a batch.

    Returns:
        Dataset of dicts: ``query_ids``/``document_ids`` ``[batch, None]`` int64 ragged,
        ``query_counts``/``document_counts`` ``[batch, None]`` float32 ragged, ``document_id``
        ``[batch]`` string, ``label`` ``[batch]`` float32 (and the ``negative_*`` keys with
        ``negatives``, and ``bag_plans`` with ``bag_groups``).
    """
    spec = {**_PARSE_SPEC, **(_NEGATIVE_SPEC if negatives else {})}
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        # One file order for every pass: the per-epoch element shuffle below supplies the variety,
        # and an order that changed with each pass would tie epoch e to the number of passes made.
        files_ds = files_ds.shuffle(len(files), seed=config.seed, reshuffle_each_iteration=False)
    ds = files_ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                             cycle_length=min(4, max(1, len(files))), num_parallel_calls=tf.data.AUTOTUNE,
                             deterministic=True)
    ds = ds.batch(1024).map(lambda records: tf.io.parse_example(records, spec), num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)

    def keep_positive(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        keep = batch["label"] > config.min_label
        return {key: tf.ragged.boolean_mask(value, keep) if isinstance(value, tf.RaggedTensor)
                else tf.boolean_mask(value, keep) for key, value in batch.items()}

    blocks = ds.map(keep_positive, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not training:
        ds = blocks.unbatch().batch(batch_size, drop_remainder=drop_remainder)
    else:
        first, end = epochs
        if not 0 <= first < end:
            raise ConfigError(f"epochs must be (first, end) with 0 <= first < end, got {epochs}")
        if config.cache:
            # All pairs as one element: [pairs, None] ragged bags and [pairs] columns.
            table = blocks.ragged_batch(_MAX_BLOCKS).map(
                lambda b: {key: value.merge_dims(0, 1) for key, value in b.items()}).cache()

            def epoch_batches(epoch: int) -> tf.data.Dataset:
                seed = _epoch_seed(config.seed, epoch)
                return table.flat_map(lambda pairs: _epoch_batches(pairs, seed=seed, batch_size=batch_size,
                                                                   drop_remainder=drop_remainder))

            parts = [epoch_batches(epoch) for epoch in range(first, end)]
        else:
            pairs = blocks.unbatch()
            parts = [pairs.shuffle(config.shuffle_buffer, seed=_epoch_seed(config.seed, epoch),
                                   reshuffle_each_iteration=False).batch(batch_size, drop_remainder=drop_remainder)
                     for epoch in range(first, end)]
        ds = _concatenate(parts)
    return add_bag_plans(ds, bag_groups).prefetch(tf.data.AUTOTUNE)


def _epoch_batches(pairs: dict[str, tf.Tensor], *, seed: int, batch_size: int, drop_remainder: bool
                   ) -> tf.data.Dataset:
    """One epoch of batches of the in-memory ``pairs``, in the order of a permutation seeded by ``seed``."""
    n = tf.shape(pairs["label"], out_type=tf.int64)[0]
    order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=[seed, 0])
    steps = n // batch_size if drop_remainder else -(-n // batch_size)

    def take(step: tf.Tensor) -> dict[str, tf.Tensor]:
        rows = order[step * batch_size:tf.minimum((step + 1) * batch_size, n)]
        return {key: tf.gather(value, rows) for key, value in pairs.items()}

    return tf.data.Dataset.range(steps).map(take)


def add_bag_plans(ds: tf.data.Dataset, bag_groups: Sequence[Sequence[str]]) -> tf.data.Dataset:
    """``ds``'s batches with ``batch[BAG_PLANS][plan_key(group)]``, the bag plan of each group (none: as is).

    The plans are made by tf.data's threads (:func:`dssm.model.bag_plan_csr`), so they overlap with
    the train step that consumes the previous batch; the model looks them up by key and makes the
    plan in the step for a group without one.
    """
    if not bag_groups:
        return ds
    groups = [tuple(group) for group in bag_groups]
    return ds.map(lambda batch: _with_plans(batch, groups), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _with_plans(batch: dict[str, tf.Tensor], groups: list[tuple[str, ...]]) -> dict[str, Any]:
    """``batch`` plus ``BAG_PLANS``: the :func:`bag_plan_csr` of each group of bags present."""
    plans = {}
    for group in groups:
        if not all(f"{name}_ids" in batch for name in group):
            continue
        ids = tf.concat([batch[f"{name}_ids"].with_row_splits_dtype(tf.int64) for name in group], axis=0)
        counts = tf.concat([batch[f"{name}_counts"].with_row_splits_dtype(tf.int64) for name in group], axis=0)
        out = tf.numpy_function(bag_plan_csr, [ids.flat_values, ids.row_splits, counts.flat_values],
                                [tf.int64, tf.int64, tf.float32, tf.int64, tf.float32], stateful=False)
        plan = dict(zip(CSR_PLAN_KEYS, out, strict=True))
        for key, value in plan.items():
            value.set_shape([None, 2] if key.endswith("_index") else [None])
        plans[plan_key(group)] = plan
    return {**batch, BAG_PLANS: plans} if plans else batch


def select_strategy() -> tf.distribute.Strategy:
    """``MirroredStrategy`` over all GPUs when there are any, else the default (single-device) strategy."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    return tf.distribute.get_strategy()


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
    """``pairs_per_sec`` in the logs: running during the epoch (the progress bar), final at its end.

    During the epoch it is the pairs trained so far over the seconds since the epoch began; at the
    end, the epoch's pairs over the seconds from its start to its last train batch (validation excluded).
    """

    def __init__(self, pairs_per_epoch: int, batch_size: int) -> None:
        super().__init__()
        self._supports_tf_logs = True  # it only writes a float: no reason to copy the logs to numpy per batch
        self.pairs_per_epoch = pairs_per_epoch
        self.batch_size = batch_size
        self._start = 0.0
        self._last = 0.0

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


def count_pairs(files: list[str], *, min_label: float) -> int:
    """Number of pairs with ``label > min_label`` in ``files`` (parses only the label)."""
    if not files:
        return 0
    spec = {"label": _PARSE_SPEC["label"]}
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP", num_parallel_reads=min(4, len(files)))
    ds = ds.batch(4096).map(lambda s: tf.reduce_sum(tf.cast(tf.io.parse_example(s, spec)["label"] > min_label,
                                                            tf.int64)))
    return int(ds.reduce(tf.constant(0, tf.int64), lambda total, n: total + n))


_VALIDATION_SPEC = {
    "query_id": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "query_text": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "document_id": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "document_text": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "label": tf.io.FixedLenFeature([], tf.float32, default_value=1.0),
    "query_ids": tf.io.RaggedFeature(tf.int64),
    "query_counts": tf.io.RaggedFeature(tf.float32),
    "document_ids": tf.io.RaggedFeature(tf.int64),
    "document_counts": tf.io.RaggedFeature(tf.float32),
}


@dataclass(frozen=True)
class ValidationSet:
    """Validation queries and documents for exact-search Recall@k / MRR@k.

    Attributes:
        query_keys: ``query_id`` (else the query text) of each query, in row order.
        document_keys: ``document_id`` (else the text) of each document, in row order.
        queries: the query bags in batches, each ``(ids, counts)`` ``[batch, None]`` int64/float32 ragged.
        documents: the document bags in batches, likewise.
        relevant: per query, the sorted rows of its relevant documents (``label > min_label``).
        excluded: ``[m, 2]`` int64 ``(query row, document row)`` pairs left out of the ranking: a
            document whose text is the query's own (a question asked again is not a result).
    """

    query_keys: list[str]
    document_keys: list[str]
    queries: list[tuple[tf.RaggedTensor, tf.RaggedTensor]]
    documents: list[tuple[tf.RaggedTensor, tf.RaggedTensor]]
    relevant: list[np.ndarray]
    excluded: np.ndarray

    @property
    def num_queries(self) -> int:
        return len(self.query_keys)

    @property
    def num_documents(self) -> int:
        return len(self.document_keys)


def _ragged_batches(bags: list[tuple[np.ndarray, np.ndarray]], batch_size: int
                    ) -> list[tuple[tf.RaggedTensor, tf.RaggedTensor]]:
    out = []
    for start in range(0, len(bags), batch_size):
        chunk = bags[start:start + batch_size]
        lengths = np.array([len(ids) for ids, _ in chunk], np.int64)
        ids = np.concatenate([ids for ids, _ in chunk]).astype(np.int64)
        counts = np.concatenate([counts for _, counts in chunk]).astype(np.float32)
        out.append((tf.RaggedTensor.from_row_lengths(ids, lengths), tf.RaggedTensor.from_row_lengths(counts, lengths)))
    return out


def read_text_pairs(files: Sequence[str], *, min_label: float = 0.0) -> list[tuple[str, str]]:
    """The ``(query_text, document_text)`` of every pair above ``min_label`` in ``files``, in file order.

    ``dssm index --hybrid-pairs`` tunes the hybrid weight on a pairs directory's validation split with it.
    """
    if not files:
        return []
    spec = {key: _VALIDATION_SPEC[key] for key in ("query_text", "document_text", "label")}
    ds = tf.data.TFRecordDataset(list(files), compression_type="GZIP").batch(1024)
    out: list[tuple[str, str]] = []
    for batch in ds.map(lambda records: tf.io.parse_example(records, spec)):
        for query, document, label in zip(batch["query_text"].numpy(), batch["document_text"].numpy(),
                                          batch["label"].numpy(), strict=True):
            if label > min_label and query and document:
                out.append((query.decode("utf-8", "replace"), document.decode("utf-8", "replace")))
    return out


def read_validation_set(files: Sequence[str], *, min_label: float, max_queries: int, seed: int,
                        batch_size: int = 1024) -> ValidationSet | None:
    """The validation split as a retrieval task: its queries against all its documents.

    Documents are every ``document_*`` of the shards (relevant or not), de-duplicated by
    ``document_id``; a query's relevant documents are those it is paired with at ``label >
    min_label``. Queries without one are dropped; above ``max_queries``, a sample seeded by ``seed``
    is kept (the same queries every epoch and every run).

    Args:
        files: ``validation-*`` shards.
        min_label: pairs at or below it are not relevant (the trainer's positive threshold).
        max_queries: at most this many queries (0 = none).
        seed: the sampling seed.
        batch_size: bags per embedding batch.

    Returns:
        The set, or None when there are no files, no queries with a relevant document or ``max_queries`` is 0.
    """
    if not files or max_queries <= 0:
        return None
    ds = tf.data.TFRecordDataset(list(files), compression_type="GZIP").batch(1024)
    ds = ds.map(lambda records: tf.io.parse_example(records, _VALIDATION_SPEC))
    doc_row: dict[bytes, int] = {}
    doc_bags: list[tuple[np.ndarray, np.ndarray]] = []
    doc_keys: list[str] = []
    doc_text_rows: dict[bytes, list[int]] = {}
    query_row: dict[bytes, int] = {}
    query_bags: list[tuple[np.ndarray, np.ndarray]] = []
    query_keys: list[str] = []
    query_texts: list[bytes] = []
    relevant: list[set[int]] = []
    for batch in ds:
        columns = {key: batch[key].numpy() for key in ("query_id", "query_text", "document_id", "document_text",
                                                        "label")}
        bags = {key: (batch[key].values.numpy(), batch[key].row_splits.numpy())
                for key in ("query_ids", "query_counts", "document_ids", "document_counts")}

        def bag(prefix: str, i: int, bags: dict[str, tuple[np.ndarray, np.ndarray]] = bags
                ) -> tuple[np.ndarray, np.ndarray]:
            ids, splits = bags[f"{prefix}_ids"]
            counts, _ = bags[f"{prefix}_counts"]
            return ids[splits[i]:splits[i + 1]], counts[splits[i]:splits[i + 1]]

        for i in range(len(columns["label"])):
            doc_key = columns["document_id"][i] or columns["document_text"][i]
            row = doc_row.get(doc_key)
            if row is None:
                row = doc_row[doc_key] = len(doc_bags)
                doc_bags.append(bag("document", i))
                doc_keys.append(doc_key.decode("utf-8", "replace"))
                doc_text_rows.setdefault(columns["document_text"][i], []).append(row)
            query_key = columns["query_id"][i] or columns["query_text"][i]
            q = query_row.get(query_key)
            if q is None:
                q = query_row[query_key] = len(query_bags)
                query_bags.append(bag("query", i))
                query_keys.append(query_key.decode("utf-8", "replace"))
                query_texts.append(columns["query_text"][i])
                relevant.append(set())
            if columns["label"][i] > min_label:
                relevant[q].add(row)
    chosen = [q for q in range(len(query_bags)) if relevant[q]]
    if not chosen:
        return None
    if len(chosen) > max_queries:
        chosen = sorted(np.random.default_rng(seed).choice(chosen, size=max_queries, replace=False).tolist())
    excluded = [(new, row) for new, q in enumerate(chosen) for row in doc_text_rows.get(query_texts[q], [])
                if row not in relevant[q]]
    return ValidationSet(
        query_keys=[query_keys[q] for q in chosen], document_keys=doc_keys,
        queries=_ragged_batches([query_bags[q] for q in chosen], batch_size),
        documents=_ragged_batches(doc_bags, batch_size),
        relevant=[np.array(sorted(relevant[q]), np.int64) for q in chosen],
        excluded=np.array(excluded, np.int64).reshape(-1, 2))


def _embed_batches(tower: tf.keras.Model, batches: list[tuple[tf.RaggedTensor, tf.RaggedTensor]]) -> tf.Tensor:
    """``[n, dim]`` float32 embeddings of the bags, with dropout off.

    Eager on purpose: a few dozen batches per epoch cost less than tracing a tf.function each time.
    """
    return tf.concat([tower((ids, counts), training=False) for ids, counts in batches], axis=0)


def evaluate_retrieval(model: DSSMModel, validation: ValidationSet, *, k: int = _K,
                       batch_size: int = 1024) -> dict[str, float]:
    """Exact search of every validation query among all validation documents, with the current towers.

    Args:
        model: queries go through ``model.query_tower``, documents through ``model.document_tower``
            (``training=False``).
        validation: from :func:`read_validation_set`.
        k: the cut-off.
        batch_size: queries scored per matrix product (``[batch, num_documents]`` scores).

    Returns:
        ``{"recall_at_{k}": mean Recall@k, "mrr_at_{k}": mean MRR@k}`` over the queries, with the
        definitions of :func:`dssm.metrics.recall_at_k` / :func:`dssm.metrics.mrr_at_k`.
    """
    documents = _embed_batches(model.document_tower, validation.documents)
    queries = _embed_batches(model.query_tower, validation.queries)
    k = min(k, validation.num_documents)
    top = np.empty((validation.num_queries, k), np.int64)
    excluded = validation.excluded
    for start in range(0, validation.num_queries, batch_size):
        block = queries[start:start + batch_size]
        scores = tf.matmul(block, documents, transpose_b=True)
        mine = excluded[(excluded[:, 0] >= start) & (excluded[:, 0] < start + batch_size)]
        if len(mine):
            rows = tf.constant(mine - np.array([start, 0]), tf.int64)
            scores = tf.tensor_scatter_nd_update(scores, rows, tf.fill([len(mine)], -np.inf))
        top[start:start + len(block)] = tf.math.top_k(scores, k=k).indices.numpy()
    recall = mrr = 0.0
    for ranked, relevant in zip(top, validation.relevant, strict=True):
        grades = dict.fromkeys(relevant.tolist(), 1.0)
        recall += recall_at_k(ranked.tolist(), grades, k)
        mrr += mrr_at_k(ranked.tolist(), grades, k)
    n = validation.num_queries
    return {f"recall_at_{_K}": recall / n, f"mrr_at_{_K}": mrr / n}


class _RetrievalValidation(tf.keras.callbacks.Callback):
    """Adds ``val_recall_at_10``, ``val_mrr_at_10`` and ``val_retrieval_seconds`` to each epoch's logs."""

    def __init__(self, validation: ValidationSet) -> None:
        super().__init__()
        self.validation = validation

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        start = time.perf_counter()
        metrics = evaluate_retrieval(self.model, self.validation)
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in metrics.items()})
            logs["val_retrieval_seconds"] = time.perf_counter() - start


class _Checkpoints:
    """One run's checkpoints: ``DIR/last/`` after every epoch, ``DIR/best/`` at every new best, ``DIR/run.json``.

    A checkpoint holds the model (towers, loss state), the optimizer (slots, iteration count), the
    number of completed epochs and the run state as JSON (history so far, best epoch, epochs without
    improvement, wall time), so a resumed run carries on exactly where the last one saved.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.checkpoint: tf.train.Checkpoint | None = None
        self._last: tf.train.CheckpointManager | None = None
        self._best: tf.train.CheckpointManager | None = None

    def exists(self) -> bool:
        """Whether the directory holds (part of) a run: its run.json or a checkpoint."""
        return (self.directory / RUN_CONFIG).exists() or tf.train.latest_checkpoint(str(self.directory / "last")) \
            is not None

    def completed_epochs(self) -> int:
        """Epochs completed by the last checkpoint (read without building a model); 0 without one."""
        path = tf.train.latest_checkpoint(str(self.directory / "last"))
        if path is None:
            return 0
        return int(tf.train.load_checkpoint(path).get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"))

    def clear(self) -> None:
        """Delete this run's files (run.json, last/, best/), nothing else in the directory."""
        (self.directory / RUN_CONFIG).unlink(missing_ok=True)
        for name in ("last", "best"):
            shutil.rmtree(self.directory / name, ignore_errors=True)

    def attach(self, model: DSSMModel) -> None:
        """Track ``model`` and its optimizer; a restore needs their variables built (:func:`_build_for_restore`).

        Called outside the strategy's scope: the counters are plain variables (a string variable
        cannot be mirrored onto GPUs).
        """
        self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._state = tf.Variable("{}", dtype=tf.string, trainable=False, name="run_state")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=self._epoch,
                                              state=self._state)
        self._last = tf.train.CheckpointManager(self.checkpoint, str(self.directory / "last"), max_to_keep=1)
        self._best = tf.train.CheckpointManager(self.checkpoint, str(self.directory / "best"), max_to_keep=1)

    def save(self, *, epoch: int, state: dict[str, Any], best: bool) -> None:
        """Save after ``epoch`` (1-based) completed; ``best`` also replaces the best checkpoint."""
        assert self._last is not None and self._best is not None, "attach() first"
        self._epoch.assign(epoch)
        self._state.assign(json.dumps(state))
        # Best before last: a crash in between leaves `last` one epoch behind, whose state names an
        # older best, and re-running that epoch saves the best again. The other order could leave
        # `last` naming a best epoch that `best/` does not hold.
        if best:
            self._best.save(checkpoint_number=epoch)
        self._last.save(checkpoint_number=epoch)

    def restore_last(self) -> tuple[int, dict[str, Any]]:
        """Load the last checkpoint into the attached objects; returns ``(completed epochs, run state)``."""
        assert self._last is not None and self.checkpoint is not None, "attach() first"
        if self._last.latest_checkpoint is None:
            raise InputError(f"no checkpoint in {self.directory / 'last'}")
        self.checkpoint.restore(self._last.latest_checkpoint).assert_existing_objects_matched()
        return int(self._epoch.numpy()), json.loads(self._state.numpy().decode())

    def restore_best(self) -> None:
        """Load the best checkpoint's weights (and optimizer state) into the attached model."""
        assert self._best is not None and self.checkpoint is not None, "attach() first"
        if self._best.latest_checkpoint is None:
            raise InputError(f"no best checkpoint in {self.directory / 'best'}")
        self.checkpoint.restore(self._best.latest_checkpoint).assert_existing_objects_matched()


def _new_state() -> dict[str, Any]:
    return {"history": {}, "best_epoch": None, "best_value": None, "wait": 0, "stopped_early": False,
            "wall_seconds": 0.0}


class _RunTracker(tf.keras.callbacks.Callback):
    """History across resumed sessions, the best epoch by :data:`MONITOR`, early stopping, checkpoints.

    Runs after the callbacks that add metrics to the epoch's logs. Without checkpoints, the best
    epoch's weights are kept in memory (``best_weights``) when ``snapshot`` is set.
    """

    def __init__(self, state: dict[str, Any], *, patience: int, checkpoints: _Checkpoints | None,
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


def _pairs_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a pairs manifest's file list: the same shards wherever the directory lives."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def _run_config(feature_config: FeatureConfig, model_config: ModelConfig, train_config: TrainConfig,
                loss_config: LossConfig, pairs_digest: str) -> dict[str, Any]:
    """What ``run.json`` records: everything that decides what a run computes."""
    return {"pairs_sha256": pairs_digest, "features": config_to_dict(feature_config),
            "model": config_to_dict(model_config), "train": config_to_dict(train_config),
            "loss": config_to_dict(loss_config)}


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run under a different configuration (only :data:`_RESUMABLE_CHANGES` may differ).

    Raises:
        ConfigError: naming the first differing field, with both values.
    """
    if saved.get("pairs_sha256") != current["pairs_sha256"]:
        raise ConfigError(f"cannot resume: the pairs differ from the checkpointed run's (their manifest sha256 "
                          f"{current['pairs_sha256'][:12]} vs {str(saved.get('pairs_sha256'))[:12]} in {path})")
    for section in sorted((set(saved) | set(current)) - {"pairs_sha256"}):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if section == "train" and key in _RESUMABLE_CHANGES:
                continue
            if old.get(key) != new.get(key):
                raise ConfigError(f"cannot resume: {section}.{key} is {new.get(key)!r} but the checkpointed run used "
                                  f"{old.get(key)!r} ({path}); resume with the same setting or start a new run")


def _build_for_restore(model: DSSMModel, batch: dict[str, tf.Tensor]) -> None:
    """Create every variable a train step creates (one forward pass, no update), then the optimizer's slots.

    A checkpoint restores into existing variables; the optimizer's slots otherwise appear only in
    the first ``apply_gradients``.
    """
    model.compute_loss(batch, training=False)
    model.optimizer.build(model.trainable_variables)


# ModelConfig fields that decide the towers' variables; the rest (loss, temperature, dropout...) may change.
_TOWER_FIELDS = ("embedding_dim", "hidden_dims", "activation", "bag_combiner", "shared_towers")


def load_towers(model: DSSMModel, model_dir: str | Path, *, batch: dict[str, tf.Tensor]) -> None:
    """Set ``model``'s towers to the weights of the exported model in ``model_dir`` (a warm start).

    Args:
        model: a compiled model, not yet trained.
        model_dir: a :func:`~dssm.export.export_model` directory; its manifest is verified first.
        batch: a training batch, to build the towers' variables (one forward pass, no update).

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
    model.compute_loss(batch, training=False)
    # The SavedModel's variables are an object-based checkpoint rooted at the serving module, whose
    # query_tower/document_tower attributes are the towers; they are matched by that path. read(), not
    # restore(): restore would also expect the checkpoint's own save_counter, which a SavedModel lacks.
    checkpoint = tf.train.Checkpoint(query_tower=model.query_tower, document_tower=model.document_tower)
    status = checkpoint.read(str(Path(model_dir) / SAVED_MODEL / "variables" / "variables"))
    status.expect_partial().assert_existing_objects_matched()  # every tower variable got a value


def _loss_data(model_config: ModelConfig, loss_config: LossConfig, train_config: TrainConfig,
               train_files: list[str], *, negatives: bool) -> tuple[TrainConfig, bool]:
    """What ``model_config.loss`` trains on: ``(config for its datasets, read explicit negatives)``.

    cosent and classifier learn from labelled pairs, so label-0 rows (Quora non-duplicates) and
    graded scores (STS 0-5) stay in their batches instead of being filtered by ``min_label``; simcse
    only reads the query texts, so every row's text is used. The score-matrix losses train on
    positives (``label > min_label``); contrastive also needs the shards' explicit negatives.

    Raises:
        ConfigError: contrastive without explicit negatives; cosent with a single label value;
            classifier with labels that are not class indices ``0..num_classes-1``.
    """
    inputs = LOSSES[model_config.loss].inputs
    if inputs == "scores+negatives" and not negatives:
        raise ConfigError(f"loss {model_config.loss!r} needs explicit negatives, and the train shards carry none"
                          + ("" if train_config.negatives else " that are read (--no-negatives is set)")
                          + ": make the pairs with `dssm pairs --negatives-as-third-input` (label-0 rows of "
                          "the same query) or `dssm mine`")
    if inputs in ("scores", "scores+negatives"):
        return train_config, negatives
    data_config = dataclasses.replace(train_config, min_label=-math.inf)
    if inputs in ("graded", "classifier"):
        spec = {"label": _PARSE_SPEC["label"]}
        ds = tf.data.TFRecordDataset(train_files, compression_type="GZIP").batch(4096).map(
            lambda s: tf.io.parse_example(s, spec)["label"])
        labels = np.unique(np.concatenate([b.numpy() for b in ds] or [np.zeros(0, np.float32)]))
        if inputs == "graded" and len(labels) < 2:
            raise ConfigError(f"loss cosent ranks pairs by label, but every train pair has label {labels.tolist()}: "
                              "it needs graded or 0/1 labelled pairs")
        classes = np.arange(loss_config.num_classes)
        if inputs == "classifier" and not np.isin(labels, classes).all():
            raise ConfigError(f"loss classifier needs class labels in {classes.tolist()} (--num-classes "
                              f"{loss_config.num_classes}); the train pairs have labels "
                              f"{[float(f'{x:.4g}') for x in labels[~np.isin(labels, classes)][:5]]} (graded "
                              "pairs: use --loss cosent)")
    return data_config, False


def _document_ids(files: list[str], *, min_label: float) -> np.ndarray:
    """``document_id`` of every pair with ``label > min_label`` (logQ correction's frequency count)."""
    spec = {"label": _PARSE_SPEC["label"], "document_id": _PARSE_SPEC["document_id"]}

    def ids(records: tf.Tensor) -> tf.Tensor:
        example = tf.io.parse_example(records, spec)
        return tf.boolean_mask(example["document_id"], example["label"] > min_label)

    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096).map(ids)
    return np.concatenate([b.numpy() for b in ds] or [np.zeros(0, object)])


def train(pairs_dir: str | Path, *, model_config: ModelConfig, train_config: TrainConfig,
          feature_config: FeatureConfig | None = None, checkpoint_dir: str | Path | None = None,
          tensorboard_dir: str | Path | None = None, resume: bool = False,
          loss_config: LossConfig | None = None) -> tuple[DSSMModel, dict[str, Any]]:
    """Train a model on the pair shards in ``pairs_dir``.

    After each epoch the validation split gives ``val_loss`` and, by exact search of up to
    ``train_config.validation_queries`` queries among its documents, ``val_recall_at_10`` and
    ``val_mrr_at_10``. Training stops after ``early_stopping_patience`` epochs without a better
    ``val_recall_at_10``; with ``keep_best`` the returned model has the best epoch's weights.

    Args:
        pairs_dir: a ``dssm pairs`` output directory.
        model_config: tower shape and loss settings.
        train_config: optimisation settings.
        feature_config: override for ``pairs_dir/features.json`` (must match the shards' hashing).
        checkpoint_dir: save ``last/`` (every epoch) and ``best/`` checkpoints and ``run.json`` here;
            None = no checkpoints.
        tensorboard_dir: write TensorBoard scalars (per epoch) here; None = none.
        resume: continue the run checkpointed in ``checkpoint_dir`` from its last checkpoint (same
            configuration; only ``epochs``, ``verbose`` and ``early_stopping_patience`` may change).
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
    train_files = pair_files(pairs_dir, "train")
    if feature_config is None:
        feature_config = read_feature_config(pairs_dir)
    if not train_files:
        raise InputError(f"no train-*.tfrecord.gz shards in {pairs_dir}")
    # The manifest is written last by `dssm pairs`: this refuses unfinished and corrupted shards.
    pairs_manifest = verify_manifest(pairs_dir, kind="pairs")
    validation_files = pair_files(pairs_dir, "validation") if train_config.validation else []
    checkpoints = _Checkpoints(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and checkpoints is None:
        raise InputError("resume needs the checkpoint directory of the run to continue")
    if checkpoints is not None and not resume and checkpoints.exists():
        raise InputError(f"checkpoint directory {checkpoint_dir} holds another run's checkpoints (resume it, or "
                         "delete it to start over)")
    first_epoch = checkpoints.completed_epochs() if resume and checkpoints is not None else 0
    run_config: dict[str, Any] = {}
    if checkpoints is not None:
        run_config = _run_config(feature_config, model_config, train_config,
                                 loss_config if loss_config is not None else LossConfig(),
                                 _pairs_digest(pairs_manifest))
        run_path = checkpoints.directory / RUN_CONFIG
        if resume and not run_path.is_file():
            raise InputError(f"nothing to resume: no {RUN_CONFIG} in {checkpoint_dir}")
        if resume:  # before any data is read or model built: a mismatch fails fast
            _check_resumable(json.loads(run_path.read_text()), run_config, run_path)

    tf.keras.utils.set_random_seed(train_config.seed)
    strategy = select_strategy()
    replicas = strategy.num_replicas_in_sync
    # Replicas all-gather their candidates, which needs equal local batches: drop a short last batch.
    drop = replicas > 1
    batch = train_config.batch_size
    loss_config = loss_config if loss_config is not None else LossConfig()
    # The loss decides which rows it learns from (data_config.min_label) and whether negatives are read.
    data_config, negatives = _loss_data(model_config, loss_config, train_config, train_files,
                                        negatives=train_config.negatives and has_negatives(train_files))
    n_train = count_pairs(train_files, min_label=data_config.min_label)
    steps = n_train // batch if drop else -(-n_train // batch)
    if steps == 0:
        raise InputError(f"the train shards in {pairs_dir} hold {n_train} pairs with label > "
                         f"{data_config.min_label}; need at least {batch if drop else 1}")
    epochs_left = max(train_config.epochs - first_epoch, 1)
    # Bag plans come from the input pipeline with one replica (distributing a dataset splits every tensor).
    groups = bag_groups(model_config, ["query", "document"] + (["negative"] if negatives else [])) \
        if replicas == 1 else []
    train_ds = make_dataset(train_files, batch_size=batch, training=True, config=data_config, drop_remainder=drop,
                            negatives=negatives, epochs=(first_epoch, first_epoch + epochs_left), bag_groups=groups)
    train_ds = train_ds.apply(tf.data.experimental.assert_cardinality(steps * epochs_left))
    validation_ds = None
    n_validation = count_pairs(validation_files, min_label=data_config.min_label)
    validation_steps = n_validation // batch if drop else -(-n_validation // batch)
    if validation_steps:
        validation_ds = make_dataset(validation_files, batch_size=batch, training=False, config=data_config,
                                     drop_remainder=drop, negatives=negatives, bag_groups=groups)
        validation_ds = validation_ds.apply(tf.data.experimental.assert_cardinality(validation_steps))
    with strategy.scope():
        model = build_model(model_config, feature_config, train_config, loss_config=loss_config)
    if train_config.init_from and first_epoch == 0:  # a resumed run's checkpoint holds the weights
        load_towers(model, train_config.init_from, batch=next(iter(make_dataset(
            train_files, batch_size=2, training=False, config=data_config, negatives=negatives))))
    if loss_config.logq_correction:
        model.set_sampling_probabilities(_document_ids(train_files, min_label=data_config.min_label))
    pairs_per_epoch = steps * batch if drop else n_train
    retrieval = read_validation_set(validation_files, min_label=train_config.min_label,
                                    max_queries=train_config.validation_queries, seed=train_config.seed)

    state = _new_state()
    if checkpoints is not None:
        run_path = checkpoints.directory / RUN_CONFIG
        if resume and first_epoch > 0:
            with strategy.scope():
                _build_for_restore(model, next(iter(make_dataset(train_files, batch_size=2, training=False,
                                                                 config=data_config, negatives=negatives))))
            checkpoints.attach(model)
            first_epoch, state = checkpoints.restore_last()
        elif resume:  # the run stopped before its first checkpoint: start it again, same run.json
            checkpoints.attach(model)
        else:
            checkpoints.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_path, run_config)
            checkpoints.attach(model)
    patience = train_config.early_stopping_patience if retrieval is not None else 0
    keep_start = train_config.keep_best and retrieval is not None
    tracker = _RunTracker(state, patience=patience, checkpoints=checkpoints, snapshot=keep_start,
                          session_start=session_start,
                          baseline=(lambda: evaluate_retrieval(model, retrieval)[MONITOR.removeprefix("val_")])
                          if keep_start else None)
    # Order matters: every callback after one that adds metrics sees them in the same logs dict.
    callbacks: list[tf.keras.callbacks.Callback] = []
    if retrieval is not None:
        callbacks.append(_RetrievalValidation(retrieval))
    callbacks.append(_Throughput(pairs_per_epoch, batch))
    if train_config.verbose:
        # Our own progress bar, after _Throughput, so it shows the running pairs_per_sec as is.
        callbacks.append(tf.keras.callbacks.ProgbarLogger(count_mode="steps", stateful_metrics=["pairs_per_sec"]))
    callbacks.append(tracker)
    if tensorboard_dir is not None:
        callbacks.append(tf.keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir), histogram_freq=0,
                                                        write_graph=False, update_freq="epoch", profile_batch=0))
    done = first_epoch >= train_config.epochs or (patience and state["wait"] >= patience)
    if not done:
        model.fit(train_ds, validation_data=validation_ds, epochs=train_config.epochs, initial_epoch=first_epoch,
                  steps_per_epoch=steps, callbacks=callbacks, verbose=train_config.verbose)
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
    history: dict[str, Any] = dict(state["history"])
    history.update(
        best_epoch=best_epoch, weights_epoch=weights_epoch, monitor=MONITOR if retrieval is not None else None,
        best_value=state["best_value"], start_value=start_value,
        stopped_early=bool(state["stopped_early"]), train_pairs=pairs_per_epoch,
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
    if value is None:
        return default
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> int:
    """``dssm train``: train on ``--pairs`` and export to ``--output``; prints the exported epoch's metrics."""
    args = _parser().parse_args(argv)
    model_config, notes = apply_loss_defaults(config_from_args(ModelConfig, args))
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
            _Checkpoints(checkpoint_dir).clear()
        if tensorboard_dir is not None and tensorboard_dir.name in keep:
            shutil.rmtree(tensorboard_dir, ignore_errors=True)
    feature_config = read_feature_config(args.pairs)
    model, history = train(args.pairs, model_config=model_config, train_config=train_config,
                           feature_config=feature_config, checkpoint_dir=checkpoint_dir,
                           tensorboard_dir=tensorboard_dir, resume=args.resume, loss_config=loss_config)
    export_model(model, output, train_config=train_config, history=history,
                 overwrite=args.overwrite or args.resume, keep=keep)
    epoch = history["weights_epoch"]
    row = history["epoch"].index(epoch) if epoch in history.get("epoch", []) else -1
    metrics = {key: values[row] for key, values in history.items()
               if isinstance(values, list) and values and key not in ("epoch",)}
    print(f"wrote {output}: weights of epoch {epoch} (best by {history['monitor'] or 'last epoch'}; "
          f"{len(history.get('epoch', []))} trained{', stopped early' if history['stopped_early'] else ''}), "
          + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return 0
