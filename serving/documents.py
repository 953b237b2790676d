"""The document forms the Searcher and the HTTP client both accept, in one place (no dependencies).

A document is ``(id, title, text)``, ``(id, text)``, a mapping with ``id``, ``text`` and an optional
``title``, or an object with ``id``/``text`` (and optional ``title``) attributes such as
``serving.client.Document``. Kept apart from ``serving.searcher`` (TensorFlow, ScaNN) and
``serving.client`` (httpx) so each can use it without importing the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["document_fields"]


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
