"""Pairs from a bare corpus (formats corpus and neighbours): no queries, no labels.

This module owns the two self-supervised recipes of ``dssm pairs``. Format corpus: :func:`corpus_pairs`
cuts title → body and sentence → rest-of-document pairs out of one document, and :class:`CorpusPairs`
applies it per record. Format neighbours: :class:`CheckDocuments` keeps the usable documents and
:func:`neighbour_outputs` pairs each with its BM25 nearest other documents (one global step). Both
read a corpus record through :func:`corpus_document` and settings in :class:`CorpusSpec` /
:class:`NeighbourSpec`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np

from dssm.data import document_text, split_of
from dssm.hybrid import QUERY_WORDS, cut_span
from dssm.teacher import teacher_encoder, teacher_neighbours
from pipelines.records import REJECTED, as_text, reject
from pipelines.validate import REASONS, PairLimits, SplitSpec

__all__ = [
    "CorpusSpec",
    "rank_key",
    "sentence_spans",
    "span_pairs",
    "strip_title",
    "corpus_pairs",
    "corpus_document",
    "CorpusPairs",
    "NeighbourSpec",
    "CheckDocuments",
    "neighbour_outputs",
]

# ---- format corpus: self-supervised pairs from bare documents ------------------------------------------

# A sentence ends at . ! ? followed by white space, or at a blank line. Crude on purpose: the pairs
# only need a plausible "short text about the document", and numbers like "3. 5" splitting is harmless.
_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"\w+")
# Title words that must reappear in order at the start of the text to call it a copy of the title:
# cranfield's titles are its first sentence, sometimes cut or with a typo fixed ("oseen's"/"oseens's").
_TITLE_MATCH = 0.9


@dataclass(frozen=True)
class CorpusSpec:
    """How :class:`CorpusPairs` reads a corpus record and turns it into pairs."""

    id_column: str
    text_column: str
    title_column: str | None
    pairs_per_document: int
    min_query_chars: int
    seed: int
    span_queries: int = 0  # word spans cut out per document beside the sentence pairs (span_pairs)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text``, surrounding white space excluded."""
    spans, start = [], 0
    for boundary in [*_SENTENCE_BOUNDARY.finditer(text), None]:
        stop = boundary.start() if boundary is not None else len(text)
        piece = text[start:stop]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        if boundary is not None:
            start = boundary.end()
    return spans


def strip_title(title: str, text: str) -> str:
    """``text`` without a leading copy of ``title`` (compared word by word, case-folded).

    The copy counts when at least 90% of the title's words reappear at the same positions among the
    text's first words, so a title cut short or with a one-word typo still matches. The title's
    closing punctuation goes with it. Returns ``text`` unchanged when it does not start with the title.
    """
    title_words = [w.casefold() for w in _WORD.findall(title)]
    if not title_words:
        return text
    leading = []
    for match in _WORD.finditer(text):
        leading.append(match)
        if len(leading) == len(title_words):
            break
    if len(leading) < len(title_words):
        return text
    same = sum(a == m.group().casefold() for a, m in zip(title_words, leading, strict=True))
    if same < math.ceil(_TITLE_MATCH * len(title_words)):
        return text
    return text[leading[-1].end():].lstrip(" \t\r\n.:;!?,-\u2013\u2014")


def rank_key(seed: int, doc_id: str, index: int | str) -> bytes:
    """A repeatable pseudo-random draw for a document's item ``index`` (sha256: the same on every runner).

    Orders a document's sentences, places its span queries and draws their BM25 documents
    (:mod:`pipelines.span_labels`).
    """
    return hashlib.sha256(f"{seed}\x00{doc_id}\x00{index}".encode("utf-8", "surrogatepass")).digest()


def corpus_pairs(doc_id: str, title: str, text: str, *, pairs_per_document: int, min_query_chars: int,
                 max_query_chars: int, seed: int) -> list[tuple[str, str, str]]:
    """Self-supervised ``(suffix, query, document)`` pairs from one document.

    The title, when it has ``min_query_chars``..``max_query_chars`` characters and the body is not
    empty, is the first query and the body (``text`` without a leading copy of the title, see
    :func:`strip_title`) its document. Further pairs, up to ``pairs_per_document``, take a body sentence
    of ``min_query_chars``..``max_query_chars`` characters as the query and the rest of the document
    (title, then the body without that sentence) as the document. Sentences are drawn in an order fixed
    by a hash of ``seed``, ``doc_id`` and the sentence's position, so every run picks the same ones.

    Returns:
        Up to ``pairs_per_document`` triples; ``suffix`` is ``"title"`` or ``"s<sentence index>"``
        (the caller appends it to the document id to make the query id). Empty when the document
        yields no pair (no usable title and fewer than two sentences, or none long enough).
    """
    title = title.strip()
    body = (strip_title(title, text) if title else text).strip()
    pairs: list[tuple[str, str, str]] = []
    if title and body and min_query_chars <= len(title) <= max_query_chars:
        pairs.append(("title", title, body))
    wanted = pairs_per_document - len(pairs)
    if wanted <= 0:
        return pairs
    spans = sentence_spans(body)
    if len(spans) < 2:
        return pairs
    candidates = [i for i, (start, end) in enumerate(spans) if min_query_chars <= end - start <= max_query_chars]
    for i in sorted(candidates, key=lambda i: rank_key(seed, doc_id, i))[:wanted]:
        start, end = spans[i]
        rest = f"{body[:start].rstrip()} {body[end:].lstrip()}".strip()
        pairs.append((f"s{i}", body[start:end], f"{title} {rest}" if title else rest))
    return pairs


def span_pairs(doc_id: str, title: str, text: str, *, count: int, seed: int) -> list[tuple[str, str, str]]:
    """``count`` ``(suffix, query, document)`` pairs whose query is a span of words cut out of the body.

    Contriever's cropping, one side (:func:`dssm.hybrid.cut_span`, as the hybrid tuner's pseudo-queries):
    the span (4-12 words, at most half of the body) is *removed* from its document, so the pair teaches
    what a short query shares with the rest of its document, not a copied phrase. Short queries are
    what users type and what sentence pairs are not. Each span's length and place come from a hash of
    ``seed``, ``doc_id`` and its number, so every run cuts the same ones; a repeated span is kept once.

    Returns:
        Up to ``count`` triples with suffix ``"w<k>"``; none when the body has fewer than 8 words.
    """
    title = title.strip()
    words = (strip_title(title, text) if title else text).split()
    if len(words) < 2 * QUERY_WORDS[0]:
        return []
    pairs, seen = [], set()
    for k in range(count):
        value = int.from_bytes(rank_key(seed, doc_id, -1 - k)[:8], "big")
        draws = iter((value, value >> 16))  # the length from the hash's low bits, the start from bits 16 up
        query, rest = cut_span(words, lambda low, high, d=draws: low + next(d) % (high - low + 1))
        if (query, rest) in seen:
            continue
        seen.add((query, rest))
        pairs.append((f"w{k}", query, f"{title} {rest}" if title else rest))
    return pairs


def corpus_document(raw: dict[str, Any], *, spec: CorpusSpec,
                    limits: PairLimits) -> tuple[str, str, str] | beam.pvalue.TaggedOutput:
    """A raw corpus record → ``(doc_id, title, text)``, or its dead letter (a ``rejected`` TaggedOutput).

    Checks, in order: parse errors, the id and text columns, a non-empty id, UTF-8, some title or
    text, ``title + text`` within ``limits.max_document_chars``. ``title`` is ``""`` without a title
    column.
    """
    if raw.get("reason"):
        return reject(raw, raw["reason"], raw.get("error") or REASONS.get(raw["reason"], raw["reason"]))
    fields = raw["fields"]
    missing = [c for c in (spec.id_column, spec.text_column) if c not in fields]
    if missing:
        return reject(raw, "missing_column", f"no column(s) {missing}; the record has {sorted(fields)}")
    doc_id = as_text(fields[spec.id_column])
    if isinstance(doc_id, bytes):
        doc_id = doc_id.decode("utf-8", "backslashreplace")
    if doc_id is None or not doc_id.strip():
        return reject(raw, "empty_document_id", f"id column {spec.id_column!r} is empty: {doc_id!r}")
    doc_id = doc_id.strip()
    parts = {}
    for column in (spec.title_column, spec.text_column):
        value = as_text(fields.get(column)) if column else None
        if isinstance(value, bytes):
            return reject(raw, "document_not_utf8", f"document {doc_id!r}: column {column!r} is not valid "
                           f"UTF-8: {value[:80].decode('utf-8', 'backslashreplace')!r}")
        parts[column] = value or ""
    title, text = parts.get(spec.title_column, "") if spec.title_column else "", parts[spec.text_column]
    if not title.strip() and not text.strip():
        return reject(raw, "empty_document", f"document {doc_id!r} has neither title nor text")
    if len(title) + len(text) > limits.max_document_chars:
        return reject(raw, "document_too_long", f"document {doc_id!r} has {len(title) + len(text)} characters, "
                       f"the limit is {limits.max_document_chars}")
    return doc_id, title, text


class CorpusPairs(beam.DoFn):
    """Raw corpus record → self-supervised pairs (main output) or one dead letter (``rejected``).

    A document yields up to ``pairs_per_document`` pairs (:func:`corpus_pairs`), each with
    ``query_id = <doc id>#<suffix>``, ``document_id = <doc id>``, label 1.0, and the document's split,
    drawn from a hash of the document id, so all pairs of a document land in one split (a validation
    pair's document is never a training document). It also emits the document id on the ``paired``
    output, once per document with pairs, for the job's accounting (read = paired + rejected).
    """

    PAIRED = "paired"

    def __init__(self, *, spec: CorpusSpec, limits: PairLimits, split: SplitSpec) -> None:
        self._spec = spec
        self._limits = limits
        self._split = split

    def process(self, raw: dict[str, Any]) -> Iterator[Any]:
        document = corpus_document(raw, spec=self._spec, limits=self._limits)
        if isinstance(document, beam.pvalue.TaggedOutput):
            yield document
            return
        doc_id, title, text = document
        spec = self._spec
        pairs = corpus_pairs(doc_id, title, text, pairs_per_document=spec.pairs_per_document,
                             min_query_chars=spec.min_query_chars, max_query_chars=self._limits.max_query_chars,
                             seed=spec.seed)
        if spec.span_queries:
            pairs += span_pairs(doc_id, title, text, count=spec.span_queries, seed=spec.seed)
        if not pairs:
            spans = f", nor the {2 * QUERY_WORDS[0]}+ words a span query needs" if spec.span_queries else ""
            yield reject(raw, "no_pair", f"document {doc_id!r} ({len(text)} characters, title {title[:60]!r}) has no "
                          f"usable title and no sentence of {spec.min_query_chars}+ characters with text beside it"
                          f"{spans}")
            return
        split = split_of(doc_id, validation_fraction=self._split.validation_fraction, salt=self._split.salt)
        for suffix, query, document in pairs:
            yield {"record": raw["record"], "query_id": f"{doc_id}#{suffix}", "document_id": doc_id,
                   "query_text": query, "document_text": document, "label": 1.0, "split": split}
        yield beam.pvalue.TaggedOutput(self.PAIRED, doc_id)


# ---- format neighbours: each document → its BM25 nearest other documents -------------------------------


@dataclass(frozen=True)
class NeighbourSpec:
    """How :func:`neighbour_outputs` pairs documents (``dssm pairs --format neighbours``)."""

    top: int
    skip: int
    chunk: int  # pairs per emitted chunk (the featurizing step's unit of work)
    teacher: str = ""  # dssm pairs --teacher: neighbours by the teacher's cosine, its vectors on every pair


class CheckDocuments(beam.DoFn):
    """A chunk of raw corpus records → usable documents (main) or dead letters, plus a counts dict.

    Main output: ``{"record", "id", "text"}`` with ``text`` = title + " " + body
    (:func:`dssm.bm25.document_text`, the text BM25 and the index use). Outputs ``rejected`` and
    ``counts`` (``read`` and ``rejected:<reason>`` of the chunk).
    """

    COUNTS = "counts"

    def __init__(self, *, spec: CorpusSpec, limits: PairLimits) -> None:
        self._spec = spec
        self._limits = limits

    def process(self, chunk: Iterable[dict[str, Any]]) -> Iterator[Any]:
        counts: dict[str, int] = {}
        for raw in chunk:
            counts["read"] = counts.get("read", 0) + 1
            document = corpus_document(raw, spec=self._spec, limits=self._limits)
            if isinstance(document, beam.pvalue.TaggedOutput):
                key = f"{REJECTED}:{document.value['reason']}"
                counts[key] = counts.get(key, 0) + 1
                yield document
                continue
            doc_id, title, text = document
            yield {"record": raw["record"], "id": doc_id, "text": document_text(title, text)}
        yield beam.pvalue.TaggedOutput(self.COUNTS, counts)


def _record_order(record: str) -> tuple[str, int]:
    """``"path:line"`` → ``(path, line)`` so records sort in file order (line 10 after line 9)."""
    path, _, line = record.rpartition(":")
    return (path, int(line)) if line.isdigit() else (record, 0)


def neighbour_outputs(documents: list[dict[str, Any]], *, spec: NeighbourSpec,
                      split: SplitSpec) -> Iterator[Any]:
    """The global step of format neighbours: all documents at once → chunks of pairs (main output).

    Documents are ordered by id (then record), so the BM25 rows and tie-breaks do not depend on the
    order the runner delivered them in. A repeated id keeps its first record in file order; the
    others go to the dead letter (``duplicate_id``). :func:`dssm.bm25.neighbour_pairs` pairs each
    document (as the query) with its BM25 neighbours ranked ``skip+1..skip+top`` among the other
    documents, its own row and identical texts excluded; a document without one goes to the dead
    letter (``no_neighbour``). With ``spec.teacher`` the neighbours are the teacher's
    (:func:`dssm.teacher.teacher_neighbours`, same exclusions) and every pair carries both texts'
    teacher vectors. Pairs have label 1.0 and the split of their query text (as format
    pairs; all pairs of a query share it). Also emits one ``counts`` dict: ``paired_documents`` and
    the rejections made here.

    How it scales: the BM25 index is global (a document's neighbours come from the whole corpus), so the valid documents
    are gathered into one element (``beam.combiners.ToList``) and one worker builds the index once and
    searches every document (:func:`dssm.bm25.neighbour_pairs`, single core); reading, checking and
    featurizing/writing the pairs run in parallel around that step. The worker holds every text and the BM25
    term matrix in memory, and each search scans a score vector over all ``n`` documents, so that step tends
    to ``O(n²)``. Measured on quora-dev's 19,056 documents (``dssm demo``'s first step, DirectRunner, quiet
    2-core machine): about 3 s of BM25 search (some 6,800 documents/s) in a 10.6 s job. Not measured at
    larger sizes; at the quadratic limit 1M documents would take about (1M / 19k)² × 3 s ≈ 2 hours on that
    one core. Beyond a few hundred thousand documents, split the corpus and pair within each part (not
    implemented).
    """
    # deferred: bm25s and PyStemmer, imported only when this runs
    from dssm.bm25 import neighbour_pairs

    counts: dict[str, int] = {}
    kept: dict[str, dict[str, Any]] = {}
    for doc in sorted(documents, key=lambda d: (d["id"], _record_order(d["record"]))):
        first = kept.setdefault(doc["id"], doc)
        if first is not doc:
            counts[f"{REJECTED}:duplicate_id"] = counts.get(f"{REJECTED}:duplicate_id", 0) + 1
            yield beam.pvalue.TaggedOutput(REJECTED, {
                "record": doc["record"], "reason": "duplicate_id",
                "detail": f"document id {doc['id']!r} already read at {first['record']}",
                "row": {"id": doc["id"], "text": doc["text"]}})
    paired: set[str] = set()
    chunk: list[dict[str, Any]] = []
    if kept:
        docs = list(kept.values())
        ids, texts = [d["id"] for d in docs], [d["text"] for d in docs]
        vectors = None
        if spec.teacher:
            vectors = np.asarray(teacher_encoder(spec.teacher)(texts), dtype=np.float32)
            rows = {doc_id: row for row, doc_id in enumerate(ids)}
            pairs = [(ids[q], texts[q], ids[d], texts[d])
                     for q, near in enumerate(teacher_neighbours(vectors, texts, top=spec.top, skip=spec.skip))
                     for d in near]
        else:
            pairs = neighbour_pairs(ids, texts, top=spec.top, skip=spec.skip)
        for query_id, query, document_id, document in pairs:
            paired.add(query_id)
            pair = {"record": kept[query_id]["record"], "query_id": query_id, "document_id": document_id,
                    "query_text": query, "document_text": document, "label": 1.0,
                    "split": split_of(query, validation_fraction=split.validation_fraction, salt=split.salt)}
            if vectors is not None:
                pair["query_teacher"] = vectors[rows[query_id]].tolist()
                pair["document_teacher"] = vectors[rows[document_id]].tolist()
            chunk.append(pair)
            if len(chunk) >= spec.chunk:
                yield chunk
                chunk = []
    if chunk:
        yield chunk
    for doc_id, doc in kept.items():
        if doc_id not in paired:
            counts[f"{REJECTED}:no_neighbour"] = counts.get(f"{REJECTED}:no_neighbour", 0) + 1
            yield beam.pvalue.TaggedOutput(REJECTED, {
                "record": doc["record"], "reason": "no_neighbour",
                "detail": f"document {doc_id!r} shares no BM25 term with any other document of a different "
                          f"text (or has fewer than --skip-neighbours + 1 such neighbours)",
                "row": {"id": doc_id, "text": doc["text"]}})
    counts["paired_documents"] = len(paired)
    yield beam.pvalue.TaggedOutput(CheckDocuments.COUNTS, counts)
