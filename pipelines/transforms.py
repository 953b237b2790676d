"""Pure Beam pieces shared by the jobs: reading records, validating pairs, joining BEIR, featurizing.

Nothing here touches the file system except the reader DoFns, which read the paths they are given.
Elements are plain dicts and tuples (pickled by Beam's default coder) so every runner can move them.

Element shapes:

* **raw record** (what the readers and the BEIR join emit)::

      {"record": "path:line", "fields": {column: value}, "reason": str | None, "error": str | None}

  ``reason``/``error`` are set when the record is already known to be unusable (it could not be
  parsed, or a BEIR id did not resolve). String values that were not valid UTF-8 are carried as
  ``bytes``: a Python ``str`` holding the surrogates of undecodable bytes cannot be encoded by Beam's
  coders, and ``bytes`` also make "not UTF-8" a type check.
* **pair** (after :class:`ValidatePairs`)::

      {"record", "query_id", "document_id", "query_text", "document_text", "label": float, "split"}

* **rejected** (the dead letter, written as one JSON line each)::

      {"record": "path:line", "reason": code, "detail": human-readable, "row": {column: value}}

Rejection ``reason`` codes are the keys of ``stats.json``'s ``rejected_by_reason``: see
:data:`REASONS`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

import dssm  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from dssm.data import document_text, is_valid_utf8, iter_rows, split_of
from dssm.features import FeatureConfig, Featurizer

import tensorflow as tf  # noqa: E402  isort: skip  (after dssm: legacy Keras)

__all__ = [
    "REASONS",
    "REJECTED",
    "PairColumns",
    "PairLimits",
    "SplitSpec",
    "carry_bytes",
    "json_safe",
    "text_id",
    "read_table",
    "read_jsonl_range",
    "ValidatePairs",
    "JoinBeir",
    "CorpusSpec",
    "CorpusPairs",
    "corpus_pairs",
    "corpus_document",
    "NeighbourSpec",
    "CheckDocuments",
    "neighbour_outputs",
    "FeaturizeChunks",
    "sentence_spans",
    "strip_title",
    "FeaturizePairs",
    "MakePairs",
    "featurize_pairs",
    "read_table_chunks",
    "sum_counts",
    "normalise_text",
    "negative_entries",
    "attach_negatives",
    "set_negative",
    "pair_example",
    "rejected_json",
]

REJECTED = "rejected"

REASONS = {
    "unparsable": "the record could not be parsed (wrong field count, invalid JSON)",
    "missing_column": "the record lacks a required column",
    "query_not_utf8": "the query is not valid UTF-8",
    "document_not_utf8": "the document is not valid UTF-8",
    "empty_query": "the query is empty or only whitespace",
    "empty_document": "the document is empty or only whitespace",
    "query_too_long": "the query is longer than --max-query-chars",
    "document_too_long": "the document is longer than --max-document-chars",
    "bad_label": "the label is empty, not a number, or not finite",
    "non_positive_score": "a BEIR qrel with score <= 0 (judged not relevant)",
    "unknown_query_id": "a BEIR qrel names a query id not in queries.jsonl",
    "unknown_document_id": "a BEIR qrel names a document id not in corpus.jsonl",
    "duplicate_id": "a BEIR query or document id, or a corpus id in format neighbours, occurs more than once",
    "bad_query_record": "a line of the BEIR queries.jsonl could not be used",
    "bad_document_record": "a line of the BEIR corpus.jsonl could not be used",
    "empty_document_id": "a corpus record has no id (format corpus)",
    "no_pair": "a corpus document has no usable title and no sentence of --min-query-chars with text left "
               "beside it (format corpus)",
    "no_neighbour": "a corpus document shares no BM25 term with any other document of a different text, or has "
                    "fewer than --skip-neighbours + 1 such neighbours (format neighbours)",
}


@dataclass(frozen=True)
class PairColumns:
    """Which input columns hold what. ``label``/ids may be ``None`` (no such column)."""

    query: str
    document: str
    label: str | None = None
    query_id: str | None = None
    document_id: str | None = None


@dataclass(frozen=True)
class PairLimits:
    """Longest accepted texts, in characters (longer rows are rejected, not cut)."""

    max_query_chars: int
    max_document_chars: int


@dataclass(frozen=True)
class SplitSpec:
    """Settings for :func:`dssm.data.split_of`."""

    validation_fraction: float
    salt: str = ""


def carry_bytes(value: Any) -> Any:
    """Turn strings holding undecodable bytes (surrogates) into ``bytes``, recursively.

    :func:`dssm.data.iter_rows` reads with ``errors="surrogateescape"``; such strings cannot be
    encoded by Beam's coders, and as ``bytes`` they are easy to recognise as "not UTF-8".
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            try:
                return value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # a lone surrogate from a JSON \\ud800 escape
                return value.encode("utf-8", "surrogatepass")
    if isinstance(value, dict):
        return {json_safe(k) if not isinstance(k, str) else _printable(k): carry_bytes(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [carry_bytes(v) for v in value]
    return value


def _printable(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def json_safe(value: Any) -> Any:
    """A JSON-encodable copy: bytes as text with ``\\xNN`` escapes for bytes that are not UTF-8."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        return _printable(value)
    if isinstance(value, dict):
        return {str(json_safe(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def text_id(text: str) -> str:
    """The id of a text without an id column: the first 16 hex digits of the sha1 of its UTF-8."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def read_table(path: str, table_format: str | None = None) -> Iterator[dict[str, Any]]:
    """Raw records of one CSV/TSV/JSONL/Parquet file (the body of a ``FlatMap`` over paths).

    Args:
        path: the file.
        table_format: ``csv``/``tsv``/``jsonl``/``parquet``, or ``None`` for the file's suffix.

    Yields:
        Raw records (see the module docstring); unparsable ones carry ``reason="unparsable"``.
    """
    location_ok = is_valid_utf8(str(path))
    for row in iter_rows(path, table_format):
        yield {
            "record": row.location if location_ok else _printable(row.location),
            "fields": row.fields if _plain_utf8(row.fields) else carry_bytes(row.fields),
            "reason": "unparsable" if row.error else None,
            "error": row.error,
        }


def read_jsonl_range(path: str, start: int, end: int, first_line: int) -> Iterator[dict[str, Any]]:
    """Raw records of the lines in bytes ``[start, end)`` of a JSONL file, as :func:`read_table` makes them.

    Lets a job split one big JSONL file into byte ranges read by different workers (the encode job's
    read stage). ``start`` and ``end`` must be line starts (0, just after a ``\\n``, or the file size);
    ``first_line`` is the 1-based number of the line at ``start``, so locations read ``path:line`` as
    :func:`read_table`'s do. Lines are ``\\n``-separated (a lone ``\\r`` is JSON whitespace, not a line
    break); blank lines are skipped but counted.

    Args:
        path: the JSONL file.
        start: byte offset of the first line.
        end: byte offset just past the last line.
        first_line: the line number of the line at ``start``.

    Yields:
        Raw records (see the module docstring); unparsable ones carry ``reason="unparsable"``.
    """
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    location_ok = is_valid_utf8(str(path))
    where = str(path) if location_ok else _printable(str(path))
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    if lines and not lines[-1]:
        lines.pop()
    for line_no, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        error = None
        try:
            fields = json.loads(line)
            if not isinstance(fields, dict):
                error = "not a JSON object"
        except (json.JSONDecodeError, UnicodeEncodeError) as exc:
            error = f"not valid JSON: {exc}"
        if error:
            fields = {"raw": line}
        yield {
            "record": f"{where}:{line_no}",
            "fields": fields if _plain_utf8(fields) else carry_bytes(fields),
            "reason": "unparsable" if error else None,
            "error": error,
        }


def _plain_utf8(fields: dict[str, Any]) -> bool:
    """True if every key and value is a valid-UTF-8 ``str`` or a scalar: the row needs no :func:`carry_bytes`.

    One encode of the joined strings instead of one per value (almost every row takes this path).
    """
    texts = []
    for key, value in fields.items():
        if not isinstance(key, str):
            return False
        texts.append(key)
        if isinstance(value, str):
            texts.append(value)
        elif not (value is None or isinstance(value, bool | int | float)):
            return False
    return is_valid_utf8("".join(texts))


def read_table_chunks(path: str, table_format: str | None, chunk_rows: int) -> Iterator[list[dict[str, Any]]]:
    """:func:`read_table`'s records in lists of ``chunk_rows`` (the body of a ``FlatMap`` over paths)."""
    chunk = []
    for record in read_table(path, table_format):
        chunk.append(record)
        if len(chunk) >= chunk_rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def rejected_json(rejected: dict[str, Any]) -> str:
    """One dead-letter line."""
    return json.dumps(json_safe(rejected), ensure_ascii=False, sort_keys=True)


def _reject(raw: dict[str, Any], reason: str, detail: str) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(
        REJECTED, {"record": raw["record"], "reason": reason, "detail": detail, "row": raw["fields"]}
    )


def _label_of(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _as_text(value: Any) -> str | bytes | None:
    if value is None or isinstance(value, str | bytes):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(json_safe(value), ensure_ascii=False)


class ValidatePairs(beam.DoFn):
    """Raw record → pair (main output) or dead letter (``rejected`` output), never both, never neither.

    Checks, in order: parse errors, required columns, UTF-8, emptiness, length, label. Texts are kept
    exactly as read. Records without a label column get label 1.0 (a positive pair); ids come from
    the id columns when present and non-empty, else from :func:`text_id`.
    """

    def __init__(self, *, columns: PairColumns, limits: PairLimits, split: SplitSpec) -> None:
        self._columns = columns
        self._limits = limits
        self._split = split

    def process(self, raw: dict[str, Any]) -> Iterator[Any]:
        if raw.get("reason"):
            yield _reject(raw, raw["reason"], raw.get("error") or REASONS.get(raw["reason"], raw["reason"]))
            return
        fields, cols = raw["fields"], self._columns
        required = [cols.query, cols.document] + ([cols.label] if cols.label else [])
        missing = [c for c in required if c not in fields]
        if missing:
            yield _reject(raw, "missing_column", f"no column(s) {missing}; the record has {sorted(fields)}")
            return
        texts = {}
        for side, column, limit in (("query", cols.query, self._limits.max_query_chars),
                                    ("document", cols.document, self._limits.max_document_chars)):
            text = _as_text(fields[column])
            if isinstance(text, bytes):
                yield _reject(raw, f"{side}_not_utf8", f"{side} column {column!r} is not valid UTF-8: "
                              f"{text[:80].decode('utf-8', 'backslashreplace')!r}")
                return
            if text is None or not text.strip():
                yield _reject(raw, f"empty_{side}", f"{side} column {column!r} is empty: {text!r}")
                return
            if len(text) > limit:
                yield _reject(raw, f"{side}_too_long",
                              f"{side} has {len(text)} characters, the limit is {limit}")
                return
            texts[side] = text
        label = 1.0
        if cols.label:
            label = _label_of(fields[cols.label])
            if label is None:
                yield _reject(raw, "bad_label",
                              f"label column {cols.label!r} is not a finite number: {json_safe(fields[cols.label])!r}")
                return
        yield {
            "record": raw["record"],
            "query_id": self._id(fields, cols.query_id, texts["query"]),
            "document_id": self._id(fields, cols.document_id, texts["document"]),
            "query_text": texts["query"],
            "document_text": texts["document"],
            "label": label,
            "split": split_of(texts["query"], validation_fraction=self._split.validation_fraction,
                              salt=self._split.salt),
        }

    @staticmethod
    def _id(fields: dict[str, Any], column: str | None, text: str) -> str:
        if column:
            value = _as_text(fields.get(column))
            if isinstance(value, bytes):
                value = value.decode("utf-8", "backslashreplace")
            if value is not None and value.strip():
                return value.strip()
        return text_id(text)


def _keyed(raw: dict[str, Any], id_key: str, reason: str) -> Iterator[Any]:
    """BEIR queries/corpus line → ``(id, raw)``, or a dead letter if it has no usable id."""
    if raw.get("reason"):
        yield beam.pvalue.TaggedOutput(REJECTED, {"record": raw["record"], "reason": reason,
                                                 "detail": raw.get("error") or "", "row": raw["fields"]})
        return
    value = _as_text(raw["fields"].get(id_key))
    if not isinstance(value, str) or not value.strip():
        yield beam.pvalue.TaggedOutput(REJECTED, {"record": raw["record"], "reason": reason,
                                                 "detail": f"no usable {id_key!r}: {json_safe(value)!r}",
                                                 "row": raw["fields"]})
        return
    yield value.strip(), raw


def _document_text(fields: dict[str, Any]) -> str | bytes | None:
    """``title + " " + text`` (the convention of :func:`dssm.bm25.document_text`)."""
    title, text = _as_text(fields.get("title")), _as_text(fields.get("text"))
    if isinstance(title, bytes) or isinstance(text, bytes):
        return (title.encode() if isinstance(title, str) else title or b"") + b" " + (
            text.encode() if isinstance(text, str) else text or b"")
    if title and title.strip():
        return f"{title} {text or ''}".strip()
    return text


def _qrel(raw: dict[str, Any]) -> Iterator[Any]:
    """qrels.tsv line → ``(query_id, raw pair)`` for the join, or the raw record straight through."""
    fields = raw["fields"]
    qid, did, score = (_as_text(fields.get(c)) for c in ("query-id", "corpus-id", "score"))
    pair = {"record": raw["record"], "reason": raw.get("reason"), "error": raw.get("error"),
            "fields": {"query_id": qid, "document_id": did, "label": score}}
    if not pair["reason"]:
        label = _label_of(score)
        if not isinstance(qid, str) or not qid.strip() or not isinstance(did, str) or not did.strip():
            pair.update(reason="unparsable", error=f"empty or non-UTF-8 query-id/corpus-id: {qid!r} {did!r}")
        elif label is None:
            pair.update(reason="bad_label", error=f"score {json_safe(score)!r} is not a finite number")
        elif label <= 0:
            pair.update(reason="non_positive_score", error=f"score {score} marks the document not relevant")
        else:
            pair["fields"]["label"] = label
    if pair["reason"]:
        yield beam.pvalue.TaggedOutput("done", pair)
    else:
        yield qid.strip(), pair


def _attach(grouped: tuple[str, dict[str, list[Any]]], *, side: str, source: str) -> Iterator[Any]:
    """One CoGroupByKey group: copy the single matching text into every pair of the group."""
    key, groups = grouped
    matches, pairs = list(groups["texts"]), groups["pairs"]
    for pair in pairs:
        pair = {**pair, "fields": dict(pair["fields"])}
        if not matches:
            pair.update(reason=f"unknown_{side}_id", error=f"{side} id {key!r} is not in {source}")
        elif len(matches) > 1:
            pair.update(reason="duplicate_id", error=f"{side} id {key!r} occurs {len(matches)} times in {source} "
                                                     f"({', '.join(m['record'] for m in matches[:3])})")
        else:
            fields = matches[0]["fields"]
            pair["fields"][side] = _as_text(fields.get("text")) if side == "query" else _document_text(fields)
        if side == "query" and not pair["reason"]:
            yield pair["fields"]["document_id"].strip(), pair
        else:
            yield beam.pvalue.TaggedOutput("done", pair)


class JoinBeir(beam.PTransform):
    """Joins BEIR qrels with their query and document texts: one raw pair record per qrel line.

    Input: a dict of PCollections of raw records ``{"qrels", "queries", "corpus"}``. Output: a dict
    ``{"pairs": raw pair records, "rejected": dead letters for unusable queries/corpus lines}``. A pair
    record has fields ``query_id, query, document_id, document, label`` (document = title + " " +
    text) and its qrels line as ``record``; qrels with score <= 0 or unresolved ids come out with a
    ``reason``, so :class:`ValidatePairs` sends them to the dead letter.
    """

    def __init__(self, *, queries_name: str = "queries.jsonl", corpus_name: str = "corpus.jsonl") -> None:
        super().__init__()
        self._queries_name = queries_name
        self._corpus_name = corpus_name

    def expand(self, inputs: dict[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        queries = inputs["queries"] | "KeyQueries" >> beam.FlatMap(
            _keyed, "_id", "bad_query_record").with_outputs(REJECTED, main="keyed")
        corpus = inputs["corpus"] | "KeyCorpus" >> beam.FlatMap(
            _keyed, "_id", "bad_document_record").with_outputs(REJECTED, main="keyed")
        qrels = inputs["qrels"] | "KeyQrels" >> beam.FlatMap(_qrel).with_outputs("done", main="keyed")
        with_query = (
            {"texts": queries.keyed, "pairs": qrels.keyed}
            | "JoinQueries" >> beam.CoGroupByKey()
            | "AttachQuery" >> beam.FlatMap(_attach, side="query", source=self._queries_name).with_outputs(
                "done", main="keyed")
        )
        with_document = (
            {"texts": corpus.keyed, "pairs": with_query.keyed}
            | "JoinCorpus" >> beam.CoGroupByKey()
            | "AttachDocument" >> beam.FlatMap(_attach, side="document", source=self._corpus_name).with_outputs(
                "done", main="keyed")
        )
        pairs = (qrels.done, with_query.done, with_document.done) | "AllPairs" >> beam.Flatten()
        rejected = (queries[REJECTED], corpus[REJECTED]) | "BadTexts" >> beam.Flatten()
        return {"pairs": pairs, "rejected": rejected}


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


def _rank_key(seed: int, doc_id: str, index: int) -> bytes:
    """A repeatable pseudo-random order of a document's sentences (sha256: the same on every runner)."""
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
    for i in sorted(candidates, key=lambda i: _rank_key(seed, doc_id, i))[:wanted]:
        start, end = spans[i]
        rest = f"{body[:start].rstrip()} {body[end:].lstrip()}".strip()
        pairs.append((f"s{i}", body[start:end], f"{title} {rest}" if title else rest))
    return pairs


def corpus_document(raw: dict[str, Any], *, spec: CorpusSpec,
                    limits: PairLimits) -> tuple[str, str, str] | beam.pvalue.TaggedOutput:
    """A raw corpus record → ``(doc_id, title, text)``, or its dead letter (a ``rejected`` TaggedOutput).

    Checks, in order: parse errors, the id and text columns, a non-empty id, UTF-8, some title or
    text, ``title + text`` within ``limits.max_document_chars``. ``title`` is ``""`` without a title
    column.
    """
    if raw.get("reason"):
        return _reject(raw, raw["reason"], raw.get("error") or REASONS.get(raw["reason"], raw["reason"]))
    fields = raw["fields"]
    missing = [c for c in (spec.id_column, spec.text_column) if c not in fields]
    if missing:
        return _reject(raw, "missing_column", f"no column(s) {missing}; the record has {sorted(fields)}")
    doc_id = _as_text(fields[spec.id_column])
    if isinstance(doc_id, bytes):
        doc_id = doc_id.decode("utf-8", "backslashreplace")
    if doc_id is None or not doc_id.strip():
        return _reject(raw, "empty_document_id", f"id column {spec.id_column!r} is empty: {doc_id!r}")
    doc_id = doc_id.strip()
    parts = {}
    for column in (spec.title_column, spec.text_column):
        value = _as_text(fields.get(column)) if column else None
        if isinstance(value, bytes):
            return _reject(raw, "document_not_utf8", f"document {doc_id!r}: column {column!r} is not valid "
                           f"UTF-8: {value[:80].decode('utf-8', 'backslashreplace')!r}")
        parts[column] = value or ""
    title, text = parts.get(spec.title_column, "") if spec.title_column else "", parts[spec.text_column]
    if not title.strip() and not text.strip():
        return _reject(raw, "empty_document", f"document {doc_id!r} has neither title nor text")
    if len(title) + len(text) > limits.max_document_chars:
        return _reject(raw, "document_too_long", f"document {doc_id!r} has {len(title) + len(text)} characters, "
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
        if not pairs:
            yield _reject(raw, "no_pair", f"document {doc_id!r} ({len(text)} characters, title {title[:60]!r}) has no "
                          f"usable title and no sentence of {spec.min_query_chars}+ characters with text beside it")
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
    letter (``no_neighbour``). Pairs have label 1.0 and the split of their query text (as format
    pairs; all pairs of a query share it). Also emits one ``counts`` dict: ``paired_documents`` and
    the rejections made here.
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
        for query_id, query, document_id, document in neighbour_pairs(
                [d["id"] for d in docs], [d["text"] for d in docs], top=spec.top, skip=spec.skip):
            paired.add(query_id)
            chunk.append({"record": kept[query_id]["record"], "query_id": query_id, "document_id": document_id,
                          "query_text": query, "document_text": document, "label": 1.0,
                          "split": split_of(query, validation_fraction=split.validation_fraction, salt=split.salt)})
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


class FeaturizeChunks(beam.DoFn):
    """A chunk of validated pairs → serialized Examples: ``train`` (main), ``validation``, and a counts dict.

    :class:`MakePairs` without the checking step, for pairs made elsewhere (format neighbours).
    """

    VALIDATION = "validation"
    COUNTS = "counts"

    def __init__(self, *, feature_config: FeatureConfig, batch_size: int) -> None:
        self._config = feature_config
        self._batch_size = batch_size
        self._featurizer: Any = None

    def setup(self) -> None:
        self._featurizer = Featurizer(self._config)

    def process(self, chunk: Iterable[dict[str, Any]]) -> Iterator[Any]:
        pairs = list(chunk)
        counts: dict[str, int] = {}
        for start in range(0, len(pairs), self._batch_size):
            for split, example in featurize_pairs(self._featurizer, pairs[start:start + self._batch_size],
                                                  negatives=False):
                counts[split] = counts.get(split, 0) + 1
                yield example if split == "train" else beam.pvalue.TaggedOutput(self.VALIDATION, example)
        yield beam.pvalue.TaggedOutput(self.COUNTS, counts)


# ---- explicit negatives as a third tower input ---------------------------------------------------------


def normalise_text(text: str) -> str:
    """NFKC, case-folded, white space collapsed: the key under which two texts count as the same."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def negative_entries(pair: dict[str, Any]) -> Iterator[tuple[str, tuple[str, Any]]]:
    """A validated pair → entries keyed by normalised query text for :func:`attach_negatives`.

    Every pair goes to its query's group as a ``row``. A pair with label <= 0 also offers each side
    as a negative of the other: "B is not a duplicate of A" makes B a negative for A's positives and
    A one for B's (duplicate questions are a symmetric relation).
    """
    yield normalise_text(pair["query_text"]), ("row", pair)
    if pair["label"] <= 0:
        yield normalise_text(pair["query_text"]), ("negative", (pair["document_id"], pair["document_text"]))
        yield normalise_text(pair["document_text"]), ("negative", (pair["query_id"], pair["query_text"]))


def attach_negatives(group: tuple[str, Iterable[tuple[str, Any]]]) -> Iterator[dict[str, Any]]:
    """One query's group → its pairs, each positive carrying one explicit negative when the query has any.

    Negatives are handed out round-robin (positives ordered by source record, negatives by id and
    text) so each positive gets one and as many distinct negatives as possible get used; a negative
    with the positive's document id or text, or the query's own text, is skipped for that positive
    (contradictory labels).
    Every row comes out exactly once; rows with label <= 0 come out unchanged (still label-0 pairs).
    The carried negative is ``pair["negative_id"]``/``pair["negative_text"]``.
    """
    key, entries = group
    rows, negatives = [], set()
    for kind, value in entries:
        if kind == "row":
            rows.append(value)
        else:
            negatives.add(value)
    ordered = sorted(negatives)
    positives = sorted((r for r in rows if r["label"] > 0), key=lambda r: r["record"])
    for i, pair in enumerate(positives):
        own = normalise_text(pair["document_text"])
        usable = [n for n in ordered
                  if n[0] != pair["document_id"] and normalise_text(n[1]) not in (own, key)]
        if usable:
            negative_id, negative_text = usable[i % len(usable)]
            pair = {**pair, "negative_id": negative_id, "negative_text": negative_text}
        yield pair
    yield from (r for r in rows if r["label"] <= 0)


def set_negative(example: tf.train.Example, negative_id: str, negative_text: str,
                 bag: tuple[Any, Any] | None) -> None:
    """Set the ``negative_*`` features of ``example`` (empty id/text/bag = "no negative", as model.py reads it)."""
    feature = example.features.feature
    feature["negative_id"].bytes_list.value[:] = [negative_id.encode("utf-8")]
    feature["negative_text"].bytes_list.value[:] = [negative_text.encode("utf-8")]
    feature["negative_ids"].int64_list.value[:] = bag[0].tolist() if bag is not None else []
    feature["negative_counts"].float_list.value[:] = bag[1].tolist() if bag is not None else []


def pair_example(pair: dict[str, Any], query_bag: tuple[Any, Any], document_bag: tuple[Any, Any], *,
                 negative_bag: tuple[Any, Any] | None = None, with_negative: bool = False) -> bytes:
    """A serialized ``tf.train.Example`` with exactly the features of docs/design.md.

    Args:
        pair: a validated pair (with ``negative_id``/``negative_text`` when it carries a negative).
        query_bag: ``(ids int64 [m], counts float32 [m])`` numpy arrays of the query.
        document_bag: the same for the document.
        negative_bag: the same for the pair's negative, or ``None``.
        with_negative: also write the ``negative_*`` features (empty when the pair has no negative),
            so every example of a run has the same features.
    """
    example = tf.train.Example()
    feature = example.features.feature
    for key in ("query_id", "document_id", "query_text", "document_text"):
        feature[key].bytes_list.value.append(pair[key].encode("utf-8"))
    feature["label"].float_list.value.append(pair["label"])
    # tolist(): protobuf converts Python ints/floats three times faster than numpy scalars.
    feature["query_ids"].int64_list.value.extend(query_bag[0].tolist())
    feature["query_counts"].float_list.value.extend(query_bag[1].tolist())
    feature["document_ids"].int64_list.value.extend(document_bag[0].tolist())
    feature["document_counts"].float_list.value.extend(document_bag[1].tolist())
    if with_negative:
        set_negative(example, pair.get("negative_id", ""), pair.get("negative_text", ""), negative_bag)
    return example.SerializeToString()


class FeaturizePairs(beam.DoFn):
    """Batch of pairs → ``(split, serialized tf.train.Example)`` per pair.

    Feed it lists of pairs (``beam.BatchElements``): one :meth:`~dssm.features.Featurizer.bags_numpy`
    call per batch hashes all queries, documents (and negatives) together, which is what makes it fast.
    The Featurizer (and TensorFlow's graph) is built once per worker in :meth:`setup`, not pickled.

    Args:
        feature_config: the featurizer's settings.
        negatives: write the ``negative_*`` features on every example (pairs that carry a
            ``negative_text`` get its bag; the others an empty one).
    """

    def __init__(self, *, feature_config: FeatureConfig, negatives: bool = False) -> None:
        self._config = feature_config
        self._negatives = negatives
        self._featurizer: Any = None

    def setup(self) -> None:
        self._featurizer = Featurizer(self._config)

    def process(self, batch: Iterable[dict[str, Any]]) -> Iterator[tuple[str, bytes]]:
        yield from featurize_pairs(self._featurizer, list(batch), negatives=self._negatives)


def featurize_pairs(featurizer: Any, batch: list[dict[str, Any]], *, negatives: bool) -> list[tuple[str, bytes]]:
    """``(split, serialized Example)`` for each pair of ``batch``, from one featurizer call.

    Args:
        featurizer: a :class:`~dssm.features.Featurizer`.
        batch: validated pairs.
        negatives: write the ``negative_*`` features (see :func:`pair_example`).
    """
    n = len(batch)
    with_negative = [i for i, p in enumerate(batch) if negatives and p.get("negative_text")]
    bags = featurizer.bags_numpy([p["query_text"] for p in batch] + [p["document_text"] for p in batch]
                                 + [batch[i]["negative_text"] for i in with_negative])
    negative_bags = dict(zip(with_negative, bags[2 * n:], strict=True))
    return [(pair["split"], pair_example(pair, bags[i], bags[n + i], negative_bag=negative_bags.get(i),
                                         with_negative=negatives))
            for i, pair in enumerate(batch)]


def sum_counts(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Key-wise sum of count dicts (the ``CombineGlobally`` of the jobs' counting branches)."""
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


class MakePairs(beam.DoFn):
    """A chunk of raw records → checked, featurized examples, in one step per chunk.

    Every record goes through ``check`` (a :class:`ValidatePairs` or :class:`CorpusPairs`, whose
    ``process`` is called directly), and the chunk's pairs are featurized ``batch_size`` at a time.
    Working on chunks instead of single records is what makes the job fast on Beam's DirectRunner:
    a per-element step costs several microseconds of runner bookkeeping (coders, bundle plumbing), more
    than hashing a pair, so one step per chunk replaces the validate → batch → featurize →
    partition → count chain of per-element steps.

    Outputs: main ``train`` (serialized Examples), ``validation`` (serialized Examples), ``rejected``
    (dead letters), ``counts`` (one dict per chunk: ``read``, ``rejected:<reason>``, the splits,
    ``label_0``, ``paired_documents``). With ``featurize=False`` the main output carries the validated
    pair dicts instead and no examples are made (for jobs that regroup pairs before featurizing).
    """

    VALIDATION = "validation"
    COUNTS = "counts"

    def __init__(self, *, check: beam.DoFn, feature_config: FeatureConfig, batch_size: int,
                 featurize: bool = True) -> None:
        self._check = check
        self._config = feature_config
        self._batch_size = batch_size
        self._featurize = featurize
        self._featurizer: Any = None

    def setup(self) -> None:
        self._check.setup()
        if self._featurize:
            self._featurizer = Featurizer(self._config)

    def process(self, chunk: Iterable[dict[str, Any]]) -> Iterator[Any]:
        counts: dict[str, int] = {}
        pairs = []
        for raw in chunk:
            counts["read"] = counts.get("read", 0) + 1
            for out in self._check.process(raw):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    key = f"{REJECTED}:{out.value['reason']}" if out.tag == REJECTED else "paired_documents"
                    counts[key] = counts.get(key, 0) + 1
                    if out.tag == REJECTED:
                        yield out
                else:
                    pairs.append(out)
        if not self._featurize:
            yield from pairs
            yield beam.pvalue.TaggedOutput(self.COUNTS, counts)
            return
        for start in range(0, len(pairs), self._batch_size):
            for split, example in featurize_pairs(self._featurizer, pairs[start:start + self._batch_size],
                                                  negatives=False):
                counts[split] = counts.get(split, 0) + 1
                yield example if split == "train" else beam.pvalue.TaggedOutput(self.VALIDATION, example)
        label_0 = sum(1 for p in pairs if p["label"] <= 0)
        if label_0:
            counts["label_0"] = label_0
        yield beam.pvalue.TaggedOutput(self.COUNTS, counts)
