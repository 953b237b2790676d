"""`dssm lsa`: towers fitted to a corpus by truncated SVD (dssm/lsa.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from dssm.artifacts import verify_manifest
from dssm.errors import ConfigError, InputError
from dssm.lsa import LsaConfig, bag_matrix, fit_lsa


def _cosines(rows: np.ndarray) -> np.ndarray:
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit @ unit.T


def test_bag_matrix_sums_duplicate_ids_and_refuses_ids_outside_the_table():
    matrix = bag_matrix([(np.array([1, 3, 1]), np.array([1.0, 2.0, 0.5])), (np.array([0]), np.array([4.0]))],
                        num_buckets=5)
    np.testing.assert_array_equal(matrix.toarray(), [[0, 1.5, 0, 2, 0], [4, 0, 0, 0, 0]])
    with pytest.raises(InputError, match=r"\[0, 5\).*7"):
        bag_matrix([(np.array([7]), np.array([1.0]))], num_buckets=5)


def test_rank_two_corpus_keeps_its_cosines_exactly():
    # Three documents of rank 2 (c = a + b): a rank-2 fit loses nothing, so the projected cosines are
    # the bags' own. Every used bucket is in 2 of 3 documents, so idf is uniform: cos(a, c) = 2 / (√2 · 2).
    counts = sp.csr_matrix(np.array([[1, 0, 1, 0, 0, 0], [0, 1, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0]], np.float32))
    fit = fit_lsa(counts, config=LsaConfig(dim=4, idf_power=1.0))
    assert fit.rank == 2 and fit.documents == 3
    projected = counts.toarray() @ fit.table
    np.testing.assert_allclose(_cosines(projected), [[1, 0, 0.70710678], [0, 1, 0.70710678],
                                                     [0.70710678, 0.70710678, 1]], atol=1e-6)
    assert not fit.table[4:].any()  # buckets no document has
    assert not fit.table[:, 2:].any()  # dimensions beyond the rank
    assert fit.energy == pytest.approx(1.0, abs=1e-6)


def test_projection_is_numpy_svd_of_the_idf_weighted_rows():
    rng = np.random.default_rng(3)
    dense = (rng.random((30, 50)) < 0.15) * rng.integers(1, 4, (30, 50))
    dense[:, 7] = 1  # a bucket in every document: idf (log(31/31) + 1)^p = 1
    counts = sp.csr_matrix(dense.astype(np.float32))
    config = LsaConfig(dim=5, idf_power=2.0)
    fit = fit_lsa(counts, config=config)
    df = (dense > 0).sum(axis=0)
    weight = (np.log(31 / (df + 1)) + 1) ** 2
    rows = dense * weight
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    _, values, vt = np.linalg.svd(rows, full_matrices=False)
    np.testing.assert_allclose(fit.singular_values, values[:5], rtol=1e-5)
    expected = _cosines(dense @ (vt[:5].T * weight[:, None]))
    np.testing.assert_allclose(_cosines(dense @ fit.table), expected, atol=1e-4)
    np.testing.assert_allclose(fit.table[7, :5], np.abs(vt[:5, 7]) * np.sign(fit.table[7, :5]), rtol=1e-4)
    again = fit_lsa(counts, config=config)
    np.testing.assert_array_equal(fit.table, again.table)  # signs fixed: a function of the corpus alone


def test_small_corpus_caps_the_rank_and_bad_input_is_refused():
    counts = sp.csr_matrix(np.eye(4, 10, dtype=np.float32) + np.eye(4, 10, k=1, dtype=np.float32))
    fit = fit_lsa(counts, config=LsaConfig(dim=16))
    # The towers are as wide as the rank, rounded up to a multiple of 8, not the 16 asked for.
    assert fit.rank == 3 and fit.table.shape == (10, 8) and not fit.table[:, 3:].any()
    assert fit_lsa(counts, config=LsaConfig(dim=2)).table.shape == (10, 2)  # narrower than the rank: as asked
    with pytest.raises(InputError, match="at least 2 non-empty documents"):
        fit_lsa(sp.csr_matrix(np.array([[1, 2, 0]], np.float32)), config=LsaConfig())
    with pytest.raises(ConfigError, match="idf_power"):
        LsaConfig(idf_power=-1)
    with pytest.raises(ConfigError, match="dim"):
        LsaConfig(dim=0)


@pytest.fixture(scope="module")
def adi_lsa(tmp_path_factory, adi_dir):
    from dssm.lsa import main

    out = tmp_path_factory.mktemp("lsa") / "model"
    assert main(["--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(out), "--dim", "64"]) == 0
    return out


def test_cli_exports_a_model_that_ranks_adi_above_chance(adi_lsa, adi_dir):
    from dssm.data import document_text, read_beir
    from dssm.export import load_encoder
    from dssm.metrics import ndcg_at_k

    config = json.loads((adi_lsa / "config.json").read_text())
    assert config["model"]["hidden_dims"] == [] and config["model"]["activation"] == "linear"
    assert config["train"]["dim"] == 64
    history = json.loads((adi_lsa / "history.json").read_text())["lsa"]
    assert history["documents"] == 82 and history["rank"] == 64
    data = read_beir(adi_dir)
    ids = list(data.corpus)
    encoder = load_encoder(adi_lsa)
    docs = encoder.embed_documents([document_text(data.corpus[i].title, data.corpus[i].text) for i in ids])
    qids = [q for q in data.qrels if q in data.queries]
    queries = encoder.embed_queries([data.queries[q] for q in qids])
    assert docs.shape == (82, 64) and queries.shape == (len(qids), 64)
    # The numpy query path (one text) and the SavedModel (a batch) compute the same linear tower.
    np.testing.assert_allclose(encoder.embed_queries([data.queries[qids[0]]])[0], queries[0], atol=1e-5)
    # The numpy form of the fit (what the hybrid weight's refit encodes with) computes the same tower.
    from dssm.hashing import FeatureConfig, TokenBagger
    from dssm.lsa import fitted_encoder

    texts = [document_text(data.corpus[i].title, data.corpus[i].text) for i in ids]
    fit = fit_lsa(bag_matrix(TokenBagger(FeatureConfig()).bags_numpy(texts), num_buckets=FeatureConfig().num_buckets),
                  config=LsaConfig(dim=64))
    np.testing.assert_allclose(fitted_encoder(fit, FeatureConfig())(texts), docs, atol=2e-5)
    ranked = np.argsort(-(queries @ docs.T), axis=1)[:, :10]
    ndcg = np.mean([ndcg_at_k([ids[j] for j in row], data.qrels[q], 10) for q, row in zip(qids, ranked, strict=True)])
    # Measured 0.50 at dim 64 (BM25 0.488); random rankings of adi score ~0.1.
    assert ndcg > 0.4


@pytest.fixture(scope="module")
def adi_pairs_and_fit(tmp_path_factory, adi_dir):
    """adi's corpus pairs (4,096 buckets) and a 16-dim fit hashed like them."""
    from dssm.lsa import main
    from pipelines import make_pairs

    work = tmp_path_factory.mktemp("lsa_pairs")
    make_pairs.main(["--input", str(adi_dir), "--format", "corpus", "--output", str(work / "pairs"),
                     "--num-buckets", "4096", "--validation-fraction", "0.2"])
    assert main(["--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(work / "lsa"), "--dim", "16",
                 "--pairs", str(work / "pairs")]) == 0
    return work / "pairs", work / "lsa"


def test_train_warm_starts_from_the_fit_and_keeps_it_when_no_epoch_beats_it(tmp_path, adi_pairs_and_fit):
    from dssm.export import load_encoder
    from dssm.train import main as train_main

    pairs, fit = adi_pairs_and_fit
    assert json.loads((fit / "config.json").read_text())["features"]["num_buckets"] == 4096
    # A vanishing learning rate: the one epoch cannot beat the start, so the guard returns the fit.
    assert train_main(["--pairs", str(pairs), "--output", str(tmp_path / "ft"), "--init-from", str(fit),
                       "--epochs", "1", "--batch-size", "16", "--learning-rate", "1e-12", "--verbose", "0"]) == 0
    history = json.loads((tmp_path / "ft" / "history.json").read_text())
    config = json.loads((tmp_path / "ft" / "config.json").read_text())["model"]
    assert config["hidden_dims"] == [] and config["embedding_dim"] == 16  # the fit's shape carried over
    assert history["weights_epoch"] == 0 and history["start_value"] > 0.5
    texts = ["parallel processing of documents", "information retrieval systems"]
    np.testing.assert_allclose(load_encoder(tmp_path / "ft").embed_documents(texts),
                               load_encoder(fit).embed_documents(texts), atol=1e-5)


def test_select_copies_the_model_that_retrieves_the_validation_split_best(tmp_path, adi_pairs_and_fit, capsys):
    from dssm.select import main as select_main
    from dssm.select import score_models
    from dssm.train import main as train_main

    pairs, fit = adi_pairs_and_fit
    # The default towers at (almost) their random start: the fit must beat them on the split.
    assert train_main(["--pairs", str(pairs), "--output", str(tmp_path / "untrained"), "--epochs", "1",
                       "--batch-size", "16", "--learning-rate", "1e-12", "--embedding-dim", "16", "--hidden-dims",
                       "16", "--verbose", "0"]) == 0
    scored = score_models(pairs, [tmp_path / "untrained", fit])
    assert [Path(row["model"]) for row in scored] == [fit, tmp_path / "untrained"]
    assert scored[0]["recall_at_10"] > scored[1]["recall_at_10"]
    # The trainer's start value is the same measurement of the same split.
    start = json.loads((tmp_path / "untrained" / "history.json").read_text())["start_value"]
    assert scored[1]["recall_at_10"] == pytest.approx(start, abs=1e-6)
    assert select_main(["--pairs", str(pairs), "--models", str(tmp_path / "untrained"), str(fit),
                        "--output", str(tmp_path / "chosen")]) == 0
    assert "chose" in capsys.readouterr().out
    verify_manifest(tmp_path / "chosen", kind="model")
    assert (tmp_path / "chosen" / "manifest.json").read_bytes() == (fit / "manifest.json").read_bytes()
    assert json.loads((tmp_path / "chosen" / "selection.json").read_text())["chosen"] == str(fit.resolve())
    tie = score_models(pairs, [fit, fit])
    assert [row["order"] for row in tie] == [0, 1]  # equal scores: the first listed wins
    with pytest.raises(InputError, match="exists and is not empty"):
        select_main(["--pairs", str(pairs), "--models", str(fit), "--output", str(tmp_path / "chosen")])


def test_train_and_select_search_among_the_corpus_too(tmp_path, adi_pairs_and_fit, adi_dir):
    from dssm.inputs import read_feature_config
    from dssm.select import main as select_main
    from dssm.select import score_models
    from dssm.train import main as train_main
    from dssm.validation import corpus_distractors

    pairs, fit = adi_pairs_and_fit
    corpus = adi_dir / "corpus.jsonl"
    distractors = corpus_distractors(corpus, features=read_feature_config(pairs), limit=1000, seed=0)
    assert len(distractors) == 82
    alone, among = score_models(pairs, [fit]), score_models(pairs, [fit], distractors=distractors)
    # A bigger haystack can only push relevant documents down (the split's documents are adi's own, by id).
    assert among[0]["recall_at_10"] <= alone[0]["recall_at_10"] and among[0]["mrr_at_10"] < alone[0]["mrr_at_10"]
    assert train_main(["--pairs", str(pairs), "--output", str(tmp_path / "m"), "--init-from", str(fit), "--epochs",
                       "1", "--batch-size", "16", "--learning-rate", "1e-12", "--verbose", "0",
                       "--validation-corpus", str(corpus)]) == 0
    history = json.loads((tmp_path / "m" / "history.json").read_text())
    config = json.loads((tmp_path / "m" / "config.json").read_text())["train"]
    assert config["validation_corpus"] == str(corpus) and history["validation_documents"] == 82
    assert history["start_value"] == pytest.approx(among[0]["recall_at_10"], abs=1e-6)  # the same measurement
    assert select_main(["--pairs", str(pairs), "--models", str(fit), "--output", str(tmp_path / "chosen"),
                        "--corpus", str(corpus), "--distractors", "50"]) == 0
    selection = json.loads((tmp_path / "chosen" / "selection.json").read_text())
    assert selection["corpus"] == str(corpus.resolve()) and selection["distractors"] == 50
    with pytest.raises(InputError, match="--distractors"):
        select_main(["--pairs", str(pairs), "--models", str(fit), "--output", str(tmp_path / "c2"), "--corpus",
                     str(corpus), "--distractors", "0"])


def test_index_of_a_fit_tunes_the_hybrid_weight_on_a_refit(adi_lsa, adi_dir, tmp_path):
    from pipelines.encode_corpus import main as index_main
    from serving.searcher import Searcher

    assert index_main(["--model", str(adi_lsa), "--corpus", str(adi_dir / "corpus.jsonl"), "--output",
                       str(tmp_path / "index"), "--direct_running_mode=in_memory"]) == 0
    searcher = Searcher.load(tmp_path / "index")
    tuning = searcher.index.manifest["hybrid_tuning"]
    assert tuning["refit"] is True and tuning["pseudo_queries"] >= 30
    assert searcher.search("computer information retrieval systems", k=3)



def test_select_scores_a_wide_fit_on_its_first_dimensions(tmp_path, adi_dir, adi_pairs_and_fit, monkeypatch):
    import dssm.select as select
    from dssm.lsa import main

    pairs, fit16 = adi_pairs_and_fit
    assert main(["--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(tmp_path / "fit8"), "--dim", "8",
                 "--pairs", str(pairs)]) == 0
    whole = select.score_models(pairs, [fit16])[0]
    assert "dims_scored" not in whole  # 16 dimensions: not wider than the 128 a fit competes on
    monkeypatch.setattr(select, "FIT_SELECTION_DIM", 8)
    cut, narrow = select.score_models(pairs, [fit16])[0], select.score_models(pairs, [tmp_path / "fit8"])[0]
    # A fit's first 8 directions are the 8-dimension fit: the same choice, whatever width was exported.
    assert cut["dims_scored"] == 8 and "dims_scored" not in narrow
    assert cut["recall_at_10"] == pytest.approx(narrow["recall_at_10"], abs=1e-6)
    assert cut["mrr_at_10"] == pytest.approx(narrow["mrr_at_10"], abs=1e-4)
    assert (cut["recall_at_10"], cut["mrr_at_10"]) != (whole["recall_at_10"], whole["mrr_at_10"])
