"""BM25's k1 and b chosen on held-out labelled pairs (dssm.bm25_tuning, `dssm index --hybrid-pairs`)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from dssm.bm25 import BM25Config, BM25Index
from dssm.bm25_tuning import grid_max_p_value, tune_bm25
from dssm.data import document_text, read_beir
from dssm.errors import ConfigError
from dssm.metrics import paired_randomization_test

_NAMES = ["".join(p) for p in itertools.product("bcdfgklmnprstvz", repeat=3)]


def saturation_corpus(topics: int = 60, *, group: int = 5, repeat: int = 15) -> tuple[list[str], list[tuple[str, str]]]:
    """Per topic a query ``"w v"``, its document (``w`` and ``v`` once, padded to the same length) and a
    distractor holding ``w`` ``repeat`` times. ``v`` is shared by ``group`` topics (lower idf), so a
    large k1 (slow saturation) puts the distractor first and a small one the document."""
    docs, pairs = [], []
    for i in range(topics):
        w, v = "w" + _NAMES[i], "v" + _NAMES[i // group]
        target = f"{w} {v} " + " ".join(["alpha"] * repeat)
        docs += [target, " ".join([w] * repeat) + " alpha beta"]
        pairs.append((f"{w} {v}", target))
    return docs, pairs


def bm25s_mrr(texts: list[str], pairs: list[tuple[str, str]], config: BM25Config, *, skip_own: bool = True
              ) -> np.ndarray:
    """Per pair, the reciprocal rank of its document in a bm25s index's top 10, rows holding the query's
    own text left out (the reference)."""
    index = BM25Index.build([str(i) for i in range(len(texts))], texts, config=config)
    hits = index.search_batch([q for q, _ in pairs], k=len(texts))
    ranked = [[texts[int(i)] for i, _ in h if not skip_own or texts[int(i)] != q or texts[int(i)] == d][:10]
              for h, (q, d) in zip(hits, pairs, strict=True)]
    return np.array([1 / (r.index(d) + 1) if d in r else 0.0 for r, (_, d) in zip(ranked, pairs, strict=True)])


def test_every_setting_ranks_as_a_bm25s_index_built_with_it(adi_dir):
    adi = read_beir(adi_dir)
    texts = [document_text(d.title, d.text) for d in adi.corpus.values()]
    pairs = [(adi.queries[q], document_text(adi.corpus[d].title, adi.corpus[d].text))
             for q, grades in sorted(adi.qrels.items()) for d, g in sorted(grades.items()) if g > 0]
    _, report = tune_bm25(texts, pairs, k1_grid=(0.3, 1.5), b_grid=(0.3, 0.9))
    for (k1, b) in [(0.3, 0.3), (0.3, 0.9), (1.5, 0.3), (1.5, 0.75), (1.5, 0.9)]:
        expected = bm25s_mrr(texts, pairs, BM25Config(k1=k1, b=b)).mean()
        assert report["curve"][f"k1={k1:g},b={b:g}"] == pytest.approx(expected, abs=1e-6), (k1, b)


def test_a_significant_gain_replaces_lucenes_settings():
    texts, pairs = saturation_corpus()
    config, report = tune_bm25(texts, pairs)
    assert bm25s_mrr(texts, pairs, BM25Config()).mean() == pytest.approx(0.5)  # every distractor first
    assert (config.k1, config.b) != (1.5, 0.75) and report["p"] < 0.05 and report["gain"] == pytest.approx(0.5)
    assert (report["k1"], report["b"]) == (config.k1, config.b) and config.method == "lucene"
    assert bm25s_mrr(texts, pairs, config).mean() == pytest.approx(1.0)
    # Among settings that tie at the top, the one nearest Lucene's (here k1 0.9 at b 0.75).
    assert (config.k1, config.b) == (0.9, 0.75)


def test_without_a_gain_or_with_too_few_pairs_lucenes_settings_stay():
    # Each document alone holds its query's terms: every setting ranks every target first.
    texts = [f"w{name} v{name} alpha" for name in _NAMES[:40]]
    pairs = [(f"w{name} v{name}", text) for name, text in zip(_NAMES[:40], texts, strict=True)]
    config, report = tune_bm25(texts, pairs)
    assert config == BM25Config() and report["gain"] == 0.0 and report["p"] == 1.0
    few_texts, few_pairs = saturation_corpus(10)
    config, report = tune_bm25(few_texts, few_pairs)
    assert config == BM25Config() and "only 10 tuning pairs" in report["reason"]


def test_a_query_found_as_its_own_document_and_a_document_outside_the_corpus():
    texts, pairs = saturation_corpus()
    _, plain = tune_bm25(texts, pairs)
    # The corpus holding every query's own text (a duplicate-question corpus): those rows are left out.
    own = texts + [q for q, _ in pairs]
    _, with_own = tune_bm25(own, pairs, k1_grid=(0.6, 2.0), b_grid=(0.9,))
    for k1, b in [(0.6, 0.9), (2.0, 0.9), (1.5, 0.75)]:
        expected = bm25s_mrr(own, pairs, BM25Config(k1=k1, b=b)).mean()
        assert with_own["curve"][f"k1={k1:g},b={b:g}"] == pytest.approx(expected, abs=1e-6), (k1, b)
    counted = bm25s_mrr(own, pairs, BM25Config(k1=0.6, b=0.9), skip_own=False).mean()
    assert counted < with_own["curve"]["k1=0.6,b=0.9"]  # the query's own row, first everywhere, is not counted
    # A pair's document missing from the corpus is added to it, and still found.
    _, added = tune_bm25([t for t in texts if t != pairs[0][1]], pairs)
    assert added["documents"] == len(texts) and added["curve"] == plain["curve"]


def test_the_grid_p_value_is_the_paired_test_corrected_for_picking_the_best():
    rng = np.random.default_rng(3)
    draw = rng.choice([-0.5, 0.0, 0.5], size=80)
    gain = draw - draw.mean() + 0.1  # one setting whose mean gain is 0.1 (a single test's p ~0.03)
    single = paired_randomization_test(dict(enumerate(gain)), dict(enumerate(np.zeros(80))), seed=0)
    assert grid_max_p_value(gain[None, :], seed=0) == pytest.approx(single, abs=0.02)
    # Settings that rank alike cost nothing (Bonferroni would multiply p by 5) ...
    assert grid_max_p_value(np.stack([gain] * 5), seed=0) == grid_max_p_value(gain[None, :], seed=0)
    # ... while other chances to look good by luck raise it.
    noise = rng.choice([-0.5, 0.0, 0.5], size=(20, 80))
    assert single < 0.05 < grid_max_p_value(np.vstack([gain, noise]), seed=0)
    with pytest.raises(ConfigError, match="settings, queries"):
        grid_max_p_value(np.zeros((0, 5)))


def test_a_grid_outside_bm25s_range_is_refused():
    texts, pairs = saturation_corpus()
    with pytest.raises(ConfigError, match="k1 > 0"):
        tune_bm25(texts, pairs, k1_grid=(0.0, 1.0))
    with pytest.raises(ConfigError, match="0 <= b <= 1"):
        tune_bm25(texts, pairs, b_grid=(1.5,))


def test_index_builds_its_bm25_with_the_settings_the_held_out_pairs_chose(tiny_model_dir, tmp_path):
    from pipelines import make_pairs
    from pipelines.encode_corpus import main as index_main
    from serving.searcher import Searcher

    texts, pairs = saturation_corpus(120)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "title": "", "text": t}) + "\n" for i, t in enumerate(texts)))
    row = {t: i for i, t in enumerate(texts)}
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("query\tdocument\tdoc_id\n" + "".join(f"{q}\t{d}\t{row[d]}\n" for q, d in pairs))
    pairs_dir = tmp_path / "pairs"
    assert make_pairs.main(["--input", str(tsv), "--format", "pairs", "--query-column", "query", "--document-column",
                            "document", "--document-id-column", "doc_id", "--output", str(pairs_dir),
                            "--num-buckets", "4096", "--validation-fraction", "0.5",
                            "--direct_running_mode=in_memory"]) == 0

    def build(name: str, *flags: str) -> Searcher:
        assert index_main(["--model", str(tiny_model_dir), "--corpus", str(corpus), "--output", str(tmp_path / name),
                           "--hybrid-pairs", str(pairs_dir), *flags, "--direct_running_mode=in_memory"]) == 0
        return Searcher.load(tmp_path / name)

    tuned = build("index")
    tuning = tuned.index.manifest["bm25_tuning"]
    assert tuning["pairs"] >= 30 and tuning["p"] < 0.05 and tuning["k1"] < 1.5
    assert (tuned.bm25.config.k1, tuned.bm25.config.b) == (tuning["k1"], tuning["b"])
    stored = json.loads(next((tmp_path / "index" / "versions").glob("*/bm25/params.json")).read_text())
    assert (stored["config"]["k1"], stored["config"]["b"]) == (tuning["k1"], tuning["b"])
    # What the index serves: each query's document above its distractor, which Lucene's settings put first.
    queries = [q for q, _ in pairs]
    assert [h[0].text for h in tuned.search_batch(queries, k=1, mode="bm25")] == [d for _, d in pairs]

    # `dssm eval`: bm25 keeps Lucene's settings (the baseline); hybrid is what the index serves.
    from dssm.evaluate import main as eval_main

    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n"
                                                    for i, (q, _) in enumerate(pairs)))
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\t{row[d]}\t1\n" for i, (_, d) in enumerate(pairs)))
    assert eval_main(["--index", str(tmp_path / "index"), "--data", str(tmp_path), "--systems", "bm25,hybrid",
                      "--metrics", "mrr@10", "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["bm25"]["mrr@10"] == pytest.approx(0.5)
    assert report["hybrid_tuning"]["bm25_tuning"]["k1"] == tuning["k1"]
    # The towers (trained on adi) know nothing of these words: weight 0, and hybrid ranks as the index's BM25.
    assert report["hybrid_tuning"]["weight"] == 0.0 and report["hybrid"]["mrr@10"] == pytest.approx(1.0)

    # Writes keep the settings: the delta segment's documents are weighted with them, and a compaction
    # folds them into a base state written with them.
    from dssm import index as ix

    w, v = "w" + _NAMES[500], "v" + _NAMES[500]
    tuned.upsert([("new-doc", "", f"{w} {v} " + " ".join(["alpha"] * 15)),
                  ("new-spam", "", " ".join([w] * 15) + " alpha beta")])
    for searcher in (Searcher.load(tmp_path / "index"), (ix.compact_index(tmp_path / "index"),
                                                         Searcher.load(tmp_path / "index"))[1]):
        assert (searcher.bm25.config.k1, searcher.bm25.config.b) == (tuning["k1"], tuning["b"])
        assert searcher.search(f"{w} {v}", k=1, mode="bm25")[0].id == "new-doc"

    lucene = build("lucene-index", "--bm25-tuning", "none")
    assert "bm25_tuning" not in lucene.index.manifest and lucene.bm25.config == BM25Config()
    assert all(h[0].text != d for h, (_, d) in zip(lucene.search_batch(queries, k=1, mode="bm25"), pairs, strict=True))
