"""Sending what waits, on request: ``send_waiting``, ``drain``, ``delivery_status``, ``waiting``.

These are what the ``kaibantrace flush`` and ``kaibantrace deliver`` commands use, so they
are tested here the way those commands use them: signals an earlier process left in the
outbox, a client made afterwards, and the loopback collector (or a port that refuses).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, List

import pytest

import kaibantrace
from kaibantrace import DeliveryStatus
from kaibantrace._delivery.outbox import SqliteOutbox, outbox_path
from kaibantrace.testing import Collector, MemoryTransport

from .conftest import APP_ID

MakeClient = Callable[..., kaibantrace.Telemetry]


def leave_in_outbox(url: str, count: int) -> None:
    """Signals waiting for ``url``, as a process that could not send them leaves them."""
    outbox = SqliteOutbox(outbox_path(os.environ["KAIBAN_TELEMETRY_DIR"], APP_ID))
    outbox.add(APP_ID, url, [(time.time(), json.dumps({
        "appID": APP_ID, "clientUser": "0" * 64, "type": "left", "payload": {"n": str(n)}}))
        for n in range(count)])


def wait_until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition was not met in time"
        time.sleep(0.01)


class TestDrain:
    def test_sends_what_an_earlier_process_left_and_says_so(self, make_client: MakeClient,
                                                            collector: Collector) -> None:
        leave_in_outbox(collector.url, 30)
        client = make_client()
        seen: List[DeliveryStatus] = []
        assert client.drain(10, progress=seen.append) is True
        assert sorted(int(s["payload"]["n"]) for s in collector.wait_for(30)) == list(range(30))
        status = client.delivery_status()
        assert status.sending and status.passes >= 1 and status.in_outbox == 0
        assert not status.stopped and status.problem == ""
        assert seen and seen[-1].in_outbox == 0
        assert client.waiting() == 0

    def test_stops_and_says_why_when_the_endpoint_refuses(self, make_client: MakeClient,
                                                          refused_url: str) -> None:
        leave_in_outbox(refused_url, 3)
        client = make_client(endpoint=refused_url, backoff=0.01, timeout=0.5)
        assert client.drain(20) is False
        status = client.delivery_status()
        assert status.stopped and status.problem  # the circuit opened, and the reason is kept
        assert status.in_outbox == 3 and client.waiting() == 3  # nothing lost: they wait

    def test_a_client_that_is_off_sends_nothing_and_starts_nothing(
            self, make_client: MakeClient, collector: Collector) -> None:
        leave_in_outbox(collector.url, 2)
        client = make_client(opt_out=True)
        assert client.drain(1) is False
        assert client.delivery_status() == DeliveryStatus(False, 0, 0, False, "", 0.0)
        assert collector.signals == []  # and no sender was started: ``sending`` is False


class TestSendWaiting:
    def test_starts_the_sender_without_an_event(self, make_client: MakeClient,
                                                collector: Collector) -> None:
        leave_in_outbox(collector.url, 5)
        client = make_client()
        assert client.delivery_status().sending is False
        assert client.send_waiting() is True
        assert len(collector.wait_for(5)) == 5
        assert client.delivery_status().sending is True

    def test_refused_when_opted_out_by_the_environment(self, make_client: MakeClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DO_NOT_TRACK", "1")
        client = make_client()
        assert client.send_waiting() is False
        assert client.waiting() == 0 and client.delivery_status().sending is False

    def test_stop_after_bounds_the_requests(self, make_client: MakeClient,
                                        black_hole_url: str) -> None:
        """A server that never answers: with ``stop_after``, no request outlives the bound."""
        leave_in_outbox(black_hole_url, 1)
        client = make_client(endpoint=black_hole_url, timeout=30)
        assert client.send_waiting(stop_after=1.0) is True
        wait_until(lambda: client.stats()["requests"] == 1, 20)
        # Unbounded, the request would wait for an answer for its 30 s timeout.
        wait_until(lambda: client.stats()["in_flight"] == 0, 5)


class TestWhatTheCommandLineReads:
    def test_app_id_is_canonical_and_read_even_when_off(self,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        assert kaibantrace.Telemetry().app_id is None
        monkeypatch.setenv("KAIBAN_TELEMETRY_APP_ID", APP_ID.lower())
        assert kaibantrace.Telemetry(opt_out=True).app_id == APP_ID

    def test_transport_is_the_one_given_in_code(self) -> None:
        transport = MemoryTransport()
        assert kaibantrace.Telemetry(transport=transport).transport is transport
        assert kaibantrace.Telemetry().transport is None


class TestAflush:
    def test_waits_for_delivery_without_blocking_the_loop(self, make_client: MakeClient,
                                                          collector: Collector) -> None:
        """In a process, ``aflush`` waits on one of the loop's worker threads: the loop goes
        on running other tasks meanwhile."""
        import asyncio

        client = make_client(flush_interval=30)  # nothing sent until asked
        client.emit("task_done")

        async def main() -> tuple[bool, int]:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            ticker = asyncio.ensure_future(tick())
            delivered = await client.aflush(10)
            ticker.cancel()
            return delivered, ticks

        delivered, ticks = asyncio.run(main())
        assert delivered is True and ticks > 0
        assert [s["type"] for s in collector.wait_for(1)] == ["task_done"]

    def test_answers_at_once_when_nothing_was_accepted(self) -> None:
        import asyncio

        client = kaibantrace.Telemetry(app_id=APP_ID, opt_out=True)
        client.emit("task_done")
        assert asyncio.run(client.aflush(1)) is True
