"""What a sender's four parties share: the queue, the outbox, the wake-ups, the flags.

Four parties touch one client's sender: the calling thread (``accept``,
``flush``), the writer thread (``_delivery.writer``), the poster thread
(``_delivery.poster``) and the interpreter's exit hook (``Sender.begin_exit``).
Everything they share is in one ``SenderState``, each field saying who writes
it, so nothing crosses between them that this module does not name.

Fields are replaced whole (a flag, a number, a reference), so a reader sees the
old value or the new one, never a mix; the locks guard the few changes that
span two values. ``accept`` lives here, not on ``Sender``, because it is the hot
path: one attribute look-up fewer for every event.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Tuple, Union

from .._encode.pipeline import RawEvent
from .._log import logger
from .outbox import MAX_SIGNALS, Outbox
from .retry import RetryPolicy


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

    The writer and poster threads write most counts. ``drop`` may be called from any thread
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


class FlushMarker:
    """Placed in the queue by ``flush``; resolved once everything before it is delivered."""

    __slots__ = ("done", "ok", "upto")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.upto = 0  # the last outbox row written before the marker was reached


Item = Union[RawEvent, FlushMarker]


class SenderState:
    """The state one client's caller, writer, poster and exit hook share (see the module)."""

    def __init__(self, *, encode: Callable[[List[RawEvent]], Optional[Encoded]],
                 target: Callable[[], Optional[Target]], open_outbox: Callable[[], Outbox],
                 on_fork: Callable[[RawEvent], None], counters: Counters, batch_size: int,
                 flush_interval: float, max_queue: int, timeout: float, backoff: float) -> None:
        # What the client gives: called on the threads, never on the caller's.
        self.encode = encode
        self.target = target
        self.open_outbox = open_outbox
        self.on_fork = on_fork
        self.counters = counters
        self.policy = RetryPolicy(backoff)  # when to try again; the circuit (the poster's)
        self.retune(batch_size=batch_size, flush_interval=flush_interval, max_queue=max_queue,
                    timeout=timeout, backoff=backoff)
        self.pid = os.getpid()
        # The queue: the caller appends; the writer, or the exit hook, takes.
        self.queue: Deque[Item] = collections.deque()
        self.take_lock = threading.Lock()  # the writer and the exit hook both take from the queue
        self.armed = False  # the writer was told there is work
        self.hurried = False  # the writer was told a batch is full
        self.flush_requested = False
        self.markers_queued = 0  # flush markers in the queue, so ``pending`` needs no scan
        # Wake-ups.
        self.wake = threading.Event()  # the writer's: work was queued
        self.post_wake = threading.Event()  # the poster's: rows were written, or a flush waits
        self.progress = threading.Event()  # the poster delivered (or refused) a batch
        # The outbox: the writer opens it; the exit hook opens one if the writer has not.
        self.outbox: Optional[Outbox] = None
        self.outbox_ready = threading.Event()
        self.exit_outbox: Optional[Outbox] = None
        self.book_lock = threading.Lock()  # an outbox change and its count change together
        self.last_added = 0  # the last row the writer added
        self.overfull = False  # the outbox takes everything, dropping its oldest, until the
        # poster makes progress (see ``Writer._wait_for_poster``)
        self.cannot_send = False  # the poster's last pass found it may not send for now
        # Flushes: reached by the writer, answered by the poster.
        self.markers: List[FlushMarker] = []
        self.marker_lock = threading.Lock()
        self.lost = False  # something was dropped since the last flush was answered
        # The end: set by ``stop``, ``begin_exit`` or ``bound``.
        self.stopping = False
        self.exiting = False  # the interpreter is ending: a request cut short may be resent
        self.deadline: Optional[float] = None  # monotonic
        self.bounded = False  # a deadline bounds every request (a delivery process)
        self.eager = False  # set up and send now, without the setup delay
        # The user's wishes, set by the client or the command line.
        self.holding = False  # send nothing in this process (the run that showed the notice)
        self.retry_now = False  # the user asked to send now: the next pass ignores other
        # processes' backoff (``kaibantrace flush``); the poster clears it as the pass starts
        self._logged: set[str] = set()

    def retune(self, *, batch_size: int, flush_interval: float, max_queue: int, timeout: float,
               backoff: float) -> None:
        """Take new sender settings, also while running.

        Each number is read where it is used (a batch's size at the claim, the
        interval at the wait, the timeout at the request), so a new value
        applies from the next one; each is replaced whole, so the threads see
        the old value or the new, never a mix. A backoff already grown after
        failures runs out as it was.
        """
        self.batch_size = batch_size
        self.interval = flush_interval
        self.max_queue = max_queue
        self.timeout = timeout
        self.policy.retune(backoff)

    def accept(self, raw: RawEvent) -> None:
        """Queue one event (the caller's thread). Never blocks, never raises."""
        if os.getpid() != self.pid:  # forked without the at-fork hook (a fork from C)
            self.on_fork(raw)
            return
        queue = self.queue
        if self.stopping or len(queue) >= self.max_queue:
            self.counters.drop("stopped" if self.stopping else "queue_full")
            self.lost = True
            return
        queue.append(raw)
        # Wake the writer once when work arrives and once when a batch fills;
        # Event.set() costs more than the rest of this method, so never more.
        if not self.armed:
            self.armed = True
            self.wake.set()
        elif not self.hurried and len(queue) >= self.batch_size:
            self.hurried = True
            self.wake.set()

    def queue_marker(self) -> FlushMarker:
        """Put a flush marker in the queue and wake both threads; the caller waits on it."""
        marker = FlushMarker()
        self.flush_requested = True
        self.post_wake.set()  # a poster still waiting to set up starts now
        with self.marker_lock:
            self.markers_queued += 1
            self.queue.append(marker)
        self.armed = True
        self.wake.set()
        return marker

    def wake_all(self) -> None:
        self.wake.set()
        self.post_wake.set()
        self.progress.set()

    def outbox_room(self) -> int:
        """Signals the outbox takes before it drops its oldest, by its own bound."""
        outbox = self.outbox
        return (MAX_SIGNALS if outbox is None else outbox.max_signals) - self.counters.in_outbox

    def lose(self, count: int, cause: str) -> None:
        if count:
            self.counters.drop(cause, count)
            self.lost = True

    def log_once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message)
