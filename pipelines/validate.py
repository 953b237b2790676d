"""Checking labelled pairs (formats quora, pairs, beir): raw record → pair or dead letter.

This module owns the pairs job's rejection codes (:data:`REASONS`, the keys of ``stats.json``'s
``rejected_by_reason``), the settings every check shares (:class:`PairColumns`, :class:`PairLimits`,
:class:`SplitSpec`), the id of a text without an id column (:func:`text_id`) and the check itself,
:class:`ValidatePairs`. Element shapes are described in :mod:`pipelines.records`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from dssm.data import split_of
from pipelines.records import as_text, json_safe, label_of, reject

__all__ = ["REASONS", "PairColumns", "PairLimits", "SplitSpec", "text_id", "ValidatePairs"]

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
    "no_pair": "a corpus document has no usable title, no sentence of --min-query-chars with text left "
               "beside it and (with --span-queries) fewer than 8 words (format corpus)",
    "bad_labels": "the labels cell is not a list, a JSON array or a separator-joined string of labels (format tags)",
    "unknown_label": "a label is not in --label-file (format tags)",
    "no_label": "the text has no label, so no pair (format tags)",
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


def text_id(text: str) -> str:
    """The id of a text without an id column: the first 16 hex digits of the sha1 of its UTF-8."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


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
            yield reject(raw, raw["reason"], raw.get("error") or REASONS.get(raw["reason"], raw["reason"]))
            return
        fields, cols = raw["fields"], self._columns
        required = [cols.query, cols.document] + ([cols.label] if cols.label else [])
        missing = [c for c in required if c not in fields]
        if missing:
            yield reject(raw, "missing_column", f"no column(s) {missing}; the record has {sorted(fields)}")
            return
        texts = {}
        for side, column, limit in (("query", cols.query, self._limits.max_query_chars),
                                    ("document", cols.document, self._limits.max_document_chars)):
            text = as_text(fields[column])
            if isinstance(text, bytes):
                yield reject(raw, f"{side}_not_utf8", f"{side} column {column!r} is not valid UTF-8: "
                              f"{text[:80].decode('utf-8', 'backslashreplace')!r}")
                return
            if text is None or not text.strip():
                yield reject(raw, f"empty_{side}", f"{side} column {column!r} is empty: {text!r}")
                return
            if len(text) > limit:
                yield reject(raw, f"{side}_too_long",
                              f"{side} has {len(text)} characters, the limit is {limit}")
                return
            texts[side] = text
        label = 1.0
        if cols.label:
            label = label_of(fields[cols.label])
            if label is None:
                yield reject(raw, "bad_label",
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
            value = as_text(fields.get(column))
            if isinstance(value, bytes):
                value = value.decode("utf-8", "backslashreplace")
            if value is not None and value.strip():
                return value.strip()
        return text_id(text)
