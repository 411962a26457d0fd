"""The sender of a browser page (Pyodide): no thread, no file, the host's ``fetch``.

A page cannot start a thread, and what it keeps dies with it, so this sender
keeps its queue in memory (bounded by ``max_queue``) and schedules a send on the
running event loop ``flush_interval`` seconds after the first event of a batch.
Each batch goes out with the host's ``fetch``, with ``keepalive`` so a request
may finish after the page is closed. A request that fails or is refused never
raises into the page (an unhandled rejection is the defect not to copy): its
answer is mapped as the HTTP transport maps one (``transport.outcome_for_status``),
counted, and retried by the same ``retry.RetryPolicy`` as everywhere else. Once
that policy gives up (failures in a row, or ``410 Gone``) the page sends no more,
and, having nowhere to keep events for later, drops what waits and what comes,
counted as ``unreachable`` or ``retired``.

``await aflush(timeout)`` sends what is queued now and waits for it; ``flush()``
cannot wait in a page, so it starts the send and answers whether all was
already delivered.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from .._encode.pipeline import RawEvent
from .._log import logger
from .retry import RetryPolicy
from .shared import Counters, Encoded, Target
from .transport import Outcome, Result, outcome_for_status

Batch = Tuple[str, str, List[str]]  # app ID, URL, signal texts: encoded, waiting for a request

KEEPALIVE_BODY_LIMIT = 60_000
"""Bytes of JSON per request at most. Browsers refuse a ``keepalive`` request once the
bodies of those in flight pass 64 KiB (Chromium fails it as a network error), so a
batch of large signals goes out in several requests (one at a time) rather than never."""


class _NoTransport:
    """What ``Delivery.stop`` closes: a page has no connection of its own to close."""

    def close(self) -> None:
        pass


class _NoProcess:
    """What a process's sender also offers, for its exit and its bound: a page has
    neither, so these do nothing."""

    def bound(self, deadline: float) -> None:
        pass

    def begin_exit(self, deadline: float) -> None:
        pass

    def join(self, deadline: float) -> bool:
        return True

    def settle_at_exit(self, grace: float = 0.0) -> None:
        pass


class PageSender(_NoProcess):
    """A client's queue and sends in a page (see the module docstring)."""

    transport = _NoTransport()

    def __init__(self, *, encode: Callable[[List[RawEvent]], Optional[Encoded]],
                 target: Callable[[], Optional[Target]], counters: Counters, batch_size: int,
                 flush_interval: float, max_queue: int, timeout: float, backoff: float) -> None:
        self._encode = encode
        self._target = target
        self._counters = counters
        self._queue: Deque[RawEvent] = collections.deque()
        # Encoded and waiting: to retry, or the rest of a batch too large for one request.
        # ``counters.taken`` counts what is in neither this nor the queue.
        self._batches: Deque[Batch] = collections.deque()
        self._policy = RetryPolicy(backoff)
        self._timer: Any = None  # the loop's handle of the next scheduled send
        self.retune(batch_size=batch_size, flush_interval=flush_interval, max_queue=max_queue,
                    timeout=timeout, backoff=backoff)
        self._task: Optional[asyncio.Future[None]] = None
        self._lost = False
        self._stopped = False
        self._gave_up = ""  # why this page stopped sending for good, once it did
        self.holding = False
        self.in_flight = 0
        self.passes = 0
        self.last_problem = ""
        self.outbox = None
        self.shared_floor = 0.0

    def retune(self, *, batch_size: int, flush_interval: float, max_queue: int, timeout: float,
               backoff: float) -> None:
        """New settings (``configure``); a send scheduled by the old interval is scheduled
        again by the new one (a retry keeps its wait)."""
        interval_changed = getattr(self, "_interval", flush_interval) != flush_interval
        self._batch_size = batch_size
        self._interval = flush_interval
        self._max_queue = max_queue
        self._timeout = timeout
        self._policy.retune(backoff)
        if interval_changed and self._timer is not None and not self._batches:
            self._timer.cancel()
            self._schedule(flush_interval)

    def start(self) -> bool:
        return True

    @property
    def circuit_open(self) -> bool:
        return self._policy.circuit_open

    @property
    def pending(self) -> int:
        return len(self._queue) + sum(len(batch[2]) for batch in self._batches)

    def accept(self, raw: RawEvent) -> None:
        """Queue one event and make sure a send is scheduled. Never raises."""
        if self._stopped or len(self._queue) >= self._max_queue or self._policy.circuit_open:
            self._counters.drop("stopped" if self._stopped else self._gave_up or "queue_full")
            self._lost = True
            return
        self._queue.append(raw)
        if (self._timer is None and self._task is None and not self._policy.circuit_open
                and not self.holding):
            self._schedule(self._interval)

    def _schedule(self, delay: float) -> None:
        try:
            loop = asyncio.get_event_loop()
            self._timer = loop.call_later(max(delay, 0.0), self._send_soon)
        except Exception:  # no loop in this host: the events wait for aflush()
            logger.debug("kaibantrace: could not schedule a send in this page", exc_info=True)

    def _send_soon(self) -> None:
        self._timer = None
        if self._task is None:
            try:
                self._task = asyncio.ensure_future(self._send_all())
            except Exception:  # no loop in this host: the events wait for aflush()
                logger.debug("kaibantrace: could not start a send in this page", exc_info=True)

    async def _send_all(self) -> None:
        """Send every queued batch, one request at a time; on a failure, wait as the retry
        policy says (the next send is scheduled), never raising into the page."""
        retry_in: Optional[float] = None
        try:
            while not self._policy.circuit_open and not self.holding:
                batch = self._next_batch()
                if batch is None:
                    break
                if not await self._post(batch):
                    self._batches.appendleft(batch)
                    self._counters.taken -= len(batch[2])  # waiting again
                    if not self._policy.circuit_open:
                        retry_in = max(self._policy.next_attempt() - time.monotonic(), 0.0)
                    break
        except Exception:
            logger.debug("kaibantrace: sending from the page failed", exc_info=True)
        finally:
            self.passes += 1
            self._task = None
        if self._policy.circuit_open:
            self._give_up()
        if retry_in is not None:
            self._schedule(retry_in)
        elif (self._queue and self._timer is None and not self._policy.circuit_open
              and not self.holding):  # stopped for good: no timer that would find nothing to do
            self._schedule(self._interval)

    def _next_batch(self) -> Optional[Batch]:
        """The next batch to post: one waiting for a retry, else the queue's next, encoded
        now (deciding again: an opt-out since the event drops it unsent)."""
        while self._batches or self._queue:
            if self._batches:
                app_id, url, texts = self._batches.popleft()
                self._counters.taken += len(texts)
            else:
                raws = [self._queue.popleft()
                        for _ in range(min(self._batch_size, len(self._queue)))]
                self._counters.taken += len(raws)
                encoded = self._encode(raws)
                if encoded is None or not encoded.signals:
                    self._lost = True
                    continue
                app_id, url = encoded.app_id, encoded.url
                texts, *rest = _within_keepalive_limit([t for _, t in encoded.signals])
                for more in reversed(rest):  # next, before anything else waiting
                    self._batches.appendleft((app_id, url, more))
                    self._counters.taken -= len(more)
            target = self._target()
            if target is None or not target.wanted:
                self._counters.drop("opted_out", len(texts))
                self._lost = True
                continue
            return app_id, url, texts
        return None

    def _give_up(self) -> None:
        """The page will send no more (the endpoint failed again and again, or is retired):
        what waits is dropped now and counted, as is every later event, rather than kept in
        memory until the page closes."""
        self._gave_up = self._gave_up or "unreachable"
        waiting = self.pending
        self._queue.clear()
        self._batches.clear()
        if waiting:
            self._counters.taken += waiting  # accepted, and gone now
            self._counters.drop(self._gave_up, waiting)
            self._lost = True

    async def _post(self, batch: Batch) -> bool:
        """Post one batch; ``True`` once it needs no more sending (sent, or refused)."""
        _, url, texts = batch
        body = "[" + ",".join(texts) + "]"
        self._counters.requests += 1
        self.in_flight = len(texts)
        try:
            outcome = await _fetch(url, body, self._timeout)
        finally:
            self.in_flight = 0
        if outcome.result is Result.SENT:
            self._counters.sent += len(texts)
            self._policy.succeeded()
            return True
        if outcome.result is Result.REJECTED:
            self._policy.rejected()
            self._counters.drop("rejected", len(texts))
            self._lost = True
            return True
        if outcome.result is Result.RETIRED:
            self._policy.retired()
            self._gave_up = "retired"
            self._counters.drop("retired", len(texts))
            self._lost = True
            return True
        self.last_problem = outcome.detail
        if self._policy.failed(time.monotonic(), outcome.retry_after):
            self._counters.retried += 1
        else:
            logger.warning("kaibantrace: ingest unreachable (%s); not sending again from this "
                           "page", outcome.detail)
        return False

    async def aflush(self, timeout: float) -> bool:
        """Send what is queued now and wait for it, up to ``timeout`` seconds; ``True`` when
        everything accepted since the last flush was delivered. As a process's flush does,
        it cuts our own backoff short but keeps to the server's ``Retry-After``: it waits for
        that when the timeout allows, and otherwise leaves the retry as scheduled."""
        deadline = time.monotonic() + timeout
        while not self._policy.circuit_open and not self.holding:
            if self._task is None:
                if not (self._queue or self._batches):
                    break
                held = self._policy.floor_at - time.monotonic()
                if held > 0:
                    if held > deadline - time.monotonic():
                        break
                    await asyncio.sleep(held)
                    continue
                self._start_now()
            left = deadline - time.monotonic()
            if left <= 0 or self._task is None:
                break
            try:
                await asyncio.wait_for(asyncio.shield(self._task), left)
            except asyncio.TimeoutError:
                break
            if self._batches:  # a failure: the retry is scheduled, not awaited here
                break
        done = not (self._queue or self._batches or self.in_flight) and not self._lost
        self._lost = False
        return done

    def flush(self, timeout: float) -> bool:
        """A page cannot wait: start sending now (unless the server's ``Retry-After``
        holds), and answer whether nothing waits."""
        if ((self._queue or self._batches) and self._task is None
                and self._policy.past_floor(time.monotonic(), exiting=False)):
            self._start_now()
        done = not (self._queue or self._batches or self.in_flight) and not self._lost
        if done:
            self._lost = False
        return done

    def _start_now(self) -> None:
        """Send now instead of when the timer says."""
        if self._timer is not None:
            self._timer.cancel()
        self._send_soon()

    def stop(self, deadline: float) -> bool:
        """No more events. A page cannot wait, so what is queued is sent now, and retried as
        usual if it fails: ``False`` while anything is left to send (the client keeps the
        sender, so its ``stats()`` and ``flush()`` still see it)."""
        self._stopped = True
        self.flush(0.0)
        return not (self._queue or self._batches or self.in_flight)

    def poke(self, *, retry_now: bool = False) -> None:
        self.flush(0.0)

    def outbox_count(self) -> int:
        return self.pending


def _within_keepalive_limit(texts: List[str]) -> List[List[str]]:
    """``texts`` in runs whose JSON array stays within ``KEEPALIVE_BODY_LIMIT`` bytes (one
    signal, at most a few KiB, always fits)."""
    runs: List[List[str]] = [[]]
    size = 2  # the brackets
    for text in texts:
        length = len(text.encode("utf-8")) + 1  # and its comma
        if runs[-1] and size + length > KEEPALIVE_BODY_LIMIT:
            runs.append([])
            size = 2
        runs[-1].append(text)
        size += length
    return runs


async def _fetch(url: str, body: str, timeout: float) -> Outcome:
    """One POST with the host's ``fetch``, ``keepalive`` so it may outlive the page; every
    way it can end becomes an ``Outcome``, never an exception. A request that outlives
    ``timeout`` is aborted, so that it cannot still arrive beside its retry."""
    controller: Any = None
    try:
        import importlib

        js = importlib.import_module("js")
        ffi = importlib.import_module("pyodide.ffi")
        init: Dict[str, Any] = {"method": "POST", "body": body, "keepalive": True,
                                "headers": {"Content-Type": "application/json"}}
        if getattr(js, "AbortController", None) is not None:
            controller = js.AbortController.new()
            init["signal"] = controller.signal
        options = ffi.to_js(init, dict_converter=js.Object.fromEntries)
        response = await asyncio.wait_for(js.fetch(url, options), timeout)
        status = int(response.status)
        retry_after = response.headers.get("Retry-After")
        return outcome_for_status(status, None if retry_after is None else str(retry_after))
    except asyncio.TimeoutError:
        _abort(controller)
        return Outcome(Result.RETRY, "timed out")
    except Exception as exc:  # a refused request: fetch's TypeError, or anything else
        return Outcome(Result.RETRY, type(exc).__name__)


def _abort(controller: Any) -> None:
    try:
        if controller is not None:
            controller.abort()
    except Exception:
        logger.debug("kaibantrace: aborting a request failed", exc_info=True)
