"""Tagging data: labelled texts (a text and a *list* of labels) and label files (label → description).

Formats (the same readers as corpora, :func:`dssm.data.iter_rows`):

* labelled texts — JSONL/Parquet with a list column (``{"_id": ..., "text": ..., "labels": [...]}``),
  or CSV/TSV whose labels cell is a JSON array (``["a", "b"]``) or labels joined by ``separator``
  (default ``,``; surrounding spaces are dropped). An empty list is a text with no label (allowed: a
  negative example for every label).
* label files — ``label<TAB>description`` (TSV, or CSV/JSONL/Parquet) with ``label`` and
  ``description`` columns; further columns are ignored.

Every bad record raises :class:`~dssm.errors.InputError` naming the file, line and reason: a label
that is not in the label file, a missing text, a labels cell that is neither a list nor a string.
Nothing is skipped silently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dssm.data import Document, is_valid_utf8, iter_corpus, iter_rows, read_columns
from dssm.errors import InputError

__all__ = ["TaggedText", "read_labels", "parse_labels", "read_tagged", "label_matrix"]


class TaggedText(NamedTuple):
    """One labelled text: its id, text and labels (in the file's order, without repeats)."""

    id: str
    text: str
    labels: tuple[str, ...]


def read_labels(path: str | Path, *, label_column: str = "label",
                description_column: str = "description") -> list[Document]:
    """Labels as :class:`dssm.data.Document` (id = label, title empty, text = description).

    Raises:
        InputError: missing file or columns, an empty label or description, a repeated label (each
            naming the record).
    """
    labels: list[Document] = []
    seen: dict[str, int] = {}
    for doc in iter_corpus(path, id_column=label_column, text_column=description_column, title_column=None):
        if not doc.text.strip():
            raise InputError(f"{path}: label {doc.id!r} has an empty description")
        if doc.id in seen:
            raise InputError(f"{path}: label {doc.id!r} appears twice (records {seen[doc.id]} and {len(labels) + 1})")
        seen[doc.id] = len(labels) + 1
        labels.append(Document(doc.id, "", doc.text))
    if not labels:
        raise InputError(f"labels file {path} has no labels")
    return labels


def parse_labels(value: Any, *, separator: str, location: str) -> list[str]:
    """One labels cell → its labels (stripped, no repeats): a list, a JSON array string, or ``separator``-joined.

    Raises:
        InputError: the cell is neither, or holds a non-string or empty label (``location`` names the record).
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
    elif isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise InputError(f"{location}: labels cell {value!r} starts with '[' but is not a JSON array: "
                                 f"{exc}") from None
            if not isinstance(items, list):
                raise InputError(f"{location}: labels cell {value!r} is not a JSON array")
        else:
            items = stripped.split(separator) if stripped else []
    else:
        raise InputError(f"{location}: labels must be a list or a string, got {type(value).__name__} {value!r}")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InputError(f"{location}: label {item!r} is not a string")
        label = item.strip()
        if not label:
            raise InputError(f"{location}: empty label in {value!r}")
        if label not in out:
            out.append(label)
    return out


def read_tagged(path: str | Path, *, known_labels: Sequence[str] | None = None, text_column: str = "text",
                labels_column: str | None = "labels", id_column: str | None = None, title_column: str | None = "title",
                separator: str = ",", format: str | None = None) -> list[TaggedText]:  # noqa: A002
    """Read labelled texts.

    Args:
        path: CSV/TSV/JSONL/Parquet file.
        known_labels: the label file's labels; a text naming another label is an error (None: any label).
        text_column, labels_column: column names; ``labels_column=None`` reads unlabelled texts (every
            ``labels`` empty; the file needs no labels column).
        id_column: default ``_id`` if present, else ``id`` if present, else the record's line number.
        title_column: optional title, joined before the text as documents are (missing → none).
        separator: between labels in a CSV/TSV string cell.
        format: table format; default from the suffix.

    Returns:
        The texts in file order.

    Raises:
        InputError: missing file or columns, an unparsable record, an empty text, an unknown label,
            a repeated id (each naming the record).
    """
    columns = read_columns(path, format)
    missing = [c for c in (text_column, labels_column) if c is not None and c not in columns]
    if missing:
        raise InputError(f"tagged texts {path} lack column(s) {missing}; they have {columns}")
    if id_column is None:
        id_column = next((c for c in ("_id", "id") if c in columns), None)
    known = set(known_labels) if known_labels is not None else None
    out: list[TaggedText] = []
    seen: set[str] = set()
    for number, row in enumerate(iter_rows(path, format), 1):
        if row.error:
            raise InputError(f"{row.location}: {row.error}")
        text = "" if row.fields.get(text_column) is None else str(row.fields[text_column])
        title = "" if not title_column or row.fields.get(title_column) is None else str(row.fields[title_column])
        text = f"{title} {text}".strip() if title else text
        if not text.strip() or not is_valid_utf8(text):
            raise InputError(f"{row.location}: text is empty or not valid UTF-8")
        labels = [] if labels_column is None else parse_labels(row.fields.get(labels_column), separator=separator,
                                                               location=row.location)
        unknown = [label for label in labels if known is not None and label not in known]
        if unknown:
            raise InputError(f"{row.location}: label(s) {unknown} are not in the label file")
        text_id = str(row.fields.get(id_column, "")).strip() if id_column else str(number)
        if not text_id or text_id in seen:
            raise InputError(f"{row.location}: id {text_id!r} is empty or repeated")
        seen.add(text_id)
        out.append(TaggedText(text_id, text, tuple(labels)))
    if not out:
        raise InputError(f"tagged texts {path} hold no record")
    return out


def label_matrix(texts: Sequence[TaggedText], labels: Sequence[str]) -> np.ndarray:
    """``[len(texts), len(labels)]`` bool: entry ``(i, j)`` is True when text ``i`` carries label ``j``.

    Raises:
        InputError: a text carries a label not in ``labels`` (named with the text's id).
    """
    column = {label: j for j, label in enumerate(labels)}
    out = np.zeros((len(texts), len(labels)), dtype=bool)
    for i, item in enumerate(texts):
        for label in item.labels:
            if label not in column:
                raise InputError(f"text {item.id!r}: label {label!r} is not among the {len(labels)} labels")
            out[i, column[label]] = True
    return out
