"""Delta segments, tombstones and compaction (issue 14): writes that cost what they change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dssm import artifacts
from dssm import index as ix
from dssm.errors import ChecksumError, InputError
from dssm.index.docstore import Doc
from dssm.index.segments import (
    DELTA_DIR,
    MAX_SEGMENTS,
    MERGE_FACTOR,
    TOMBSTONES,
    DeltaSegment,
    SegmentLayout,
    merge_start,
)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def build(path, n: int = 600, dim: int = 16, seed: int = 0, mode: str = "brute_force") -> dict[str, tuple]:
    """A small index; returns the truth ``{id: (vector, text)}``."""
    rng = np.random.default_rng(seed)
    vectors = unit(rng.standard_normal((n, dim)))
    ids = [f"d{i}" for i in range(n)]
    texts = [f"base document number {i} about topic {i % 7}" for i in range(n)]
    ix.build_index(path, embeddings=vectors, ids=ids, texts=texts, config=ix.ScannConfig(mode=mode))
    return {i: (v, t) for i, v, t in zip(ids, vectors, texts, strict=True)}


def upsert(path, truth, items, **kwargs) -> ix.UpdateResult:
    ids = [i for i, _, _ in items]
    result = ix.update_index(path, upsert_ids=ids, upsert_titles=[""] * len(ids),
                             upsert_texts=[t for _, _, t in items],
                             upsert_vectors=np.stack([v for _, v, _ in items]), **kwargs)
    truth.update({i: (v, t) for i, v, t in items})
    return result


def delete(path, truth, ids, **kwargs) -> ix.UpdateResult:
    result = ix.update_index(path, delete_ids=ids, **kwargs)
    for doc_id in ids:
        del truth[doc_id]
    return result


def assert_serves_exactly(index: ix.Index, truth: dict[str, tuple], queries: np.ndarray, k: int = 10) -> None:
    """The version answers like exact search over ``truth``: ids, order and scores; lookups agree."""
    ids = list(truth)
    matrix = np.stack([truth[i][0] for i in ids])
    assert index.size == len(truth) == len(index.docs)
    rows, scores = index.search_vectors(queries, k)
    docs = index.docs.get(rows.ravel().tolist())
    got = [[d.id for d in docs[q * k:(q + 1) * k]] for q in range(len(queries))]
    exact = queries @ matrix.T
    for q in range(len(queries)):
        order = np.lexsort((np.arange(len(ids)), -exact[q]))[:k]
        want_scores = exact[q][order]
        assert np.allclose(scores[q], want_scores, atol=1e-5)
        # Ties aside, the same documents in the same order.
        assert [truth[i][0] @ queries[q] for i in got[q]] == pytest.approx(list(want_scores), abs=1e-5)
    live = {doc.id: doc.text for _, doc in index.docs.iter_all()}
    assert live == {i: t for i, (_, t) in truth.items()}
    sample = ids[:: max(1, len(ids) // 50)]
    assert [d.text for d in index.docs.by_ids(sample)] == [truth[i][1] for i in sample]


def test_small_writes_are_delta_segments_that_search_like_exact_search(tmp_path):
    path = tmp_path / "idx"
    truth = build(path)
    rng = np.random.default_rng(1)
    queries = unit(rng.standard_normal((40, 16)))
    old = ix.load_index(path)
    base_version = old.version
    for step in range(MAX_SEGMENTS + 4):  # past MAX_SEGMENTS: the segments are merged on the way
        live = sorted(truth)
        replaced = [live[j] for j in rng.choice(len(live), 3, replace=False)]
        new = [(f"n{step}-{j}", unit(rng.standard_normal((1, 16)))[0], f"new {step} {j}") for j in range(5)]
        result = upsert(path, truth, new + [(i, unit(rng.standard_normal((1, 16)))[0], f"re {i}") for i in replaced])
        assert not result.compacted and (result.inserted, result.replaced) == (5, 3)
        gone = [i for i in sorted(truth) if i not in replaced][step * 2:step * 2 + 2] + [f"n{step}-0"]
        result = delete(path, truth, gone)
        assert not result.compacted and result.documents == len(truth)
        index = ix.load_index(path)
        layout = index.layout
        assert layout.base_version == base_version and 1 <= len(layout.delta) <= MAX_SEGMENTS
        assert_serves_exactly(index, truth, queries)
        for doc_id in gone:
            assert index.docs.row_of(doc_id) is None
    # A version never changes: the reader of the first one still sees its 600 documents.
    assert old.size == 600 and old.docs.row_of("d0") == 0
    # Each write wrote only its segment, tombstones and manifest (the base files are links).
    version = ix.load_index(path).version_dir
    assert (version / "embeddings.npy").stat().st_nlink > 1 and (version / "scann").is_dir()


def test_merge_policy_merges_the_newest_segments_of_one_size_tier_and_cascades():
    assert MERGE_FACTOR == 4  # tiers of 4: rows 1-3, 4-15, 16-63, 64-255, 256-1023, ...
    assert merge_start([100]) == 0 and merge_start([100, 100, 100]) == 2  # fewer than 4 of a tier: no merge
    assert merge_start([100, 100, 100, 100]) == 0
    assert merge_start([1600, 100, 100, 100, 100]) == 1  # 4 x 100 -> 400, and 400 is a tier below 1600
    assert merge_start([400, 400, 400, 100, 100, 100, 100]) == 0  # 400 joins the three 400s: one 1600
    assert merge_start([5, 5, 5, 100]) == 0  # a bigger write takes the smaller tiers with it
    assert merge_start([100, 100, 100, 5]) == 3
    # 1-document writes: segments stay few, and a document is rewritten about log4(writes) times.
    sizes, rewritten = [], 0
    for _ in range(4_000):
        first = merge_start(sizes + [1])
        rewritten += sum(sizes[first:])
        sizes = sizes[:first] + [sum(sizes[first:]) + 1]
        assert len(sizes) <= MAX_SEGMENTS
    assert sum(sizes) == 4_000 and len(sizes) <= 3 * 6 and rewritten <= 4_000 * 6


def test_a_write_rewrites_only_the_segments_it_merges(tmp_path):
    path = tmp_path / "idx"
    truth = build(path, n=200)
    rng = np.random.default_rng(3)

    def write(step: int, n: int) -> SegmentLayout:
        items = [(f"w{step}-{j}", unit(rng.standard_normal((1, 16)))[0], f"write {step} {j}") for j in range(n)]
        upsert(path, truth, items)
        return ix.load_index(path).layout

    big = write(0, 64)  # one segment of tier 3 (64-255 rows)
    for step in range(1, 4):
        layout = write(step, 4)  # tier 1: three of them stay apart
    assert [rows for _, rows in layout.delta] == [64, 4, 4, 4]
    first = ix.load_index(path).version_dir / DELTA_DIR / big.delta[0][0] / "embeddings.npy"
    layout = write(4, 4)  # the fourth of tier 1: the four merge into 16 rows, the 64 stays as it was
    assert [rows for _, rows in layout.delta] == [64, 16] and layout.delta[0] == big.delta[0]
    version = ix.load_index(path).version_dir
    assert (version / DELTA_DIR / big.delta[0][0] / "embeddings.npy").stat().st_ino == first.stat().st_ino
    assert sorted(p.name for p in (version / DELTA_DIR).iterdir()) == sorted(name for name, _ in layout.delta)
    assert_serves_exactly(ix.load_index(path), truth, unit(rng.standard_normal((20, 16))))
    # A reload after a delta write shares the loaded base; a compaction's version has its own.
    before = ix.load_index(path)
    write(5, 1)
    after = ix.load_index(path)
    assert after.shares_base(before) and before.shares_base(after) and not after.shares_base(None)
    ix.compact_index(path)
    assert not ix.load_index(path).shares_base(after)


def _fresh_top(matrix: np.ndarray, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ matrix.T
    order = np.lexsort((np.broadcast_to(np.arange(matrix.shape[0]), scores.shape), -scores), axis=1)[:, :depth]
    return order, np.take_along_axis(scores, order, 1)


def test_a_carried_recall_probe_equals_exact_search_over_the_updated_matrix():
    """RecallProbe.carried scores only changed rows; its k-th scores (the gate's threshold) and the rows it
    proves must be exact search's, through deletes (last row moved into the hole), rewrites and appends,
    including a round that deletes most of some queries' neighbours (those are searched again)."""
    from dssm.index.recall import PROBE_DEPTH, RecallProbe

    rng = np.random.default_rng(3)
    matrix = unit(rng.standard_normal((400, 8)))
    probe = RecallProbe(matrix, k=10, sample=60, seed=1)
    for step in range(4):
        n = matrix.shape[0]
        source = np.arange(n)
        doomed = probe.rows[:5, :15].ravel() if step == 2 else rng.choice(n, 30, replace=False)
        for row in sorted(set(doomed.tolist()), reverse=True):  # ScaNN's delete: the last row fills the hole
            source[row] = source[len(source) - 1]
            source = source[:-1]
        rewritten = rng.choice(len(source), 20, replace=False)
        source[rewritten] = -1
        source = np.concatenate([source, np.full(25, -1)])
        updated = np.where((source >= 0)[:, None], matrix[np.maximum(source, 0)], 0)
        updated[source < 0] = unit(rng.standard_normal((int((source < 0).sum()), 8)))
        probe = RecallProbe.carried(updated.astype(np.float32), queries=probe.queries, rows=probe.rows,
                                    scores=probe.scores, bound=probe.bound, source=source)
        matrix = updated.astype(np.float32)
        want_rows, want_scores = _fresh_top(matrix, probe.queries, PROBE_DEPTH)
        np.testing.assert_allclose(probe.threshold[:, 0], want_scores[:, 9] - 1e-5, atol=1e-5)
        proven = probe.scores >= probe.bound[:, None]
        assert proven.sum(axis=1).min() >= 10
        np.testing.assert_allclose(np.where(proven, probe.scores, 0), np.where(proven, want_scores, 0), atol=1e-5)
        assert (np.where(proven, probe.rows, -1) == np.where(proven, want_rows, -1)).all()


def test_compactions_save_the_recall_probe_and_carry_it(tmp_path):
    from dssm.index.recall import PROBE_DEPTH, PROBE_DIR

    path, rng = tmp_path / "idx", np.random.default_rng(4)
    vectors = unit(rng.standard_normal((500, 16)))
    ix.build_index(path, embeddings=vectors, ids=[f"d{i}" for i in range(500)], texts=["t"] * 500,
                   config=ix.ScannConfig(mode="tree_ah", recall_sample=200))
    truth = {f"d{i}": (v, "t") for i, v in enumerate(vectors)}
    built = ix.current_version_dir(path) / PROBE_DIR
    artifacts.verify_manifest(built.parent, kind="index")  # the build saves its probe, checksummed
    carried = np.load(built / "queries.npy")
    assert carried.shape == (200, 16)
    for step in range(3):
        fresh = unit(rng.standard_normal((60, 16)))
        upsert(path, truth, [(f"n{step}_{j}", v, f"new {j}") for j, v in enumerate(fresh)])
        delete(path, truth, [f"d{j}" for j in range(step * 40, step * 40 + 40)])
        ix.compact_index(path)
        version = ix.current_version_dir(path)
        assert (version / PROBE_DIR / "queries.npy").is_file()
        assert (version / "embeddings.npy").samefile(version / "scann" / "dataset.npy")  # one copy of the rows
        artifacts.verify_manifest(version, kind="index")  # the probe's files are checksummed with the version
        queries = np.load(version / PROBE_DIR / "queries.npy")
        scores = np.load(version / PROBE_DIR / "scores.npy")
        matrix = np.load(version / "embeddings.npy")
        _, want = _fresh_top(matrix, queries, PROBE_DEPTH)
        np.testing.assert_allclose(scores[:, 9], want[:, 9], atol=1e-5)
        np.testing.assert_array_equal(queries, carried)  # the build drew the queries; compactions carry them
        carried = queries
    assert ix.load_index(path).size == len(truth)


def test_a_delta_segment_reads_back_texts_with_any_line_separator(tmp_path):
    docs = [Doc("a", "ti\x85tle", "line\u2028sep\u2029par\nnew\r\x1c\x0b\x0c end"),
            Doc("b", "", "plain \u00e9\U0001f600")]
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3)
    DeltaSegment("s", docs, matrix).write(tmp_path / "s")
    loaded = DeltaSegment.load(tmp_path / "s")
    assert loaded.docs == docs and loaded.rows_by_id == {"a": 0, "b": 1}
    np.testing.assert_array_equal(loaded.matrix, matrix)
    (tmp_path / "s" / "docs.jsonl").write_text('{"id": "a", "title": "", "text": "x"}\n{"id": "b"\n', encoding="utf-8")
    with pytest.raises(ChecksumError, match="unreadable"):
        DeltaSegment.load(tmp_path / "s")


def test_the_live_delta_rows_are_stacked_as_concatenating_then_selecting_would():
    """``dssm.index.load._stack_live`` copies each segment's live rows once into one matrix."""
    from dssm.index.load import _stack_live

    rng = np.random.default_rng(6)
    for sizes in ([], [5], [3, 0, 7, 2], [1, 1]):
        segments = tuple(DeltaSegment(f"s{i}", [Doc(f"d{i}-{j}", "", "") for j in range(n)],
                                      rng.standard_normal((n, 4)).astype(np.float32)) for i, n in enumerate(sizes))
        for _ in range(10):
            live = np.flatnonzero(rng.random(sum(sizes)) < rng.random())
            want = np.concatenate([s.matrix for s in segments])[live] if segments else np.zeros((0, 4), np.float32)
            got = _stack_live(segments, live, 4)
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, want)


def test_delta_scores_are_the_matrix_product_across_row_blocks():
    """``dssm.index.load.delta_scores`` (blocked products, a fast path for one query) is ``queries @ matrix.T``."""
    from dssm.index.load import delta_scores

    rng = np.random.default_rng(5)
    for rows in (0, 1, 511, 512, 513, 1300):
        matrix = rng.standard_normal((rows, 16)).astype(np.float32)
        for q in (1, 2, 5):
            queries = rng.standard_normal((q, 16)).astype(np.float32)
            got = delta_scores(queries, matrix)
            assert got.shape == (q, rows) and got.dtype == np.float32
            assert np.allclose(got, queries @ matrix.T, atol=1e-5)


def test_a_delta_of_several_row_blocks_serves_like_exact_search(tmp_path):
    path = tmp_path / "idx"
    truth = build(path, n=300)
    rng = np.random.default_rng(9)
    upsert(path, truth, [(f"n{j}", v, f"new {j}") for j, v in enumerate(unit(rng.standard_normal((1300, 16))))])
    index = ix.load_index(path)
    assert index.pending_delta == 1300
    assert_serves_exactly(index, truth, unit(rng.standard_normal((7, 16))))
    assert_serves_exactly(index, truth, unit(rng.standard_normal((1, 16))))


def test_delta_rows_tied_at_the_kth_score_are_ranked_by_row_like_exact_search(tmp_path):
    path = tmp_path / "idx"
    truth = build(path, n=100)
    same = unit(np.ones((1, 16)))[0]
    upsert(path, truth, [(f"t{j}", same, f"tie {j}") for j in range(30)])  # 30 delta rows, one score
    index = ix.load_index(path)
    rows, scores = index.search_vectors(same[None, :], 10)
    assert [d.id for d in index.docs.get(rows[0].tolist())] == [f"t{j}" for j in range(10)]
    assert np.allclose(scores[0], 1.0, atol=1e-5)


def test_a_write_past_max_delta_compacts_into_the_base(tmp_path):
    path = tmp_path / "idx"
    truth = build(path, n=400)
    rng = np.random.default_rng(2)
    first = upsert(path, truth, [(f"n{j}", unit(rng.standard_normal((1, 16)))[0], f"new {j}") for j in range(20)],
                   max_delta=30)
    delete(path, truth, ["d1", "n3"], max_delta=30)
    assert not first.compacted
    result = upsert(path, truth, [(f"m{j}", unit(rng.standard_normal((1, 16)))[0], f"more {j}") for j in range(10)]
                    + [("d2", unit(rng.standard_normal((1, 16)))[0], "replaced d2")], max_delta=30)
    assert result.compacted and result.delta_documents == 0 and (result.inserted, result.replaced) == (10, 1)
    index = ix.load_index(path)
    assert index.layout.plain and not (index.version_dir / DELTA_DIR).exists()
    assert not (index.version_dir / TOMBSTONES).exists()
    assert index.layout.base_documents == len(truth) == 400 + 20 - 2 + 10
    assert_serves_exactly(index, truth, unit(rng.standard_normal((30, 16))))
    # rebalance=True compacts whatever the delta's size.
    upsert(path, truth, [("z", unit(rng.standard_normal((1, 16)))[0], "zed")])
    assert not ix.load_index(path).layout.plain
    assert upsert(path, truth, [("y", unit(rng.standard_normal((1, 16)))[0], "why")], rebalance=True).compacted
    assert_serves_exactly(ix.load_index(path), truth, unit(rng.standard_normal((10, 16))))


def test_tree_ah_recall_over_base_and_delta_holds_the_gate_up_to_the_threshold(tmp_path):
    """Search over base + delta keeps recall@10 >= the gate at every delta size up to max_delta."""
    path, dim, n = tmp_path / "idx", 32, 3000
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((30, dim))
    vectors = unit(centres[rng.integers(0, 30, n)] + 0.35 * rng.standard_normal((n, dim)))
    config = ix.ScannConfig(mode="tree_ah", num_leaves=30, training_sample_size=n, min_recall=0.95)
    ix.build_index(path, embeddings=vectors, ids=[f"d{i}" for i in range(n)], texts=["t"] * n, config=config)
    truth = {f"d{i}": (v, "t") for i, v in enumerate(vectors)}
    limit, step = 300, 100
    for size in range(step, limit + 1, step):
        fresh = unit(centres[rng.integers(0, 30, step)] + 0.35 * rng.standard_normal((step, dim)))
        upsert(path, truth, [(f"n{size}-{j}", v, "t") for j, v in enumerate(fresh)], max_delta=limit)
        delete(path, truth, [f"d{i}" for i in range(size - step, size - step + 40)], max_delta=limit * 2)
        index = ix.load_index(path)
        assert not index.layout.plain
        ids = list(truth)
        matrix = np.stack([truth[i][0] for i in ids])
        sample = matrix[rng.choice(len(ids), 300, replace=False)]
        queries = unit(sample + 0.05 * rng.standard_normal(sample.shape))
        want = np.argsort(-(queries @ matrix.T), axis=1)[:, :10]
        rows, _ = index.search_vectors(queries, 10)
        got = index.docs.get(rows.ravel().tolist())
        found = [{d.id for d in got[q * 10:(q + 1) * 10]} for q in range(len(queries))]
        recall = np.mean([len(found[q] & {ids[j] for j in want[q]}) / 10 for q in range(len(queries))])
        assert recall >= 0.95, (size, recall)


def test_reloading_after_a_delta_write_reuses_the_base_and_hashes_only_what_was_added(tmp_path, monkeypatch):
    path = tmp_path / "idx"
    truth = build(path)
    from dssm.index import load

    first = ix.load_index(path)
    upsert(path, truth, [("new", unit(np.ones((1, 16)))[0], "new one")])
    delete(path, truth, ["d3"])
    hashed: list[str] = []
    original = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: hashed.append(str(p)) or original(p))
    second = ix.load_index(path)
    assert second.scann is first.scann  # the ScaNN searcher of the shared base, not loaded again
    # The segment this process wrote is not read back or hashed; the small tombstones file is.
    assert [os.path.relpath(p, second.version_dir) for p in hashed] == [TOMBSTONES]
    assert second.docs.by_ids(["new"])[0].text == "new one" and second.docs.row_of("d3") is None
    # A segment some other process wrote (this one never held it) is hashed before it is read.
    hashed.clear()
    monkeypatch.setattr(load, "_LOADED", type(load._LOADED)({k: v for k, v in load._LOADED.items()
                                                                 if k[0] == "base"}))
    monkeypatch.setattr(load, "_RECENT", type(load._RECENT)(maxlen=4))
    third = ix.load_index(path)
    rel = sorted(os.path.relpath(p, third.version_dir) for p in hashed)
    assert rel == sorted([f"{DELTA_DIR}/{third.deltas[0].name}/docs.jsonl",
                          f"{DELTA_DIR}/{third.deltas[0].name}/embeddings.npy", TOMBSTONES]), rel


def test_corrupt_delta_files_are_refused_by_name(tmp_path):
    path = tmp_path / "idx"
    truth = build(path)
    upsert(path, truth, [("new", unit(np.ones((1, 16)))[0], "new one")])
    delete(path, truth, ["d5"])
    version = ix.current_version_dir(path)
    segment = next((version / DELTA_DIR).iterdir())
    # A fresh process has no loaded base to trust: every file is hashed.
    for victim in (segment / "docs.jsonl", version / TOMBSTONES):
        backup = victim.read_bytes()
        victim.unlink()  # a hard link: write a new file, not through the shared inode
        victim.write_bytes(backup[:-3] + b"xyz")
        code = ("from dssm import index as ix\n"
                f"ix.load_index({str(path)!r})\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and victim.name in done.stderr and "ChecksumError" in done.stderr
        victim.unlink()
        victim.write_bytes(backup)
    ix.load_index(path)


def test_bad_delta_writes_change_nothing(tmp_path):
    path = tmp_path / "idx"
    truth = build(path, n=50)
    upsert(path, truth, [("new", unit(np.ones((1, 16)))[0], "new one")])
    delete(path, truth, ["d3"])
    before = ix.current_version_dir(path).name
    with pytest.raises(InputError, match="'d3' is not in index"):
        ix.delete_documents(path, ["d4", "d3"])  # deleted already: nothing of this write happens
    with pytest.raises(InputError, match="every document"):
        ix.delete_documents(path, list(truth))
    assert ix.current_version_dir(path).name == before and ix.load_index(path).docs.row_of("d4") is not None


def test_bm25_finds_delta_documents_and_forgets_tombstoned_ones(tmp_path):
    from dssm.bm25 import BM25Index

    path = tmp_path / "idx"
    truth = build(path, n=300)
    upsert(path, truth, [("zeb", unit(np.ones((1, 16)))[0], "zebra migration across the serengeti"),
                         ("d7", unit(np.ones((1, 16)))[0], "giraffe necks and zebra stripes")])
    index = ix.load_index(path)
    bm25 = index.bm25()
    rows, scores = bm25.search_rows_batch(["zebra serengeti"], 5)[0]
    assert [d.id for d in index.docs.get(rows.tolist())] == ["zeb", "d7"]
    # The same documents in a fresh BM25 build score the same up to the mean length (the base's here).
    live = [(doc.id, doc.text) for _, doc in index.docs.iter_all()]
    fresh = BM25Index.build([i for i, _ in live], [t for _, t in live])
    want = dict(fresh.search("zebra serengeti", 5))
    assert scores == pytest.approx([want["zeb"], want["d7"]], rel=0.05)
    # d7's old text is gone from BM25 too: its base row is a tombstone.
    old_rows, _ = bm25.search_rows_batch(["base document number 7"], 300)[0]
    assert "d7" not in {d.id for d in index.docs.get(old_rows.tolist())}
    delete(path, truth, ["zeb"])
    rows, _ = ix.load_index(path).bm25().search_rows_batch(["serengeti"], 5)[0]
    assert rows.size == 0


def test_bm25_top_from_postings_over_base_delta_and_tombstones_is_the_top_of_every_score(tmp_path):
    """The rows a query's terms' postings name (base rows, delta rows) hold every live row that scores:
    delta documents found, tombstoned base and delta rows out, the top the same as a scan of every score."""
    path = tmp_path / "idx"
    truth = build(path, n=300)
    upsert(path, truth, [("zeb", unit(np.ones((1, 16)))[0], "zebra migration across the serengeti"),
                         ("d7", unit(np.ones((1, 16)))[0], "giraffe necks and zebra stripes"),
                         ("gone", unit(np.ones((1, 16)))[0], "zebra document 12 to delete")])
    delete(path, truth, ["gone", "d12"])
    bm25 = ix.load_index(path).bm25()
    assert bm25.dead.sum() == 3  # d7's and d12's base rows, and the deleted delta row
    for text in ("zebra serengeti", "base document number 7", "document 12", "zebra", "nothing-matches-this"):
        query = bm25.query(text)
        scored = np.flatnonzero(query.scores > 0)
        assert not bm25.dead[scored].any() and set(scored.tolist()) <= set(query.candidates.tolist())
        for k in (1, 5, 400):
            assert query.top(k).tolist() == scored[np.lexsort((scored, -query.scores[scored]))][:k].tolist()


def test_a_kill_during_compaction_leaves_the_previous_version_serving(tmp_path):
    """kill -9 in the middle of a compaction: the delta version still serves, no write is lost."""
    path = tmp_path / "idx"
    truth = build(path, n=300)
    upsert(path, truth, [(f"n{j}", unit(np.ones((1, 16)) + j)[0], f"new {j}") for j in range(5)])
    before = ix.current_version_dir(path).name
    code = ("import os, numpy as np\n"
            "from dssm import index as ix\n"
            "import dssm.index.updates as up\n"
            "real = up._write_scann_and_bm25\n"
            "def dying(*a, **k):\n"
            "    real(*a, **k); os.kill(os.getpid(), 9)\n"
            "up._write_scann_and_bm25 = dying\n"
            f"ix.update_index({str(path)!r}, upsert_ids=['late'], upsert_titles=[''], upsert_texts=['late'],\n"
            "                upsert_vectors=np.ones((1, 16), np.float32), rebalance=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert ix.current_version_dir(path).name == before
    index = ix.load_index(path)
    assert SegmentLayout.of(index.manifest, index.version).delta and index.docs.row_of("late") is None
    assert_serves_exactly(index, truth, unit(np.random.default_rng(4).standard_normal((10, 16))))
    upsert(path, truth, [("late", unit(np.ones((1, 16)))[0], "late")], rebalance=True)  # the next one compacts
    assert_serves_exactly(ix.load_index(path), truth, unit(np.random.default_rng(5).standard_normal((10, 16))))


def test_compact_index_and_the_cli_fold_the_delta(tmp_path, capsys):
    from dssm.cli import main as dssm_main

    path = tmp_path / "idx"
    truth = build(path, n=200)
    assert ix.compact_index(path) is None  # a plain version: nothing to fold, no new version
    upsert(path, truth, [("a", unit(np.ones((1, 16)))[0], "aa")])
    delete(path, truth, ["d9"])
    assert dssm_main(["compact", "--index", str(path)]) == 0
    assert "compacted                True" in capsys.readouterr().out
    index = ix.load_index(path)
    assert index.layout.plain and index.layout.base_documents == 200
    assert_serves_exactly(index, truth, unit(np.random.default_rng(6).standard_normal((10, 16))))
    assert dssm_main(["compact", "--index", str(path)]) == 0
    assert "nothing to compact" in capsys.readouterr().out


def test_the_service_compacts_in_the_background_once_the_delta_reaches_half_its_limit(tmp_path):
    from serving.compaction import BackgroundCompactor

    path = tmp_path / "idx"
    truth = build(path, n=300)
    rng = np.random.default_rng(7)
    upsert(path, truth, [(f"n{j}", v, "t") for j, v in enumerate(unit(rng.standard_normal((450, 16))))])
    reloads: list[tuple[bool, list]] = []
    compactor = BackgroundCompactor(path, reload=lambda force: reloads.append((force, list(compactor._preloaded))),
                                    max_delta=1000)  # due at 500
    index = ix.load_index(path)
    assert index.pending_delta == 450 and compactor.after_write(index) is None
    delete(path, truth, [f"d{i}" for i in range(50)])
    index = ix.load_index(path)
    assert index.pending_delta == 500
    thread = compactor.after_write(index)
    assert thread is not None
    thread.join(timeout=120)  # `dssm compact --handshake` in a child process
    assert compactor.last_error is None and compactor.compactions == 1
    [(force, preloaded)] = reloads
    assert force and len(preloaded) == 1 and not compactor._preloaded  # loaded before the swap, released after
    compacted = ix.load_index(path)
    assert compacted._base is preloaded[0]  # the published version reuses the base loaded from the stage
    assert compacted.layout.plain and compacted.pending_delta == 0 and not compactor.due(compacted)
    assert_serves_exactly(compacted, truth, unit(rng.standard_normal((10, 16))))


def test_a_compaction_child_names_its_staged_version_before_it_publishes(tmp_path, caplog):
    from serving.compaction import compact_in_child

    path = tmp_path / "idx"
    truth = build(path, n=300)
    rng = np.random.default_rng(10)
    upsert(path, truth, [(f"n{j}", unit(rng.standard_normal((1, 16)))[0], f"new {j}") for j in range(5)])
    before = ix.current_version_dir(path).name
    seen: list[tuple[str, str]] = []

    def staged(stage):
        seen.append((stage.parent.parent.name, ix.current_version_dir(path).name))
        raise OSError("the service could not load it")  # logged; the child publishes all the same

    summary = compact_in_child(path, staged=staged)
    assert summary is not None and summary["version"] != before
    assert seen == [(".staging", before)]  # staged under the index, while the old version was live
    assert "could not load the staged compaction" in caplog.text
    assert ix.current_version_dir(path).name == summary["version"]
    assert_serves_exactly(ix.load_index(path), truth, unit(rng.standard_normal((10, 16))))


def test_a_handshake_compaction_whose_caller_is_gone_publishes_nothing(tmp_path):
    path = tmp_path / "idx"
    truth = build(path, n=200)
    rng = np.random.default_rng(11)
    upsert(path, truth, [(f"n{j}", unit(rng.standard_normal((1, 16)))[0], f"new {j}") for j in range(3)])
    before = ix.current_version_dir(path).name
    cli = "import sys; from dssm.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", cli, "compact", "--index", str(path), "--handshake"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and done.stdout.startswith("staged ")
    assert "the caller is gone; nothing was published" in done.stderr
    assert ix.current_version_dir(path).name == before and not any((path / ".staging").glob("*/*"))


def test_stopping_the_compactor_ends_its_child(tmp_path):
    from serving.compaction import BackgroundCompactor

    compactor = BackgroundCompactor(tmp_path, reload=lambda force: None)
    child = subprocess.Popen(["sleep", "60"])
    compactor._started(child)
    compactor.close()
    assert child.poll() is not None  # killed and reaped
    late = subprocess.Popen(["sleep", "60"])
    compactor._started(late)  # a child that starts after close() is ended at once
    assert late.wait(timeout=10) != 0


def test_preload_base_verifies_the_base_files_against_the_manifest(tmp_path):
    path = tmp_path / "idx"
    build(path, n=200)
    version = ix.current_version_dir(path)
    handle = ix.preload_base(version)
    assert ix.preload_base(version) is handle and ix.load_index(path)._base is handle
    del handle
    import gc

    gc.collect()
    (version / "embeddings.npy").chmod(0o644)
    with open(version / "embeddings.npy", "r+b") as f:  # same size, another byte
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ChecksumError, match="embeddings.npy"):
        ix.preload_base(version)


def test_writes_published_while_a_compaction_builds_are_carried_onto_its_base(tmp_path, monkeypatch):
    import dssm.index.updates as updates

    path = tmp_path / "idx"
    truth = build(path, n=300)
    rng = np.random.default_rng(8)
    upsert(path, truth, [(f"n{j}", unit(rng.standard_normal((1, 16)))[0], f"new {j}") for j in range(6)])
    delete(path, truth, ["d0", "n0"])
    real = updates._write_scann_and_bm25

    def with_writes_meanwhile(*args, **kwargs):
        real(*args, **kwargs)
        # Published between the compaction's read of the live version and its publish.
        upsert(path, truth, [("late", unit(rng.standard_normal((1, 16)))[0], "late"),  # a new id
                             ("n1", unit(rng.standard_normal((1, 16)))[0], "n1 again"),  # a delta doc replaced
                             ("d1", unit(rng.standard_normal((1, 16)))[0], "d1 again"),  # a base doc replaced
                             ("n2", truth["n2"][0], truth["n2"][1])])  # rewritten as it was: nothing to carry
        delete(path, truth, ["d2", "n3"])  # a base doc and a delta doc deleted

    monkeypatch.setattr(updates, "_write_scann_and_bm25", with_writes_meanwhile)
    result = ix.compact_index(path)
    assert result is not None and result.documents == len(truth)
    index = ix.load_index(path)
    # The new base holds what the compaction read; the late writes are a delta over it.
    assert index.layout.base_version == result.version and index.layout.base_documents == 300 - 1 + 5
    assert {d.id for d in index.deltas[0].docs} == {"late", "n1", "d1"} and index.layout.tombstones == 4
    assert_serves_exactly(index, truth, unit(rng.standard_normal((20, 16))))


def test_a_compaction_makes_its_new_base_durable_before_it_takes_the_writers_lock(tmp_path, monkeypatch):
    # Found by profiling the 1M HTTP write bench: syncing the new base (~1.2 GB) under the lock stalled
    # every write 4-5 s per compaction.
    import fcntl

    import dssm.index.updates as updates

    path = tmp_path / "idx"
    truth = build(path, n=300)
    rng = np.random.default_rng(9)
    upsert(path, truth, [(f"n{j}", unit(rng.standard_normal((1, 16)))[0], f"new {j}") for j in range(6)])
    synced: list[tuple[str, bool]] = []
    real = updates.fsync_tree

    def recording(stage, **kwargs):
        fd = os.open(path / ".update.lock", os.O_RDWR | os.O_CREAT)
        try:  # another open file description: fails while any writer holds the lock
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            free = True
        except BlockingIOError:
            free = False
        finally:
            os.close(fd)
        synced.append((Path(stage).name, free))
        real(stage, **kwargs)

    monkeypatch.setattr(updates, "fsync_tree", recording)
    result = ix.compact_index(path)
    assert result is not None and result.seconds["sync"] >= 0 and result.seconds["locked"] >= 0
    assert synced == [("version", True)]  # the staged base, the lock free
    assert_serves_exactly(ix.load_index(path), truth, unit(rng.standard_normal((20, 16))))


def test_a_compaction_holds_its_version_while_fast_writes_prune_old_ones(tmp_path, monkeypatch):
    # Found by the HTTP write bench: at 8 writes/s a version outlives retention (keep 10) by about a
    # second, less than a compaction takes, so the compaction lost its files mid-read and failed.
    import dssm.index.updates as updates

    path = tmp_path / "idx"
    truth = build(path, n=200)
    rng = np.random.default_rng(3)
    upsert(path, truth, [("a", unit(rng.standard_normal((1, 16)))[0], "aa")])
    real = updates._fold

    def pruned_meanwhile(base, *args, **kwargs):
        for j in range(4):  # each write prunes all but the 2 newest versions
            upsert(path, truth, [(f"late{j}", unit(rng.standard_normal((1, 16)))[0], f"late {j}")], keep_versions=2)
        assert base.is_dir()
        return real(base, *args, **kwargs)

    monkeypatch.setattr(updates, "_fold", pruned_meanwhile)
    result = ix.compact_index(path)
    assert result is not None and result.documents == len(truth)
    assert_serves_exactly(ix.load_index(path), truth, unit(rng.standard_normal((10, 16))))


def test_a_compaction_whose_base_was_replaced_meanwhile_publishes_nothing(tmp_path, monkeypatch):
    import dssm.index.updates as updates

    path = tmp_path / "idx"
    truth = build(path, n=100)
    upsert(path, truth, [("a", unit(np.ones((1, 16)))[0], "aa")])
    real = updates._write_scann_and_bm25

    def rebuilt_meanwhile(*args, **kwargs):
        real(*args, **kwargs)
        build(path, n=120, seed=9)  # a full build publishes a new base

    monkeypatch.setattr(updates, "_write_scann_and_bm25", rebuilt_meanwhile)
    assert ix.compact_index(path) is None
    index = ix.load_index(path)
    assert index.layout.plain and index.size == 120


def test_compaction_carries_the_bm25_state_over_equal_to_a_rebuild(tmp_path):
    """Only the folded documents are tokenised; the state equals one built from every document."""
    import json

    from dssm import bm25

    path = tmp_path / "idx"
    truth = build(path, n=200)
    base_terms = json.loads((ix.current_version_dir(path) / bm25.BM25_DIR / "vocab.json").read_text())
    rng = np.random.default_rng(10)
    upsert(path, truth, [(f"n{j}", unit(rng.standard_normal((1, 16)))[0], f"zebra {j} crossing the river")
                         for j in range(6)] + [("d4", unit(np.ones((1, 16)))[0], "topic zebra replaced")])
    delete(path, truth, ["d0", "d100", "n2"])
    version = ix.compact_index(path).version_dir
    ix.load_index(path)  # the compacted version passes its checksums
    bm25.write_bm25_state(tmp_path / "rebuilt", (doc for _, doc in ix.DocStore(version / "docs.sqlite").iter_all()))

    def columns(directory):
        arrays = {k: np.load(directory / f"{k}.npy") for k in ("data", "indices", "indptr", "tf", "lengths")}
        terms, ptr = json.loads((directory / "vocab.json").read_text()), arrays["indptr"]
        cols = {t: (arrays["indices"][ptr[i]:ptr[i + 1]].tolist(), arrays["data"][ptr[i]:ptr[i + 1]].tolist(),
                    arrays["tf"][ptr[i]:ptr[i + 1]].tolist()) for i, t in enumerate(terms) if ptr[i + 1] > ptr[i]}
        return cols, arrays["lengths"].tolist(), json.loads((directory / "params.json").read_text())["documents"]

    carried, rebuilt = columns(version / bm25.BM25_DIR), columns(tmp_path / "rebuilt" / bm25.BM25_DIR)
    assert carried == rebuilt and "zebra" in carried[0]
    # Carried over, not rebuilt: the base's term numbering stays (a rebuild numbers terms in row order).
    terms = json.loads((version / bm25.BM25_DIR / "vocab.json").read_text())
    assert terms[:len(base_terms)] == base_terms and terms != json.loads(
        (tmp_path / "rebuilt" / bm25.BM25_DIR / "vocab.json").read_text())


def test_a_failed_background_compaction_is_logged_and_leaves_the_index_serving(tmp_path):
    from serving.compaction import BackgroundCompactor

    path = tmp_path / "idx"
    truth = build(path, n=50)
    upsert(path, truth, [("a", unit(np.ones((1, 16)))[0], "aa")])
    before = ix.current_version_dir(path).name
    matrix = ix.current_version_dir(path) / "embeddings.npy"
    data = bytearray(matrix.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # one float becomes NaN in place: the compaction's checksum check fails
    matrix.write_bytes(bytes(data))
    reloads: list[bool] = []
    compactor = BackgroundCompactor(path, reload=lambda force: reloads.append(force))
    compactor.run()
    error = compactor.last_error or ""
    assert "exited with 2" in error and "embeddings.npy does not match its sha256" in error, error
    assert reloads == [] and compactor.compactions == 0 and ix.current_version_dir(path).name == before


@pytest.mark.slow
def test_soak_mixed_writes_reads_and_background_compactions_lose_nothing(tmp_path, tiny_model_dir, adi_dir):
    """Bounded soak on 127.0.0.1: 3 writers (through the writer child), 3 readers and the background compactor
    for a few seconds; at the end every acknowledged write is there, every acknowledged delete is gone, and the
    count adds up."""
    import threading
    import time

    import serving_support as support

    from serving.app import create_app
    from serving.backend import Backend
    from serving.client import NotFoundError, SearchClient
    from serving.writer import WriterProcess

    rows = support.adi_rows(adi_dir)
    index_dir = tmp_path / "index"
    support.build_version(index_dir, tiny_model_dir, rows)
    # Writes go through the writer child, as in `dssm serve`.
    backend = Backend(index_dir, watch_interval=0.1, loader=support.shared_encoder_loader(tiny_model_dir),
                      writer=WriterProcess(index_dir))
    backend.reload()
    backend.compactor.max_delta = 40  # compact in the background every ~20 rows changed
    live: dict[str, str] = {r["id"]: r["text"] for r in rows}
    lock, failures = threading.Lock(), []
    stop = threading.Event()
    with support.ServerThread(create_app(backend, api_key=support.API_KEY)) as server:
        def writer(w: int) -> None:
            client, rng = SearchClient(server.url, api_key=support.API_KEY, timeout=120), np.random.default_rng(w)
            i = 0
            while not stop.is_set():
                docs = [(f"w{w}-{i}-{j}", "", f"soak document {w} {i} {j} about retrieval") for j in range(3)]
                client.upsert(docs)
                with lock:
                    live.update({d[0]: d[2] for d in docs})
                    victim = sorted(live)[int(rng.integers(len(live)))]
                try:
                    client.delete(victim)
                    with lock:
                        live.pop(victim, None)
                except NotFoundError:  # another writer deleted it first
                    pass
                i += 1

        def reader(r: int) -> None:
            client = SearchClient(server.url, timeout=60)
            while not stop.is_set():
                try:
                    hits = client.search("retrieval of documents", k=5)
                    assert len(hits.hits) == 5
                    client.search("soak document", k=5, mode="bm25")
                except Exception as exc:  # noqa: BLE001 - collected, the test fails on any
                    failures.append(f"reader {r}: {type(exc).__name__}: {exc}")
                    return

        def guarded(fn, n):
            try:
                fn(n)
            except Exception as exc:  # noqa: BLE001 - collected, the test fails on any
                failures.append(f"{fn.__name__} {n}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=guarded, args=(writer, w)) for w in range(3)]
        threads += [threading.Thread(target=reader, args=(r,)) for r in range(3)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(8)
            # The writer child starts with the first write (TensorFlow's import: seconds on a busy machine),
            # so a fixed window could end before any compaction: go on until two have run under the load.
            support.wait_until(lambda: backend.compactor.compactions >= 2 or failures or backend.compactor.last_error,
                               timeout=180, what="two background compactions under load")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        support.wait_until(lambda: not backend.compactor._running.locked(), timeout=120, what="compaction")
        backend.reload()
        assert not failures, failures[:3]
        assert backend.compactor.compactions >= 1 and backend.compactor.last_error is None
        import httpx

        metrics = httpx.get(server.url + "/metrics").text
        assert support.metric_value(metrics, "dssm_index_compactions_total") == backend.compactor.compactions
        client = SearchClient(server.url)
        searcher = backend.current().searcher
        assert len(searcher) == len(live)
        stored = {doc.id: doc.text for _, doc in searcher.index.docs.iter_all()}
        assert stored == live
        for doc_id in sorted(live)[:: max(1, len(live) // 20)]:
            assert client.get_document(doc_id).text == live[doc_id]
    backend.stop()


def test_one_compaction_per_index_at_a_time(tmp_path):
    """With several server workers, the ones that find a compaction running skip theirs."""
    import fcntl

    path = tmp_path / "idx"
    truth = build(path, n=50)
    upsert(path, truth, [("a", unit(np.ones((1, 16)))[0], "aa")])
    with open(path / ".compact.lock", "a") as held:  # as another process's running compaction holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert ix.compact_index(path) is None
        assert not ix.load_index(path).layout.plain
    result = ix.compact_index(path)
    assert result is not None and ix.load_index(path).layout.plain


def test_the_compactor_ignores_a_searcher_without_one_index():
    from serving.compaction import BackgroundCompactor

    compactor = BackgroundCompactor(Path("unused"), reload=lambda force: None)
    assert not compactor.due(None) and compactor.after_write(None) is None
