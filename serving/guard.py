"""The ASGI layer in front of FastAPI (:class:`Guard`): admission, auth, content checks, metrics, the hot path.

This module owns everything that happens to a request before FastAPI sees it: the API key check
(401/403, nothing runs), the content type (415), the body size (413), the in-flight limit (429 at
once, with ``Retry-After``), the per-route request count and latency, and the hot path that answers
a valid ``POST /v1/search`` or ``/v1/search:batch`` itself (through a :data:`FastAnswer` given by
:mod:`serving.routes`). It also owns the one mapping from backend exceptions to HTTP answers
(:func:`exception_answer`) that both the hot path and FastAPI's exception handlers use.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from starlette.routing import Match

from dssm.errors import DSSMError, InputError
from dssm.index.layout import VERSION_RE
from serving.backend import (
    Backend,
    DocumentNotFoundError,
    ModeNotAvailableError,
    NotReadyError,
    WriteNotSupportedError,
    WritesBusyError,
)
from serving.config import API_KEY_ENV
from serving.schemas import MAX_BODY_BYTES

__all__ = ["API_PREFIX", "FAST_PATHS", "FastAnswer", "Guard", "error_body", "exception_answer"]

log = logging.getLogger(__name__)

API_PREFIX = "/v1/"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CONVERTOR = re.compile(r":[a-z]+}")  # "{doc_id:path}" -> "{doc_id}" in metric labels

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


def error_body(status: int, reason: str, details: list[str] | None = None) -> bytes:
    """The JSON error body every refusal carries: ``{"error", "status", "details"}``."""
    return json.dumps({"error": reason, "status": status, "details": details or []}).encode()


async def _send_error(send: Send, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
    body = error_body(status, reason)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# POST routes that only read (no API key needed unless reads require one).
_READ_POSTS = ("/v1/search", "/v1/similarity", "/v1/tag")


def exception_answer(exc: Exception, *, index_dir: Path | None = None) -> tuple[int, str, dict[str, str] | None]:
    """(status, reason, headers) for an exception raised by the backend; one mapping for both paths.

    Paths inside ``index_dir`` are shown relative to it: an unauthenticated reader learns what failed,
    not where the server keeps its files.
    """
    status, reason, headers = _answer(exc)
    return status, _relative_paths(reason, index_dir), headers


def _relative_paths(reason: str, index_dir: Path | None) -> str:
    if index_dir is None:
        return reason
    for form in {str(index_dir.resolve()), str(index_dir), os.path.abspath(index_dir)}:
        if form not in (".", "/"):
            reason = reason.replace(form + os.sep, "").replace(form, "<index>")
    return reason


def _answer(exc: Exception) -> tuple[int, str, dict[str, str] | None]:
    if isinstance(exc, NotReadyError):
        return 503, str(exc), {"Retry-After": "1"}
    if isinstance(exc, DocumentNotFoundError):
        return 404, str(exc), None
    if isinstance(exc, ModeNotAvailableError):  # also RerankerNotAvailableError (rerank > 0, no re-ranker)
        return 409, str(exc), None
    if isinstance(exc, WriteNotSupportedError):
        return 501, str(exc), None
    if isinstance(exc, WritesBusyError):
        return 429, str(exc), {"Retry-After": "1"}
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
FAST_PATHS = frozenset({"/v1/search", "/v1/search:batch"})


class Guard:
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
        if not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        is_write = method not in _READ_METHODS and not scope["path"].startswith(_READ_POSTS)
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
            wanted = headers.get(b"x-min-version")
            if wanted is not None:
                refusal = await self._catch_up(wanted.decode("latin-1").strip())
                if refusal is not None:
                    await _send_error(send, *refusal)
                    return
            if method in _BODY_METHODS:
                body = await self._read_body(receive)
                if body is None:
                    await _send_error(send, 413, f"request body exceeds {MAX_BODY_BYTES} bytes")
                    return
                if self._fast is not None and method == "POST" and scope["path"] in FAST_PATHS:
                    answer = await self._fast(scope["path"], body)
                    if answer is not None:
                        await _send_json(send, *answer)
                        return
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            self.backend.release()

    async def _catch_up(self, wanted: str) -> tuple[int, str, dict[str, str] | None] | None:
        """Read-your-writes: load ``CURRENT`` if this process serves a version older than ``wanted``.

        Version names begin with their UTC publish time, so "older" is "sorts before". Returns the
        error to answer instead (400 for a malformed name, 503 + Retry-After if still behind), or None.
        """
        if not VERSION_RE.match(wanted):
            return 400, f"X-Min-Version {wanted!r} is not an index version name", None
        snap = self.backend.snapshot
        if snap is not None and snap.version >= wanted:
            return None
        try:
            await anyio.to_thread.run_sync(self.backend.reload)
        except DSSMError as exc:
            log.warning("X-Min-Version %s: reload failed: %s", wanted, exc)
        snap = self.backend.snapshot
        if snap is None or snap.version < wanted:
            return 503, (f"this server process serves index version {snap.version if snap else None}, older than "
                         f"X-Min-Version {wanted}; retry after the Retry-After seconds"), {"Retry-After": "1"}
        return None

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
