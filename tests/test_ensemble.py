"""`dssm ensemble`: trained towers and a `dssm lsa` fit joined into one tower (dssm/ensemble.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dssm.errors import ConfigError

TEXTS = ["parallel processing of documents", "information retrieval systems", "the computer as a library tool",
         "indexing by citation", "abstracts of technical reports", "automatic translation of languages"]


@pytest.fixture(scope="module")
def members(tmp_path_factory, adi_dir) -> tuple[Path, Path, Path]:
    """adi's corpus pairs (4,096 buckets), a 16-dim fit hashed like them, and towers trained one epoch on them."""
    from dssm.lsa import main as lsa_main
    from dssm.train import main as train_main
    from pipelines import make_pairs

    work = tmp_path_factory.mktemp("ensemble")
    # Half the documents held out: enough (> 30) for `dssm index` to cut its tuning spans from.
    make_pairs.main(["--input", str(adi_dir), "--format", "corpus", "--output", str(work / "pairs"),
                     "--num-buckets", "4096", "--validation-fraction", "0.5"])
    assert lsa_main(["--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(work / "lsa"), "--dim", "16",
                     "--pairs", str(work / "pairs")]) == 0
    assert train_main(["--pairs", str(work / "pairs"), "--output", str(work / "towers"), "--epochs", "1",
                       "--batch-size", "16", "--embedding-dim", "16", "--hidden-dims", "16", "8", "--verbose", "0",
                       "--seed", "3"]) == 0
    return work / "pairs", work / "lsa", work / "towers"


@pytest.fixture(scope="module")
def joined(members, tmp_path_factory) -> Path:
    from dssm.ensemble import main

    _, fit, towers = members
    out = tmp_path_factory.mktemp("joined") / "model"
    assert main(["--towers", str(towers), "--fit", str(fit), "--output", str(out), "--side-weight", "0.5"]) == 0
    return out


def test_the_joined_cosine_is_the_members_cosines_weighted(members, joined) -> None:
    from dssm.export import load_encoder
    from dssm.query_numpy import load_query_encoder

    _, fit, towers = members
    config = json.loads((joined / "config.json").read_text())["model"]
    assert config["side_dim"] == 16 and config["side_weight"] == 0.5
    ensemble, trained, fitted = load_encoder(joined), load_encoder(towers), load_encoder(fit)
    assert ensemble.dim == 8 + 16
    docs, queries = ensemble.embed_documents(TEXTS), ensemble.embed_queries(TEXTS)  # 6 texts: the graph
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
    expected = (trained.embed_queries(TEXTS) @ trained.embed_documents(TEXTS).T
                + 0.5 * fitted.embed_queries(TEXTS) @ fitted.embed_documents(TEXTS).T) / 1.5
    np.testing.assert_allclose(queries @ docs.T, expected, atol=1e-5)
    # The numpy query paths (the loaded encoder's for up to 4 texts, and the TensorFlow-free one) agree.
    assert ensemble.query_tower is not None and ensemble.query_tower.side is not None
    np.testing.assert_allclose(ensemble.query_tower.embed(TEXTS[:2]), queries[:2], atol=1e-5)
    np.testing.assert_allclose(ensemble.embed_queries(TEXTS[:2]), queries[:2], atol=1e-5)
    numpy_only = load_query_encoder(joined)
    assert numpy_only is not None
    np.testing.assert_allclose(numpy_only.embed_queries(TEXTS[:3]), queries[:3], atol=1e-5)
    assert not numpy_only.graph_loaded


def test_bad_members_are_refused_by_name(members, joined, adi_dir, tmp_path) -> None:
    from dssm.ensemble import ensemble_towers

    _, fit, towers = members
    with pytest.raises(ConfigError, match="not a `dssm lsa` fit"):
        ensemble_towers(towers=towers, fit=towers, output=tmp_path / "a")
    with pytest.raises(ConfigError, match="already has a side branch"):
        ensemble_towers(towers=joined, fit=fit, output=tmp_path / "b")
    with pytest.raises(ConfigError, match="side_weight must be > 0"):
        ensemble_towers(towers=towers, fit=fit, output=tmp_path / "c", side_weight=0.0)
    from dssm.lsa import main as lsa_main

    other = tmp_path / "default-hashing-fit"  # the default 2^17 buckets, not the pairs' 4,096
    assert lsa_main(["--corpus", str(adi_dir / "corpus.jsonl"), "--output", str(other), "--dim", "4"]) == 0
    with pytest.raises(ConfigError, match="hashes texts as"):
        ensemble_towers(towers=towers, fit=other, output=tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_index_tunes_the_weight_on_a_refitted_side_and_untrained_documents(members, joined, adi_dir, tmp_path) -> None:
    from dssm.lsa import fit_texts, fitted_encoder, refit_for
    from dssm.select import score_models
    from pipelines.encode_corpus import main as index_main
    from serving.searcher import Searcher

    pairs, fit, towers = members
    scored = score_models(pairs, [fit, towers, joined])
    assert {Path(row["model"]).name for row in scored} == {"lsa", "towers", "model"}
    # The refit keeps the trained half and fits the side again on the texts it is given.
    refit = refit_for(joined)
    assert refit is not None
    embed_queries, embed_documents = refit(TEXTS)
    from dssm.export import load_encoder

    stored = load_encoder(joined).embed_documents(TEXTS)
    refitted = embed_documents(TEXTS)
    np.testing.assert_allclose(refitted[:, :8], stored[:, :8], atol=1e-6)
    features = load_encoder(fit).features
    from dssm.lsa import LsaConfig

    side = fitted_encoder(fit_texts(TEXTS, config=LsaConfig(dim=16), features=features), features)(TEXTS)
    np.testing.assert_allclose(refitted[:, 8:], side * np.sqrt(0.5 / 1.5), atol=1e-5)
    # A document the index stores gives its trained half from its stored row, without the towers.
    marked = {TEXTS[0]: np.full(stored.shape[1], 0.5, np.float32)}
    from_known = refit_for(joined, known=lambda: marked)(TEXTS)[1](TEXTS)
    np.testing.assert_allclose(from_known[0, :8], 0.5)
    np.testing.assert_allclose(from_known[0, 8:], refitted[0, 8:], atol=1e-6)
    np.testing.assert_allclose(from_known[1:], refitted[1:], atol=1e-6)
    assert index_main(["--model", str(joined), "--corpus", str(adi_dir / "corpus.jsonl"), "--output",
                       str(tmp_path / "index"), "--hybrid-pairs", str(pairs), "--direct_running_mode=in_memory"]) == 0
    searcher = Searcher.load(tmp_path / "index")
    tuning = searcher.index.manifest["hybrid_tuning"]
    assert tuning["refit"] is True and 0 < tuning["query_documents"] < 82  # only documents the towers did not train on
    hits = searcher.search("computer information retrieval systems", k=3, mode="dense")
    assert len(hits) == 3


def test_fine_tuning_an_ensemble_keeps_its_side_branch(members, joined, tmp_path) -> None:
    from dssm.query_numpy import QUERY_TOWER_DIR
    from dssm.train import main as train_main

    pairs, fit, _ = members
    assert train_main(["--pairs", str(pairs), "--output", str(tmp_path / "tuned"), "--init-from", str(joined),
                       "--epochs", "1", "--batch-size", "16", "--verbose", "0", "--no-keep-best"]) == 0
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())["model"]
    assert config["side_dim"] == 16 and config["side_weight"] == 0.5
    side = np.load(tmp_path / "tuned" / QUERY_TOWER_DIR / "side_table.npy")
    np.testing.assert_array_equal(side, np.load(fit / QUERY_TOWER_DIR / "table.npy"))
    tuned_table = np.load(tmp_path / "tuned" / QUERY_TOWER_DIR / "table.npy")
    assert not np.array_equal(tuned_table, np.load(joined / QUERY_TOWER_DIR / "table.npy"))  # the towers trained


def test_a_run_checkpointed_before_the_side_branch_existed_still_resumes(tmp_path) -> None:
    from dssm.checkpoints import check_resumable
    from dssm.config import config_to_dict
    from dssm.model import ModelConfig

    current = {"pairs_sha256": "ab", "model": config_to_dict(ModelConfig())}
    before = {"pairs_sha256": "ab", "model": {k: v for k, v in current["model"].items()
                                              if k not in ("side_dim", "side_weight")}}
    check_resumable(before, current, tmp_path / "run.json")  # the missing fields were the defaults
    joined = {"pairs_sha256": "ab", "model": config_to_dict(ModelConfig(side_dim=16))}
    with pytest.raises(ConfigError, match="model.side_dim is 16"):
        check_resumable(before, joined, tmp_path / "run.json")
