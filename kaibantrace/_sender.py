"""The background sender: a bounded queue, one daemon thread, and the outbox.

The calling thread only appends to a ``deque`` and, when the queue goes from
idle to busy or a batch fills up, sets an ``Event``. It never blocks, never
touches a file or the network, and never raises.

The worker thread does the rest, in one loop:

1. it encodes what is queued and writes it to the outbox (``_outbox``) before
   anything is sent, so a killed process loses only what it had not yet
   written;
2. it claims a batch from the outbox (leftovers of earlier runs included),
   posts it, and deletes it after a 2xx, or drops it for good after a refusal
   (400, 401, 403, 404, 413, 422, 501, 505);
3. after any other answer it waits, with exponential backoff and jitter from
   ``backoff`` seconds up to 300, never less than ``Retry-After``; after three
   failed attempts in a row the circuit opens and this process never touches
   the network again: what is left stays in the outbox for a later run.

At interpreter exit the main thread itself writes what is still queued to the
outbox (the worker may be stuck in a request), then gives the worker what is
left of the exit budget to send; it never waits longer.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Tuple, Union

from ._fork import guard as fork_guard
from ._outbox import Added, MemoryOutbox, Outbox
from ._pipeline import RawEvent
from ._transport import Outcome, Result, Transport

logger = logging.getLogger("kaibantrace")

FAILURES_BEFORE_CIRCUIT_OPENS = 3
_BACKOFF_MAX = 300.0
_EXIT_SAVE_WAIT = 1.0  # at most this long for another writer's lock when saving at exit
_FIRST_REQUEST_AT_EXIT = 0.05  # budget left (s) for a request at exit when none was timed yet
_FLUSH_POLL = 0.02  # how often a waiting flush checks signals another process is sending


class Encoded(NamedTuple):
    """A batch ready for the outbox: where it goes, and ``(event time, signal JSON)`` pairs."""

    app_id: str
    url: str
    signals: List[Tuple[float, str]]


class Target(NamedTuple):
    """Where the client sends now: ``wanted`` is False once opted out; ``url`` is
    ``None`` when the configured endpoint is unusable (signals then wait)."""

    app_id: str
    url: Optional[str]
    wanted: bool


class Counters:
    """What happened to the events a client accepted; read with ``snapshot()``.

    The worker writes most counts. ``drop`` may be called from any thread
    (overflow, exit), so it takes a lock and stays exact under contention.
    """

    def __init__(self) -> None:
        self.taken = 0
        self.sent = 0
        self.retried = 0
        self.requests = 0
        self.in_outbox = 0
        self.dropped: Dict[str, int] = collections.defaultdict(int)
        self._lock = threading.RLock()  # reentrant, for events emitted from signal handlers

    def drop(self, cause: str, count: int = 1) -> None:
        if count:
            with self._lock:
                self.dropped[cause] += count

    def snapshot(self, pending: int = 0, in_flight: int = 0) -> Dict[str, object]:
        with self._lock:
            dropped = dict(self.dropped)
        return {
            "queued": self.taken + pending,
            "pending": pending,
            "in_flight": in_flight,
            "in_outbox": self.in_outbox,
            "sent": self.sent,
            "retried": self.retried,
            "requests": self.requests,
            "dropped": dropped,
        }


class _FlushMarker:
    """Placed in the queue by ``flush``; resolved once everything before it is delivered."""

    __slots__ = ("done", "ok", "upto")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.upto = 0  # the last outbox row written before the marker was reached


Item = Union[RawEvent, _FlushMarker]


class Sender:
    """One worker thread, its queue and its outbox, for one client."""

    def __init__(self, *, encode: Callable[[List[RawEvent]], Optional[Encoded]],
                 target: Callable[[], Optional[Target]], open_outbox: Callable[[], Outbox],
                 on_fork: Callable[[RawEvent], None],
                 transport: Transport, counters: Counters, batch_size: int,
                 flush_interval: float, max_queue: int, timeout: float, backoff: float) -> None:
        self._encode = encode
        self._target = target
        self._open_outbox = open_outbox
        self._on_fork = on_fork
        self.transport = transport
        self._counters = counters
        self._batch_size = batch_size
        self._interval = flush_interval
        self._max_queue = max_queue
        self._timeout = timeout
        self._backoff_start = backoff
        self._pid = os.getpid()
        self._queue: Deque[Item] = collections.deque()
        self._take_lock = threading.Lock()  # the worker and the exit hook both take from the queue
        self._wake = threading.Event()
        self._armed = False  # the worker was told there is work
        self._hurried = False  # the worker was told a batch is full
        self._flush_requested = False
        self._stopping = False
        self._exiting = False  # the interpreter is ending: a request cut short may be resent
        self._deadline: Optional[float] = None
        self._outbox: Optional[Outbox] = None
        self._outbox_ready = threading.Event()
        self._ready_to_send = False  # the transport is prepared: a request could start now
        self._markers: List[_FlushMarker] = []
        self._last_added = 0
        self._failures = 0
        self._backoff = backoff
        self._retry_at = 0.0  # monotonic; our own backoff, which a flush may cut short
        self._floor_at = 0.0  # monotonic; the server's Retry-After, which nothing cuts short
        self._circuit_open = False
        self._lost = False  # something was dropped since the last flush was answered
        self._in_flight = 0
        self._latency: Optional[float] = None  # of the last request the server answered
        self._logged: set[str] = set()
        self._thread: Optional[threading.Thread] = None

    # -- any thread --------------------------------------------------------

    def start(self) -> bool:
        """Start the worker; ``False`` when no thread can be started (interpreter exit)."""
        thread = threading.Thread(target=self._run, name="kaibantrace-sender", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            return False
        self._thread = thread
        return True

    def accept(self, raw: RawEvent) -> None:
        """Queue one event. Never blocks, never raises."""
        if os.getpid() != self._pid:  # forked without the at-fork hook (a fork from C)
            self._on_fork(raw)
            return
        queue = self._queue
        if self._stopping or len(queue) >= self._max_queue:
            self._counters.drop("stopped" if self._stopping else "queue_full")
            self._lost = True
            return
        queue.append(raw)
        # Wake the worker once when work arrives and once when a batch fills;
        # Event.set() costs more than the rest of this method, so never more.
        if not self._armed:
            self._armed = True
            self._wake.set()
        elif not self._hurried and len(queue) >= self._batch_size:
            self._hurried = True
            self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued before now is delivered; ``True`` if it all was."""
        if self._thread is None or not self._thread.is_alive():
            return not self._queue
        marker = _FlushMarker()
        self._flush_requested = True
        self._queue.append(marker)
        self._armed = True
        self._wake.set()
        return marker.done.wait(timeout) and marker.ok

    def begin_exit(self, deadline: float) -> None:
        """At interpreter exit, on the main thread: save what is queued, let the worker send.

        Writing to the outbox comes first and happens here, because the worker
        may be blocked in a request to an endpoint that never answers. Then
        ``join`` gives the worker what is left of the budget.
        """
        self._deadline = deadline
        self._stopping = True
        self._exiting = True
        with self._take_lock:
            raws = [item for item in self._queue if not isinstance(item, _FlushMarker)]
            self._queue.clear()
            self._counters.taken += len(raws)
        if raws:
            target = self._target()
            if target is None or not target.wanted:
                self._lose(len(raws), "opted_out")
            else:
                # The worker opens the outbox as it starts; wait a moment for it
                # rather than race it to create the file.
                left = max(0.0, deadline - time.monotonic())
                ready = self._outbox_ready.wait(left / 2)
                outbox = self._outbox if ready else None
                self._persist(outbox or self._open_outbox(), raws, exiting=True)
        self._wake.set()

    def stop(self, deadline: float) -> bool:
        """Send what can be sent by ``deadline`` (monotonic), then end; ``True`` if it ended."""
        self._deadline = deadline
        self._stopping = True
        self._wake.set()
        return self.join(deadline)

    def join(self, deadline: float) -> bool:
        """Wait for the worker to end, at most until ``deadline``; ``True`` if it did.

        At exit there is no point waiting for a worker still setting up its HTTP
        stack: no request could start and finish in the budget anyway.
        """
        thread = self._thread
        if thread is None:
            return True
        if self._exiting and not self._ready_to_send:
            return not thread.is_alive()
        thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()

    @property
    def pending(self) -> int:
        """Events queued and not yet taken by the worker."""
        items = list(self._queue)  # one C-level copy: safe while other threads append and pop
        return sum(1 for item in items if not isinstance(item, _FlushMarker))

    @property
    def in_flight(self) -> int:
        """Signals in the request being sent right now."""
        return self._in_flight

    # -- the worker thread ----------------------------------------------------

    def _run(self) -> None:
        try:
            self._outbox = self._open_outbox()
        except Exception:
            logger.debug("kaibantrace: outbox unavailable; keeping signals in memory", exc_info=True)
            self._outbox = MemoryOutbox()
        self._outbox_ready.set()
        prepare = getattr(self.transport, "prepare", None)
        if prepare is not None:
            try:
                with fork_guard():  # a fork mid-import would leave the child a held import lock
                    prepare()  # import the HTTP stack now, not when the exit budget is running
            except Exception:
                logger.debug("kaibantrace: transport preparation failed", exc_info=True)
        self._ready_to_send = True
        try:
            while not self._stopping:
                self._cycle(self._outbox)
                if self._stopping:
                    break
                self._sleep(self._next_wake())
                if self._queue and len(self._queue) < self._batch_size and not (
                        self._flush_requested or self._stopping):
                    self._sleep(self._interval)  # let a batch fill up
            self._cycle(self._outbox)  # exiting: the exit hook saved the queue; send what fits
        except BaseException:  # the host must never see this thread's trouble
            logger.debug("kaibantrace: sender stopped unexpectedly", exc_info=True)
        finally:
            self._resolve_markers(force=True)

    def _sleep(self, timeout: Optional[float]) -> None:
        if timeout is None or timeout > 0:
            self._wake.wait(timeout)
        self._wake.clear()

    def _next_wake(self) -> Optional[float]:
        """Seconds until the worker has something to do unasked, or ``None`` to wait for work."""
        if self._queue or self._stopping:
            return 0
        if self._circuit_open or not self._counters.in_outbox:
            return None
        wait = max(self._retry_at, self._floor_at) - time.monotonic()
        if wait > 0:
            return wait
        # Out of backoff, what is left is leased by another process. A waiting
        # flush looks often, as that process may deliver our signals any moment;
        # otherwise look again when the lease expires.
        return _FLUSH_POLL if self._markers else self._timeout + 2.0

    def _cycle(self, outbox: Outbox) -> None:
        """Move the queue into the outbox batch by batch, sending as it goes, as far as allowed.

        Saving and sending alternate, so in healthy operation the outbox holds
        about one batch, and its bound only bites during an outage.
        """
        self._armed = False
        self._hurried = False
        self._flush_requested = False
        target = self._target()
        sending = target is not None and target.wanted and target.url is not None
        while True:
            with self._take_lock:
                raws, markers = self._take_batch()
            if raws and (target is None or not target.wanted):
                self._lose(len(raws), "opted_out" if target else "no_app_id")
            elif raws:
                self._persist(outbox, raws, exiting=False)
            for marker in markers:
                marker.upto = self._last_added
                self._markers.append(marker)
            if sending:
                assert target is not None
                sending = self._send_batch(outbox, target)
            if not raws and not markers:
                break
        target = self._target()  # again: the user may have opted out while we were busy
        if target is not None and not target.wanted:  # what waited is dropped unsent
            self._lose(outbox.drop_app(target.app_id), "opted_out")
            sending = False
        while sending:
            assert target is not None
            sending = self._send_batch(outbox, target)
        if target is not None and target.url is not None:
            self._counters.in_outbox = outbox.count(target.app_id, target.url)
        self._resolve_markers(force=False)

    def _take_batch(self) -> Tuple[List[RawEvent], List[_FlushMarker]]:
        raws: List[RawEvent] = []
        markers: List[_FlushMarker] = []
        queue = self._queue
        while queue and len(raws) < self._batch_size:
            item = queue.popleft()
            if isinstance(item, _FlushMarker):
                markers.append(item)
                break
            raws.append(item)
        self._counters.taken += len(raws)
        return raws, markers

    def _persist(self, outbox: Outbox, raws: List[RawEvent], *, exiting: bool) -> None:
        try:
            encoded = self._encode(raws)
        except Exception:
            logger.debug("kaibantrace: could not encode a batch", exc_info=True)
            encoded = None
            self._counters.drop("encode_error", len(raws))
        if encoded is None or not encoded.signals:
            self._lost = self._lost or encoded is None or len(raws) > 0
            return
        if len(encoded.signals) < len(raws):  # the encoder refused some (counted there)
            self._lost = True
        try:
            if exiting and hasattr(outbox, "set_busy_timeout"):
                # Saving what was accepted outranks the exit budget: wait for the
                # worker's write to finish rather than lose the queue.
                left = (self._deadline or 0) - time.monotonic()
                outbox.set_busy_timeout(max(left, _EXIT_SAVE_WAIT))
            added: Added = outbox.add(encoded.app_id, encoded.url, encoded.signals)
        except Exception:
            logger.debug("kaibantrace: could not write to the outbox", exc_info=True)
            self._lose(len(encoded.signals), "outbox_error")
            return
        if not exiting:
            self._last_added = added.last_id
        self._counters.in_outbox += len(encoded.signals) - added.full - added.expired
        self._lose(added.full, "outbox_full")
        self._lose(added.expired, "expired")

    def _send_batch(self, outbox: Outbox, target: Target) -> bool:
        """Claim and post one batch; ``True`` if there may be more to send right now."""
        assert target.url is not None
        if self._circuit_open or not self._may_try_now():
            return False
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        if remaining is not None and (remaining < 0.01 or (self._exiting and not self._fits(remaining))):
            return False
        timeout = self._timeout if remaining is None else min(self._timeout, remaining)
        rows = outbox.claim(target.app_id, target.url, self._batch_size, timeout + 2.0)
        if not rows:
            return False
        ids = [row.id for row in rows]
        body = ("[" + ",".join(row.body for row in rows) + "]").encode("utf-8")
        outcome = self._post(target.url, body, timeout, len(rows))
        if outcome.result is Result.SENT:
            outbox.delete(ids)
            self._counters.in_outbox -= len(rows)
            self._counters.sent += len(rows)
            self._failures, self._backoff = 0, self._backoff_start
        elif outcome.result is Result.REJECTED:
            outbox.delete(ids)
            self._counters.in_outbox -= len(rows)
            self._failures = 0
            self._log_once("rejected", "kaibantrace: the ingest service refused a batch "
                           f"({outcome.detail}); dropped, not retried")
            self._lose(len(rows), "rejected")
        else:
            outbox.release(ids)
            self._failed(outcome)
            return False
        return True

    def _fits(self, remaining: float) -> bool:
        """Whether a request can be answered within what is left of the exit budget.

        A request still in flight when the process ends may have reached the
        server, and its signals, not yet deleted, would then be sent twice.
        So at exit a request starts only when the last one took well under
        the time left.
        """
        if self._latency is None:  # nothing answered yet: try only with a good share left
            return remaining > _FIRST_REQUEST_AT_EXIT
        return remaining > 2 * self._latency + 0.005

    def _may_try_now(self) -> bool:
        now = time.monotonic()
        if now < self._floor_at and not self._stopping:
            return False
        # A waiting flush, or the exit, may cut our own backoff short.
        return now >= self._retry_at or bool(self._markers) or self._stopping

    def _post(self, url: str, body: bytes, timeout: float, count: int) -> Outcome:
        self._counters.requests += 1
        self._in_flight = count
        started = time.monotonic()
        try:
            outcome = self.transport.send(url, body, timeout)
        except Exception as exc:  # a custom transport may raise; treat it as the network
            outcome = Outcome(Result.RETRY, type(exc).__name__)
        finally:
            self._in_flight = 0
        if outcome.result is not Result.RETRY:
            self._latency = time.monotonic() - started
        return outcome

    def _failed(self, outcome: Outcome) -> None:
        self._failures += 1
        if self._failures >= FAILURES_BEFORE_CIRCUIT_OPENS:
            self._circuit_open = True
            self._log_once("circuit", f"kaibantrace: ingest unreachable ({outcome.detail}); not "
                           "sending again in this process, undelivered signals wait in the outbox")
            return
        self._counters.retried += 1
        now = time.monotonic()
        floor = min(outcome.retry_after or 0.0, _BACKOFF_MAX)
        self._floor_at = now + floor
        self._retry_at = now + min(max(self._backoff, floor), _BACKOFF_MAX) * random.uniform(1, 1.25)
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _resolve_markers(self, *, force: bool) -> None:
        """Answer the flushes whose events are all delivered, or can no longer be soon."""
        if not self._markers:
            return
        outbox = self._outbox
        target = self._target()
        give_up = force or self._circuit_open or target is None or not target.wanted
        still: List[_FlushMarker] = []
        for marker in self._markers:
            try:
                left = outbox.count_mine(marker.upto) if outbox is not None else 0
            except Exception:
                left = 1
            if left == 0 or give_up:
                marker.ok = left == 0 and not self._lost
                marker.done.set()
            else:
                still.append(marker)
        if len(still) < len(self._markers):
            self._lost = False
        self._markers = still

    def _lose(self, count: int, cause: str) -> None:
        if count:
            self._counters.drop(cause, count)
            self._lost = True

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message)

