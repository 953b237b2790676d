"""Topic-aware batches (``--topic-batches``, dssm.topics): clusters of lexically close pairs, one per batch."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest

import dssm  # noqa: F401
from dssm.errors import ConfigError
from dssm.features import FeatureConfig, Featurizer
from dssm.inputs import make_dataset, pair_files
from dssm.topics import topic_clusters, topic_order
from dssm.train import TrainConfig, train
from tests.test_train import SMALL, quora_pairs, write_pair_shards

import tensorflow as tf  # noqa: E402  isort: skip

FEATURES = FeatureConfig(num_buckets=4096)
CONFIG = TrainConfig(epochs=2, batch_size=20, verbose=0, topic_batches=True)
TOPICS = {
    "fruit": "apple banana cherry mango orange pear plum grape lemon melon peach kiwi",
    "kernel": "linux kernel driver module interrupt scheduler memory page syscall firmware",
    "music": "guitar piano violin drum melody chord rhythm tempo orchestra concert",
    "ocean": "whale shark coral reef tide wave dolphin octopus seaweed plankton",
}


def _topic_pairs(per_topic: int, seed: int = 0) -> tuple[list[tuple[str, str, float]], list[str]]:
    """``per_topic`` pairs of each topic: a query of 3 of its words, a document of 6 others."""
    rng = np.random.default_rng(seed)
    pairs, labels = [], []
    for name, words in TOPICS.items():
        vocabulary = words.split()
        for _ in range(per_topic):
            chosen = rng.permutation(vocabulary)
            pairs.append((" ".join(chosen[:3]), " ".join(chosen[3:9]), 1.0))
            labels.append(name)
    return pairs, labels


def _table(pairs: list[tuple[str, str, float]]) -> dict[str, tf.RaggedTensor]:
    featurizer = Featurizer(FEATURES)
    table = {}
    for side, column in (("query", 0), ("document", 1)):
        ids, counts = featurizer.bags(tf.constant([p[column] for p in pairs]))
        table[f"{side}_ids"], table[f"{side}_counts"] = ids, counts
    return table


def test_clusters_gather_pairs_of_one_topic() -> None:
    pairs, labels = _topic_pairs(25)
    clusters = topic_clusters(_table(pairs), batch_size=25, seed=0).numpy()
    assert clusters.shape == (100,) and clusters.dtype == np.int64
    assert 0 <= clusters.min() and clusters.max() < 4  # n / batch_size clusters
    # Pairs of one topic share a cluster; pairs of two topics almost never do.
    same = [clusters[i] == clusters[j] for i, j in itertools.combinations(range(100), 2) if labels[i] == labels[j]]
    other = [clusters[i] == clusters[j] for i, j in itertools.combinations(range(100), 2) if labels[i] != labels[j]]
    assert np.mean(same) > 0.9 and np.mean(other) < 0.05
    again = topic_clusters(_table(pairs), batch_size=25, seed=0).numpy()
    np.testing.assert_array_equal(clusters, again)  # seeded: the same pairs give the same clusters


def test_one_cluster_when_there_are_fewer_pairs_than_a_batch() -> None:
    pairs, _ = _topic_pairs(3)
    assert set(topic_clusters(_table(pairs), batch_size=256, seed=0).numpy()) == {0}


def test_topic_order_is_a_permutation_with_each_cluster_contiguous() -> None:
    clusters = tf.constant(np.random.default_rng(1).integers(0, 7, size=200), tf.int64)
    orders = {}
    for seed in (11, 12):
        order = topic_order(clusters, seed=seed).numpy()
        assert sorted(order) == list(range(200))
        runs = [key for key, _ in itertools.groupby(clusters.numpy()[order])]
        assert len(runs) == len(set(runs)) == 7  # each cluster one run
        orders[seed] = order
    np.testing.assert_array_equal(orders[11], topic_order(clusters, seed=11).numpy())
    assert not np.array_equal(orders[11], orders[12])  # another epoch, another order (of clusters and within)


def test_epochs_of_topic_batches_hold_every_pair_once_and_one_topic_per_batch(tmp_path: Path) -> None:
    pairs, labels = _topic_pairs(20)
    files = pair_files(write_pair_shards(tmp_path / "pairs", pairs, features=FEATURES, validation_every=1000,
                                         shards=2), "train")
    topic_of = {p[0]: label for p, label in zip(pairs, labels, strict=True)}
    featurizer = Featurizer(FEATURES)
    key_of = {tuple(featurizer.bags(tf.constant([q]))[0].to_list()[0]): q for q, _, _ in pairs}
    batches = list(make_dataset(files, batch_size=20, training=True, config=CONFIG, epochs=(0, 2)))
    assert len(batches) == 8 and "topic_cluster" not in batches[0]
    queries = [[key_of[tuple(row)] for row in batch["query_ids"].to_list()] for batch in batches]
    for epoch in (queries[:4], queries[4:]):
        assert sorted(q for batch in epoch for q in batch) == sorted(p[0] for p in pairs)
    purity = np.mean([max(np.unique([topic_of[q] for q in batch], return_counts=True)[1]) / len(batch)
                      for batch in queries])
    assert purity > 0.9  # random batches of 4 topics: about 0.4
    assert queries[:4] != queries[4:]


def test_topic_batches_are_closer_than_random_ones_on_real_questions(tmp_path: Path, quora_dir: Path) -> None:
    pairs = [(q, d, 1.0) for q, d, _ in quora_pairs(quora_dir, 600)]
    files = pair_files(write_pair_shards(tmp_path / "pairs", pairs, features=FEATURES, validation_every=10_000,
                                         shards=2), "train")

    def shared_buckets(config: TrainConfig) -> float:
        """Mean share of document buckets two documents of one batch have in common (Jaccard)."""
        scores = []
        for batch in make_dataset(files, batch_size=50, training=True, config=config):
            bags = [set(row) for row in batch["document_ids"].to_list()]
            scores += [len(a & b) / len(a | b) for a, b in itertools.combinations(bags, 2)]
        return float(np.mean(scores))

    topical, random = shared_buckets(dataclasses.replace(CONFIG, batch_size=50)), shared_buckets(
        dataclasses.replace(CONFIG, batch_size=50, topic_batches=False))
    assert topical > 1.15 * random  # 1.24x at these seeds (idf-weighted cosine: 1.26x)


def test_topic_batches_need_the_in_memory_pairs(tmp_path: Path) -> None:
    pairs, _ = _topic_pairs(5)
    files = pair_files(write_pair_shards(tmp_path / "pairs", pairs, features=FEATURES, validation_every=1000), "train")
    with pytest.raises(ConfigError, match="topic_batches"):
        make_dataset(files, batch_size=10, training=True, config=dataclasses.replace(CONFIG, cache=False))


def test_the_trainer_learns_from_topic_batches(tmp_path: Path, quora_dir: Path) -> None:
    pairs = [(q, d, 1.0) for q, d, _ in quora_pairs(quora_dir, 500)]
    shards = write_pair_shards(tmp_path / "pairs", pairs, validation_every=5)
    config = TrainConfig(epochs=3, batch_size=32, learning_rate=0.1, verbose=0, topic_batches=True)
    _, history = train(shards, model_config=SMALL, train_config=config)
    assert history["loss"][-1] < 0.8 * history["loss"][0] and history["val_loss"][-1] < history["val_loss"][0]
