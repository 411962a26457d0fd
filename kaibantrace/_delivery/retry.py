"""When to try the endpoint again: backoff, ``Retry-After`` and the circuit, as a pure object.

The poster tells ``RetryPolicy`` what each request's answer was and asks it
whether an attempt may start now; the policy reads no clock, socket or file
(the caller passes ``now``, the jitter is a function it is given), so a test
can walk it through any sequence of answers and times.

The rules:

* after a failure the next attempt waits the current backoff (``backoff``
  seconds at first, doubling up to five minutes), times a jitter of 1 to
  1.25, so that many processes that failed together do not return together;
* a ``Retry-After`` is a floor: the wait is never shorter, and nothing cuts
  that floor short but the exit;
* the backoff itself may be cut short by a waiting ``flush()`` or the exit;
* an answer resets the count of failures, and a success resets the backoff;
* after three failures in a row the circuit opens: this process stops
  touching the network, and what is unsent waits in the outbox for a later
  run. A ``410 Gone`` opens it at once.
"""

from __future__ import annotations

from typing import Callable, Optional

FAILURES_BEFORE_CIRCUIT_OPENS = 3
BACKOFF_MAX = 300.0


def _jitter() -> float:
    import random  # deferred: only a failed request needs jitter

    return random.uniform(1, 1.25)


class RetryPolicy:
    """One process's retry state for one endpoint, and the rules that change it."""

    def __init__(self, backoff: float, *, jitter: Callable[[], float] = _jitter) -> None:
        self.start = backoff
        """The first wait after a failure; ``retune`` may change it while running."""
        self.failures = 0
        """Failed attempts in a row."""
        self.circuit_open = False
        self.retry_at = 0.0
        """Monotonic time before which our own backoff holds (a flush may cut it short)."""
        self.floor_at = 0.0
        """Monotonic time before which the server's ``Retry-After`` holds."""
        self._wait = backoff
        self._jitter = jitter

    def retune(self, backoff: float) -> None:
        """A new first wait (``configure(backoff=...)``): the next failure waits it, unless
        failures already grew the backoff, which then runs out as it was (until a success)."""
        if self._wait == self.start:  # not grown: the next wait is the first one
            self._wait = backoff
        self.start = backoff

    def succeeded(self) -> None:
        """The endpoint took a batch: back to the first wait."""
        self.failures, self._wait = 0, self.start

    def rejected(self) -> None:
        """The endpoint answered, refusing the batch: it is up, so the count starts again; the
        batch is not retried, and the backoff is left as it was."""
        self.failures = 0

    def retired(self) -> None:
        """``410 Gone``: never again from this process."""
        self.circuit_open = True

    def failed(self, now: float, retry_after: Optional[float]) -> bool:
        """A failed attempt at ``now``; whether another will follow (``False``: the circuit
        opened)."""
        self.failures += 1
        if self.failures >= FAILURES_BEFORE_CIRCUIT_OPENS:
            self.circuit_open = True
            return False
        floor = self.floor(retry_after)
        self.floor_at = now + floor
        self.retry_at = now + min(max(self._wait, floor), BACKOFF_MAX) * self._jitter()
        self._wait = min(self._wait * 2, BACKOFF_MAX)
        return True

    def may_try(self, now: float, *, cut_short: bool, exiting: bool) -> bool:
        """Whether an attempt may start at ``now``. ``cut_short``: a flush waits, so our own
        backoff need not run out; ``exiting`` overrides both waits, as the exit is the last
        chance this process has."""
        return self.past_floor(now, exiting=exiting) and (now >= self.retry_at or cut_short
                                                          or exiting)

    def past_floor(self, now: float, *, exiting: bool) -> bool:
        """Whether the server's ``Retry-After`` allows an attempt at ``now``."""
        return now >= self.floor_at or exiting

    def next_attempt(self) -> float:
        """The monotonic time from which both waits allow an attempt."""
        return max(self.retry_at, self.floor_at)

    def floor(self, retry_after: Optional[float]) -> float:
        """A ``Retry-After`` as a wait, capped at the longest backoff."""
        return min(retry_after or 0.0, BACKOFF_MAX)

    def shared_delay(self, failures: int, retry_after: Optional[float]) -> float:
        """The wait every process of the app keeps after ``failures`` in a row, counted
        across processes in the outbox, so that short runs in a loop never retry faster
        than one long run would."""
        grown = self.start * 2.0 ** min(failures - 1, 16)
        return min(max(grown, self.floor(retry_after)), BACKOFF_MAX) * self._jitter()

    @staticmethod
    def shared_circuit_open(failures: int, floor: float, wall_now: float) -> bool:
        """Whether the processes of this app, together, failed often enough to stop asking
        until ``floor`` (wall clock)."""
        return failures >= FAILURES_BEFORE_CIRCUIT_OPENS and floor > wall_now
