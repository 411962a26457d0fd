"""The background sender: a bounded queue, two daemon threads, and the outbox.

The calling thread only appends to a ``deque`` and, when the queue goes from
idle to busy or a batch fills up, sets an ``Event``. It never blocks, never
touches a file or the network, and never raises. (In a child forked from C,
where no fork hook ran, its first event starts the client over first.)

Two threads do the rest, so that neither waits for the other:

* the *writer* (``_delivery.writer``) encodes what is queued and writes it to
  the outbox (``_delivery.outbox``) before anything is sent;
* the *poster* (``_delivery.poster``) wakes when there is something to send
  and runs a pass of ``_delivery.posting``: claim batches from the outbox,
  post them, delete them once answered; when to try again after a failure is
  ``_delivery.backoff``'s to say.

What the caller, the two threads and the exit hook share is in one
``_delivery.shared.SenderState``; ``Sender`` is the face the client sees.

At interpreter exit the main thread itself writes what is still queued to the
outbox (the writer may be waiting for another process's lock), then gives the
poster what is left of the exit budget to send; it never waits longer.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, List, Optional

from .._encode.pipeline import RawEvent
from .outbox import Outbox
from .poster import SETUP_DELAY, Poster
from .posting import Posting
from .shared import Counters, Encoded, FlushMarker, SenderState, Target
from .transport import Transport
from .writer import Writer


class Sender:
    """The writer and poster threads, their queue and their outbox, for one client."""

    def __init__(self, *, encode: Callable[[List[RawEvent]], Optional[Encoded]],
                 target: Callable[[], Optional[Target]], open_outbox: Callable[[], Outbox],
                 on_fork: Callable[[RawEvent], None], transport: Transport, counters: Counters,
                 batch_size: int, flush_interval: float, max_queue: int, timeout: float,
                 backoff: float,
                 setup_delay: Callable[[Outbox], float] = lambda outbox: SETUP_DELAY) -> None:
        self._s = SenderState(encode=encode, target=target, open_outbox=open_outbox,
                              on_fork=on_fork, counters=counters, batch_size=batch_size,
                              flush_interval=flush_interval, max_queue=max_queue,
                              timeout=timeout, backoff=backoff)
        self._writer = Writer(self._s)
        self._posting = Posting(self._s, transport=transport)
        self._poster = Poster(self._s, self._posting, setup_delay=setup_delay)
        self._writer_thread: Optional[threading.Thread] = None
        self._poster_thread: Optional[threading.Thread] = None
        self.accept = self._s.accept
        """Queue one event. Never blocks, never raises (the hot path: see ``SenderState``)."""
        self.retune = self._s.retune

    # -- any thread --------------------------------------------------------

    def start(self) -> bool:
        """Start both threads; ``False`` when no thread can be started (interpreter exit)."""
        writer = threading.Thread(target=self._writer.run, name="kaibantrace-writer", daemon=True)
        poster = threading.Thread(target=self._poster.run, name="kaibantrace-poster", daemon=True)
        try:
            writer.start()
        except RuntimeError:
            return False
        self._writer_thread = self._poster.writer = writer
        try:
            poster.start()
        except RuntimeError:  # the writer alone keeps signals for a later run
            return True
        self._poster_thread = poster
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued before now is delivered; ``True`` if it all was."""
        writer = self._writer_thread
        if writer is None or not writer.is_alive():
            return not self._s.queue
        marker = self._s.queue_marker()
        return marker.done.wait(timeout) and marker.ok

    def begin_exit(self, deadline: float) -> None:
        """At interpreter exit, on the main thread: save what is queued, let the poster send.

        Writing to the outbox happens here, not on the writer, which may be
        waiting for another process's lock. Then ``join`` gives the poster
        what is left of the budget.
        """
        s = self._s
        s.deadline = deadline
        s.stopping = True
        s.exiting = True
        with s.take_lock:
            items = list(s.queue)
            s.queue.clear()
            raws = [item for item in items if not isinstance(item, FlushMarker)]
            s.counters.taken += len(raws)
        with s.marker_lock:
            s.markers_queued = 0
        for item in items:
            if isinstance(item, FlushMarker):  # a flush still waiting: the answer is "not sent"
                item.done.set()
        if raws:
            target = s.target()
            if target is None or not target.wanted:
                s.lose(len(raws), "opted_out")
            else:
                # The writer opens the outbox as it starts; wait a moment for it
                # rather than race it to create the file.
                left = max(0.0, deadline - time.monotonic())
                ready = s.outbox_ready.wait(left / 2)
                outbox = s.outbox if ready else None
                if outbox is None:  # kept, so the hand-off finds what was saved here
                    outbox = s.exit_outbox = s.open_outbox()
                self._writer.persist(outbox, raws, exiting=True)
        s.wake_all()

    def stop(self, deadline: float) -> bool:
        """Send what can be sent by ``deadline`` (monotonic), then end; ``True`` if it ended."""
        self._s.deadline = deadline
        self._s.stopping = True
        self._s.wake_all()
        return self.join(deadline)

    def join(self, deadline: float) -> bool:
        """Wait for both threads to end, at most until ``deadline``; ``True`` if they did.

        At exit there is no point waiting for a poster still setting up its
        HTTP stack: no request could start and finish in the budget anyway.
        """
        ended = True
        for thread in (self._writer_thread, self._poster_thread):
            if thread is None:
                continue
            if not (self._s.exiting and thread is self._poster_thread
                    and not self._poster.ready_to_send):
                thread.join(max(0.0, deadline - time.monotonic()))
            ended = ended and not thread.is_alive()
        return ended

    def settle_at_exit(self, grace: float = 0.0) -> None:
        """After the exit budget, on the main thread: give back the rows this process
        claimed and will not post, so the delivery process need not wait for their lease
        (``Claims.settle``); count what only memory holds, which ends with the process.
        """
        outbox = self.outbox
        if outbox is None:
            return
        self._posting.claims.await_answer_due(grace)
        # Signals only memory holds (no outbox file, a full disk, a file locked past the
        # exit budget) end with the process: counted, never silently gone.
        memory = getattr(outbox, "memory", None)
        if memory is None and not outbox.durable:
            memory = outbox
        if memory is not None:
            self._s.lose(memory.count_mine(1 << 63), "unsaved_at_exit")
        self._posting.claims.settle(outbox)

    def bound(self, deadline: float) -> None:
        """Send nothing that could still be under way at ``deadline`` (monotonic): a delivery
        process ending at its bound must not leave a request the server may be accepting."""
        self._s.deadline = deadline
        self._s.bounded = True

    def outbox_count(self) -> int:
        """Signals waiting for this sender's target, other processes' included, read now."""
        target = self._s.target()
        outbox = self._s.outbox
        if outbox is None or target is None or target.url is None:
            return 0
        return outbox.count(target.app_id, target.url)

    def poke(self, *, retry_now: bool = False) -> None:
        """Have the poster look at the outbox now (another process added to it, or the
        process exists to send), without waiting out the setup delay; with ``retry_now``,
        that pass tries even while another process's backoff for the endpoint runs."""
        if retry_now:
            self._s.retry_now = True
        self._s.eager = True
        self._s.post_wake.set()

    # -- what the client and the command line read ---------------------------

    @property
    def outbox(self) -> Optional[Outbox]:
        """The outbox the writer opened, or the one the exit hook opened when the writer had
        not yet (``None`` before either did)."""
        return self._s.outbox or self._s.exit_outbox

    @property
    def transport(self) -> Transport:
        return self._posting.transport

    @property
    def pending(self) -> int:
        """Events queued and not yet taken by the writer (cheap: callers poll it)."""
        return max(0, len(self._s.queue) - self._s.markers_queued)

    @property
    def in_flight(self) -> int:
        """Signals in the request being sent right now."""
        return self._posting.in_flight

    @property
    def passes(self) -> int:
        """Sending passes the poster finished (the command line waits for one)."""
        return self._posting.passes

    @property
    def last_problem(self) -> str:
        """How the last failed request ended, for the command line."""
        return self._posting.last_problem

    @property
    def circuit_open(self) -> bool:
        """Whether this process has stopped touching the network (failures or 410 Gone)."""
        return self._s.policy.circuit_open

    @property
    def shared_floor(self) -> float:
        """Wall-clock time before which another process's backoff forbids an attempt (0: none)."""
        return self._posting.backoff.floor

    @property
    def holding(self) -> bool:
        """Send nothing in this process (the run that showed the first-run notice)."""
        return self._s.holding

    @holding.setter
    def holding(self, value: bool) -> None:
        self._s.holding = value
