"""dssm/index/: ScaNN build/load, recall against brute force, versions, checksums, doc store."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dssm import index as ix
from dssm.artifacts import read_manifest
from dssm.errors import ChecksumError, ConfigError, IndexNotFoundError, InputError


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_vectors(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres, like real document embeddings (topics)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ids_for(n: int) -> list[str]:
    return [f"doc-{i}" for i in range(n)]


def noisy_queries(matrix: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = matrix[rng.choice(len(matrix), count, replace=False)]
    q = q + 0.1 * rng.standard_normal(q.shape).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), exact.tolist(), strict=True)]))


def test_auto_mode_follows_corpus_size():
    config = ix.ScannConfig()
    assert ix.resolve_scann_params(config, 4_999)["mode"] == "brute_force"
    assert ix.resolve_scann_params(config, 5_000)["mode"] == "ah"
    tree = ix.resolve_scann_params(config, 1_000_000)
    assert tree["mode"] == "tree_ah"
    # sqrt(n) spherical partitions, trained on 100k vectors (100 per partition when more); search starts at 1/40
    assert (tree["num_leaves"], tree["num_leaves_to_search"], tree["training_sample_size"]) == (1000, 25, 100_000)
    assert tree["spherical"] is True
    small = ix.resolve_scann_params(config, 100_000)
    assert (small["num_leaves"], small["num_leaves_to_search"], small["training_sample_size"]) == (316, 8, 100_000)
    many = ix.resolve_scann_params(ix.ScannConfig(num_leaves=4000), 1_000_000)
    assert (many["num_leaves"], many["num_leaves_to_search"], many["training_sample_size"]) == (4000, 100, 400_000)
    assert ix.resolve_scann_params(config, 50_000)["training_sample_size"] == 50_000  # AH: at most n
    explicit = ix.resolve_scann_params(ix.ScannConfig(training_sample_size=5000, spherical=False), 1_000_000)
    assert explicit["training_sample_size"] == 5000 and explicit["spherical"] is False
    forced = ix.resolve_scann_params(ix.ScannConfig(mode="tree_ah", num_leaves=7, num_leaves_to_search=3), 500)
    assert (forced["num_leaves"], forced["num_leaves_to_search"]) == (7, 3)
    with pytest.raises(ConfigError, match="16 documents"):
        ix.resolve_scann_params(ix.ScannConfig(mode="ah"), 10)
    with pytest.raises(ConfigError, match="'hnsw'"):
        ix.ScannConfig(mode="hnsw")


def test_exact_top_k_matches_full_sort():
    matrix = unit_vectors(1000, 16)
    queries = unit_vectors(7, 16, seed=3)
    rows, scores = ix.exact_top_k(matrix, queries, 10, chunk=64)
    full = queries @ matrix.T
    expected = np.argsort(-full, axis=1)[:, :10]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), rtol=1e-6)


def test_leaves_tuning_grows_to_the_target_then_bisects_back_and_reuses_a_recall_just_measured():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((64, 16)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    probe = ix.RecallProbe(matrix, k=10, sample=10)
    order = np.argsort(-(probe.queries @ matrix.T), axis=1)

    class Searcher:  # finds the true top-10 from 30 partitions on, the 10 worst rows below; counts searches
        calls: list[int] = []

        def search_batched(self, queries, final_num_neighbors, pre_reorder_num_neighbors, leaves_to_search):
            self.calls.append(leaves_to_search)
            rows = order[:, :10] if leaves_to_search >= 30 else order[:, -10:]
            return rows, np.zeros(rows.shape, np.float32)

    searcher = Searcher()
    leaves, recall, tried = ix.tune_leaves_to_search(searcher, probe, start=10, num_leaves=100, min_recall=0.95)
    # x1.25 up to 33 (27 missed), then halving the gap: 30 reaches it, 28 and 29 miss
    assert (leaves, recall) == (30, 1.0) and [lv for lv, _ in tried] == [10, 12, 15, 18, 22, 27, 33, 30, 28, 29]
    assert searcher.calls == [10, 12, 15, 18, 22, 27, 33, 30, 28, 29] and tried[0][1] == 0.0
    assert [r for lv, r in tried if lv < 30] == [0.0] * 8
    searcher.calls.clear()
    leaves, _, tried = ix.tune_leaves_to_search(searcher, probe, start=10, num_leaves=100, min_recall=0.95,
                                                start_recall=0.0)
    assert leaves == 30 and tried[0] == (10, 0.0) and searcher.calls == [12, 15, 18, 22, 27, 33, 30, 28, 29]
    # a start that already reaches the target is kept (no search below it); one never reached stops at all leaves
    searcher.calls.clear()
    assert ix.tune_leaves_to_search(searcher, probe, start=40, num_leaves=100, min_recall=0.95)[0] == 40
    assert searcher.calls == [40]
    assert ix.tune_leaves_to_search(searcher, probe, start=10, num_leaves=25, min_recall=0.95)[:2] == (25, 0.0)
    # a compaction's start was just short: small steps that double (+1, then x1.06) find 30 in two searches,
    # where x1.25 then bisecting back takes four
    searcher.calls.clear()
    assert ix.tune_leaves_to_search(searcher, probe, start=28, num_leaves=100, min_recall=0.95, start_recall=0.0,
                                    first_growth=ix.MUTATED_FIRST_GROWTH)[0] == 30
    assert searcher.calls == [29, 30]
    searcher.calls.clear()
    leaves = ix.tune_leaves_to_search(searcher, probe, start=28, num_leaves=100, min_recall=0.95, start_recall=0.0)[0]
    assert leaves == 30 and searcher.calls == [35, 31, 29, 30]


def test_ah_recall_against_brute_force(tmp_path):
    matrix = unit_vectors(3000, 32)
    result = ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(3000), texts=["t"] * 3000,
                            config=ix.ScannConfig(mode="ah"))
    assert result.scann["mode"] == "ah"
    index = ix.load_index(tmp_path / "idx")
    queries = noisy_queries(matrix, 300)
    found, _ = index.search_vectors(queries, 10)
    exact, _ = ix.exact_top_k(matrix, queries, 10)
    assert recall_at_k(found, exact) >= 0.95
    # The build measured recall itself on document-derived queries and wrote it into the manifest.
    assert index.manifest["recall@10"] >= 0.95 and index.manifest["scann"]["mode"] == "ah"


def test_tree_ah_recall_on_clustered_vectors(tmp_path):
    matrix = clustered_vectors(4000, 32, clusters=40)
    config = ix.ScannConfig(mode="tree_ah", num_leaves=40, num_leaves_to_search=10)
    ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(4000), texts=["t"] * 4000, config=config)
    index = ix.load_index(tmp_path / "idx")
    assert index.params["num_leaves"] == 40
    queries = noisy_queries(matrix, 300)
    found, _ = index.search_vectors(queries, 10)
    exact, _ = ix.exact_top_k(matrix, queries, 10)
    assert recall_at_k(found, exact) >= 0.95


def test_build_fails_below_min_recall_and_keeps_previous_version(tmp_path):
    matrix = unit_vectors(2000, 32)
    first = ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(2000), texts=["t"] * 2000)
    # One leaf of 40 searched on structureless random vectors cannot reach 0.95.
    starved = ix.ScannConfig(mode="tree_ah", num_leaves=40, num_leaves_to_search=1)
    with pytest.raises(ConfigError, match="recall@10"):
        ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(2000), texts=["t"] * 2000, config=starved)
    assert ix.current_version_dir(tmp_path / "idx") == first.version_dir
    assert ix.list_versions(tmp_path / "idx") == [first.version]
    assert not (tmp_path / "idx" / ix.STAGING).exists()


def test_save_load_round_trip(tmp_path):
    n = 600
    matrix = 3.0 * unit_vectors(n, 24)  # not normalised on purpose: the build normalises
    ids = ids_for(n)
    texts = [f"text number {i} ünïcödé" for i in range(n)]
    titles = [f"title {i}" for i in range(n)]
    result = ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids, texts=texts, titles=titles,
                            config=ix.ScannConfig(mode="ah"))
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 3.0, rtol=1e-5)  # caller's array untouched
    index = ix.load_index(tmp_path / "idx")
    assert (index.size, index.dim, index.version) == (n, 24, result.version)
    np.testing.assert_allclose(index.embeddings(), matrix / 3.0, rtol=1e-5)
    assert index.docs.get([5, 0, 599]) == [ix.Doc(ids[5], titles[5], texts[5]), ix.Doc(ids[0], titles[0], texts[0]),
                                           ix.Doc(ids[599], titles[599], texts[599])]
    assert index.docs.row_of("doc-42") == 42 and index.docs.row_of("nope") is None
    queries = noisy_queries(matrix / 3.0, 50)
    rows, scores = index.search_vectors(queries, 10)

    # The directory is self-contained: moved elsewhere it loads and answers identically.
    moved = tmp_path / "elsewhere" / "idx"
    shutil.copytree(tmp_path / "idx", moved)
    shutil.rmtree(tmp_path / "idx")
    again = ix.load_index(moved)
    rows2, scores2 = again.search_vectors(queries, 10)
    np.testing.assert_array_equal(rows, rows2)
    np.testing.assert_array_equal(scores, scores2)
    # Single-query path agrees with the batched one.
    one_rows, one_scores = again.search_vectors(queries[:1], 10)
    np.testing.assert_array_equal(one_rows[0], rows[0])
    np.testing.assert_allclose(one_scores[0], scores[0], rtol=1e-6)
    # Scores are dot products of normalised vectors (reordered exactly).
    exact = np.einsum("d,kd->k", queries[0], (matrix / 3.0)[rows[0]])
    np.testing.assert_allclose(scores[0], exact, atol=1e-4)


def test_brute_force_is_exact_and_k_is_clipped(tmp_path):
    matrix = unit_vectors(30, 8)
    ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(30), texts=["x"] * 30)
    index = ix.load_index(tmp_path / "idx")
    rows, scores = index.search_vectors(matrix[:3], 100)
    assert rows.shape == (3, 30)
    exact, _ = ix.exact_top_k(matrix, matrix[:3], 30)
    np.testing.assert_array_equal(rows, exact)
    assert list(rows[:, 0]) == [0, 1, 2]
    with pytest.raises(InputError, match="k must be"):
        index.search_vectors(matrix[:1], 0)
    with pytest.raises(InputError, match=r"\[q, 8\]"):
        index.search_vectors(np.zeros((1, 5), np.float32), 3)


def test_current_points_to_a_complete_version(tmp_path):
    matrix = unit_vectors(100, 8)
    first = ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(100), texts=["a"] * 100)
    second = ix.build_index(tmp_path / "idx", embeddings=matrix[:50], ids=ids_for(50), texts=["b"] * 50)
    assert (tmp_path / "idx" / "CURRENT").read_text().strip() == second.version
    assert ix.list_versions(tmp_path / "idx") == sorted([first.version, second.version])
    current = ix.current_version_dir(tmp_path / "idx")
    assert sorted(p.name for p in current.iterdir()) == ["bm25", "docs.sqlite", "embeddings.npy", "manifest.json",
                                                         "recall_probe", "scann"]
    manifest = read_manifest(current)
    assert manifest["kind"] == "index" and manifest["counts"]["documents"] == 50 and manifest["dim"] == 8
    # Every file in the version is covered by the manifest.
    on_disk = {p.relative_to(current).as_posix() for p in current.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    assert ix.load_index(tmp_path / "idx").size == 50
    assert not list((tmp_path / "idx").glob("CURRENT.tmp*"))

    # A failed build (duplicate id) publishes nothing: CURRENT and the version list are unchanged.
    with pytest.raises(InputError, match=r"duplicate document id 'doc-1': rows 1 and 3"):
        ix.build_index(tmp_path / "idx", embeddings=matrix[:4], ids=["doc-0", "doc-1", "doc-2", "doc-1"],
                       texts=["c"] * 4)
    assert ix.current_version_dir(tmp_path / "idx") == second.version_dir
    assert len(ix.list_versions(tmp_path / "idx")) == 2

    assert ix.prune_versions(tmp_path / "idx", keep=1) == [first.version]
    assert ix.list_versions(tmp_path / "idx") == [second.version]


def test_unpublished_version_is_never_read(tmp_path):
    """A build that died after moving its version but before flipping CURRENT leaves the old one live."""
    matrix = unit_vectors(40, 8)
    first = ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(40), texts=["a"] * 40)
    orphan = tmp_path / "idx" / "versions" / "99999999T000000Z-ffffff"
    shutil.copytree(first.version_dir, orphan)
    (orphan / "embeddings.npy").write_bytes(b"garbage")
    assert ix.load_index(tmp_path / "idx").version == first.version


@pytest.mark.parametrize("target", ["embeddings.npy", "docs.sqlite", "scann/dataset.npy"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_or_truncated_file_is_refused_by_name(tmp_path, target, damage):
    matrix = unit_vectors(64, 8)
    result = ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(64), texts=["a"] * 64)
    path = result.version_dir / target
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=target.split("/")[-1]):
        ix.load_index(tmp_path / "idx")


def test_missing_index_and_bad_pointer(tmp_path):
    with pytest.raises(IndexNotFoundError, match="CURRENT"):
        ix.load_index(tmp_path / "nothing")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "CURRENT").write_text("../../etc\n")
    with pytest.raises(IndexNotFoundError, match="not a version name"):
        ix.load_index(tmp_path / "idx")
    (tmp_path / "idx" / "CURRENT").write_text("20250101T000000Z-000000\n")
    with pytest.raises(IndexNotFoundError, match="does not exist"):
        ix.load_index(tmp_path / "idx")


def test_bad_inputs_name_the_record(tmp_path):
    with pytest.raises(InputError, match="no documents"):
        ix.build_index(tmp_path / "idx", embeddings=np.zeros((0, 8), np.float32), ids=[], texts=[])
    with pytest.raises(InputError, match="3 ids for 2 embeddings"):
        ix.build_index(tmp_path / "idx", embeddings=unit_vectors(2, 8), ids=["a", "b", "c"], texts=["", ""])
    bad = unit_vectors(5, 8)
    bad[3, 2] = np.nan
    with pytest.raises(InputError, match="'doc-3'"):
        ix.build_index(tmp_path / "idx", embeddings=bad, ids=ids_for(5), texts=["a"] * 5)
    with pytest.raises(InputError, match="empty or non-string id"):
        ix.build_index(tmp_path / "idx", embeddings=unit_vectors(2, 8), ids=["a", ""], texts=["", ""])
    assert not (tmp_path / "idx" / "CURRENT").exists()


def write_shard(path: Path, ids: list[str], matrix: np.ndarray, *, texts: list[str] | None = None) -> None:
    texts = texts or [f"text of {i}" for i in ids]
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "title": pa.array([f"title of {i}" for i in ids], pa.string()),
        "text": pa.array(texts, pa.string()),
        "embedding": pa.array(list(matrix), pa.list_(pa.float32())),
    })
    pq.write_table(table, path)


def test_build_from_shards_streams_into_one_matrix(tmp_path):
    matrix = unit_vectors(250, 16)
    ids = ids_for(250)
    shards = [tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "empty.parquet"]
    write_shard(shards[0], ids[:100], matrix[:100])
    write_shard(shards[1], ids[100:], matrix[100:])
    write_shard(shards[2], [], np.zeros((0, 16), np.float32))
    assert ix.count_shard_rows(shards) == (250, 16)
    result = ix.build_index_from_shards(tmp_path / "idx", shards=shards, model_dir=None,
                                        extra={"encode": {"read": 250}}, progress=False)
    index = ix.load_index(tmp_path / "idx")
    np.testing.assert_allclose(index.embeddings(), matrix, rtol=1e-6)
    assert index.docs.get([0, 100, 249]) == [ix.Doc(i, f"title of {i}", f"text of {i}")
                                             for i in ("doc-0", "doc-100", "doc-249")]
    assert index.manifest["encode"] == {"read": 250} and result.documents == 250
    assert index.manifest["build"]["matrix_bytes"] == 250 * 16 * 4
    rows, _ = index.search_vectors(matrix[[7, 180]], 1)
    assert rows[:, 0].tolist() == [7, 180]


def test_build_from_shards_rejects_bad_shards(tmp_path):
    matrix = unit_vectors(10, 16)
    write_shard(tmp_path / "a.parquet", ids_for(10), matrix)
    write_shard(tmp_path / "b.parquet", ["doc-x", "doc-y"], unit_vectors(2, 12))
    with pytest.raises(InputError, match=r"'doc-x' has a 12-dim embedding, expected 16"):
        ix.build_index_from_shards(tmp_path / "idx", shards=[tmp_path / "a.parquet", tmp_path / "b.parquet"],
                                   model_dir=None, progress=False)
    write_shard(tmp_path / "c.parquet", ["doc-3"], unit_vectors(1, 16))
    with pytest.raises(InputError, match=r"duplicate document id 'doc-3': rows 3 and 10 \(c.parquet row 0\)"):
        ix.build_index_from_shards(tmp_path / "idx", shards=[tmp_path / "a.parquet", tmp_path / "c.parquet"],
                                   model_dir=None, progress=False)
    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), tmp_path / "d.parquet")
    with pytest.raises(InputError, match=r"lacks column\(s\) \['title', 'embedding'\]"):
        ix.build_index_from_shards(tmp_path / "idx", shards=[tmp_path / "d.parquet"], model_dir=None)
    with pytest.raises(InputError, match="no documents"):
        write_shard(tmp_path / "e.parquet", [], np.zeros((0, 16), np.float32))
        ix.build_index_from_shards(tmp_path / "idx", shards=[tmp_path / "e.parquet"], model_dir=None)
    assert not (tmp_path / "idx" / "CURRENT").exists()


def test_doc_store_is_real_sqlite_and_read_only(tmp_path):
    ix.build_index(tmp_path / "idx", embeddings=unit_vectors(20, 8), ids=ids_for(20), texts=["z"] * 20)
    path = ix.current_version_dir(tmp_path / "idx") / "docs.sqlite"
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT id, text FROM docs WHERE row = 7").fetchone() == ("doc-7", "z")
    conn.close()
    store = ix.DocStore(path)
    with pytest.raises(sqlite3.OperationalError):
        store._conn().execute("DELETE FROM docs")
    with pytest.raises(IndexNotFoundError, match=r"rows \[20\]"):
        store.get([1, 20])


_SLOW_BUILD = """
import sys
import numpy as np
from dssm import index as ix
x = np.random.default_rng(0).standard_normal((120_000, 32)).astype(np.float32)
ix.build_index(sys.argv[1], embeddings=x, ids=[f"n{i}" for i in range(len(x))], texts=["t"] * len(x),
               config=ix.ScannConfig(mode="tree_ah", min_recall=0.0))
"""


@pytest.mark.parametrize("stage_file", ["docs.sqlite", "embeddings.npy"])
def test_build_killed_mid_way_leaves_the_previous_version_live(tmp_path, stage_file):
    import os
    import signal
    import subprocess
    import sys
    import time

    matrix = unit_vectors(50, 32)
    first = ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(50), texts=["a"] * 50)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(tmp_path / "idx")],
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 120
        # Kill while the build writes its doc store, or later while it saves the matrix / trains ScaNN.
        while not list((tmp_path / "idx").glob(f".staging/*/version/{stage_file}")):
            assert proc.poll() is None, "the build finished or failed before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    index = ix.load_index(tmp_path / "idx")
    assert index.version == first.version
    assert index.search_vectors(matrix[[9]], 1)[0][0, 0] == 9
    # The next build is not blocked by the dead build's staging leftovers.
    second = ix.build_index(tmp_path / "idx", embeddings=matrix[:20], ids=ids_for(20), texts=["b"] * 20)
    assert ix.load_index(tmp_path / "idx").version == second.version


def test_tree_leaves_to_search_is_tuned_to_min_recall_and_used_after_load(tmp_path):
    matrix = unit_vectors(5000, 32, seed=4)  # no cluster structure: the starting 8 of 70 leaves is too few
    config = ix.ScannConfig(mode="tree_ah", num_leaves=70, min_recall=0.9)
    result = ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(5000), texts=["t"] * 5000, config=config)
    tuning = result.scann["leaves_tuning"]
    assert tuning[0][0] == 8 and tuning[0][1] < 0.9  # the start was not enough ...
    chosen = result.scann["num_leaves_to_search"]
    assert [chosen, round(result.recall_at_10, 4)] in tuning  # ... so it grew to the smallest count that was
    assert result.recall_at_10 >= 0.9 and all(r < 0.9 for lv, r in tuning if lv < chosen)
    index = ix.load_index(tmp_path / "idx")
    assert index.params["num_leaves_to_search"] == chosen
    # Searches after load use the tuned value, not the smaller one in ScaNN's serialized config.
    recall, probe, rows = _loaded_recall(index, matrix)
    assert recall >= 0.88
    one, _ = index.search_vectors(probe.queries[:1], 10)
    np.testing.assert_array_equal(one[0], rows[0])


def _loaded_recall(index, matrix: np.ndarray) -> tuple[float, ix.RecallProbe, np.ndarray]:
    """Recall@10 of a loaded index's searches on 500 document-derived queries (the gate's own measure)."""
    probe = ix.RecallProbe(matrix, sample=500, seed=9)
    rows, _ = index.search_vectors(probe.queries, 10)
    scores = np.einsum("qd,qkd->qk", probe.queries, matrix[rows])
    return float((scores >= probe.threshold).sum(axis=1).mean() / 10), probe, rows


def test_ah_reorder_k_grows_to_min_recall_and_is_used_after_load(tmp_path):
    matrix = unit_vectors(3000, 32, seed=5)
    # 12 candidates re-scored for a top-10 of structureless vectors misses many true neighbours.
    config = ix.ScannConfig(mode="ah", reorder_k=12, min_recall=0.97)
    result = ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(3000), texts=["t"] * 3000, config=config)
    tuning = result.scann["reorder_tuning"]
    assert tuning[0][0] == 12 and tuning[0][1] < 0.97
    assert [r for r, _ in tuning] == [12 * 2**i for i in range(len(tuning))]
    assert result.scann["reorder_k"] == tuning[-1][0] > 12 and result.recall_at_10 >= 0.97
    index = ix.load_index(tmp_path / "idx")
    assert index.params["reorder_k"] == tuning[-1][0]
    assert _loaded_recall(index, matrix)[0] >= 0.95
    # Past the growth limit the gate still fails the build.
    hopeless = ix.ScannConfig(mode="ah", reorder_k=1, min_recall=1.0, dims_per_block=4)
    with pytest.raises(ConfigError, match="recall@10"):
        ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(3000), texts=["t"] * 3000, config=hopeless)


def test_chunked_scann_build_keeps_row_order_and_recall(tmp_path):
    matrix = clustered_vectors(4000, 32, clusters=40)
    # A training sample smaller than the corpus: ScaNN is trained on it, then every row is upserted.
    # (1,000 points for 40 leaves: ScaNN's multithreaded training varies, recall 0.96-0.99 in 4 runs.)
    config = ix.ScannConfig(mode="tree_ah", num_leaves=40, num_leaves_to_search=10, training_sample_size=1000,
                            min_recall=0.9)
    result = ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(4000), texts=["t"] * 4000, config=config)
    assert result.recall_at_10 >= 0.9
    index = ix.load_index(tmp_path / "idx")
    assert index.scann.size() == 4000
    # Datapoint i is still row i: ScaNN's reordering copy of the data is the matrix, row for row.
    # (Spherical trees re-normalise each stored vector: equal to float32 rounding; distinct rows differ by far more.)
    np.testing.assert_allclose(np.load(index.version_dir / "scann" / "dataset.npy"), index.embeddings(), rtol=0,
                               atol=1e-6)
    queries = noisy_queries(matrix, 300)
    found, _ = index.search_vectors(queries, 10)
    exact, _ = ix.exact_top_k(matrix, queries, 10)
    assert recall_at_k(found, exact) >= 0.9  # rows in the wrong partitions or order would score near 0


def test_build_in_chunks_directly_appends_blocks_in_order():
    matrix = clustered_vectors(1500, 16, clusters=20, seed=3)
    params = ix.resolve_scann_params(ix.ScannConfig(mode="ah", training_sample_size=300), 1500)
    searcher = ix.build_scann_in_chunks(matrix[::5], (matrix[s:s + 400] for s in range(0, 1500, 400)), params)
    assert searcher.size() == 1500
    rows, _ = searcher.search_batched(matrix[[0, 399, 400, 1499]], final_num_neighbors=1)
    assert np.asarray(rows)[:, 0].tolist() == [0, 399, 400, 1499]


def test_build_reports_memory_by_stage(tmp_path):
    matrix = unit_vectors(3000, 16)
    write_shard(tmp_path / "a.parquet", ids_for(3000), matrix)
    result = ix.build_index_from_shards(tmp_path / "idx", shards=[tmp_path / "a.parquet"], model_dir=None,
                                        progress=False)
    memory = read_manifest(result.version_dir)["build"]["memory"]
    assert memory == result.memory
    assert [s["stage"] for s in memory["stages_mib"]] == [
        "load_shards", "normalise_save", "exact_search", "scann_build", "scann_serialize", "recall", "model_copy",
        "bm25"]
    assert memory["matrix_bytes"] == 3000 * 16 * 4
    on_disk = {name: sum(p.stat().st_size for p in (result.version_dir / name).rglob("*") if p.is_file())
               for name in ("scann", "bm25")}
    assert (memory["scann_bytes"], memory["bm25_bytes"]) == (on_disk["scann"], on_disk["bm25"]) and on_disk["scann"]
    assert memory["baseline_rss_bytes"] > 0 and memory["peak_rss_bytes"] >= memory["baseline_rss_bytes"]
    assert memory["peak_rss_bytes"] == result.peak_rss_bytes
    assert memory["peak_above_baseline_bytes"] == memory["peak_rss_bytes"] - memory["baseline_rss_bytes"]
    assert memory["ratio"] == round((memory["peak_above_baseline_bytes"] - memory["scann_bytes"]) / (3000 * 64), 3)
    top = max(s["peak"] for s in memory["stages_mib"])
    assert abs(top - memory["peak_above_baseline_bytes"] / 2**20) < 0.1


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire"])
def test_streamed_bm25_state_equals_bm25s(tmp_path, method):
    import json

    from dssm import bm25

    rng = np.random.default_rng(5)
    words = ["alpha", "beta", "gamma", "the", "running", "runs", "ran", "x", "c", "windows", "7", "Über", "straße"]
    docs = [ix.Doc(f"d{i}", str(rng.choice(["", "Title beta"])), " ".join(rng.choice(words, rng.integers(0, 12))))
            for i in range(500)]
    config = bm25.BM25Config(method=method)
    assert bm25.write_bm25_state(tmp_path / "streamed", docs, config=config, chunk=7) == 500  # many chunks
    bm25.BM25Index.build([d.id for d in docs], [bm25.document_text(d.title, d.text) for d in docs],
                         config=config).save(tmp_path / "bm25s")

    def columns(directory):
        arrays = {k: np.load(directory / f"{k}.npy") for k in ("data", "indices", "indptr")}
        terms = json.loads((directory / "vocab.json").read_text())
        ptr = arrays["indptr"]
        return {t: (arrays["indices"][ptr[i]:ptr[i + 1]].tolist(), arrays["data"][ptr[i]:ptr[i + 1]].tolist())
                for i, t in enumerate(terms)}, json.loads((directory / "params.json").read_text())

    streamed, bm25s_made = columns(tmp_path / "streamed" / bm25.BM25_DIR), columns(tmp_path / "bm25s")
    # The streamed state also records the mean document length (delta segments weight with it).
    lengths = [len(t) for t in bm25.tokenize([bm25.document_text(d.title, d.text) for d in docs])]
    assert streamed[1].pop("avgdl") == pytest.approx(np.mean(lengths))
    assert streamed == bm25s_made  # same weights bit for bit, term by term (term ids may differ)
    assert len(streamed[0]) == 12
    with pytest.raises(ConfigError, match="bm25l"):
        bm25.write_bm25_state(tmp_path / "l", docs, config=bm25.BM25Config(method="bm25l"))


def test_embeddings_npy_is_scanns_float_dataset_linked_once_hashed_once(tmp_path, monkeypatch):
    """A tree-AH build keeps one copy of the float rows: embeddings.npy is a hard link to ScaNN's
    dataset.npy (same rows, compared first), hashed once for the manifest; a different array is not linked."""
    from dssm import artifacts
    from dssm.index.ann import share_scann_dataset

    matrix = unit_vectors(2000, 16, seed=2)
    hashed = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda path, **kw: hashed.append(Path(path).name) or real(path, **kw))
    ix.build_index(tmp_path / "idx", embeddings=matrix, ids=ids_for(2000), texts=["t"] * 2000,
                   config=ix.ScannConfig(mode="tree_ah", num_leaves=20))
    version = ix.current_version_dir(tmp_path / "idx")
    assert (version / "embeddings.npy").samefile(version / "scann" / "dataset.npy")
    assert hashed.count("embeddings.npy") + hashed.count("dataset.npy") == 1
    artifacts.verify_manifest(version, kind="index")
    index = ix.load_index(tmp_path / "idx")
    np.testing.assert_allclose(np.asarray(index.embeddings()), matrix, atol=1e-6)
    rows, _ = index.search_vectors(matrix[:3], 1)
    assert rows[:, 0].tolist() == [0, 1, 2]
    other = tmp_path / "other"
    (other / "scann").mkdir(parents=True)
    np.save(other / "embeddings.npy", matrix)
    np.save(other / "scann" / "dataset.npy", matrix[::-1].copy())
    assert not share_scann_dataset(other)
    assert not (other / "embeddings.npy").samefile(other / "scann" / "dataset.npy")
    # A compaction's tolerance: rows that differ by at most atol are the same, by more are not.
    near = matrix.copy()
    near[[5, 1500]] += np.float32(4e-7)
    np.save(other / "scann" / "dataset.npy", near)
    assert not share_scann_dataset(other)  # exact by default
    near[7] += np.float32(1e-3)
    np.save(other / "scann" / "dataset.npy", near)
    assert not share_scann_dataset(other, atol=1e-6, chunk=512)
    near[7] = matrix[7]
    np.save(other / "scann" / "dataset.npy", near)
    assert share_scann_dataset(other, atol=1e-6, chunk=512)
    assert (other / "embeddings.npy").samefile(other / "scann" / "dataset.npy")
