"""The model thread: micro-batching of single dense queries, and the mailboxes that hand answers back.

This module owns :class:`ModelThread`, which :class:`serving.backend.Backend` drives. Single dense
queries (:meth:`ModelThread.submit`, :meth:`ModelThread.submit_async`) queue for one dedicated
model thread; each round it takes every query waiting at that moment (up to ``max_batch``; with
``batch_window`` > 0 it also waits that long for more) and answers them with one ``search_batch``
call on one snapshot, then settles the asyncio futures of the round with a single wake-up of the
event loop (:class:`_Mailbox`). Nothing waits for a batch to fill by default, so a lone query costs
what it did; under concurrency one model call serves many queries, and the event loop's thread and
the model thread each keep a core instead of a pool of threads fighting over both cores and the
GIL. :meth:`ModelThread.call_async` runs any other function in the model thread. A query that
makes its batch fail is retried alone, so one bad query cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

__all__ = ["ModelThread", "search_options"]


def search_options(searcher: Any, mode: str, rerank: int) -> dict[str, Any]:
    """The keywords of a searcher's ``search``/``search_batch`` for ``mode`` and ``rerank``.

    Only what is needed, so a searcher without modes or a re-ranker still serves plain searches; but
    ``dense`` is named whenever the searcher's own default is another mode (a version that stores a
    hybrid weight), or a request for dense results would get the default's.
    """
    named = mode != "dense" or getattr(searcher, "default_mode", "dense") != "dense"
    return {**({"mode": mode} if named else {}), **({"rerank": rerank} if rerank else {})}


class _Job(NamedTuple):
    """One dense query waiting for the model thread; ``box`` is ``None`` for a ``concurrent.futures.Future``."""

    query: str
    k: int
    future: Any
    box: _Mailbox | None


class _Call(NamedTuple):
    """A function to run in the model thread, its asyncio future and its loop's mailbox."""

    fn: Callable[[], Any]
    future: asyncio.Future
    box: _Mailbox


class _Mailbox:
    """Hands results from the model thread to one event loop.

    ``loop.call_soon_threadsafe`` under uvloop writes its wake-up with the GIL held; when that write
    wakes the loop's thread, the scheduler often switches to it at once, and it then waits for the GIL
    the descheduled model thread still holds (profiles showed a quarter of all GIL time in that
    call). Here the model thread queues the results and writes one byte with ``os.write``, which
    releases the GIL, and only when the loop has not been woken already; the loop drains everything
    queued in one callback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._pending: collections.deque[list[tuple[asyncio.Future, Any, BaseException | None]]] = collections.deque()
        self._woken = False
        self._closed = False
        # Only so that close() cannot free the pipe while a model thread writes to it (a reused fd
        # number would get our byte); uncontended, it costs well under a microsecond.
        self._lock = threading.Lock()
        loop.add_reader(self._read, self._drain)

    def post(self, items: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
        """Queue ``(future, result, exception)`` items (any thread); wakes the loop if it is not awake yet."""
        self._pending.append(items)
        if self._woken:
            return
        with self._lock:
            if self._closed:  # the loop is shutting down: its callers are gone
                return
            self._woken = True
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:  # the pipe is full: the loop has plenty of wake-ups pending
                pass

    def _drain(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        # Cleared before draining: a post after this point writes again (see post()).
        self._woken = False
        while self._pending:
            _settle_in_loop(self._pending.popleft())

    def close(self) -> None:
        """Stop watching the pipe and close it (call from the loop's thread)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.loop.remove_reader(self._read)
            finally:
                os.close(self._read)
                os.close(self._write)


def _settle(outcomes: Sequence[tuple[Any, Any, Any, BaseException | None]]) -> None:
    """Resolve ``(future, mailbox, result, exception)`` outcomes: asyncio futures through their loop's mailbox."""
    by_box: dict[Any, list[tuple[Any, Any, BaseException | None]]] = {}
    for future, box, result, exc in outcomes:
        if box is None:
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)
        else:
            by_box.setdefault(box, []).append((future, result, exc))
    for box, items in by_box.items():
        box.post(items)


def _settle_in_loop(items: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, result, exc in items:
        if future.done():  # cancelled: the client disconnected
            continue
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


class ModelThread:
    """The model thread(s) of one backend: a queue of single dense queries and calls, answered in rounds.

    Args:
        current: returns the live snapshot (``.searcher``, ``.version``) or raises (e.g. not ready).
        batch_size: the histogram that records how many queries each coalesced model call answered.
        max_batch: most single queries one coalesced call answers.
        threads: model threads.
        batch_window: seconds a round waits for more queries after its first (0: only those waiting).
    """

    def __init__(self, *, current: Callable[[], Any], batch_size: Any, max_batch: int, threads: int,
                 batch_window: float) -> None:
        self._current = current
        self._batch_size = batch_size
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.queue: queue.SimpleQueue[_Job | _Call | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"dssm-model-{i}", daemon=True)
                         for i in range(threads)]
        self._started = False
        self._lock = threading.Lock()
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}

    def _ensure_started(self) -> None:
        if self._started:
            return
        with self._lock:
            if not self._started:
                for thread in self._threads:
                    thread.start()
                self._started = True

    def stop(self) -> None:
        """Answer what is queued, stop the threads, and make fresh ones for a later start."""
        with self._lock:
            if self._started:
                for _ in self._threads:
                    self.queue.put(None)
                for thread in self._threads:
                    thread.join(timeout=30)
                self._threads = [threading.Thread(target=self._loop, name=t.name, daemon=True)
                                 for t in self._threads]
                self._started = False

    def submit(self, query: str, k: int) -> Future:
        """Queue one dense query; never blocks. Returns a future of ``(version, hits)``."""
        self._ensure_started()
        future: Future = Future()
        self.queue.put(_Job(query, k, future, None))
        return future

    async def submit_async(self, query: str, k: int) -> tuple[str, list[Any]]:
        """:meth:`submit` for asyncio callers: the answer comes back through the caller's loop's mailbox."""
        self._ensure_started()
        box = self._mailbox()
        future = box.loop.create_future()
        self.queue.put(_Job(query, k, future, box))
        return await future

    async def call_async(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the model thread (in turn with the coalesced queries) and await it."""
        self._ensure_started()
        box = self._mailbox()
        future = box.loop.create_future()
        self.queue.put(_Call(functools.partial(fn, *args, **kwargs), future, box))
        return await future

    def _mailbox(self) -> _Mailbox:
        loop = asyncio.get_running_loop()
        box = self._mailboxes.get(loop)
        if box is None:
            with self._lock:
                box = self._mailboxes.get(loop)
                if box is None:
                    box = self._mailboxes[loop] = _Mailbox(loop)
        return box

    def close_mailboxes(self) -> None:
        """Release the pipes of the mailbox of the running loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            box = self._mailboxes.pop(loop, None)
        if box is not None:
            box.close()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            jobs: list[_Job] = []
            calls: list[_Call] = []
            (calls if isinstance(item, _Call) else jobs).append(item)
            stop = False
            deadline = time.perf_counter() + self.batch_window if self.batch_window else None
            # Everything already waiting joins this round; with a window, also what arrives within it.
            while len(jobs) < self.max_batch:
                try:
                    if deadline is None:
                        more = self.queue.get_nowait()
                    else:
                        left = deadline - time.perf_counter()
                        more = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # shutting down: answer what we hold, then stop
                    stop = True
                    break
                (calls if isinstance(more, _Call) else jobs).append(more)
            if jobs:
                self._answer(jobs)
            for call in calls:
                self._run_call(call)
            if stop:
                return

    @staticmethod
    def _run_call(call: _Call) -> None:
        if call.future.done():  # the caller went away
            return
        try:
            _settle([(call.future, call.box, call.fn(), None)])
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            _settle([(call.future, call.box, None, exc)])

    def _answer(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if (j.future.set_running_or_notify_cancel() if j.box is None else not j.future.done())]
        if not live:
            return
        try:
            snap = self._current()
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            _settle([(j.future, j.box, None, exc) for j in live])
            return
        by_k: dict[int, list[_Job]] = {}
        for job in live:
            by_k.setdefault(job.k, []).append(job)
        outcomes: list[tuple[Any, Any, Any, BaseException | None]] = []
        for k, group in by_k.items():
            self._batch_size.observe(len(group))
            try:
                dense = search_options(snap.searcher, "dense", 0)  # this thread answers dense queries only
                if len(group) == 1:
                    results: list[Any] = [snap.searcher.search(group[0].query, k=k, **dense)]
                else:
                    results = snap.searcher.search_batch([j.query for j in group], k=k, **dense)
            except Exception as exc:  # noqa: BLE001 - alone, each query gets its own answer or error
                if len(group) == 1:
                    results = [exc]
                else:
                    results = []
                    for job in group:
                        try:
                            results.append(snap.searcher.search(job.query, k=k, **dense))
                        except Exception as single:  # noqa: BLE001
                            results.append(single)
            for job, hits in zip(group, results, strict=True):
                if isinstance(hits, Exception):
                    outcomes.append((job.future, job.box, None, hits))
                else:
                    outcomes.append((job.future, job.box, (snap.version, hits), None))
        _settle(outcomes)
