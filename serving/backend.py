"""The transport-free serving backend: the live :class:`~serving.searcher.Searcher`, hot swaps, load shedding, metrics.

:class:`Backend` holds one immutable :class:`Snapshot` (a loaded index version and what was read from
it). Every operation takes the snapshot reference once at its start and uses only that object, so a
swap that happens meanwhile cannot give it a mix of two versions; the old version stays alive until
its last request lets go of it. Swapping is one reference assignment under a lock.

A watcher thread polls ``INDEX_DIR/CURRENT``; when it names a new version the backend loads it in that
thread (checksums verified, one warm-up query) and only then swaps. A version that fails to load is
logged, counted and skipped; the old one keeps serving. When the new version carries the same model
files as the live one, the loaded query encoder is reused, and a version that links the live base
reuses its ScaNN searcher: a swap after a delta write loads only what the write added. Compaction
runs in the background (:mod:`serving.compaction`).

Micro-batching and the model thread (:mod:`serving.model_thread`): single dense queries
(:meth:`Backend.search_async`, :meth:`Backend.submit_search`) queue for one dedicated model thread,
which answers every query waiting at that moment with one ``search_batch`` call on one snapshot
(on this 2-core machine a batch of 8 costs about 2× a single query, not 8×). Batch requests, which
are batched already, run in the caller's worker threads, so several can use both cores and none
holds up the queued single queries (:meth:`Backend.call_async` runs any other function in the
model thread).

Load shedding: :meth:`Backend.try_acquire` admits at most ``max_in_flight`` operations at once and
refuses the rest immediately (the HTTP layer turns that into a 429), so a burst can never build an
unbounded queue.

Metrics are Prometheus collectors in a registry owned by the backend (one per instance, so several
backends can live in one process, as in tests).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dssm.errors import ConfigError, DSSMError, IndexNotFoundError, InputError
from dssm.hybrid import SEARCH_MODES
from dssm.index import current_version_dir
from dssm.index.documents import as_documents
from serving.compaction import BackgroundCompactor
from serving.group_commit import GroupCommit
from serving.metrics import Metrics, multiprocess_metrics
from serving.model_thread import ModelThread, search_options
from serving.reranking import check_rerank
from serving.searcher import DocumentNotFoundError, Searcher, model_fingerprint  # 404 in the HTTP layer
from serving.writer import WriterProcess

__all__ = [
    "DUPLICATE_THRESHOLD_KEY",
    "SEARCH_MODES",
    "NotReadyError",
    "DocumentNotFoundError",
    "ModeNotAvailableError",
    "RerankerNotAvailableError",
    "WriteNotSupportedError",
    "WritesBusyError",
    "Snapshot",
    "SimilarityResult",
    "MAX_TAG_LABELS",
    "Metrics",
    "Backend",
    "multiprocess_metrics",
]

log = logging.getLogger(__name__)

# Manifest key (in the index version's manifest.json) holding the calibrated cosine threshold for
# duplicate detection, written by `dssm thresholds --save`.
DUPLICATE_THRESHOLD_KEY = "duplicate_threshold"



class NotReadyError(DSSMError):
    """No index version is loaded yet (the HTTP layer answers 503)."""


class ModeNotAvailableError(DSSMError):
    """The live index version cannot serve the requested search mode (e.g. hybrid without BM25 state)."""


class RerankerNotAvailableError(ModeNotAvailableError):
    """``rerank > 0`` on an index version without a re-ranker (answered like a mode it cannot serve: 409)."""


class WriteNotSupportedError(DSSMError):
    """The loaded searcher has no incremental update path (``upsert``/``delete``)."""


class WritesBusyError(DSSMError):
    """The write queue is full (``max_pending_writes``): answered 429 with ``Retry-After``, never a hung read."""


@dataclass(frozen=True)
class Snapshot:
    """One loaded index version and what the service reads from it. Never mutated after creation."""

    searcher: Any
    version: str
    documents: int
    duplicate_threshold: float | None
    supports_hybrid: bool
    model_fingerprint: str | None
    loaded_at: float


@dataclass(frozen=True)
class SimilarityResult:
    """Cosine of two texts and the duplicate verdict when the index has a threshold."""

    version: str
    cosine: float
    is_duplicate: bool | None
    threshold: float | None


# /v1/tag scores every document of the index as a label (an exact product): a tags index, not a corpus.
MAX_TAG_LABELS = 10_000


def _default_loader(index_dir: Path, encoder: Any | None) -> Any:
    return Searcher.load(index_dir, encoder=encoder)


def _freeze_heap() -> None:
    """Move what the process holds now (TensorFlow, the tower's graph, the loaded version) out of the
    cyclic collector's reach, as :mod:`serving.writer`'s child does after loading the tower.

    With TensorFlow loaded a full collection walks ~400k objects while holding the interpreter lock,
    and every search in flight waits: in a ``dssm serve`` on the 100k synthetic index of ``make bench
    PART=write`` (20 s idle, 40 s of writes), the 7 full collections took 29-82 ms (median 65), with
    the heap frozen after the first load a median of 34 ms (at most 38). Called once per model (the
    previous model's objects become collectable again first), not per version: a frozen object that
    ends in a reference cycle is never collected.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Backend:
    """Serves one index directory: the live version, hot swaps, an in-flight limit and metrics.

    Args:
        index_dir: the index directory (``CURRENT`` + ``versions/``).
        max_in_flight: operations admitted at once; more are refused by :meth:`try_acquire`.
        watch_interval: seconds between checks of ``CURRENT`` (``0`` disables the watcher thread;
            :meth:`reload` still works).
        loader: ``(index_dir, encoder_or_None) -> searcher``; default :meth:`Searcher.load`.
            The encoder argument is the live version's encoder when the model files are unchanged.
        warmup_query: a text searched once on a freshly loaded version before it goes live.
        max_batch: most single queries one coalesced call answers (1 turns micro-batching off).
        batchers: model threads (one by default: every model call runs in it, see the module docstring).
        batch_window: seconds the model thread waits for more queries after the first of a batch
            (0: take only what is already waiting).
        writer: runs the writes of a :class:`Searcher` index (``dssm serve`` passes a
            :class:`serving.writer.WriterProcess`: the work of a write off this process's interpreter
            lock); ``None`` writes in this process.
    """

    def __init__(self, index_dir: str | Path, *, max_in_flight: int = 64, watch_interval: float = 1.0,
                 loader: Callable[[Path, Any | None], Any] | None = None,
                 warmup_query: str = "warm up", max_batch: int = 64, batchers: int = 1,
                 batch_window: float = 0.0, writer: WriterProcess | None = None) -> None:
        if max_batch < 1 or batchers < 1:
            raise ConfigError(f"max_batch and batchers must be >= 1, got {max_batch} and {batchers}")
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if watch_interval < 0:
            raise ConfigError(f"watch_interval must be >= 0, got {watch_interval}")
        if not 0 <= batch_window <= 1.0:
            raise ConfigError(f"batch_window must be in [0, 1] seconds, got {batch_window}")
        self.index_dir = Path(index_dir)
        self.max_in_flight = max_in_flight
        self.watch_interval = watch_interval
        self.metrics = Metrics()
        self._loader = loader or _default_loader
        self._warmup_query = warmup_query
        self._snapshot: Snapshot | None = None
        self._swap_lock = threading.Lock()     # guards the swap and the metrics that describe it
        self._load_lock = threading.Lock()     # one load at a time (watcher vs. write path)
        self._writes = GroupCommit(self._commit, key=lambda method, item: item[0] if method == "upsert" else item,
                                   merged=self.metrics.merged_writes.inc)  # one commit at a time
        self._writer = writer
        self.compactor = BackgroundCompactor(self.index_dir, reload=self.reload, published=self.metrics.compactions.inc)
        self._slots_lock = threading.Lock()
        self._tagger_lock = threading.Lock()
        self._tagger_cache: dict[str, tuple[Snapshot, Any]] = {}  # mode -> (live version, its Tagger), on demand
        self._in_flight = 0
        self._failed_versions: dict[str, str] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.last_error: str | None = None
        self.max_batch = max_batch
        self.batch_window = batch_window
        self._model = ModelThread(current=self.current, batch_size=self.metrics.batch_size, max_batch=max_batch,
                                  threads=batchers, batch_window=batch_window)

    # ---------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self, *, wait: bool = False, timeout: float | None = None) -> None:
        """Start the watcher thread; its first pass loads the current version.

        Args:
            wait: block until a version is loaded (or ``timeout`` passes).
            timeout: seconds to wait when ``wait`` is set.
        """
        if self._watcher is not None:
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="dssm-index-watcher", daemon=True)
        self._watcher.start()
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._snapshot is None and not self._stop.is_set():
                if deadline is not None and time.monotonic() > deadline:
                    raise NotReadyError(f"no index version of {self.index_dir} loaded after {timeout} s "
                                        f"(last error: {self.last_error})")
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the watcher thread (the loaded version stays usable)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
            self._watcher = None
        self._model.stop()
        self.compactor.close()
        if self._writer is not None:
            self._writer.close()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.reload()
            except Exception:  # noqa: BLE001 - the watcher must survive anything; reload logged it
                pass
            if self.watch_interval == 0 and self._snapshot is not None:
                return
            self._stop.wait(self.watch_interval or 0.5)

    # ---------------------------------------------------------------------------------------------
    # Loading and swapping

    @property
    def snapshot(self) -> Snapshot | None:
        """The live snapshot, or ``None`` before the first load."""
        return self._snapshot

    def current(self) -> Snapshot:
        """The live snapshot.

        Raises:
            NotReadyError: nothing is loaded yet.
        """
        snap = self._snapshot
        if snap is None:
            raise NotReadyError(f"no index version of {self.index_dir} is loaded yet"
                                + (f" (last error: {self.last_error})" if self.last_error else ""))
        return snap

    def reload(self, *, force: bool = False) -> bool:
        """Load the version ``CURRENT`` names if it is not the live one, then swap it in.

        Args:
            force: retry a version that failed to load before.

        Returns:
            True if a new version went live.

        Raises:
            DSSMError: the version could not be loaded (it is remembered and skipped until ``force``).
        """
        with self._load_lock:
            try:
                target = current_version_dir(self.index_dir)
            except IndexNotFoundError as exc:
                self.last_error = str(exc)
                raise
            live = self._snapshot
            if live is not None and live.version == target.name:
                return False
            if target.name in self._failed_versions and not force:
                return False
            tick = time.perf_counter()
            try:
                snap = self._load(target, live)
            except Exception as exc:
                self._failed_versions[target.name] = f"{type(exc).__name__}: {exc}"
                self.last_error = f"version {target.name}: {type(exc).__name__}: {exc}"
                self.metrics.load_failures.inc()
                log.error("could not load index version %s: %s", target, exc)
                raise
            self.metrics.load_seconds.observe(time.perf_counter() - tick)
            self._swap(snap)
            if live is None or snap.model_fingerprint != live.model_fingerprint:
                _freeze_heap()
            log.info("serving index version %s (%d documents)", snap.version, snap.documents)
            return True

    def _load(self, target: Path, live: Snapshot | None) -> Snapshot:
        fingerprint = model_fingerprint(target / "model")
        reuse = None
        if live is not None and fingerprint is not None and fingerprint == live.model_fingerprint:
            reuse = getattr(live.searcher, "encoder", None)
        searcher = self._loader(self.index_dir, reuse)
        version_dir = Path(searcher.index.version_dir)
        loaded_fingerprint = model_fingerprint(version_dir / "model")
        if reuse is not None and loaded_fingerprint != fingerprint:
            # CURRENT moved between our look and the load, to a version with another model.
            searcher = self._loader(self.index_dir, None)
            version_dir = Path(searcher.index.version_dir)
            loaded_fingerprint = model_fingerprint(version_dir / "model")
        elif reuse is not None and hasattr(reuse, "follow"):  # a lazy SavedModel loads from a live version
            reuse.follow(version_dir / "model")
        manifest = getattr(searcher.index, "manifest", {}) or {}
        threshold = getattr(searcher, "duplicate_threshold", None)
        if threshold is None:
            threshold = manifest.get(DUPLICATE_THRESHOLD_KEY)
        if threshold is not None:
            threshold = float(threshold)
            if not np.isfinite(threshold):
                raise ConfigError(f"{version_dir}: {DUPLICATE_THRESHOLD_KEY} is not finite: {threshold!r}")
        supports_hybrid = bool(getattr(searcher, "supports_hybrid", False))
        # A version that shares the live base and encoder (a delta write) has nothing cold to warm up.
        index = getattr(searcher, "index", None)
        warm = (live is not None and reuse is not None and hasattr(index, "shares_base")
                and index.shares_base(getattr(live.searcher, "index", None))
                and getattr(searcher, "reranker", None) is getattr(live.searcher, "reranker", None))
        if self._warmup_query and not warm and getattr(searcher, "encoder", None) is not None and len(searcher) > 0:
            searcher.search(self._warmup_query, k=1)
            if getattr(searcher, "reranker", None) is not None:
                searcher.search(self._warmup_query, k=1, rerank=1)  # the re-ranker's first call is slow too
        return Snapshot(searcher=searcher, version=str(searcher.version), documents=int(len(searcher)),
                        duplicate_threshold=threshold, supports_hybrid=supports_hybrid,
                        model_fingerprint=loaded_fingerprint, loaded_at=time.time())

    def _swap(self, snap: Snapshot) -> None:
        with self._swap_lock:
            old = self._snapshot
            self._snapshot = snap
            if old is not None and old.version != snap.version:
                if multiprocess_metrics():
                    # Series cannot be removed from the shared files: the old version reads 0.
                    self.metrics.index_info.labels(version=old.version).set(0)
                else:
                    self.metrics.index_info.remove(old.version)
            self.metrics.index_info.labels(version=snap.version).set(1)
            self.metrics.index_documents.set(snap.documents)
            self.metrics.index_loaded.set(snap.loaded_at)
            self.metrics.swaps.inc()
            self.last_error = None

    # ---------------------------------------------------------------------------------------------
    # Admission

    def try_acquire(self) -> bool:
        """Admit one operation if fewer than ``max_in_flight`` are running; never blocks."""
        with self._slots_lock:
            if self._in_flight >= self.max_in_flight:
                self.metrics.rejected.inc()
                return False
            self._in_flight += 1
            self.metrics.in_flight.set(self._in_flight)
            return True

    def release(self) -> None:
        """Give back a slot taken by :meth:`try_acquire`."""
        with self._slots_lock:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)

    @property
    def in_flight(self) -> int:
        """Operations admitted and not yet released."""
        return self._in_flight

    # ---------------------------------------------------------------------------------------------
    # Reads (blocking: call them from a worker thread)

    @staticmethod
    def _check_k(k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")

    def _check_mode(self, snap: Snapshot, mode: str) -> None:
        if mode not in SEARCH_MODES:
            raise InputError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        if mode != "dense" and not snap.supports_hybrid:
            raise ModeNotAvailableError(f"index version {snap.version} cannot serve mode={mode!r} (it needs BM25 "
                                        "state and a query model in the index); use mode='dense'")

    @staticmethod
    def _check_rerank(snap: Snapshot, rerank: int) -> None:
        try:
            check_rerank(rerank, reranker=getattr(snap.searcher, "reranker", None), version=snap.version)
        except IndexNotFoundError as exc:  # the version has no re-ranker: the request is fine, the index is not
            raise RerankerNotAvailableError(str(exc)) from exc

    @staticmethod
    def _mode(snap: Snapshot, mode: str | None) -> str:
        # A request without a mode gets the version's default (hybrid with its stored weight, else dense).
        return mode or getattr(snap.searcher, "default_mode", "dense")

    def default_mode(self) -> str:
        """The mode a search without one runs in on the live version."""
        return self._mode(self.current(), None)

    def search(self, text: str, k: int = 10, *, mode: str | None = None,
               rerank: int = 0) -> tuple[str, list[Any]]:
        """Top-k hits for one query (``mode=None``: the version's default mode).

        Args:
            text: the query.
            k: hits to return.
            mode: ``dense``, ``bm25``, ``hybrid`` or ``None`` (the version's default).
            rerank: ``N > 0`` re-orders the first stage's top ``max(N, k)`` with the version's re-ranker.

        Returns:
            (version, hits) — hits are the searcher's ``Hit`` tuples ``(id, score, text)``, best first.

        Raises:
            InputError: a bad ``k``, ``mode`` or ``rerank`` value.
            ModeNotAvailableError: the version cannot serve ``mode``.
            RerankerNotAvailableError: ``rerank > 0`` and the version has no re-ranker.
        """
        snap = self.current()
        self._check_k(k)
        mode = self._mode(snap, mode)
        self._check_mode(snap, mode)
        self._check_rerank(snap, rerank)
        return snap.version, snap.searcher.search(text, k=k, **search_options(snap.searcher, mode, rerank))

    def submit_search(self, query: str, k: int) -> Future:
        """Queue one dense query for the model thread; never blocks.

        Returns:
            A future of ``(version, hits)``, as :meth:`search` returns (or its exception).
        """
        self._check_k(k)
        return self._model.submit(query, k)

    async def search_async(self, query: str, k: int) -> tuple[str, list[Any]]:
        """:meth:`submit_search` for asyncio callers: the answer comes back through the caller's loop.

        The model thread hands all the answers of one batch that belong to a loop to its mailbox at
        once, so a batch of n queries wakes the event loop once, not n times.
        """
        self._check_k(k)
        return await self._model.submit_async(query, k)

    async def call_async(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the model thread (in turn with the coalesced queries) and await it.

        Model calls of every kind go through the one thread, so they never compete with each other
        for the two cores, the GIL or TensorFlow's thread pools.
        """
        return await self._model.call_async(fn, *args, **kwargs)

    def close_mailboxes(self) -> None:
        """Release the pipes of the mailboxes of the running loop (the app calls this at shutdown)."""
        self._model.close_mailboxes()


    def search_batch(self, texts: Sequence[str], k: int = 10, *, mode: str | None = None,
                     rerank: int = 0) -> tuple[str, list[list[Any]]]:
        """Top-k hits for each query, all from one version (arguments and errors as in :meth:`search`)."""
        snap = self.current()
        self._check_k(k)
        mode = self._mode(snap, mode)
        self._check_mode(snap, mode)
        self._check_rerank(snap, rerank)
        return snap.version, snap.searcher.search_batch(list(texts), k=k, **search_options(snap.searcher, mode, rerank))

    def similarity(self, text1: str, text2: str) -> SimilarityResult:
        """Cosine between the two texts' embeddings (query tower, as for duplicate questions).

        The live searcher computes it (:func:`serving.searcher.text_similarity`, against the version's
        stored threshold); this tags the answer with the version that gave it.
        """
        snap = self.current()
        result = snap.searcher.similarity(text1, text2)
        return SimilarityResult(version=snap.version, cosine=float(result.cosine), is_duplicate=result.is_duplicate,
                                threshold=result.threshold)

    def tag(self, text: str, *, k: int | None = None, threshold: float | None = None,
            predicted_only: bool = False, mode: str = "dense") -> tuple[str, float | None, list[Any]]:
        """Labels of the live tags index for ``text``: ``(version, threshold used, [TagHit])``. 409 (ModeNotAvailable):
        over :data:`MAX_TAG_LABELS` documents, or ``predicted_only`` without a threshold."""
        snap = self.current()
        tagger = self._tagger(snap, mode)
        used = tagger.threshold if threshold is None else float(threshold)
        if predicted_only and used is None:
            raise ModeNotAvailableError(f"index version {snap.version} stores no tagging threshold; give one")
        return snap.version, used, tagger.tag(text, k=k, threshold=used, predicted_only=predicted_only)

    def _tagger(self, snap: Snapshot, mode: str) -> Any:
        if snap.documents > MAX_TAG_LABELS:
            raise ModeNotAvailableError(f"index version {snap.version} has {snap.documents} documents; /v1/tag "
                                        f"serves a tags index (labels as documents) of at most {MAX_TAG_LABELS}")
        with self._tagger_lock:
            cached = self._tagger_cache.get(mode)
            if cached is None or cached[0] is not snap:
                from serving.tagger import Tagger  # deferred: only tags services build one

                cached = self._tagger_cache[mode] = (snap, Tagger(snap.searcher, mode=mode))
            return cached[1]

    def get_document(self, doc_id: str) -> tuple[str, Any]:
        """The stored document ``doc_id`` as ``(version, Doc(id, title, text))``.

        Raises:
            DocumentNotFoundError: no such id in the live version.
        """
        snap = self.current()
        try:
            return snap.version, snap.searcher.get_document(doc_id)
        except KeyError as exc:  # DocumentNotFoundError, or a KeyError from another searcher type
            raise DocumentNotFoundError(f"document {doc_id!r} is not in index version {snap.version}") from exc

    # ---------------------------------------------------------------------------------------------
    # Writes (the incremental update path of the index; each publishes a new version)

    def _write(self, method: str, items: list[Any], check: Callable[[Snapshot], None] | None = None) -> str:
        # Writes that arrive while one commits go into the next version together (serving.group_commit).
        return self._writes.write(method, items, check=None if check is None else lambda: check(self.current()))

    def _commit(self, method: str, items: list[Any]) -> str:
        """One write (under the group commit's lock): applied, the new version live; returns it."""
        snap = self.current()
        # The child writes to the one index of a Searcher (not the shards of a ShardedSearcher).
        child = self._writer if self._writer is not None and type(snap.searcher) is Searcher else None
        fn = getattr(child or snap.searcher, method, None)
        if fn is None:
            raise WriteNotSupportedError(
                f"the loaded searcher ({type(snap.searcher).__name__}) has no {method}(); "
                "incremental updates are not available for this index")
        fn(items)
        self.reload(force=True)  # read-your-writes: the new version is live before the caller hears back
        live = self.current()
        self.compactor.after_write(getattr(live.searcher, "index", None))  # in the background, if due
        return live.version

    def upsert(self, documents: Sequence[Any]) -> str:
        """Add or replace documents; returns the new live version.

        A document is ``(id, title, text)`` or any other form :meth:`Searcher.upsert` takes.

        Raises:
            InputError: an id appears twice in ``documents``, or a document is in none of the forms.
        """
        documents = as_documents(documents)
        seen: set[str] = set()
        for doc_id, _, _ in documents:
            if doc_id in seen:
                raise InputError(f"document id {doc_id!r} appears twice in one upsert")
            seen.add(doc_id)
        return self._write("upsert", list(documents))

    def delete(self, doc_ids: str | Sequence[str]) -> str:
        """Delete one document id or several; returns the new live version.

        Raises:
            InputError: no ids, or an id appears twice.
            DocumentNotFoundError: an id is not in the live version (nothing is deleted).
        """
        if isinstance(doc_ids, str):  # one id, as Searcher.delete and SearchClient.delete take it
            doc_ids = [doc_ids]
        if not doc_ids:
            raise InputError("no document ids to delete")
        seen: set[str] = set()
        for doc_id in doc_ids:
            if doc_id in seen:
                raise InputError(f"document id {doc_id!r} appears twice in one delete")
            seen.add(doc_id)

        def all_present(snap: Snapshot) -> None:
            for doc_id in doc_ids:
                try:
                    snap.searcher.get_document(doc_id)
                except KeyError as exc:
                    raise DocumentNotFoundError(f"document {doc_id!r} is not in index version {snap.version}") from exc

        return self._write("delete", list(doc_ids), check=all_present)
