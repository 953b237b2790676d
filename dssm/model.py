"""The DSSM two-tower model: hashed-trigram bags → embedding bag → tanh MLP → L2-normalised vectors.

A tower is the DSSM paper's network. Its first layer is an *embedding bag*: the text's sparse bag of
hashed ids (with counts as weights) times a ``[num_buckets, embedding_dim]`` table, which is exactly a
dense layer on the ``num_buckets``-wide count vector but touches only the rows the bag uses, so the
table's gradient stays ``tf.IndexedSlices`` and a sparse optimizer updates only those rows (the layer
and its bag plans are in :mod:`dssm.bags`). Then a bias and the activation, then ``hidden_dims`` dense
layers, then L2 normalisation, so the dot product of two tower outputs is their cosine.

:class:`DSSMModel` is a ``tfrs.Model`` holding a query tower and a document tower (one shared object
by default, the Siamese set-up, or two separate towers) and the training objective ``ModelConfig.loss``
(one of :data:`dssm.losses.LOSSES`, hyperparameters in a :class:`~dssm.losses.LossConfig`):

* score-matrix losses (softmax, the default; triplet, hard-negative, circle; contrastive, which
  needs explicit negatives) score every query against the batch's documents and explicit negatives,
  with accidental hits (a candidate with the row's document id, or the same bag, i.e. identical text
  after normalisation) masked, optionally with logQ correction (softmax, contrastive);
* cosent scores each labelled pair by the cosine of its two towers' outputs, ranked against the
  batch's other pairs by label (label-0 rows and graded scores are data here, not noise);
* classifier trains a Sentence-BERT :class:`~dssm.pair_losses.PairClassifier` head on ``[u, v, |u-v|]``;
  the head lives in the model for training only (export keeps just the towers);
* simcse runs the batch's query bags through the query tower twice (two dropout masks) and treats
  the two views of a text as the positive pair: no labels or documents needed.

Any object with the call signature of ``tfrs.tasks.Retrieval`` can be passed as ``loss`` to replace a
score-matrix loss (see :class:`PairLoss`).

Batches are dicts of tensors as read from the pair shards (see ``dssm/inputs.py``):
``query_ids``/``query_counts``/``document_ids``/``document_counts`` ragged ``[batch, None]``, optional
``document_id`` ``[batch]`` string (for accidental-hit masking), ``label`` ``[batch]`` float32 (needed
by cosent and classifier) and optional explicit negatives ``negative_ids``/``negative_counts`` ragged
``[batch, None]`` (an empty row means "no negative") with ``negative_id`` ``[batch]`` string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.bags import BAG_PLANS, EmbeddingBag, bag_keys, pair_keys, plan_key
from dssm.config import config_to_dict, field
from dssm.errors import ConfigError
from dssm.features import FeatureConfig, Featurizer
from dssm.losses import LOSS_NAMES, LOSSES, SCORE_MATRIX_INPUTS, LossConfig, RetrievalLoss, get_loss
from dssm.pair_losses import PairClassifier, cosent_loss
from dssm.score_losses import distillation_loss, pair_cosines

import tensorflow as tf  # noqa: E402  isort: skip
import tensorflow_recommenders as tfrs  # noqa: E402  isort: skip

__all__ = ["ModelConfig", "Tower", "DSSMModel", "PairLoss", "apply_loss_defaults", "SIMCSE_DEFAULT_DROPOUT",
           "bag_groups"]

_ACTIVATIONS = ("tanh", "relu", "gelu", "linear")
_COMBINERS = ("sum", "mean", "sqrtn")
# SimCSE's dropout when the user left it at 0 (the paper's default rate, Gao et al. 2021).
SIMCSE_DEFAULT_DROPOUT = 0.1


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the towers and of the in-batch loss. Saved as ``config.json["model"]`` beside the model."""

    embedding_dim: int = field(300, "width of the first layer: the embedding bag over hashed ids")
    hidden_dims: tuple[int, ...] = field((300, 128), "dense layers after the embedding bag; the last is the output dim")
    activation: str = field("tanh", f"activation after every layer, one of {_ACTIVATIONS}")
    bag_combiner: str = field(
        "sqrtn", f"how a bag's rows are pooled, one of {_COMBINERS}: sum is the DSSM layer on raw counts; "
        "mean/sqrtn divide by the total count / its square root (tames long documents). sqrtn is the default "
        "(issue 11, docs/quality.md): better on the training pairs' own validation splits of debian-dev "
        "(neighbour pre-training val_recall@10 0.885 vs 0.847) and cisi (corpus pairs 0.939 vs 0.926)")
    embedding_init_stddev: float = field(
        0.05, "stddev of the embedding table's truncated-normal init (a 100-id bag then sums to ~0.5)")
    shared_towers: bool = field(True, "one tower for queries and documents (Siamese); --no-shared-towers for two")
    loss: str = field("softmax", f"training objective, one of {', '.join(LOSS_NAMES)} (listed below; "
                      "docs/losses.md compares them)")
    temperature: float = field(
        0.1, "softmax / contrastive / simcse temperature on cosine scores (DSSM's smoothing factor is "
        "1/temperature); on quora-dev held-out queries 0.1 gave nDCG@10 0.704 vs 0.679 at 0.05 and 0.695 at 0.15")
    dropout: float = field(0.0, "dropout rate after each hidden layer while training")
    remove_accidental_hits: bool = field(
        True, "mask in-batch negatives that have the same document id, or the same text, as the row's positive")
    side_dim: int = field(0, "width of a frozen side branch (0: none): a second embedding bag, a `dssm lsa` fit's "
                          "table set by `dssm ensemble`, whose L2-normalised sum is joined to the tower's output",
                          cli=False)
    side_weight: float = field(1.0, "the side branch's share: the joined cosine is (cosine of the towers + "
                               "side_weight x cosine of the side branch) / (1 + side_weight)", cli=False)

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ConfigError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if any(d < 1 for d in self.hidden_dims):
            raise ConfigError(f"hidden_dims must all be positive, got {self.hidden_dims}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; known losses: {', '.join(LOSS_NAMES)}")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.bag_combiner not in _COMBINERS:
            raise ConfigError(f"bag_combiner must be one of {_COMBINERS}, got {self.bag_combiner!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.embedding_init_stddev > 0:
            raise ConfigError(f"embedding_init_stddev must be > 0, got {self.embedding_init_stddev}")
        if self.side_dim < 0 or not self.side_weight > 0:
            raise ConfigError(f"side_dim must be >= 0 and side_weight > 0, got {self.side_dim}, {self.side_weight}")

    @property
    def output_dim(self) -> int:
        """Width of the tower output (the embedding dimension the index stores)."""
        return (self.hidden_dims[-1] if self.hidden_dims else self.embedding_dim) + self.side_dim


def apply_loss_defaults(config: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """Settings a loss cannot train without, filled in where the user left the default.

    simcse's only positive signal is the difference between two dropout masks, so it needs
    ``dropout > 0``: a config with 0 gets :data:`SIMCSE_DEFAULT_DROPOUT`.

    Returns:
        ``(config, notes)``: the adjusted config and one human-readable line per change (the CLI
        prints them).
    """
    if config.loss == "simcse" and config.dropout == 0:
        return (dataclasses.replace(config, dropout=SIMCSE_DEFAULT_DROPOUT),
                [f"loss simcse needs dropout > 0 (its two views differ only by dropout): using dropout "
                 f"{SIMCSE_DEFAULT_DROPOUT}"])
    return config, []


class PairLoss(Protocol):
    """What :class:`DSSMModel` calls to turn tower outputs into a loss (``tfrs.tasks.Retrieval`` fits).

    ``query_embeddings`` ``[batch, dim]``, ``candidate_embeddings`` ``[num_candidates, dim]`` whose first
    ``batch`` rows are the positives (row ``i`` for query ``i``) and the rest extra negatives for every
    query; ``candidate_ids`` ``[num_candidates]`` or None; ``score_mask`` ``[batch, num_candidates]``
    bool (False = ignore that score) or None. Returns the *sum* of the per-query losses (a scalar);
    the model divides by the global batch size.
    """

    def __call__(self, query_embeddings: tf.Tensor, candidate_embeddings: tf.Tensor, *,
                 candidate_ids: tf.Tensor | None, score_mask: tf.Tensor | None,
                 compute_metrics: bool, compute_batch_metrics: bool) -> tf.Tensor: ...


class Tower(tf.keras.Model):
    """One DSSM tower: bag → embedding bag (+bias, activation) → dense layers → L2 normalise.

    Args:
        config: the model shape.
        num_buckets: the featurizer's hash space (rows of the embedding table).
        featurizer: used by :meth:`embed_texts` to hash raw strings exactly like the training shards.
    """

    def __init__(self, config: ModelConfig, *, num_buckets: int, featurizer: Featurizer | None = None,
                 name: str | None = None) -> None:
        super().__init__(name=name)
        self.config = config
        self.featurizer = featurizer
        activation = None if config.activation == "linear" else config.activation
        self.bag = EmbeddingBag(num_buckets, config.embedding_dim, combiner=config.bag_combiner,
                                init_stddev=config.embedding_init_stddev, name="embedding_bag")
        self.bag_bias = self.add_weight(name="embedding_bias", shape=[config.embedding_dim],
                                        initializer="zeros", trainable=True)
        self.bag_activation = tf.keras.layers.Activation(activation or "linear", name="bag_activation")
        self.hidden = [tf.keras.layers.Dense(d, activation=activation, name=f"dense_{i}")
                       for i, d in enumerate(config.hidden_dims)]
        self.drop = [tf.keras.layers.Dropout(config.dropout, name=f"dropout_{i}")
                     for i in range(len(config.hidden_dims))]
        # `dssm train --xla`: the dense part is compiled with XLA. The bag (unique, ragged ids,
        # segment sums) has no XLA kernels, so it stays outside; the exported model never uses XLA.
        self.jit_dense = False
        self._dense_xla = tf.function(self._dense, jit_compile=True)
        # An ensemble's side branch (dssm.ensemble): a fitted table that training never changes.
        self.side = None
        if config.side_dim:
            self.side = EmbeddingBag(num_buckets, config.side_dim, combiner="sum",
                                     init_stddev=config.embedding_init_stddev, name="side_bag")
            self.side.trainable = False

    def get_config(self) -> dict[str, object]:
        # Lets Keras serialise the tower inside a SavedModel without warning; loading goes through
        # the exported signatures, never through this config.
        return {"config": config_to_dict(self.config), "num_buckets": self.bag.num_buckets, "name": self.name}

    def call(self, inputs: tuple[tf.RaggedTensor, tf.RaggedTensor], training: bool | None = None,
             plan: dict[str, tf.Tensor] | None = None) -> tf.Tensor:
        """Embed bags.

        Args:
            inputs: ``(ids, counts)``: ``[batch, None]`` int64 and ``[batch, None]`` float32 ragged.
            training: enables dropout.
            plan: the bags' :func:`~dssm.bags.bag_plan` if the input pipeline made one.

        Returns:
            ``[batch, output_dim]`` float32, rows of unit L2 norm (all-zero for an empty bag with zero biases).
        """
        ids, counts = inputs
        pooled = self.bag(ids, counts, plan=plan)
        out = self._dense_xla(pooled, training=bool(training)) if self.jit_dense else self._dense(pooled,
                                                                                                 training=training)
        return out if self.side is None else self._join_side(out, self.side(ids, counts, plan=plan))

    def _dense(self, x: tf.Tensor, training: bool | None) -> tf.Tensor:
        """``[batch, embedding_dim]`` pooled bags → ``[batch, output_dim]`` unit vectors."""
        x = self.bag_activation(x + tf.cast(self.bag_bias, x.dtype))
        for dense, drop in zip(self.hidden, self.drop, strict=True):
            x = drop(dense(x), training=training)
        # Normalise in float32: under mixed precision the squared norm of a 128-wide fp16 vector is
        # fine, but the scores and softmax that follow must be float32.
        return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)

    def _join_side(self, out: tf.Tensor, side: tf.Tensor) -> tf.Tensor:
        """``[batch, d]`` unit rows and ``[batch, side_dim]`` side sums → ``[batch, d + side_dim]`` unit rows
        whose dot products are ``(cos + w · cos_side) / (1 + w)``."""
        weight = self.config.side_weight
        side = tf.math.l2_normalize(tf.cast(side, tf.float32), axis=-1) * (weight ** 0.5)
        return tf.concat([out, side], axis=-1) / ((1.0 + weight) ** 0.5)

    def embed_texts(self, texts: tf.Tensor) -> tf.Tensor:
        """Featurize raw strings in-graph and embed them.

        Args:
            texts: ``[batch]`` tf.string.

        Returns:
            ``[batch, output_dim]`` float32, L2-normalised.
        """
        if self.featurizer is None:
            raise ConfigError(f"tower {self.name!r} was built without a featurizer; pass featurizer=")
        if not self.built:  # build the weights the Keras way (one empty bag)
            self((tf.ragged.constant([[]], tf.int64), tf.ragged.constant([[]], tf.float32)), training=False)
        # self(featurizer.bags(texts)) without de-duplicating what the pooling re-expands anyway, each
        # distinct word's rows pooled once (EmbeddingBag.pool_words).
        tokens = self.featurizer.word_tokens(texts)
        out = (self._dense_xla if self.jit_dense else self._dense)(self.bag.pool_words(*tokens), training=False)
        return out if self.side is None else self._join_side(out, self.side.pool_words(*tokens))


class DSSMModel(tfrs.Model):
    """Two DSSM towers and their training objective (``config.loss``).

    Args:
        config: tower shape, sharing, the loss and its temperature.
        feature_config: the hashing the towers read (its ``num_buckets`` sizes the tables).
        loss: optional :class:`PairLoss` replacing the score-matrix loss (softmax, triplet,
            hard-negative, circle, contrastive); default
            ``RetrievalLoss(config.loss, config=loss_config, temperature=config.temperature)``.
        loss_config: the losses' margins and scales (:class:`~dssm.losses.LossConfig`); saved as
            ``config.json["loss"]`` by export.

    Raises:
        ConfigError: ``loss`` given for a loss that is not a score-matrix loss, or simcse with
            ``dropout == 0`` (see :func:`apply_loss_defaults`).
    """

    def __init__(self, config: ModelConfig, *, feature_config: FeatureConfig, loss: PairLoss | None = None,
                 loss_config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.feature_config = feature_config
        self.loss_config = loss_config if loss_config is not None else LossConfig()
        spec = LOSSES[config.loss]
        self.loss_inputs = spec.inputs
        if config.loss == "simcse" and config.dropout == 0:
            raise ConfigError("loss simcse needs dropout > 0: its two views of a text differ only by dropout "
                              f"(got dropout {config.dropout}; {SIMCSE_DEFAULT_DROPOUT} is SimCSE's)")
        if loss is not None and spec.inputs not in SCORE_MATRIX_INPUTS:
            raise ConfigError(f"loss= replaces a score-matrix loss; ModelConfig.loss is {config.loss!r} "
                              f"({spec.inputs!r} inputs)")
        self.featurizer = Featurizer(feature_config)
        self.query_tower = Tower(config, num_buckets=feature_config.num_buckets, featurizer=self.featurizer,
                                 name="query_tower" if not config.shared_towers else "tower")
        if config.shared_towers:
            self.document_tower = self.query_tower
        else:
            self.document_tower = Tower(config, num_buckets=feature_config.num_buckets,
                                        featurizer=self.featurizer, name="document_tower")
        self.task: PairLoss | None = None
        if spec.inputs in SCORE_MATRIX_INPUTS:
            self.task = loss if loss is not None else RetrievalLoss(config.loss, config=self.loss_config,
                                                                    temperature=config.temperature)
        # softmax+cosent: the CoSENT term beside the score-matrix loss.
        self._graded_fn = (get_loss("cosent", config=self.loss_config) if spec.inputs == "scores+graded"
                           else None)
        # get_loss validates the combination (e.g. logq_correction with a loss that has none).
        self._loss_fn = (None if self.task is not None
                         else get_loss(config.loss, config=self.loss_config, temperature=config.temperature))
        if self.loss_config.distils and spec.inputs not in SCORE_MATRIX_INPUTS:
            raise ConfigError(f"distillation needs an in-batch score-matrix loss; {config.loss!r} has "
                              f"{spec.inputs!r} inputs")
        if self.loss_config.logq_correction and not spec.logq:
            raise ConfigError(f"logq_correction is not available for loss {config.loss!r}; only for "
                              f"{[n for n, s in LOSSES.items() if s.logq]}")
        # The Sentence-BERT head: trained with the towers, never exported (export keeps only the towers).
        self.classifier = (PairClassifier(self.loss_config.num_classes, name="pair_classifier")
                           if spec.inputs == "classifier" else None)
        # Document sampling probabilities for logQ correction; a plain holder so Keras does not track
        # the lookup table as model state (it is derived from the data, rebuilt by the trainer).
        self._sampling = _Holder()
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")

    @property
    def metrics(self) -> list[tf.keras.metrics.Metric]:
        # Listed here so Keras resets it every epoch and logs the epoch mean, not the last batch.
        return [self.loss_tracker, *super().metrics]

    def train_step(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """One optimizer step; logs ``loss`` as the running mean over the epoch (per pair)."""
        with tf.GradientTape() as tape:
            loss = self.compute_loss(batch, training=True)
            total = loss + tf.add_n(self.losses) if self.losses else loss
        # minimize() applies loss scaling when the optimizer is a LossScaleOptimizer (mixed float16).
        self.optimizer.minimize(total, self.trainable_variables, tape=tape)
        return self._log(loss)

    def test_step(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """The loss on a batch without dropout or updates."""
        return self._log(self.compute_loss(batch, training=False))

    def _log(self, loss: tf.Tensor) -> dict[str, tf.Tensor]:
        # compute_loss divides by the global batch; times the replica count it is this replica's mean.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.loss_tracker.update_state(loss * replicas)
        return {m.name: m.result() for m in self.metrics}

    def embed_queries(self, texts: tf.Tensor) -> tf.Tensor:
        """``[batch]`` tf.string → ``[batch, dim]`` float32 with the query tower."""
        return self.query_tower.embed_texts(texts)

    def embed_documents(self, texts: tf.Tensor) -> tf.Tensor:
        """``[batch]`` tf.string → ``[batch, dim]`` float32 with the document tower."""
        return self.document_tower.embed_texts(texts)

    def call(self, features: dict[str, tf.Tensor], training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """``features`` batch → ``(query [batch, dim], document [batch, dim])`` embeddings."""
        out = self._embed_batch(features, training=training)
        return out["query"], out["document"]

    def _embed_batch(self, features: dict[str, tf.Tensor], *, training: bool | None,
                     negatives: bool = True) -> dict[str, tf.Tensor]:
        """Embeddings of ``query``, ``document`` and (if present and ``negatives``) ``negative`` bags.

        Each tower runs once per step on all the bags it embeds (with shared towers: queries,
        documents and negatives together), so each embedding table gets exactly one gather per step
        and its gradient is one ``IndexedSlices`` with unique rows (no de-duplication pass needed).
        """
        names = ["query", "document"] + (["negative"] if negatives and "negative_ids" in features else [])
        groups = {"query": self.query_tower, "document": self.document_tower, "negative": self.document_tower}
        out: dict[str, tf.Tensor] = {}
        towers = [self.query_tower] if self.query_tower is self.document_tower else [self.query_tower,
                                                                                      self.document_tower]
        for tower in towers:
            mine = [name for name in names if groups[name] is tower]
            bags = [(features[f"{name}_ids"], features[f"{name}_counts"]) for name in mine]
            plan = features.get(BAG_PLANS, {}).get(plan_key(mine))
            for name, embedding in zip(mine, _embed_together(tower, bags, training=training, plan=plan),
                                       strict=True):
                out[name] = embedding
        return out

    def set_sampling_probabilities(self, document_ids: np.ndarray | list[bytes] | list[str]) -> None:
        """Estimate each document's in-batch sampling probability (for logQ correction) from its frequency.

        ``p(d) = count(d) / len(document_ids)``; a document not in the list (e.g. a validation one)
        gets ``1 / len(document_ids)``, as if seen once. Explicit negatives are chosen per query,
        not sampled, and get no correction.

        Args:
            document_ids: the ``document_id`` of every training pair (one entry per pair).

        Raises:
            ConfigError: the loss config does not ask for logQ correction, or the list is empty.
        """
        if not self.loss_config.logq_correction:
            raise ConfigError("set_sampling_probabilities needs LossConfig(logq_correction=True)")
        if len(document_ids) == 0:
            raise ConfigError("set_sampling_probabilities got no document ids")
        keys = tf.strings.to_hash_bucket_fast(tf.constant(document_ids, tf.string), 2**62).numpy()
        unique, counts = np.unique(keys, return_counts=True)
        total = float(len(keys))
        self._sampling.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(unique, tf.int64),
                                                tf.constant(counts / total, tf.float32)),
            default_value=1.0 / total)

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """The batch's loss, scaled so that the replicas' gradients sum to the global batch's.

        Score-matrix losses: candidates are the batch's documents, then its explicit negatives (if
        the batch has ``negative_ids``; rows with an empty negative bag are masked out). Under a
        multi-replica strategy every replica's candidates are gathered, so each query is scored
        against the whole global batch. With ``remove_accidental_hits``, a candidate whose
        ``document_id`` or bag (the text after normalisation) equals the row's positive's is masked
        (``score_mask``), not counted as a negative. The per-row losses are summed and divided by
        the global batch. classifier: cross-entropy of the pair head, likewise per pair. cosent: one
        ranking loss over the replica's pairs, divided by the number of replicas. simcse: the
        softmax of the query texts' first dropout views against their second views (gathered over
        replicas), repeated texts masked. softmax+cosent: the softmax over the rows with ``label > 0``
        (a label-0 row weighs 0), plus ``cosent_weight`` times cosent over the replica's pairs.

        Raises:
            ConfigError: cosent / softmax+cosent / classifier on a batch without ``label``.
        """
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if self.loss_inputs == "views":
            return self._simcse(features, training=training, replicas=replicas)
        if self.loss_inputs in ("graded", "classifier", "scores+graded") and "label" not in features:
            raise ConfigError(f"loss {self.config.loss!r} needs a 'label' per pair in the batch")
        embedded = self._embed_batch(features, training=training,
                                     negatives=self.loss_inputs in ("scores", "scores+negatives"))
        query, document = embedded["query"], embedded["document"]
        local_batch = tf.shape(query)[0]
        global_batch = tf.cast(local_batch * replicas, tf.float32)
        if self.loss_inputs == "graded":
            # CoSENT has no per-pair form: each replica ranks its own pairs; the replicas' mean.
            return self._loss_fn(pair_cosines(query, document), features["label"]) / replicas
        if self.loss_inputs == "classifier":
            logits = self.classifier((query, document))
            return self._loss_fn(logits, features["label"], reduction="sum") / global_batch
        keys = pair_keys(features.get("document_id"), features["document_ids"], features["document_counts"],
                          local_batch, tag=0)
        candidates, candidate_keys = _gather_replicas(document, keys, rotate=True)
        probability = None
        if self._sampling.table is not None:
            probability = self._sampling.table.lookup(candidate_keys[:, 0])
        keep_columns = None
        if "negative_ids" in features:
            negative = embedded["negative"]
            negative_keys = pair_keys(features.get("negative_id"), features["negative_ids"],
                                       features["negative_counts"], local_batch, tag=1)
            negative, negative_keys = _gather_replicas(negative, negative_keys, rotate=False)
            # all_gather has no bool kernel on every device; ship the flags as int32.
            present, _ = _gather_replicas(tf.cast(features["negative_ids"].row_lengths() > 0, tf.int32), None,
                                          rotate=False)
            keep_columns = tf.concat([tf.ones([tf.shape(candidates)[0]], tf.bool), present > 0], axis=0)
            if probability is not None:  # chosen per query, not sampled: no correction (log 1 = 0)
                probability = tf.concat([probability, tf.ones([tf.shape(negative)[0]])], axis=0)
            candidates = tf.concat([candidates, negative], axis=0)
            candidate_keys = tf.concat([candidate_keys, negative_keys], axis=0)
        num_candidates = tf.shape(candidates)[0]
        score_mask = None
        if self.config.remove_accidental_hits:
            # After the rotation in _gather_replicas this replica's positives are the first columns.
            # A hit: the same document id, or the same bag (identical text after normalisation). One
            # [batch, candidates] comparison per key column: the [batch, candidates, 2] equal + reduce_any
            # took ~6 ms of a ~90 ms CPU step at batch 1024 (3-D broadcasting), these ~1 ms.
            hit = tf.logical_or(tf.equal(candidate_keys[:local_batch, 0:1], candidate_keys[tf.newaxis, :, 0]),
                                tf.equal(candidate_keys[:local_batch, 1:2], candidate_keys[tf.newaxis, :, 1]))
            score_mask = tf.logical_or(tf.logical_not(hit), tf.eye(local_batch, num_candidates, dtype=tf.bool))
        if keep_columns is not None:
            keep = tf.broadcast_to(keep_columns[tf.newaxis, :], [local_batch, num_candidates])
            score_mask = keep if score_mask is None else tf.logical_and(score_mask, keep)
        extra = {} if probability is None else {"candidate_sampling_probability": probability}
        if self._graded_fn is not None:
            # A non-duplicate's own document is no positive: its row is weighted 0 (its document
            # stays a negative for the other rows); CoSENT ranks every labelled pair, like --loss cosent.
            extra["sample_weight"] = tf.cast(features["label"] > 0.0, tf.float32)
        loss_sum = self.task(query, candidates, candidate_ids=None, score_mask=score_mask, compute_metrics=False,
                             compute_batch_metrics=False, **extra)
        loss = loss_sum / tf.cast(global_batch, loss_sum.dtype)
        if self._graded_fn is not None:
            loss += self.loss_config.cosent_weight * self._graded_fn(pair_cosines(query, document),
                                                                     features["label"]) / replicas
        return loss + self._distill(features, query, document, score_mask, global_batch=global_batch,
                                    replicas=replicas)

    def _distill(self, features: dict[str, tf.Tensor], query: tf.Tensor, document: tf.Tensor,
                 score_mask: tf.Tensor | None, *, global_batch: tf.Tensor, replicas: int) -> tf.Tensor | float:
        """The teacher terms; 0 without distillation.

        ``distill_weight`` × the KL term over this replica's ``[batch, batch]`` scores (rows summed,
        divided by the global batch), plus ``distill_pairs_weight`` × CoSENT over the replica's
        ``[batch]`` pair cosines graded by the teacher's cosine of the same pairs (one ranking per
        replica, divided by the replicas, as ``--loss cosent``).
        """
        if not self.loss_config.distils:
            return 0.0
        weight, pairs_weight = self.loss_config.distill_weight, self.loss_config.distill_pairs_weight
        if "query_teacher" not in features:
            raise ConfigError("distillation (--distill-weight / --distill-pairs-weight > 0) needs teacher vectors "
                              "in the batch (query_teacher, document_teacher): make the pairs with "
                              "`dssm pairs --teacher minilm`")
        query_teacher, document_teacher = features["query_teacher"], features["document_teacher"]
        total = 0.0
        if weight > 0:
            teacher = tf.matmul(query_teacher, document_teacher, transpose_b=True)
            local = tf.shape(query)[0]
            mask = None if score_mask is None else score_mask[:, :local]
            per_row = distillation_loss(tf.matmul(query, document, transpose_b=True), teacher,
                                        temperature=self.config.temperature,
                                        teacher_temperature=self.loss_config.teacher_temperature,
                                        score_mask=mask, reduction="sum")
            total += weight * per_row / tf.cast(global_batch, per_row.dtype)
        if pairs_weight > 0:
            graded = cosent_loss(pair_cosines(query, document), tf.reduce_sum(query_teacher * document_teacher, axis=1),
                                 scale=self.loss_config.cosent_scale)
            total += pairs_weight * graded / replicas
        return total

    def _simcse(self, features: dict[str, tf.Tensor], *, training: bool | None, replicas: int) -> tf.Tensor:
        """SimCSE: the query bags through the query tower twice (one call, so one table gather)."""
        bags = (features["query_ids"], features["query_counts"])
        first, second = _embed_together(self.query_tower, [bags, bags], training=training)
        local_batch = tf.shape(first)[0]
        # A text repeated in the batch (one query with several pairs) is not its own negative.
        keys = bag_keys(*bags)
        second, keys = _gather_replicas(second, keys, rotate=True)
        loss_sum = self._loss_fn(first, second, keys=keys if self.config.remove_accidental_hits else None,
                                 reduction="sum")
        return loss_sum / tf.cast(local_batch * replicas, loss_sum.dtype)


class _Holder:
    """An attribute bag Keras does not track (see ``DSSMModel._sampling``)."""

    def __init__(self) -> None:
        self.table: tf.lookup.StaticHashTable | None = None


def bag_groups(config: ModelConfig, names: Sequence[str]) -> list[tuple[str, ...]]:
    """The bags each tower embeds in one call, as :meth:`DSSMModel.compute_loss` groups them.

    Args:
        config: the model (``shared_towers`` decides the grouping).
        names: the batch's bags, of ``query``, ``document``, ``negative``, in that order.

    Returns:
        One tuple per tower call: all of ``names`` with shared towers, else the query alone and the
        rest (documents and negatives share the document tower).
    """
    if config.shared_towers:
        return [tuple(names)]
    return [group for group in (tuple(n for n in names if n == "query"), tuple(n for n in names if n != "query"))
            if group]


def _embed_together(tower: Tower, bags: list[tuple[tf.RaggedTensor, tf.RaggedTensor]], *,
                    training: bool | None, plan: dict[str, tf.Tensor] | None = None) -> list[tf.Tensor]:
    """Run ``tower`` once on the concatenation of several ``(ids, counts)`` batches; split the output.

    ``plan`` is the :func:`~dssm.bags.bag_plan` of the concatenation, if the input pipeline made one.
    """
    if len(bags) == 1:
        return [tower(bags[0], training=training, plan=plan)]
    ids = tf.concat([b[0].with_row_splits_dtype(tf.int64) for b in bags], axis=0)
    counts = tf.concat([b[1].with_row_splits_dtype(tf.int64) for b in bags], axis=0)
    out = tower((ids, counts), training=training, plan=plan)
    return tf.split(out, [b[0].nrows(out_type=tf.int32) for b in bags], axis=0)


def _gather_replicas(values: tf.Tensor, ids: tf.Tensor | None, *, rotate: bool) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Concatenate ``values`` (and ``ids``) of every replica along axis 0; no-op with one replica.

    With ``rotate`` the result starts at this replica's rows, so row ``i`` is still this replica's
    ``i``-th positive (``tfrs.tasks.Retrieval`` takes the diagonal as the labels). Gradients flow back
    through ``all_gather`` to the replica that produced each row.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return values, ids
    gathered = ctx.all_gather(values, axis=0)
    gathered_ids = ctx.all_gather(ids, axis=0) if ids is not None else None
    if rotate:
        shift = -ctx.replica_id_in_sync_group * tf.shape(values)[0]
        gathered = tf.roll(gathered, shift=shift, axis=0)
        if gathered_ids is not None:
            gathered_ids = tf.roll(gathered_ids, shift=shift, axis=0)
    return gathered, gathered_ids
