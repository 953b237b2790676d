"""Python client for the HTTP service, with the same method names as the in-process Searcher.

Example::

    from serving.client import SearchClient

    with SearchClient("http://127.0.0.1:8080") as client:
        for doc_id, score, text in client.search("how do I learn python", k=5):
            ...

Switching between remote and local is one line: ``SearchClient(url)`` or ``Searcher.load(index_dir)``;
``search``/``search_batch`` results iterate and unpack as ``(id, score, text)`` either way.

Retries: connection failures (connect errors and connect timeouts: the request never reached the
server) and 429/503 answers are retried with exponential backoff and jitter, honouring a server's
``Retry-After`` up to ``max_backoff``. Nothing else is retried. A 4xx raises a :class:`ClientError`
subclass carrying the status and the server's reason.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from dssm.errors import DSSMError
from dssm.index.documents import document_fields

__all__ = [
    "Hit",
    "SearchResults",
    "BatchSearchResults",
    "Similarity",
    "Tag",
    "Tags",
    "Document",
    "WriteResult",
    "ServiceError",
    "ClientError",
    "BadRequestError",
    "AuthenticationError",
    "ForbiddenError",
    "NotFoundError",
    "OverloadedError",
    "UnavailableError",
    "ServerError",
    "ConnectionFailedError",
    "SearchClient",
]


@dataclass(frozen=True)
class Hit:
    """One result; unpacks as ``(id, score, text)`` like :class:`serving.searcher.Hit`."""

    id: str
    score: float
    text: str

    def __iter__(self) -> Iterator[Any]:
        return iter((self.id, self.score, self.text))


@dataclass(frozen=True)
class SearchResults(Sequence[Hit]):
    """Hits of one query (a sequence of :class:`Hit`) and the index version that produced them."""

    version: str
    hits: tuple[Hit, ...]

    def __getitem__(self, i: Any) -> Any:
        return self.hits[i]

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)


@dataclass(frozen=True)
class BatchSearchResults(Sequence[SearchResults]):
    """One :class:`SearchResults` per query, all from one index version."""

    version: str
    results: tuple[SearchResults, ...]

    def __getitem__(self, i: Any) -> Any:
        return self.results[i]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[SearchResults]:
        return iter(self.results)


@dataclass(frozen=True)
class Tag:
    """One label for a text: ``predicted`` is ``None`` when the tags index has no threshold."""

    label: str
    score: float
    predicted: bool | None


@dataclass(frozen=True)
class Tags:
    """A text's labels, best first, from one tags index version."""

    version: str
    threshold: float | None
    labels: tuple[Tag, ...]


@dataclass(frozen=True)
class Similarity:
    """Cosine of two texts; ``is_duplicate``/``threshold`` are ``None`` when the index has no threshold."""

    version: str
    cosine: float
    is_duplicate: bool | None
    threshold: float | None


@dataclass(frozen=True)
class Document:
    """A stored document (``version``: the index version it was read from; empty when sent)."""

    id: str
    text: str
    title: str = ""
    version: str = ""


@dataclass(frozen=True)
class WriteResult:
    """The index version an upsert or delete produced, and how many documents it changed."""

    version: str
    upserted: int
    deleted: int


class ServiceError(DSSMError):
    """Any failure talking to the service. ``status`` is the HTTP status (0 if none was received)."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "", details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.details = list(details)


class ClientError(ServiceError):
    """The server refused the request (4xx); ``reason`` is its explanation."""


class BadRequestError(ClientError):
    """400/413/415/422: the request itself is wrong (empty query, k out of range, too large, ...)."""


class AuthenticationError(ClientError):
    """401: missing or wrong API key."""


class ForbiddenError(ClientError):
    """403: the operation is disabled on this server (e.g. writes without a configured key)."""


class NotFoundError(ClientError):
    """404: no such document (or path)."""


class OverloadedError(ClientError):
    """429 after every retry: the server kept refusing because too many requests were in flight."""


class ServerError(ServiceError):
    """5xx (other than a retried 503)."""


class UnavailableError(ServerError):
    """503 after every retry: no index loaded yet."""


class ConnectionFailedError(ServiceError):
    """Could not connect after every retry."""


_STATUS_ERRORS: dict[int, type[ServiceError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: ForbiddenError, 404: NotFoundError, 413: BadRequestError,
    415: BadRequestError, 422: BadRequestError, 429: OverloadedError, 503: UnavailableError,
}
_RETRY_STATUS = frozenset({429, 503})
# Only failures where the request cannot have reached the server are retried.
_RETRY_EXCEPTIONS = (httpx.ConnectError, httpx.ConnectTimeout)


def _hits(rows: Iterable[Mapping[str, Any]]) -> tuple[Hit, ...]:
    return tuple(Hit(id=str(h["id"]), score=float(h["score"]), text=str(h["text"])) for h in rows)


def _as_document(doc: Any) -> dict[str, str]:
    try:
        doc_id, title, text = document_fields(doc)
    except ValueError as exc:
        raise BadRequestError(f"cannot send {doc!r:.80} as a document: {exc}") from None
    return {"id": doc_id, "text": text, "title": title}


class SearchClient:
    """Client for ``dssm serve``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8080``.
        api_key: sent as ``X-API-Key`` (needed for writes, and for reads on servers that require it).
        timeout: seconds per attempt (connect, read, write, pool).
        retries: extra attempts after a connection failure or a 429/503.
        backoff: first delay in seconds; doubles each retry, with up to 50% jitter.
        max_backoff: cap on one delay (also on a server's ``Retry-After``).
        transport: an httpx transport (tests); default is a normal connection pool.

    Read-your-writes: after a write the client sends ``X-Min-Version: <the version it published>`` on
    every later request (:attr:`min_version`), so a server process that has not loaded that version
    yet loads it before answering (or answers 503, which is retried) instead of a stale 404.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 10.0, *, retries: int = 3,
                 backoff: float = 0.05, max_backoff: float = 2.0, transport: httpx.BaseTransport | None = None):
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(f"retries/backoff/max_backoff must be >= 0, got {retries}, {backoff}, {max_backoff}")
        headers = {"X-API-Key": api_key} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.attempts = 0  # total HTTP attempts made (retries included), for observability
        self.min_version: str | None = None  # newest version this client wrote; sent as X-Min-Version
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        delay = self.backoff * (2 ** attempt) * (1 + 0.5 * random.random())
        if response is not None:
            try:
                delay = max(delay, float(response.headers.get("Retry-After", 0)))
            except ValueError:
                pass
        return min(delay, self.max_backoff)

    def _request(self, method: str, path: str, *, json: Any = None) -> Any:
        response: httpx.Response | None = None
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                headers = {"X-Min-Version": self.min_version} if self.min_version else None
                response = self._http.request(method, path, json=json, headers=headers)
            except _RETRY_EXCEPTIONS as exc:
                if attempt == self.retries:
                    raise ConnectionFailedError(f"cannot connect to {self.base_url} after {attempt + 1} attempts: "
                                                f"{exc}") from exc
                time.sleep(self._delay(attempt, None))
                continue
            except httpx.TimeoutException as exc:
                raise ServiceError(f"{method} {path}: timed out: {exc}") from exc
            except httpx.TransportError as exc:
                raise ServiceError(f"{method} {path}: transport error: {exc}") from exc
            if response.status_code in _RETRY_STATUS and attempt < self.retries:
                time.sleep(self._delay(attempt, response))
                continue
            break
        assert response is not None
        if response.is_success:
            return response.json()
        return self._raise(method, path, response)

    def _wrote(self, version: str) -> None:
        # Version names start with their UTC publish time, so the newer one sorts last.
        self.min_version = max(self.min_version or version, version)

    @staticmethod
    def _raise(method: str, path: str, response: httpx.Response) -> Any:
        status = response.status_code
        try:
            body = response.json()
            reason = str(body.get("error") or body)
            details = body.get("details") or []
        except (ValueError, AttributeError):
            reason, details = response.text[:500], []
        cls = _STATUS_ERRORS.get(status) or (ServerError if status >= 500 else ClientError)
        raise cls(f"{method} {path} -> {status}: {reason}", status=status, reason=reason, details=details)

    # ---------------------------------------------------------------------------------------------
    # The Searcher's methods

    def search(self, text: str, k: int = 10, *, mode: str | None = None, rerank: int = 0) -> SearchResults:
        """Top-k hits for one query, best first (iterates as ``(id, score, text)``).

        Args:
            text: the query.
            k: hits to return.
            mode: ``dense``, ``bm25``, ``hybrid`` or ``None`` (the index's default).
            rerank: ``N > 0`` has the server re-order its first stage's top ``max(N, k)`` with the
                index's re-ranker (the server's limit applies); 0 does not re-rank.

        Raises:
            BadRequestError: a bad argument (``rerank`` not a non-negative int is refused before sending).
            ClientError: status 409 when the index cannot serve ``mode`` or has no re-ranker.
        """
        body = self._request("POST", "/v1/search", json={"query": text, "k": k, **_options(mode, rerank)})
        return SearchResults(version=body["version"], hits=_hits(body["hits"]))

    def search_batch(self, texts: Sequence[str], k: int = 10, *, mode: str | None = None,
                     rerank: int = 0) -> BatchSearchResults:
        """Top-k hits for each query, all from one index version (arguments and errors as in :meth:`search`)."""
        if isinstance(texts, str):
            raise BadRequestError("search_batch takes a list of query texts, got one string")
        body = self._request("POST", "/v1/search:batch",
                             json={"queries": list(texts), "k": k, **_options(mode, rerank)})
        version = body["version"]
        return BatchSearchResults(version=version,
                                  results=tuple(SearchResults(version=version, hits=_hits(r)) for r in body["results"]))

    def similarity(self, text1: str, text2: str) -> Similarity:
        """Cosine of the two texts and, when the index has a threshold, whether they are duplicates."""
        body = self._request("POST", "/v1/similarity", json={"text1": text1, "text2": text2})
        return Similarity(version=body["version"], cosine=float(body["cosine"]), is_duplicate=body["is_duplicate"],
                          threshold=body["threshold"])

    def tag(self, text: str, k: int = 10, *, threshold: float | None = None, predicted_only: bool = False,
            mode: str = "dense") -> Tags:
        """Labels of the served *tags index* for ``text`` (``POST /v1/tag``), best first.

        Args:
            text: the text to tag.
            k: at most this many labels.
            threshold: decision threshold (a cosine for ``dense``); default the index's stored one (dense only).
            predicted_only: only the labels at or above the threshold.
            mode: ``dense``, ``bm25`` or ``hybrid`` (:mod:`serving.tagger`).
        """
        body = self._request("POST", "/v1/tag", json={"text": text, "k": k, "predicted_only": predicted_only,
                                                      **({"threshold": threshold} if threshold is not None else {}),
                                                      **({"mode": mode} if mode != "dense" else {})})
        return Tags(version=body["version"], threshold=body["threshold"],
                    labels=tuple(Tag(label=x["label"], score=float(x["score"]), predicted=x["predicted"])
                                 for x in body["labels"]))

    def get_document(self, doc_id: str) -> Document:
        """The stored document ``doc_id``.

        Raises:
            NotFoundError: no such id.
        """
        body = self._request("GET", f"/v1/documents/{_quote(doc_id)}")
        doc = body["document"]
        return Document(id=doc["id"], text=doc["text"], title=doc["title"], version=body["version"])

    def upsert(self, documents: Iterable[Document | Mapping[str, str] | Sequence[str]]) -> WriteResult:
        """Add or replace documents; returns the new index version (already live when this returns)."""
        payload = [_as_document(d) for d in documents]
        body = self._request("PUT", "/v1/documents", json={"documents": payload})
        self._wrote(body["version"])
        return WriteResult(version=body["version"], upserted=body["upserted"], deleted=body["deleted"])

    def delete(self, doc_ids: str | Sequence[str]) -> WriteResult:
        """Delete one document (``DELETE /v1/documents/{id}``) or several in one request and one new
        index version (``POST /v1/documents:delete``); all must exist, or nothing is deleted.

        Raises:
            NotFoundError: an id is not in the index (nothing was deleted).
            BadRequestError: no ids, a blank id, or an id given twice.
        """
        if isinstance(doc_ids, str):
            body = self._request("DELETE", f"/v1/documents/{_quote(doc_ids)}")
        else:
            ids = list(doc_ids)
            if not ids:
                raise BadRequestError("delete needs at least one document id")
            for doc_id in ids:
                _quote(doc_id)  # the same local check as for one id
            body = self._request("POST", "/v1/documents:delete", json={"ids": ids})
        self._wrote(body["version"])
        return WriteResult(version=body["version"], upserted=0, deleted=body["deleted"])

    # ---------------------------------------------------------------------------------------------
    # Service

    def health(self) -> bool:
        """True if ``/healthz`` answers 200."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> dict[str, Any]:
        """``/readyz``'s body (``ready``, ``version``, ``documents``), whatever its status."""
        return self._http.get("/readyz").json()

    def metrics(self) -> str:
        """The Prometheus text from ``/metrics``."""
        response = self._http.get("/metrics")
        if not response.is_success:
            self._raise("GET", "/metrics", response)
        return response.text


def _options(mode: str | None, rerank: int) -> dict[str, Any]:
    """The optional search fields, sent only when set (the server's limits are checked there)."""
    if not isinstance(rerank, int) or isinstance(rerank, bool) or rerank < 0:
        raise BadRequestError(f"rerank must be a non-negative integer, got {rerank!r}")
    return {**({"mode": mode} if mode else {}), **({"rerank": rerank} if rerank else {})}


def _quote(doc_id: str) -> str:
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise BadRequestError(f"document id must be a non-blank string, got {doc_id!r}")
    return quote(doc_id, safe="")
