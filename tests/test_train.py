"""Training: shard input, a loss that goes down on real Quora pairs, seeding, CLI errors."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import dssm  # noqa: F401
from dssm.artifacts import write_manifest
from dssm.config import save_config
from dssm.errors import ChecksumError, ConfigError, InputError
from dssm.features import FeatureConfig, Featurizer
from dssm.model import ModelConfig
from dssm.train import (
    TrainConfig,
    build_model,
    count_pairs,
    has_negatives,
    main,
    make_dataset,
    pair_files,
    select_strategy,
    train,
)

import tensorflow as tf  # noqa: E402  isort: skip

FEATURES = FeatureConfig(num_buckets=4096)
SMALL = ModelConfig(embedding_dim=32, hidden_dims=(32, 16))
FAST = TrainConfig(epochs=3, batch_size=64, learning_rate=0.1, verbose=0)


def quora_pairs(quora_dir: Path, n: int) -> list[tuple[str, str, float]]:
    """The first ``n`` rows of quora-dev's pairs.tsv as ``(text1, text2, is_duplicate)``."""
    with open(quora_dir / "pairs.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["text1"], r["text2"], float(r["is_duplicate"])) for r in rows[:n]]


def write_pair_shards(directory: Path, pairs: list[tuple[str, str, float]], *, features: FeatureConfig = FEATURES,
                      validation_every: int = 5, shards: int = 2, negatives: list[str] | None = None) -> Path:
    """A minimal ``dssm pairs`` output: shards in docs/design.md's Example format, features.json, manifest.

    Every ``validation_every``-th pair goes to the validation split. ``negatives`` (one text per pair,
    "" for none) adds the ``negative_*`` features as ``dssm pairs --negatives-as-third-input`` writes them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    featurizer = Featurizer(features)
    queries = featurizer.bags_numpy([p[0] for p in pairs])
    documents = featurizer.bags_numpy([p[1] for p in pairs])
    negative_bags = featurizer.bags_numpy(negatives) if negatives is not None else None
    splits: dict[str, list[bytes]] = {"train": [], "validation": []}
    for i, ((query, document, label), (q_ids, q_counts), (d_ids, d_counts)) in enumerate(
            zip(pairs, queries, documents, strict=True)):
        feature = {
            "query_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"q{i}".encode()])),
            "document_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[document[:40].encode()])),
            "query_text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[query.encode()])),
            "document_text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[document.encode()])),
            "label": tf.train.Feature(float_list=tf.train.FloatList(value=[label])),
            "query_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=q_ids)),
            "query_counts": tf.train.Feature(float_list=tf.train.FloatList(value=q_counts)),
            "document_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=d_ids)),
            "document_counts": tf.train.Feature(float_list=tf.train.FloatList(value=d_counts)),
        }
        if negatives is not None:
            n_ids, n_counts = negative_bags[i] if negatives[i] else ([], [])
            feature.update(
                negative_id=tf.train.Feature(bytes_list=tf.train.BytesList(value=[negatives[i][:40].encode()])),
                negative_text=tf.train.Feature(bytes_list=tf.train.BytesList(value=[negatives[i].encode()])),
                negative_ids=tf.train.Feature(int64_list=tf.train.Int64List(value=n_ids)),
                negative_counts=tf.train.Feature(float_list=tf.train.FloatList(value=n_counts)))
        example = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
        splits["validation" if i % validation_every == validation_every - 1 else "train"].append(example)
    for split, records in splits.items():
        for shard in range(shards):
            path = directory / f"{split}-{shard:05d}-of-{shards:05d}.tfrecord.gz"
            with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
                for record in records[shard::shards]:
                    writer.write(record)
    save_config(features, directory / "features.json")
    write_manifest(directory, kind="pairs")
    return directory


@pytest.fixture(scope="module")
def quora_shards(quora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pair_shards(tmp_path_factory.mktemp("pairs"), quora_pairs(quora_dir, 1000))


def test_dataset_keeps_positive_pairs_in_batches(quora_dir: Path, quora_shards: Path) -> None:
    pairs = quora_pairs(quora_dir, 1000)
    train_files = pair_files(quora_shards, "train")
    assert len(train_files) == 2
    expected = sum(1 for i, p in enumerate(pairs) if p[2] > 0 and i % 5 != 4)
    assert count_pairs(train_files, min_label=0.0) == expected
    ds = make_dataset(train_files, batch_size=50, training=False, config=FAST)
    batches = list(ds)
    assert sum(int(tf.shape(b["label"])[0]) for b in batches) == expected
    assert all(float(tf.reduce_min(b["label"])) > 0 for b in batches)
    first = batches[0]
    assert isinstance(first["query_ids"], tf.RaggedTensor) and first["query_ids"].dtype == tf.int64
    assert first["document_counts"].dtype == tf.float32
    # Bags read back equal the featurizer's output for the same text.
    featurizer = Featurizer(FEATURES)
    positives = [p for i, p in enumerate(pairs) if p[2] > 0 and i % 5 != 4 and i % 2 == 0]
    ids, _ = featurizer.bags_numpy([positives[0][0]])[0]
    assert any(np.array_equal(ids, row) for row in first["query_ids"].numpy())


@pytest.mark.slow
def test_training_lowers_the_loss_on_quora_pairs(quora_shards: Path) -> None:
    model, history = train(quora_shards, model_config=SMALL, train_config=FAST)
    assert len(history["loss"]) == FAST.epochs
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert all(v > 0 for v in history["pairs_per_sec"])
    # The trained model ranks a duplicate above unrelated questions more often than chance.
    q = model.embed_queries(tf.constant(["how do i lose weight fast"])).numpy()
    d = model.embed_documents(tf.constant(["what is the fastest way to lose weight", "how do i learn java",
                                           "who will win the us election"])).numpy()
    scores = (q @ d.T)[0]
    assert scores[0] == scores.max()


def test_one_train_step_lowers_the_loss_on_that_batch(quora_dir: Path) -> None:
    pairs = [p for p in quora_pairs(quora_dir, 400) if p[2] > 0][:64]
    model = build_model(SMALL, FEATURES, TrainConfig())
    featurizer = model.featurizer
    q_ids, q_counts = featurizer.bags(tf.constant([p[0] for p in pairs]))
    d_ids, d_counts = featurizer.bags(tf.constant([p[1] for p in pairs]))
    batch = {"query_ids": q_ids, "query_counts": q_counts, "document_ids": d_ids, "document_counts": d_counts,
             "document_id": tf.constant([p[1] for p in pairs])}
    before = float(model.compute_loss(batch))
    model.train_step(batch)
    after = float(model.compute_loss(batch))
    assert after < 0.95 * before


@pytest.mark.slow
def test_explicit_negatives_are_read_and_trained_on(quora_dir: Path, tmp_path: Path) -> None:
    pairs = quora_pairs(quora_dir, 600)
    # Quora's non-duplicates as negatives of the next positive pair (every third one left empty).
    non_duplicates = [p[1] for p in pairs if p[2] == 0]
    negatives = ["" if i % 3 == 0 else non_duplicates[i % len(non_duplicates)] for i in range(len(pairs))]
    shards = write_pair_shards(tmp_path / "pairs", pairs, negatives=negatives)
    files = pair_files(shards, "train")
    assert has_negatives(files) and not has_negatives(pair_files(write_pair_shards(tmp_path / "plain", pairs[:20]),
                                                                  "train"))
    batch = next(iter(make_dataset(files, batch_size=32, training=False, config=FAST, negatives=True)))
    lengths = batch["negative_ids"].row_lengths().numpy()
    assert (lengths == 0).any() and (lengths > 0).any()
    model, history = train(shards, model_config=SMALL, train_config=FAST)
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    # The negatives really enter the loss: the same batch scores higher without them.
    with_negatives = float(model.compute_loss(batch))
    without = float(model.compute_loss({k: v for k, v in batch.items() if not k.startswith("negative")}))
    assert with_negatives > without


@pytest.mark.slow
def test_training_is_repeatable_with_a_seed(quora_shards: Path) -> None:
    config = dataclasses.replace(FAST, epochs=1, validation=False)
    _, first = train(quora_shards, model_config=SMALL, train_config=config)
    _, second = train(quora_shards, model_config=SMALL, train_config=config)
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6)


@pytest.mark.parametrize("optimizer", ["lazy_adam", "sgd"])
def test_other_optimizers_train(quora_shards: Path, optimizer: str) -> None:
    lr = {"lazy_adam": 0.01, "sgd": 1.0}[optimizer]
    config = dataclasses.replace(FAST, epochs=2, validation=False, optimizer=optimizer, learning_rate=lr)
    _, history = train(quora_shards, model_config=SMALL, train_config=config)
    assert history["loss"][-1] < history["loss"][0]


def test_mixed_precision_builds_bfloat16_towers_on_cpu_and_restores_the_policy(quora_shards: Path) -> None:
    config = dataclasses.replace(FAST, epochs=1, validation=False, mixed_precision=True)
    model, history = train(quora_shards, model_config=SMALL, train_config=config)
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    assert model.query_tower.hidden[0].compute_dtype == "bfloat16"
    assert model.query_tower.bag.table.dtype == tf.float32
    assert model.embed_queries(tf.constant(["hello"])).dtype == tf.float32
    assert np.isfinite(history["loss"]).all()


@pytest.mark.slow
def test_xla_flag_compiles_the_dense_layers_and_the_export_still_loads(quora_shards: Path, tmp_path: Path) -> None:
    from dssm.export import export_model, load_encoder

    config = dataclasses.replace(FAST, epochs=2, validation=False, xla=True)
    model, history = train(quora_shards, model_config=SMALL, train_config=config)
    assert model.query_tower.jit_dense and history["loss"][-1] < history["loss"][0]
    texts = ["how do i lose weight", "best python book"]
    export_model(model, tmp_path / "model", train_config=config)
    np.testing.assert_allclose(load_encoder(tmp_path / "model").embed_queries(texts),
                               model.embed_queries(tf.constant(texts)).numpy(), atol=1e-5)


def test_cpu_uses_the_default_strategy() -> None:
    assert select_strategy().num_replicas_in_sync == 1


def test_input_errors(tmp_path: Path, quora_dir: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        train(tmp_path / "missing", model_config=SMALL, train_config=FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="features.json"):
        train(empty, model_config=SMALL, train_config=FAST)
    save_config(FEATURES, empty / "features.json")
    with pytest.raises(InputError, match="no train-"):
        train(empty, model_config=SMALL, train_config=FAST)
    negatives = [p for p in quora_pairs(quora_dir, 50) if p[2] == 0]
    only_negative = write_pair_shards(tmp_path / "neg", negatives)
    with pytest.raises(InputError, match="0 pairs with label > 0"):
        train(only_negative, model_config=SMALL, train_config=FAST)


def test_corrupted_shard_is_refused(tmp_path: Path, quora_dir: Path) -> None:
    shards = write_pair_shards(tmp_path / "pairs", quora_pairs(quora_dir, 40))
    path = pair_files(shards, "train")[0]
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="train-00000"):
        train(shards, model_config=SMALL, train_config=FAST)


def test_train_config_rejects_bad_values() -> None:
    for bad in ({"epochs": 0}, {"batch_size": 1}, {"learning_rate": -1.0}, {"optimizer": "adamw"}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


@pytest.mark.slow
def test_cli_trains_and_exports(quora_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    argv = ["--pairs", str(quora_shards), "--output", str(out), "--epochs", "1", "--batch-size", "64",
            "--embedding-dim", "16", "--hidden-dims", "16", "8", "--no-shared-towers", "--verbose", "0"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["shared_towers"] is False and config["model"]["hidden_dims"] == [16, 8]
    assert config["train"]["epochs"] == 1 and config["features"]["num_buckets"] == FEATURES.num_buckets
    assert set(json.loads((out / "history.json").read_text())) >= {"loss", "val_loss", "pairs_per_sec"}
    with pytest.raises(InputError, match="exists"):
        main(argv)
    with pytest.raises(InputError, match="not found"):
        main(["--pairs", str(tmp_path / "nope"), "--output", str(tmp_path / "m2")])
