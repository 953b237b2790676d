"""Shard-and-merge: ``dssm index --shard i/N`` per shard, :class:`ShardedSearcher` fans out and merges top-k."""

from __future__ import annotations

import numpy as np
import pytest
from apache_beam.testing import test_pipeline

from dssm import index as ix
from dssm.errors import ConfigError, InputError
from pipelines import encode_corpus as ec
from serving.searcher import Hit, Searcher, ShardedSearcher, merge_top_k


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class VectorEncoder:
    """Query 'texts' are row numbers of a query matrix (the searcher's own logic, no model)."""

    def __init__(self, queries: np.ndarray):
        self.queries = queries

    def embed_queries(self, texts):
        return self.queries[[int(t) for t in texts]]


def test_shard_of_is_stable_and_balanced():
    assert ix.shard_of("doc-1", 1) == 0
    assert [ix.shard_of(f"d{i}", 4) for i in range(5)] == [ix.shard_of(f"d{i}", 4) for i in range(5)]
    counts = np.bincount([ix.shard_of(f"d{i}", 2) for i in range(10_000)], minlength=2)
    assert abs(int(counts[0]) - 5000) < 300
    assert ix.parse_shard_spec(" 1/2 ") == (1, 2)
    for bad in ("2/2", "a/b", "1", "-1/2"):
        with pytest.raises(ConfigError, match="i/N"):
            ix.parse_shard_spec(bad)


def test_merge_top_k_by_score():
    a = [Hit("a1", 0.9, ""), Hit("a2", 0.5, "")]
    b = [Hit("b1", 0.7, ""), Hit("b2", 0.6, "")]
    assert [h.id for h in merge_top_k([a, b], 3)] == ["a1", "b1", "b2"]


@pytest.mark.parametrize("mode", ["brute_force", "tree_ah"])
def test_two_shards_merge_to_the_single_index_results(tmp_path, mode):
    n, dim, k = 6000, 32, 10
    matrix = clustered(n, dim, 30, seed=0)
    ids = [f"d{i}" for i in range(n)]
    config = ix.ScannConfig(mode=mode, num_leaves=40 if mode == "tree_ah" else 0, min_recall=0.97)
    ix.build_index(tmp_path / "single", embeddings=matrix, ids=ids, texts=ids, config=config)
    for shard in range(2):
        rows = [i for i in range(n) if ix.shard_of(ids[i], 2) == shard]
        ix.build_index(tmp_path / f"shard{shard}", embeddings=matrix[rows], ids=[ids[i] for i in rows],
                       texts=[ids[i] for i in rows], config=config)
    rng = np.random.default_rng(3)
    queries = matrix[rng.choice(n, 200, replace=False)] + 0.1 * rng.standard_normal((200, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    encoder = VectorEncoder(queries)
    single = Searcher.load(tmp_path / "single", encoder=encoder)
    sharded = ShardedSearcher.load([tmp_path / "shard0", tmp_path / "shard1"], encoder=encoder)
    assert len(sharded) == n and sorted(len(s) for s in sharded.shards) != [0, n]
    texts = [str(i) for i in range(len(queries))]
    got = sharded.search_batch(texts, k)
    want = single.search_batch(texts, k)
    exact = np.argsort(-(queries @ matrix.T), axis=1)[:, :k]
    truth = [{ids[j] for j in row} for row in exact]
    recall = np.mean([len({h.id for h in g} & t) / k for g, t in zip(got, truth, strict=True)])
    agree = np.mean([len({h.id for h in g} & {h.id for h in w}) / k for g, w in zip(got, want, strict=True)])
    if mode == "brute_force":  # exact on both sides: the same hits, same scores, same order
        assert [[h.id for h in g] for g in got] == [[h.id for h in w] for w in want]
        np.testing.assert_allclose([[h.score for h in g] for g in got], [[h.score for h in w] for w in want],
                                   atol=1e-5)
    assert recall >= 0.95 and agree >= 0.95
    assert [h.id for h in sharded.search("7", k=3)] == [h.id for h in got[7][:3]]
    with pytest.raises(InputError, match="hybrid"):
        sharded.search("1", mode="hybrid")
    assert sharded.get_document("d42").text == "d42"
    with pytest.raises(KeyError):
        sharded.get_document("nope")


def test_index_job_shards_and_sharded_search_on_adi(tiny_model_dir, adi_dir, tmp_path):
    full = ec.run(["--model", str(tiny_model_dir), "--corpus", str(adi_dir), "--output", str(tmp_path / "full")],
                  test_pipeline=test_pipeline.TestPipeline())
    counts = []
    for shard in range(2):
        summary = ec.run(["--model", str(tiny_model_dir), "--corpus", str(adi_dir), "--output",
                          str(tmp_path / f"s{shard}"), "--shard", f"{shard}/2"],
                         test_pipeline=test_pipeline.TestPipeline())
        counts.append(summary["documents"])
        index = ix.load_index(tmp_path / f"s{shard}")
        assert index.manifest["shard"]["index"] == shard and index.manifest["shard"]["count"] == 2
        assert all(ix.shard_of(doc.id, 2) == shard for _, doc in index.docs.iter_all())
    assert sum(counts) == full["documents"] == 82 and min(counts) > 0

    single = Searcher.load(tmp_path / "full")
    sharded = ShardedSearcher.load([tmp_path / "s0", tmp_path / "s1"])
    queries = ["information retrieval systems", "automatic indexing of documents", "library automation"]
    # Brute force below 20k documents: merged shard results are exactly the single index's.
    # (the single index answers in hybrid mode by default; shards are dense: compare dense with dense)
    for got, want in zip(sharded.search_batch(queries, 10), single.search_batch(queries, 10, mode="dense"),
                         strict=True):
        assert [h.id for h in got] == [h.id for h in want]
    bm25 = sharded.search("information retrieval", k=5, mode="bm25")
    assert len(bm25) == 5 and bm25 == sorted(bm25, key=lambda h: -h.score)
    # Writes go to the id's hash shard.
    sharded.upsert([("new-doc", "", "sharded upsert of a document about zebra telemetry")])
    owner = ix.shard_of("new-doc", 2)
    assert ix.load_index(tmp_path / f"s{owner}").docs.row_of("new-doc") is not None
    assert ix.load_index(tmp_path / f"s{1 - owner}").docs.row_of("new-doc") is None
    again = ShardedSearcher.load([tmp_path / "s0", tmp_path / "s1"])
    own_text = "sharded upsert of a document about zebra telemetry"
    assert again.search(own_text, k=1)[0].id == "new-doc" and len(again) == 83
    again.delete(["new-doc"])
    assert len(ShardedSearcher.load([tmp_path / "s0", tmp_path / "s1"])) == 82
    with pytest.raises(InputError, match="twice"):
        ShardedSearcher.load([tmp_path / "s0", tmp_path / "s0"])
