"""The background sender: a bounded queue, two daemon threads, and the outbox.

The calling thread only appends to a ``deque`` and, when the queue goes from
idle to busy or a batch fills up, sets an ``Event``. It never blocks, never
touches a file or the network, and never raises.

Two threads do the rest, so that neither waits for the other:

* the *writer* encodes what is queued and writes it to the outbox
  (``_delivery.outbox``) in batches, before anything is sent, so a killed process loses
  only what it had not yet written. It never touches the network, so the queue
  keeps draining into the outbox while a request hangs: the in-memory queue is
  only a staging area, and overflows only when the host emits faster than
  signals can be encoded;
* the *poster* claims a batch from the outbox (leftovers of earlier runs
  included), posts it, and deletes it after a 2xx, or drops it for good after
  a refusal (400, 401, 403, 404, 413, 422, 501, 505). After any other answer it
  waits as ``retry.RetryPolicy`` decides: exponential backoff and jitter from
  ``backoff`` seconds up to 300, never less than ``Retry-After``; after three
  failed attempts in a row the circuit opens and this process never touches
  the network again: what is left stays in the outbox for a later run.

At interpreter exit the main thread itself writes what is still queued to the
outbox (the writer may be waiting for another process's lock), then gives the
poster what is left of the exit budget to send; it never waits longer.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Tuple, Union

from .._encode.pipeline import RawEvent
from .._fork import guard as fork_guard
from .._log import logger
from .fallback import FallbackOutbox
from .outbox import MAX_SIGNALS, Added, MemoryOutbox, Outbox, Row, row_problem
from .retry import RetryPolicy
from .transport import Outcome, Result, Transport

_FIRST_REQUEST_AT_EXIT = 0.05  # budget left (s) for a request at exit when none was timed yet
_SETUP_DELAY = 0.05  # the poster imports its HTTP stack only once the process has run this long
SETUP_DELAY_WITH_HAND_OFF = 1.0  # as long, when a delivery process will take what is left at exit
_WRITE_CHUNK = 5_000  # events the writer encodes and stores in one transaction, at most
_STALL_WAIT = 0.5  # seconds without progress after which the poster counts as stuck
_BATCHES_PER_CLAIM = 10  # requests one claim of the outbox may serve when there is a backlog
_FLUSH_POLL = 0.02  # how often a waiting flush checks signals another process is sending


# The standard modules the worker threads use, which their users import only when
# first needed so that ``import kaibantrace`` and opted-out processes stay light.
# The writer imports them all as it starts, under the fork guard: an import that
# a fork split would leave the child's next import of that module hanging.
_WORKER_MODULES = ("json", "sqlite3", "hashlib", "hmac", "random", "getpass", "socket",
                   "ipaddress", "urllib.parse")


def _load_worker_modules() -> None:
    import importlib

    for name in _WORKER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # e.g. a Python built without sqlite3: its user copes
            pass


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
    """The writer and poster threads, their queue and their outbox, for one client."""

    def __init__(self, *, encode: Callable[[List[RawEvent]], Optional[Encoded]],
                 target: Callable[[], Optional[Target]], open_outbox: Callable[[], Outbox],
                 on_fork: Callable[[RawEvent], None],
                 on_sent: Callable[[Target, List[Tuple[bytes, int]]], None],
                 on_retired: Callable[[Target], None],
                 transport: Transport, counters: Counters, batch_size: int,
                 flush_interval: float, max_queue: int, timeout: float, backoff: float,
                 setup_delay: Callable[[Outbox], float] = lambda outbox: _SETUP_DELAY) -> None:
        self._encode = encode
        self._target = target
        self._open_outbox = open_outbox
        self._on_fork = on_fork
        self._on_sent = on_sent
        self._on_retired = on_retired
        self.transport = transport
        self._counters = counters
        self._policy = RetryPolicy(backoff)  # when to try again; the circuit
        self.retune(batch_size=batch_size, flush_interval=flush_interval, max_queue=max_queue,
                    timeout=timeout, backoff=backoff)
        self._setup_delay = setup_delay
        self._eager = False  # set up and send now, without the setup delay
        self._pid = os.getpid()
        self._queue: Deque[Item] = collections.deque()
        self._take_lock = threading.Lock()  # the writer and the exit hook both take from the queue
        self._book_lock = threading.Lock()  # an outbox change and its count change together
        self._wake = threading.Event()  # the writer's: work was queued
        self._post_wake = threading.Event()  # the poster's: rows were written, or a flush waits
        self._progress = threading.Event()  # the poster delivered (or refused) a batch
        self._stalled = False  # the poster made no progress while the writer waited for it
        self._armed = False  # the writer was told there is work
        self._hurried = False  # the writer was told a batch is full
        self._flush_requested = False
        self._stopping = False
        self._exiting = False  # the interpreter is ending: a request cut short may be resent
        self._deadline: Optional[float] = None
        self._outbox: Optional[Outbox] = None
        self._outbox_ready = threading.Event()
        self._ready_to_send = False  # the transport is prepared: a request could start now
        self._markers: List[_FlushMarker] = []  # reached by the writer, answered by the poster
        self._marker_lock = threading.Lock()
        self._markers_queued = 0  # flush markers in the queue, so ``pending`` needs no scan
        self._last_added = 0
        self.holding = False  # send nothing in this process (the run that showed the notice)
        self.ignore_shared_backoff = False  # the user asked to send now (``kaibantrace flush``)
        self.passes = 0  # sending passes the poster finished (the command line waits for one)
        self.last_problem = ""  # how the last failed request ended, for the command line
        self._lost = False  # something was dropped since the last flush was answered
        self._in_flight = 0
        self._latency: Optional[float] = None  # of the last request the server answered
        self._claim_lock = threading.Lock()  # the poster's claim and the exit hook's settling
        self._settled = False  # the exit hook gave back this process's claim
        self._bounded = False  # a deadline bounds every request (a delivery process)
        self._exit_outbox: Optional[Outbox] = None  # opened by the exit hook, the writer not ready
        self._claimed: List[int] = []  # rows of the current claim not yet answered
        self._in_flight_ids: List[int] = []  # rows of the request being sent
        self._in_flight_started = 0.0  # monotonic; when that request started
        self._in_flight_until = 0.0  # monotonic; when that request times out
        self._shared_failures = 0  # failures in a row of every process, as last read
        self._shared_floor = 0.0  # wall clock; another process's backoff ends then
        self._logged: set[str] = set()
        self._writer: Optional[threading.Thread] = None
        self._poster: Optional[threading.Thread] = None

    # -- any thread --------------------------------------------------------

    def retune(self, *, batch_size: int, flush_interval: float, max_queue: int, timeout: float,
               backoff: float) -> None:
        """Take new sender settings, also while running.

        Each number is read where it is used (a batch's size at the claim, the
        interval at the wait, the timeout at the request), so a new value
        applies from the next one; each is replaced whole, so the threads see
        the old value or the new, never a mix. A backoff already grown after
        failures runs out as it was.
        """
        self._batch_size = batch_size
        self._interval = flush_interval
        self._max_queue = max_queue
        self._timeout = timeout
        self._policy.start = backoff

    def start(self) -> bool:
        """Start both threads; ``False`` when no thread can be started (interpreter exit)."""
        writer = threading.Thread(target=self._write_loop, name="kaibantrace-writer", daemon=True)
        poster = threading.Thread(target=self._post_loop, name="kaibantrace-poster", daemon=True)
        try:
            writer.start()
        except RuntimeError:
            return False
        self._writer = writer
        try:
            poster.start()
        except RuntimeError:  # the writer alone keeps signals for a later run
            return True
        self._poster = poster
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
        # Wake the writer once when work arrives and once when a batch fills;
        # Event.set() costs more than the rest of this method, so never more.
        if not self._armed:
            self._armed = True
            self._wake.set()
        elif not self._hurried and len(queue) >= self._batch_size:
            self._hurried = True
            self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued before now is delivered; ``True`` if it all was."""
        if self._writer is None or not self._writer.is_alive():
            return not self._queue
        marker = _FlushMarker()
        self._flush_requested = True
        self._post_wake.set()  # a poster still waiting to set up starts now
        with self._marker_lock:
            self._markers_queued += 1
            self._queue.append(marker)
        self._armed = True
        self._wake.set()
        return marker.done.wait(timeout) and marker.ok

    def begin_exit(self, deadline: float) -> None:
        """At interpreter exit, on the main thread: save what is queued, let the poster send.

        Writing to the outbox happens here, not on the writer, which may be
        waiting for another process's lock. Then ``join`` gives the poster
        what is left of the budget.
        """
        self._deadline = deadline
        self._stopping = True
        self._exiting = True
        with self._take_lock:
            items = list(self._queue)
            self._queue.clear()
            raws = [item for item in items if not isinstance(item, _FlushMarker)]
            self._counters.taken += len(raws)
        with self._marker_lock:
            self._markers_queued = 0
        for item in items:
            if isinstance(item, _FlushMarker):  # a flush still waiting: the answer is "not sent"
                item.done.set()
        if raws:
            target = self._target()
            if target is None or not target.wanted:
                self._lose(len(raws), "opted_out")
            else:
                # The writer opens the outbox as it starts; wait a moment for it
                # rather than race it to create the file.
                left = max(0.0, deadline - time.monotonic())
                ready = self._outbox_ready.wait(left / 2)
                outbox = self._outbox if ready else None
                if outbox is None:  # kept, so the hand-off finds what was saved here
                    outbox = self._exit_outbox = self._open_outbox()
                self._persist(outbox, raws, exiting=True)
        self._wake.set()
        self._post_wake.set()
        self._progress.set()

    def stop(self, deadline: float) -> bool:
        """Send what can be sent by ``deadline`` (monotonic), then end; ``True`` if it ended."""
        self._deadline = deadline
        self._stopping = True
        self._wake.set()
        self._post_wake.set()
        self._progress.set()
        return self.join(deadline)

    def join(self, deadline: float) -> bool:
        """Wait for both threads to end, at most until ``deadline``; ``True`` if they did.

        At exit there is no point waiting for a poster still setting up its
        HTTP stack: no request could start and finish in the budget anyway.
        """
        ended = True
        for thread in (self._writer, self._poster):
            if thread is None:
                continue
            if not (self._exiting and thread is self._poster and not self._ready_to_send):
                thread.join(max(0.0, deadline - time.monotonic()))
            ended = ended and not thread.is_alive()
        return ended

    def _await_answer_due(self, grace: float) -> None:
        """Give a request still in flight at the end of the exit budget up to ``grace`` more
        seconds, but only while the server's usual answer time says its answer is due: a batch
        the server accepted and this process could not delete would be sent again. A
        request to a server that has not answered before, or that hangs, is not waited for."""
        latency = self._latency
        if not self._in_flight_ids or latency is None or grace <= 0:
            return
        until = min(self._in_flight_started + 2 * latency + 0.01, time.monotonic() + grace)
        while self._in_flight_ids and time.monotonic() < until:
            time.sleep(0.002)

    def settle_at_exit(self, grace: float = 0.0) -> None:
        """After the exit budget, on the main thread: give back the rows this process
        claimed and will not post, so the delivery process need not wait for their lease.

        The rows of a request still in flight keep theirs until that request would
        have timed out: the server may be accepting them right now, and sending
        them again meanwhile would make duplicates.
        """
        outbox = self.outbox
        if outbox is None:
            return
        self._await_answer_due(grace)
        # Signals only memory holds (no outbox file, a full disk, a file locked past the
        # exit budget) end with the process: counted, never silently gone.
        memory = getattr(outbox, "memory", None)
        if memory is None and not outbox.durable:
            memory = outbox
        if memory is not None:
            self._lose(memory.count_mine(1 << 63), "unsaved_at_exit")
        with self._claim_lock:
            self._settled = True
            in_flight = list(self._in_flight_ids)
            flying = set(in_flight)
            rest = [i for i in self._claimed if i not in flying]
        try:
            if rest:
                outbox.release(rest)
            if in_flight:
                outbox.lease(in_flight, max(0.0, self._in_flight_until - time.monotonic()) + 1.0)
        except Exception:
            logger.debug("kaibantrace: could not give back claimed rows at exit", exc_info=True)

    @property
    def outbox(self) -> Optional[Outbox]:
        """The outbox the writer opened, or the one the exit hook opened when the writer had
        not yet (``None`` before either did)."""
        return self._outbox or self._exit_outbox

    def bound(self, deadline: float) -> None:
        """Send nothing that could still be under way at ``deadline`` (monotonic): a delivery
        process ending at its bound must not leave a request the server may be accepting."""
        self._deadline = deadline
        self._bounded = True

    def outbox_count(self) -> int:
        """Signals waiting for this sender's target, other processes' included, read now."""
        target = self._target()
        if self._outbox is None or target is None or target.url is None:
            return 0
        return self._outbox.count(target.app_id, target.url)

    def poke(self) -> None:
        """Have the poster look at the outbox now (another process added to it, or the
        process exists to send), without waiting out the setup delay."""
        self._eager = True
        self._post_wake.set()

    @property
    def pending(self) -> int:
        """Events queued and not yet taken by the writer (cheap: callers poll it)."""
        return max(0, len(self._queue) - self._markers_queued)

    @property
    def in_flight(self) -> int:
        """Signals in the request being sent right now."""
        return self._in_flight

    # -- the writer thread ---------------------------------------------------

    def _write_loop(self) -> None:
        try:
            with fork_guard("setup"):  # a fork mid-import would leave the child a held import lock
                _load_worker_modules()
            try:
                opened = self._open_outbox()
                # A file that fails later (a full disk) hands its work to memory.
                self._outbox = FallbackOutbox(opened) if opened.durable else opened
            except Exception:
                logger.debug("kaibantrace: outbox unavailable; keeping signals in memory",
                             exc_info=True)
                self._outbox = MemoryOutbox()
            self._outbox_ready.set()
            while not self._stopping:
                self._write_queued(self._outbox)
                if not self._queue:
                    self._sleep(None)
                if self._queue and len(self._queue) < self._batch_size and not (
                        self._flush_requested or self._stopping):
                    self._sleep(self._interval)  # let a batch fill up
            self._write_queued(self._outbox)  # stopping: what is left (empty at exit)
        except BaseException:  # the host must never see this thread's trouble
            logger.debug("kaibantrace: writer stopped unexpectedly", exc_info=True)
        finally:
            self._outbox_ready.set()
            self._post_wake.set()

    def _sleep(self, timeout: Optional[float]) -> None:
        if not self._stopping:
            self._wake.wait(timeout)
        self._wake.clear()

    def _write_queued(self, outbox: Outbox) -> None:
        """Move the queue into the outbox, a batch per transaction, and tell the poster."""
        self._armed = False
        self._hurried = False
        self._flush_requested = False
        target: Optional[Target] = None
        decided = False
        while True:
            self._wait_for_poster()
            with self._take_lock:
                raws, markers = self._take_batch()
            if not raws and not markers:
                break
            if raws:
                if not decided:  # once a pass: each decision costs a look at two files
                    target, decided = self._target(), True
                if target is None or not target.wanted:
                    self._lose(len(raws), "opted_out" if target else "no_app_id")
                else:
                    self._persist(outbox, raws, exiting=False)
            if markers:
                with self._marker_lock:
                    for marker in markers:
                        marker.upto = self._last_added
                        self._markers.append(marker)
            self._post_wake.set()

    def _wait_for_poster(self) -> None:
        """Move the queue into the outbox while it has room; past that, wait for the poster.

        The outbox is where signals are safe (and what exit need not save
        again), so the writer moves events there as fast as it can. But it
        holds at most 10,000 signals and drops the oldest beyond that, while
        the queue in memory may be sized for larger bursts: so once the
        outbox is full, the writer waits while the poster makes progress, and
        the rest of a burst stays in memory. A poster that made none for
        ``_STALL_WAIT`` (endpoint down, a request hanging) no longer holds the
        writer back: the outbox then takes everything, dropping its oldest.
        """
        while (self._outbox_room() <= 0 and not self._stalled and not self._stopping):
            self._progress.clear()
            if self._outbox_room() > 0:
                break
            if not self._progress.wait(_STALL_WAIT):
                self._stalled = True

    def _outbox_room(self) -> int:
        return MAX_SIGNALS - self._counters.in_outbox

    def _take_batch(self) -> Tuple[List[RawEvent], List[_FlushMarker]]:
        raws: List[RawEvent] = []
        markers: List[_FlushMarker] = []
        queue = self._queue
        # A backlog goes in large transactions: each one costs the host a few
        # hand-backs of the GIL, whatever its size. No more than the outbox has
        # room for, while the poster is delivering.
        limit = _WRITE_CHUNK if self._stalled else min(_WRITE_CHUNK, max(self._outbox_room(), 1))
        while queue and len(raws) < limit:
            item = queue.popleft()
            if isinstance(item, _FlushMarker):
                with self._marker_lock:
                    self._markers_queued -= 1
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
                # Another process's transaction may hold the file: wait for it only as
                # long as the exit budget allows. What cannot be saved then stays in
                # memory and is counted when the process ends (``settle_at_exit``).
                left = (self._deadline or 0) - time.monotonic()
                outbox.set_busy_timeout(max(left, 0.0))
            with self._book_lock:
                added: Added = outbox.add(encoded.app_id, encoded.url, encoded.signals)
                self._counters.in_outbox += len(encoded.signals) - added.full - added.expired
        except Exception:
            logger.debug("kaibantrace: could not write to the outbox", exc_info=True)
            self._lose(len(encoded.signals), "outbox_error")
            return
        if not exiting:
            self._last_added = added.last_id
        self._lose(added.full, "outbox_full")
        self._lose(added.expired, "expired")

    # -- the poster thread -----------------------------------------------------

    def _post_loop(self) -> None:
        try:
            self._outbox_ready.wait()
            outbox = self._outbox
            self._wait_before_setup()
            if self._exiting:  # a short run: its signals are saved, the next run sends them
                return
            prepare = getattr(self.transport, "prepare", None)
            if prepare is not None:
                try:
                    with fork_guard("setup"):  # a fork mid-import would leave the child a held import lock
                        prepare()  # import the HTTP stack now, not when the exit budget runs
                except Exception:
                    logger.debug("kaibantrace: transport preparation failed", exc_info=True)
            self._ready_to_send = True
            while outbox is not None:
                self._post_wake.clear()  # before the pass: a wake during it is kept
                self._post_pass(outbox)
                if self._stopping:
                    # The exit hook saved the queue; a plain stop() leaves that to the writer,
                    # whose last batch must reach the outbox before the last pass, or it
                    # would wait for the next run. Then send what fits.
                    if not self._exiting:
                        self._wait_for_writer()
                    self._post_pass(outbox)
                    break
                timeout = self._next_wake()
                if timeout is None or timeout > 0:
                    self._post_wake.wait(timeout)
        except BaseException:  # the host must never see this thread's trouble
            logger.debug("kaibantrace: poster stopped unexpectedly", exc_info=True)
        finally:
            self._resolve_markers(force=True)

    def _wait_for_writer(self) -> None:
        writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            deadline = self._deadline
            writer.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _wait_before_setup(self) -> None:
        """Give a short run the chance to end before the HTTP stack is imported.

        Importing it takes a good part of a core for a while; were the process
        to exit meanwhile, its exit would compete with the import for the GIL,
        and a request could not fit in the exit budget anyway. Where a delivery
        process takes what is left at exit, the wait is longer (a second): runs
        shorter than that never import the HTTP stack at all. A waiting
        ``flush()`` (or ``poke()``), or a full batch in the outbox, ends it at once.
        """
        outbox = self._outbox
        deadline = time.monotonic() + (self._setup_delay(outbox) if outbox is not None else 0.0)
        # A backlog (a full batch written already) is no short run's: it is sent from here,
        # before the outbox fills up and the writer has to drop the oldest.
        while not (self._stopping or self._eager or self._flush_requested or self._markers
                   or self._counters.in_outbox >= self._batch_size):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._post_wake.wait(left)
            self._post_wake.clear()

    def _next_wake(self) -> Optional[float]:
        """Seconds until the poster has something to do unasked, or ``None`` to wait for work."""
        if self._policy.circuit_open or self.holding or not (self._counters.in_outbox
                                                             or self._markers):
            return None
        wait = self._policy.next_attempt() - time.monotonic()
        wait = max(wait, self._shared_floor - time.time())
        if wait > 0:
            return wait
        # Out of backoff, what is left is leased by another process. A waiting
        # flush looks often, as that process may deliver our signals any moment;
        # otherwise look again when the lease expires.
        return _FLUSH_POLL if self._markers else self._timeout + 2.0

    def _post_pass(self, outbox: Outbox) -> None:
        """Send batches while allowed, then recount the outbox and answer waiting flushes."""
        target = self._target()
        if target is not None and not target.wanted:  # opted out: what waited is dropped unsent
            with self._book_lock:
                self._lose(outbox.drop_app(target.app_id), "opted_out")
        elif target is not None and target.url is not None:
            while self._send_batch(outbox, target):
                pass
        if target is not None and target.url is not None:
            with self._book_lock:
                self._counters.in_outbox = outbox.count(target.app_id, target.url)
        self._resolve_markers(force=False, target=target)
        self.passes += 1

    def _send_batch(self, outbox: Outbox, target: Target) -> bool:
        """Claim and post up to ``_BATCHES_PER_CLAIM`` batches; ``True`` if there may be more.

        With a backlog, one claim serves several requests: the outbox's
        transaction, and the GIL hand-backs it costs the host, is paid once per
        claim rather than once per request. Each batch is deleted as soon as
        its answer arrives, so a process that ends mid-claim (its daemon thread
        simply stops) never leaves accepted signals behind to be sent again.
        At exit, one batch at a time.
        """
        assert target.url is not None
        if self._policy.circuit_open or self.holding or not self._may_try_now(outbox, target.url):
            return False
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        if remaining is not None and (remaining < 0.01 or (
                (self._exiting or self._bounded) and not self._fits(remaining))):
            return False
        timeout = self._timeout if remaining is None else min(self._timeout, remaining / 2)
        batches = 1 if remaining is not None else _BATCHES_PER_CLAIM
        if not self._still_wanted(target):
            return False
        if self._settled:  # the exit hook gave back what this process held: claim no more
            return False
        # The lease covers every request of the claim, so no other process takes them
        # meanwhile; a request may take its timeout twice (to connect, then to answer).
        rows = self._valid(outbox, target, outbox.claim(
            target.app_id, target.url, self._batch_size * batches, batches * 2 * timeout + 2.0))
        if rows is None:
            return True  # the claim held only rows that must not be sent: claim again
        if not rows:
            return False
        with self._claim_lock:  # never held across a call into the outbox: the exit hook waits
            settled = self._settled
            if not settled:
                self._claimed = [row.id for row in rows]
        if settled:  # the exit hook has settled meanwhile, without these rows
            outbox.release([row.id for row in rows])
            return False
        try:
            for start in range(0, len(rows), self._batch_size):
                if start and (self._stopping or self._policy.circuit_open or self.holding
                              or not self._still_wanted(target)):
                    return False
                if not self._post_chunk(outbox, target, rows[start:start + self._batch_size], timeout):
                    return False
        finally:
            with self._claim_lock:
                left, self._claimed = self._claimed, []
                settled = self._settled
            if left and not settled:  # not posted: back for anyone to claim (the exit hook
                outbox.release(left)  # gave them back already if it has settled)
        return len(rows) == self._batch_size * batches

    def _valid(self, outbox: Outbox, target: Target, rows: List[Row]) -> Optional[List[Row]]:
        """The claimed rows that are signals of this app; the others are dropped and counted.

        ``None`` when every row claimed was refused, so the caller claims again.
        """
        bad = [row.id for row in rows if row_problem(row.body, target.app_id) is not None]
        if not bad:
            return rows
        with self._book_lock:
            outbox.delete(bad)
            self._counters.in_outbox -= len(bad)
        self._lose(len(bad), "invalid_row")
        self._log_once("invalid_row", "kaibantrace: the outbox held rows that are not signals of "
                       "this app (written by something else); dropped, never sent")
        doomed = set(bad)
        good = [row for row in rows if row.id not in doomed]
        return good or None

    def _still_wanted(self, target: Target) -> bool:
        """Whether telemetry is still on: asked before each request, so that an opt-out
        (``kaibantrace disable`` in another terminal) stops sending within one request."""
        now = self._target()
        return now is not None and now.wanted

    def _post_chunk(self, outbox: Outbox, target: Target, rows: List[Row], timeout: float) -> bool:
        """Post one batch and forget it once it needs no more sending (sent or refused);
        ``False`` when the rest of the claim must wait."""
        assert target.url is not None
        ids = [row.id for row in rows]
        body = ("[" + ",".join(row.body for row in rows) + "]").encode("utf-8")
        with self._claim_lock:
            self._in_flight_ids = ids
            self._in_flight_started = time.monotonic()
            self._in_flight_until = self._in_flight_started + 2 * timeout
        try:
            return self._answered(outbox, target, rows, ids, body,
                                  self._post(target.url, body, timeout, len(rows)))
        finally:
            with self._claim_lock:  # only once the answer is recorded (the rows deleted)
                self._in_flight_ids = []

    def _answered(self, outbox: Outbox, target: Target, rows: List[Row], ids: List[int],
                  body: bytes, outcome: Outcome) -> bool:
        assert target.url is not None
        if outcome.result is Result.SENT:
            self._forget(outbox, ids)
            self._counters.sent += len(rows)
            self._policy.succeeded()
            if self._shared_failures:
                self._shared_failures = 0
                self._quietly(lambda: outbox.record_success(target.url or ""))
            self._record_sent(target, body, len(rows))
            return True
        if outcome.result is Result.REJECTED:
            self._forget(outbox, ids)
            self._policy.rejected()
            self._log_once("rejected", "kaibantrace: the ingest service refused a batch "
                           f"({outcome.detail}); dropped, not retried")
            self._lose(len(rows), "rejected")
            return True
        if outcome.result is Result.RETIRED:
            self._retire(outbox, target)  # drops every other row of this app
            self._claimed = []
            return False
        self._failed(outcome, outbox, target.url)
        return False

    def _record_sent(self, target: Target, body: bytes, count: int) -> None:
        try:
            self._on_sent(target, [(body, count)])
        except Exception:
            logger.debug("kaibantrace: could not record a request in the transparency log",
                         exc_info=True)

    def _quietly(self, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception:
            logger.debug("kaibantrace: could not update the endpoint's health", exc_info=True)

    def _retire(self, outbox: Outbox, target: Target) -> None:
        """410 Gone: record it for good, drop what waits for this endpoint, never send again."""
        self._policy.retired()
        self.last_problem = "the endpoint answered 410 Gone: it is retired, and what waited was dropped"
        try:
            self._on_retired(target)
        except Exception:
            logger.debug("kaibantrace: could not record the retired endpoint", exc_info=True)
        with self._book_lock:
            self._lose(outbox.drop_app(target.app_id), "retired")
            self._counters.in_outbox = 0
        self._log_once("retired", "kaibantrace: the ingest endpoint answered 410 Gone: it is "
                       "retired; this machine will not send to it again")

    def _forget(self, outbox: Outbox, ids: List[int]) -> None:
        with self._book_lock:
            outbox.delete(ids)
            self._counters.in_outbox -= len(ids)
        done = set(ids)
        with self._claim_lock:
            self._claimed = [i for i in self._claimed if i not in done]
        self._stalled = False
        self._progress.set()  # the writer may be waiting for room

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

    def _may_try_now(self, outbox: Outbox, url: str) -> bool:
        now = time.monotonic()
        if not self._policy.past_floor(now, exiting=self._stopping):
            return False
        if not (self.ignore_shared_backoff or self._shared_backoff_over(outbox, url)):
            return False
        # A waiting flush, or the exit, may cut our own backoff short.
        return self._policy.may_try(now, cut_short=bool(self._markers), exiting=self._stopping)

    def _shared_backoff_over(self, outbox: Outbox, url: str) -> bool:
        """Whether another process's backoff for this endpoint has run out.

        Read from the outbox before each claim: a process that starts while the
        endpoint is known to be failing waits as the failing one would, so
        short runs started in a loop never retry faster than one long run.
        Neither a flush nor the exit cuts it short.
        """
        try:
            health = outbox.health(url)
        except Exception:
            return True
        self._shared_failures = health.failures
        self._shared_floor = 0.0 if health.mine else health.not_before
        return time.time() >= self._shared_floor

    @property
    def shared_floor(self) -> float:
        """Wall-clock time before which another process's backoff forbids an attempt (0: none)."""
        return self._shared_floor

    def _shared_circuit_open(self) -> bool:
        """Whether the processes of this app, together, failed often enough to stop asking now."""
        return not self.ignore_shared_backoff and RetryPolicy.shared_circuit_open(
            self._shared_failures, self._shared_floor, time.time())

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

    @property
    def circuit_open(self) -> bool:
        """Whether this process has stopped touching the network (failures or 410 Gone)."""
        return self._policy.circuit_open

    def _failed(self, outcome: Outcome, outbox: Outbox, url: str) -> None:
        self.last_problem = outcome.detail
        policy = self._policy
        try:
            health = outbox.record_failure(
                url, lambda failures: policy.shared_delay(failures, outcome.retry_after))
            self._shared_failures = health.failures
        except Exception:
            logger.debug("kaibantrace: could not record the endpoint's failure", exc_info=True)
        if not policy.failed(time.monotonic(), outcome.retry_after):
            self._log_once("circuit", f"kaibantrace: ingest unreachable ({outcome.detail}); not "
                           "sending again in this process, undelivered signals wait in the outbox")
            return
        self._counters.retried += 1

    def _resolve_markers(self, *, force: bool, target: Optional[Target] = None) -> None:
        """Answer the flushes whose events are all delivered, or can no longer be soon.

        ``target`` is the one the pass just sent to: deciding with a newer one
        could give up on signals an opt-out has not yet dropped.
        """
        with self._marker_lock:
            markers = list(self._markers)
        if not markers:
            return
        outbox = self._outbox
        if target is None:
            target = self._target()
        give_up = (force or self._policy.circuit_open or self._shared_circuit_open() or self.holding
                   or target is None or not target.wanted)
        answered = []
        for marker in markers:
            try:
                left = outbox.count_mine(marker.upto) if outbox is not None else 0
            except Exception:
                left = 1
            if left == 0 or give_up:
                marker.ok = left == 0 and not self._lost
                marker.done.set()
                answered.append(marker)
        if answered:
            self._lost = False
            with self._marker_lock:
                self._markers = [m for m in self._markers if m not in answered]

    def _lose(self, count: int, cause: str) -> None:
        if count:
            self._counters.drop(cause, count)
            self._lost = True

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message)

