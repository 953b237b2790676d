"""The input pipeline: pair shards on disk → tf.data batches for the train step, and the shards' readers.

This module owns what is read from a ``dssm pairs`` output directory (see docs/design.md): finding
the GZIP TFRecord shards ``train-*.tfrecord.gz`` / ``validation-*.tfrecord.gz`` (:func:`pair_files`)
and their ``features.json`` (:func:`read_feature_config`), :func:`make_dataset`, which parses them in
blocks, keeps the positive pairs and cuts each epoch's seeded batches (with the bag plans of
:mod:`dssm.bags` made ahead of the step, :func:`add_bag_plans`), which pairs a loss trains on (:func:`loss_data`), and
the small readers the trainer and tools need (pair counts, labels, document ids, raw text pairs, the
validation records' features).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.bags import BAG_PLANS, CSR_PLAN_KEYS, bag_plan_csr, plan_key
from dssm.config import load_config
from dssm.errors import ConfigError, InputError
from dssm.features import FeatureConfig
from dssm.losses import LOSSES
from dssm.topics import topic_clusters, topic_order

import tensorflow as tf  # noqa: E402  isort: skip

__all__ = ["DataConfig", "VALIDATION_SPEC", "pair_files", "read_feature_config", "has_negatives", "teacher_dim",
           "make_dataset", "add_bag_plans", "count_pairs", "loss_data", "read_labels", "read_document_ids",
           "read_text_pairs", "read_text_pairs_with_ids"]

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

# Everything a validation record holds that retrieval validation reads (texts and ids as well as the bags).
VALIDATION_SPEC = {
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



class DataConfig(Protocol):
    """What the input pipeline reads of a :class:`dssm.train.TrainConfig`."""

    @property
    def seed(self) -> int: ...

    @property
    def cache(self) -> bool: ...

    @property
    def shuffle_buffer(self) -> int: ...

    @property
    def min_label(self) -> float: ...

    @property
    def negatives(self) -> bool: ...

    @property
    def topic_batches(self) -> bool: ...


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


def _first_features(files: list[str]) -> Any:
    """The first record's feature map (empty without records): what every shard of a run carries."""
    for record in tf.data.TFRecordDataset(files[:1], compression_type="GZIP").take(1):
        return tf.train.Example.FromString(record.numpy()).features.feature
    return {}


def has_negatives(files: list[str]) -> bool:
    """Whether the shards carry explicit negatives (looks at the first record)."""
    return "negative_ids" in _first_features(files)


def teacher_dim(files: list[str], *, required: bool) -> int:
    """Width of the shards' teacher vectors (``dssm pairs --teacher``; the first record's ``query_teacher``).

    Returns:
        The width, or 0 when ``required`` is False (nothing is read).

    Raises:
        ConfigError: ``required`` and the shards carry no teacher vectors.
    """
    if not required:
        return 0
    feature = _first_features(files).get("query_teacher")
    if feature is not None and feature.float_list.value:
        return len(feature.float_list.value)
    raise ConfigError(f"distillation (--distill-weight or --distill-pairs-weight > 0) needs teacher vectors in the "
                      f"pairs, and {files[:1]} has "
                      "none: make the pairs with `dssm pairs --teacher minilm`")


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


_CLUSTER = "topic_cluster"  # the in-memory table's column of --topic-batches clusters (never in a batch)
# Parsed blocks (1024 records each) per in-memory element: 16M pairs (ragged_batch preallocates per slot).
_MAX_BLOCKS = 1 << 14


def make_dataset(files: list[str], *, batch_size: int, training: bool, config: DataConfig,
                 drop_remainder: bool = False, negatives: bool = False, epochs: tuple[int, int] = (0, 1),
                 bag_groups: Sequence[Sequence[str]] = (), teacher: int = 0) -> tf.data.Dataset:
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
        teacher: width of the shards' teacher vectors to read (``query_teacher``/``document_teacher``,
            ``[batch, teacher]`` float32); 0 reads none.
        epochs: ``(first, end)`` 0-based epochs to hold when ``training`` (ignored otherwise).
        bag_groups: bags the model embeds in one tower call (:func:`dssm.model.bag_groups`); each
            batch gets their :func:`dssm.bags.bag_plan_csr` under ``batch[BAG_PLANS][plan_key(group)]``,
            computed here so it overlaps with the previous train step instead of running inside it.
            Only for a single replica: distributing a dataset splits every tensor of a batch.

    Returns:
        Dataset of dicts: ``query_ids``/``document_ids`` ``[batch, None]`` int64 ragged,
        ``query_counts``/``document_counts`` ``[batch, None]`` float32 ragged, ``document_id``
        ``[batch]`` string, ``label`` ``[batch]`` float32 (and the ``negative_*`` keys with
        ``negatives``, and ``bag_plans`` with ``bag_groups``).
    """
    spec = {**_PARSE_SPEC, **(_NEGATIVE_SPEC if negatives else {})}
    if teacher:
        spec.update({f"{side}_teacher": tf.io.FixedLenFeature([teacher], tf.float32) for side in ("query", "document")})
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
        if config.topic_batches and not config.cache:
            raise ConfigError("topic_batches clusters the in-memory pairs: it needs the cache (drop --no-cache)")
        if config.cache:
            parts = _in_memory_epochs(blocks, config, range(first, end), batch_size=batch_size,
                                      drop_remainder=drop_remainder)
        else:
            pairs = blocks.unbatch()
            parts = [pairs.shuffle(config.shuffle_buffer, seed=_epoch_seed(config.seed, epoch),
                                   reshuffle_each_iteration=False).batch(batch_size, drop_remainder=drop_remainder)
                     for epoch in range(first, end)]
        ds = _concatenate(parts)
    return add_bag_plans(ds, bag_groups).prefetch(tf.data.AUTOTUNE)


def _in_memory_epochs(blocks: tf.data.Dataset, config: DataConfig, epochs: range, *, batch_size: int,
                      drop_remainder: bool) -> list[tf.data.Dataset]:
    """One dataset of batches per epoch in ``epochs``, cut from all pairs held in memory as one element."""
    # [pairs, None] ragged bags and [pairs] columns.
    table = blocks.ragged_batch(_MAX_BLOCKS).map(lambda b: {key: value.merge_dims(0, 1) for key, value in b.items()})
    if config.topic_batches:  # clustered once, before the cache: every epoch reorders the same clusters
        table = table.map(lambda pairs: {**pairs, _CLUSTER: topic_clusters(pairs, batch_size=batch_size,
                                                                           seed=config.seed)})
    table = table.cache()

    def epoch_batches(epoch: int) -> tf.data.Dataset:
        seed = _epoch_seed(config.seed, epoch)
        return table.flat_map(lambda pairs: _epoch_batches(pairs, seed=seed, batch_size=batch_size,
                                                           drop_remainder=drop_remainder))

    return [epoch_batches(epoch) for epoch in epochs]


def _epoch_batches(pairs: dict[str, tf.Tensor], *, seed: int, batch_size: int, drop_remainder: bool
                   ) -> tf.data.Dataset:
    """One epoch of batches of the in-memory ``pairs``, in the order of a permutation seeded by ``seed``."""
    n = tf.shape(pairs["label"], out_type=tf.int64)[0]
    clusters = pairs.get(_CLUSTER)  # --topic-batches: a shuffle that keeps each cluster's pairs together
    order = (tf.random.experimental.stateless_shuffle(tf.range(n), seed=[seed, 0]) if clusters is None
             else topic_order(clusters, seed=seed))
    steps = n // batch_size if drop_remainder else -(-n // batch_size)

    def take(step: tf.Tensor) -> dict[str, tf.Tensor]:
        rows = order[step * batch_size:tf.minimum((step + 1) * batch_size, n)]
        return {key: tf.gather(value, rows) for key, value in pairs.items() if key != _CLUSTER}

    return tf.data.Dataset.range(steps).map(take)


def add_bag_plans(ds: tf.data.Dataset, bag_groups: Sequence[Sequence[str]]) -> tf.data.Dataset:
    """``ds``'s batches with ``batch[BAG_PLANS][plan_key(group)]``, the bag plan of each group (none: as is).

    The plans are made by tf.data's threads (:func:`dssm.bags.bag_plan_csr`), so they overlap with
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


def count_pairs(files: list[str], *, min_label: float) -> int:
    """Number of pairs with ``label > min_label`` in ``files`` (parses only the label)."""
    if not files:
        return 0
    spec = {"label": _PARSE_SPEC["label"]}
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP", num_parallel_reads=min(4, len(files)))
    ds = ds.batch(4096).map(lambda s: tf.reduce_sum(tf.cast(tf.io.parse_example(s, spec)["label"] > min_label,
                                                            tf.int64)))
    return int(ds.reduce(tf.constant(0, tf.int64), lambda total, n: total + n))


def read_labels(files: list[str]) -> np.ndarray:
    """The distinct ``label`` values of the pairs in ``files``, ascending (parses only the label)."""
    spec = {"label": _PARSE_SPEC["label"]}
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096).map(
        lambda s: tf.io.parse_example(s, spec)["label"])
    return np.unique(np.concatenate([b.numpy() for b in ds] or [np.zeros(0, np.float32)]))


def loss_data(loss: str, config: DataConfig, files: list[str], *, negatives: bool,
              num_classes: int) -> tuple[DataConfig, bool]:
    """What the loss ``loss`` trains on: ``(config for its datasets, read explicit negatives)``.

    cosent, softmax+cosent and classifier learn from labelled pairs, so label-0 rows (Quora non-duplicates) and
    graded scores (STS 0-5) stay in their batches instead of being filtered by ``min_label``; simcse
    only reads the query texts, so every row's text is used. The score-matrix losses train on
    positives (``label > min_label``); contrastive also needs the shards' explicit negatives.

    Args:
        loss: a key of :data:`dssm.losses.LOSSES` (``ModelConfig.loss``).
        config: the run's :class:`dssm.train.TrainConfig`.
        files: the train shards.
        negatives: whether the shards carry explicit negatives and ``config.negatives`` reads them.
        num_classes: the classifier's classes (``LossConfig.num_classes``).

    Raises:
        ConfigError: contrastive without explicit negatives; cosent with a single label value;
            classifier with labels that are not class indices ``0..num_classes-1``.
    """
    inputs = LOSSES[loss].inputs
    if inputs == "scores+negatives" and not negatives:
        raise ConfigError(f"loss {loss!r} needs explicit negatives, and the train shards carry none"
                          + ("" if config.negatives else " that are read (--no-negatives is set)")
                          + ": make the pairs with `dssm pairs --negatives-as-third-input` (label-0 rows of "
                          "the same query) or `dssm mine`")
    if inputs in ("scores", "scores+negatives"):
        return config, negatives
    data_config = dataclasses.replace(config, min_label=-math.inf)
    if inputs in ("graded", "classifier", "scores+graded"):
        labels = read_labels(files)
        if inputs in ("graded", "scores+graded") and len(labels) < 2:
            raise ConfigError(f"loss {loss} ranks pairs by label, but every train pair has label {labels.tolist()}: "
                              "it needs graded or 0/1 labelled pairs")
        classes = np.arange(num_classes)
        if inputs == "classifier" and not np.isin(labels, classes).all():
            raise ConfigError(f"loss classifier needs class labels in {classes.tolist()} (--num-classes "
                              f"{num_classes}); the train pairs have labels "
                              f"{[float(f'{x:.4g}') for x in labels[~np.isin(labels, classes)][:5]]} (graded "
                              "pairs: use --loss cosent)")
    return data_config, False


def read_document_ids(files: list[str], *, min_label: float) -> np.ndarray:
    """``document_id`` of every pair with ``label > min_label`` (logQ correction's frequency count)."""
    spec = {"label": _PARSE_SPEC["label"], "document_id": _PARSE_SPEC["document_id"]}

    def ids(records: tf.Tensor) -> tf.Tensor:
        example = tf.io.parse_example(records, spec)
        return tf.boolean_mask(example["document_id"], example["label"] > min_label)

    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096).map(ids)
    return np.concatenate([b.numpy() for b in ds] or [np.zeros(0, object)])


def read_text_pairs(files: Sequence[str], *, min_label: float = 0.0) -> list[tuple[str, str]]:
    """The ``(query_text, document_text)`` of every pair above ``min_label`` in ``files``, in file order."""
    return [(query, document) for query, document, _ in read_text_pairs_with_ids(files, min_label=min_label)]


def read_text_pairs_with_ids(files: Sequence[str], *, min_label: float = 0.0) -> list[tuple[str, str, str]]:
    """The ``(query_text, document_text, document_id)`` of every pair above ``min_label`` in ``files``, in file order.

    ``dssm index --hybrid-pairs`` tunes on a pairs directory's validation split with it; the id lets it
    find a pair's document in the corpus when the pairs file words it differently (e.g. without the title).
    """
    if not files:
        return []
    spec = {key: VALIDATION_SPEC[key] for key in ("query_text", "document_text", "document_id", "label")}
    ds = tf.data.TFRecordDataset(list(files), compression_type="GZIP").batch(1024)
    out: list[tuple[str, str, str]] = []
    for batch in ds.map(lambda records: tf.io.parse_example(records, spec)):
        for query, document, doc_id, label in zip(batch["query_text"].numpy(), batch["document_text"].numpy(),
                                                  batch["document_id"].numpy(), batch["label"].numpy(), strict=True):
            if label > min_label and query and document:
                out.append((query.decode("utf-8", "replace"), document.decode("utf-8", "replace"),
                            doc_id.decode("utf-8", "replace")))
    return out
