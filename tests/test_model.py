"""The two-tower model: embedding bag arithmetic, sparse gradients, tower sharing, the in-batch loss."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dssm  # noqa: F401
from dssm.bags import EmbeddingBag
from dssm.errors import ConfigError
from dssm.features import FeatureConfig
from dssm.losses import LossConfig
from dssm.model import DSSMModel, ModelConfig, apply_loss_defaults
from dssm.optim import LazyAdam, RowwiseAdagrad, SparseAdagrad

import tensorflow as tf  # noqa: E402  isort: skip

FEATURES = FeatureConfig(num_buckets=4096)
# sum pooling: these tests' hand-sized batches and step budgets were set for raw-count bags (the default
# is sqrtn since issue 11; test_query_tower and test_searcher_fast cover sqrtn end to end).
SMALL = ModelConfig(embedding_dim=16, hidden_dims=(12, 8), bag_combiner="sum")
QUERIES = ["how do i learn python", "what is the capital of france", "best way to lose weight",
           "how to cook rice", "why is the sky blue"]
DOCUMENTS = ["learning python for beginners", "paris is the capital of france", "how can i lose weight fast",
             "cooking rice on a stove", "why does the sky look blue"]


def _batch(model: DSSMModel, queries: list[str], documents: list[str], doc_ids: list[str] | None = None) -> dict:
    q_ids, q_counts = model.featurizer.bags(tf.constant(queries))
    d_ids, d_counts = model.featurizer.bags(tf.constant(documents))
    batch = {"query_ids": q_ids, "query_counts": q_counts, "document_ids": d_ids, "document_counts": d_counts}
    if doc_ids is not None:
        batch["document_id"] = tf.constant(doc_ids)
    return batch


def _softmax_ce(scores: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean over rows of -log softmax(row)[i] with masked entries removed (done in numpy by hand)."""
    total = 0.0
    for i, row in enumerate(scores):
        keep = np.ones_like(row, bool) if mask is None else mask[i]
        logits = row[keep]
        total += -(row[i] - np.log(np.sum(np.exp(logits))))
    return total / len(scores)


def test_embedding_bag_is_count_weighted_row_sum() -> None:
    bag = EmbeddingBag(10, 3, combiner="sum", init_stddev=0.1)
    ids = tf.ragged.constant([[1, 4], [4], [], [9, 0, 2]], dtype=tf.int64)
    counts = tf.ragged.constant([[2.0, 1.0], [3.0], [], [1.0, 1.0, 2.0]])
    out = bag(ids, counts).numpy()
    table = bag.table.numpy()
    expected = np.stack([2 * table[1] + table[4], 3 * table[4], np.zeros(3), table[9] + table[0] + 2 * table[2]])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)

    for combiner, scale in (("mean", [3, 3, 1, 4]), ("sqrtn", np.sqrt([3, 3, 1, 4]))):
        other = EmbeddingBag(10, 3, combiner=combiner, init_stddev=0.1)
        other(ids, counts)
        other.table.assign(table)
        np.testing.assert_allclose(other(ids, counts).numpy(), expected / np.asarray(scale)[:, None], rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_pool_words_sums_each_texts_words_and_bigrams(combiner: str) -> None:
    # Distinct words' rows (a repeated id inside a word, an empty word), texts listing words by
    # occurrence (repeats, an empty text, a text of bigrams only, a trailing empty text).
    bag = EmbeddingBag(10, 3, combiner=combiner, init_stddev=0.1)
    word_ids = tf.ragged.constant([[1, 4, 1], [2], []], dtype=tf.int64)
    text_words = tf.ragged.constant([[0, 1, 0], [], [2, 1], [], []], dtype=tf.int32)
    text_bigrams = tf.ragged.constant([[7, 7], [], [9], [5], []], dtype=tf.int64)
    bag(tf.ragged.constant([[0]], tf.int64), tf.ragged.constant([[1.0]]))  # builds the table
    table = bag.table.numpy()
    word = [2 * table[1] + table[4], table[2], np.zeros(3)]
    raw = np.stack([2 * word[0] + word[1] + 2 * table[7], np.zeros(3), word[2] + word[1] + table[9], table[5],
                    np.zeros(3)])
    tokens = np.array([3 + 1 + 3 + 2, 1, 0 + 1 + 1, 1, 1])  # empty rows scale by 1
    scale = {"sum": np.ones(5), "mean": tokens, "sqrtn": np.sqrt(tokens)}[combiner]
    np.testing.assert_allclose(bag.pool_words(word_ids, text_words, text_bigrams).numpy(), raw / scale[:, None],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("combiner,unigrams,bigrams", [("sum", True, True), ("mean", False, True),
                                                       ("sqrtn", True, False), ("sqrtn", False, False)])
def test_embed_texts_equals_the_tower_on_bags(combiner: str, unigrams: bool, bigrams: bool) -> None:
    # embed_texts (every SavedModel signature) pools word by word; training pools the featurizer's
    # de-duplicated bags. Repeated words within and across texts, empty and non-ASCII texts.
    features = FeatureConfig(num_buckets=1 << 12, word_unigrams=unigrams, word_bigrams=bigrams)
    model = DSSMModel(dataclasses.replace(SMALL, bag_combiner=combiner), feature_config=features)
    texts = QUERIES + ["", "the the the cat", "🙂 ¿qué? qué", "a b a b a"]
    emb = model.embed_queries(tf.constant(texts)).numpy()
    ids, counts = model.featurizer.bags(tf.constant(texts))
    np.testing.assert_allclose(model.query_tower((ids, counts)).numpy(), emb, atol=2e-6)


@pytest.mark.parametrize("entries", [0, 1, 3, 7, 500])
def test_chunked_segment_sum_equals_one_kernel_call(entries: int) -> None:
    from dssm.bags import _segment_sum

    rng = np.random.default_rng(entries)
    data = tf.constant(rng.normal(size=(20, 3)), tf.float32)
    indices = tf.constant(rng.integers(0, 20, entries), tf.int32)
    # Sorted segment ids with gaps (empty segments) and one long run that straddles chunk targets.
    segments = np.sort(np.concatenate([rng.integers(0, 40, entries // 2), np.full(entries - entries // 2, 17)]))
    segment_ids = tf.constant(segments, tf.int32)
    expected = tf.sparse.segment_sum(data, indices, segment_ids, num_segments=45)
    np.testing.assert_allclose(_segment_sum(data, indices, segment_ids, tf.constant(45)).numpy(), expected.numpy(),
                               rtol=1e-6, atol=1e-6)


def test_embedding_bag_handles_int32_row_splits_and_trailing_empty_rows() -> None:
    bag = EmbeddingBag(5, 2, combiner="sum", init_stddev=0.1)
    ids = tf.RaggedTensor.from_row_splits(tf.constant([3], tf.int64), tf.constant([0, 1, 1, 1], tf.int32))
    counts = tf.RaggedTensor.from_row_splits(tf.constant([1.0]), tf.constant([0, 1, 1, 1], tf.int32))
    out = bag(ids, counts).numpy()
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out[0], bag.table.numpy()[3])
    np.testing.assert_array_equal(out[1:], 0.0)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_embedding_bag_gradient_matches_dense_autodiff(combiner: str) -> None:
    """The hand-written pooling gradient equals autodiff through a dense count-matrix formulation."""
    rng = np.random.default_rng(0)
    tf.keras.utils.set_random_seed(0)
    bag = EmbeddingBag(50, 4, combiner=combiner, init_stddev=0.1)
    ids = tf.ragged.constant([[3, 7, 1], [7], [], [49, 3, 0, 12], [1, 2]], dtype=tf.int64)
    counts = tf.ragged.constant([[1.0, 2.0, 1.0], [3.0], [], [1.0, 1.0, 2.0, 1.0], [1.0, 4.0]])
    bag(ids, counts)
    upstream = tf.constant(rng.normal(size=(5, 4)), tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(bag(ids, counts) * upstream)
    grad = tape.gradient(loss, bag.table)
    assert isinstance(grad, tf.IndexedSlices)
    dense_counts = np.zeros((5, 50), np.float32)
    for r, (row_ids, row_counts) in enumerate(zip(ids.to_list(), counts.to_list(), strict=True)):
        dense_counts[r, row_ids] = row_counts
    total = dense_counts.sum(1, keepdims=True)
    scale = {"sum": np.ones_like(total), "mean": np.maximum(total, 1), "sqrtn": np.maximum(np.sqrt(total), 1)}
    weights = tf.constant(dense_counts / scale[combiner])
    table = tf.Variable(bag.table.numpy())
    with tf.GradientTape() as tape:
        reference = tf.reduce_sum(tf.matmul(weights, table) * upstream)
    # A sum of signed products: compare with an absolute floor, it can land near zero.
    np.testing.assert_allclose(float(loss), float(reference), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tf.convert_to_tensor(grad).numpy(), tape.gradient(reference, table).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_embedding_gradient_is_sparse_over_the_batch_ids() -> None:
    model = DSSMModel(SMALL, feature_config=FEATURES)
    batch = _batch(model, QUERIES, DOCUMENTS, [f"d{i}" for i in range(5)])
    with tf.GradientTape() as tape:
        loss = model.compute_loss(batch, training=True)
    table = model.query_tower.bag.table
    grad = tape.gradient(loss, table)
    assert isinstance(grad, tf.IndexedSlices)
    used = set(np.concatenate([batch["query_ids"].flat_values.numpy(), batch["document_ids"].flat_values.numpy()]))
    assert set(grad.indices.numpy()) == used
    assert len(used) < FEATURES.num_buckets // 10


def test_towers_output_unit_vectors_and_embed_texts_matches_bags() -> None:
    model = DSSMModel(SMALL, feature_config=FEATURES)
    texts = QUERIES + ["", "🙂 ¿qué?"]
    emb = model.embed_queries(tf.constant(texts)).numpy()
    assert emb.shape == (len(texts), SMALL.output_dim) and emb.dtype == np.float32
    norms = np.linalg.norm(emb, axis=1)
    np.testing.assert_allclose(norms[:5], 1.0, rtol=1e-5)
    assert np.isfinite(emb).all()
    ids, counts = model.featurizer.bags(tf.constant(texts))
    np.testing.assert_allclose(model.query_tower((ids, counts)).numpy(), emb, atol=1e-6)


def test_shared_and_separate_towers() -> None:
    shared = DSSMModel(SMALL, feature_config=FEATURES)
    assert shared.query_tower is shared.document_tower
    np.testing.assert_array_equal(shared.embed_queries(tf.constant(QUERIES)).numpy(),
                                  shared.embed_documents(tf.constant(QUERIES)).numpy())

    separate = DSSMModel(dataclasses.replace(SMALL, shared_towers=False), feature_config=FEATURES)
    assert separate.query_tower is not separate.document_tower
    q = separate.embed_queries(tf.constant(QUERIES)).numpy()
    d = separate.embed_documents(tf.constant(QUERIES)).numpy()
    assert not np.allclose(q, d, atol=1e-3)
    separate(_batch(separate, QUERIES, DOCUMENTS))
    shared(_batch(shared, QUERIES, DOCUMENTS))
    assert len(separate.trainable_variables) == 2 * len(shared.trainable_variables)


def test_loss_is_in_batch_softmax_with_temperature() -> None:
    model = DSSMModel(dataclasses.replace(SMALL, temperature=0.2), feature_config=FEATURES)
    batch = _batch(model, QUERIES, DOCUMENTS, [f"d{i}" for i in range(5)])
    q, d = (t.numpy() for t in model(batch))
    loss = float(model.compute_loss(batch))
    assert loss == pytest.approx(_softmax_ce(q @ d.T / 0.2), rel=1e-5)


def test_accidental_hits_are_masked_not_negatives() -> None:
    model = DSSMModel(SMALL, feature_config=FEATURES)
    # Rows 0 and 3 share a document id: for row 0, column 3 must not be a negative (and vice versa).
    ids = ["a", "b", "c", "a", "e"]
    batch = _batch(model, QUERIES, DOCUMENTS, ids)
    q, d = (t.numpy() for t in model(batch))
    scores = q @ d.T / SMALL.temperature
    mask = np.ones((5, 5), bool)
    mask[0, 3] = mask[3, 0] = False
    assert float(model.compute_loss(batch)) == pytest.approx(_softmax_ce(scores, mask), rel=1e-5)
    unmasked = DSSMModel(dataclasses.replace(SMALL, remove_accidental_hits=False), feature_config=FEATURES)
    unmasked(batch)
    unmasked.set_weights(model.get_weights())
    assert float(unmasked.compute_loss(batch)) == pytest.approx(_softmax_ce(scores), rel=1e-5)


def test_explicit_negatives_are_extra_columns_and_empty_ones_are_ignored() -> None:
    model = DSSMModel(SMALL, feature_config=FEATURES)
    batch = _batch(model, QUERIES, DOCUMENTS, [f"d{i}" for i in range(5)])
    negatives = ["python snakes in the zoo", "", "gain weight quickly", "", "the sea is blue"]
    n_ids, n_counts = model.featurizer.bags(tf.constant(negatives))
    batch.update(negative_ids=n_ids, negative_counts=n_counts,
                 negative_id=tf.constant([f"n{i}" for i in range(5)]))
    q, d = (t.numpy() for t in model(batch))
    n = model.document_tower((n_ids, n_counts)).numpy()
    scores = q @ np.concatenate([d, n]).T / SMALL.temperature
    mask = np.ones((5, 10), bool)
    mask[:, [6, 8]] = False  # rows 1 and 3 have no negative
    assert float(model.compute_loss(batch)) == pytest.approx(_softmax_ce(scores, mask), rel=1e-5)


def test_model_config_rejects_bad_values() -> None:
    for bad in ({"temperature": 0.0}, {"activation": "sigmoidish"}, {"hidden_dims": (10, 0)},
                {"dropout": 1.0}, {"bag_combiner": "max"}, {"embedding_dim": 0}, {"loss": "sofmax"}):
        with pytest.raises(ConfigError, match=str(list(bad.values())[0]).split(",")[0].strip("()")):
            ModelConfig(**bad)


LOSS_QUERIES = QUERIES + ["how do i learn java", "what is the capital of spain"]
LOSS_DOCUMENTS = DOCUMENTS + ["java tutorial for beginners", "madrid is the capital of spain"]


def _with_labels(batch: dict, labels: list[float]) -> dict:
    return {**batch, "label": tf.constant(labels, tf.float32)}


def test_identical_texts_are_accidental_hits_even_with_different_ids() -> None:
    model = DSSMModel(SMALL, feature_config=FEATURES)
    # Documents 1 and 4 are the same text up to case and punctuation (same bag), under different ids.
    documents = list(DOCUMENTS)
    documents[4] = "Paris is the capital of France!"
    batch = _batch(model, QUERIES, documents, [f"d{i}" for i in range(5)])
    q, d = (t.numpy() for t in model(batch))
    mask = np.ones((5, 5), bool)
    mask[1, 4] = mask[4, 1] = False
    assert float(model.compute_loss(batch)) == pytest.approx(_softmax_ce(q @ d.T / SMALL.temperature, mask), rel=1e-5)
    # Without document ids the bags alone still mask them.
    no_ids = {k: v for k, v in batch.items() if k != "document_id"}
    assert float(model.compute_loss(no_ids)) == pytest.approx(_softmax_ce(q @ d.T / SMALL.temperature, mask),
                                                              rel=1e-5)


def test_bag_keys_ignore_entry_order_and_tell_bags_apart() -> None:
    from dssm.bags import bag_keys

    ids = tf.ragged.constant([[3, 9, 12], [12, 3, 9], [3, 9, 12], [3, 9], [3, 9, 13], [], []], dtype=tf.int64)
    counts = tf.ragged.constant([[1.0, 2.0, 1.0], [1.0, 1.0, 2.0], [2.0, 1.0, 1.0], [1.0, 2.0], [1.0, 2.0, 1.0],
                                 [], []])
    keys = bag_keys(ids, counts).numpy()
    assert keys.dtype == np.int64 and (keys >= 0).all()
    assert keys[0] == keys[1]  # same (id, count) entries in another order
    assert keys[5] == keys[6]  # two empty bags
    assert len({keys[0], keys[2], keys[3], keys[4], keys[5]}) == 5  # other counts, fewer ids, another id, empty


def test_score_matrix_losses_are_the_loss_functions_on_the_models_scores() -> None:
    from dssm.score_losses import circle_loss, hard_negative_loss, triplet_loss

    config = LossConfig(margin=0.3, circle_gamma=8.0)
    ids = ["a", "b", "c", "a", "e"]  # rows 0 and 3 share a document: masked for every loss
    for name, fn in (("triplet", lambda s, m: triplet_loss(s, margin=0.3, score_mask=m)),
                     ("hard-negative", lambda s, m: hard_negative_loss(s, margin=0.3, score_mask=m)),
                     ("circle", lambda s, m: circle_loss(s, gamma=8.0, score_mask=m))):
        model = DSSMModel(dataclasses.replace(SMALL, loss=name), feature_config=FEATURES, loss_config=config)
        batch = _batch(model, QUERIES, DOCUMENTS, ids)
        q, d = (t.numpy() for t in model(batch))
        mask = np.ones((5, 5), bool)
        mask[0, 3] = mask[3, 0] = False
        expected = float(fn(tf.constant(q @ d.T), tf.constant(mask)))
        assert float(model.compute_loss(batch)) == pytest.approx(expected, rel=1e-5), name


def test_logq_correction_subtracts_log_document_frequency() -> None:

    model = DSSMModel(SMALL, feature_config=FEATURES, loss_config=LossConfig(logq_correction=True))
    batch = _batch(model, QUERIES, DOCUMENTS, [f"d{i}" for i in range(5)])
    # d0 in 4 of 10 training pairs, d1 in 1, d2 in 2; d3 and d4 unseen (counted as once).
    model.set_sampling_probabilities(["d0"] * 4 + ["d1"] + ["d2"] * 2 + ["x", "y", "z"])
    p = np.array([0.4, 0.1, 0.2, 0.1, 0.1])
    q, d = (t.numpy() for t in model(batch))
    expected = _softmax_ce(q @ d.T / SMALL.temperature - np.log(p)[None, :])
    assert float(model.compute_loss(batch)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="logq_correction"):
        DSSMModel(SMALL, feature_config=FEATURES).set_sampling_probabilities(["d0"])
    with pytest.raises(ConfigError, match="logq_correction is not available for loss 'triplet'"):
        DSSMModel(dataclasses.replace(SMALL, loss="triplet"), feature_config=FEATURES,
                  loss_config=LossConfig(logq_correction=True))


def test_cosent_model_loss_ranks_pair_cosines_by_label() -> None:
    # A non-default scale, so the test also fails if LossConfig.cosent_scale stops reaching the loss.
    model = DSSMModel(dataclasses.replace(SMALL, loss="cosent"), feature_config=FEATURES,
                      loss_config=LossConfig(cosent_scale=20.0))
    labels = [5.0, 0.0, 3.2, 1.0, 0.0]
    batch = _with_labels(_batch(model, QUERIES, DOCUMENTS), labels)
    q, d = (t.numpy() for t in model(batch))
    cos = np.sum(q * d, axis=1)
    terms = [20.0 * (cos[i] - cos[j]) for i in range(5) for j in range(5) if labels[i] < labels[j]]
    expected = np.log1p(np.sum(np.exp(terms)))
    assert float(model.compute_loss(batch)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="'label'"):
        model.compute_loss(_batch(model, QUERIES, DOCUMENTS))


def test_softmax_plus_cosent_is_the_positives_softmax_plus_weighted_cosent() -> None:
    """Hand-computed: softmax rows only for label > 0 (summed, divided by the whole batch), a label-0
    row's document still a negative of the others, plus cosent_weight x CoSENT over every pair."""
    model = DSSMModel(dataclasses.replace(SMALL, loss="softmax+cosent", temperature=0.2), feature_config=FEATURES,
                      loss_config=LossConfig(cosent_scale=7.0, cosent_weight=0.3))
    labels = [1.0, 0.0, 1.0, 1.0, 0.0]
    batch = _with_labels(_batch(model, QUERIES, DOCUMENTS, [f"d{i}" for i in range(5)]), labels)
    q, d = (t.numpy().astype(np.float64) for t in model(batch))
    scores = q @ d.T / 0.2
    softmax_sum = sum(-(scores[i, i] - np.log(np.sum(np.exp(scores[i])))) for i in range(5) if labels[i] > 0)
    cos = np.sum(q * d, axis=1)
    terms = [7.0 * (cos[i] - cos[j]) for i in range(5) for j in range(5) if labels[i] < labels[j]]
    expected = softmax_sum / 5 + 0.3 * np.log1p(np.sum(np.exp(terms)))
    assert float(model.compute_loss(batch)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="'label'"):
        model.compute_loss(_batch(model, QUERIES, DOCUMENTS))
    with pytest.raises(ConfigError, match="cosent_weight must be > 0"):
        LossConfig(cosent_weight=0.0)


def test_classifier_head_is_cross_entropy_on_u_v_and_their_difference() -> None:
    model = DSSMModel(dataclasses.replace(SMALL, loss="classifier"), feature_config=FEATURES)
    labels = [1.0, 0.0, 1.0, 0.0, 0.0]
    batch = _with_labels(_batch(model, QUERIES, DOCUMENTS), labels)
    loss = float(model.compute_loss(batch))
    q, d = (t.numpy() for t in model(batch))
    kernel, bias = (w.numpy() for w in model.classifier.dense.weights)
    logits = np.concatenate([q, d, np.abs(q - d)], axis=1) @ kernel + bias
    log_softmax = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    assert loss == pytest.approx(-np.mean(log_softmax[np.arange(5), np.array(labels, int)]), rel=1e-5)
    assert {id(v) for v in model.classifier.trainable_variables} <= {id(v) for v in model.trainable_variables}


def test_simcse_views_differ_by_dropout_and_repeated_texts_are_masked() -> None:
    from dssm.model import SIMCSE_DEFAULT_DROPOUT

    with pytest.raises(ConfigError, match="simcse needs dropout > 0"):
        DSSMModel(dataclasses.replace(SMALL, loss="simcse"), feature_config=FEATURES)
    config, notes = apply_loss_defaults(dataclasses.replace(SMALL, loss="simcse"))
    assert config.dropout == SIMCSE_DEFAULT_DROPOUT and "dropout" in notes[0]
    assert apply_loss_defaults(dataclasses.replace(SMALL, loss="simcse", dropout=0.3)) == (
        dataclasses.replace(SMALL, loss="simcse", dropout=0.3), [])
    assert apply_loss_defaults(SMALL) == (SMALL, [])

    model = DSSMModel(dataclasses.replace(SMALL, loss="simcse", dropout=0.2), feature_config=FEATURES)
    queries = QUERIES + [QUERIES[0]]  # a repeated text: not a negative of its twin
    batch = _batch(model, queries, queries)  # documents are ignored by simcse
    q = model.embed_queries(tf.constant(queries)).numpy()
    mask = np.ones((6, 6), bool)
    mask[0, 5] = mask[5, 0] = False
    # Without dropout (evaluation) both views are the same vectors.
    # abs: the loss is a float32 difference of log-sum-exps of logits up to 1/temperature = 10,
    # whose rounding (~1e-6) is a large share of a loss near 1e-3
    assert float(model.compute_loss(batch)) == pytest.approx(_softmax_ce(q @ q.T / SMALL.temperature, mask),
                                                             rel=1e-5, abs=1e-5)
    tf.keras.utils.set_random_seed(3)
    trained = [float(model.compute_loss(batch, training=True)) for _ in range(2)]
    assert trained[0] != trained[1]  # fresh dropout masks every call
    assert all(t > float(model.compute_loss(batch)) for t in trained)  # views that differ score lower


def _loss_batch(model: DSSMModel, loss: str) -> dict:
    batch = _batch(model, LOSS_QUERIES, LOSS_DOCUMENTS, [f"d{i}" for i in range(len(LOSS_QUERIES))])
    if loss == "contrastive":
        negatives = ["python snakes in the zoo", "", "gain weight quickly", "rice pudding recipe", "",
                     "coffee in java", "barcelona football club"]
        n_ids, n_counts = model.featurizer.bags(tf.constant(negatives))
        batch.update(negative_ids=n_ids, negative_counts=n_counts, negative_id=tf.constant(negatives))
    if loss in ("cosent", "classifier"):
        # Swap two documents so the batch holds non-duplicates (label 0) beside duplicates.
        docs = list(LOSS_DOCUMENTS)
        docs[1], docs[3] = docs[3], docs[1]
        batch = _with_labels(_batch(model, LOSS_QUERIES, docs), [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    return batch


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["softmax", "triplet", "hard-negative", "cosent", "circle", "contrastive", "simcse",
                                  "classifier"])
def test_every_loss_trains(loss: str, tmp_path) -> None:
    """A few optimizer steps on one small batch lower each loss; the two losses that change what is
    exported (simcse: dropout must be off at serving; classifier: its head must stay out) export and load."""
    from dssm.export import export_model, load_encoder
    from dssm.train import TrainConfig, build_model

    tf.keras.utils.set_random_seed(0)
    config, _ = apply_loss_defaults(dataclasses.replace(SMALL, loss=loss))
    train_config = TrainConfig(learning_rate=0.1)
    model = build_model(config, FEATURES, train_config, loss_config=LossConfig(circle_gamma=32.0))
    batch = _loss_batch(model, loss)
    before = float(model.compute_loss(batch))
    for _ in range(15):
        model.train_step(batch)
    after = float(model.compute_loss(batch))
    assert np.isfinite(after) and after < 0.8 * before, (before, after)
    if loss not in ("simcse", "classifier"):
        return
    out = export_model(model, tmp_path / "model", train_config=train_config)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["loss"] == loss and saved["loss"]["circle_gamma"] == 32.0
    encoder = load_encoder(out)
    np.testing.assert_allclose(encoder.embed_queries(LOSS_QUERIES), model.embed_queries(tf.constant(LOSS_QUERIES)),
                               atol=1e-5)
    np.testing.assert_allclose(encoder.embed_documents(LOSS_DOCUMENTS),
                               model.embed_documents(tf.constant(LOSS_DOCUMENTS)), atol=1e-5)
    # The SavedModel holds exactly the (shared) tower's variables: the Sentence-BERT head is never exported.
    saved_shapes = sorted(shape for name, shape in tf.train.list_variables(
        str(out / "saved_model" / "variables" / "variables")) if "VARIABLE_VALUE" in name)
    assert saved_shapes == sorted(v.shape.as_list() for v in model.query_tower.variables)
    if loss == "classifier":
        assert [v.shape.as_list() for v in model.classifier.variables] == [[3 * SMALL.output_dim, 2], [2]]


def test_lazy_adam_updates_only_touched_rows() -> None:
    table = tf.Variable(tf.ones([6, 2]))
    reference = tf.Variable(tf.ones([6, 2]))
    lazy, adam = LazyAdam(0.1), tf.keras.optimizers.Adam(0.1)
    first = tf.IndexedSlices(tf.constant([[1.0, -2.0], [0.5, 0.5]]), tf.constant([1, 3]), tf.constant([6, 2]))
    lazy.apply_gradients([(first, table)])
    adam.apply_gradients([(first, reference)])
    # Step 1 is identical to Adam: untouched rows have zero moments either way.
    np.testing.assert_allclose(table.numpy(), reference.numpy(), rtol=1e-6)
    second = tf.IndexedSlices(tf.constant([[1.0, 1.0]]), tf.constant([4]), tf.constant([6, 2]))
    before = table.numpy()
    lazy.apply_gradients([(second, table)])
    adam.apply_gradients([(second, reference)])
    after = table.numpy()
    np.testing.assert_array_equal(after[[0, 1, 2, 3, 5]], before[[0, 1, 2, 3, 5]])  # rows 1, 3 keep still
    assert not np.allclose(reference.numpy()[1], before[1])  # dense Adam keeps moving them on momentum
    np.testing.assert_allclose(after[4], reference.numpy()[4], rtol=1e-6)


def test_sparse_adagrad_matches_the_adagrad_formula_on_touched_rows() -> None:
    table = tf.Variable(tf.ones([5, 2]))
    optimizer = SparseAdagrad(0.5)
    grad = tf.IndexedSlices(tf.constant([[1.0, -2.0], [0.5, 0.0]]), tf.constant([3, 0]), tf.constant([5, 2]))
    optimizer.apply_gradients([(grad, table)])
    accumulator = 0.1 + np.array([[0.25, 0.0], [1.0, 4.0]])  # Keras' initial_accumulator_value is 0.1
    expected = np.ones((5, 2), np.float32)
    expected[[0, 3]] -= 0.5 * np.array([[0.5, 0.0], [1.0, -2.0]]) / (np.sqrt(accumulator) + 1e-7)
    np.testing.assert_allclose(table.numpy(), expected, rtol=1e-6)
    # Repeated rows (a model that gathers a table twice) are summed first, as Keras does.
    twice = tf.IndexedSlices(tf.constant([[1.0, 1.0], [1.0, 1.0]]), tf.constant([2, 2]), tf.constant([5, 2]))
    once = tf.IndexedSlices(tf.constant([[2.0, 2.0]]), tf.constant([2]), tf.constant([5, 2]))
    a, b = tf.Variable(tf.ones([5, 2])), tf.Variable(tf.ones([5, 2]))
    SparseAdagrad(0.5).apply_gradients([(twice, a)])
    SparseAdagrad(0.5).apply_gradients([(once, b)])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_rowwise_adagrad_keeps_one_accumulator_per_table_row() -> None:
    model = DSSMModel(SMALL, feature_config=FEATURES)
    batch = _batch(model, QUERIES, DOCUMENTS, [f"d{i}" for i in range(5)])
    model(batch)
    optimizer = RowwiseAdagrad(0.5)
    table = model.query_tower.bag.table
    dense = model.query_tower.hidden[0].kernel
    optimizer.build(model.trainable_variables)
    accumulators = {id(v): a for v, a in zip(model.trainable_variables, optimizer._accumulators, strict=True)}
    assert accumulators[id(table)].shape == (FEATURES.num_buckets,)
    assert accumulators[id(dense)].shape == dense.shape  # dense layers: ordinary Adagrad
    grad = tf.IndexedSlices(tf.constant([[0.2] * 16, [1.0] * 8 + [-1.0] * 8]), tf.constant([7, 2]),
                            tf.constant(table.shape))
    before = table.numpy()
    optimizer.apply_gradients([(grad, table)])
    after = table.numpy()
    acc = 0.1 + np.array([0.04, 1.0])  # initial value + mean of the squared row gradient
    np.testing.assert_allclose(after[[7, 2]], before[[7, 2]] - 0.5 * grad.values.numpy() / np.sqrt(acc)[:, None],
                               rtol=1e-5)
    untouched = np.setdiff1d(np.arange(FEATURES.num_buckets), [2, 7])
    np.testing.assert_array_equal(after[untouched], before[untouched])


_MIRRORED = textwrap.dedent("""
    import dssm, json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from dssm.features import FeatureConfig
    from dssm.model import DSSMModel, ModelConfig
    config = ModelConfig(embedding_dim=16, hidden_dims=(12, 8), temperature=0.1)
    features = FeatureConfig(num_buckets=4096)
    texts = json.loads(sys.argv[1])
    ids = ["a", "b", "c", "a", "e", "f"]
    def batch(model, lo, hi):
        q = model.featurizer.bags(tf.constant(texts[0][lo:hi]))
        d = model.featurizer.bags(tf.constant(texts[1][lo:hi]))
        n = model.featurizer.bags(tf.constant(texts[2][lo:hi]))
        return {"query_ids": q[0], "query_counts": q[1], "document_ids": d[0], "document_counts": d[1],
                "document_id": tf.constant(ids[lo:hi]), "negative_ids": n[0], "negative_counts": n[1]}
    tf.keras.utils.set_random_seed(1)
    single = DSSMModel(config, feature_config=features)
    single_loss = float(single.compute_loss(batch(single, 0, 6)))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = DSSMModel(config, feature_config=features)
        mirrored(batch(mirrored, 0, 6))
    single(batch(single, 0, 6))
    mirrored.set_weights(single.get_weights())
    before = [v.numpy() for v in single.trainable_variables]
    halves = [batch(mirrored, 0, 3), batch(mirrored, 3, 6)]
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: halves[ctx.replica_id_in_sync_group])
    losses = strategy.run(lambda b: mirrored.compute_loss(b, training=False), args=(per_replica,))
    total = float(strategy.reduce("SUM", losses, axis=None))
    # One optimizer step each: gradients flow back through all_gather and are summed over replicas.
    from dssm.optim import RowwiseAdagrad
    single.compile(optimizer=RowwiseAdagrad(0.5))
    with strategy.scope():
        mirrored.compile(optimizer=RowwiseAdagrad(0.5))
    single.train_step(batch(single, 0, 6))
    tf.function(lambda b: strategy.run(mirrored.train_step, args=(b,)))(per_replica)
    after = [v.numpy() for v in single.trainable_variables]
    diff = max(float(np.max(np.abs(a - b.numpy()))) for a, b in zip(after, mirrored.trainable_variables))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(after, before))
    print(json.dumps({"single": single_loss, "mirrored": total, "replicas": strategy.num_replicas_in_sync,
                      "weight_diff": diff, "moved": moved}))
""")


@pytest.mark.slow
def test_mirrored_strategy_sees_the_global_batch() -> None:
    """Two logical CPUs under MirroredStrategy give the same loss and update as one device on the whole batch.

    This is the GPU code path (all-gather of candidates, rotation so the diagonal stays the positive,
    division by the global batch) run on CPU devices, in a subprocess because logical devices must be
    configured before TensorFlow initialises.
    """
    import json

    texts = [QUERIES + ["how tall is everest"], DOCUMENTS + ["height of mount everest"],
             ["snakes", "", "gain weight", "rice pudding", "", "k2 height"]]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", _MIRRORED, json.dumps(texts)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["mirrored"] == pytest.approx(result["single"], rel=1e-5)
    assert result["moved"] > 1e-3  # the step changed the weights...
    assert result["weight_diff"] < 1e-5  # ...identically on one device and on two replicas
