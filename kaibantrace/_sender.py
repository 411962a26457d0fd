"""The background sender: a bounded queue drained by one daemon thread.

The calling thread only appends to a ``deque`` and, when the queue goes from
idle to busy or a batch fills up, sets an ``Event``. It never blocks, never
waits on the network and never raises. The worker sleeps until woken, gives a
batch ``flush_interval`` seconds to fill, then encodes and posts it.

Failures follow TelemetryDeck's SDKs with one difference that matters on
blocked networks: after three failed attempts in a row the circuit opens and
this process stops touching the network for good, instead of retrying
forever. What could not be delivered is dropped and counted.

What this module does not do: decide opt-out, validate or encode events (the
client passes an ``encode`` function), or survive the process (a later release
adds a durable outbox).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from typing import Callable, Deque, Dict, Optional, Tuple, Union

from ._pipeline import RawEvent
from ._transport import Outcome, Result, Transport

logger = logging.getLogger("kaibantrace")

# What ``encode`` returns for a batch: (url, body, signal count), or ``None``
# when the batch must not be sent (the client counted why).
Prepared = Optional[Tuple[str, bytes, int]]

FAILURES_BEFORE_CIRCUIT_OPENS = 3
_BACKOFF_MAX = 300.0


class Counters:
    """What happened to the events a client accepted; read with ``snapshot()``.

    ``taken``, ``sent``, ``retried`` and ``requests`` are written by the worker
    alone. ``drop`` may be called from any thread (rarely: overflow, debug), so
    it takes a lock and the counts stay exact under contention.
    """

    def __init__(self) -> None:
        self.taken = 0
        self.sent = 0
        self.retried = 0
        self.requests = 0
        self.dropped: Dict[str, int] = collections.defaultdict(int)
        self._lock = threading.RLock()  # reentrant, for events emitted from signal handlers

    def drop(self, cause: str, count: int = 1) -> None:
        with self._lock:
            self.dropped[cause] += count

    def snapshot(self, pending: int = 0, in_flight: int = 0) -> Dict[str, object]:
        with self._lock:
            dropped = dict(self.dropped)
        return {
            "queued": self.taken + pending,
            "pending": pending,
            "in_flight": in_flight,
            "sent": self.sent,
            "retried": self.retried,
            "requests": self.requests,
            "dropped": dropped,
        }


class _FlushMarker:
    """Placed in the queue by ``flush``; resolved once everything before it is handled."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


Item = Union[RawEvent, _FlushMarker]


class Sender:
    """One worker thread and its queue, for one client."""

    def __init__(self, *, encode: Callable[[list[RawEvent]], Prepared],
                 still_wanted: Callable[[], bool], transport: Transport,
                 counters: Counters, batch_size: int, flush_interval: float, max_queue: int,
                 timeout: float, backoff: float) -> None:
        self._encode = encode
        self._still_wanted = still_wanted
        self.transport = transport
        self._counters = counters
        self._batch_size = batch_size
        self._interval = flush_interval
        self._max_queue = max_queue
        self._timeout = timeout
        self._backoff = backoff
        self._queue: Deque[Item] = collections.deque()
        self._wake = threading.Event()  # new work, a full batch, a flush, or stop
        self._urgent = threading.Event()  # only a flush or stop: ends a retry backoff early
        self._stop_signal = threading.Event()  # only stop: ends even a Retry-After wait
        self._armed = False  # the worker was told there is work
        self._hurried = False  # the worker was told a batch is full
        self._flush_requested = False
        self._in_flight = 0
        self._stopping = False
        self._deadline: Optional[float] = None
        self._failures = 0
        self._circuit_open = False
        self._lost_since_marker = False
        self._logged: set[str] = set()
        self._thread: Optional[threading.Thread] = None

    # -- the calling thread ------------------------------------------------

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
        queue = self._queue
        if self._stopping or len(queue) >= self._max_queue:
            self._counters.drop("stopped" if self._stopping else "queue_full")
            self._lost_since_marker = True
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
        """Wait until everything queued before now is handled; ``True`` if all was delivered."""
        if self._thread is None or not self._thread.is_alive():
            return not self._queue
        marker = _FlushMarker()
        self._flush_requested = True
        self._queue.append(marker)
        self._armed = True
        self._wake.set()
        self._urgent.set()
        return marker.done.wait(timeout) and marker.ok

    def stop(self, deadline: float) -> None:
        """Ask the worker to send what is queued by ``deadline`` (monotonic) and end."""
        self._deadline = deadline
        self._stopping = True
        self._wake.set()
        self._urgent.set()
        self._stop_signal.set()

    def join(self, deadline: float) -> bool:
        """Wait for the worker to end, at most until ``deadline``; ``True`` if it did."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()

    @property
    def pending(self) -> int:
        """Events queued and not yet taken by the worker."""
        items = list(self._queue)  # one C-level copy: safe while other threads append and pop
        return sum(1 for item in items if not isinstance(item, _FlushMarker))

    @property
    def in_flight(self) -> int:
        """Events in the request being sent right now."""
        return self._in_flight

    # -- the worker thread -------------------------------------------------

    def _sleep(self, timeout: Optional[float]) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def _run(self) -> None:
        try:
            while True:
                if not self._queue and not self._stopping:
                    self._sleep(None)
                if self._stopping:
                    self._drain(exiting=True)
                    return
                if len(self._queue) < self._batch_size and not self._flush_requested:
                    self._sleep(self._interval)
                self._drain()
        except BaseException:  # the host must never see this thread's trouble
            logger.debug("kaibantrace: sender stopped unexpectedly", exc_info=True)
        finally:
            self._release_markers()

    def _take_batch(self) -> Tuple[list[RawEvent], Optional[_FlushMarker]]:
        """Up to one batch of events, stopping early at a flush marker."""
        batch: list[RawEvent] = []
        queue = self._queue
        while queue and len(batch) < self._batch_size:
            item = queue.popleft()
            if isinstance(item, _FlushMarker):
                self._counters.taken += len(batch)
                return batch, item
            batch.append(item)
        self._counters.taken += len(batch)
        return batch, None

    def _drain(self, exiting: bool = False) -> None:
        """Send everything queued; stop early if asked to stop, unless already exiting."""
        self._armed = False
        self._hurried = False
        self._flush_requested = False
        while self._queue and (exiting or not self._stopping):
            batch, marker = self._take_batch()
            if batch:
                try:
                    self._deliver(batch)
                except Exception:  # a bug of ours must cost one batch, not the sender
                    logger.debug("kaibantrace: a batch failed unexpectedly", exc_info=True)
                    self._lose(len(batch), "internal_error")
            if marker is not None:
                self._resolve(marker)

    def _resolve(self, marker: _FlushMarker) -> None:
        marker.ok = not self._lost_since_marker
        self._lost_since_marker = False
        marker.done.set()
        if not self._flush_requested:
            self._urgent.clear()  # no flush waits any more: backoffs run their full length

    def _release_markers(self) -> None:
        for item in list(self._queue):
            if isinstance(item, _FlushMarker):
                item.done.set()

    def _remaining(self) -> Optional[float]:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _deliver(self, batch: list[RawEvent]) -> None:
        if self._circuit_open:
            self._lose(len(batch), "circuit_open")
            return
        try:
            prepared = self._encode(batch)
        except Exception:
            logger.debug("kaibantrace: could not encode a batch", exc_info=True)
            prepared = None
            self._counters.drop("encode_error", len(batch))
        if prepared is None:
            self._lost_since_marker = True
            return
        url, body, count = prepared
        if count < len(batch):  # the encoder refused some (counted there)
            self._lost_since_marker = True
        backoff = self._backoff
        while True:
            remaining = self._remaining()
            if remaining is not None and remaining < 0.05:
                self._lose(count, "exit_deadline")
                return
            if not self._still_wanted():  # opted out while this batch waited
                self._lose(count, "opted_out")
                return
            timeout = self._timeout if remaining is None else min(self._timeout, remaining)
            self._counters.requests += 1
            self._in_flight = count
            try:
                outcome = self.transport.send(url, body, timeout)
            except Exception as exc:  # a custom transport may raise; treat it as the network
                outcome = Outcome(Result.RETRY, type(exc).__name__)
            finally:
                self._in_flight = 0
            if outcome.result is Result.SENT:
                self._failures = 0
                self._counters.sent += count
                return
            if outcome.result is Result.REJECTED:
                self._failures = 0
                self._log_once("rejected", "kaibantrace: the ingest service refused a batch "
                               f"({outcome.detail}); dropped, not retried")
                self._lose(count, "rejected")
                return
            self._failures += 1
            if self._failures >= FAILURES_BEFORE_CIRCUIT_OPENS or self._stopping:
                if not self._stopping:
                    self._circuit_open = True
                    self._log_once("circuit", "kaibantrace: ingest unreachable "
                                   f"({outcome.detail}); not sending again in this process")
                self._lose(count, "unreachable")
                return
            self._counters.retried += 1
            # The server's Retry-After is a floor that only stopping may cut short;
            # our own backoff (with jitter) above it ends early for a flush too.
            # New events never shorten either.
            floor = min(outcome.retry_after or 0.0, _BACKOFF_MAX)
            delay = min(max(backoff, floor), _BACKOFF_MAX) * random.uniform(1.0, 1.25)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            if floor:
                self._stop_signal.wait(floor)
            self._urgent.wait(delay - floor)
            self._urgent.clear()

    def _lose(self, count: int, cause: str) -> None:
        self._counters.drop(cause, count)
        self._lost_since_marker = True

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message)
