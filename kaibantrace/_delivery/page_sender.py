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
already delivered. When the page is hidden or closed, what waits is sent at once,
in that very moment (``page_fetch.watch_hiding``): the page may not run again.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Callable, Deque, List, Optional, Tuple

from .._encode.pipeline import RawEvent
from .._log import logger
from .page_fetch import (
    Started,
    answer,
    begin,
    unwatch_hiding,
    watch_hiding,
    within_keepalive_limit,
)
from .retry import RetryPolicy
from .shared import Counters, Encoded, Target
from .transport import Result

Batch = Tuple[str, str, List[str]]  # app ID, URL, signal texts: encoded, waiting for a request


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


class _Waiting:
    """What a page's sender holds: events not yet encoded (the queue), and encoded batches
    waiting (a retry, or the rest of a batch too large for one request). The counters'
    ``taken`` counts what is in neither, so ``queued`` counts each event once."""

    def __init__(self, encode: Callable[[List[RawEvent]], Optional[Encoded]],
                 target: Callable[[], Optional[Target]], counters: Counters) -> None:
        self._encode = encode
        self._target = target
        self._counters = counters
        self.queue: Deque[RawEvent] = collections.deque()
        self.batches: Deque[Batch] = collections.deque()
        self.lost = False
        """Something accepted was not delivered since the last flush."""

    def __bool__(self) -> bool:
        return bool(self.queue or self.batches)

    def count(self) -> int:
        return len(self.queue) + sum(len(batch[2]) for batch in self.batches)

    def next_batch(self, batch_size: int) -> Optional[Batch]:
        """The next batch to post: one waiting, else the queue's next, encoded now
        (deciding again: an opt-out since the event drops it unsent)."""
        while self:
            if self.batches:
                app_id, url, texts = self.batches.popleft()
                self._counters.taken += len(texts)
            else:
                raws = [self.queue.popleft() for _ in range(min(batch_size, len(self.queue)))]
                self._counters.taken += len(raws)
                try:
                    encoded = self._encode(raws)
                except Exception:  # counted, as a process's writer counts it
                    logger.debug("kaibantrace: could not encode a batch", exc_info=True)
                    self._counters.drop("encode_error", len(raws))
                    encoded = None
                if encoded is None or len(encoded.signals) < len(raws):
                    self.lost = True  # the encoder refused some (counted there)
                if encoded is None or not encoded.signals:
                    continue
                app_id, url = encoded.app_id, encoded.url
                texts, *rest = within_keepalive_limit([t for _, t in encoded.signals])
                for more in reversed(rest):  # next, before anything else waiting
                    self.put_back((app_id, url, more))
            target = self._target()
            if target is None or not target.wanted:
                self._counters.drop("opted_out", len(texts))
                self.lost = True
                continue
            return app_id, url, texts
        return None

    def put_back(self, batch: Batch) -> None:
        """``batch`` waits again, first in line."""
        self.batches.appendleft(batch)
        self._counters.taken -= len(batch[2])

    def drop_all(self, cause: str) -> None:
        """Everything waiting is gone, counted as ``cause``."""
        waiting = self.count()
        self.queue.clear()
        self.batches.clear()
        if waiting:
            self._counters.taken += waiting  # accepted, and gone now
            self._counters.drop(cause, waiting)
            self.lost = True


class PageSender(_NoProcess):
    """A client's queue and sends in a page (see the module docstring)."""

    transport = _NoTransport()

    def __init__(self, *, encode: Callable[[List[RawEvent]], Optional[Encoded]],
                 target: Callable[[], Optional[Target]], counters: Counters, batch_size: int,
                 flush_interval: float, max_queue: int, timeout: float, backoff: float) -> None:
        self._counters = counters
        self._waiting = _Waiting(encode, target, counters)
        self._policy = RetryPolicy(backoff)
        self._timer: Any = None  # the loop's handle of the next scheduled send
        self._interval = flush_interval
        self.retune(batch_size=batch_size, flush_interval=flush_interval, max_queue=max_queue,
                    timeout=timeout, backoff=backoff)
        self._task: Optional[asyncio.Future[None]] = None
        self._stopped = False
        self._gave_up = ""  # why this page stopped sending for good, once it did
        self._hide_listener = watch_hiding(self.send_before_hiding)
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
        interval_changed = self._interval != flush_interval
        self._batch_size = batch_size
        self._interval = flush_interval
        self._max_queue = max_queue
        self._timeout = timeout
        self._policy.retune(backoff)
        if interval_changed and self._timer is not None and not self._waiting.batches:
            self._timer.cancel()
            self._schedule(flush_interval)

    def start(self) -> bool:
        """Nothing to start: a page's sends are scheduled on its own loop."""
        return True

    @property
    def circuit_open(self) -> bool:
        """Whether this page gave up sending for good."""
        return self._policy.circuit_open

    @property
    def pending(self) -> int:
        """Events and signals waiting to be sent."""
        return self._waiting.count()

    def accept(self, raw: RawEvent) -> None:
        """Queue one event and make sure a send is scheduled. Never raises."""
        waiting = self._waiting
        if self._stopped or len(waiting.queue) >= self._max_queue or self._policy.circuit_open:
            self._counters.drop("stopped" if self._stopped else self._gave_up or "queue_full")
            waiting.lost = True
            return
        waiting.queue.append(raw)
        self._schedule_if_idle()

    def _schedule_if_idle(self) -> None:
        """A send ``flush_interval`` from now, unless one is due or under way, or none may be."""
        if (self._timer is None and self._task is None and not self._policy.circuit_open
                and not self.holding):
            self._schedule(self._interval)

    def _schedule(self, delay: float) -> None:
        """A send ``delay`` seconds from now, on the page's loop."""
        try:
            loop = asyncio.get_event_loop()
            self._timer = loop.call_later(max(delay, 0.0), self._send_soon)
        except Exception:  # no loop in this host: the events wait for aflush()
            logger.debug("kaibantrace: could not schedule a send in this page", exc_info=True)

    def _send_soon(self, first: Optional[Tuple[Batch, Started]] = None) -> None:
        """Start sending (``first``: a request already made, to be awaited first)."""
        self._timer = None
        if self._task is None:
            try:
                self._task = asyncio.ensure_future(self._send_all(first))
            except Exception:  # no loop in this host: the events wait for aflush()
                logger.debug("kaibantrace: could not start a send in this page", exc_info=True)
                if first is not None:  # its answer cannot be awaited: it waits to be sent again
                    self.in_flight = 0
                    self._waiting.put_back(first[0])

    def send_before_hiding(self) -> None:
        """The page is being hidden or closed: make the next request now, in this very
        turn of the page, which may be its last (the rest follows if the page lives on)."""
        if (self._task is not None or self.holding or self._policy.circuit_open
                or not self._policy.past_floor(time.monotonic(), exiting=False)):
            return  # a request is on its way already (keepalive), or none may be made
        batch = self._waiting.next_batch(self._batch_size)
        if batch is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._send_soon((batch, self._begin(batch)))

    async def _send_all(self, first: Optional[Tuple[Batch, Started]] = None) -> None:
        """Send every waiting batch, one request at a time (``first``: one already made);
        on a failure, wait as the retry policy says (the next send is scheduled), never
        raising into the page."""
        retry_in: Optional[float] = None
        try:
            while True:
                if first is not None:  # made already: its answer is awaited whatever holds
                    batch, started = first
                    first = None
                else:
                    next_batch = None
                    if not self._policy.circuit_open and not self.holding:
                        next_batch = self._waiting.next_batch(self._batch_size)
                    if next_batch is None:
                        break
                    batch, started = next_batch, self._begin(next_batch)
                if not await self._post(batch, started):
                    self._waiting.put_back(batch)
                    if not self._policy.circuit_open:
                        retry_in = max(self._policy.next_attempt() - time.monotonic(), 0.0)
                    break
        except Exception:
            logger.debug("kaibantrace: sending from the page failed", exc_info=True)
        finally:
            self.passes += 1
            self._task = None
        if self._policy.circuit_open:
            # The page will send no more (failures in a row, or retired): what waits goes
            # now, counted, as does every later event, rather than kept until it closes.
            self._gave_up = self._gave_up or "unreachable"
            self._waiting.drop_all(self._gave_up)
        if retry_in is not None:
            self._schedule(retry_in)
        elif self._waiting.queue:  # events that came while this send was under way
            self._schedule_if_idle()

    def _begin(self, batch: Batch) -> Started:
        """Make the request for ``batch`` now."""
        _, url, texts = batch
        self._counters.requests += 1
        self.in_flight = len(texts)
        return begin(url, "[" + ",".join(texts) + "]")

    async def _post(self, batch: Batch, started: Started) -> bool:
        """Await the request made for ``batch``; ``True`` once it needs no more sending
        (sent, or refused)."""
        texts = batch[2]
        try:
            outcome = await answer(started, self._timeout)
        finally:
            self.in_flight = 0
        if outcome.result is Result.SENT:
            self._counters.sent += len(texts)
            self._policy.succeeded()
            return True
        if outcome.result in (Result.REJECTED, Result.RETIRED):
            if outcome.result is Result.REJECTED:
                self._policy.rejected()
                cause = "rejected"
            else:
                self._policy.retired()
                cause = self._gave_up = "retired"
            self._counters.drop(cause, len(texts))
            self._waiting.lost = True
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
        it cuts short a wait left by an earlier failure, but keeps to the server's
        ``Retry-After``: it waits for that when the timeout allows, and otherwise leaves the
        retry as scheduled. A failure during the call ends it (the retry follows on
        schedule)."""
        deadline = time.monotonic() + timeout
        while not self._policy.circuit_open and not self.holding:
            if self._task is None:
                if not self._waiting:
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
            if self._waiting.batches:  # a failure: the retry is scheduled, not awaited here
                break
        return self._answer_flush()

    def flush(self, timeout: float) -> bool:
        """A page cannot wait: start sending now (unless the server's ``Retry-After``
        holds), and answer whether everything accepted since the last flush was
        delivered already."""
        self._send_if_allowed()
        return self._answer_flush()

    def _send_if_allowed(self) -> None:
        """Start sending what waits now, unless a send is under way or the server's
        ``Retry-After`` holds."""
        if (self._waiting and self._task is None
                and self._policy.past_floor(time.monotonic(), exiting=False)):
            self._start_now()

    def _answer_flush(self) -> bool:
        """Whether everything accepted since the last flush was delivered; what was lost
        counts from here again."""
        done = not (self._waiting or self.in_flight or self._waiting.lost)
        self._waiting.lost = False
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
        self._send_if_allowed()
        unwatch_hiding(self._hide_listener)
        self._hide_listener = None
        return not (self._waiting or self.in_flight)

    def poke(self, *, retry_now: bool = False) -> None:
        """``send_waiting``: send what waits now (a page has no outbox of other processes)."""
        self._send_if_allowed()

    def outbox_count(self) -> int:
        """What waits: a page's queue stands for a process's outbox."""
        return self.pending
