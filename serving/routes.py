"""The FastAPI routes of the HTTP service and their error mapping, registered on an app by :mod:`serving.app`.

This module owns what FastAPI itself answers: the exception handlers (every failure becomes
``{"error", "status", "details"}``), the health routes (``/healthz``, ``/readyz``, ``/metrics``), the
read routes (search, batch search, similarity, get document; also the hot-path answer the guard
uses for valid searches) and the write routes (upsert, delete). Each ``add_*`` function registers
one group on an app; :func:`serving.app.create_app` calls them in this order, so paths, status
codes, bodies and the OpenAPI document are those of one app.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dssm.errors import DSSMError, InputError
from serving.backend import (
    Backend,
    DocumentNotFoundError,
    ModeNotAvailableError,
    NotReadyError,
    WriteNotSupportedError,
    WritesBusyError,
    multiprocess_metrics,
)
from serving.guard import FastAnswer, error_body, exception_answer
from serving.schemas import (
    MAX_BODY_BYTES,
    MAX_ID_CHARS,
    BatchSearchRequest,
    BatchSearchResponse,
    DeleteRequest,
    DocumentOut,
    DocumentResponse,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    SearchRequest,
    SearchResponse,
    SimilarityRequest,
    SimilarityResponse,
    TagOut,
    TagRequest,
    TagResponse,
    UpsertRequest,
    WriteResponse,
)

__all__ = ["SECURITY_SCHEME", "Run", "metrics_text", "add_error_handlers", "add_health_routes", "add_read_routes",
           "add_write_routes"]

SECURITY_SCHEME = "ApiKey"
#: Runs a blocking function in the app's bounded worker-thread pool and awaits it.
Run = Callable[..., Awaitable[Any]]


def _error(status: int, reason: str, details: list[str] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason, "status": status, "details": details or []}, status_code=status,
                        headers=headers)


def _hit_dicts(hits: Any) -> list[dict[str, Any]]:
    return [{"id": h[0], "score": float(h[1]), "text": h[2]} for h in hits]


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _hits_json(version: str, hits: Any) -> bytes:
    """The ``SearchResponse`` body, encoded directly (same JSON as the pydantic model's)."""
    return _dumps({"version": version, "hits": _hit_dicts(hits)})


def _results_json(version: str, results: Any) -> bytes:
    """The ``BatchSearchResponse`` body."""
    return _dumps({"version": version, "results": [_hit_dicts(h) for h in results]})


def _validation_details(exc: RequestValidationError) -> tuple[int, str, list[str]]:
    details = []
    status = 422
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            status = 400
            details.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        msg = err.get("msg", "invalid")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        value = err.get("input")
        shown = repr(value) if isinstance(value, str | int | float | bool) or value is None else type(value).__name__
        if isinstance(value, str) and len(shown) > 80:
            shown = shown[:77] + "...'"
        details.append(f"{loc}: {msg} (got {shown})")
    reason = details[0] if details else "invalid request"
    if len(details) > 1:
        reason += f" (and {len(details) - 1} more)"
    return status, reason, details


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "malformed request (e.g. invalid JSON) or input the index refuses"),
        (401, "missing or wrong API key"),
        (413, f"body over {MAX_BODY_BYTES} bytes"),
        (415, "content type is not application/json"),
        (409, "the index version cannot serve this request: its mode (bm25/hybrid need BM25 state in the index) "
              "or rerank > 0 (needs a re-ranker in the index: `dssm attach-reranker`)"),
        (422, "a field is missing, of the wrong type or out of range"),
        (429, "too many requests in flight (or, for writes, the write queue is full); retry after the Retry-After "
              "seconds"),
        (503, "no index version loaded yet"),
    )
}
_READ_ERRORS = {c: _ERRORS[c] for c in (400, 401, 413, 415, 422, 429, 503)}
_SEARCH_ERRORS = _READ_ERRORS | {409: _ERRORS[409]}
_GET_ERRORS = {c: _ERRORS[c] for c in (400, 401, 429, 503)} | {404: {"model": ErrorResponse,
                                                                "description": "no document with that id"}}
_WRITE_ERRORS = dict(_READ_ERRORS) | {
    403: {"model": ErrorResponse, "description": "writes disabled (server has no API key)"},
    404: {"model": ErrorResponse, "description": "no document with that id"},
    501: {"model": ErrorResponse, "description": "the index has no incremental update path"},
}


def metrics_text(backend: Backend) -> bytes:
    """The Prometheus exposition of ``backend``'s metrics, or of every worker's under ``--workers N``."""
    if multiprocess_metrics():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(backend.metrics.registry)


def add_error_handlers(app: FastAPI, *, index_dir: Path | None = None) -> None:
    """Every failure is a 4xx with a reason, except genuine server faults (one JSON shape for all).

    Paths under ``index_dir`` in a reason are shown relative to it (:func:`serving.guard.exception_answer`).
    """

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, reason, details = _validation_details(exc)
        return _error(status, reason, details)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):
            # FastAPI says only "There was an error parsing the body"; the cause names the byte.
            reason = f"request body is not valid UTF-8: byte 0x{cause.object[cause.start]:02x} at offset {cause.start}"
            return _error(400, reason, [reason])
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    async def _on_backend_error(_: Request, exc: Exception) -> JSONResponse:
        status, reason, headers = exception_answer(exc, index_dir=index_dir)
        return _error(status, reason, headers=headers)

    # RerankerNotAvailableError is a ModeNotAvailableError: the same handler, the same 409.
    for error_class in (NotReadyError, DocumentNotFoundError, ModeNotAvailableError, WriteNotSupportedError,
                        WritesBusyError, InputError, DSSMError, Exception):
        app.add_exception_handler(error_class, _on_backend_error)


def add_health_routes(app: FastAPI, backend: Backend) -> None:
    """``GET /healthz``, ``GET /readyz`` (503 until an index is loaded) and ``GET /metrics``."""

    @app.get("/healthz", response_model=HealthResponse, tags=["health"])
    async def healthz() -> HealthResponse:
        """The process is up and its event loop answers."""
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=ReadyResponse, tags=["health"],
             responses={503: {"model": ReadyResponse, "description": "no index version loaded yet"}})
    async def readyz() -> Any:
        """Ready once an index version is loaded."""
        snap = backend.snapshot
        if snap is None:
            return JSONResponse(ReadyResponse(ready=False, version=None, documents=None).model_dump(), status_code=503)
        return ReadyResponse(ready=True, version=snap.version, documents=snap.documents)

    @app.get("/metrics", tags=["health"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    async def metrics() -> Response:
        """Request counts, latency histograms, in-flight operations, the index version and its size."""
        return Response(metrics_text(backend), media_type=CONTENT_TYPE_LATEST)


def _search_answers(backend: Backend, run: Run) -> tuple[Callable[[SearchRequest], Awaitable[bytes]],
                                                          Callable[[BatchSearchRequest], Awaitable[bytes]], FastAnswer]:
    """The encoded answers to a search and to a batch search, and the guard's hot path built on them."""

    def _search_answer(body: SearchRequest) -> bytes:
        version, hits = backend.search(body.query, body.k, mode=body.mode, rerank=body.rerank)
        return _hits_json(version, hits)

    def _batch_answer(body: BatchSearchRequest) -> bytes:
        # Encoded in the worker thread too: a 25k-hit batch answer must not stall the event loop.
        version, results = backend.search_batch(body.queries, body.k, mode=body.mode, rerank=body.rerank)
        return _results_json(version, results)

    async def answer_search(body: SearchRequest) -> bytes:
        if body.rerank or (body.mode or backend.default_mode()) != "dense":
            # Re-ranked and non-dense queries run whole in the worker pool (the coalesced path is dense only).
            return await run(_search_answer, body)
        # Dense single queries are coalesced with concurrent ones into one model call in the model thread.
        version, hits = await backend.search_async(body.query, body.k)
        return _hits_json(version, hits)

    async def answer_batch(body: BatchSearchRequest) -> bytes:
        # Batches are already batched: they run in the worker pool, so several use both cores and
        # none holds up the single queries queued for the model thread.
        return await run(_batch_answer, body)

    async def fast(path: str, raw: bytes) -> tuple[int, bytes, dict[str, str] | None] | None:
        try:
            if path == "/v1/search":
                search_body = SearchRequest.model_validate_json(raw)
            else:
                batch_body = BatchSearchRequest.model_validate_json(raw)
        except ValidationError:
            return None  # the FastAPI route answers it: the same 4xx as without this path
        try:
            payload = await (answer_search(search_body) if path == "/v1/search" else answer_batch(batch_body))
        except Exception as exc:  # noqa: BLE001 - mapped to its 4xx/5xx like FastAPI's handlers do
            status, reason, headers = exception_answer(exc, index_dir=backend.index_dir)
            return status, error_body(status, reason), headers
        return 200, payload, None

    return answer_search, answer_batch, fast


def add_read_routes(app: FastAPI, backend: Backend, run: Run) -> FastAnswer:
    """Search, batch search, similarity and get document; returns the guard's hot path for valid searches.

    Single dense queries without ``rerank`` go to the backend's model thread; everything else runs through ``run``.
    """
    answer_search, answer_batch, fast = _search_answers(backend, run)

    @app.post("/v1/search", response_model=SearchResponse, responses=_SEARCH_ERRORS, tags=["search"])
    async def search(body: SearchRequest) -> Any:
        """Top-k documents for one query, best first."""
        return Response(await answer_search(body), media_type="application/json")

    @app.post("/v1/search:batch", response_model=BatchSearchResponse, responses=_SEARCH_ERRORS, tags=["search"])
    async def search_batch(body: BatchSearchRequest) -> Any:
        """Top-k documents for each query (one model call), all from the same index version."""
        return Response(await answer_batch(body), media_type="application/json")

    @app.post("/v1/tag", response_model=TagResponse, responses=_SEARCH_ERRORS, tags=["search"])
    async def tag(body: TagRequest) -> TagResponse:
        """Labels of a tags index for a text, best first; ``predicted`` against the threshold (``dssm tag``)."""
        version, threshold, hits = await run(backend.tag, body.text, k=body.k, threshold=body.threshold,
                                             predicted_only=body.predicted_only, mode=body.mode)
        return TagResponse(version=version, threshold=threshold, labels=[
            TagOut(label=h.label, score=h.score, predicted=h.predicted) for h in hits])

    @app.post("/v1/similarity", response_model=SimilarityResponse, responses=_READ_ERRORS, tags=["search"])
    async def similarity(body: SimilarityRequest) -> SimilarityResponse:
        """Cosine similarity of two texts; ``is_duplicate`` when the index has a calibrated threshold."""
        result = await run(backend.similarity, body.text1, body.text2)
        return SimilarityResponse(version=result.version, cosine=result.cosine, is_duplicate=result.is_duplicate,
                                  threshold=result.threshold)

    @app.get("/v1/documents/{doc_id:path}", response_model=DocumentResponse, responses=_GET_ERRORS,
             tags=["documents"])
    async def get_document(doc_id: str) -> DocumentResponse:
        """The stored document with this id."""
        version, doc = await run(backend.get_document, doc_id)
        return DocumentResponse(version=version, document=DocumentOut(id=doc[0], title=doc[1], text=doc[2]))

    @app.head("/v1/documents/{doc_id:path}", responses=_GET_ERRORS, tags=["documents"])
    async def head_document(doc_id: str) -> Response:
        """Whether the document exists: GET's status and headers, no body."""
        body = (await get_document(doc_id)).model_dump_json().encode()
        return Response(status_code=200, media_type="application/json", headers={"content-length": str(len(body))})

    return fast


def add_write_routes(app: FastAPI, backend: Backend, run: Run) -> None:
    """Upsert and delete (the guard has already checked the API key); each publishes a new index version.

    ``run`` is the writes' own queue (``serving.app``): bounded, 429 when full; queued writes commit together.
    """

    @app.put("/v1/documents", response_model=WriteResponse, responses=_WRITE_ERRORS, tags=["documents"],
             openapi_extra={"security": [{SECURITY_SCHEME: []}]})
    async def upsert(body: UpsertRequest) -> WriteResponse:
        """Add or replace documents (ids unique within the request); publishes a new index version."""
        docs = [(d.id, d.title, d.text) for d in body.documents]
        version = await run(backend.upsert, docs)
        return WriteResponse(version=version, upserted=len(docs))

    @app.delete("/v1/documents/{doc_id:path}", response_model=WriteResponse, responses=_WRITE_ERRORS,
                tags=["documents"], openapi_extra={"security": [{SECURITY_SCHEME: []}]})
    async def delete(doc_id: str) -> WriteResponse:
        """Delete one document; publishes a new index version."""
        if not doc_id.strip() or len(doc_id) > MAX_ID_CHARS:
            return _error(422, f"document id must be 1..{MAX_ID_CHARS} characters, not only whitespace "
                               f"(got {doc_id[:80]!r})")
        version = await run(backend.delete, [doc_id])
        return WriteResponse(version=version, deleted=1)

    @app.post("/v1/documents:delete", response_model=WriteResponse, responses=_WRITE_ERRORS, tags=["documents"],
              openapi_extra={"security": [{SECURITY_SCHEME: []}]})
    async def delete_many(body: DeleteRequest) -> WriteResponse:
        """Delete several documents in one new index version; all ids must exist, or nothing is deleted (404)."""
        version = await run(backend.delete, list(body.ids))
        return WriteResponse(version=version, deleted=len(body.ids))
