"""Training: pair shards → tf.data → the two-tower model → an exported model directory.

``dssm train --pairs PAIRS_DIR --output MODEL_DIR [--epochs N] [--batch-size B] [model/train flags]``

The input is the directory ``dssm pairs`` writes (see docs/design.md): GZIP TFRecord shards
``train-*.tfrecord.gz`` / ``validation-*.tfrecord.gz`` of ``tf.train.Example`` with hashed bags, and
``features.json``, the :class:`~dssm.features.FeatureConfig` the shards were hashed with. The model is
built with that same config, so the exported SavedModel hashes raw strings exactly like the shards.

Optimizers and the embedding table: the table is ``[num_buckets, embedding_dim]`` (2^18 × 300 floats,
315 MB, by default) and each batch touches a few tens of thousands of its rows. Keras' Adam applies
its moment decay to the *whole* table every step even for sparse gradients, which dominates the
step; ``adagrad`` and ``lazy_adam`` (:class:`LazyAdam`, Adam restricted to the rows in the batch)
update only the rows a batch touches.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.artifacts import verify_manifest
from dssm.config import add_config_arguments, config_from_args, field, load_config
from dssm.errors import ConfigError, InputError
from dssm.export import export_model
from dssm.features import FeatureConfig
from dssm.model import DSSMModel, ModelConfig

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["TrainConfig", "SparseAdagrad", "RowwiseAdagrad", "LazyAdam", "make_optimizer", "pair_files",
           "read_feature_config", "make_dataset", "has_negatives", "select_strategy", "build_model", "count_pairs",
           "train", "main"]

_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "lazy_adam", "adam", "sgd")
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
    validation: bool = field(True, "compute the loss on validation-* shards after each epoch")
    min_label: float = field(0.0, "pairs with label <= this are dropped (explicit negatives are no in-batch positives)")
    shuffle_buffer: int = field(100_000, "shuffle buffer in pairs (>= the number of pairs shuffles fully)")
    cache: bool = field(True, "keep parsed positive pairs in memory after the first epoch")
    negatives: bool = field(True, "use the shards' explicit negatives (negative_ids) as extra softmax columns "
                            "when they have them")
    mixed_precision: bool = field(False, "compute in float16 on GPU / bfloat16 on CPU; variables stay float32")
    xla: bool = field(False, "compile the towers' dense layers with XLA (the sparse bag has no XLA kernels)")
    steps_per_execution: int = field(1, "train steps per tf.function call (fewer Python round trips)")
    verbose: int = field(1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch")

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


class _UniqueRows:
    """Skips Keras' sparse-gradient de-duplication when the rows are already unique (a cheap check).

    Keras runs ``unique`` + ``unsorted_segment_sum`` over every sparse gradient before applying it.
    :class:`~dssm.model.DSSMModel` gathers each table once per step, so its gradients have unique
    rows and the segment sum would copy ``[rows, dim]`` for nothing; it still runs if they are not.
    """

    def _deduplicate_sparse_grad(self, grads: list[Any]) -> list[Any]:
        out = []
        for grad in grads:
            if isinstance(grad, tf.IndexedSlices):
                # unique keeps first-appearance order, so when nothing repeats `rows` equals the indices.
                rows, position = tf.unique(grad.indices)
                values = tf.cond(tf.size(rows) == tf.size(grad.indices), lambda g=grad: g.values,
                                 lambda g=grad, p=position, r=rows: tf.math.unsorted_segment_sum(g.values, p,
                                                                                                  tf.size(r)))
                grad = tf.IndexedSlices(values, rows, grad.dense_shape)
            out.append(grad)
        return out


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
            acc = tf.gather(accumulator, rows) + tf.reduce_mean(tf.square(values), axis=1)
            accumulator.scatter_update(tf.IndexedSlices(acc, rows))
            variable.scatter_sub(tf.IndexedSlices(values * (lr * tf.math.rsqrt(acc + self.epsilon))[:, None], rows))
        else:
            accumulator.assign_add(tf.reduce_mean(tf.square(gradient), axis=1))
            variable.assign_sub(gradient * (lr * tf.math.rsqrt(accumulator + self.epsilon))[:, None])
        return None


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


def make_dataset(files: list[str], *, batch_size: int, training: bool, config: TrainConfig,
                 drop_remainder: bool = False, negatives: bool = False) -> tf.data.Dataset:
    """Batches of positive pairs for :meth:`DSSMModel.compute_loss`.

    Records are parsed in blocks (``parse_example`` is vectorised), pairs with ``label <= min_label``
    dropped, then regrouped into batches of ``batch_size`` pairs.

    Args:
        files: GZIP TFRecord shards.
        batch_size: pairs per batch.
        training: shuffle (seeded, reshuffled each epoch) and cache if ``config.cache``.
        config: shuffle buffer, seed, label threshold.
        drop_remainder: drop a last short batch (needed when replicas must see equal batches).
        negatives: also read ``negative_id``/``negative_ids``/``negative_counts``.

    Returns:
        Dataset of dicts: ``query_ids``/``document_ids`` ``[batch, None]`` int64 ragged,
        ``query_counts``/``document_counts`` ``[batch, None]`` float32 ragged, ``document_id``
        ``[batch]`` string, ``label`` ``[batch]`` float32 (and the ``negative_*`` keys with ``negatives``).
    """
    spec = {**_PARSE_SPEC, **(_NEGATIVE_SPEC if negatives else {})}
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        files_ds = files_ds.shuffle(len(files), seed=config.seed, reshuffle_each_iteration=True)
    ds = files_ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                             cycle_length=min(4, max(1, len(files))), num_parallel_calls=tf.data.AUTOTUNE,
                             deterministic=True)
    ds = ds.batch(1024).map(lambda records: tf.io.parse_example(records, spec), num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)

    def keep_positive(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        keep = batch["label"] > config.min_label
        return {key: tf.ragged.boolean_mask(value, keep) if isinstance(value, tf.RaggedTensor)
                else tf.boolean_mask(value, keep) for key, value in batch.items()}

    ds = ds.map(keep_positive, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    if training:
        if config.cache:
            ds = ds.cache()
        ds = ds.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


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


def build_model(model_config: ModelConfig, feature_config: FeatureConfig, train_config: TrainConfig) -> DSSMModel:
    """A compiled :class:`DSSMModel` (call inside the strategy's scope when distributing)."""
    with _dtype_policy(train_config.mixed_precision):
        model = DSSMModel(model_config, feature_config=feature_config)
        # Not compile(jit_compile=...): the whole step cannot be XLA-compiled (ragged ids, unique,
        # string ids); the towers' dense layers can.
        model.query_tower.jit_dense = model.document_tower.jit_dense = train_config.xla
        model.compile(optimizer=make_optimizer(train_config), steps_per_execution=train_config.steps_per_execution)
    return model


class _Throughput(tf.keras.callbacks.Callback):
    """Adds ``pairs_per_sec`` (training pairs / seconds from epoch start to its last train batch) to the logs."""

    def __init__(self, pairs_per_epoch: int) -> None:
        super().__init__()
        self.pairs_per_epoch = pairs_per_epoch
        self._start = 0.0
        self._last = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._last = time.perf_counter()

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


def train(pairs_dir: str | Path, *, model_config: ModelConfig, train_config: TrainConfig,
          feature_config: FeatureConfig | None = None) -> tuple[DSSMModel, dict[str, list[float]]]:
    """Train a model on the pair shards in ``pairs_dir``.

    Args:
        pairs_dir: a ``dssm pairs`` output directory.
        model_config: tower shape and loss settings.
        train_config: optimisation settings.
        feature_config: override for ``pairs_dir/features.json`` (must match the shards' hashing).

    Returns:
        ``(model, history)``: the trained model and Keras' per-epoch history (``loss``, ``val_loss``,
        ``pairs_per_sec``), lists of floats.

    Raises:
        InputError: the directory, ``features.json`` or training shards are missing, or no shard holds
            a positive pair.
        IndexNotFoundError: no ``manifest.json`` (the pairs job did not finish).
        ChecksumError: a shard does not match its checksum.
    """
    train_files = pair_files(pairs_dir, "train")
    if feature_config is None:
        feature_config = read_feature_config(pairs_dir)
    if not train_files:
        raise InputError(f"no train-*.tfrecord.gz shards in {pairs_dir}")
    # The manifest is written last by `dssm pairs`: this refuses unfinished and corrupted shards.
    verify_manifest(pairs_dir, kind="pairs")
    validation_files = pair_files(pairs_dir, "validation") if train_config.validation else []

    tf.keras.utils.set_random_seed(train_config.seed)
    strategy = select_strategy()
    replicas = strategy.num_replicas_in_sync
    # Replicas all-gather their candidates, which needs equal local batches: drop a short last batch.
    drop = replicas > 1
    batch = train_config.batch_size
    n_train = count_pairs(train_files, min_label=train_config.min_label)
    steps = n_train // batch if drop else -(-n_train // batch)
    if steps == 0:
        raise InputError(f"the train shards in {pairs_dir} hold {n_train} pairs with label > "
                         f"{train_config.min_label}; need at least {batch if drop else 1}")
    negatives = train_config.negatives and has_negatives(train_files)
    train_ds = make_dataset(train_files, batch_size=batch, training=True, config=train_config, drop_remainder=drop,
                            negatives=negatives)
    train_ds = train_ds.apply(tf.data.experimental.assert_cardinality(steps))
    validation_ds = None
    n_validation = count_pairs(validation_files, min_label=train_config.min_label)
    validation_steps = n_validation // batch if drop else -(-n_validation // batch)
    if validation_steps:
        validation_ds = make_dataset(validation_files, batch_size=batch, training=False, config=train_config,
                                     drop_remainder=drop, negatives=negatives)
        validation_ds = validation_ds.apply(tf.data.experimental.assert_cardinality(validation_steps))
    with strategy.scope():
        model = build_model(model_config, feature_config, train_config)
    pairs_per_epoch = steps * batch if drop else n_train
    result = model.fit(train_ds, validation_data=validation_ds, epochs=train_config.epochs,
                       callbacks=[_Throughput(pairs_per_epoch)], verbose=train_config.verbose)
    history = {key: [float(v) for v in values] for key, values in result.history.items()}
    return model, history


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dssm train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, help="directory written by `dssm pairs`")
    parser.add_argument("--output", required=True, help="model directory to write (SavedModel, configs, manifest)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    add_config_arguments(parser, ModelConfig)
    add_config_arguments(parser, TrainConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``dssm train``: train on ``--pairs`` and export to ``--output``; prints the final losses."""
    args = _parser().parse_args(argv)
    model_config = config_from_args(ModelConfig, args)
    train_config = config_from_args(TrainConfig, args)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise InputError(f"output directory {output} exists and is not empty (pass --overwrite to replace it)")
    feature_config = read_feature_config(args.pairs)
    model, history = train(args.pairs, model_config=model_config, train_config=train_config,
                           feature_config=feature_config)
    export_model(model, output, train_config=train_config, history=history, overwrite=args.overwrite)
    last = {key: values[-1] for key, values in history.items() if values}
    print(f"wrote {output}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
    return 0

