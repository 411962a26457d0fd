"""May the poster try the endpoint now? Its own retry policy, and every other process's.

``retry.RetryPolicy`` decides for this process alone, from the answers it got.
But short runs started in a loop would each try once and fail fast, so the
outbox also keeps the endpoint's health for every process of the app: failures
in a row and when the shared backoff ends. ``Backoff`` joins the two: a process
that starts while the endpoint is known to be failing waits as the failing one
would, and never retries faster than one long run.
"""

from __future__ import annotations

import time
from typing import Callable

from .._log import logger
from .outbox import Outbox
from .retry import RetryPolicy
from .transport import Outcome


class Backoff:
    """``RetryPolicy`` plus the endpoint's shared health, as last read from the outbox."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0  # failures in a row of every process, as last read
        self.floor = 0.0  # wall clock; another process's backoff ends then (0: none)

    def may_try_now(self, outbox: Outbox, url: str, *, ignore_shared: bool, cut_short: bool,
                    exiting: bool) -> bool:
        """Whether a request may start now. A waiting flush (``cut_short``) or the exit may
        cut this process's own backoff short, never another process's or a Retry-After."""
        now = time.monotonic()
        if not self.policy.past_floor(now, exiting=exiting):
            return False
        if not (ignore_shared or self._shared_over(outbox, url)):
            return False
        return self.policy.may_try(now, cut_short=cut_short, exiting=exiting)

    def _shared_over(self, outbox: Outbox, url: str) -> bool:
        """Whether another process's backoff for this endpoint has run out (read now)."""
        try:
            health = outbox.health(url)
        except Exception:
            return True
        self.failures = health.failures
        self.floor = 0.0 if health.mine else health.not_before
        return time.time() >= self.floor

    def shared_circuit_open(self, *, ignore_shared: bool) -> bool:
        """Whether the processes of this app, together, failed often enough to stop asking now."""
        return not ignore_shared and RetryPolicy.shared_circuit_open(
            self.failures, self.floor, time.time())

    def seconds_to_wait(self) -> float:
        """Until the next attempt may start, by either backoff (zero or less: now)."""
        wait = self.policy.next_attempt() - time.monotonic()
        return max(wait, self.floor - time.time())

    def succeeded(self, outbox: Outbox, url: str) -> None:
        self.policy.succeeded()
        if self.failures:
            self.failures = 0
            _quietly(lambda: outbox.record_success(url))

    def failed(self, outbox: Outbox, url: str, outcome: Outcome) -> bool:
        """Record a failed request here and in the outbox; ``False`` once the circuit opened."""
        policy = self.policy
        try:
            health = outbox.record_failure(
                url, lambda failures: policy.shared_delay(failures, outcome.retry_after))
            self.failures = health.failures
        except Exception:
            logger.debug("kaibantrace: could not record the endpoint's failure", exc_info=True)
        return policy.failed(time.monotonic(), outcome.retry_after)


def _quietly(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception:
        logger.debug("kaibantrace: could not update the endpoint's health", exc_info=True)
