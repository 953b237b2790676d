"""Searcher with the numpy query tower (the default) answers like the SavedModel signature path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dssm  # noqa: F401
from dssm import index as ix
from dssm.data import iter_corpus
from dssm.export import export_model
from dssm.features import FeatureConfig
from dssm.model import ModelConfig
from dssm.train import TrainConfig, build_model
from serving.searcher import Searcher

import tensorflow as tf  # noqa: E402  isort: skip

QUERIES = ["computer indexing", "information retrieval systems", "What is a thesaurus?", "x", "2 3 4 automatic",
           "ÉCOLE documentation"]  # the last is not ASCII: the signature serves it


@pytest.fixture(scope="module")
def index_dir(adi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    docs = list(iter_corpus(adi_dir / "corpus.jsonl"))
    train = TrainConfig(epochs=1, batch_size=32, verbose=0)
    model = build_model(ModelConfig(embedding_dim=16, hidden_dims=(16, 8), bag_combiner="sqrtn"),
                        FeatureConfig(num_buckets=2048), train)
    texts = tf.constant([d.text for d in docs[:32]])
    ids, counts = model.featurizer.bags(texts)
    model.train_step({"query_ids": ids, "query_counts": counts, "document_ids": ids, "document_counts": counts})
    work = tmp_path_factory.mktemp("fast_searcher")
    model_dir = export_model(model, work / "model", train_config=train)
    ix.build_index_from_documents(work / "idx", model_dir=model_dir, documents=docs, progress=False)
    return work / "idx"


def test_fast_and_signature_searchers_give_the_same_hits(index_dir: Path) -> None:
    fast = Searcher.load(index_dir)
    slow = Searcher.load(index_dir, fast_queries=False)
    assert fast.encoder.query_tower is not None and slow.encoder.query_tower is None
    assert type(fast.encoder).__name__ == "NumpyQueryEncoder" and not fast.encoder.graph_loaded
    for query in QUERIES:
        got, expected = fast.search(query, k=5), slow.search(query, k=5)
        np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=1e-5)
        assert [h.id for h in got] == [h.id for h in expected], query
    np.testing.assert_allclose(fast.similarity(QUERIES[0], QUERIES[1]).cosine,
                               slow.similarity(QUERIES[0], QUERIES[1]).cosine, atol=1e-5)
