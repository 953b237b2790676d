"""The document forms every writer accepts (``upsert_documents``, the Searcher, the HTTP client), in one place.

A document is ``(id, title, text)``, ``(id, text)``, a mapping with ``id``, ``text`` and an optional
``title``, or an object with ``id``/``text`` (and optional ``title``) attributes such as
``serving.client.Document`` or :class:`dssm.data.Document`. No dependencies beyond the errors module, so
the HTTP client imports it without TensorFlow or ScaNN.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from dssm.errors import InputError

__all__ = ["document_fields", "as_documents", "check_document_id"]


def document_fields(doc: Any) -> tuple[Any, Any, Any]:
    """``(id, title, text)`` of one document in any accepted form (a missing title is ``""``).

    Raises:
        ValueError: ``doc`` is in none of the forms, or a mapping lacks ``id``/``text`` or has other keys;
            the message names the document or its keys. Callers raise their own error type from it.
    """
    if isinstance(doc, Mapping):
        if "id" not in doc or "text" not in doc or set(doc) - {"id", "title", "text"}:
            raise ValueError(f"a document needs 'id' and 'text' (optional 'title'), got keys {sorted(doc)}")
        return doc["id"], doc.get("title") or "", doc["text"]
    if isinstance(doc, (tuple, list)) and len(doc) in (2, 3):
        return doc[0], doc[1] if len(doc) == 3 else "", doc[-1]
    if hasattr(doc, "id") and hasattr(doc, "text"):
        return doc.id, getattr(doc, "title", "") or "", doc.text
    raise ValueError(f"a document must be (id, title, text), (id, text), a dict or have id/text attributes, "
                     f"got {doc!r:.80}")


#: Unicode categories an id may not contain: control characters and line/paragraph separators. An id
#: with one could be stored but never fetched or deleted by URL path.
_UNADDRESSABLE = frozenset({"Cc", "Zl", "Zp"})


def check_document_id(doc_id: str) -> str:
    """``doc_id`` if every character is printable (no control character or line break), else ValueError.

    Raises:
        ValueError: naming the first offending character and its position.
    """
    for position, ch in enumerate(doc_id):
        if unicodedata.category(ch) in _UNADDRESSABLE:
            raise ValueError(f"contains the control character {ch!r} at position {position}; ids must be printable")
    return doc_id


def as_documents(documents: Sequence[Any]) -> list[tuple[str, str, str]]:
    """``(id, title, text)`` tuples from any accepted forms, titles and texts checked to be strings.

    Raises:
        InputError: ``documents`` is one document rather than a list, or a document is none of the forms
            or has a non-string title or text (naming it).
    """
    if isinstance(documents, (str, bytes, Mapping)):
        raise InputError(f"documents must be a list of documents, got one {type(documents).__name__}")
    out = []
    for doc in documents:
        try:
            doc_id, title, text = document_fields(doc)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if isinstance(doc_id, str):
            try:
                check_document_id(doc_id)
            except ValueError as exc:
                raise InputError(f"document id {doc_id!r} {exc}") from None
        if not isinstance(text, str) or not isinstance(title, str):
            raise InputError(f"document {doc_id!r}: title and text must be strings, got {type(text).__name__}")
        out.append((doc_id, title, text))
    return out
