"""The one search contract (:class:`SearchService`) that every way of searching an index honours.

This module owns the operations shared, with the same names and parameters, by the in-process
:class:`serving.searcher.Searcher` and :class:`serving.searcher.ShardedSearcher`, the HTTP service's
:class:`serving.backend.Backend` and the HTTP client :class:`serving.client.SearchClient`: search,
batch search, similarity, get document, upsert and delete. What they return differs by transport
(the backend tags each answer with the index version that gave it, the client returns its own
result classes), but every result iterates and unpacks the same way, so code written against the
contract runs on any of them. ``tests/test_contract.py`` checks that each class satisfies it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["SearchService"]


@runtime_checkable
class SearchService(Protocol):
    """Search, batch search, similarity, document reads and writes over one index (local or remote)."""

    def search(self, text: str, k: int = 10, *, mode: str | None = None, rerank: int = 0) -> Any:
        """Top-k hits for one query, best first (``mode=None``: the index's default mode).

        ``rerank=N > 0`` re-orders the first stage's top ``max(N, k)`` with the index's re-ranker
        (refused when the index has none); 0 returns the first stage as is.
        """
        ...

    def search_batch(self, texts: Sequence[str], k: int = 10, *, mode: str | None = None, rerank: int = 0) -> Any:
        """Top-k hits for each query, all from one index version (``mode`` and ``rerank`` as in :meth:`search`)."""
        ...

    def similarity(self, text1: str, text2: str) -> Any:
        """Cosine of the two texts' query embeddings and, with a stored threshold, the duplicate verdict."""
        ...

    def get_document(self, doc_id: str) -> Any:
        """The stored document ``doc_id`` (a missing id raises a not-found error)."""
        ...

    def upsert(self, documents: Sequence[Any]) -> Any:
        """Add or replace documents; the result names the new index version."""
        ...

    def delete(self, doc_ids: str | Sequence[str]) -> Any:
        """Delete one document id or several (all must exist, or nothing changes)."""
        ...
