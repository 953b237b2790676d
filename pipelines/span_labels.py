"""Span queries labelled by BM25 (``dssm pairs --format corpus --bm25-span-pairs N``): SPAR's imitation.

A span query cut out of a document (:func:`pipelines.corpus.span_pairs`) is paired with the rest of
its own document. SPAR (Chen et al., "Salient Phrase Aware Dense Retrieval: Can a Dense Retriever
Imitate a Sparse One?") trains a dense retriever on sentences as queries and *BM25's* top passages as
positives, so the dense model learns what the sparse one ranks high. Here each span query also gets
``N`` documents drawn from BM25's top :data:`TOP` among the whole corpus (the span's own document, whole,
is often among them: a quarter of debian-dev's spans have another document first). Measured on
debian-dev's labelled validation split among the corpus: docs/quality.md, "How the defaults were chosen".

The BM25 index is global, so, as for format neighbours, every document meets in one element and one
worker builds the index once and searches every span (``O(n²)`` at the limit; see
:func:`pipelines.corpus.neighbour_outputs` for measured sizes). A drawn document must lie in the span's
own split (the split of a corpus pair is its document's), so a training pair never points into the
validation documents; which one is drawn comes from a hash of the seed, the document id and the span,
so every run draws the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from dssm.data import document_text, split_of
from dssm.hashing import FeatureConfig
from pipelines.corpus import CorpusSpec, corpus_document, rank_key, span_pairs
from pipelines.featurize import FeaturizeChunks
from pipelines.validate import PairLimits, SplitSpec

__all__ = ["TOP", "MAX_LABELLED", "SpanLabelSpec", "SpanDocuments", "bm25_span_outputs", "BM25SpanPairs",
           "with_span_pairs"]

TOP = 10  # BM25's top documents a span's positives are drawn from (SPAR draws from the teacher's top 10)
# The step runs on one worker; past this many span queries a hashed sample of them is labelled, so a
# large corpus's job does not wait hours on it (debian-dev's 68k spans: ~45 s of the job here).
MAX_LABELLED = 100_000
COUNTS = "counts"


@dataclass(frozen=True)
class SpanLabelSpec:
    """How :func:`bm25_span_outputs` labels span queries."""

    pairs_per_span: int  # documents drawn from BM25's top TOP for each span query
    chunk: int  # pairs per emitted chunk (the featurizing step's unit of work)
    max_labelled: int = MAX_LABELLED  # span queries labelled at most (a hashed sample beyond)


class SpanDocuments(beam.DoFn):
    """A chunk of raw corpus records → ``(doc_id, title, text)`` of the usable ones.

    Rejections are :class:`pipelines.corpus.CorpusPairs`'s to report (the same records go through it),
    so this step drops them silently rather than counting them twice.
    """

    def __init__(self, *, spec: CorpusSpec, limits: PairLimits) -> None:
        self._spec = spec
        self._limits = limits

    def process(self, chunk: Iterable[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
        for raw in chunk:
            document = corpus_document(raw, spec=self._spec, limits=self._limits)
            if isinstance(document, tuple):
                yield document


def _draw(seed: int, doc_id: str, key: str, n: int) -> int:
    return int.from_bytes(rank_key(seed, doc_id, key)[:8], "big") % n


def bm25_span_outputs(documents: list[tuple[str, str, str]], *, corpus: CorpusSpec, spec: SpanLabelSpec,
                      split: SplitSpec) -> Iterator[Any]:
    """The global step: all documents at once → chunks of (span query, BM25-drawn document) pairs.

    Documents are ordered by id, and a repeated id keeps one text (the least, whatever the order; the
    corpus pairs keep both and ``dssm index`` refuses the corpus), so the BM25 rows, and the draws, do
    not depend on the order the runner delivered them in. Each pair has ``query_id =
    <doc id>#b<span>.<draw>``, the drawn document's id and whole text (title + body, as indexed), label
    1.0 and the span's document's split. Also emits one ``counts`` dict (``bm25_span_pairs``).
    """
    # deferred: bm25s and PyStemmer, imported only when this runs
    from dssm.bm25 import BM25Index

    kept: dict[str, tuple[str, str]] = {}
    for doc_id, title, text in sorted(documents):
        kept.setdefault(doc_id, (title, text))
    ids = list(kept)
    texts = [document_text(title, text) for title, text in kept.values()]
    splits = [split_of(doc_id, validation_fraction=split.validation_fraction, salt=split.salt) for doc_id in ids]
    queries = [(row, suffix, query) for row, doc_id in enumerate(ids)
               for suffix, query, _ in span_pairs(doc_id, *kept[doc_id], count=corpus.span_queries, seed=corpus.seed)]
    if len(queries) > spec.max_labelled:
        keys = [_draw(corpus.seed, ids[row], f"sample.{suffix}", 2**62) for row, suffix, _ in queries]
        chosen = sorted(sorted(range(len(queries)), key=keys.__getitem__)[:spec.max_labelled])
        queries = [queries[i] for i in chosen]
    made = 0
    chunk: list[dict[str, Any]] = []
    if queries:
        index = BM25Index.build(ids, texts)
        rows_of = {doc_id: row for row, doc_id in enumerate(ids)}
        hits = index.search_batch([query for _, _, query in queries], k=TOP)
        for (row, suffix, query), found in zip(queries, hits, strict=True):
            same = [rows_of[doc_id] for doc_id, _ in found if splits[rows_of[doc_id]] == splits[row]]
            for draw in range(min(spec.pairs_per_span, len(same))):
                drawn = same.pop(_draw(corpus.seed, ids[row], f"{suffix}.{draw}", len(same)))
                chunk.append({"record": f"{ids[row]}#{suffix}", "query_id": f"{ids[row]}#b{suffix[1:]}.{draw}",
                              "document_id": ids[drawn], "query_text": query, "document_text": texts[drawn],
                              "label": 1.0, "split": splits[row]})
                made += 1
                if len(chunk) >= spec.chunk:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk
    yield beam.pvalue.TaggedOutput(COUNTS, {"bm25_span_pairs": made})


class BM25SpanPairs(beam.PTransform):
    """Raw corpus record chunks → featurized BM25-labelled span pairs.

    Output: ``{"train", "validation"}`` lists of serialized Examples (as
    :class:`pipelines.featurize.FeaturizeChunks` makes them) and ``"counts"`` dicts
    (``bm25_span_pairs``, ``train``, ``validation``).

    Args:
        corpus: the corpus format's spec (columns, seed, ``span_queries``).
        limits: the job's document limits.
        spec: pairs per span and chunk size.
        split: the job's split.
        features: how the pairs are hashed.
    """

    def __init__(self, *, corpus: CorpusSpec, limits: PairLimits, spec: SpanLabelSpec, split: SplitSpec,
                 features: FeatureConfig) -> None:
        super().__init__()
        self._corpus, self._limits, self._spec, self._split, self._features = corpus, limits, spec, split, features

    def expand(self, chunks: beam.PCollection) -> dict[str, beam.PCollection]:
        labelled = (chunks
                    | "SpanDocuments" >> beam.ParDo(SpanDocuments(spec=self._corpus, limits=self._limits))
                    | "AllSpanDocuments" >> beam.combiners.ToList()
                    | "LabelSpans" >> beam.FlatMap(bm25_span_outputs, corpus=self._corpus, spec=self._spec,
                                                   split=self._split).with_outputs(COUNTS, main="chunks"))
        made = (labelled.chunks
                | "SpreadSpanPairs" >> beam.Reshuffle()
                | "FeaturizeSpanPairs" >> beam.ParDo(FeaturizeChunks(feature_config=self._features,
                                                                     batch_size=self._spec.chunk))
                .with_outputs(FeaturizeChunks.VALIDATION, FeaturizeChunks.COUNTS, main="train"))
        counts = (labelled[COUNTS], made[FeaturizeChunks.COUNTS]) | "SpanPairCounts" >> beam.Flatten()
        return {"train": made.train, "validation": made[FeaturizeChunks.VALIDATION], "counts": counts}


def with_span_pairs(chunks: beam.PCollection, written: dict[str, beam.PCollection], count_parts: list[beam.PCollection],
                    *, transform: BM25SpanPairs) -> dict[str, beam.PCollection]:
    """``written`` (``{"train", "validation"}`` Examples) joined with ``transform``'s pairs of ``chunks``.

    Appends the transform's counts to ``count_parts``.
    """
    spans = chunks | "BM25SpanPairs" >> transform
    count_parts.append(spans["counts"])
    return {name: (part, spans[name]) | f"With{name.title()}Spans" >> beam.Flatten() for name, part in written.items()}
