"""The HTTP service: FastAPI over :class:`~serving.backend.Backend`. ``main(argv)`` is ``dssm serve``.

Endpoints (all JSON; the OpenAPI document is served at ``/openapi.json`` and checked in as
``docs/openapi.json``):

- ``POST /v1/search`` ``{"query", "k", "mode"}`` → ``{"version", "hits": [{"id", "score", "text"}]}``
- ``POST /v1/search:batch`` ``{"queries", "k", "mode"}`` → ``{"version", "results": [[hit, ...], ...]}``
- ``POST /v1/similarity`` ``{"text1", "text2"}`` → ``{"version", "cosine", "is_duplicate", "threshold"}``
- ``POST /v1/tag`` ``{"text", "k", "threshold"?, "predicted_only"?, "mode"?}`` → ``{"version", "threshold", "labels":
  [{"label", "score", "predicted"}]}`` (a *tags index*: labels as documents, :mod:`serving.tagger`)
- ``GET /v1/documents/{id}`` → ``{"version", "document": {"id", "title", "text"}}``
- ``PUT /v1/documents`` ``{"documents": [{"id", "text", "title"?}]}``, ``DELETE /v1/documents/{id}`` and
  ``POST /v1/documents:delete`` ``{"ids": [...]}`` (API key required) → ``{"version", "upserted", "deleted"}``
- ``GET /healthz``, ``GET /readyz`` (503 until an index is loaded), ``GET /metrics`` (Prometheus)

Every error is ``{"error": reason, "status": code, "details": [...]}``. Before a request reaches
FastAPI, one ASGI layer (:class:`serving.guard.Guard`) checks the API key (401, nothing runs), the content type
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

This module assembles the app (:func:`create_app`: lifespan, worker-thread pool, OpenAPI document)
from the guard (:mod:`serving.guard`) and the routes (:mod:`serving.routes`), and runs it:
``dssm serve`` parses its flags into a :class:`serving.config.ServeConfig` and serves it in one
process or in ``--workers N`` processes (:func:`worker_app`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import multiprocess

from dssm import __version__
from dssm.config import config_from_dict, config_to_dict
from dssm.errors import ConfigError
from dssm.index import current_version_dir
from serving.backend import Backend, WritesBusyError, multiprocess_metrics
from serving.config import API_KEY_ENV, LOG_LEVELS, WORKER_CONFIG_ENV, ServeConfig
from serving.guard import API_PREFIX, Guard
from serving.routes import (
    SECURITY_SCHEME,
    add_error_handlers,
    add_health_routes,
    add_read_routes,
    add_write_routes,
    metrics_text,
)
from serving.searcher import Searcher
from serving.threads import limit_threads
from serving.writer import WriterProcess

__all__ = ["API_KEY_ENV", "WORKER_CONFIG_ENV", "ServeConfig", "create_app", "metrics_text", "openapi_document",
           "write_openapi", "worker_app", "main"]

log = logging.getLogger(__name__)


class _WriteQueue:
    """Writes' own executor: at most ``limit`` writes admitted (running or waiting), each on a thread of
    its own pool, so that the backend sees the ones waiting and commits them together
    (:mod:`serving.group_commit`); reads never wait for these threads.

    The count lives on the event loop's thread (admission happens there), so it needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0
        self._limiter: anyio.CapacityLimiter | None = None

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.pending >= self.limit:
            raise WritesBusyError(f"{self.pending} writes already admitted (max_pending_writes={self.limit}); "
                                  "retry after the Retry-After seconds")
        if self._limiter is None:  # created on the loop that serves
            self._limiter = anyio.CapacityLimiter(self.limit)
        self.pending += 1
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self._limiter)
        finally:
            self.pending -= 1


def create_app(backend: Backend, *, api_key: str | None = None, require_key_for_reads: bool = False,
               worker_threads: int = 8, manage_backend: bool = True, load_before_serving: bool = False,
               max_pending_writes: int = 8) -> FastAPI:
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
        max_pending_writes: writes admitted at once (running or queued); more get 429 with
            ``Retry-After``. Writes wait on threads of their own (one commits at a time, taking every
            write queued behind it into the same version), so a burst of writes never holds the threads
            reads run on.

    Returns:
        The ASGI app (FastAPI wrapped by the guard layer is installed as middleware).
    """
    if worker_threads < 1:
        raise ConfigError(f"worker_threads must be >= 1, got {worker_threads}")
    if max_pending_writes < 1:
        raise ConfigError(f"max_pending_writes must be >= 1, got {max_pending_writes}")
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
                multiprocess.mark_process_dead(os.getpid())

    app = FastAPI(title="dssm-search", version=__version__, lifespan=lifespan,
                  description="Semantic search over a DSSM index: search, batch search, similarity, documents, "
                              "incremental writes. Every /v1 response names the index version that served it.")

    async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not limiter_box:  # app used without lifespan (e.g. a bare TestClient)
            limiter_box.append(anyio.CapacityLimiter(worker_threads))
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=limiter_box[0])

    add_error_handlers(app, index_dir=backend.index_dir)
    add_health_routes(app, backend)
    fast = add_read_routes(app, backend, run)
    writes = _WriteQueue(max_pending_writes)
    add_write_routes(app, backend, writes.run)
    app.openapi = functools.partial(_openapi, app, require_key_for_reads)  # type: ignore[method-assign]
    app.add_middleware(Guard, backend=backend, api_key=api_key, require_key_for_reads=require_key_for_reads,
                       routes=lambda: app.router.routes, fast=fast)
    return app


def _openapi(app: FastAPI, require_key_for_reads: bool) -> dict[str, Any]:
    """``app``'s OpenAPI document (built once), with the API-key scheme and, if reads need it, their security."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            SECURITY_SCHEME: {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        if require_key_for_reads:
            for path, ops in schema["paths"].items():
                if path.startswith(API_PREFIX):
                    for op in ops.values():
                        op.setdefault("security", [{SECURITY_SCHEME: []}])
        app.openapi_schema = schema
    return app.openapi_schema


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document a default server (reads open) serves; no index is needed."""
    return create_app(Backend("unused", watch_interval=0), manage_backend=False).openapi()


def write_openapi(path: str | Path) -> None:
    """Write :func:`openapi_document` as indented JSON (this is ``docs/openapi.json``)."""
    Path(path).write_text(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")


def _graph_loader(index_dir: Path, encoder: Any) -> Searcher:
    """``--no-fast-queries``: every query through the SavedModel's signature (TensorFlow loaded at start)."""
    return Searcher.load(index_dir, encoder=encoder, fast_queries=False)


def _serving_app(config: ServeConfig) -> FastAPI:
    """One serving process's app from ``config`` (the parsed ``dssm serve`` flags), process settings applied."""
    loader = None if config.fast_queries else _graph_loader
    # Without an API key writes are refused (403), so there is nothing for a writer process to do.
    writer = (WriterProcess(config.index, tf_threads=config.tf_threads)
              if config.write_process and config.api_key else None)
    backend = Backend(config.index, max_in_flight=config.max_in_flight, watch_interval=config.watch_interval,
                      batchers=config.model_threads, batch_window=config.batch_window_ms / 1000.0, loader=loader,
                      writer=writer)
    app = create_app(backend, api_key=config.api_key, require_key_for_reads=config.require_key_for_reads,
                     worker_threads=config.threads, load_before_serving=config.load_before_serving,
                     max_pending_writes=config.max_pending_writes)
    if config.tf_threads:
        limit_threads(config.tf_threads)
    if config.switch_interval_ms > 0:
        sys.setswitchinterval(config.switch_interval_ms / 1000.0)
    return app


def worker_app() -> FastAPI:
    """The app of one ``dssm serve --workers N`` process (uvicorn's factory, in a spawned interpreter).

    The parent puts its :class:`ServeConfig` as JSON in ``$DSSM_SERVE_WORKER_CONFIG``. Each worker
    loads the index itself and watches ``CURRENT`` on its own, so a write answered by one worker
    (which swaps the new version in before it answers) reaches the others within their
    ``--watch-interval``.

    Raises:
        ConfigError: the variable is missing (the factory was started by something other than ``dssm serve``).
    """
    raw = os.environ.get(WORKER_CONFIG_ENV)
    if not raw:
        raise ConfigError(f"${WORKER_CONFIG_ENV} is not set: worker_app is started by `dssm serve --workers N`")
    config = dataclasses.replace(config_from_dict(ServeConfig, json.loads(raw)), load_before_serving=True)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    return _serving_app(config)


def _run_workers(args: argparse.Namespace, config: ServeConfig) -> None:
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
    os.environ[WORKER_CONFIG_ENV] = json.dumps(config_to_dict(config))
    try:
        uvicorn.run("serving.app:worker_app", factory=True, workers=args.workers, host=args.host, port=args.port,
                    log_level=args.log_level, access_log=False, loop=args.loop,
                    timeout_worker_healthcheck=args.worker_timeout)
    finally:
        os.environ.pop(WORKER_CONFIG_ENV, None)
        if own_dir is not None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(own_dir, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    """The ``dssm serve`` command line."""
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
                        help="worker threads for batch searches, similarity and document reads "
                             "(default: 8); single queries are coalesced in the model thread")
    parser.add_argument("--max-pending-writes", type=int, default=8,
                        help="writes admitted at once, on threads of their own (one commits at a time, with "
                             "every write queued behind it in the same version); more get 429 with Retry-After, "
                             "so writes never hold the threads reads use (default: 8)")
    parser.add_argument("--model-threads", type=int, default=1,
                        help="threads that answer single queries, each taking every query waiting at that "
                             "moment as one batch (default: 1)")
    parser.add_argument("--tf-threads", type=int, default=1,
                        help="TensorFlow intra- and inter-op threads, and numpy BLAS threads (default: 1: a single "
                             "query's ops are too small to gain from a pool, and the event loop needs the other core)")
    parser.add_argument("--write-process", action=argparse.BooleanOptionalAction, default=True,
                        help="encode and publish writes in one child process (default), so that their work does "
                             "not hold this process's interpreter lock against searches; --no-write-process "
                             "writes in the server's process")
    parser.add_argument("--fast-queries", action=argparse.BooleanOptionalAction, default=True,
                        help="answer ASCII queries from the model's numpy weights, loading TensorFlow only when "
                             "something needs it (default); --no-fast-queries loads the SavedModel at start")
    parser.add_argument("--switch-interval-ms", type=float, default=5.0,
                        help="Python's GIL switch interval (sys.setswitchinterval) in ms (default: 5.0)")
    parser.add_argument("--batch-window-ms", type=float, default=0.0,
                        help="how long the model thread waits for more concurrent queries to join a batch "
                             "(default: 0, take only those already waiting)")
    parser.add_argument("--watch-interval", type=float, default=1.0,
                        help="seconds between checks of CURRENT for a new version (default: 1.0)")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="event loop implementation (default: auto = uvloop when installed)")
    parser.add_argument("--log-level", default="info", choices=list(LOG_LEVELS))
    parser.add_argument("--write-openapi", type=Path, metavar="PATH",
                        help="write the OpenAPI document to PATH and exit (no index needed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``dssm serve --index INDEX_DIR [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--workers N] ...``."""
    parser = _parser()
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
    config = ServeConfig(index=str(args.index.resolve()), api_key=args.api_key,
                         require_key_for_reads=args.require_key_for_reads, max_in_flight=args.max_in_flight,
                         threads=args.threads, model_threads=args.model_threads, tf_threads=args.tf_threads,
                         max_pending_writes=args.max_pending_writes,
                         switch_interval_ms=args.switch_interval_ms, batch_window_ms=args.batch_window_ms,
                         watch_interval=args.watch_interval, log_level=args.log_level,
                         fast_queries=args.fast_queries, write_process=args.write_process)
    try:
        if args.workers > 1:
            _run_workers(args, config)
        else:
            uvicorn.run(_serving_app(config), host=args.host, port=args.port, log_level=args.log_level,
                        access_log=False, loop=args.loop)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    return 0
