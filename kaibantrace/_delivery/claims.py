"""The outbox rows this process holds, and giving them back when it ends.

The poster claims rows under a lease (no other process takes them meanwhile),
posts them a batch at a time, and deletes each batch once answered. At exit the
main thread *settles*: it gives back the rows claimed and not posted, so a
delivery process need not wait for their lease, and keeps the lease on the rows
of a request still in flight, which the server may be accepting right now.

``Claims`` is the one place that knows which rows those are. Its lock is never
held across a call into the outbox, so the exit hook never waits for SQLite
behind the poster.
"""

from __future__ import annotations

import threading
import time
from typing import List, Optional, Sequence

from .._log import logger
from .outbox import Outbox

_FIRST_REQUEST_AT_EXIT = 0.05  # budget left (s) for a request at exit when none was timed yet


class Claims:
    """Rows claimed, the request in flight, and how long the server takes to answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.settled = False  # the exit hook gave back this process's claim: claim no more
        self._claimed: List[int] = []  # rows of the current claim not yet answered
        self._in_flight: List[int] = []  # rows of the request being sent
        self._started = 0.0  # monotonic; when that request started
        self._until = 0.0  # monotonic; when that request times out
        self.latency: Optional[float] = None  # of the last request the server answered

    def hold(self, ids: List[int]) -> bool:
        """Note a new claim; ``False`` when the exit hook has settled meanwhile (the caller
        gives the rows back itself)."""
        with self._lock:
            if self.settled:
                return False
            self._claimed = ids
            return True

    def finish(self, outbox: Outbox) -> None:
        """The claim is over: give back the rows not posted, for anyone to claim (the exit
        hook gave them back already if it has settled)."""
        with self._lock:
            left, self._claimed = self._claimed, []
            settled = self.settled
        if left and not settled:
            outbox.release(left)

    def forget(self, ids: Sequence[int]) -> None:
        """These rows are answered and deleted."""
        done = set(ids)
        with self._lock:
            self._claimed = [i for i in self._claimed if i not in done]

    def drop_all(self) -> None:
        """Every row of the claim is gone (the endpoint is retired)."""
        self._claimed = []

    def sending(self, ids: List[int], timeout: float) -> None:
        """A request with these rows starts; it may take ``timeout`` twice (connect, answer)."""
        with self._lock:
            self._in_flight = ids
            self._started = time.monotonic()
            self._until = self._started + 2 * timeout

    def sent(self) -> None:
        """The request's answer is recorded (its rows deleted, or kept for a retry)."""
        with self._lock:
            self._in_flight = []

    def fits(self, remaining: float) -> bool:
        """Whether a request can be answered within what is left of the exit budget.

        A request still in flight when the process ends may have reached the
        server, and its signals, not yet deleted, would then be sent twice.
        So at exit a request starts only when the last one took well under
        the time left.
        """
        if self.latency is None:  # nothing answered yet: try only with a good share left
            return remaining > _FIRST_REQUEST_AT_EXIT
        return remaining > 2 * self.latency + 0.005

    def await_answer_due(self, grace: float) -> None:
        """Give a request still in flight at the end of the exit budget up to ``grace`` more
        seconds, but only while the server's usual answer time says its answer is due: a batch
        the server accepted and this process could not delete would be sent again. A
        request to a server that has not answered before, or that hangs, is not waited for."""
        latency = self.latency
        if not self._in_flight or latency is None or grace <= 0:
            return
        until = min(self._started + 2 * latency + 0.01, time.monotonic() + grace)
        while self._in_flight and time.monotonic() < until:
            time.sleep(0.002)

    def settle(self, outbox: Outbox) -> None:
        """At exit: give back the rows claimed and not posted; the rows of a request still
        in flight keep their lease until that request would have timed out, as sending
        them again meanwhile would make duplicates."""
        with self._lock:
            self.settled = True
            in_flight = list(self._in_flight)
            flying = set(in_flight)
            rest = [i for i in self._claimed if i not in flying]
        try:
            if rest:
                outbox.release(rest)
            if in_flight:
                outbox.lease(in_flight, max(0.0, self._until - time.monotonic()) + 1.0)
        except Exception:
            logger.debug("kaibantrace: could not give back claimed rows at exit", exc_info=True)
