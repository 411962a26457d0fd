"""The signal budget: at most ``max_per_minute`` signals of each event name a minute, per client."""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
import types
from typing import Any, Callable, Iterator, List, Optional

import pytest

import kaibantrace
from kaibantrace import ConfigurationError, PrivacyError, events
from kaibantrace._client import client as _client
from kaibantrace._client.budget import HELD_BACK_KEY, MAX_NAMES, Budget
from kaibantrace._encode.identity import Session
from kaibantrace._encode.pipeline import CleanPayload, PayloadFailed, RawEvent
from kaibantrace.testing import Collector, capture

from .conftest import subprocess_env

MakeClient = Callable[..., kaibantrace.Telemetry]
SESSION = Session()


def raw(name: Any, at: float, payload: Any = None) -> RawEvent:
    return (name, payload, SESSION, None, at, None)


class Recorder:
    """A budget in front of a list: what went through, in order."""

    def __init__(self, per_minute: int, *, carry: bool = True) -> None:
        self.budget = Budget(per_minute)
        self.passed: List[RawEvent] = []
        self.send = self.budget.limit(self.passed.append, carry=carry)

    def names_at(self, name: Any, *times: float, payload: Any = None) -> int:
        """Send ``name`` once at each time; how many went through."""
        before = len(self.passed)
        for at in times:
            self.send(raw(name, at, payload))
        return len(self.passed) - before


class TestBucket:
    def test_a_burst_gets_the_budget_and_the_rest_is_counted(self) -> None:
        bucket = Recorder(5)
        assert bucket.names_at("e", *[100.0] * 12) == 5
        assert bucket.budget.held_back == 7

    def test_refills_at_the_rate_and_the_next_signal_carries_the_count(self) -> None:
        """5 a minute is one every 12 s; the first through after a hold says how many were held."""
        bucket = Recorder(5)
        bucket.names_at("e", *[100.0] * 8)
        assert bucket.names_at("e", 111.0) == 0  # 11 s: not a whole token yet
        assert bucket.names_at("e", 112.5) == 1
        assert bucket.passed[-1][1] == {HELD_BACK_KEY: "4"}
        assert bucket.names_at("e", 124.5) == 1 and bucket.passed[-1][1] is None  # nothing held
        assert bucket.budget.held_back == 4

    def test_names_have_budgets_of_their_own(self) -> None:
        bucket = Recorder(2)
        assert bucket.names_at("a", 1.0, 1.0, 1.0) == 2
        assert bucket.names_at("b", 1.0, 1.0, 1.0) == 2

    def test_a_clock_that_steps_back_refills_nothing_then_counts_from_there(self) -> None:
        bucket = Recorder(5)
        bucket.names_at("e", *[1000.0] * 5)
        assert bucket.names_at("e", 500.0) == 0  # back in time: no token appears
        assert bucket.names_at("e", 511.0) == 0
        assert bucket.names_at("e", 512.5) == 1  # 12 s after the step: one token

    def test_a_clock_that_leaps_forward_refills_at_most_the_burst(self) -> None:
        bucket = Recorder(5)
        bucket.names_at("e", *[0.0] * 5)
        assert bucket.names_at("e", *[10**9] * 20) == 5

    def test_the_count_is_added_to_a_copy_of_the_payload(self) -> None:
        bucket = Recorder(1)
        mine = {"k": "v"}
        static = CleanPayload({"s": "1"})
        bucket.names_at("e", 0.0, 0.0)
        bucket.names_at("e", 60.0, payload=mine)
        bucket.names_at("e", 60.0)
        bucket.names_at("e", 120.0, payload=static)
        assert bucket.passed[1][1] == {"k": "v", HELD_BACK_KEY: "1"} and mine == {"k": "v"}
        carried = bucket.passed[2][1]
        assert carried == {"s": "1", HELD_BACK_KEY: "1"} and type(carried) is CleanPayload
        assert static == {"s": "1"}

    def test_a_payload_that_will_not_be_sent_leaves_the_count_for_the_next(self) -> None:
        bucket = Recorder(1)
        bucket.names_at("e", 0.0, 0.0, 0.0)
        bucket.names_at("e", 60.0, payload=PayloadFailed("ValueError"))
        failed, = (r[1] for r in bucket.passed[1:])
        assert isinstance(failed, PayloadFailed)
        bucket.names_at("e", 120.0)
        assert bucket.passed[-1][1] == {HELD_BACK_KEY: "2"}

    def test_without_carrying_the_payload_is_untouched(self) -> None:
        bucket = Recorder(1, carry=False)
        bucket.names_at("e", 0.0, 0.0, 60.0)
        assert [r[1] for r in bucket.passed] == [None, None]
        assert bucket.budget.held_back == 1

    def test_names_past_the_table_share_one_budget(self) -> None:
        """A program that makes names up cannot grow the table without bound."""
        bucket = Recorder(2)
        for number in range(MAX_NAMES):
            bucket.names_at(f"n{number}", 0.0)
        assert bucket.names_at("late_a", 0.0, 0.0) + bucket.names_at("late_b", 0.0) == 2
        assert len(bucket.budget._buckets) == MAX_NAMES + 1

    def test_an_unhashable_name_goes_on_to_be_refused(self) -> None:
        bucket = Recorder(1)
        assert bucket.names_at(["not", "a", "name"], 0.0, 0.0) == 2

    def test_grant_lets_one_more_through(self) -> None:
        bucket = Recorder(1)
        bucket.names_at("install", 0.0, 0.0)
        bucket.budget.grant("install", 0.0)
        assert bucket.names_at("install", 0.0, 0.0) == 1

    def test_a_lower_rate_trims_what_buckets_hold(self) -> None:
        bucket = Recorder(60)
        bucket.names_at("e", 0.0)
        bucket.budget.set_rate(2)
        assert bucket.names_at("e", *[0.0] * 5) == 2


class TestSetting:
    def test_default_is_sixty_a_minute(self) -> None:
        assert kaibantrace.Telemetry().settings.max_per_minute == 60

    @pytest.mark.parametrize("value", [-1, 1.5, True, "60"])
    def test_bad_values_are_named(self, value: Any) -> None:
        with pytest.raises(ConfigurationError, match="max_per_minute"):
            kaibantrace.Telemetry(max_per_minute=value)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[float]]:
    """The wall clock events are stamped with, moved by the test (``clock[0]``)."""
    now = [time.time()]
    monkeypatch.setattr(_client, "time", types.SimpleNamespace(
        time=lambda: now[0], monotonic=time.monotonic))
    yield now


def sent(client: kaibantrace.Telemetry, collector: Collector, count: int
         ) -> List[tuple[str, Optional[str]]]:
    """(type, held_back field) of each signal the collector got, once ``count`` came."""
    assert client.flush(10)
    return [(s["type"], s.get("payload", {}).get(HELD_BACK_KEY))
            for s in collector.wait_for(count)]


class TestClient:
    def test_a_loop_sends_the_budget_and_counts_the_rest(self, make_client: MakeClient,
                                                          collector: Collector,
                                                          clock: List[float]) -> None:
        """1,000 calls of a tracked function and 1,000 emits: 5 of each are sent, the rest
        are held back (not dropped), and the first signal after a refill carries the count."""
        client = make_client(max_per_minute=5)

        @client.track("hot")
        def hot() -> None:
            pass

        for _ in range(1000):
            hot()
            client.emit("emitted")
        stats = client.stats()
        assert stats["held_back"] == 2 * 995 and stats["dropped"] == {}
        clock[0] += 12  # one token more of each name
        hot()
        client.emit("emitted")
        signals = sent(client, collector, 12)
        assert signals[:10] == [("hot", None), ("emitted", None)] * 5
        assert signals[10:] == [("hot", "995"), ("emitted", "995")]
        assert len(collector.signals) == 12

    def test_zero_switches_it_off(self, make_client: MakeClient, collector: Collector) -> None:
        client = make_client(max_per_minute=0)
        for _ in range(200):
            client.emit("all")
        assert len(sent(client, collector, 200)) == 200
        assert client.stats()["held_back"] == 0

    def test_configure_changes_a_running_client(self, make_client: MakeClient,
                                                collector: Collector) -> None:
        client = make_client(max_per_minute=0)
        for _ in range(10):
            client.emit("e")
        client.configure(max_per_minute=2)
        for _ in range(10):
            client.emit("e")
        assert len(sent(client, collector, 12)) == 12
        assert client.stats()["held_back"] == 8

    def test_kaibanjs_profile_counts_without_a_payload(self, make_client: MakeClient,
                                                        collector: Collector,
                                                        clock: List[float]) -> None:
        """KaibanJS's signals carry nothing kaibantrace adds: the count is in stats() only."""
        client = make_client(profile="kaibanjs", max_per_minute=1)
        for _ in range(3):
            client.emit(events.WORKFLOW_STARTED)
        clock[0] += 60
        client.emit(events.WORKFLOW_STARTED)
        assert client.flush(10)
        assert ["payload" in s for s in collector.wait_for(2)] == [False, False]
        assert client.stats()["held_back"] == 2

    def test_captures_record_every_event(self, make_client: MakeClient) -> None:
        """Tests of an author's code see each call's event; the budget is for sending."""
        client = make_client(max_per_minute=1)
        with capture() as signals:
            for _ in range(50):
                client.emit("each")
        assert len(signals) == 50 and client.stats()["held_back"] == 0

    def test_strict_mode_checks_what_the_budget_holds_back(self, make_client: MakeClient) -> None:
        client = make_client(strict=True, max_per_minute=1)
        client.emit("checked")
        with pytest.raises(PrivacyError):
            client.emit("checked", {"contact": "alice@example.com"})

    def test_debug_output_shows_what_would_be_sent(self, make_client: MakeClient,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
        client = make_client(debug=True, max_per_minute=2)
        for _ in range(5):
            client.emit("printed")
        assert capsys.readouterr().err.count("[kaibantrace debug]") == 2

    def test_the_install_event_is_never_held_back(self, make_client: MakeClient,
                                                  collector: Collector) -> None:
        """Even when the author's own events of that name used up its budget."""
        client = make_client(max_per_minute=1)
        client.emit("install")

        @client.track_cli("tool_used")
        def main() -> None:
            pass

        main()
        assert sorted(t for t, _ in sent(client, collector, 3)) == ["install", "install",
                                                                     "tool_used"]


# The loopback collector in a process of its own, so that what it keeps of the signals it
# receives is not counted in the traced memory of the process under test.
_COLLECTOR = """
import sys
from kaibantrace.testing import Collector
with Collector() as collector:
    print(collector.url, flush=True)
    expected = int(sys.stdin.readline())
    print(len(collector.wait_for(expected, timeout=30)), flush=True)
"""


class TestMemory:
    def test_ten_thousand_calls_keep_little_alive(self, make_client: MakeClient) -> None:
        """A tight loop of a tracked function and of emit, sending for real to the loopback
        collector, holds little memory: what is held back is a count, not an event. (Without
        the budget the same loop holds about 5 MB: 20,000 events waiting to be sent.)"""
        collector = subprocess.Popen([sys.executable, "-c", _COLLECTOR], env=subprocess_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert collector.stdin is not None and collector.stdout is not None
            client = make_client(endpoint=collector.stdout.readline().strip(), max_per_minute=60)

            @client.track("hot", payload={"kind": "loop"})
            def hot(i: int) -> int:
                return i

            hot(0)
            client.emit("hot_emit")
            assert client.flush(10)  # the sender, the outbox and the HTTP stack are loaded
            tracemalloc.start()
            try:
                for i in range(10_000):
                    hot(i)
                    client.emit("hot_emit", {"i": i})
                current, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 256 * 1024 and current < 256 * 1024, (current, peak)
            assert client.flush(10)
            stats = client.stats()
            assert stats["dropped"] == {}
            sent = 20_002 - int(stats["held_back"])  # type: ignore[call-overload]
            assert 120 <= sent < 1000
            collector.stdin.write(f"{sent}\n")
            collector.stdin.flush()
            assert int(collector.stdout.readline()) == sent
        finally:
            collector.kill()
            collector.wait()
