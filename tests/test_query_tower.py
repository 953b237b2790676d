"""QueryTower: the numpy forward pass of the exported query tower equals the SavedModel's embed_query."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import dssm  # noqa: F401
from dssm.artifacts import write_manifest
from dssm.errors import ConfigError
from dssm.export import FAST_QUERY_MAX_TEXTS, QueryTower, export_model, load_encoder
from dssm.features import FeatureConfig
from dssm.model import DSSMModel, ModelConfig
from dssm.train import TrainConfig, build_model

import tensorflow as tf  # noqa: E402  isort: skip

FEATURES = FeatureConfig(num_buckets=2048, max_chars=60)
TRAIN = TrainConfig(epochs=1, batch_size=32, verbose=0)
QUERIES = ["how do I learn python", "what is the best way to lose weight", "Why is the sky blue?",
           "C++ vs. Java: which is faster?", "a", "1 2 3 4", "UPPER lower MiXeD", "x" * 90 + " tail"]
DOCUMENTS = ["learning python from books", "diet and exercise", "rayleigh scattering of light",
             "benchmarks of compiled languages", "the letter a", "counting numbers", "case folding", "long"]
ASCII = QUERIES + DOCUMENTS + ["", "!!!", "\x00\x07 control\x7f", "  spaced   out  ", "tab\tnew\nline"]
NON_ASCII = ["café au lait", "ＨＥＬＬＯ", "emoji 🙂"]
DECLINED = "a letter newer than Python's Unicode tables: \u0cf3"

# Every combiner and activation, shared and separate towers, and a tower with no dense layers.
CONFIGS = {
    "sum-tanh-shared": ModelConfig(embedding_dim=16, hidden_dims=(16, 8)),
    "mean-relu-separate": ModelConfig(embedding_dim=16, hidden_dims=(12, 8), activation="relu",
                                      bag_combiner="mean", shared_towers=False),
    "sqrtn-gelu-shared": ModelConfig(embedding_dim=16, hidden_dims=(8,), activation="gelu", bag_combiner="sqrtn"),
    "sum-linear-separate-no-dense": ModelConfig(embedding_dim=8, hidden_dims=(), activation="linear",
                                                shared_towers=False),
}


def _trained(config: ModelConfig) -> DSSMModel:
    """A model after a few optimizer steps, so the biases are not zero and the towers differ."""
    model = build_model(config, FEATURES, TRAIN)
    q_ids, q_counts = model.featurizer.bags(tf.constant(QUERIES))
    d_ids, d_counts = model.featurizer.bags(tf.constant(DOCUMENTS))
    batch = {"query_ids": q_ids, "query_counts": q_counts, "document_ids": d_ids, "document_counts": d_counts}
    for _ in range(3):
        model.train_step(batch)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(_trained(CONFIGS[request.param]), tmp_path_factory.mktemp("query_tower") / "model",
                        train_config=TRAIN)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(_trained(CONFIGS["mean-relu-separate"]), tmp_path_factory.mktemp("small") / "model",
                        train_config=TRAIN)


@pytest.mark.slow
def test_numpy_tower_equals_the_signature(exported: Path) -> None:
    encoder = load_encoder(exported)
    assert encoder.query_tower is not None
    expected = encoder._embed(encoder._embed_query, ASCII)  # the SavedModel's embed_query signature
    got = np.concatenate([encoder.query_tower.embed([text]) for text in ASCII])
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Several texts in one call give the same rows; so does a numpy copy of the table.
    np.testing.assert_allclose(encoder.query_tower.embed(ASCII[:5]), expected[:5], atol=1e-5)
    copied = QueryTower.from_loaded(encoder._loaded, features=encoder.features, model=encoder.model, copy_table=True)
    assert isinstance(copied.table, np.ndarray) and not isinstance(encoder.query_tower.table, np.ndarray)
    np.testing.assert_allclose(copied.embed(ASCII), expected, atol=1e-5)
    if not encoder.model.shared_towers:  # it is the query tower, not the document tower
        documents = encoder.embed_documents(ASCII)
        assert not np.allclose(got, documents, atol=1e-3)


def test_embed_queries_takes_the_numpy_path_for_few_ascii_texts(small_model: Path) -> None:
    encoder = load_encoder(small_model)
    expected = encoder._embed(encoder._embed_query, QUERIES[:3] + NON_ASCII)
    calls = []
    signature = encoder._embed_query

    def counting(texts: tf.Tensor) -> tf.Tensor:
        calls.append(texts.shape[0])
        return signature(texts)

    encoder._embed_query = counting
    np.testing.assert_allclose(encoder.embed_queries(QUERIES[:1]), expected[:1], atol=1e-5)
    np.testing.assert_allclose(encoder.embed_queries(QUERIES[:3]), expected[:3], atol=1e-5)
    assert calls == []
    # Non-ASCII text is hashed in Python too; a text Python declines (a code point newer than its
    # Unicode tables) sends the whole call to the signature, and so does a batch above the limit.
    np.testing.assert_allclose(encoder.embed_queries([QUERIES[0], NON_ASCII[0]]), expected[[0, 3]], atol=1e-5)
    np.testing.assert_allclose(encoder.query_tower.embed(NON_ASCII), expected[3:], atol=1e-5)
    assert calls == []
    assert encoder.query_tower.embed([DECLINED]) is None
    encoder.embed_queries([QUERIES[0], DECLINED])
    encoder.embed_queries(ASCII[:FAST_QUERY_MAX_TEXTS + 1])
    assert calls == [2, FAST_QUERY_MAX_TEXTS + 1]


def test_the_numpy_path_is_off_when_asked_or_for_mixed_precision(small_model: Path, tmp_path: Path) -> None:
    assert load_encoder(small_model, fast_queries=False).query_tower is None
    # A model trained in mixed precision computes in bfloat16: float32 numpy would not match it.
    copy = tmp_path / "model"
    shutil.copytree(small_model, copy)
    config = json.loads((copy / "config.json").read_text())
    config["train"]["mixed_precision"] = True
    (copy / "config.json").write_text(json.dumps(config))
    write_manifest(copy, kind="model", extra={"dim": config["model"]["hidden_dims"][-1]})
    encoder = load_encoder(copy)
    assert encoder.query_tower is None
    assert encoder.embed_queries(QUERIES[:1]).shape == (1, encoder.dim)


def test_weights_that_do_not_fit_the_config_are_refused() -> None:
    config = ModelConfig(embedding_dim=4, hidden_dims=(3,))
    features = dataclasses.replace(FEATURES, num_buckets=10)
    good = {"table": np.zeros((10, 4), np.float32), "bias": np.zeros(4, np.float32),
            "layers": [(np.zeros((4, 3), np.float32), np.zeros(3, np.float32))]}
    QueryTower(**good, features=features, model=config)
    QueryTower(**{**good, "table": tf.Variable(good["table"])}, features=features, model=config)
    with pytest.raises(ConfigError, match="float64"):
        QueryTower(**{**good, "table": tf.Variable(np.zeros((10, 4)))}, features=features, model=config)
    with pytest.raises(ConfigError, match=r"\(10, 5\)"):
        QueryTower(**{**good, "table": np.zeros((10, 5), np.float32)}, features=features, model=config)
    with pytest.raises(ConfigError, match="float64"):
        QueryTower(**{**good, "bias": np.zeros(4)}, features=features, model=config)
    with pytest.raises(ConfigError, match=r"\(4, 3\)"):
        QueryTower(**{**good, "layers": []}, features=features, model=config)
