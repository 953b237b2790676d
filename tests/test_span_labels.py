"""Span queries labelled by BM25 (``dssm pairs --format corpus --bm25-span-pairs``): SPAR's imitation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from test_make_pairs import SMALL_FLAGS, _shards

from dssm.bm25 import BM25Index
from dssm.data import document_text, iter_corpus, split_of
from dssm.errors import InputError
from pipelines.corpus import CorpusSpec, span_pairs
from pipelines.make_pairs import run
from pipelines.span_labels import TOP, SpanDocuments, SpanLabelSpec, bm25_span_outputs
from pipelines.validate import PairLimits, SplitSpec

SPEC = CorpusSpec(id_column="_id", text_column="text", title_column="title", pairs_per_document=3, min_query_chars=20,
                  seed=0, span_queries=2)
SPLIT = SplitSpec(validation_fraction=0.3, salt="")


def _documents(adi_dir: Path) -> list[tuple[str, str, str]]:
    return [(d.id, d.title, d.text) for d in iter_corpus(adi_dir / "corpus.jsonl")]


def _outputs(documents: list[tuple[str, str, str]], pairs_per_span: int) -> tuple[list[dict], list[dict]]:
    pairs, counts = [], []
    for item in bm25_span_outputs(documents, corpus=SPEC, spec=SpanLabelSpec(pairs_per_span=pairs_per_span, chunk=7),
                                  split=SPLIT):
        if isinstance(item, beam.pvalue.TaggedOutput):
            counts.append(item.value)
        else:
            assert 0 < len(item) <= 7
            pairs += item
    return pairs, counts


def test_each_span_is_paired_with_documents_of_bm25s_top_in_its_own_split(adi_dir: Path) -> None:
    documents = _documents(adi_dir)
    pairs, counts = _outputs(documents, pairs_per_span=2)
    assert counts == [{"bm25_span_pairs": len(pairs)}]
    ids = [doc_id for doc_id, _, _ in sorted(documents)]
    texts = {doc_id: document_text(title, text) for doc_id, title, text in documents}
    index = BM25Index.build(ids, [texts[i] for i in ids])
    spans = {f"{doc_id}#b{suffix[1:]}": query for doc_id, title, text in documents
             for suffix, query, _ in span_pairs(doc_id, title, text, count=2, seed=0)}
    by_query = Counter()
    for pair in pairs:
        source = pair["query_id"].split("#")[0]
        key = pair["query_id"].rsplit(".", 1)[0]
        by_query[key] += 1
        assert pair["query_text"] == spans[key]
        top = [doc_id for doc_id, _ in index.search(pair["query_text"], TOP)]
        assert pair["document_id"] in top
        assert pair["document_text"] == texts[pair["document_id"]]  # the whole document, span included
        assert pair["split"] == split_of(source, validation_fraction=0.3) == split_of(
            pair["document_id"], validation_fraction=0.3)
        assert pair["label"] == 1.0
    # two distinct documents per span, unless its split holds fewer among the top
    assert set(by_query) == set(spans) and max(by_query.values()) == 2
    assert all(len({p["document_id"] for p in pairs if p["query_id"].startswith(k + ".")}) == n
               for k, n in by_query.items())


def test_the_draw_does_not_depend_on_the_order_documents_arrive_in(adi_dir: Path) -> None:
    documents = _documents(adi_dir)
    first, _ = _outputs(documents, pairs_per_span=1)
    again, _ = _outputs(list(reversed(documents)) + documents[:3], pairs_per_span=1)  # repeated ids keep the first
    assert sorted(map(json.dumps, first)) == sorted(map(json.dumps, again))


def test_past_the_limit_a_hashed_sample_of_the_spans_is_labelled(adi_dir: Path) -> None:
    documents = _documents(adi_dir)

    def labelled(docs: list[tuple[str, str, str]]) -> list[str]:
        spec = SpanLabelSpec(pairs_per_span=1, chunk=100, max_labelled=10)
        return sorted(p["query_id"] for item in bm25_span_outputs(docs, corpus=SPEC, spec=spec, split=SPLIT)
                      if not isinstance(item, beam.pvalue.TaggedOutput) for p in item)

    sample = labelled(documents)
    assert len(sample) == 10 and sample == labelled(list(reversed(documents)))
    assert len({q.split("#")[0] for q in sample}) > 5  # spread over the corpus, not its first documents


def test_span_documents_drops_what_corpus_pairs_rejects() -> None:
    raws = [{"record": "c:1", "fields": {"_id": "a", "title": "t", "text": "some text"}, "reason": None, "error": None},
            {"record": "c:2", "fields": {"_id": "", "text": "no id"}, "reason": None, "error": None},
            {"record": "c:3", "fields": {"raw": "x"}, "reason": "unparsable", "error": "bad"}]
    with test_pipeline.TestPipeline() as p:
        got = p | beam.Create([raws]) | beam.ParDo(SpanDocuments(spec=SPEC, limits=PairLimits(
            max_query_chars=100, max_document_chars=100)))
        assert_that(got, equal_to([("a", "t", "some text")]))


def test_the_pairs_job_adds_the_labelled_spans_to_the_corpus_pairs(adi_dir: Path, tmp_path: Path) -> None:
    flags = ["--format", "corpus", "--validation-fraction", "0.3", *SMALL_FLAGS]
    plain = run(["--input", str(adi_dir), "--output", str(tmp_path / "plain"), "--bm25-span-pairs", "0", *flags])
    stats = run(["--input", str(adi_dir), "--output", str(tmp_path / "spar"), *flags],  # the default: 1
                test_pipeline=test_pipeline.TestPipeline())
    assert stats["bm25_span_pairs"] == 2 * 82  # adi: every document has two spans, each top holds its split
    assert stats["written"] == plain["written"] + stats["bm25_span_pairs"]
    assert (stats["read"], stats["paired_documents"], stats["rejected"]) == (
        plain["read"], plain["paired_documents"], 0)
    examples = [e for rows in _shards(tmp_path / "spar").values() for e in rows]
    labelled = [e for e in examples if "#b" in e["query_id"]]
    assert len(labelled) == 2 * 82 and all(e["label"] == 1.0 for e in labelled)
    for split, rows in _shards(tmp_path / "spar").items():
        assert all(split_of(e["query_id"].split("#")[0], validation_fraction=0.3) == split for e in rows)


def test_bm25_span_pairs_are_per_span_query_and_never_negative(adi_dir: Path, tmp_path: Path) -> None:
    argv = ["--input", str(adi_dir / "corpus.jsonl"), "--format", "corpus", *SMALL_FLAGS]
    stats = run([*argv, "--output", str(tmp_path / "none"), "--span-queries", "0"])
    assert stats["bm25_span_pairs"] == 0  # no span query, nothing to label
    with pytest.raises(InputError, match="--bm25-span-pairs must be >= 0, got -1"):
        run([*argv, "--output", str(tmp_path / "bad"), "--bm25-span-pairs", "-1"])
