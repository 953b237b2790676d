"""The benchmark harness (``python -m bench``): results files, README table, the PyTorch reference, a quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.harness import README_END, README_START, SCHEMA, Figure, Stats, update_readme, write_results

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("featurize", "train", "encode", "index", "query", "rerank", "write", "cold", "quality")


def _figure(part: str, ours: list[float], peer: list[float] | None, *, higher: bool = True) -> Figure:
    return Figure(part, f"{part} figure", "x/s", Stats.of(ours), "peer" if peer else None,
                  Stats.of(peer) if peer else None, higher_is_better=higher)


def _check_schema(data: dict, *, quick: bool) -> None:
    assert data["schema"] == SCHEMA and data["quick"] is quick
    machine = data["machine"]
    for key in ("cpu", "cores", "memory_gb", "python", "commit", "load_average", "versions"):
        assert key in machine, key
    assert machine["cores"] >= 1 and machine["versions"]["tensorflow"]
    for figure in data["figures"]:
        assert figure["part"] in data["parts"]
        for stats in [figure["ours"]] + ([figure["peer"]] if figure["peer"] else []):
            assert set(stats) == {"median", "min", "max", "runs"}
            assert stats["min"] <= stats["median"] <= stats["max"] and stats["runs"] >= 1
        if figure["peer"] and figure["peer"]["median"]:
            assert figure["ratio"] == pytest.approx(figure["ours"]["median"] / figure["peer"]["median"])
        else:
            assert figure["ratio"] is None
    for meta in data["parts"].values():
        assert {"time", "seconds", "load_average", "commit", "error"} <= set(meta)


def test_stats_of_is_median_min_max() -> None:
    assert Stats.of([3.0, 1.0, 2.0, 10.0]) == Stats(2.5, 1.0, 10.0, 4)
    assert Stats.one(4.0) == Stats(4.0, 4.0, 4.0, 1)
    with pytest.raises(ValueError, match="at least one"):
        Stats.of([])


def test_write_results_keeps_other_parts_and_reports_ratios(tmp_path: Path) -> None:
    first = write_results([_figure("train", [10, 20, 30], [5, 5, 5]), _figure("query", [2.0], [4.0], higher=False)],
                          out_dir=tmp_path, quick=False, errors={},
                          parts={"train": {"time": "t1", "seconds": 1.0, "load_average": [1, 1, 1]},
                                 "query": {"time": "t1", "seconds": 2.0, "load_average": [1, 1, 1]}}, order=ORDER)
    _check_schema(first, quick=False)
    assert [f["ratio"] for f in first["figures"]] == [4.0, 0.5]
    # Re-running one part replaces its figures and keeps the others' (in the parts' order).
    second = write_results([_figure("featurize", [7], None)], out_dir=tmp_path, quick=False,
                           errors={"train": "RuntimeError: boom"},
                           parts={"train": {"time": "t2", "seconds": 3.0, "load_average": [2, 2, 2],
                                            "commit": "abc1234+"},
                                  "featurize": {"time": "t2", "seconds": 4.0, "load_average": [2, 2, 2]}}, order=ORDER)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == second
    _check_schema(on_disk, quick=False)
    assert [f["part"] for f in on_disk["figures"]] == ["featurize", "query"]
    assert on_disk["parts"]["train"]["error"] == "RuntimeError: boom" and on_disk["errors"] == {
        "train": "RuntimeError: boom"}
    assert on_disk["parts"]["query"]["time"] == "t1"
    # The commit a part started at is kept, "+" meaning tracked files had uncommitted changes.
    assert (on_disk["parts"]["train"]["commit"], on_disk["parts"]["train"]["dirty_tree"]) == ("abc1234", True)
    assert "| train | t2 | abc1234 (+ uncommitted changes) | 3 |" in (tmp_path / "results.md").read_text()
    table = (tmp_path / "results.md").read_text()
    assert "| query | query figure | 2.00 x/s | peer | 4.00 x/s | 0.50× (ours better) |" in table
    assert "| train | **failed**: RuntimeError: boom |" in table
    # A quick run into the same directory does not mix with the full run's figures.
    third = write_results([_figure("train", [1], [1])], out_dir=tmp_path, quick=True, errors={},
                          parts={"train": {"time": "t3", "seconds": 1.0, "load_average": [0, 0, 0]}}, order=ORDER)
    assert [f["part"] for f in third["figures"]] == ["train"]


def test_a_partial_run_on_another_machine_keeps_each_parts_cpu(tmp_path: Path, monkeypatch) -> None:
    import bench.harness as harness

    facts = harness.machine_facts()
    monkeypatch.setattr(harness, "machine_facts", lambda: {**facts, "cpu": "Old CPU"})
    write_results([_figure("train", [1], [1]), _figure("query", [2.0], [4.0])], out_dir=tmp_path, quick=False,
                  errors={}, parts={"train": {"time": "t1", "seconds": 1.0, "load_average": [1, 1, 1]},
                                    "query": {"time": "t1", "seconds": 1.0, "load_average": [1, 1, 1]}}, order=ORDER)
    monkeypatch.setattr(harness, "machine_facts", lambda: {**facts, "cpu": "New CPU"})
    data = write_results([_figure("query", [3.0], [4.0])], out_dir=tmp_path, quick=False, errors={},
                         parts={"query": {"time": "t2", "seconds": 1.0, "load_average": [1, 1, 1]}}, order=ORDER)
    assert (data["parts"]["train"]["cpu"], data["parts"]["query"]["cpu"]) == ("Old CPU", "New CPU")
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("Measured by `make bench` on 2 machines (New CPU, Old CPU; each part's below)")
    assert "| train | t1 |" in table and table.split("| train | t1 |")[1].splitlines()[0].endswith("| Old CPU |")


def test_update_readme_replaces_only_the_marked_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{README_START}\nold table\n{README_END}\n\nafter\n")
    assert update_readme(readme, "| new | table |\n", command="make bench")
    text = readme.read_text()
    assert "old table" not in text and "| new | table |" in text
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith(f"{README_END}\n\nafter\n")
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, "| t |", command="make bench")
    assert plain.read_text() == "no markers\n"


@pytest.mark.slow
def test_torch_reference_is_the_same_model_as_dssm_model() -> None:
    """With the TF model's weights copied in, the PyTorch reference gives the same embeddings and loss."""
    torch = pytest.importorskip("torch")
    import dssm  # noqa: F401
    from dssm.features import FeatureConfig, Featurizer
    from dssm.model import DSSMModel, ModelConfig

    import tensorflow as tf  # noqa: E402  isort: skip

    from bench import torch_reference as ref

    tf.keras.utils.set_random_seed(1)
    features = FeatureConfig(num_buckets=997)
    config = ModelConfig(embedding_dim=12, hidden_dims=(10, 6))
    model = DSSMModel(config, feature_config=features)
    pairs = [("how do i learn python", "best way to learn python", "d1"),
             ("what is the capital of france", "paris is the capital of which country", "d2"),
             ("how to lose weight fast", "quick weight loss tips", "d3"),
             ("why is python popular", "best way to learn python", "d1")]  # d1 twice: an accidental hit
    featurizer = Featurizer(features)
    q_ids, q_counts = featurizer.bags(tf.constant([p[0] for p in pairs]))
    d_ids, d_counts = featurizer.bags(tf.constant([p[1] for p in pairs]))
    batch = {"query_ids": q_ids, "query_counts": q_counts, "document_ids": d_ids, "document_counts": d_counts,
             "document_id": tf.constant([p[2] for p in pairs])}
    tf_loss = float(model.compute_loss(batch))
    tower = model.query_tower

    net = ref.TorchDSSM(num_buckets=features.num_buckets, embedding_dim=config.embedding_dim,
                        hidden_dims=config.hidden_dims, init_stddev=config.embedding_init_stddev)
    with torch.no_grad():
        net.bag.weight.copy_(torch.from_numpy(tower.bag.table.numpy()))
        net.bias.copy_(torch.from_numpy(tower.bag_bias.numpy()))
        for layer, dense in zip(net.dense, tower.hidden, strict=True):
            layer.weight.copy_(torch.from_numpy(dense.kernel.numpy().T))
            layer.bias.copy_(torch.from_numpy(dense.bias.numpy()))
    (torch_batch,) = ref.make_batches(pairs, featurizer=featurizer, batch_size=len(pairs),
                                      combiner=config.bag_combiner)
    out = net(torch_batch.ids, torch_batch.offsets, torch_batch.weights).detach().numpy()
    np.testing.assert_allclose(out[:4], tower((q_ids, q_counts)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[4:], tower((d_ids, d_counts)).numpy(), rtol=1e-4, atol=1e-5)
    loss = float(ref.loss_fn(net, torch_batch, temperature=config.temperature).detach())
    assert loss == pytest.approx(tf_loss, rel=1e-4)
    # Without the mask the duplicate document counts as a negative and the loss changes.
    unmasked = ref.TorchBatch(torch_batch.ids, torch_batch.offsets, torch_batch.weights, torch.arange(4))
    assert float(ref.loss_fn(net, unmasked, temperature=config.temperature).detach()) > tf_loss + 0.01
    # One step: the table's gradient is sparse (Adagrad then updates only the touched rows).
    optimizer = ref.make_optimizer(net, learning_rate=0.05)
    before = net.bag.weight.detach().clone()
    ref.train_step(net, optimizer, torch_batch, temperature=config.temperature)
    assert net.bag.weight.grad.is_sparse
    changed = torch.nonzero((net.bag.weight.detach() != before).any(dim=1)).flatten().numpy()
    assert set(changed.tolist()) == set(torch_batch.ids.numpy().tolist())


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path: Path) -> None:
    """``python -m bench --quick`` on two cheap parts writes both files with the schema and every figure.

    The quality part is left out here (its quick run trains the whole label-free recipe on adi, ~40 s
    of CI); ``test_quality_part_reports_the_recipes_eval_beside_bm25`` checks its figures.
    """
    done = subprocess.run([sys.executable, "-m", "bench", "--part", "query", "rerank", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    _check_schema(data, quick=True)
    assert set(data["parts"]) == {"query", "rerank"} and data["errors"] == {}
    names = [f["name"] for f in data["figures"]]
    assert any("over HTTP, 64 clients, p99" in n for n in names)
    query = [f for f in data["figures"] if f["part"] == "query"]
    assert {f["unit"] for f in query} == {"ms", "queries/s"}
    assert all(f["peer"] and f["ours"]["runs"] == 2 for f in query)
    rerank = {f["name"]: f for f in data["figures"] if f["part"] == "rerank"}
    for design in ("knrm", "conv-knrm"):
        for p in (50, 95, 99):  # re-ranking 100 candidates, beside the first stage on the same queries
            figure = rerank[f"re-rank 100 candidates for one query ({design}), p{p}"]
            assert figure["unit"] == "ms" and figure["peer"] and figure["ours"]["runs"] == 2
            assert 0 < figure["ours"]["median"] and 0 < figure["peer"]["median"]
        graph = rerank[f"re-rank 100 candidates ({design}), SavedModel path, p50"]
        assert graph["ours"]["median"] > 0 and graph["peer"]["median"] > 0
        throughput = rerank[f"batch scoring throughput ({design})"]
        assert throughput["unit"] == "pairs/s" and throughput["ours"]["median"] > 0
    table = (tmp_path / "results.md").read_text()
    parts = ("| query |", "| rerank |")
    assert sum(line.startswith(parts) for line in table.splitlines()) == len(names) + 2


def test_quality_part_reports_the_recipes_eval_beside_bm25(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench.part_quality.run``: the recipe runs once per set (adi when quick) in a temporary directory,
    its ``dssm eval`` report becomes DSSM's and the default search's figures beside BM25's, with the
    paired test's p and the stored weight in the notes, and the directory is removed afterwards."""
    import bench.part_quality as part
    import bench.quality_table as quality_table

    calls = []
    report = {"queries": 35, "docs": 82, "dssm": {"ndcg@10": 0.5, "recall@100": 0.9},
              "hybrid": {"ndcg@10": 0.52}, "bm25": {"ndcg@10": 0.48, "recall@100": 0.85},
              "significance": {"bm25 vs dssm": {"ndcg@10": 0.031}}, "hybrid_tuning": {"weight": 0.5}}

    def fake_run_set(name, *, seeds, work, reuse, data_root, run_command):
        calls.append((name, seeds, reuse, data_root, run_command))
        (work / name / "seed0").mkdir(parents=True)
        (work / name / "seed0" / "eval.json").write_text(json.dumps(report))

    monkeypatch.setattr(quality_table, "run_set", fake_run_set)
    monkeypatch.setattr(part.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "work"))
    figures = {f.name: f for f in part.run(quick=True)}
    assert calls == [("adi", [0], False, part.DATASETS, part._in_process)]
    assert not (tmp_path / "work").exists()
    label = "adi (35 queries, 82 docs, seed 0)"
    assert list(figures) == [f"ndcg@10 dssm, {label}", f"ndcg@10 hybrid, {label}", f"recall@100 dssm, {label}"]
    dense, hybrid, recall = figures.values()
    assert (dense.ours.median, dense.peer.median, dense.unit) == (0.5, 0.48, "ndcg@10")
    assert dense.note == "DSSM alone; p = 0.031 (paired randomisation)"
    assert (hybrid.ours.median, hybrid.note) == (0.52, "the default search; weight 0.50 on DSSM, stored by dssm index")
    assert (recall.ours.median, recall.peer.median) == (0.9, 0.85)


def test_write_part_counts_only_the_bytes_a_version_wrote(tmp_path: Path) -> None:
    """``bench.part_write.new_bytes``: a file hard-linked from an earlier version costs a write nothing."""
    from bench.part_write import new_bytes

    old, new = tmp_path / "v1", tmp_path / "v2"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "matrix.npy").write_bytes(b"x" * 100)
    (new / "sub").mkdir(parents=True)
    os.link(old / "sub" / "matrix.npy", new / "sub" / "matrix.npy")
    (new / "sub" / "docs.sqlite").write_bytes(b"y" * 50)
    (new / "manifest.json").write_bytes(b"z" * 7)
    assert new_bytes(new) == 57
    assert new_bytes(old) == 0  # its only file is shared with v2


def test_real_vectors_are_distinct_document_windows_and_unseen_queries() -> None:
    from bench.real_vectors import windows

    texts, queries = windows(3000, seed=1)
    assert len(texts) == len(set(texts)) == 3000 and len(queries) == 1000
    assert not set(queries) & set(texts)
    assert all(4 <= len(t.split()) <= 24 or len(t.split()) < 4 for t in texts)  # short documents give short windows
    assert windows(3000, seed=1) == (texts, queries)


def test_ann_sweep_finds_the_exact_neighbours_when_every_leaf_is_searched() -> None:
    from bench.ann_sweep import build, sweep
    from bench.part_index import make_vectors
    from dssm.index.ann import exact_top_k

    docs, queries = make_vectors(4000, queries=60, seed=3)
    truth = exact_top_k(docs, queries, 10)[0]
    searcher = build(docs, {"leaves": 20, "train": 4000, "spherical": True, "soar_lambda": 1.0, "reorder": 200})
    everything = sweep(searcher, queries, truth, leaves=20, pre=200)
    assert everything["recall"] >= 0.99 and everything["qps"] > 0 and everything["p50_ms"] > 0


def test_ann_sweep_measures_hnswlib_on_the_same_vectors_by_its_ef() -> None:
    pytest.importorskip("hnswlib")  # the bench extra
    from bench.ann_sweep import build_hnsw, sweep
    from bench.part_index import make_vectors
    from dssm.index.ann import exact_top_k

    docs, queries = make_vectors(3000, queries=60, seed=4)
    truth = exact_top_k(docs, queries, 10)[0]
    index = build_hnsw(docs, {"hnsw": 8, "efc": 32})
    low, high = (sweep(index, queries, truth, leaves=ef, pre=0)["recall"] for ef in (10, 400))
    assert high >= 0.99 and low < high  # ef is the knob that is swept


def test_tagging_table_zero_shot_only_names_the_teacher_and_leaves_out_the_trained_rows() -> None:
    from bench.tagging_table import markdown

    run = {"means": {"p@1": 0.5, "p@3": 0.25, "r@5": 0.75, "map": 0.125}}
    result = {"seeds": [0, 1], "teacher": "minilm", "zero_shot": [run, {"means": {**run["means"], "p@1": 0.25}}],
              "minilm": {"means": {"p@1": 0.625, "p@3": 0.5, "r@5": 0.875, "map": 0.375}}}
    table = markdown(result)
    lines = table.splitlines()
    assert lines[0].startswith("Zero-shot") and "micro_f1" not in table and "Few-shot" not in table
    # mean ± sample std of the two seeds' p@1 (0.5, 0.25): 0.375 ± 0.1768
    assert "| towers trained label-free on the texts, distilling minilm (2 seeds) | 0.3750 ± 0.1768 |" in table
    assert lines[-1] == "| all-MiniLM-L6-v2 | 0.6250 | 0.5000 | 0.8750 | 0.3750 |"
    # the lexical modes' rows come with the runs that measured them
    result["zero_shot"] = [{**r, "hybrid": {**run["means"], "p@1": 0.75}} for r in result["zero_shot"]]
    assert "| the same, `--mode hybrid` (towers + BM25 over the descriptions) | 0.7500 ± 0.0000 |" in markdown(result)
    assert "--mode bm25" not in markdown(result)


def test_tagging_table_trained_only_has_every_trained_system_the_baseline_and_the_speed() -> None:
    from bench.tagging_table import FIGURES, TRAINED, markdown

    def run(micro: float) -> dict:
        return {"means": {m: (micro if m == "micro_f1" else 0.5) for m in FIGURES}}

    result = {"seeds": [0, 1], "trained": {name: [run(0.5), run(0.25)] for name in TRAINED},
              "lr": {m: 0.625 for m in FIGURES}, "speed": {"texts_per_second": 21000.4, "texts": 10000}}
    lines = markdown(result).splitlines()
    assert "Zero-shot" not in "\n".join(lines) and "Few-shot" not in "\n".join(lines)
    # header, rule, one row per trained system, logistic regression, blank, speed
    assert len(lines) == 2 + len(TRAINED) + 1 + 2
    others = " | ".join(["0.5000 ± 0.0000"] * 5)
    assert lines[2] == f"| towers, multilabel (2 seeds) | 0.3750 ± 0.1768 | {others} |"
    assert lines[2 + len(TRAINED)].startswith("| TF-IDF + one-vs-rest logistic regression | 0.6250 |")
    assert lines[-1] == "Speed: 21,000 texts/s tagging 10,000 texts in process (trained tags index, seed 0, best of 3)."


def test_tagging_table_full_run_orders_trained_zero_shot_few_shot_then_speed() -> None:
    from bench.tagging_table import FIGURES, SHOTS, TRAINED, markdown

    means = {m: 0.5 for m in (*FIGURES, "p@3", "r@5")}
    few = {str(k): {"means": means, "fine_tuned": {"texts": k * 10, "means": means}} for k in SHOTS}
    result = {"seeds": [0], "teacher": "", "trained": {name: [{"means": means}] for name in TRAINED},
              "lr": means, "speed": {"texts_per_second": 20000.0, "texts": 10000},
              "zero_shot": [{"means": means}], "minilm": {"means": means}, "few_shot": few,
              "few_shot_lr": {str(k): means for k in SHOTS}}
    table = markdown(result)
    order = [table.index(marker) for marker in ("| towers, multilabel (1 seeds)", "| TF-IDF", "Zero-shot",
                                                "| all-MiniLM-L6-v2", "Few-shot", "| 20 | 200 |", "Speed: 20,000")]
    assert order == sorted(order), table
    assert table.count("Speed:") == 1


def test_quality_table_runs_a_users_own_collection_with_the_label_free_recipe(tmp_path: Path) -> None:
    """`python -m bench.quality_table --data DIR --sets NAME`: a set that is not one of ours gets the
    label-free recipe, every step reading the user's directory (docs/quality.md, "Outside sets")."""
    from bench.quality_table import main, recipe

    data, work = tmp_path / "collections", tmp_path / "work"
    steps = [argv for _, argv in recipe("mine", data / "mine", work, seed=0)]
    commands = [argv[0] for argv in steps]
    assert commands == ["pairs", "train", "lsa", "select", "index", "eval"]
    assert steps[0][steps[0].index("--format") + 1] == "corpus"
    assert steps[-1][steps[-1].index("--data") + 1] == str(data / "mine")
    assert "--hybrid-pairs" in steps[-2]
    with pytest.raises(RuntimeError, match=f"pairs --input {data / 'mine'} "):  # nothing there: the first step fails
        main(["--sets", "mine", "--data", str(data), "--work", str(work), "--out", str(tmp_path / "q.json"),
              "--seeds", "0"])


def test_quality_table_runs_a_users_labelled_collection_with_debian_devs_recipe(tmp_path: Path) -> None:
    """A set of the user's whose pairs.tsv has query/document/doc_id columns runs the labelled passage recipe
    (debian-dev's steps on the user's files: second round, weight tuned on the pairs' split, wide tower, three
    BM25 documents per span); a pairs.tsv of other columns leaves the set label-free."""
    from bench.quality_table import recipe
    from dssm.demo import WIDE_TOWER

    data, work = tmp_path / "collections", tmp_path / "work"
    (data / "mine").mkdir(parents=True)
    (data / "mine" / "pairs.tsv").write_text("query\tdocument\tdoc_id\nshort words\ta long text\td1\n")
    steps = [argv for _, argv in recipe("mine", data / "mine", work, seed=0)]
    debian = [argv for _, argv in recipe("debian-dev", data / "debian-dev", work, seed=0)]
    assert [argv[0] for argv in steps] == [argv[0] for argv in debian] == [
        "pairs", "train", "pairs", "train", "index", "mine", "train", "select", "index", "eval"]
    labelled = steps[2]
    assert labelled[labelled.index("--input") + 1] == str(data / "mine" / "pairs.tsv")
    assert labelled[labelled.index("--document-id-column") + 1] == "doc_id"
    assert "--validation-fraction" not in labelled  # `dssm pairs`' default, as a user's
    assert steps[0][steps[0].index("--bm25-span-pairs") + 1] == "3"
    assert all(" ".join(WIDE_TOWER) in " ".join(argv) for argv in steps if argv[0] == "train")
    index = steps[-2]
    assert index[index.index("--hybrid-pairs") + 1] == str(work / "mine" / "pairs")
    assert steps[-1][steps[-1].index("--data") + 1] == str(data / "mine")
    assert "--holdout" not in steps[-1]
    (data / "mine" / "pairs.tsv").write_text("question1\tquestion2\tis_duplicate\na\tb\t1\n")
    assert [argv[0] for _, argv in recipe("mine", data / "mine", work, seed=0)] == [
        "pairs", "train", "lsa", "select", "index", "eval"]
    # a BEIR download with a training split: the same recipe, its pairs read by `dssm pairs --format beir`
    (data / "beir" / "qrels").mkdir(parents=True)
    (data / "beir" / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    beir = [argv for _, argv in recipe("beir", data / "beir", work, seed=0)]
    assert [argv[0] for argv in beir] == [argv[0] for argv in debian]
    assert beir[2][beir[2].index("--input") + 1] == str(data / "beir")
    assert beir[2][beir[2].index("--format") + 1] == "beir"


def test_quality_table_corpus_pairs_flags_reach_only_the_corpus_pairs_step(tmp_path: Path) -> None:
    """`--corpus-pairs '--bm25-span-pairs 3'` (a screen's variant) changes the pre-training pairs' command
    and nothing else; a one-sentence corpus, paired as neighbours, does not take corpus flags."""
    from bench.quality_table import recipe

    plain = [argv for _, argv in recipe("mine", tmp_path / "mine", tmp_path / "work", seed=0)]
    varied = [argv for _, argv in recipe("mine", tmp_path / "mine", tmp_path / "work", seed=0,
                                         corpus_pairs=("--bm25-span-pairs", "3"))]
    assert varied[0][varied[0].index("--bm25-span-pairs") + 1] == "3"
    assert "--bm25-span-pairs" not in plain[0]
    assert varied[1:] == plain[1:]
    neighbours = recipe("quora-dev", tmp_path / "quora-dev", tmp_path / "work", seed=0,
                        corpus_pairs=("--bm25-span-pairs", "3"))
    assert all("--bm25-span-pairs" not in argv for _, argv in neighbours)


def test_quality_table_sets_with_pairs_train_the_wide_tower_and_passages_three_bm25_documents(tmp_path: Path
                                                                                             ) -> None:
    """Both sets with labelled pairs give every training step the wide tower's shape; the passage corpus
    (debian-dev) also pre-trains on ``--bm25-span-pairs 3``, the question corpus (neighbour pairs) does not; a
    user's label-free corpus keeps the defaults, and an explicit ``()`` restores them (a screen against the
    default recipe)."""
    from bench.quality_table import recipe
    from dssm.demo import WIDE_TOWER

    def trains(steps):
        return [argv for _, argv in steps if argv[0] == "train"]

    debian = recipe("debian-dev", tmp_path / "debian-dev", tmp_path / "work", seed=0)
    assert debian[0][1][debian[0][1].index("--bm25-span-pairs") + 1] == "3"
    quora = recipe("quora-dev", tmp_path / "quora-dev", tmp_path / "work", seed=0)
    assert all("--bm25-span-pairs" not in argv for _, argv in quora)
    for steps in (debian, quora):
        # pre-training, round 1, the mined round 2 (and quora-dev's duplicates recipe)
        assert len(trains(steps)) == (3 if steps is debian else 4)
        assert all(" ".join(WIDE_TOWER) in " ".join(argv) for argv in trains(steps))
    for name in ("debian-dev", "quora-dev"):
        plain = recipe(name, tmp_path / name, tmp_path / "work", seed=0, tower=(), corpus_pairs=())
        assert all("--embedding-dim" not in argv and "--bm25-span-pairs" not in argv for _, argv in plain)
    steps = recipe("mine", tmp_path / "mine", tmp_path / "work", seed=0)
    assert all("--embedding-dim" not in argv and "--bm25-span-pairs" not in argv for _, argv in steps)
    # With the teacher, the question corpus keeps the default shape (a tie on its split); the passage corpus not.
    taught = recipe("quora-dev", tmp_path / "quora-dev", tmp_path / "work", seed=0, teacher="minilm")
    assert all("--embedding-dim" not in argv for argv in trains(taught))
    taught = recipe("debian-dev", tmp_path / "debian-dev", tmp_path / "work", seed=0, teacher="minilm")
    assert all(" ".join(WIDE_TOWER) in " ".join(argv) for argv in trains(taught))


def test_tower_screen_hashes_each_word_as_the_towers_do() -> None:
    """The screen's per-word layout holds the same tokens as the default featurizer's bag (ids shifted by 1,
    0 pads): every design in it reads what the product's towers read."""
    from collections import Counter

    from bench.tower_screen import _Words
    from dssm.hashing import FeatureConfig, token_bag

    features = FeatureConfig()
    words = _Words(features)
    text = "Real-time strategy game of ancient warfare (data files)"
    word_ids, bigrams = words.encode([text, ""], 12)
    rows = np.asarray(words.rows)[word_ids[0]]
    screened = Counter((rows[rows > 0] - 1).tolist()) + Counter((bigrams[0][bigrams[0] > 0] - 1).tolist())
    ids, counts = token_bag(text, features)
    assert screened == Counter(dict(zip(ids.tolist(), counts.astype(int).tolist(), strict=True)))
    assert not word_ids[1].any() and not bigrams[1].any()
    assert (word_ids[0] > 0).sum() == 9  # "real", "time", ..., "files"


def test_passage_screen_best_window_by_hand() -> None:
    from bench.passage_screen import best_window_scores

    queries = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    windows = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], dtype=np.float32)
    owners = np.array([0, 0, 1, 1])  # document 0: windows 0-1; document 1: windows 2-3
    np.testing.assert_allclose(best_window_scores(queries, windows, owners), [[1.0, 0.8], [0.8, 1.0]])


def _word_count_encoder(vocabulary: list[str]):
    def encode(texts: list[str]) -> np.ndarray:
        counts = np.array([[text.split().count(word) for word in vocabulary] for text in texts], dtype=np.float32)
        return counts / np.linalg.norm(counts, axis=1, keepdims=True)
    return encode


def test_passage_screen_finds_a_diluted_document_by_its_window(tmp_path: Path) -> None:
    from bench.passage_screen import screen, validation_queries
    from dssm.bm25 import BM25Index
    from dssm.data import split_of
    from dssm.errors import InputError

    # d0 holds both query words among 30 fillers: its whole cosine 0.047 is below d1's 0.224, while its
    # first window's (0.577) lifts it above d1 (0.224 + 0.224 = 0.447 < 0.047 + 0.577).
    texts = ["apple banana " + "kiwi " * 30, "apple lemon lemon lemon", "plum plum pear"]
    ids = ["d0", "d1", "d2"]
    encode = _word_count_encoder(["apple", "banana", "kiwi", "lemon", "plum", "pear"])
    runs = screen(embed_documents=encode, embed_queries=encode, texts=texts, ids=ids, queries={"q": "apple banana"},
                  qrels={"q": {"d0": 1}}, bm25=BM25Index.build(ids, texts), window=4, stride=2, weight=1.0, k=3)
    assert [doc for doc, _ in runs["dssm"]["q"]][:2] == ["d1", "d0"]
    assert [doc for doc, _ in runs["dssm+windows"]["q"]][:2] == ["d0", "d1"]
    assert runs["dssm+windows@100"]["q"] == runs["dssm+windows"]["q"]
    assert [doc for doc, _ in runs["hybrid+windows"]["q"]][:2] == ["d0", "d1"]  # weight 1: the dense order
    assert runs["hybrid+windows@100"]["q"] == runs["hybrid+windows"]["q"]  # three documents: all candidates
    assert runs["bm25"]["q"][0][0] == "d0"
    # A query that is itself a document (Quora's view) with skip_self: never its own hit, still k deep.
    own = screen(embed_documents=encode, embed_queries=encode, texts=texts, ids=ids, queries={"d1": "apple lemon"},
                 qrels={"d1": {"d0": 1}}, bm25=BM25Index.build(ids, texts), window=4, stride=2, weight=0.5, k=2,
                 skip_self=True)
    assert all([doc for doc, _ in run["d1"]] == ["d0", "d2"] for run in own.values())

    rows = [(f"question number {i} about apples", f"d{i % 3}") for i in range(200)] + [("a lost one", "d9")]
    table = tmp_path / "pairs.tsv"
    table.write_text("query\tdoc_id\n" + "".join(f"{q}\t{d}\n" for q, d in rows))
    queries, qrels = validation_queries(table, corpus_ids=set(ids), fraction=0.2)
    expected = [(q, d) for q, d in rows if d in ids and split_of(q, validation_fraction=0.2) == "validation"]
    assert 0 < len(expected) < 200
    assert [(queries[qid], next(iter(qrels[qid]))) for qid in queries] == expected
    with pytest.raises(InputError, match="no validation pair"):
        validation_queries(table, corpus_ids={"d9"}, fraction=0.0)


def test_windows_latency_times_every_query_after_the_warmup_in_the_mode_asked() -> None:
    from bench.windows_latency import time_searches

    calls = []

    class Slow:
        def search(self, text, k, mode):
            calls.append((text, k, mode))
            time.sleep(0.002 if text == "q9" else 0.0)

    got = time_searches(Slow(), [f"q{i}" for i in range(10)], mode="hybrid", warmup=3)
    assert calls == [(f"q{i}", 10, "hybrid") for i in range(10)]
    assert got["p99_ms"] >= 1.5 > got["p50_ms"]  # only q9 is slow: the tail, not the median


def test_write_bench_settles_every_write_into_the_base_the_server_serves(tmp_path: Path, tiny_model_dir: Path,
                                                                         adi_dir: Path) -> None:
    """``bench.write_http.settle``: after writes, the idle baseline is taken on the grown index with no delta
    left, and only once the service serves that version."""
    import serving_support as support

    from bench.write_http import settle
    from dssm import index as ix
    from dssm.artifacts import read_manifest
    from dssm.index.segments import SegmentLayout
    from serving.app import create_app
    from serving.backend import Backend
    from serving.client import SearchClient

    rows = support.adi_rows(adi_dir)
    index_dir = tmp_path / "index"
    support.build_version(index_dir, tiny_model_dir, rows[:30])
    backend = Backend(index_dir, watch_interval=0.1, loader=support.shared_encoder_loader(tiny_model_dir))
    backend.compactor.max_delta = 10_000  # no background compaction: settle must fold the delta itself
    with support.ServerThread(create_app(backend, api_key=support.API_KEY)) as server:
        support.wait_until(lambda: backend.snapshot is not None, timeout=30, what="the index to load")
        with SearchClient(server.url, api_key=support.API_KEY, retries=0) as client:
            written = client.upsert([(f"new-{i}", f"a new document number {i} about retrieval") for i in range(5)])
        live = ix.current_version_dir(index_dir)
        assert live.name == written.version and not SegmentLayout.of(read_manifest(live), live.name).plain
        assert settle(index_dir, server.url) > 0
        live = ix.current_version_dir(index_dir)
        assert live.name != written.version and SegmentLayout.of(read_manifest(live), live.name).plain
        assert backend.current().version == live.name and backend.current().documents == 35
        assert settle(index_dir, server.url) >= 0  # nothing left to fold: returns at once
        assert ix.current_version_dir(index_dir).name == live.name


def test_paced_write_bench_keeps_its_schedule_when_batches_are_slower_than_its_interval(monkeypatch) -> None:
    """The paced writer is an open loop: a batch leaves at its slot while earlier ones wait on answers, so a
    slow service still receives the rate the phase names (a closed loop would send half the batches here)."""
    import threading

    import serving.client
    from bench import write_http

    busy, most, lock, sent = [0], [0], threading.Lock(), []

    class SlowClient:
        def __init__(self, url, *, api_key, timeout):
            pass

        def upsert(self, documents):
            with lock:
                busy[0] += 1
                most[0] = max(most[0], busy[0])
            time.sleep(0.12)  # every answer takes 2.4 batch intervals
            with lock:
                busy[0] -= 1
                sent.extend(doc_id for doc_id, _, _ in documents)

    monkeypatch.setattr(serving.client, "SearchClient", SlowClient)
    texts = [f"text {i}" for i in range(100)]
    got = write_http._writer("http://unused", texts, batch=2, seconds=0.5, rate=40.0, prefix="p")
    assert got["docs"] == 20 and sorted(sent) == sorted(f"p{i}" for i in range(20))  # 10 slots of 50 ms
    assert 2 <= most[0] <= write_http.PACED_IN_FLIGHT and got["late_batches"] == 0
    assert len(got["batch_ms"]) == 10 and min(got["batch_ms"]) >= 110
    assert got["seconds"] < 0.5 + 0.3  # the last slot at 0.45 s, answered 0.12 s later

    busy[0] = most[0] = 0
    back_to_back = write_http._writer("http://unused", texts, batch=2, seconds=0.5, rate=0.0, prefix="h")
    assert most[0] == 1 and back_to_back["docs"] == 2 * len(back_to_back["batch_ms"]) <= 10


def test_quality_table_pretrain_flags_reach_only_the_pre_training(tmp_path: Path) -> None:
    """`--pretrain '--label-smoothing 0.5'` (a screen's variant) changes the label-free pre-training's command and
    nothing else, on a labelled set and on a label-free one."""
    from bench.quality_table import recipe

    for name in ("debian-dev", "cranfield"):
        plain = recipe(name, tmp_path / name, tmp_path / "work", seed=0)
        varied = recipe(name, tmp_path / name, tmp_path / "work", seed=0, pretrain=("--label-smoothing", "0.5"))
        changed = [i for i, (a, b) in enumerate(zip(plain, varied, strict=True)) if a != b]
        assert changed == [1] and plain[1][1][0] == "train" and "--init-from" not in plain[1][1]
        assert varied[1][1][varied[1][1].index("--label-smoothing") + 1] == "0.5"
