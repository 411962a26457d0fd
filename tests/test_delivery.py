"""Delivery against a real loopback server: failures never reach the host, exit never hangs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, List

import pytest

import kaibantrace
from kaibantrace.testing import Collector, MemoryTransport

from .conftest import APP_ID, rows_in_outbox, subprocess_env

MakeClient = Callable[..., kaibantrace.Telemetry]


class TestFailuresNeverReachTheHost:
    def test_refused_connection(self, make_client: MakeClient, refused_url: str) -> None:
        """A refused connection is retried, then left in the outbox; nothing raises."""
        client = make_client(endpoint=refused_url, backoff=0.01)
        client.emit("kept")
        assert client.flush(10) is False
        stats = client.stats()
        assert stats["dropped"] == {} and stats["retried"] == 2 and stats["requests"] == 3
        assert stats["in_outbox"] == 1

    def test_name_resolution_failure(self, make_client: MakeClient,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
        """A host name that does not resolve is retried, then given up; nothing raises.

        Name resolution is the one piece faked here: a real lookup would leave
        this machine. The failure is raised where the operating system would.
        """
        real_getaddrinfo = socket.getaddrinfo
        looked_up: list[object] = []

        def no_such_host(host: object, *args: object, **kwargs: object) -> object:
            if host == "ingest.unresolvable.test":
                looked_up.append(host)
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
        client = make_client(endpoint="https://ingest.unresolvable.test/v2/", backoff=0.01)
        client.emit("kept")
        assert client.flush(10) is False
        assert client.stats()["in_outbox"] == 1
        assert len(looked_up) == 3  # one look-up per attempt, then the circuit opened

    def test_circuit_stays_open(self, make_client: MakeClient, refused_url: str) -> None:
        """After three failed attempts the process stops touching the network; all waits in the outbox."""
        client = make_client(endpoint=refused_url, backoff=0.01)
        client.emit("first")
        assert client.flush(10) is False
        requests_before = client.stats()["requests"]
        for _ in range(50):
            client.emit("later")
        assert client.flush(10) is False
        stats = client.stats()
        assert stats["requests"] == requests_before == 3
        assert stats["dropped"] == {} and stats["in_outbox"] == 51

    def test_server_errors_then_recovery(self, make_client: MakeClient,
                                         collector: Collector) -> None:
        """A 500 then a 503 are retried, and the batch arrives exactly once."""
        collector.respond(500, times=1)
        collector.respond(503, times=1)
        client = make_client(backoff=0.01)
        for i in range(10):
            client.emit("retried", {"i": i})
        assert client.flush(10) is True
        assert len(collector.signals) == 10
        assert [r.status for r in collector.requests] == [500, 503, 200]

    def test_rejected_batch_is_dropped_not_retried(self, make_client: MakeClient,
                                                   collector: Collector) -> None:
        """A 400 means the batch will never be accepted: one request, then dropped and counted."""
        collector.respond(400, times=1)
        client = make_client(backoff=0.01)
        for _ in range(3):
            client.emit("refused")
        assert client.flush(10) is False
        assert len(collector.requests) == 1
        assert client.stats()["dropped"] == {"rejected": 3}
        client.emit("control")
        assert client.flush(5) is True

    def test_retry_after_is_a_minimum(self, make_client: MakeClient, collector: Collector) -> None:
        """A 429 with Retry-After: 1 delays the next attempt by at least a second."""
        collector.respond(429, headers={"Retry-After": "1"}, times=1)
        client = make_client(backoff=0.01)
        client.emit("later")
        assert client.flush(10) is True
        first, second = collector.requests
        assert second.arrived - first.arrived >= 0.95

    def test_events_during_backoff_neither_shorten_it_nor_get_stranded(
            self, make_client: MakeClient, collector: Collector) -> None:
        """Events emitted during a retry backoff wait for it, then go out without a flush."""
        collector.respond(503, times=1)
        client = make_client(backoff=1.0)
        client.emit("first")
        collector.wait_for_requests(1)
        client.emit("second")
        client.emit("third")
        signals = collector.wait_for(3, timeout=10)  # no flush(): the worker must carry on alone
        assert sorted(s["type"] for s in signals) == ["first", "second", "third"]
        failed, retried = collector.requests[:2]
        assert retried.arrived - failed.arrived >= 0.95

    def test_opt_out_during_a_retry_drops_the_batch(
            self, make_client: MakeClient, collector: Collector,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """A batch waiting to be retried is dropped, not sent, once the user opts out."""
        collector.respond(503, times=1)
        client = make_client(backoff=1.0)
        client.emit("before_opt_out")
        collector.wait_for_requests(1)
        monkeypatch.setenv("KAIBAN_TELEMETRY_OPT_OUT", "1")
        assert client.flush(10) is False
        assert client.stats()["dropped"] == {"opted_out": 1}
        assert len(collector.requests) == 1 and collector.signals == []

    def test_timeout_and_dropped_connection(self, make_client: MakeClient,
                                            collector: Collector) -> None:
        """A server that stalls past the timeout, then one that hangs up, are both retried.
        The stalled request ends as a 503 when the client has long given up on it, so that
        however slowly the retries go, it never counts as a delivery."""
        collector.respond(503, delay=5.0, times=1)
        collector.respond(drop=True, times=1)
        client = make_client(timeout=1.0, backoff=0.01)
        client.emit("eventually")
        assert client.flush(15) is True
        assert [s["type"] for s in collector.signals] == ["eventually"]
        assert client.stats()["retried"] == 2

    def test_a_raising_transport_costs_nothing_but_a_retry(self, make_client: MakeClient) -> None:
        """A custom transport that raises is treated as a network failure; the sender lives on."""
        from kaibantrace.testing import MemoryTransport

        class FlakyTransport(MemoryTransport):
            failures = 1

            def send(self, url: str, body: bytes, timeout: float) -> Any:
                if self.failures:
                    self.failures -= 1
                    raise RuntimeError("transport bug")
                return super().send(url, body, timeout)

        transport = FlakyTransport()
        client = make_client(transport=transport, backoff=0.01)
        client.emit("first")
        assert client.flush(10) is True
        client.emit("second")
        assert client.flush(10) is True
        assert [s["type"] for s in transport.signals] == ["first", "second"]
        assert client.stats()["retried"] == 1

    def test_odd_input_refuses_one_event_not_the_batch(self, make_client: MakeClient,
                                                       collector: Collector) -> None:
        """Values that break encoding cost their field or event, never the others in the batch."""
        client = make_client(flush_interval=0.5)
        client.emit("good", {"i": 1})
        client.emit("huge_number", {"n": 10**5000})  # too long to print: field dropped
        client.emit(["not", "a", "name"])  # type: ignore[arg-type]
        client.emit("huge_float", float_value=10**400)  # beyond a double: value left out
        client.emit("good", {"i": 2})
        assert client.flush(10) is False  # the bad name was not delivered
        types = [s["type"] for s in collector.wait_for(4)]
        assert types == ["good", "huge_number", "huge_float", "good"]
        signals = {s["type"]: s for s in collector.signals}
        assert "payload" not in signals["huge_number"] and "floatValue" not in signals["huge_float"]
        assert client.stats()["dropped"] == {"invalid_name": 1}

    def test_overflow_makes_flush_false(self, make_client: MakeClient, collector: Collector) -> None:
        """When the queue overflowed, flush() says not everything was delivered."""
        client = make_client(max_queue=10, flush_interval=30)
        for _ in range(100):
            client.emit("flood")
        assert client.flush(10) is False
        assert client.stats()["dropped"] == {"queue_full": 90}
        client.emit("calm")
        assert client.flush(10) is True

    def test_a_hanging_request_does_not_stop_the_queue_draining(
            self, make_client: MakeClient, black_hole_url: str) -> None:
        """While a request hangs, the queue still moves into the outbox: bursts that together
        exceed the in-memory queue are all kept, none dropped."""
        client = make_client(endpoint=black_hole_url, max_queue=1000, timeout=5)
        for burst in range(1, 4):
            for i in range(900):
                client.emit("burst", {"i": i})
            _until(lambda kept=900 * burst: client.stats()["pending"] == 0
                   and client.stats()["in_outbox"] == kept)
            _until(lambda: client.stats()["in_flight"] > 0)  # the request is still hanging
        assert client.stats()["dropped"] == {}

    def test_a_slow_endpoint_loses_nothing_the_queue_can_hold(
            self, make_client: MakeClient, collector: Collector,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """An endpoint that takes 0.7 s per request empties a full outbox slowly, but it
        does: what does not fit waits in the queue, and nothing is dropped."""
        _small_outbox(monkeypatch, 300)
        collector.respond(delay=0.7)
        client = make_client(max_queue=400)
        for i in range(300):
            client.emit("slow", {"i": i})
        _until(lambda: client.stats()["pending"] == 0)  # in the outbox, which they fill
        for i in range(300, 500):
            client.emit("slow", {"i": i})
        assert client.flush(30) is True, client.stats()
        assert client.stats()["dropped"] == {}
        assert sorted(int(s["payload"]["i"]) for s in collector.signals) == list(range(500))

    def test_a_flush_cuts_the_backoff_short_while_the_outbox_is_full(
            self, make_client: MakeClient, collector: Collector,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """After a failure, with the outbox full and more events waiting in the queue for
        room, flush() still cuts this process's 30 s backoff short, as it does when the
        outbox has room: everything is delivered, and no wait runs out."""
        _small_outbox(monkeypatch, 300)
        collector.respond(503, times=1)
        client = make_client(max_queue=400, backoff=30)
        for i in range(300):
            client.emit("full", {"i": i})
        _until(lambda: client.stats()["retried"] == 1)  # the first request failed
        for i in range(300, 310):
            client.emit("full", {"i": i})
        assert client.flush(20) is True, client.stats()
        assert sorted(int(s["payload"]["i"]) for s in collector.signals) == list(range(310))

    def test_a_stuck_endpoint_costs_the_oldest_signals_not_the_newest(
            self, make_client: MakeClient, black_hole_url: str,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """With the outbox full and its request hanging, the rest waits in the queue, and
        nothing is lost, until the queue is three quarters full; then the outbox takes it
        all, dropping its oldest. The newest signals are kept, and the queue never
        overflows."""
        _small_outbox(monkeypatch, 300)
        client = make_client(endpoint=black_hole_url, max_queue=400, timeout=20)
        for i in range(300):
            client.emit("stuck", {"i": i})
        _until(lambda: client.stats()["in_outbox"] == 300 and client.stats()["in_flight"] > 0)
        for i in range(300, 500):
            client.emit("stuck", {"i": i})
        assert client.flush(1.0) is False  # not delivered: waiting, in the queue
        assert client.stats()["dropped"] == {} and client.stats()["pending"] == 200
        for i in range(500, 600):  # the queue is three quarters full
            client.emit("stuck", {"i": i})
        _until(lambda: client.stats()["pending"] == 0
               and sum(client.stats()["dropped"].values()) == 300)
        assert client.stats()["dropped"] == {"outbox_full": 300}
        assert _payloads_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == list(range(300, 600))

    def test_invalid_endpoint_from_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A clear-text non-loopback endpoint from the environment sends nothing and raises nothing."""
        monkeypatch.setenv("KAIBAN_TELEMETRY_ENDPOINT", "http://example.invalid/v2/")
        client = kaibantrace.Telemetry(app_id="15E9347E-9EE5-4971-A8FB-61D91F3EBA12",
                                       flush_interval=0.01)
        client.emit("nowhere")
        assert client.flush(5) is False
        assert client.stats()["dropped"] == {"bad_endpoint": 1}
        client.shutdown()


class TestShutdown:
    def test_what_the_writer_still_saves_is_sent_before_the_poster_ends(
            self, make_client: MakeClient, collector: Collector,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """shutdown() wakes the writer, asleep while a batch fills, and the poster: the
        poster's last pass waits for the writer's last batch (here slowed to 0.3 s) rather
        than leave it in the outbox for the next run."""
        from kaibantrace._client import delivery as _delivery
        from kaibantrace._delivery import outbox as _outbox

        def slow_outbox(directory: str, app_id: str) -> _outbox.Outbox:
            box = _outbox.open_outbox(directory, app_id)
            add = box.add

            def slow_add(*args: Any) -> _outbox.Added:
                time.sleep(0.3)
                return add(*args)

            box.add = slow_add  # type: ignore[method-assign]
            return box

        monkeypatch.setattr(_delivery, "open_outbox", slow_outbox)
        client = make_client(flush_interval=30)  # the writer waits for a batch to fill
        client.emit("warm")
        assert client.flush(10)  # the poster is set up and idle
        client.emit("last")
        client.shutdown(timeout=5)
        assert sorted(s["type"] for s in collector.signals) == ["last", "warm"]


class TestConcurrency:
    def test_many_threads(self, make_client: MakeClient, collector: Collector) -> None:
        """8 threads emitting 500 events each: every one arrives exactly once."""
        client = make_client(flush_interval=0.05)

        def work(n: int) -> None:
            for i in range(500):
                client.emit("threaded", {"n": n, "i": i})

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert client.flush(30)
        seen = [(s["payload"]["n"], s["payload"]["i"]) for s in collector.wait_for(4000)]
        assert len(seen) == len(set(seen)) == 4000

    def test_stats_while_others_emit(self, make_client: MakeClient) -> None:
        """stats() can be read at any moment while other threads emit and the worker sends."""
        client = make_client(flush_interval=0.001)
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                client.emit("busy")

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for _ in range(3000):
                stats = client.stats()
                assert isinstance(stats["pending"], int)
        finally:
            stop.set()
            for t in threads:
                t.join(10)

    def test_overflow_is_counted_exactly(self, make_client: MakeClient, collector: Collector) -> None:
        """With a tiny queue and 8 busy threads, every event is either delivered or counted dropped."""
        client = make_client(max_queue=50, batch_size=10)

        def work() -> None:
            for _ in range(1000):
                client.emit("flood")

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        client.flush(30)
        stats = client.stats()
        dropped = stats["dropped"]
        assert isinstance(dropped, dict) and set(dropped) <= {"queue_full"}
        assert stats["sent"] + dropped.get("queue_full", 0) == 8000
        assert len(collector.signals) == stats["sent"]

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    # Forking while our sender thread runs is exactly the case under test.
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_fork_child_gets_a_fresh_sender(self, make_client: MakeClient,
                                            collector: Collector) -> None:
        """Parent and forked child both deliver; the child never re-sends the parent's queue."""
        client = make_client(flush_interval=30)
        client.emit("parent_before_fork")  # still queued at fork time
        pid = os.fork()
        if pid == 0:  # the child: emit, flush, and leave without running the parent's cleanup
            code = 1
            try:
                client.emit("child")
                code = 0 if client.flush(10) else 2
                if code:
                    sys.stderr.write(f"child: flush failed; stats {client.stats()}\n")
            finally:
                os._exit(code)
        assert _exit_code_of(pid) == 0
        assert client.flush(10)
        types = sorted(s["type"] for s in collector.wait_for(2))
        assert types == ["child", "parent_before_fork"]
        parent_sessions = {s["sessionID"] for s in collector.signals if s["type"] != "child"}
        child_sessions = {s["sessionID"] for s in collector.signals if s["type"] == "child"}
        assert parent_sessions.isdisjoint(child_sessions)

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_fork_while_another_thread_decides_leaves_the_child_no_held_lock(
            self, make_client: MakeClient, collector: Collector) -> None:
        """A thread holds a client's lock (deciding where its first event goes) when the
        process forks: the child's first event of that client must not wait for a thread
        the child does not have, even though that client had no sender to look after."""
        running = make_client()
        running.emit("start")  # the fork hooks are registered with a sender
        assert running.flush(10)
        idle = make_client()  # no event yet: no sender, not among the clients with one
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with idle._router.lock:
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert held.wait(10)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    idle.emit("child")
                    code = 0 if idle.flush(10) else 2
                finally:
                    os._exit(code)
            assert _exit_code_of(pid) == 0
        finally:
            release.set()
            holder.join()
        assert "child" in [s["type"] for s in collector.wait_for(2)]

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_fork_waits_while_the_sender_sets_up(self, make_client: MakeClient) -> None:
        """A fork never lands while the sender prepares its HTTP stack (an import in progress
        would leave the child a module lock held by a thread it does not have)."""
        started = threading.Event()

        class SlowToPrepare(MemoryTransport):
            prepared = False

            def prepare(self) -> None:
                started.set()
                time.sleep(0.3)  # the window a fork must not land in
                self.prepared = True

        transport = SlowToPrepare()
        client = make_client(transport=transport)
        client.emit("starts_the_sender")
        assert started.wait(10)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if transport.prepared else 1)
        assert _exit_code_of(pid) == 0, "the fork landed while the sender was preparing"


def _small_outbox(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """Outboxes that hold ``rows`` signals instead of 10,000, so that a test fills one with
    a few hundred."""
    from kaibantrace._client import delivery as _delivery
    from kaibantrace._delivery import outbox as _outbox

    monkeypatch.setattr(_delivery, "open_outbox", lambda directory, app_id: _outbox.open_outbox(
        directory, app_id, max_signals=rows))


def _payloads_in_outbox(directory: str) -> List[int]:
    """The ``i`` of each signal in the app's outbox file under ``directory``, in order."""
    from kaibantrace._delivery.outbox import outbox_path

    with contextlib.closing(sqlite3.connect(outbox_path(directory, APP_ID))) as db:
        bodies = [body for (body,) in db.execute("SELECT body FROM signals ORDER BY id")]
    return [int(json.loads(body)["payload"]["i"]) for body in bodies]


def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait until ``condition()`` holds; fail the test when it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("the condition never held")
        time.sleep(0.005)


def _exit_code_of(pid: int, timeout: float = 30.0) -> int:
    """Wait for a forked child; kill it and fail the test if it hangs."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)


_EXITING_CHILD = textwrap.dedent("""
    import socket, sys, threading, time, kaibantrace

    kaibantrace.configure(app_id="15E9347E-9EE5-4971-A8FB-61D91F3EBA12", endpoint=sys.argv[1],
                          max_per_minute=0)  # a burst, which the budget would hold back

    @kaibantrace.track("workflow_started", payload=lambda args: {"i": args["i"]})
    def work(i):
        return i

    if "stuck-resolver" in sys.argv:  # a resolver that never answers, as offline machines have
        real_getaddrinfo = socket.getaddrinfo

        def getaddrinfo(host, *args, **kwargs):
            if host == "ingest.unresolvable.test":
                threading.Event().wait()
            return real_getaddrinfo(host, *args, **kwargs)

        socket.getaddrinfo = getaddrinfo
        kaibantrace.emit("first")
        while kaibantrace.default_client().stats()["in_flight"] == 0:  # stuck resolving
            time.sleep(0.01)
    for i in range(250):
        work(i)
    if "flush" in sys.argv:
        assert kaibantrace.flush(10)
    print("done", flush=True)
""")


class TestExit:
    def run_child(self, url: str, tmp_path: Path, *args: str
                  ) -> tuple[subprocess.CompletedProcess[str], float]:
        """Run the child; return it and the seconds from its last printed line to its exit."""
        child = subprocess.Popen([sys.executable, "-c", _EXITING_CHILD, url, *args],
                                 env=subprocess_env(),
                                 cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout is not None
            first = child.stdout.readline()
            printed = time.monotonic()
            rest, err = child.communicate(timeout=60)
            took = time.monotonic() - printed
        finally:
            if child.poll() is None:
                child.kill()
        return subprocess.CompletedProcess(child.args, child.returncode, first + rest, err), took

    def test_black_holed_endpoint_does_not_hang_exit(self, black_hole_url: str,
                                                     tmp_path: Path) -> None:
        """Exit is bounded and silent when the endpoint accepts and never answers."""
        done, took = self.run_child(black_hole_url, tmp_path)
        assert (done.returncode, done.stdout, done.stderr) == (0, "done\n", "")
        assert took < 3  # a generous guard around the 100 ms budget (benchmarks/ measures it)

    def test_unresolvable_host_does_not_hang_exit(self, tmp_path: Path) -> None:
        """A sender stuck in name resolution (which cannot be interrupted) does not hold up
        exit, and what was queued is in the outbox."""
        done, took = self.run_child("https://ingest.unresolvable.test/v2/", tmp_path,
                                    "stuck-resolver")
        assert (done.returncode, done.stdout, done.stderr) == (0, "done\n", "")
        assert took < 3
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 251

    def test_refused_endpoint_exit_is_silent(self, refused_url: str, tmp_path: Path) -> None:
        """Exit is bounded and silent when the endpoint refuses connections."""
        done, took = self.run_child(refused_url, tmp_path)
        assert (done.returncode, done.stdout, done.stderr) == (0, "done\n", "")
        assert took < 3

    def test_healthy_endpoint_gets_everything_once_over_runs(self, collector: Collector,
                                                             tmp_path: Path) -> None:
        """What short runs could not send within their exit budget, a later run sends; none twice."""
        for _ in range(2):
            done, _ = self.run_child(collector.url, tmp_path)
            assert (done.returncode, done.stderr) == (0, "")
        done, _ = self.run_child(collector.url, tmp_path, "flush")
        assert (done.returncode, done.stderr) == (0, "")
        signals = collector.wait_for(750)
        assert len(signals) == 750
        assert len({(s["sessionID"], s["payload"]["i"]) for s in signals}) == 750
