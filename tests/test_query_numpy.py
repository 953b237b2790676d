"""The TensorFlow-free query path (issue 15): numpy weights beside the SavedModel give its embeddings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_query_tower import ASCII, CONFIGS, DECLINED, NON_ASCII, TRAIN, _trained

from dssm.artifacts import write_manifest
from dssm.errors import ChecksumError
from dssm.export import export_model, load_encoder
from dssm.query_numpy import QUERY_TOWER_DIR, load_query_encoder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(_trained(CONFIGS[request.param]), tmp_path_factory.mktemp("query_numpy") / "model",
                        train_config=TRAIN)


def test_export_writes_checksummed_numpy_weights(exported: Path) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    listed = {name for name in manifest["files"] if name.startswith(QUERY_TOWER_DIR + "/")}
    assert {f"{QUERY_TOWER_DIR}/table.npy", f"{QUERY_TOWER_DIR}/bias.npy"} <= listed
    assert len(listed) == 2 + 2 * len(json.loads((exported / "config.json").read_text())["model"]["hidden_dims"])


def test_numpy_encoder_equals_the_saved_model(exported: Path) -> None:
    graph = load_encoder(exported, fast_queries=False)
    encoder = load_query_encoder(exported)
    assert encoder is not None and not encoder.graph_loaded
    many = ASCII * 12  # several numpy chunks
    np.testing.assert_allclose(encoder.embed_queries(many), graph.embed_queries(many), atol=2e-6)
    np.testing.assert_allclose(encoder.embed_queries(ASCII[:1]), graph.embed_queries(ASCII[:1]), atol=2e-6)
    assert not encoder.graph_loaded  # ASCII never needed the graph
    # Non-ASCII text is hashed in Python as well; only a text Python declines loads the graph.
    mixed = ASCII[:3] + NON_ASCII
    np.testing.assert_allclose(encoder.embed_queries(mixed), graph.embed_queries(mixed), atol=2e-6)
    assert not encoder.graph_loaded
    declined = [ASCII[0], DECLINED]
    np.testing.assert_allclose(encoder.embed_queries(declined), graph.embed_queries(declined), atol=2e-6)
    assert encoder.graph_loaded
    np.testing.assert_allclose(encoder.embed_documents(ASCII), graph.embed_documents(ASCII), atol=2e-6)
    assert encoder.embed_queries([]).shape == (0, graph.dim)
    # Shared towers: the document tower is the query tower, so documents take the numpy path too;
    # two towers: the numpy weights are the query tower's only, documents take the graph.
    fresh = load_query_encoder(exported)
    np.testing.assert_allclose(fresh.embed_documents(ASCII), graph.embed_documents(ASCII), atol=2e-6)
    assert fresh.graph_loaded is not fresh.shared_towers


def test_changed_weights_are_refused_and_old_models_fall_back(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    table = np.load(copy / QUERY_TOWER_DIR / "table.npy")
    table[0, 0] += 1.0
    np.save(copy / QUERY_TOWER_DIR / "table.npy", table)
    with pytest.raises(ChecksumError, match="table.npy"):
        load_query_encoder(copy)
    # A model exported before query_tower/ existed: no numpy encoder, the caller loads the SavedModel.
    shutil.rmtree(copy / QUERY_TOWER_DIR)
    write_manifest(copy, kind="model")
    assert load_query_encoder(copy) is None


def test_mixed_precision_models_keep_the_graph(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    config = json.loads((copy / "config.json").read_text())
    config["train"]["mixed_precision"] = True
    (copy / "config.json").write_text(json.dumps(config))
    write_manifest(copy, kind="model")
    assert load_query_encoder(copy) is None


def test_search_answers_ascii_queries_without_importing_tensorflow(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dssm.data import Document
    from dssm.index import build_index_from_documents

    index = tmp_path / "index"
    docs = [Document(f"d{i}", "", text) for i, text in enumerate(ASCII[:16])]
    build_index_from_documents(index, model_dir=tiny_model_dir, documents=docs, progress=False)
    script = ("import sys, json; from serving.searcher import Searcher; s = Searcher.load(sys.argv[1]); "
              "hits = s.search('how do i learn python', k=3, mode='dense'); "
              "print(json.dumps({'tf': 'tensorflow' in sys.modules, 'hits': [h.id for h in hits]}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, str(index)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out == {"tf": False, "hits": out["hits"]} and len(out["hits"]) == 3
    assert "cuda" not in done.stderr.lower() and "tensorflow" not in done.stderr.lower(), done.stderr[-2000:]


def test_follow_loads_the_graph_from_a_newer_copy_of_the_model(exported: Path, tmp_path: Path) -> None:
    """A server's encoder outlives the index version it came from (hot swaps reuse it; old versions are pruned)."""
    first, second = tmp_path / "v1", tmp_path / "v2"
    shutil.copytree(exported, first)
    shutil.copytree(exported, second)
    encoder = load_query_encoder(first)
    encoder.follow(second)
    shutil.rmtree(first)
    np.testing.assert_allclose(encoder.graph().embed_documents(ASCII[:4]),
                               load_encoder(exported).embed_documents(ASCII[:4]), atol=2e-6)
    assert encoder.graph_loaded and encoder.model_dir == second

