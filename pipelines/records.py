"""Raw records and dead letters: the element shapes every job shares, the readers, and the counts.

This module owns what comes in and what goes out unchanged: the readers that turn a CSV/TSV/JSONL/
Parquet file (or a byte range of a JSONL file) into raw records, the helpers that read a raw field
value as text or as a label and keep undecodable bytes movable by Beam's coders, the dead-letter
line (:data:`REJECTED`, :func:`reject`, :func:`rejected_json`) and the sum of the jobs' count dicts.
Nothing here touches the file system except the readers, which read the paths they are given.
Elements are plain dicts and tuples (pickled by Beam's default coder) so every runner can move them.

Element shapes:

* **raw record** (what the readers and the BEIR join emit)::

      {"record": "path:line", "fields": {column: value}, "reason": str | None, "error": str | None}

  ``reason``/``error`` are set when the record is already known to be unusable (it could not be
  parsed, or a BEIR id did not resolve). String values that were not valid UTF-8 are carried as
  ``bytes``: a Python ``str`` holding the surrogates of undecodable bytes cannot be encoded by Beam's
  coders, and ``bytes`` also make "not UTF-8" a type check.
* **pair** (after :class:`pipelines.validate.ValidatePairs`)::

      {"record", "query_id", "document_id", "query_text", "document_text", "label": float, "split"}

* **rejected** (the dead letter, written as one JSON line each)::

      {"record": "path:line", "reason": code, "detail": human-readable, "row": {column: value}}

Rejection ``reason`` codes of ``dssm pairs`` are the keys of ``stats.json``'s ``rejected_by_reason``:
see :data:`pipelines.validate.REASONS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from dssm.data import BOM, Row, is_valid_utf8, iter_qrels, iter_rows

__all__ = [
    "REJECTED",
    "carry_bytes",
    "json_safe",
    "as_text",
    "label_of",
    "read_table",
    "read_qrels_table",
    "raw_record",
    "read_jsonl_range",
    "read_table_chunks",
    "chunked",
    "reject",
    "rejected_json",
    "sum_counts",
]

REJECTED = "rejected"
_BOOLEAN_WORDS = {"true": 1.0, "false": 0.0}


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


def as_text(value: Any) -> str | bytes | None:
    if value is None or isinstance(value, str | bytes):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(json_safe(value), ensure_ascii=False)


def label_of(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        word = value.strip().lower()
        if word in _BOOLEAN_WORDS:  # a boolean column as pandas and spreadsheets write it to CSV
            return _BOOLEAN_WORDS[word]
        try:
            number = float(word)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


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
        yield raw_record(row, location_ok=location_ok)


def read_qrels_table(path: str) -> Iterator[dict[str, Any]]:
    """Raw records of a qrels file in any layout :func:`dssm.data.qrels_layout` knows (BEIR's or TREC's).

    Every record's fields are ``query-id``, ``corpus-id`` and ``score``, whatever the layout.
    """
    location_ok = is_valid_utf8(str(path))
    for row in iter_qrels(path):
        yield raw_record(row, location_ok=location_ok)


def raw_record(row: Row, *, location_ok: bool) -> dict[str, Any]:
    """A :class:`~dssm.data.Row` as a raw record (``location_ok``: the path is valid UTF-8)."""
    return {
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
    if start == 0:
        data = data.removeprefix(BOM)  # a byte-order mark is not part of the first record
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
    return chunked(read_table(path, table_format), chunk_rows)


def chunked(records: Iterable[dict[str, Any]], chunk_rows: int) -> Iterator[list[dict[str, Any]]]:
    """``records`` in lists of ``chunk_rows`` (the last may be shorter), in order."""
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= chunk_rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def rejected_json(rejected: dict[str, Any]) -> str:
    """One dead-letter line."""
    return json.dumps(json_safe(rejected), ensure_ascii=False, sort_keys=True)


def reject(raw: dict[str, Any], reason: str, detail: str) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(
        REJECTED, {"record": raw["record"], "reason": reason, "detail": detail, "row": raw["fields"]}
    )


def sum_counts(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Key-wise sum of count dicts (the ``CombineGlobally`` of the jobs' counting branches)."""
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total
