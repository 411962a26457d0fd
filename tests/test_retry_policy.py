"""The retry policy on its own: given answers and times, what the poster does next."""

from __future__ import annotations

from typing import List

import pytest

from kaibantrace._delivery.retry import BACKOFF_MAX, FAILURES_BEFORE_CIRCUIT_OPENS, RetryPolicy


def steady() -> RetryPolicy:
    """A policy without jitter, so waits can be compared exactly."""
    return RetryPolicy(1.0, jitter=lambda: 1.0)


class TestBackoff:
    def test_nothing_holds_the_first_attempt(self) -> None:
        assert steady().may_try(0.0, cut_short=False, exiting=False)

    def test_waits_double_after_each_failure(self) -> None:
        policy = RetryPolicy(1.0, jitter=lambda: 1.0)
        waits: List[float] = []
        now = 100.0
        for _ in range(FAILURES_BEFORE_CIRCUIT_OPENS - 1):
            assert policy.failed(now, None)
            waits.append(policy.retry_at - now)
            assert not policy.may_try(policy.retry_at - 0.001, cut_short=False, exiting=False)
            assert policy.may_try(policy.retry_at, cut_short=False, exiting=False)
            now = policy.retry_at
            policy.rejected()  # an answer in between keeps the circuit closed, not the wait
        assert waits == [1.0, 2.0]

    def test_jitter_stretches_a_wait_by_at_most_a_quarter(self) -> None:
        for _ in range(200):
            policy = RetryPolicy(2.0)
            policy.failed(0.0, None)
            assert 2.0 <= policy.retry_at <= 2.5

    def test_the_wait_never_exceeds_five_minutes(self) -> None:
        policy = RetryPolicy(200.0, jitter=lambda: 1.0)
        policy.failed(0.0, None)
        policy.rejected()
        policy.failed(0.0, None)  # 400 s grown, capped
        assert policy.retry_at == BACKOFF_MAX

    def test_a_success_starts_again_from_the_first_wait(self) -> None:
        policy = steady()
        policy.failed(0.0, None)
        policy.failed(10.0, None)
        policy.succeeded()
        assert policy.failures == 0
        policy.failed(20.0, None)
        assert policy.retry_at == 21.0

    def test_a_refusal_resets_the_count_but_not_the_wait(self) -> None:
        """The endpoint is up (it answered), so the circuit stays closed; the batch is not
        retried, and the next failure still waits what the last one would have."""
        policy = steady()
        policy.failed(0.0, None)
        policy.rejected()
        assert policy.failures == 0
        policy.failed(10.0, None)
        assert policy.retry_at == 12.0

    def test_a_new_first_wait_applies_to_the_next_failure(self) -> None:
        """retune before any failure: the very next wait is the new one."""
        policy = steady()
        policy.retune(5.0)
        policy.failed(0.0, None)
        assert policy.retry_at == 5.0

    def test_a_new_first_wait_applies_after_a_success(self) -> None:
        """retune: a backoff already grown runs out as it was."""
        policy = steady()
        policy.failed(0.0, None)
        policy.retune(5.0)
        policy.rejected()
        policy.failed(10.0, None)
        assert policy.retry_at == 12.0
        policy.succeeded()
        policy.failed(20.0, None)
        assert policy.retry_at == 25.0


class TestRetryAfter:
    def test_is_a_floor_for_the_wait(self) -> None:
        policy = steady()
        policy.failed(0.0, 30.0)
        assert (policy.floor_at, policy.retry_at) == (30.0, 30.0)

    def test_a_shorter_one_does_not_shorten_the_backoff(self) -> None:
        policy = RetryPolicy(8.0, jitter=lambda: 1.0)
        policy.failed(0.0, 1.0)
        assert (policy.floor_at, policy.retry_at) == (1.0, 8.0)

    def test_is_capped_at_the_longest_backoff(self) -> None:
        policy = steady()
        policy.failed(0.0, 86_400.0)
        assert policy.floor_at == BACKOFF_MAX

    @pytest.mark.parametrize(("cut_short", "exiting", "allowed"), [
        (False, False, False), (True, False, False), (False, True, True)])
    def test_only_the_exit_cuts_it_short(self, cut_short: bool, exiting: bool,
                                         allowed: bool) -> None:
        policy = steady()
        policy.failed(0.0, 30.0)
        assert policy.may_try(10.0, cut_short=cut_short, exiting=exiting) is allowed

    def test_a_flush_cuts_our_own_backoff_short(self) -> None:
        policy = RetryPolicy(60.0, jitter=lambda: 1.0)
        policy.failed(0.0, None)
        assert not policy.may_try(1.0, cut_short=False, exiting=False)
        assert policy.may_try(1.0, cut_short=True, exiting=False)
        assert policy.next_attempt() == 60.0


class TestCircuit:
    def test_opens_after_three_failures_in_a_row(self) -> None:
        policy = steady()
        assert [policy.failed(float(t), None) for t in range(3)] == [True, True, False]
        assert policy.circuit_open

    def test_an_answer_between_failures_keeps_it_closed(self) -> None:
        policy = steady()
        for t in range(10):
            policy.failed(float(t), None)
            policy.rejected()
        assert not policy.circuit_open

    def test_gone_opens_it_at_once(self) -> None:
        policy = steady()
        policy.retired()
        assert policy.circuit_open and policy.failures == 0


class TestSharedBetweenProcesses:
    def test_the_shared_wait_grows_with_every_processs_failures(self) -> None:
        policy = RetryPolicy(1.0, jitter=lambda: 1.0)
        assert [policy.shared_delay(n, None) for n in (1, 2, 3, 10, 40)] == [
            1.0, 2.0, 4.0, 300.0, 300.0]

    def test_the_shared_wait_keeps_retry_after_as_a_floor(self) -> None:
        assert RetryPolicy(1.0, jitter=lambda: 1.0).shared_delay(1, 45.0) == 45.0

    def test_the_shared_circuit_holds_only_until_its_floor(self) -> None:
        assert RetryPolicy.shared_circuit_open(3, floor=1_000.0, wall_now=999.0)
        assert not RetryPolicy.shared_circuit_open(3, floor=1_000.0, wall_now=1_000.0)
        assert not RetryPolicy.shared_circuit_open(2, floor=1_000.0, wall_now=999.0)
