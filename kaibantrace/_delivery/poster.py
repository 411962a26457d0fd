"""The poster thread: when to send what waits in the outbox.

It sleeps until there is something to send: rows the writer added, a waiting
``flush()``, or the end of a backoff. Each time it wakes it runs one pass of
``_delivery.posting`` (claim, post, act on the answers). After a failure it
waits as ``Backoff`` decides (``retry.RetryPolicy`` and every other process's
failures); once the circuit opens this process never touches the network
again, and what is left stays in the outbox for a later run.

A short run never pays for HTTP: the poster imports the HTTP stack only once
the process has lived a little (``SETUP_DELAY``), and not at all when the exit
comes first.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from .._fork import guard as fork_guard
from .._log import logger
from .outbox import Outbox
from .posting import Posting
from .shared import SenderState

SETUP_DELAY = 0.05  # the poster imports its HTTP stack only once the process has run this long
SETUP_DELAY_WITH_HAND_OFF = 1.0  # as long, when a delivery process will take what is left at exit
_FLUSH_POLL = 0.02  # how often a waiting flush checks signals another process is sending


class Poster:
    """The poster thread's work for one sender (``run`` is the thread's target)."""

    def __init__(self, state: SenderState, posting: Posting, *,
                 setup_delay: Callable[[Outbox], float]) -> None:
        self._s = state
        self._posting = posting
        self._setup_delay = setup_delay
        self.writer: Optional[threading.Thread] = None  # joined before the last pass
        self.ready_to_send = False  # the transport is prepared: a request could start now

    def run(self) -> None:
        s = self._s
        try:
            s.outbox_ready.wait()
            outbox = s.outbox
            self._wait_before_setup()
            if s.exiting:  # a short run: its signals are saved, the next run sends them
                return
            prepare = getattr(self._posting.transport, "prepare", None)
            if prepare is not None:
                try:
                    with fork_guard("setup"):  # a fork mid-import would leave the child a held import lock
                        prepare()  # import the HTTP stack now, not when the exit budget runs
                except Exception:
                    logger.debug("kaibantrace: transport preparation failed", exc_info=True)
            self.ready_to_send = True
            while outbox is not None:
                s.post_wake.clear()  # before the pass: a wake during it is kept
                self._posting.run_pass(outbox)
                if s.stopping:
                    # The exit hook saved the queue; a plain stop() leaves that to the writer,
                    # whose last batch must reach the outbox before the last pass, or it
                    # would wait for the next run. Then send what fits.
                    if not s.exiting:
                        self._wait_for_writer()
                    self._posting.run_pass(outbox)
                    break
                timeout = self._next_wake()
                if timeout is None or timeout > 0:
                    s.post_wake.wait(timeout)
        except BaseException:  # the host must never see this thread's trouble
            logger.debug("kaibantrace: poster stopped unexpectedly", exc_info=True)
        finally:
            self._posting.resolve_markers(force=True)

    def _wait_for_writer(self) -> None:
        writer = self.writer
        if writer is not None and writer is not threading.current_thread():
            deadline = self._s.deadline
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
        s = self._s
        outbox = s.outbox
        deadline = time.monotonic() + (self._setup_delay(outbox) if outbox is not None else 0.0)
        # A backlog (a full batch written already) is no short run's: it is sent from here,
        # before the outbox fills up and the writer has to drop the oldest.
        while not (s.stopping or s.eager or s.flush_requested or s.markers
                   or s.counters.in_outbox >= s.batch_size):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.post_wake.wait(left)
            s.post_wake.clear()

    def _next_wake(self) -> Optional[float]:
        """Seconds until the poster has something to do unasked, or ``None`` to wait for work."""
        s = self._s
        if s.policy.circuit_open or s.holding or not (s.counters.in_outbox or s.markers):
            return None
        wait = self._posting.backoff.seconds_to_wait()
        if wait > 0:
            return wait
        # Out of backoff, what is left is leased by another process. A waiting
        # flush looks often, as that process may deliver our signals any moment;
        # otherwise look again when the lease expires.
        return _FLUSH_POLL if s.markers or s.markers_queued else s.timeout + 2.0
