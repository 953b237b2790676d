"""Export → load round trips: the SavedModel embeds raw strings exactly like the in-memory model."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import dssm  # noqa: F401
from dssm.errors import ChecksumError, IndexNotFoundError, InputError
from dssm.export import SAVED_MODEL, export_model, load_encoder, read_model_configs
from dssm.features import FeatureConfig
from dssm.model import DSSMModel, ModelConfig
from dssm.train import TrainConfig, build_model

import tensorflow as tf  # noqa: E402  isort: skip

FEATURES = FeatureConfig(num_buckets=4096)
SMALL = ModelConfig(embedding_dim=16, hidden_dims=(16, 8))
TRAIN = TrainConfig(epochs=1, batch_size=32, verbose=0)
EXTRA_TEXTS = ["", "   ", "ÉCOLE Straße ﬁne", "🙂🙂 emoji", "עברית ימין לשמאל", "a" * 5000, "\x00\x07 control"]


def _texts(quora_dir: Path, n: int) -> tuple[list[str], list[str]]:
    with open(quora_dir / "pairs.tsv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)][:n]
    return [r["text1"] for r in rows], [r["text2"] for r in rows]


def _trained(config: ModelConfig, queries: list[str], documents: list[str]) -> DSSMModel:
    """A model after a few real optimizer steps (so biases and tables are not at their init)."""
    model = build_model(config, FEATURES, TRAIN)
    q_ids, q_counts = model.featurizer.bags(tf.constant(queries))
    d_ids, d_counts = model.featurizer.bags(tf.constant(documents))
    batch = {"query_ids": q_ids, "query_counts": q_counts, "document_ids": d_ids, "document_counts": d_counts}
    for _ in range(3):
        model.train_step(batch)
    return model


@pytest.fixture(scope="module")
def exported(quora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[DSSMModel, Path, list[str]]:
    queries, documents = _texts(quora_dir, 40)
    model = _trained(dataclasses.replace(SMALL, shared_towers=False), queries, documents)
    model_dir = export_model(model, tmp_path_factory.mktemp("export") / "model", train_config=TRAIN,
                             history={"loss": [1.0]})
    return model, model_dir, queries + documents + EXTRA_TEXTS


def test_round_trip_gives_identical_embeddings_for_both_towers(exported: tuple) -> None:
    model, model_dir, texts = exported
    encoder = load_encoder(model_dir)
    assert encoder.dim == SMALL.output_dim
    for in_memory, loaded in ((model.embed_queries, encoder.embed_queries),
                              (model.embed_documents, encoder.embed_documents)):
        expected = in_memory(tf.constant(texts)).numpy()
        got = loaded(texts)
        assert got.dtype == np.float32 and got.shape == (len(texts), SMALL.output_dim)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # Separate towers: the two signatures really are different functions.
    assert not np.allclose(encoder.embed_queries(texts[:5]), encoder.embed_documents(texts[:5]), atol=1e-3)


def test_signatures_take_raw_strings(exported: tuple) -> None:
    import tensorflow_text  # noqa: F401

    _, model_dir, texts = exported
    loaded = tf.saved_model.load(str(model_dir / SAVED_MODEL))
    assert set(loaded.signatures) == {"embed_query", "embed_document"}
    for name in ("embed_query", "embed_document"):
        signature = loaded.signatures[name]
        spec = signature.structured_input_signature[1]["texts"]
        assert spec.dtype == tf.string and spec.shape.as_list() == [None]
        out = signature(texts=tf.constant(texts[:3]))
        assert set(out) == {"embedding"} and out["embedding"].shape == (3, SMALL.output_dim)
        np.testing.assert_allclose(np.linalg.norm(out["embedding"].numpy(), axis=1), 1.0, rtol=1e-5)


def test_encoder_batches_internally_and_handles_empty_input(exported: tuple) -> None:
    _, model_dir, texts = exported
    whole = load_encoder(model_dir).embed_queries(texts)
    chunked = load_encoder(model_dir, batch_size=3).embed_queries(texts)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    empty = load_encoder(model_dir).embed_documents([])
    assert empty.shape == (0, SMALL.output_dim)
    with pytest.raises(InputError, match="single str"):
        load_encoder(model_dir).embed_queries("one string, not a list")


def test_model_directory_layout_and_configs(exported: tuple) -> None:
    model, model_dir, _ = exported
    assert {p.name for p in model_dir.iterdir()} == {SAVED_MODEL, "config.json", "history.json", "manifest.json"}
    features, model_config, train_config = read_model_configs(model_dir)
    assert features == FEATURES and model_config == model.config
    assert train_config["batch_size"] == TRAIN.batch_size
    assert json.loads((model_dir / "history.json").read_text()) == {"loss": [1.0]}
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["kind"] == "model" and manifest["dim"] == SMALL.output_dim
    assert any(name.startswith(f"{SAVED_MODEL}/variables/") for name in manifest["files"])


def test_shared_tower_export_has_one_table(quora_dir: Path, tmp_path: Path) -> None:
    queries, documents = _texts(quora_dir, 20)
    model = _trained(SMALL, queries, documents)
    model_dir = export_model(model, tmp_path / "model", train_config=TRAIN)
    encoder = load_encoder(model_dir)
    np.testing.assert_allclose(encoder.embed_queries(queries), encoder.embed_documents(queries), atol=1e-6)
    np.testing.assert_allclose(encoder.embed_queries(queries), model.embed_queries(tf.constant(queries)).numpy(),
                               atol=1e-5)
    stored = tf.train.list_variables(str(model_dir / SAVED_MODEL / "variables" / "variables"))
    tables = [name for name, shape in stored if tuple(shape) == (FEATURES.num_buckets, SMALL.embedding_dim)]
    assert len(tables) == 1, stored


def test_corrupted_or_missing_files_are_refused(exported: tuple, tmp_path: Path) -> None:
    import shutil

    _, model_dir, _ = exported
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    data_file = next((copy / SAVED_MODEL / "variables").glob("variables.data-*"))
    blob = bytearray(data_file.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    data_file.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError, match="variables.data"):
        load_encoder(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(IndexNotFoundError, match="manifest.json"):
        load_encoder(copy)
    with pytest.raises(IndexNotFoundError):
        load_encoder(tmp_path / "does-not-exist")


def test_export_refuses_to_overwrite_unless_asked(exported: tuple, tmp_path: Path) -> None:
    model, _, texts = exported
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("user file")
    with pytest.raises(InputError, match="exists"):
        export_model(model, target, train_config=TRAIN)
    export_model(model, target, train_config=TRAIN, overwrite=True)
    assert not (target / "keep.txt").exists()
    np.testing.assert_allclose(load_encoder(target).embed_queries(texts[:4]),
                               model.embed_queries(tf.constant(texts[:4])).numpy(), atol=1e-5)
