"""Hybrid retrieval: normalisation and convex fusion by hand, weight tuning, BM25 state in the index,
and Searcher modes dense / bm25 / hybrid on a real tiny index (adi, the tiny trained model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dssm import index as ix
from dssm.artifacts import read_manifest
from dssm.bm25 import BM25_DIR, BM25Index, has_bm25_state, load_bm25_state
from dssm.data import document_text, read_beir
from dssm.errors import ChecksumError, ConfigError, IndexNotFoundError, InputError
from dssm.hybrid import (
    HYBRID_FILE,
    HybridConfig,
    convex_fusion,
    fuse_scores,
    normalize_scores,
    read_hybrid_config,
    tune_weight,
)

# -------------------------------------------------------------------------------- hand-computed fusion
#
# dense  a 0.9  b 0.5  c 0.1   -> min-max a 1, b 0.5, c 0
# sparse a 0    b 10   c 5     -> min-max a 0, b 1,   c 0.5
# w = 0.5: a 0.5, b 0.75, c 0.25 -> b a c;   w = 0.8: a 0.8, b 0.6, c 0.1 -> a b c
# z-score: dense mean 0.5, std sqrt(0.32/3); sparse mean 5, std sqrt(50/3):
#   a (1.2247, -1.2247), b (0, 1.2247), c (-1.2247, 0) -> w = 0.5: a 0, b 0.6124, c -0.6124 -> b a c

DENSE = {"q": {"a": 0.9, "b": 0.5, "c": 0.1}}
SPARSE = {"q": {"a": 0.0, "b": 10.0, "c": 5.0}}


def test_normalize_scores_hand_values():
    assert normalize_scores(np.array([0.9, 0.5, 0.1])) == pytest.approx([1.0, 0.5, 0.0])
    z = math.sqrt(1.5)  # 0.4 / sqrt(0.32 / 3)
    assert normalize_scores(np.array([0.9, 0.5, 0.1]), "zscore") == pytest.approx([z, 0.0, -z])
    assert normalize_scores(np.array([2.0, 2.0]), "minmax").tolist() == [0.0, 0.0]  # constant: no information
    assert normalize_scores(np.array([2.0, 2.0]), "zscore").tolist() == [0.0, 0.0]
    assert normalize_scores(np.array([])).size == 0
    # a matrix is normalised per row, each row as the 1-d call would
    rows = np.array([[0.9, 0.5, 0.1], [2.0, 2.0, 2.0], [3.0, 1.0, 2.0]])
    assert normalize_scores(rows).tolist() == [[1.0, 0.5, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.5]]
    np.testing.assert_allclose(normalize_scores(rows, "zscore")[0], [z, 0.0, -z])
    with pytest.raises(ConfigError, match="'l2'"):
        normalize_scores(np.array([1.0]), "l2")


def test_convex_fusion_minmax_hand_example():
    fused = convex_fusion(DENSE, SPARSE, weight=0.5, k=10)
    assert [d for d, _ in fused["q"]] == ["b", "a", "c"]
    assert [s for _, s in fused["q"]] == pytest.approx([0.75, 0.5, 0.25])
    fused = convex_fusion(DENSE, SPARSE, weight=0.8, k=2)
    assert fused["q"] == [("a", pytest.approx(0.8)), ("b", pytest.approx(0.6))]
    # The extremes reproduce each system's own order.
    assert [d for d, _ in convex_fusion(DENSE, SPARSE, weight=1.0, k=3)["q"]] == ["a", "b", "c"]
    assert [d for d, _ in convex_fusion(DENSE, SPARSE, weight=0.0, k=3)["q"]] == ["b", "c", "a"]


def test_convex_fusion_zscore_hand_example():
    fused = convex_fusion(DENSE, SPARSE, weight=0.5, k=10, normalization="zscore")
    z = math.sqrt(1.5) / 2
    assert fused["q"] == [("b", pytest.approx(z)), ("a", pytest.approx(0.0, abs=1e-12)), ("c", pytest.approx(-z))]


def test_convex_fusion_fills_a_missing_side_with_its_lowest_score():
    # dense a .9 b .5 (c filled .5) -> a 1 b 0 c 0; sparse c 3 b 1 (a filled 1) -> a 0 b 0 c 1.
    fused = convex_fusion({"q": {"a": 0.9, "b": 0.5}}, {"q": {"c": 3.0, "b": 1.0}, "r": {}}, weight=0.5, k=10)
    assert fused["q"] == [("a", 0.5), ("c", 0.5), ("b", 0.0)]  # a/c tie broken by id
    assert fused["r"] == []


def test_fuse_scores_checks_arguments():
    with pytest.raises(ConfigError, match="1.5"):
        fuse_scores(np.zeros(2), np.zeros(2), weight=1.5)
    with pytest.raises(ConfigError, match="align"):
        fuse_scores(np.zeros(2), np.zeros(3), weight=0.5)
    with pytest.raises(ConfigError):
        HybridConfig(normalization="rank")


def test_tune_weight_picks_the_best_and_breaks_ties_towards_the_middle():
    best, curve = tune_weight(lambda w: -(w - 0.3) ** 2)
    assert best == pytest.approx(0.3) and len(curve) == 21 and curve[0.3] == pytest.approx(0.0)
    assert tune_weight(lambda w: 1.0)[0] == 0.5
    assert tune_weight(lambda w: 1.0 if w in (0.4, 0.6) else 0.0)[0] == 0.4
    with pytest.raises(ConfigError):
        tune_weight(lambda w: 0.0, grid=[])


# ------------------------------------------------------------------------------ BM25 state round trip


def test_bm25_state_round_trip_without_pickle(tmp_path, adi_dir):
    adi = read_beir(adi_dir)
    ids = list(adi.corpus)
    texts = [document_text(adi.corpus[i].title, adi.corpus[i].text) for i in ids]
    built = BM25Index.build(ids, texts)
    built.save(tmp_path / "bm25")
    for path in (tmp_path / "bm25").iterdir():
        if path.suffix == ".npy":
            np.load(path, allow_pickle=False)  # raises if the array needed pickle
        else:
            json.loads(path.read_text())
    loaded = BM25Index.load(tmp_path / "bm25", ids=ids)
    queries = list(adi.queries.values())
    assert loaded.search_batch(queries, k=20) == built.search_batch(queries, k=20)
    assert np.array_equal(loaded.scores(queries[0]), built.scores(queries[0]))
    rows_only = BM25Index.load(tmp_path / "bm25")
    assert [r.tolist() for r, _ in rows_only.search_rows_batch(queries[:3], k=5)] == \
        [[ids.index(d) for d, _ in hits] for hits in built.search_batch(queries[:3], k=5)]
    with pytest.raises(ConfigError, match="without document ids"):
        rows_only.search_batch(queries[:1])
    with pytest.raises(ChecksumError, match="82 documents, 2 ids"):
        BM25Index.load(tmp_path / "bm25", ids=["a", "b"])
    with pytest.raises(IndexNotFoundError):
        BM25Index.load(tmp_path / "nothing")


def test_bm25_of_a_corpus_without_terms_scores_zero():
    index = BM25Index.build(["a", "b"], ["the of", "!!"])
    assert index.search("anything", k=2) == [] and index.scores("the").tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- Searcher on a tiny index


@pytest.fixture(scope="module")
def adi(adi_dir):
    return read_beir(adi_dir)


@pytest.fixture(scope="module")
def adi_index(tiny_model_dir, adi, tmp_path_factory):
    from dssm.export import load_encoder

    ids = list(adi.corpus)
    docs = [adi.corpus[i] for i in ids]
    embeddings = load_encoder(tiny_model_dir).embed_documents([document_text(d.title, d.text) for d in docs])
    index_dir = tmp_path_factory.mktemp("hybrid") / "index"
    ix.build_index(index_dir, embeddings=embeddings, ids=ids, texts=[d.text for d in docs],
                   titles=[d.title for d in docs], model_dir=tiny_model_dir)
    return index_dir


@pytest.fixture(scope="module")
def searcher(adi_index):
    from serving.searcher import Searcher

    return Searcher.load(adi_index)


def test_index_build_writes_bm25_state_under_the_manifest(adi_index, adi):
    version = ix.current_version_dir(adi_index)
    assert has_bm25_state(version)
    listed = read_manifest(version)["files"]
    assert {f"{BM25_DIR}/{name}" for name in ("params.json", "vocab.json", "data.npy", "indices.npy",
                                               "indptr.npy")} <= set(listed)
    assert load_bm25_state(version).size == len(adi.corpus)


def test_bm25_mode_equals_bm25_over_the_corpus(searcher, adi):
    ids = list(adi.corpus)
    reference = BM25Index.build(ids, [document_text(adi.corpus[i].title, adi.corpus[i].text) for i in ids])
    query = adi.queries["1"]
    hits = searcher.search(query, k=10, mode="bm25")
    expected = reference.search(query, k=10)
    assert [h.id for h in hits] == [d for d, _ in expected]
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected], rel=1e-6)
    assert hits[0].text == adi.corpus[hits[0].id].text


def test_hybrid_mode_fuses_and_its_extremes_reproduce_each_system(searcher, adi_index, adi):
    from dssm.index import publish_index_files
    from serving.searcher import Searcher

    query = adi.queries["5"]
    hybrid = searcher.search(query, k=10, mode="hybrid")
    assert searcher.hybrid_config == HybridConfig() and searcher.supports_hybrid
    assert len(hybrid) == 10 and hybrid[0].score <= 1.0 + 1e-9
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
    dense = searcher.search(query, k=10)
    sparse = searcher.search(query, k=10, mode="bm25")
    # The fused list draws on both systems.
    assert {h.id for h in hybrid} & {h.id for h in dense} and {h.id for h in hybrid} & {h.id for h in sparse}

    # Weight 1 (all DSSM) gives the dense ranking; weight 0 (all BM25) the BM25 ranking.
    for weight, expected in ((1.0, dense), (0.0, sparse)):
        publish_index_files(adi_index, files={HYBRID_FILE: {"weight": weight, "normalization": "minmax",
                                                             "candidates": 100}}, manifest_updates={})
        tuned = Searcher.load(adi_index)
        assert read_hybrid_config(tuned.index.version_dir).weight == weight
        got = tuned.search(query, k=10, mode="hybrid")
        assert [h.id for h in got][:len(expected)] == [h.id for h in expected]
    batch = tuned.search_batch([query, adi.queries["7"]], k=5, mode="hybrid")
    assert [h.id for h in batch[0]] == [h.id for h in tuned.search(query, k=5, mode="hybrid")]


def test_modes_reject_bad_input_and_versions_without_bm25(searcher, adi_index, tmp_path):
    import shutil

    from serving.searcher import Searcher

    with pytest.raises(InputError, match="'sparse'"):
        searcher.search("x", mode="sparse")
    with pytest.raises(InputError, match="empty"):
        searcher.search("   ", mode="hybrid")
    with pytest.raises(InputError, match="k must be"):
        searcher.search("compilers", k=0, mode="bm25")
    # A version built before BM25 state existed: dense works, the others say why they cannot.
    old = tmp_path / "old"
    shutil.copytree(adi_index, old)
    shutil.rmtree(ix.current_version_dir(old) / BM25_DIR)
    legacy = Searcher.load(old, verify=False)
    assert not legacy.supports_hybrid and legacy.search("compilers", k=3)
    with pytest.raises(IndexNotFoundError, match="no BM25 state"):
        legacy.search("compilers", k=3, mode="hybrid")


def test_corrupted_bm25_state_is_refused_by_the_manifest(adi_index, tmp_path):
    import shutil

    from serving.searcher import Searcher

    copy = tmp_path / "copy"
    shutil.copytree(adi_index, copy)
    data = ix.current_version_dir(copy) / BM25_DIR / "data.npy"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="data.npy"):
        Searcher.load(copy)


def test_search_cli_mode_flag(adi_index, capsys):
    from serving.search_cli import main

    assert main(["--index", str(adi_index), "-k", "3", "--mode", "hybrid", "--json", "computer", "programs"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == "computer programs" and len(out["hits"]) == 3
    assert main(["--index", str(adi_index), "-k", "2", "--mode", "bm25", "indexing"]) == 0
    assert "indexing" in capsys.readouterr().out


def test_serving_backend_passes_mode_hybrid_through(adi_index, adi):
    from serving.backend import Backend

    backend = Backend(adi_index, watch_interval=0)
    backend.reload()
    version, hits = backend.search(adi.queries["5"], 5, mode="hybrid")
    assert version == ix.current_version_dir(adi_index).name and len(hits) == 5
    assert [h[0] for h in hits] == [h.id for h in backend.current().searcher.search(adi.queries["5"], k=5,
                                                                                    mode="hybrid")]
