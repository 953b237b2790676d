"""The HTTP service: FastAPI over :class:`~serving.backend.Backend`. ``main(argv)`` is ``dssm serve``.

Endpoints (all JSON; the OpenAPI document is served at ``/openapi.json`` and checked in as
``docs/openapi.json``):

- ``POST /v1/search`` ``{"query", "k", "mode"}`` → ``{"version", "hits": [{"id", "score", "text"}]}``
- ``POST /v1/search:batch`` ``{"queries", "k", "mode"}`` → ``{"version", "results": [[hit, ...], ...]}``
- ``POST /v1/similarity`` ``{"text1", "text2"}`` → ``{"version", "cosine", "is_duplicate", "threshold"}``
- ``GET /v1/documents/{id}`` → ``{"version", "document": {"id", "title", "text"}}``
- ``PUT /v1/documents`` ``{"documents": [{"id", "text", "title"?}]}``, ``DELETE /v1/documents/{id}`` and
  ``POST /v1/documents:delete`` ``{"ids": [...]}`` (API key required) → ``{"version", "upserted", "deleted"}``
- ``GET /healthz``, ``GET /readyz`` (503 until an index is loaded), ``GET /metrics`` (Prometheus)

Every error is ``{"error": reason, "status": code, "details": [...]}``. Before a request reaches
FastAPI, one ASGI layer (:class:`_Guard`) checks the API key (401, nothing runs), the content type
(415), the body size (413) and the in-flight limit (429 at once, with ``Retry-After``), and records
the request count and latency per route. Single dense queries are coalesced in the backend's model
thread; other index work (batches, similarity, other modes, document reads, writes) runs in a bounded
worker-thread pool, so the event loop keeps answering health checks and refusing overload while
searches run.

The hot path: a valid ``POST /v1/search`` or ``/v1/search:batch`` is answered by the guard itself
(pydantic validates the raw body against the same request model, the answer is encoded with
``json.dumps``), without FastAPI's routing, dependency and response-model machinery, which cost more
than the search itself on small requests. A body that fails validation goes on to the FastAPI route,
which answers it with the usual 4xx, so both paths accept and refuse exactly the same requests.
"""

from __future__ import annotations

import argparse
import functools
import hmac
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from dssm import __version__
from dssm.errors import ConfigError, DSSMError, InputError
from dssm.index import current_version_dir
from serving.backend import (
    Backend,
    DocumentNotFoundError,
    ModeNotAvailableError,
    NotReadyError,
    WriteNotSupportedError,
    multiprocess_metrics,
)
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
    UpsertRequest,
    WriteResponse,
)

__all__ = ["API_KEY_ENV", "WORKER_CONFIG_ENV", "create_app", "metrics_text", "openapi_document", "write_openapi",
           "worker_app", "main"]

log = logging.getLogger(__name__)

API_KEY_ENV = "DSSM_API_KEY"
# `dssm serve --workers N` hands each worker process its settings as JSON in this variable.
WORKER_CONFIG_ENV = "DSSM_SERVE_WORKER_CONFIG"
_API_PREFIX = "/v1/"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SECURITY_SCHEME = "ApiKey"
_CONVERTOR = re.compile(r":[a-z]+}")  # "{doc_id:path}" -> "{doc_id}" in metric labels

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


def _error_body(status: int, reason: str, details: list[str] | None = None) -> bytes:
    return json.dumps({"error": reason, "status": status, "details": details or []}).encode()


async def _send_error(send: Send, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
    body = _error_body(status, reason)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, reason: str, details: list[str] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason, "status": status, "details": details or []}, status_code=status,
                        headers=headers)


def _exception_answer(exc: Exception) -> tuple[int, str, dict[str, str] | None]:
    """(status, reason, headers) for an exception raised by the backend; one mapping for both paths."""
    if isinstance(exc, NotReadyError):
        return 503, str(exc), {"Retry-After": "1"}
    if isinstance(exc, DocumentNotFoundError):
        return 404, str(exc), None
    if isinstance(exc, ModeNotAvailableError):
        return 409, str(exc), None
    if isinstance(exc, WriteNotSupportedError):
        return 501, str(exc), None
    if isinstance(exc, InputError):
        return 400, str(exc), None
    if isinstance(exc, DSSMError):
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return 500, f"{type(exc).__name__}: {exc}", None
    # A bug, not bad input: same JSON shape for clients, the traceback in the server log.
    log.error("request failed", exc_info=exc)
    return 500, f"internal error ({type(exc).__name__}); see the server log", None


async def _send_json(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if headers:
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


FastAnswer = Callable[[str, bytes], Awaitable[tuple[int, bytes, dict[str, str] | None] | None]]
_FAST_PATHS = frozenset({"/v1/search", "/v1/search:batch"})


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


class _Guard:
    """ASGI layer in front of FastAPI: metrics for every request; auth, content type, size, admission for ``/v1``.

    Rejections happen here, before routing and body parsing, so a refused request costs almost
    nothing and a 401 write cannot have touched the index.
    """

    def __init__(self, app: Any, *, backend: Backend, api_key: str | None, require_key_for_reads: bool,
                 routes: Callable[[], list[Any]], fast: FastAnswer | None = None) -> None:
        self.app = app
        self.backend = backend
        self.api_key = api_key.encode() if api_key else None
        self.require_key_for_reads = require_key_for_reads
        self._routes = routes
        self._fast = fast
        self._static: dict[str, frozenset[str]] | None = None

    def _route_label(self, scope: dict[str, Any]) -> tuple[str, bool, set[str]]:
        """(route path for metric labels, whether a route serves this method, methods the path allows)."""
        if self._static is None:
            # Paths without parameters, looked up by dict instead of matching every route's regex.
            static: dict[str, frozenset[str]] = {}
            for route in self._routes():
                methods = getattr(route, "methods", None)
                if methods and "{" not in route.path:
                    static[route.path] = static.get(route.path, frozenset()) | frozenset(methods)
            self._static = static
        methods = self._static.get(scope["path"])
        if methods is not None and scope["method"] in methods:
            return scope["path"], True, set()
        label, allowed = None, set()
        for route in self._routes():
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return _CONVERTOR.sub("}", route.path), True, set()
            if match == Match.PARTIAL:
                label = label or _CONVERTOR.sub("}", route.path)
                allowed |= set(getattr(route, "methods", None) or ())
        return label or "unmatched", False, allowed

    def _key_ok(self, headers: dict[bytes, bytes]) -> bool:
        if self.api_key is None:
            return False
        given = headers.get(b"x-api-key")
        if given is None:
            auth = headers.get(b"authorization", b"")
            if auth[:7].lower() == b"bearer ":
                given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given, self.api_key)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method = scope["method"]
        route, served, allowed = self._route_label(scope)
        status_box = [500]

        async def send_recorded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            if served:
                await self._handle(scope, receive, send_recorded, method)
            elif allowed:
                # Known path, other method. Answered here because Starlette's own 405 lists only the
                # methods of the first route with this path (GET and DELETE documents are two routes).
                await _send_error(send_recorded, 405, f"method {method} not allowed; allowed: "
                                  f"{', '.join(sorted(allowed))}", {"Allow": ", ".join(sorted(allowed))})
            else:  # unknown path: FastAPI's 404, without touching the index
                await self.app(scope, receive, send_recorded)
        finally:
            metrics = self.backend.metrics
            metrics.requests.labels(method=method, route=route, status=str(status_box[0])).inc()
            metrics.latency.labels(method=method, route=route).observe(time.perf_counter() - start)

    async def _handle(self, scope: dict[str, Any], receive: Receive, send: Send, method: str) -> None:
        if not scope["path"].startswith(_API_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        is_write = method not in _READ_METHODS and not scope["path"].startswith(("/v1/search", "/v1/similarity"))
        if is_write or self.require_key_for_reads:
            if not self._key_ok(headers):
                if is_write and self.api_key is None:
                    await _send_error(send, 403, "writes are disabled: the server was started without an API key "
                                                 f"(--api-key or ${API_KEY_ENV})")
                else:
                    await _send_error(send, 401, "missing or wrong API key (send it as 'X-API-Key: KEY' or "
                                                 "'Authorization: Bearer KEY')", {"WWW-Authenticate": "Bearer"})
                return
        if method in _BODY_METHODS:
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if content_type != b"application/json" and not content_type.endswith(b"+json"):
                shown = content_type.decode("latin-1") or "none"
                await _send_error(send, 415, f"content type must be application/json, got {shown}")
                return
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    declared = int(length)
                except ValueError:
                    await _send_error(send, 400, f"bad Content-Length header {length.decode('latin-1')!r}")
                    return
                if declared > MAX_BODY_BYTES:
                    await _send_error(send, 413, f"request body of {declared} bytes exceeds {MAX_BODY_BYTES} bytes")
                    return
        if not self.backend.try_acquire():
            await _send_error(send, 429, f"server busy: {self.backend.max_in_flight} requests already in flight",
                              {"Retry-After": "1"})
            return
        try:
            if method in _BODY_METHODS:
                body = await self._read_body(receive)
                if body is None:
                    await _send_error(send, 413, f"request body exceeds {MAX_BODY_BYTES} bytes")
                    return
                if self._fast is not None and method == "POST" and scope["path"] in _FAST_PATHS:
                    answer = await self._fast(scope["path"], body)
                    if answer is not None:
                        await _send_json(send, *answer)
                        return
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            self.backend.release()

    @staticmethod
    async def _read_body(receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


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
        (409, "the index version cannot serve this request's mode (bm25/hybrid need BM25 state in the index)"),
        (422, "a field is missing, of the wrong type or out of range"),
        (429, "too many requests in flight; retry after the Retry-After seconds"),
        (503, "no index version loaded yet"),
    )
}
_READ_ERRORS = {c: _ERRORS[c] for c in (400, 401, 413, 415, 422, 429, 503)}
_SEARCH_ERRORS = _READ_ERRORS | {409: _ERRORS[409]}
_GET_ERRORS = {c: _ERRORS[c] for c in (401, 429, 503)} | {404: {"model": ErrorResponse,
                                                                "description": "no document with that id"}}
_WRITE_ERRORS = dict(_READ_ERRORS) | {
    403: {"model": ErrorResponse, "description": "writes disabled (server has no API key)"},
    404: {"model": ErrorResponse, "description": "no document with that id"},
    501: {"model": ErrorResponse, "description": "the index has no incremental update path"},
}


def create_app(backend: Backend, *, api_key: str | None = None, require_key_for_reads: bool = False,
               worker_threads: int = 8, manage_backend: bool = True, load_before_serving: bool = False) -> FastAPI:
    """Build the FastAPI application around ``backend``.

    Args:
        backend: the serving backend (the app starts and stops its watcher when ``manage_backend``).
        api_key: key that writes (and, with ``require_key_for_reads``, reads) must present; ``None``
            disables writes.
        require_key_for_reads: also require the key for ``/v1`` reads (health and metrics stay open).
        worker_threads: threads that run index work (searches block on TF, ScaNN and SQLite).
        manage_backend: start the backend's watcher at startup and stop it at shutdown.
        load_before_serving: finish startup (so uvicorn accepts connections) only once the first
            version is loaded or failed to load. ``dssm serve --workers N`` sets it: the workers share
            one listening socket, and a worker that accepted connections while loading would answer
            them 503 although another worker is ready.

    Returns:
        The ASGI app (FastAPI wrapped by the guard layer is installed as middleware).
    """
    if worker_threads < 1:
        raise ConfigError(f"worker_threads must be >= 1, got {worker_threads}")
    if require_key_for_reads and not api_key:
        raise ConfigError("require_key_for_reads needs an API key (--api-key or $DSSM_API_KEY)")
    limiter_box: list[anyio.CapacityLimiter] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        limiter_box.append(anyio.CapacityLimiter(worker_threads))
        if manage_backend:
            backend.start()
            if load_before_serving:
                while backend.snapshot is None and backend.last_error is None:
                    await anyio.sleep(0.05)
        try:
            yield
        finally:
            backend.close_mailboxes()
            if manage_backend:
                await anyio.to_thread.run_sync(backend.stop)
            if multiprocess_metrics():
                # This worker's live gauges (in flight, its version) leave the shared sums with it.
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())


    app = FastAPI(title="dssm-search", version=__version__, lifespan=lifespan,
                  description="Semantic search over a DSSM index: search, batch search, similarity, documents, "
                              "incremental writes. Every /v1 response names the index version that served it.")

    async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not limiter_box:  # app used without lifespan (e.g. a bare TestClient)
            limiter_box.append(anyio.CapacityLimiter(worker_threads))
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=limiter_box[0])

    # ---- error mapping: every failure is a 4xx with a reason, except genuine server faults

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, reason, details = _validation_details(exc)
        return _error(status, reason, details)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    async def _on_backend_error(_: Request, exc: Exception) -> JSONResponse:
        status, reason, headers = _exception_answer(exc)
        return _error(status, reason, headers=headers)

    for error_class in (NotReadyError, DocumentNotFoundError, ModeNotAvailableError, WriteNotSupportedError,
                        InputError, DSSMError, Exception):
        app.add_exception_handler(error_class, _on_backend_error)

    # ---- health

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

    # ---- reads

    def _search_answer(body: SearchRequest) -> bytes:
        version, hits = backend.search(body.query, body.k, mode=body.mode)
        return _hits_json(version, hits)

    def _batch_answer(body: BatchSearchRequest) -> bytes:
        # Encoded in the worker thread too: a 25k-hit batch answer must not stall the event loop.
        version, results = backend.search_batch(body.queries, body.k, mode=body.mode)
        return _results_json(version, results)

    async def answer_search(body: SearchRequest) -> bytes:
        if (body.mode or backend.default_mode()) != "dense":
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
            status, reason, headers = _exception_answer(exc)
            return status, _error_body(status, reason), headers
        return 200, payload, None

    @app.post("/v1/search", response_model=SearchResponse, responses=_SEARCH_ERRORS, tags=["search"])
    async def search(body: SearchRequest) -> Any:
        """Top-k documents for one query, best first."""
        return Response(await answer_search(body), media_type="application/json")

    @app.post("/v1/search:batch", response_model=BatchSearchResponse, responses=_SEARCH_ERRORS, tags=["search"])
    async def search_batch(body: BatchSearchRequest) -> Any:
        """Top-k documents for each query (one model call), all from the same index version."""
        return Response(await answer_batch(body), media_type="application/json")

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

    # ---- writes (the guard has already checked the API key)

    @app.put("/v1/documents", response_model=WriteResponse, responses=_WRITE_ERRORS, tags=["documents"],
             openapi_extra={"security": [{_SECURITY_SCHEME: []}]})
    async def upsert(body: UpsertRequest) -> WriteResponse:
        """Add or replace documents (ids unique within the request); publishes a new index version."""
        docs = [(d.id, d.title, d.text) for d in body.documents]
        version = await run(backend.upsert, docs)
        return WriteResponse(version=version, upserted=len(docs))

    @app.delete("/v1/documents/{doc_id:path}", response_model=WriteResponse, responses=_WRITE_ERRORS,
                tags=["documents"], openapi_extra={"security": [{_SECURITY_SCHEME: []}]})
    async def delete(doc_id: str) -> WriteResponse:
        """Delete one document; publishes a new index version."""
        if not doc_id.strip() or len(doc_id) > MAX_ID_CHARS:
            return _error(422, f"document id must be 1..{MAX_ID_CHARS} characters, not only whitespace "
                               f"(got {doc_id[:80]!r})")
        version = await run(backend.delete, [doc_id])
        return WriteResponse(version=version, deleted=1)

    @app.post("/v1/documents:delete", response_model=WriteResponse, responses=_WRITE_ERRORS, tags=["documents"],
              openapi_extra={"security": [{_SECURITY_SCHEME: []}]})
    async def delete_many(body: DeleteRequest) -> WriteResponse:
        """Delete several documents in one new index version; all ids must exist, or nothing is deleted (404)."""
        version = await run(backend.delete, list(body.ids))
        return WriteResponse(version=version, deleted=len(body.ids))

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                _SECURITY_SCHEME: {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            if require_key_for_reads:
                for path, ops in schema["paths"].items():
                    if path.startswith(_API_PREFIX):
                        for op in ops.values():
                            op.setdefault("security", [{_SECURITY_SCHEME: []}])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
    app.add_middleware(_Guard, backend=backend, api_key=api_key, require_key_for_reads=require_key_for_reads,
                       routes=lambda: app.router.routes, fast=fast)
    return app


def metrics_text(backend: Backend) -> bytes:
    """The Prometheus exposition of ``backend``'s metrics, or of every worker's under ``--workers N``."""
    if multiprocess_metrics():

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(backend.metrics.registry)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document a default server (reads open) serves; no index is needed."""
    return create_app(Backend("unused", watch_interval=0), manage_backend=False).openapi()


def write_openapi(path: str | Path) -> None:
    """Write :func:`openapi_document` as indented JSON (this is ``docs/openapi.json``)."""
    Path(path).write_text(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")


def _set_tf_threads(threads: int) -> None:
    # deferred: TensorFlow, imported only when this runs
    import tensorflow as tf  # noqa: PLC0415  (only the serving process pays for the import here)

    try:
        # Only possible before TensorFlow runs its first op; the index loads after this.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as exc:  # `dssm serve` called inside a process that already ran TensorFlow
        log.warning("--tf-threads %d not applied: %s", threads, exc)


def _serving_app(settings: dict[str, Any]) -> FastAPI:
    """One serving process's app from ``settings`` (the parsed ``dssm serve`` flags), process settings applied."""
    backend = Backend(settings["index"], max_in_flight=settings["max_in_flight"],
                      watch_interval=settings["watch_interval"], batchers=settings["model_threads"],
                      batch_window=settings["batch_window_ms"] / 1000.0)
    app = create_app(backend, api_key=settings["api_key"], require_key_for_reads=settings["require_key_for_reads"],
                     worker_threads=settings["threads"], load_before_serving=settings.get("load_before_serving", False))
    if settings["tf_threads"]:
        _set_tf_threads(settings["tf_threads"])
    if settings["switch_interval_ms"] > 0:
        sys.setswitchinterval(settings["switch_interval_ms"] / 1000.0)
    return app


def worker_app() -> FastAPI:
    """The app of one ``dssm serve --workers N`` process (uvicorn's factory, in a spawned interpreter).

    The parent puts the parsed flags in ``$DSSM_SERVE_WORKER_CONFIG``. Each worker loads the index
    itself and watches ``CURRENT`` on its own, so a write answered by one worker (which swaps the new
    version in before it answers) reaches the others within their ``--watch-interval``.

    Raises:
        ConfigError: the variable is missing (the factory was started by something other than ``dssm serve``).
    """
    raw = os.environ.get(WORKER_CONFIG_ENV)
    if not raw:
        raise ConfigError(f"${WORKER_CONFIG_ENV} is not set: worker_app is started by `dssm serve --workers N`")
    settings = dict(json.loads(raw), load_before_serving=True)
    logging.basicConfig(level=settings["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    return _serving_app(settings)


def _run_workers(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Serve with ``args.workers`` processes on one listening socket (uvicorn's supervisor).

    Each process has its own Searcher, model thread and GIL, so the service uses every core instead
    of one. Metrics go through prometheus_client's multiprocess directory (a fresh temporary one
    unless ``$PROMETHEUS_MULTIPROC_DIR`` is set) so ``/metrics`` from any worker reports them all.
    """

    # deferred: the optional serve extra, imported only when this runs
    import uvicorn

    own_dir = None
    if not multiprocess_metrics():
        own_dir = tempfile.mkdtemp(prefix="dssm-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    os.environ[WORKER_CONFIG_ENV] = json.dumps(settings)
    try:
        uvicorn.run("serving.app:worker_app", factory=True, workers=args.workers, host=args.host, port=args.port,
                    log_level=args.log_level, access_log=False, loop=args.loop,
                    timeout_worker_healthcheck=args.worker_timeout)
    finally:
        os.environ.pop(WORKER_CONFIG_ENV, None)
        if own_dir is not None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(own_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``dssm serve --index INDEX_DIR [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--workers N] ...``."""
    parser = argparse.ArgumentParser(prog="dssm serve", description="HTTP search service over an index directory; "
                                     "follows its CURRENT version and swaps new versions in without downtime.")
    parser.add_argument("--index", type=Path, help="index directory written by `dssm index`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"key for writes (and reads with --require-key-for-reads); default ${API_KEY_ENV}; "
                             "without one, writes are refused")
    parser.add_argument("--require-key-for-reads", action="store_true", help="also require the key for /v1 reads")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes sharing the port, each with its own copy of the index and model "
                             "(default: 1). One process is bound to one core by Python's GIL; N processes use N "
                             "cores for N times the memory. Limits (--max-in-flight, --threads) are per process; "
                             "a write is answered after its own process swapped the new version in, the others "
                             "follow within --watch-interval")
    parser.add_argument("--worker-timeout", type=int, default=60,
                        help="with --workers: seconds a worker may leave the supervisor's health check unanswered "
                             "before it is killed and replaced (default: 60; uvicorn's 5 s kills workers that are "
                             "loading a new index version on a busy machine)")
    parser.add_argument("--max-in-flight", type=int, default=64,
                        help="requests admitted at once (per worker process); more get 429 immediately (default: 64)")
    parser.add_argument("--threads", type=int, default=8,
                        help="worker threads for batch searches, similarity, document reads and writes "
                             "(default: 8); single queries are coalesced in the model thread")
    parser.add_argument("--model-threads", type=int, default=1,
                        help="threads that answer single queries, each taking every query waiting at that "
                             "moment as one batch (default: 1)")
    parser.add_argument("--tf-threads", type=int, default=1,
                        help="TensorFlow intra- and inter-op threads (default: 1: a single query's ops are too small "
                             "to gain from a pool, and the event loop needs the other core)")
    parser.add_argument("--switch-interval-ms", type=float, default=5.0,
                        help="Python's GIL switch interval (sys.setswitchinterval) in ms (default: 5.0)")
    parser.add_argument("--batch-window-ms", type=float, default=0.0,
                        help="how long the model thread waits for more concurrent queries to join a batch "
                             "(default: 0, take only those already waiting)")
    parser.add_argument("--watch-interval", type=float, default=1.0,
                        help="seconds between checks of CURRENT for a new version (default: 1.0)")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="event loop implementation (default: auto = uvloop when installed)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--write-openapi", type=Path, metavar="PATH",
                        help="write the OpenAPI document to PATH and exit (no index needed)")
    args = parser.parse_args(argv)
    if args.write_openapi:
        write_openapi(args.write_openapi)
        print(f"wrote {args.write_openapi}")
        return 0
    if args.index is None:
        raise ConfigError("--index is required (the index directory written by `dssm index`)")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.tf_threads < 0:
        raise ConfigError(f"--tf-threads must be >= 0 (0 = TensorFlow's default), got {args.tf_threads}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.worker_timeout < 1:
        raise ConfigError(f"--worker-timeout must be >= 1 second, got {args.worker_timeout}")
    current_version_dir(args.index)  # fail fast on a wrong path: IndexNotFoundError names it
    if args.require_key_for_reads and not args.api_key:
        raise ConfigError("require_key_for_reads needs an API key (--api-key or $DSSM_API_KEY)")
    # deferred: the optional serve extra, imported only when this runs
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = {"index": str(args.index.resolve()), "api_key": args.api_key,
                "require_key_for_reads": args.require_key_for_reads, "max_in_flight": args.max_in_flight,
                "threads": args.threads, "model_threads": args.model_threads, "tf_threads": args.tf_threads,
                "switch_interval_ms": args.switch_interval_ms, "batch_window_ms": args.batch_window_ms,
                "watch_interval": args.watch_interval, "log_level": args.log_level}
    try:
        if args.workers > 1:
            _run_workers(args, settings)
        else:
            uvicorn.run(_serving_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                        access_log=False, loop=args.loop)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    return 0
