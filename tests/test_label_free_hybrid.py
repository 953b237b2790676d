"""Label-free hybrid weight (issue 11): pseudo-queries cut from the corpus, the safe weight choice, the
weight ``dssm index`` stores, and the default search mode that uses it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dssm.data import document_text, read_beir
from dssm.errors import ConfigError
from dssm.hybrid import (
    HYBRID_FILE,
    choose_safe_weight,
    crop_pseudo_queries,
    label_free_weight,
    reciprocal_ranks,
)


def test_crop_pseudo_queries_cuts_a_span_out_of_its_document():
    texts = ["one two three four five six seven eight nine ten", "too short", "a b c d e f g h i j k l m n"]
    pseudo = crop_pseudo_queries(texts, count=10, seed=3)
    assert [q.row for q in pseudo] == [0, 2]  # "too short" has fewer than 8 words
    for q in pseudo:
        words, query, rest = texts[q.row].split(), q.query.split(), q.rest.split()
        assert 4 <= len(query) <= len(words) // 2
        assert len(query) + len(rest) == len(words)
        start = next(i for i in range(len(words)) if words[i:i + len(query)] == query)
        assert rest == words[:start] + words[start + len(query):]  # the span is removed, the rest kept in order
    assert crop_pseudo_queries(texts, count=10, seed=3) == pseudo  # repeatable
    assert len(crop_pseudo_queries(texts, count=1, seed=0)) == 1
    with pytest.raises(ConfigError, match="query_words"):
        crop_pseudo_queries(texts, count=1, query_words=(5, 2))


def test_crop_pseudo_queries_cuts_only_from_the_rows_given():
    texts = [f"w{i} " * 3 + "alpha beta gamma delta epsilon zeta eta theta" for i in range(10)]
    pseudo = crop_pseudo_queries(texts, count=10, seed=0, rows=[7, 2, 2, 5])
    assert [q.row for q in pseudo] == [2, 5, 7]
    assert crop_pseudo_queries(texts, count=10, seed=0, rows=[]) == []


def test_reciprocal_ranks_by_hand():
    ranked = [np.array([4, 2, 9]), np.array([1, 3]), np.array([7] + list(range(20, 40)))]
    # target 2 at rank 2 -> 0.5; 5 absent -> 0; 7 at rank 1 -> 1
    assert reciprocal_ranks(ranked, [2, 5, 7]).tolist() == [0.5, 0.0, 1.0]
    assert reciprocal_ranks([np.arange(20)], [15], k=10).tolist() == [0.0]


def test_choose_safe_weight_keeps_only_a_significant_gain():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    better = np.clip(base + 0.2, 0, 1)
    # 0.5 gains 0.2 on nearly every query: kept.
    weight, info = choose_safe_weight({0.0: base, 0.5: better, 1.0: base - 0.1})
    assert weight == 0.5 and info["best"] == 0.5 and info["p"] < 0.05
    assert info["curve"]["0.50"] == pytest.approx(better.mean(), abs=1e-6)
    # A gain on one query of 200 is noise: weight 0 (BM25's ranking).
    noisy = base.copy()
    noisy[0] += 0.5
    weight, info = choose_safe_weight({0.0: base, 0.5: noisy})
    assert weight == 0.0 and info["best"] == 0.5 and info["p"] > 0.05
    # Nothing beats weight 0: 0, no test needed.
    weight, info = choose_safe_weight({0.0: base, 1.0: base - 0.3})
    assert (weight, info["best"], info["p"]) == (0.0, 0.0, 1.0)
    with pytest.raises(ConfigError, match="weight 0"):
        choose_safe_weight({0.5: base})


@pytest.fixture(scope="module")
def adi_texts(adi_dir) -> list[str]:
    return [document_text(d.title, d.text) for d in read_beir(adi_dir).corpus.values()]


def test_one_standard_error_rule_takes_the_smallest_weight_close_to_the_best():
    # Four queries; 0.4 has the best mean (0.875). 0.2 trails it by [0.5, -0.5, 0.5, 0]: mean 0.125, sd
    # 0.479, standard error 0.479 / 2 = 0.239 >= 0.125, so it is within one standard error. 0.1 trails
    # by [1, 0, 0.5, 0.5]: mean 0.5, standard error 0.204 < 0.5, so it is not.
    curve = {0.0: np.array([0.0, 0.0, 0.0, 0.0]), 0.1: np.array([0.0, 0.5, 0.5, 0.5]),
             0.2: np.array([0.5, 1.0, 0.5, 1.0]), 0.4: np.array([1.0, 0.5, 1.0, 1.0])}
    # alpha 0.2: with 4 queries the randomisation test cannot go below 2/16.
    weight, info = choose_safe_weight(curve, one_se=True, alpha=0.2)
    assert (info["top"], info["best"], info["rule"]) == (0.4, 0.2, "one standard error")
    assert info["gain"] == pytest.approx(0.75) and weight == 0.2
    weight, info = choose_safe_weight(curve, alpha=0.2)
    assert weight == info["best"] == 0.4 and "top" not in info
    # A best weight within one standard error of BM25 alone: weight 0. 0.0 trails 0.5 by
    # [0.5, -0.25, 0, 0]: mean 0.0625, standard error 0.157.
    flat = {0.0: np.array([0.5, 0.5, 1.0, 0.0]), 0.5: np.array([1.0, 0.25, 1.0, 0.0])}
    weight, info = choose_safe_weight(flat, one_se=True)
    assert (info["top"], info["best"], weight, info["p"]) == (0.5, 0.0, 0.0, 1.0)


def test_a_useless_tower_gets_weight_zero(adi_texts):
    rng = np.random.default_rng(0)

    def noise(texts: list[str]) -> np.ndarray:  # a tower that knows nothing about the text
        return rng.standard_normal((len(texts), 16)).astype(np.float32)

    config, report = label_free_weight(texts=adi_texts, embeddings=noise(adi_texts), embed_queries=noise,
                                       embed_documents=noise, seed=0)
    assert report["pseudo_queries"] >= 30
    assert config.weight == 0.0 and report["weight"] == 0.0
    assert report["curve"]["0.00"] > report["curve"]["1.00"]  # BM25 alone finds the documents, noise does not


def _owners(texts: list[str], rounds: int) -> dict[str, int]:
    """Each pseudo-query and cut document of rounds 0..rounds-1 (seed 0) -> the row it came from."""
    owner: dict[str, int] = {}
    for r in range(rounds):
        pseudo = crop_pseudo_queries(texts, count=500, seed=r)
        owner |= {q.query: q.row for q in pseudo} | {q.rest: q.row for q in pseudo}
    return owner


def test_a_tower_that_finds_every_document_gets_weight_above_zero(adi_texts):
    owner = _owners(adi_texts, 8)
    dim = len(adi_texts)

    def one_hot(texts: list[str]) -> np.ndarray:  # an oracle: each text points at its own document
        out = np.full((len(texts), dim), 0.01, np.float32)
        for i, text in enumerate(texts):
            out[i, owner.get(text, adi_texts.index(text) if text in adi_texts else 0)] = 1.0
        return out

    config, report = label_free_weight(texts=adi_texts, embeddings=one_hot(adi_texts), embed_queries=one_hot,
                                       embed_documents=one_hot, seed=0)
    assert report["rounds"] == 7  # 82 documents, 500 pseudo-queries wanted
    assert report["curve"]["1.00"] == pytest.approx(1.0)
    assert config.weight > 0.0 and report["p"] < 0.05


def test_towers_that_learnt_their_training_documents_are_tuned_on_held_out_ones(adi_texts):
    # Towers that memorised the first 40 documents: any text made of one of their words points at it
    # (pseudo-queries and cut documents alike); every other text gets noise. Spans of the memorised
    # documents make them look far better than BM25; spans of the other 42 show what they are worth.
    learnt = [set(text.split()) for text in adi_texts[:40]]
    rng = np.random.default_rng(0)

    def memorising(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 40 + 16), np.float32)
        for i, text in enumerate(texts):
            words = set(text.split())
            overlap = [len(words & doc) / len(words) for doc in learnt]
            if max(overlap) == 1.0 and text not in adi_texts[40:]:
                out[i, int(np.argmax(overlap))] = 1.0
            else:
                out[i, 40:] = rng.standard_normal(16)
        return out

    towers = dict(embeddings=memorising(adi_texts), embed_queries=memorising, embed_documents=memorising, seed=0)
    config, report = label_free_weight(texts=adi_texts, **towers)
    assert config.weight > 0.0 and report["p"] < 0.05 and "query_documents" not in report
    held_out = list(range(40, len(adi_texts)))
    config, report = label_free_weight(texts=adi_texts, query_rows=held_out, **towers)
    assert report["query_documents"] == 42 and report["pseudo_queries"] == 42
    assert config.weight == 0.0


def test_a_refit_ranks_the_tuning_corpus_instead_of_the_towers_given(adi_texts):
    pseudo = crop_pseudo_queries(adi_texts, count=500, seed=0)
    owner = {q.query: q.row for q in pseudo} | {q.rest: q.row for q in pseudo}
    dim = len(adi_texts)

    def one_hot(texts: list[str]) -> np.ndarray:  # an oracle, as a fit that saw every span beside its document
        out = np.full((len(texts), dim), 0.01, np.float32)
        for i, text in enumerate(texts):
            out[i, owner.get(text, adi_texts.index(text) if text in adi_texts else 0)] = 1.0
        return out

    rng = np.random.default_rng(1)
    seen: list[list[str]] = []

    def refit(texts: list[str]):  # the same "fit" made on the tuning corpus: it knows nothing
        seen.append(list(texts))

        def noise(batch: list[str]) -> np.ndarray:
            return rng.standard_normal((len(batch), 16)).astype(np.float32)

        return noise, noise

    config, report = label_free_weight(texts=adi_texts, embeddings=one_hot(adi_texts), embed_queries=one_hot,
                                       embed_documents=one_hot, seed=0, refit=refit, max_rounds=1)
    assert report["refit"] is True and config.weight == 0.0 and report["rounds"] == 1
    # It was fitted once, on the tuning corpus: each pseudo-query's document without its span.
    rest = {q.row: q.rest for q in pseudo}
    assert seen == [[rest.get(row, text) for row, text in enumerate(adi_texts)]]


def test_a_small_corpus_gets_a_round_of_fresh_spans_per_refit(adi_texts):
    seen: list[list[str]] = []

    def refit(texts: list[str]):
        seen.append(list(texts))
        def ones(batch: list[str]) -> np.ndarray:
            return np.ones((len(batch), 4), np.float32)

        return ones, ones

    _, report = label_free_weight(texts=adi_texts, embeddings=None, embed_queries=None, embed_documents=None,
                                  seed=0, refit=refit, max_rounds=3)
    assert report["rounds"] == 3 and len(seen) == 3
    for r, corpus in enumerate(seen):  # round r cuts the spans of seed r, every eligible document once
        rest = {q.row: q.rest for q in crop_pseudo_queries(adi_texts, count=500, seed=r)}
        assert len(rest) == report["pseudo_queries"]
        assert corpus == [rest.get(row, text) for row, text in enumerate(adi_texts)]
    assert len({tuple(corpus) for corpus in seen}) == 3
    # Enough long documents for every query wanted: one round, as on a large corpus.
    _, report = label_free_weight(texts=adi_texts, embeddings=None, embed_queries=None, embed_documents=None,
                                  queries=40, seed=0, refit=refit)
    assert report["rounds"] == 1 and report["pseudo_queries"] == 40
    with pytest.raises(ConfigError, match="max_rounds"):
        label_free_weight(texts=adi_texts, embeddings=None, embed_queries=None, embed_documents=None,
                          refit=refit, max_rounds=0)


def test_index_stores_the_label_free_weight_and_search_defaults_to_hybrid(tiny_model_dir, adi_dir, tmp_path):
    from pipelines.encode_corpus import main as index_main
    from serving.searcher import Searcher

    index = tmp_path / "index"
    assert index_main(["--model", str(tiny_model_dir), "--corpus", str(adi_dir / "corpus.jsonl"),
                       "--output", str(index), "--direct_running_mode=in_memory"]) == 0
    searcher = Searcher.load(index)
    stored = json.loads((searcher.index.version_dir / HYBRID_FILE).read_text())
    tuning = searcher.index.manifest["hybrid_tuning"]
    assert stored["weight"] == tuning["weight"] == searcher.hybrid_config.weight
    assert HYBRID_FILE in searcher.index.manifest["files"]  # checksummed with the version
    assert tuning["pseudo_queries"] >= 30 and set(tuning["curve"]) >= {"0.00", "1.00"}
    assert searcher.default_mode == "hybrid"
    query = "computer information retrieval systems"
    assert searcher.search(query, k=5) == searcher.search(query, k=5, mode="hybrid")
    assert searcher.search_batch([query], k=5) == searcher.search_batch([query], k=5, mode="hybrid")

    # dssm eval's hybrid uses the stored weight: no query is spent on tuning, all 35 are evaluated.
    from dssm.errors import ConfigError as Refused
    from dssm.evaluate import main as eval_main

    out = tmp_path / "eval.json"
    assert eval_main(["--index", str(index), "--data", str(adi_dir), "--systems", "bm25,hybrid", "--json", str(out),
                      "--trials", "100"]) == 0
    report = json.loads(out.read_text())
    assert report["queries"] == 35 and report["hybrid_tuning"]["tuning_queries"] == 0
    assert report["hybrid_tuning"]["weight"] == stored["weight"]
    if stored["weight"] == 0.0:  # weight 0 ranks as BM25 does
        assert report["hybrid"]["ndcg@10"] == pytest.approx(report["bm25"]["ndcg@10"], abs=1e-9)
    with pytest.raises(Refused, match="already stores"):
        eval_main(["--index", str(index), "--data", str(adi_dir), "--systems", "hybrid", "--save-weight"])
    assert eval_main(["--index", str(index), "--data", str(adi_dir), "--systems", "hybrid", "--hybrid-weight", "tune",
                      "--json", str(out), "--trials", "100"]) == 0
    assert json.loads(out.read_text())["hybrid_tuning"]["tuning_queries"] > 0

    plain = tmp_path / "plain"
    assert index_main(["--model", str(tiny_model_dir), "--corpus", str(adi_dir / "corpus.jsonl"),
                       "--output", str(plain), "--hybrid-weight", "none", "--direct_running_mode=in_memory"]) == 0
    searcher = Searcher.load(plain)
    assert not (searcher.index.version_dir / HYBRID_FILE).exists()
    assert searcher.default_mode == "dense"
    assert searcher.search(query, k=5) == searcher.search(query, k=5, mode="dense")


def test_hybrid_at_weight_zero_ranks_as_bm25_then_by_cosine():
    from dssm.hybrid import convex_fusion

    dense = {"q": {"a": 0.9, "b": 0.2, "c": 0.5, "d": 0.7}}
    sparse = {"q": {"a": 0.0, "b": 3.0, "c": 0.0, "d": 0.0}}
    # b has the only BM25 score; a, c, d tie at 0 and follow by cosine: a 0.9, d 0.7, c 0.5.
    assert [d for d, _ in convex_fusion(dense, sparse, weight=0.0, k=4)["q"]] == ["b", "a", "d", "c"]


def _adi_pairs(adi_dir) -> list[tuple[str, str]]:
    adi = read_beir(adi_dir)
    return [(adi.queries[q], document_text(adi.corpus[d].title, adi.corpus[d].text))
            for q, grades in adi.qrels.items() for d, grade in grades.items() if grade > 0 and q in adi.queries]


def test_labelled_pairs_tune_the_weight_with_the_same_rule(adi_dir, adi_texts):
    pairs = _adi_pairs(adi_dir) + [("a query whose document is not in the corpus", "zebra okapi quagga " * 5)]
    rng = np.random.default_rng(0)

    def noise(texts: list[str]) -> np.ndarray:
        return rng.standard_normal((len(texts), 16)).astype(np.float32)

    config, report = label_free_weight(texts=adi_texts, embeddings=noise(adi_texts), embed_queries=noise,
                                       embed_documents=noise, pairs=pairs, seed=0)
    assert report["method"].startswith("labelled") and report["pairs"] == len(pairs)
    assert report["pairs_documents_added"] == 1 and report["tuning_documents"] == len(adi_texts) + 1
    assert config.weight == 0.0

    # An oracle tower: each query points at one of its relevant documents, so dense alone ranks it first.
    target = {}
    for query, document in pairs:
        target.setdefault(query, document)
    texts = adi_texts + ["zebra okapi quagga " * 5]

    def oracle(batch: list[str]) -> np.ndarray:
        out = np.full((len(batch), len(texts)), 0.01, np.float32)
        for i, text in enumerate(batch):
            out[i, texts.index(target.get(text, text)) if target.get(text, text) in texts else 0] = 1.0
        return out

    first = [(q, d) for q, d in pairs if target[q] == d]  # the oracle's own target, one pair per query
    config, report = label_free_weight(texts=adi_texts, embeddings=oracle(adi_texts), embed_queries=oracle,
                                       embed_documents=oracle, pairs=first, seed=0)
    assert report["curve"]["1.00"] == pytest.approx(1.0) and config.weight > 0.0 and report["p"] < 0.05


def test_index_tunes_on_hybrid_pairs(tiny_model_dir, adi_dir, tmp_path):
    from dssm.errors import InputError
    from pipelines import make_pairs
    from pipelines.encode_corpus import main as index_main
    from serving.searcher import Searcher

    pairs = tmp_path / "pairs"
    assert make_pairs.main(["--input", str(adi_dir), "--format", "beir", "--output", str(pairs), "--num-buckets",
                            "4096", "--validation-fraction", "0.5", "--direct_running_mode=in_memory"]) == 0
    index = tmp_path / "index"
    assert index_main(["--model", str(tiny_model_dir), "--corpus", str(adi_dir / "corpus.jsonl"), "--output",
                       str(index), "--hybrid-pairs", str(pairs), "--direct_running_mode=in_memory"]) == 0
    searcher = Searcher.load(index)
    tuning = searcher.index.manifest["hybrid_tuning"]
    assert tuning["method"].startswith("labelled") and tuning["pairs"] > 0
    assert tuning["weight"] == searcher.hybrid_config.weight and searcher.default_mode == "hybrid"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="validation split holds no positive pair"):
        index_main(["--model", str(tiny_model_dir), "--corpus", str(adi_dir / "corpus.jsonl"), "--output",
                    str(tmp_path / "other"), "--hybrid-pairs", str(tmp_path / "empty")])


def test_index_finds_tuning_pairs_documents_worded_otherwise_by_their_id(tiny_model_dir, adi_dir, tmp_path):
    """A user's pairs file may word a corpus document otherwise than the corpus (here: the body without its
    title). `dssm index --hybrid-pairs` finds such a document by its id, so the tuning targets its row instead
    of adding a second copy beside it; a document whose id is not in the corpus still joins as one more."""
    import csv

    from dssm.data import read_beir
    from pipelines import make_pairs
    from pipelines.encode_corpus import main as index_main
    from serving.searcher import Searcher

    beir = read_beir(adi_dir)
    bodies = {doc_id: doc.text for doc_id, doc in beir.corpus.items()}
    pairs_file = tmp_path / "pairs.tsv"
    with open(pairs_file, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["query", "document", "doc_id"])
        for qid, relevant in beir.qrels.items():
            for doc_id in relevant:
                writer.writerow([beir.queries[qid], bodies[doc_id], doc_id])
        writer.writerow([beir.queries[qid], "a document the corpus does not hold", "not-in-corpus"])
    pairs = tmp_path / "pairs"
    assert make_pairs.main(["--input", str(pairs_file), "--format", "pairs", "--query-column", "query",
                            "--document-column", "document", "--document-id-column", "doc_id", "--output", str(pairs),
                            "--num-buckets", "4096", "--validation-fraction", "0.9",
                            "--direct_running_mode=in_memory"]) == 0
    index = tmp_path / "index"
    assert index_main(["--model", str(tiny_model_dir), "--corpus", str(adi_dir / "corpus.jsonl"), "--output",
                       str(index), "--hybrid-pairs", str(pairs), "--direct_running_mode=in_memory"]) == 0
    manifest = Searcher.load(index).index.manifest
    tuning, windows = manifest["hybrid_tuning"], manifest["windows"]
    assert tuning["pairs"] > 30
    outside = 1 if tuning["pairs_documents_added"] else 0  # the split may or may not hold the unknown document
    assert tuning["pairs_documents_added"] == outside
    assert windows["pairs_outside_corpus"] == outside and windows["pairs"] == tuning["pairs"] - outside


def test_index_cuts_pseudo_queries_from_documents_the_towers_did_not_train_on(tiny_model_dir, adi_dir, tmp_path):
    from dssm.errors import InputError
    from dssm.inputs import pair_files, read_document_ids
    from dssm.train import main as train_main
    from pipelines import make_pairs
    from pipelines.encode_corpus import main as index_main
    from serving.searcher import Searcher

    pairs = tmp_path / "corpus_pairs"
    assert make_pairs.main(["--input", str(adi_dir), "--format", "corpus", "--output", str(pairs), "--num-buckets",
                            "4096", "--validation-fraction", "0.5", "--direct_running_mode=in_memory"]) == 0
    held_out = {i.decode() for i in read_document_ids(pair_files(pairs, "validation"), min_label=0.0).tolist()}
    trained_on = {i.decode() for i in read_document_ids(pair_files(pairs, "train"), min_label=0.0).tolist()}
    assert held_out and trained_on and not held_out & trained_on  # the job splits by document
    adi_ids = [json.loads(line)["_id"] for line in (adi_dir / "corpus.jsonl").read_text().splitlines()]
    untrained = [i for i in adi_ids if i not in trained_on]
    assert set(untrained) >= held_out

    def tuning_of(model, corpus, out, *flags):
        assert index_main(["--model", str(model), "--corpus", str(corpus), "--output", str(tmp_path / out), *flags,
                           "--direct_running_mode=in_memory"]) == 0
        return Searcher.load(tmp_path / out).index.manifest["hybrid_tuning"]

    tuning = tuning_of(tiny_model_dir, adi_dir / "corpus.jsonl", "index", "--hybrid-pairs", str(pairs))
    assert tuning["method"].startswith("label-free") and tuning["query_documents"] == len(untrained)
    assert tuning["pseudo_queries"] <= len(untrained)
    # Another corpus: the towers trained on none of its documents, so every one may give a span.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"_id": f"x{i}", "text": f"an unrelated document number {i} about {w} "
                                                                   "and nothing else of note here"}) + "\n"
                             for i, w in enumerate(["ships", "trains", "planes", "bikes"] * 10)))
    assert tuning_of(tiny_model_dir, other, "other-index", "--hybrid-pairs", str(pairs))["query_documents"] == 40
    # A corpus of trained-on documents only: nothing to cut a fair span from, refused by name.
    seen = tmp_path / "seen.jsonl"
    seen.write_text("".join(line + "\n" for line in (adi_dir / "corpus.jsonl").read_text().splitlines()
                            if json.loads(line)["_id"] in trained_on))
    with pytest.raises(InputError, match="trained on every document"):
        tuning_of(tiny_model_dir, seen, "seen-index", "--hybrid-pairs", str(pairs))
    assert not (tmp_path / "seen-index" / "CURRENT").exists()
    # Towers trained by `dssm train` on these corpus pairs: `dssm index` finds them without the flag.
    assert train_main(["--pairs", str(pairs), "--output", str(tmp_path / "pretrained"), "--epochs", "1",
                       "--batch-size", "16", "--embedding-dim", "16", "--hidden-dims", "16", "--verbose", "0"]) == 0
    assert json.loads((tmp_path / "pretrained" / "history.json").read_text())["pairs"] == str(pairs.resolve())
    assert tuning_of(tmp_path / "pretrained", adi_dir / "corpus.jsonl", "own")["query_documents"] == len(untrained)
    # A model whose training pairs are gone tunes on every document, as before.
    shutil.move(pairs, tmp_path / "moved")
    assert "query_documents" not in tuning_of(tmp_path / "pretrained", adi_dir / "corpus.jsonl", "gone")


def test_a_query_found_as_its_own_document_is_not_counted_against_its_target():
    # A duplicate-question corpus holds each question: BM25 and dense both put it first, which would
    # cap every target's reciprocal rank at 1/2 at every weight.
    nouns = ["apple", "boat", "cabin", "guitar", "garden", "panel", "kettle", "ladder"]
    colours = ["red", "green", "amber", "violet", "silver"]
    topics = [f"{colour} {noun}" for colour in colours for noun in nouns]  # 40: enough tuning queries
    queries = [f"how to choose a {topic}" for topic in topics]
    duplicates = [f"which {topic} should I choose and how" for topic in topics]
    fillers = [f"unrelated filler text number {i} about nothing in particular" for i in range(20)]
    texts = queries + duplicates + fillers
    rng = np.random.default_rng(0)

    def noise(batch: list[str]) -> np.ndarray:
        return rng.standard_normal((len(batch), 16)).astype(np.float32)

    _, report = label_free_weight(texts=texts, embeddings=noise(texts), embed_queries=noise, embed_documents=noise,
                                  pairs=list(zip(queries, duplicates, strict=True)), seed=0)
    assert report["curve"]["0.00"] == pytest.approx(1.0)  # BM25 finds each duplicate first once the query is out
