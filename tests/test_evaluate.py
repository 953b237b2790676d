"""Metrics against hand-computed values, skip-self, the BM25 baseline on ADI, and the `dssm eval` CLI."""

from __future__ import annotations

import json
from math import log2

import pytest
from conftest import dataset

from dssm.bm25 import BM25Config, BM25Index, tokenize
from dssm.cli import main as cli_main
from dssm.data import document_text, read_beir
from dssm.errors import ConfigError, IndexNotFoundError, InputError
from dssm.evaluate import main
from dssm.metrics import (
    DEFAULT_METRICS,
    drop_self,
    evaluate_run,
    evaluated_queries,
    exact_run,
    format_table,
    metric_depth,
    mrr_at_k,
    ndcg_at_k,
    paired_randomization_test,
    parse_metric,
    per_query_metrics,
    reciprocal_rank_fusion,
    report_dict,
    retrieve_run,
    sample_queries,
    select_queries,
    significance,
    split_tuning_queries,
    trec_run_lines,
)

# ------------------------------------------------------------------ a 3-query example, computed by hand
#
# q1 relevant d1 (grade 2), d2 (grade 1); d3 judged non-relevant (0). Ranking: d3 d1 d9 d2
# q2 relevant d4 (grade 3).                                            Ranking: d10 d11 d4
# q3 relevant d5 d6 d7 (grade 1 each).                                 Ranking: d5 d12 d6
# q4 has only a non-relevant judgement: skipped by every metric.

GRADED = {
    "q1": {"d1": 2, "d2": 1, "d3": 0},
    "q2": {"d4": 3},
    "q3": {"d5": 1, "d6": 1, "d7": 1},
    "q4": {"d8": 0},
}
RUN = {
    "q1": [("d3", 9.0), ("d1", 8.0), ("d9", 7.0), ("d2", 6.0)],
    "q2": [("d10", 3.0), ("d11", 2.0), ("d4", 1.0)],
    "q3": [("d5", 0.9), ("d12", 0.8), ("d6", 0.7)],
    "q4": [("d8", 1.0)],
}
METRICS = ("ndcg@10", "ndcg@2", "recall@1", "recall@10", "mrr@10", "mrr@1", "precision@2", "map@10", "recall@5",
           "recall@100", "precision@10", "map@100")

# nDCG with linear gain grade / log2(rank + 1); ideal DCG from the sorted positive grades.
Q1_NDCG10 = (2 / log2(3) + 1 / log2(5)) / (2 / log2(2) + 1 / log2(3))  # ≈ 0.6433
Q1_NDCG2 = (2 / log2(3)) / (2 / log2(2) + 1 / log2(3))  # ≈ 0.4796
Q2_NDCG10 = (3 / log2(4)) / (3 / log2(2))  # = 0.5
Q3_NDCG10 = (1 / log2(2) + 1 / log2(4)) / (1 / log2(2) + 1 / log2(3) + 1 / log2(4))  # ≈ 0.7039
Q3_NDCG2 = (1 / log2(2)) / (1 / log2(2) + 1 / log2(3))  # ≈ 0.6131

EXPECTED = {
    "ndcg@10": {"q1": Q1_NDCG10, "q2": Q2_NDCG10, "q3": Q3_NDCG10},
    "ndcg@2": {"q1": Q1_NDCG2, "q2": 0.0, "q3": Q3_NDCG2},
    "recall@1": {"q1": 0.0, "q2": 0.0, "q3": 1 / 3},
    "recall@10": {"q1": 1.0, "q2": 1.0, "q3": 2 / 3},
    "mrr@10": {"q1": 1 / 2, "q2": 1 / 3, "q3": 1.0},
    "mrr@1": {"q1": 0.0, "q2": 0.0, "q3": 1.0},
    "precision@2": {"q1": 1 / 2, "q2": 0.0, "q3": 1 / 2},
    # AP: precision at each relevant rank, summed, / number relevant.
    "map@10": {"q1": (1 / 2 + 2 / 4) / 2, "q2": (1 / 3) / 1, "q3": (1 / 1 + 2 / 3) / 3},
    # Issue 6's cut-offs: every relevant doc of q1/q2 is within rank 4; q3 finds d5 (1) and d6 (3) of 3.
    "recall@5": {"q1": 1.0, "q2": 1.0, "q3": 2 / 3},
    "recall@100": {"q1": 1.0, "q2": 1.0, "q3": 2 / 3},
    "precision@10": {"q1": 2 / 10, "q2": 1 / 10, "q3": 2 / 10},
    "map@100": {"q1": (1 / 2 + 2 / 4) / 2, "q2": (1 / 3) / 1, "q3": (1 / 1 + 2 / 3) / 3},
}


def test_per_query_metrics_graded_match_hand_computed():
    per_query = per_query_metrics(RUN, GRADED, METRICS)
    assert set(per_query) == set(METRICS)
    for metric, values in EXPECTED.items():
        assert per_query[metric].keys() == values.keys(), metric  # q4 (no relevant doc) skipped
        for qid, value in values.items():
            assert per_query[metric][qid] == pytest.approx(value), (metric, qid)


def test_means_graded_match_hand_computed():
    result = evaluate_run("sys", RUN, GRADED, metrics=METRICS)
    assert result.num_queries == 3
    assert result.means["recall@1"] == pytest.approx(1 / 9)
    assert result.means["recall@10"] == pytest.approx(8 / 9)
    assert result.means["mrr@10"] == pytest.approx(11 / 18)
    assert result.means["precision@2"] == pytest.approx(1 / 3)
    assert result.means["map@10"] == pytest.approx(25 / 54)
    assert result.means["ndcg@10"] == pytest.approx((Q1_NDCG10 + 0.5 + Q3_NDCG10) / 3)
    assert result.means["ndcg@10"] == pytest.approx(0.61574, abs=1e-5)


def test_binary_qrels_ndcg_hand_computed():
    binary = {q: {d: int(g > 0) for d, g in grades.items()} for q, grades in GRADED.items()}
    per_query = per_query_metrics(RUN, binary, ("ndcg@10", "recall@10", "mrr@10"))
    # q1 with both relevant docs at grade 1: ranks 2 and 4; ideal ranks 1 and 2.
    assert per_query["ndcg@10"]["q1"] == pytest.approx((1 / log2(3) + 1 / log2(5)) / (1 + 1 / log2(3)))
    assert per_query["ndcg@10"]["q2"] == pytest.approx(0.5)
    # Recall and MRR ignore the grade.
    assert per_query["recall@10"] == pytest.approx(EXPECTED["recall@10"])
    assert per_query["mrr@10"] == pytest.approx(EXPECTED["mrr@10"])
    # So do precision and AP: on binary qrels every issue-6 metric but nDCG equals the graded value.
    binary_all = per_query_metrics(RUN, binary, DEFAULT_METRICS)
    for metric in DEFAULT_METRICS:
        if not metric.startswith("ndcg"):
            assert binary_all[metric] == pytest.approx(EXPECTED[metric]), metric


def test_ndcg_gain_is_linear_not_exponential():
    # Grade 3 at rank 2 after a grade-1 doc: linear gain 1 + 3/log2(3) over ideal 3 + 1/log2(3).
    value = ndcg_at_k(["a", "b"], {"a": 1, "b": 3}, 10)
    assert value == pytest.approx((1 + 3 / log2(3)) / (3 + 1 / log2(3)))
    exponential = (1 + 7 / log2(3)) / (7 + 1 / log2(3))
    assert value != pytest.approx(exponential)


def test_missing_run_query_scores_zero_and_duplicates_count_once():
    per_query = per_query_metrics({"q1": RUN["q1"]}, GRADED, ("recall@10", "ndcg@10"))
    assert per_query["recall@10"]["q2"] == 0.0 and per_query["ndcg@10"]["q3"] == 0.0
    # d1 twice: the repeat is dropped, so d2 moves up to rank 2.
    assert mrr_at_k(["d9", "d1", "d1", "d2"], GRADED["q1"], 2) == pytest.approx(1 / 2)
    assert ndcg_at_k(["d1", "d1", "d2"], GRADED["q1"], 10) == pytest.approx(1.0)


def test_evaluated_queries_and_metric_parsing():
    assert evaluated_queries(GRADED) == ["q1", "q2", "q3"]
    assert parse_metric("ndcg@10") == ("ndcg", 10)
    assert metric_depth(DEFAULT_METRICS) == 100
    for bad in ("ndcg", "ndcg@0", "foo@10", "recall@x"):
        with pytest.raises(ConfigError, match="unknown metric"):
            parse_metric(bad)


# --------------------------------------------------------------------------------------------- skip-self


def test_drop_self_removes_query_id_and_cuts_depth():
    run = {"q1": [("q1", 1.0), ("a", 0.9), ("b", 0.8)], "q2": [("a", 1.0), ("b", 0.9), ("c", 0.8)]}
    assert drop_self(run, k=2) == {"q1": [("a", 0.9), ("b", 0.8)], "q2": [("a", 1.0), ("b", 0.9)]}


def test_retrieve_run_skip_self_fetches_one_more():
    docs = ["q1", "a", "q2", "b", "c"]
    asked = []

    def search_batch(texts, k):
        asked.append((len(texts), k))
        return [[(d, 1.0 / (r + 1)) for r, d in enumerate(docs[:k])] for _ in texts]

    queries = {"q1": "x", "q2": "y", "q3": "z"}
    run = retrieve_run(search_batch, queries, k=3, skip_self=True, batch_size=2)
    assert asked == [(2, 4), (1, 4)]
    assert [d for d, _ in run["q1"]] == ["a", "q2", "b"]
    assert [d for d, _ in run["q2"]] == ["q1", "a", "b"]
    assert [d for d, _ in run["q3"]] == ["q1", "a", "q2"]  # its own id is not retrieved: depth k
    plain = retrieve_run(search_batch, queries, k=3)
    assert asked[-1] == (3, 3) and [d for d, _ in plain["q1"]] == ["q1", "a", "q2"]


def test_exact_run_ranks_by_dot_product_in_blocks_and_skips_self():
    import numpy as np

    docs = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]], dtype=np.float32)
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    ids = ["d0", "d1", "d2", "d3"]
    run = exact_run(["d0", "q1", "q2"], queries, ids, docs, k=2, block=2)  # two blocks: rows 0-1, then 2
    assert [d for d, _ in run["d0"]] == ["d0", "d3"]  # 1.0, 0.8
    assert [d for d, _ in run["q1"]] == ["d1", "d2"]  # 1.0, 0.8
    assert [d for d, _ in run["q2"]] == ["d2", "d3"]  # 1.0, 0.96
    assert run["q2"][1][1] == pytest.approx(0.96)
    skipped = exact_run(["d0"], queries[:1], ids, docs, k=2, skip_self=True)
    assert [d for d, _ in skipped["d0"]] == ["d3", "d2"]  # its own id dropped, depth kept at k: 0.8, 0.6
    assert exact_run(["q"], queries[:1], [], np.zeros((0, 2), np.float32), k=3) == {"q": []}


def test_retrieve_run_rejects_wrong_number_of_rankings():
    with pytest.raises(InputError, match="2 queries"):
        retrieve_run(lambda texts, k: [[]], {"a": "x", "b": "y"}, k=1)


def test_sample_and_select_queries_are_deterministic():
    qids = [str(i) for i in range(100)]
    first = sample_queries(qids, 10)
    assert first == sample_queries(list(reversed(qids)), 10) and len(first) == 10
    assert set(first) <= set(sample_queries(qids, 20))  # nested as n grows
    queries = {"q1": "keep me", "q2": "drop me", "q3": "keep too", "q4": "keep"}
    assert select_queries(queries, GRADED) == ["q1", "q2", "q3"]
    assert select_queries(queries, GRADED, keep=lambda t: t.startswith("keep")) == ["q1", "q3"]
    assert select_queries({**queries, "q2": " \t"}, GRADED) == ["q1", "q3"]  # a blank query cannot be searched


# -------------------------------------------------------------------------------------------------- BM25


def test_tokenize_documented_rules():
    assert tokenize(["The Running of the DOGS, in ＡＢＣ 7"]) == [["run", "dog", "abc", "7"]]
    assert tokenize(["The Running"], stopwords=False, stem=False) == [["the", "running"]]
    assert tokenize(["the of and"]) == [[]]


@pytest.fixture(scope="module")
def adi(adi_dir):
    return read_beir(adi_dir)


@pytest.fixture(scope="module")
def adi_bm25(adi):
    ids = list(adi.corpus)
    return BM25Index.build(ids, [document_text(adi.corpus[i].title, adi.corpus[i].text) for i in ids])


def test_bm25_adi_sensible_recall(adi, adi_bm25):
    qids = select_queries(adi.queries, adi.qrels)
    assert len(qids) == 35
    run = retrieve_run(adi_bm25.search_batch, {q: adi.queries[q] for q in qids}, k=100)
    result = evaluate_run("bm25", run, adi.qrels)
    # Measured 0.53 recall@10, 0.91 recall@100, 0.49 nDCG@10; a random ranking of 82 docs gives ~0.12 recall@10.
    assert result.means["recall@10"] > 0.4
    assert result.means["recall@100"] > 0.8
    assert result.means["ndcg@10"] > 0.35


def test_bm25_exact_document_text_retrieves_that_document_first(adi, adi_bm25):
    ids = list(adi.corpus)
    texts = [document_text(adi.corpus[i].title, adi.corpus[i].text) for i in ids]
    top = [hits[0][0] for hits in adi_bm25.search_batch(texts, k=3)]
    assert top == ids


def test_bm25_drops_zero_score_hits_and_checks_input():
    index = BM25Index.build(["a", "b", "c"], ["red apple", "green pear", "apple pie"])
    hits = index.search("apple", k=3)
    assert {d for d, _ in hits} == {"a", "c"} and all(s > 0 for _, s in hits)
    assert index.search("banana", k=3) == []
    assert index.search_batch([], k=3) == []
    with pytest.raises(InputError, match="'a'"):
        BM25Index.build(["a", "a"], ["x", "y"])
    with pytest.raises(InputError, match="empty"):
        BM25Index.build([], [])
    with pytest.raises(ConfigError):
        BM25Index.build(["a"], ["x"], config=BM25Config(method="nope"))


# ------------------------------------------------------------------------------- agreement with trec_eval


def test_metrics_agree_with_trec_eval_on_cranfield_bm25():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    cran = read_beir(dataset("cranfield"))  # graded 1-4
    ids = list(cran.corpus)
    index = BM25Index.build(ids, [document_text(cran.corpus[i].title, cran.corpus[i].text) for i in ids])
    qids = select_queries(cran.queries, cran.qrels)
    run = retrieve_run(index.search_batch, {q: cran.queries[q] for q in qids}, k=100)
    ours = per_query_metrics(run, cran.qrels, ("ndcg@10", "recall@10", "recall@100", "mrr@10", "map@100"))
    # trec_eval orders by score (ties by doc id); give it strictly falling scores so it keeps our order.
    trec_run = {q: {d: float(-r) for r, (d, _) in enumerate(hits)} for q, hits in run.items()}
    trec_run10 = {q: {d: float(-r) for r, (d, _) in enumerate(hits[:10])} for q, hits in run.items()}
    qrels = {q: cran.qrels[q] for q in qids}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10,100", "map_cut.100"}).evaluate(trec_run)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(trec_run10)
    for q in qids:
        assert ours["ndcg@10"][q] == pytest.approx(theirs[q]["ndcg_cut_10"], abs=1e-6), q
        assert ours["recall@10"][q] == pytest.approx(theirs[q]["recall_10"], abs=1e-6), q
        assert ours["recall@100"][q] == pytest.approx(theirs[q]["recall_100"], abs=1e-6), q
        assert ours["map@100"][q] == pytest.approx(theirs[q]["map_cut_100"], abs=1e-6), q
        assert ours["mrr@10"][q] == pytest.approx(rr[q]["recip_rank"], abs=1e-6), q


# ----------------------------------------------------------------------------------------------- the CLI


def test_report_dict_and_table():
    results = [evaluate_run("dssm", RUN, GRADED), evaluate_run("bm25", {}, GRADED)]
    report = report_dict(results, queries=3, docs=12)
    assert set(report) == {"dssm", "bm25", "queries", "docs"}
    assert set(report["dssm"]) == set(DEFAULT_METRICS) and report["bm25"]["recall@100"] == 0.0
    table = format_table(results, queries=3, docs=12).splitlines()
    assert table[0].split() == ["system", *DEFAULT_METRICS]
    assert table[1].split()[0] == "dssm" and table[2].split()[0] == "bm25"


def test_cli_bm25_json_keys(adi_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["--data", str(adi_dir), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"bm25", "queries", "docs"}
    assert set(report["bm25"]) == set(DEFAULT_METRICS)
    assert report["queries"] == 35 and report["docs"] == 82
    assert 0 < report["bm25"]["recall@10"] <= report["bm25"]["recall@100"] <= 1
    printed = capsys.readouterr().out
    assert "bm25" in printed and "ndcg@10" in printed


def test_cli_metrics_flag(adi_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["--data", str(adi_dir), "--metrics", "precision@10,map@100", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["bm25"]) == {"precision@10", "map@100"} and 0 < report["bm25"]["map@100"] < 1
    with pytest.raises(ConfigError, match="unknown metric 'foo@1'"):
        main(["--data", str(adi_dir), "--metrics", "ndcg@10,foo@1"])


def test_cli_max_queries_and_skip_self(quora_dir, tmp_path):
    plain, skip = tmp_path / "plain.json", tmp_path / "skip.json"
    assert main(["--data", str(quora_dir), "--max-queries", "200", "--json", str(plain)]) == 0
    assert main(["--data", str(quora_dir), "--max-queries", "200", "--skip-self", "--json", str(skip)]) == 0
    plain, skip = json.loads(plain.read_text()), json.loads(skip.read_text())
    assert plain["queries"] == skip["queries"] == 200
    # Without skip-self each query's own text takes rank 1, so recall@1 collapses.
    assert plain["bm25"]["recall@1"] < 0.2 < skip["bm25"]["recall@1"]


def test_cli_holdout_evaluates_only_validation_queries(adi_dir, adi, tmp_path):
    from dssm.data import split_of

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "pairs_config.json").write_text(json.dumps({"validation_fraction": 0.3, "split_salt": "s"}))
    out = tmp_path / "eval.json"
    assert main(["--data", str(adi_dir), "--holdout", str(pairs), "--json", str(out)]) == 0
    expected = sum(split_of(adi.queries[q], validation_fraction=0.3, salt="s") == "validation"
                   for q in select_queries(adi.queries, adi.qrels))
    assert 0 < expected < 35 and json.loads(out.read_text())["queries"] == expected


def test_cli_errors(adi_dir, tmp_path, capsys):
    with pytest.raises(InputError, match="no such directory"):
        main(["--data", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="lacks"):
        main(["--data", str(tmp_path / "empty")])
    with pytest.raises(InputError, match="pairs_config.json"):
        main(["--data", str(adi_dir), "--holdout", str(tmp_path)])
    with pytest.raises(InputError, match="nothing to evaluate"):
        main(["--data", str(adi_dir), "--no-bm25"])
    # Queries whose ids do not meet the qrels: no overlap.
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "hello"}\n')
    (beir / "queries.jsonl").write_text('{"_id": "x", "text": "hello"}\n')
    (beir / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\ny\td1\t1\n")
    with pytest.raises(InputError, match="no query to evaluate"):
        main(["--data", str(beir)])
    # Through the dispatcher: one error line, exit 2.
    assert cli_main(["eval", "--data", str(tmp_path / "nope")]) == 2
    assert "error: --data" in capsys.readouterr().err


# ------------------------------------------------------------------------ end to end on a real tiny index


@pytest.fixture(scope="module")
def adi_index(tiny_model_dir, adi, tmp_path_factory):
    """A real index of adi (tiny trained model, brute-force ScaNN), built in-process to skip Beam's start-up."""
    from dssm.export import load_encoder
    from dssm.index import build_index

    ids = list(adi.corpus)
    docs = [adi.corpus[i] for i in ids]
    embeddings = load_encoder(tiny_model_dir).embed_documents([document_text(d.title, d.text) for d in docs])
    index_dir = tmp_path_factory.mktemp("adi_index") / "index"
    build_index(index_dir, embeddings=embeddings, ids=ids, texts=[d.text for d in docs],
                titles=[d.title for d in docs], model_dir=tiny_model_dir)
    return index_dir


def _write_beir(directory, corpus, queries, qrels):
    directory.mkdir()
    with open(directory / "corpus.jsonl", "w") as handle:
        for doc in corpus.values():
            handle.write(json.dumps({"_id": doc.id, "title": doc.title, "text": doc.text}) + "\n")
    with open(directory / "queries.jsonl", "w") as handle:
        for qid, text in queries.items():
            handle.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(directory / "qrels.tsv", "w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        handle.writelines(f"{q}\t{d}\t{g}\n" for q, grades in qrels.items() for d, g in grades.items())
    return directory


def test_cli_end_to_end_dssm_and_bm25_on_held_out_queries(adi_index, adi_dir, adi, tiny_model_dir, tmp_path,
                                                          capsys):
    from dssm.data import split_of
    from serving.searcher import Searcher

    pairs_dir = tiny_model_dir.parent / "pairs"  # the `dssm pairs` output the tiny model was trained on
    config = json.loads((pairs_dir / "pairs_config.json").read_text())
    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--index", str(adi_index), "--data", str(adi_dir), "--holdout", str(pairs_dir),
                     "--systems", "dssm,bm25", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"dssm", "bm25", "queries", "docs", "significance", "significance_trials"}
    assert set(report["significance"]) == {"dssm vs bm25"}
    assert set(report["dssm"]) == set(report["bm25"]) == set(DEFAULT_METRICS)
    held_out = [q for q in select_queries(adi.queries, adi.qrels)
                if split_of(adi.queries[q], validation_fraction=config["validation_fraction"],
                            salt=config["split_salt"]) == "validation"]
    assert 0 < report["queries"] == len(held_out) < 35 and report["docs"] == 82
    # 82 documents < depth 100: DSSM returns every document, so its recall@100 is exactly 1.
    assert report["dssm"]["recall@100"] == pytest.approx(1.0)
    # The CLI's DSSM numbers are those of the searcher's own rankings on exactly the held-out queries.
    searcher = Searcher.load(adi_index)
    run = {q: [(h.id, h.score) for h in hits]
           for q, hits in zip(held_out, searcher.search_batch([adi.queries[q] for q in held_out], 100), strict=True)}
    assert report["dssm"] == pytest.approx(evaluate_run("dssm", run, {q: adi.qrels[q] for q in held_out}).means)
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[:3]] == ["system", "dssm", "bm25"]


def test_cli_end_to_end_known_answers_and_skip_self(adi_index, adi, tiny_model_dir, tmp_path):
    # Each query is a document's own indexed text and its only relevant document is that document.
    # The model embeds queries and documents with one shared tower, so DSSM must rank it first.
    from dssm.export import read_model_configs

    assert read_model_configs(tiny_model_dir)[1].shared_towers
    texts = {i: document_text(d.title, d.text) for i, d in adi.corpus.items()}
    known = _write_beir(tmp_path / "known", adi.corpus, {f"q{i}": t for i, t in texts.items()},
                        {f"q{i}": {i: 1} for i in texts})
    out = tmp_path / "known.json"
    assert main(["--index", str(adi_index), "--data", str(known), "--systems", "dssm,dssm-exact,bm25",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["queries"] == 82
    assert report["dssm"]["recall@1"] == pytest.approx(1.0) and report["dssm"]["mrr@10"] == pytest.approx(1.0)
    assert report["dssm-exact"]["recall@1"] == pytest.approx(1.0)
    assert report["bm25"]["recall@1"] == pytest.approx(1.0)
    # Same, with query id == document id: --skip-self removes the only relevant hit from both systems.
    self_dir = _write_beir(tmp_path / "self", adi.corpus, texts, {i: {i: 1} for i in texts})
    assert main(["--index", str(adi_index), "--data", str(self_dir), "--skip-self", "--systems", "dssm,bm25",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dssm"]["recall@100"] == 0.0 and report["bm25"]["recall@100"] == 0.0


def test_cli_leaves_out_blank_queries_with_a_warning(adi_index, adi, tmp_path, capsys):
    queries = {**adi.queries, "1": "   "}
    data = _write_beir(tmp_path / "blank", adi.corpus, queries, adi.qrels)
    out = tmp_path / "blank.json"
    assert main(["--index", str(adi_index), "--data", str(data), "--systems", "dssm,bm25", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["queries"] == 34
    assert "warning: 1 judged queries have a blank text and are not evaluated (e.g. id '1')" in capsys.readouterr().err


def test_cli_refuses_an_index_of_another_corpus(adi_index, adi, tmp_path, capsys):
    other = {f"x{i}": d._replace(id=f"x{i}") for i, d in adi.corpus.items()}
    data = _write_beir(tmp_path / "other", other, {"q1": "information retrieval"}, {"q1": {"x1": 1}})
    with pytest.raises(InputError, match="another corpus"):
        main(["--index", str(adi_index), "--data", str(data)])
    assert cli_main(["eval", "--index", str(tmp_path / "missing"), "--data", str(data)]) == 2
    assert "error:" in capsys.readouterr().err


# -------------------------------------------------------------------------- building blocks for issue 6


def test_reciprocal_rank_fusion_hand_example():
    a = {"q": [("x", 9.0), ("y", 8.0), ("z", 7.0)]}
    b = {"q": [("z", 0.9), ("x", 0.8)], "r": [("w", 1.0)]}
    fused = reciprocal_rank_fusion([a, b], k=10, rrf_k=60)
    # x: 1/61 + 1/62; z: 1/63 + 1/61; y: 1/62; w (only in b's "r"): 1/61.
    assert [d for d, _ in fused["q"]] == ["x", "z", "y"]
    assert fused["q"][0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["q"][1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["q"][2][1] == pytest.approx(1 / 62)
    assert fused["r"] == [("w", pytest.approx(1 / 61))]
    assert [d for d, _ in reciprocal_rank_fusion([a, b], k=2)["q"]] == ["x", "z"]


def test_paired_randomization_test():
    ids = [f"q{i}" for i in range(30)]
    same = {q: 0.5 for q in ids}
    assert paired_randomization_test(same, dict(same)) == pytest.approx(1.0)
    better = {q: 0.9 for q in ids}
    # Every query favours `better`: only the 2 all-same-sign flips of 2^30 reach the observed mean.
    assert paired_randomization_test(better, same, trials=2000) == pytest.approx(1 / 2001)
    # One query out of 30 differs: a swap of that query alone halves the trials, p ≈ 1.
    nearly = dict(same, q0=0.6)
    assert paired_randomization_test(nearly, same, trials=2000) > 0.9
    with pytest.raises(InputError, match="same non-empty query set"):
        paired_randomization_test({"a": 1.0}, {"b": 1.0})


def test_trec_run_lines_keep_our_order_for_trec_eval():
    lines = trec_run_lines({"q2": [("d1", 0.5), ("d2", 0.5)], "q1": [("d3", 2.0), ("d4", 1.0)]}, system="dssm")
    assert lines == ["q1 Q0 d3 1 2.0 dssm", "q1 Q0 d4 2 1.0 dssm",
                     "q2 Q0 d1 1 2.0 dssm", "q2 Q0 d2 2 1.0 dssm"]  # tied scores rewritten to falling ones
    with pytest.raises(ConfigError):
        trec_run_lines({}, system="two words")
    with pytest.raises(InputError, match="whitespace"):
        trec_run_lines({"q 1": [("d", 1.0)]}, system="x")


def test_significance_over_every_pair_of_systems():
    a = evaluate_run("a", RUN, GRADED)
    same = evaluate_run("b", RUN, GRADED)
    empty = evaluate_run("c", {}, GRADED)
    tests = significance([a, same, empty], trials=500)
    assert list(tests) == ["a vs b", "a vs c", "b vs c"]
    assert set(tests["a vs b"]) == set(DEFAULT_METRICS)
    assert all(p == pytest.approx(1.0) for p in tests["a vs b"].values())  # identical systems
    # 3 queries allow only 2^3 sign patterns: the smallest two-sided p is 2/8, reached when all differ.
    assert tests["a vs c"]["recall@100"] == pytest.approx(0.25, abs=0.06)


def test_split_tuning_queries_is_deterministic_and_disjoint():
    qids = [str(i) for i in range(200)]
    tune, rest = split_tuning_queries(qids, 0.2)
    assert set(tune).isdisjoint(rest) and sorted(tune + rest, key=int) == qids
    assert 20 < len(tune) < 60
    again, _ = split_tuning_queries(list(reversed(qids)) + ["extra"], 0.2)
    assert set(tune) <= set(again)  # a query's side depends on its id only
    with pytest.raises(ConfigError, match="tune-fraction"):
        split_tuning_queries(qids, 1.0)
    with pytest.raises(ConfigError, match="non-empty"):
        split_tuning_queries(["only"], 0.5)


def test_cli_all_systems_report_files(adi_index, adi_dir, adi, tmp_path, capsys):
    import matplotlib.image

    report_dir, out = tmp_path / "report", tmp_path / "eval.json"
    assert main(["--index", str(adi_index), "--data", str(adi_dir), "--report", str(report_dir),
                 "--json", str(out), "--trials", "2000"]) == 0
    report = json.loads(out.read_text())
    systems = ["dssm", "dssm-exact", "bm25", "hybrid-rrf", "hybrid"]
    assert set(report) == {*systems, "queries", "docs", "significance", "significance_trials", "hybrid_tuning"}
    assert json.loads((report_dir / "metrics.json").read_text()) == report
    for name in systems:
        assert set(report[name]) == set(DEFAULT_METRICS)
    # The weight was tuned on queries that are not evaluated; together they are adi's 35.
    tuning = report["hybrid_tuning"]
    assert report["queries"] + tuning["tuning_queries"] == 35 and 0 <= tuning["weight"] <= 1
    assert len(tuning["tuning_curve"]) == 21
    tune_ids, eval_ids = split_tuning_queries(select_queries(adi.queries, adi.qrels), 0.2)
    per_query = json.loads((report_dir / "per_query.json").read_text())
    for name in systems:
        assert set(per_query[name]["ndcg@10"]) == set(eval_ids)
        assert sum(per_query[name]["recall@10"].values()) / len(eval_ids) == pytest.approx(report[name]["recall@10"])
    # 82 documents: the index is brute force, so ANN and exact agree exactly.
    assert report["dssm"] == report["dssm-exact"]
    assert all(p == pytest.approx(1.0) for p in report["significance"]["dssm vs dssm-exact"].values())
    assert len(report["significance"]) == 10
    for name in systems:
        lines = (report_dir / "runs" / f"{name}.trec").read_text().splitlines()
        fields = [line.split() for line in lines]
        assert lines and all(len(f) == 6 and f[1] == "Q0" and f[5] == name for f in fields)
        assert {f[0] for f in fields} == set(eval_ids)
        first = [f for f in fields if f[0] == eval_ids[0]]
        assert [int(f[3]) for f in first] == list(range(1, len(first) + 1))
        assert [float(f[4]) for f in first] == sorted((float(f[4]) for f in first), reverse=True)
    for png in ("recall_at_k.png", "ndcg_diff_dssm_vs_bm25.png", "ndcg_diff_hybrid_vs_bm25.png"):
        path = report_dir / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
    markdown = (report_dir / "results.md").read_text()
    assert "| dssm-exact |" in markdown and "![Recall@k per system](recall_at_k.png)" in markdown
    assert "| hybrid vs bm25 |" in markdown or "| bm25 vs hybrid |" in markdown
    printed = capsys.readouterr().out
    assert [line.split()[0] for line in printed.splitlines()[:6]] == ["system", *systems]


def test_cli_save_weight_stores_the_tuned_weight_in_the_index(adi_index, adi_dir, tmp_path):
    import shutil

    from serving.searcher import Searcher

    index = tmp_path / "index"
    shutil.copytree(adi_index, index)
    out = tmp_path / "eval.json"
    assert main(["--index", str(index), "--data", str(adi_dir), "--systems", "bm25,hybrid", "--normalization",
                 "zscore", "--save-weight", "--json", str(out), "--trials", "100"]) == 0
    tuned = json.loads(out.read_text())["hybrid_tuning"]
    config = Searcher.load(index).hybrid_config
    assert (config.weight, config.normalization) == (tuned["weight"], "zscore")
    with pytest.raises(ConfigError, match="save-weight"):
        main(["--index", str(index), "--data", str(adi_dir), "--systems", "dssm", "--save-weight"])
    with pytest.raises(ConfigError, match="'bm26'"):
        main(["--index", str(index), "--data", str(adi_dir), "--systems", "bm26"])
    with pytest.raises(InputError, match="need --index"):
        main(["--data", str(adi_dir), "--systems", "hybrid"])


def test_cli_hybrid_ranks_as_search_serves_it_whatever_the_metrics_depth(adi_index, adi_dir, adi, tmp_path):
    """With a stored weight, eval's hybrid is the ranking `Searcher.search(mode="hybrid")` serves: the fusion
    of each side's top 100, also when the metrics stop at @10 (a fusion of the top 10s ranked otherwise)."""
    import shutil

    from dssm.config import config_to_dict
    from dssm.hybrid import HYBRID_FILE, HybridConfig
    from dssm.index import publish_index_files
    from serving.searcher import Searcher

    index = tmp_path / "index"
    shutil.copytree(adi_index, index)
    settings = config_to_dict(HybridConfig(weight=0.5))
    publish_index_files(index, files={HYBRID_FILE: settings}, manifest_updates={"hybrid": settings})
    rankings = {}
    for label, metrics in (("shallow", ["--metrics", "ndcg@10"]), ("deep", [])):
        report = tmp_path / label
        assert main(["--index", str(index), "--data", str(adi_dir), "--systems", "hybrid", *metrics, "--report",
                     str(report), "--trials", "10"]) == 0
        assert "weight stored in index version" in (report / "results.md").read_text()
        lines = (report / "runs" / "hybrid.trec").read_text().splitlines()
        rankings[label] = {}
        for line in lines:
            qid, _, doc_id, rank, *_ = line.split()
            rankings[label].setdefault(qid, []).append((int(rank), doc_id))
    searcher = Searcher.load(index)
    qids = sorted(rankings["shallow"])
    served = searcher.search_batch([adi.queries[q] for q in qids], k=10, mode="hybrid")
    for qid, hits in zip(qids, served, strict=True):
        assert [d for _, d in sorted(rankings["shallow"][qid])] == [h.id for h in hits], qid
        assert [d for _, d in sorted(rankings["deep"][qid])][:10] == [h.id for h in hits], qid


# ------------------------------------------------------------------------- re-ranked systems (issue 13)


@pytest.fixture(scope="module")
def adi_reranked_index(adi_index, tiny_model_dir, tmp_path_factory):
    """adi_index plus an untrained re-ranker (its head counts exact word matches), as a new version."""
    import shutil

    from serving_support import untrained_reranker

    from dssm.index import attach_reranker

    work = tmp_path_factory.mktemp("adi_reranked")
    shutil.copytree(adi_index, work / "index")
    attach_reranker(work / "index", untrained_reranker(tiny_model_dir, work / "reranker"))
    return work / "index"


def test_cli_reranked_systems_are_the_searchers_reranked_top_n(adi_reranked_index, adi_dir, adi, tmp_path):
    from serving.searcher import Searcher

    report_dir, out = tmp_path / "report", tmp_path / "eval.json"
    systems = ["dssm", "bm25", "hybrid", "dssm+rerank", "bm25+rerank", "hybrid+rerank"]
    assert main(["--index", str(adi_reranked_index), "--data", str(adi_dir), "--systems", ",".join(reversed(systems)),
                 "--rerank", "20", "--metrics", "ndcg@10,recall@10,mrr@10", "--report", str(report_dir),
                 "--json", str(out), "--trials", "200"]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {*systems, "queries", "docs", "significance", "significance_trials", "hybrid_tuning",
                           "rerank"}
    for name in systems:
        assert set(report[name]) == {"ndcg@10", "recall@10", "mrr@10"} and 0 < report[name]["recall@10"] <= 1
    assert report["rerank"]["rerank"] == 20 and report["rerank"]["reranked_per_query"] == 20
    assert report["rerank"]["fusion"] == {"dense": 0.0, "bm25": 0.0, "hybrid": 0.0}
    assert len(report["significance"]) == 15 and "dssm vs dssm+rerank" in report["significance"]
    # The re-ranked systems are scored on the evaluated queries only, the same ones as every other system.
    _, eval_ids = split_tuning_queries(select_queries(adi.queries, adi.qrels), 0.2)
    per_query = json.loads((report_dir / "per_query.json").read_text())
    assert all(set(per_query[name]["ndcg@10"]) == set(eval_ids) for name in systems)
    searcher = Searcher.load(adi_reranked_index)
    texts = [adi.queries[q] for q in eval_ids]
    changed = 0
    for name, mode in (("dssm+rerank", "dense"), ("bm25+rerank", "bm25"), ("hybrid+rerank", "hybrid")):
        lines = [line.split() for line in (report_dir / "runs" / f"{name}.trec").read_text().splitlines()]
        run = {q: [f[2] for f in lines if f[0] == q] for q in eval_ids}
        first = searcher.search_batch(texts, 20, mode=mode)
        direct = searcher.search_batch(texts, 10, mode=mode, rerank=20)
        for qid, top, hits in zip(eval_ids, first, direct, strict=True):
            # what `dssm search --rerank 20` returns, drawn from that first stage's top 20
            assert run[qid] == [h.id for h in hits] and len(run[qid]) == 10
            assert set(run[qid]) <= {h.id for h in top}
            changed += run[qid] != [h.id for h in top[:10]]
    assert changed > 0  # the re-ranker did re-order
    assert (report_dir / "ndcg_diff_dssm+rerank_vs_dssm.png").read_bytes()[:4] == b"\x89PNG"
    assert "| dssm+rerank vs dssm |" in (report_dir / "results.md").read_text()


def test_cli_reranked_skip_self_and_errors(adi_reranked_index, adi_index, adi_dir, adi, tmp_path):
    # Query id == document id, the query's text that document's: --skip-self must drop it after re-ranking.
    texts = {i: document_text(d.title, d.text) for i, d in adi.corpus.items()}
    self_dir = _write_beir(tmp_path / "self", adi.corpus, texts, {i: {i: 1} for i in texts})
    out = tmp_path / "eval.json"
    assert main(["--index", str(adi_reranked_index), "--data", str(self_dir), "--systems", "dssm+rerank",
                 "--metrics", "recall@10", "--rerank", "20", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["dssm+rerank"]["recall@10"] == pytest.approx(1.0)
    assert main(["--index", str(adi_reranked_index), "--data", str(self_dir), "--systems", "dssm+rerank",
                 "--metrics", "recall@10", "--rerank", "20", "--skip-self", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["dssm+rerank"]["recall@10"] == 0.0
    with pytest.raises(IndexNotFoundError, match=rf"--index {adi_index} .*no re-ranker.*dssm attach-reranker"):
        main(["--index", str(adi_index), "--data", str(adi_dir), "--systems", "dssm,bm25+rerank"])
    for bad in ("0", "201", "-5"):
        with pytest.raises(ConfigError, match=rf"--rerank must be in 1\.\.200.*got {bad}"):
            main(["--index", str(adi_reranked_index), "--data", str(adi_dir), "--systems", "dssm+rerank",
                  "--rerank", bad])
    with pytest.raises(InputError, match="need --index"):
        main(["--data", str(adi_dir), "--systems", "dssm+rerank"])
