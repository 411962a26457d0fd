"""Short runs deliver: the detached delivery process, across real processes.

Each test runs real Python processes (a click CLI, plain scripts) against a real
loopback collector or a black hole, with delivery processes turned back on
(``conftest`` turns them off for the rest of the suite). The ``conftest``
teardown fails a test that leaves a delivery process running.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

import kaibantrace
from kaibantrace._delivery import handoff as _handoff
from kaibantrace._delivery.outbox import SqliteOutbox, delivery_runs, outbox_path
from kaibantrace.testing import Collector

from .conftest import APP_ID, rows_in_outbox, subprocess_env

pytestmark = pytest.mark.skipif(os.name != "posix", reason="delivery processes are tested on POSIX")

# A CLI as authors write them: click, wrapped with track_cli, about 50 ms of work, no flush().
CLI = """
import time, click, kaibantrace
kaibantrace.configure(timeout=float(__import__("os").environ.get("CLI_TIMEOUT", "3")))

@kaibantrace.track_cli("run_board")
@click.command()
def main():
    time.sleep(0.05)

if __name__ == "__main__":
    main()
"""


@pytest.fixture
def cli(tmp_path: Path) -> Path:
    path = tmp_path / "board.py"
    path.write_text(CLI)
    return path


def state() -> str:
    return os.environ["KAIBAN_TELEMETRY_DIR"]


def run_cli(cli: Path, url: str, cwd: Optional[Path] = None, **env: str
            ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, str(cli)], capture_output=True, text=True, timeout=60,
                          cwd=cwd,
                          env=subprocess_env(**{"KAIBAN_TELEMETRY_APP_ID": APP_ID,
                                                "KAIBAN_TELEMETRY_ENDPOINT": url,
                                                "KAIBAN_TELEMETRY_DETACHED": "1", **env}))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return done


def run_script(source: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", source, *args], capture_output=True, text=True,
                          timeout=60, env=subprocess_env(**{"KAIBAN_TELEMETRY_DETACHED": "1", **env}))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return done


def leave_in_outbox(url: str, count: int = 1) -> None:
    """Signals waiting for ``url``, as a process that could not send would leave them; each
    has its number in its payload."""
    outbox = SqliteOutbox(outbox_path(state(), APP_ID))
    outbox.add(APP_ID, url, [(time.time(), json.dumps({
        "appID": APP_ID, "clientUser": "0" * 64, "type": "waiting", "payload": {"n": str(n)}}))
        for n in range(count)])


def wait_for_delivery_end(timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while _handoff.running(state(), APP_ID) is not None:
        assert time.monotonic() < deadline, "the delivery process did not end"
        time.sleep(0.05)


class BlackHole:
    """A loopback server that accepts connections, counts them, and never answers."""

    def __init__(self) -> None:
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.accepted = 0
        self._held: List[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}/v2/"

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(connection)

    def close(self) -> None:
        self._server.close()
        for connection in self._held:
            connection.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


class TestShortRuns:
    def test_twenty_runs_deliver_every_event_exactly_once(self, cli: Path, collector: Collector) -> None:
        """20 runs of a click CLI, none calling flush(): every event arrives, once, within
        15 s of the last exit (before delivery processes, none did)."""
        for _ in range(20):
            run_cli(cli, collector.url)
        last_exit = time.monotonic()
        signals = collector.wait_for(21, timeout=15.0)
        assert time.monotonic() - last_exit < 15.0
        wait_for_delivery_end()
        signals = collector.signals
        runs = [s for s in signals if s["type"] == "run_board"]
        assert len(runs) == 20 and len({s["sessionID"] for s in runs}) == 20
        assert [s["type"] for s in signals].count("install") == 1
        assert len(signals) == 21  # nothing twice
        assert rows_in_outbox(state()) == 0
        assert 1 <= len(delivery_runs(state(), APP_ID)) <= 20

    def test_a_loop_against_a_black_hole_starts_a_handful(self, cli: Path, black_hole: BlackHole) -> None:
        """30 runs against an endpoint that never answers: the backoff outlives each run, so
        only a few delivery processes start, and few connections are tried."""
        for _ in range(30):
            run_cli(cli, black_hole.url, CLI_TIMEOUT="0.3")
        wait_for_delivery_end()
        started = len(delivery_runs(state(), APP_ID))
        assert 1 <= started <= 3, started
        # Each delivery process tries at most three times; a run or two may try once before
        # the first failure is on record.
        assert black_hole.accepted <= 3 * started + 5
        assert rows_in_outbox(state()) == 31  # all kept for later
        with contextlib.closing(sqlite3.connect(outbox_path(state(), APP_ID))) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert not list(Path(state()).glob("*.corrupt-*"))

    def test_the_delivery_process_is_detached(self, cli: Path, black_hole: BlackHole,
                                              tmp_path: Path) -> None:
        """A caller that captures the CLI's output is not kept waiting by the delivery
        process: it holds none of the parent's pipes, runs in a session of its own, at low
        priority, with the null device for its standard streams."""
        marker = tmp_path / "pipe"
        source = CLI.replace("def main():\n", "def main():\n    r, w = __import__('os').pipe()\n"
                             "    __import__('os').set_inheritable(w, True)\n"
                             f"    open({str(marker)!r}, 'w').write(__import__('os').readlink("
                             "f'/proc/self/fd/{w}'))\n")
        script = tmp_path / "detached.py"
        script.write_text(source)
        run_cli(script, black_hole.url, CLI_TIMEOUT="1")  # capture_output: returns at the parent's exit
        pid = _handoff.running(state(), APP_ID)
        assert pid, "the delivery process should still be trying the black hole"
        try:
            assert os.getsid(pid) == pid
            assert os.getpriority(os.PRIO_PROCESS, pid) >= 10
            links = {}
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    links[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    pass
            assert all(links[fd] == os.devnull for fd in (0, 1, 2))
            assert marker.read_text() not in links.values()  # the inheritable pipe stayed behind
            assert not any(link.startswith("pipe:") for link in links.values())
        finally:
            wait_for_delivery_end()

    def test_modules_in_the_working_directory_are_not_imported_by_it(
            self, cli: Path, collector: Collector, tmp_path: Path) -> None:
        """The user runs the tool from a directory of their own, holding a ``json.py`` and a
        ``kaibantrace`` package: the delivery process imports neither."""
        work = tmp_path / "work"
        (work / "kaibantrace").mkdir(parents=True)
        (work / "json.py").write_text("raise SystemExit('the wrong json')\n")
        (work / "kaibantrace" / "__init__.py").write_text("raise SystemExit('the wrong copy')\n")
        run_cli(cli, collector.url, cwd=work)
        assert [s["type"] for s in collector.wait_for(2, timeout=15)].count("run_board") == 1
        wait_for_delivery_end()

    @pytest.mark.parametrize("how", ["KAIBAN_TELEMETRY_DETACHED=0", "detached_delivery=False",
                                     "frozen", "KAIBAN_TELEMETRY_OPT_OUT=1"])
    def test_when_none_is_started(self, how: str, collector: Collector, tmp_path: Path) -> None:
        source = ("import sys, kaibantrace\n"
                  f"c = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint=sys.argv[1]"
                  + (", detached_delivery=False" if how == "detached_delivery=False" else "") + ")\n"
                  "c.emit('left')\n"
                  + ("sys.frozen = True\n" if how == "frozen" else ""))
        env = dict([how.split("=")]) if how.startswith("KAIBAN") else {}
        run_script(source, collector.url, **env)
        assert not list(Path(state()).glob("delivery-*"))
        assert collector.signals == []
        assert rows_in_outbox(state()) == (0 if "OPT_OUT" in how else 1)

    def test_a_parent_that_finds_one_running_starts_none(self, collector: Collector) -> None:
        held = _handoff.take_lock(state(), APP_ID)  # as a running delivery process holds it
        assert held is not None
        try:
            for _ in range(3):
                run_script("import sys, kaibantrace\n"
                           f"kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint=sys.argv[1]).emit('x')\n",
                           collector.url)
            assert delivery_runs(state(), APP_ID) == [] and rows_in_outbox(state()) == 3
        finally:
            os.close(held)

    def test_events_from_an_atexit_handler_registered_first_are_delivered(self, collector: Collector) -> None:
        """atexit runs handlers last-registered first: this one runs after kaibantrace's."""
        run_script("import atexit, sys, kaibantrace\n"
                   f"c = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint=sys.argv[1])\n"
                   "atexit.register(lambda: c.emit('late'))\n"
                   "c.emit('early')\n", collector.url)
        assert sorted(s["type"] for s in collector.wait_for(2, timeout=15)) == ["early", "late"]
        wait_for_delivery_end()
        assert len(collector.signals) == 2


class TestLongerRuns:
    def test_a_burst_is_sent_from_the_program_itself_without_waiting_to_set_up(
            self, collector: Collector) -> None:
        """Where a delivery process could take what is left, the poster waits a second before
        importing its HTTP stack; not with a backlog, or the outbox would fill meanwhile and
        drop the oldest."""
        done = run_script(
            "import json, sys, time, kaibantrace\n"
            f"c = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint=sys.argv[1], max_per_minute=0)\n"
            "for i in range(25000):\n"
            "    c.emit('burst')\n"
            "    while c.stats()['pending'] > 5000:\n        time.sleep(0.001)\n"
            "print(c.flush(60), json.dumps(c.stats()['dropped']))\n", collector.url)
        assert done.stdout.split() == ["True", "{}"]
        assert len(collector.signals) == 25000


class TestDuplicates:
    def test_a_process_ending_mid_claim_leaves_no_duplicates(self, collector: Collector) -> None:
        """The endpoint answers after 150 ms; the process emits 3,000 events and ends after
        a second, mid-claim. Every event arrives exactly once."""
        collector.respond(200, delay=0.15)
        run_script("import sys, time, kaibantrace\n"
                   f"c = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint=sys.argv[1], "
                   "max_per_minute=0)\n"
                   "for i in range(3000):\n    c.emit('e', {'i': i})\n"
                   "time.sleep(1.0)\n", collector.url)
        collector.wait_for(3000, timeout=40)
        wait_for_delivery_end()
        counts = collections.Counter(s["payload"]["i"] for s in collector.signals)
        assert len(counts) == 3000 and max(counts.values()) == 1


class TestBound:
    def test_a_delivery_process_ending_at_its_bound_leaves_no_duplicates(self, collector: Collector) -> None:
        """It starts no request that could still be under way when its time is up: what it
        did not send is sent once, by the next one.

        The server answers in 2 s and the run may last 6 s, so it sends one batch of the
        three: after the first answer less than 4 s is left, and a request starts only with
        more than twice the last answer's time to go. That first request may wait half of
        what is left when it starts, about 3 s: a second to spare. A bound of 2.8 s with
        answers in 1 s left it a few tenths; on a busy machine a slow start ate them, the
        request timed out after the server had accepted it, and the next run sent its 100
        signals again."""
        collector.respond(200, delay=2.0)
        leave_in_outbox(collector.url, 300)
        deliver = [sys.executable, "-m", "kaibantrace", "deliver", "--app", APP_ID,
                   "--endpoint", collector.url, "--json", "--timeout", "10"]
        first = subprocess.run([*deliver, "--max-time", "6"], capture_output=True, text=True,
                               timeout=60, env=subprocess_env())
        report = json.loads(first.stdout)
        assert report["sent"] == 100 and report["left"] == 200, report
        with contextlib.closing(sqlite3.connect(outbox_path(state(), APP_ID))) as db:
            (leased,) = db.execute("SELECT COUNT(*) FROM signals WHERE lease_until > ?",
                                   (time.time(),)).fetchone()
        assert leased == 0  # nothing left that the server may have been accepting
        subprocess.run(deliver, capture_output=True, text=True, timeout=60, env=subprocess_env())
        counts = collections.Counter(s["payload"]["n"] for s in collector.wait_for(300, timeout=30))
        assert len(counts) == 300 and max(counts.values()) == 1

    def test_run_in_the_program_itself_it_leaves_no_alarm_behind(self, collector: Collector) -> None:
        """``command_line(["deliver"])`` in a host: no kill timer, and later hand-offs still
        happen."""
        import signal

        leave_in_outbox(collector.url)
        assert kaibantrace.command_line(["deliver", "--app", APP_ID, "--endpoint", collector.url,
                                         "--max-time", "3"]) == 0
        assert signal.alarm(0) == 0 and _handoff.in_delivery_process is False
        assert len(collector.signals) == 1


class TestSharedBackoff:
    def test_a_new_process_does_not_retry_what_another_found_down(self, collector: Collector) -> None:
        collector.respond(503)
        failing = ("import sys, kaibantrace\n"
                   f"c = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint=sys.argv[1])\n"
                   "c.emit('x')\nprint(c.flush(10))\n")
        assert run_script(failing, collector.url, KAIBAN_TELEMETRY_DETACHED="0").stdout.strip() == "False"
        tried = len(collector.requests)
        assert tried == 3  # its circuit opened
        started = time.monotonic()
        assert run_script(failing, collector.url, KAIBAN_TELEMETRY_DETACHED="0").stdout.strip() == "False"
        assert len(collector.requests) == tried  # the next process did not try at all
        assert time.monotonic() - started < 8  # and its flush said so without waiting out 10 s
        assert rows_in_outbox(state()) == 2


@contextlib.contextmanager
def outbox_held_by_another_process() -> Iterator[None]:
    """The app's outbox exists, and a transaction of another process holds it meanwhile."""
    client = kaibantrace.Telemetry(app_id=APP_ID, endpoint="http://127.0.0.1:9/v2/",
                                   detached_delivery=False)
    client.emit("make_the_outbox")
    client.flush(0.5)
    client.shutdown()
    with contextlib.closing(sqlite3.connect(outbox_path(state(), APP_ID), isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            db.execute("ROLLBACK")


class TestExit:
    def test_another_process_holding_the_outbox_delays_exit_by_the_budget_only(self) -> None:
        with outbox_held_by_another_process():
            done = run_script(
                "import atexit, sys, time\n"
                "times = {}\n"
                "atexit.register(lambda: print(time.perf_counter() - times['hook']))\n"
                "import kaibantrace\n"
                f"c = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint='http://127.0.0.1:9/v2/')\n"
                "c.emit('first')\n"
                "atexit.register(lambda: times.__setitem__('hook', time.perf_counter()))\n"
                "for i in range(10):\n    c.emit('e')\n", KAIBAN_TELEMETRY_DETACHED="0")
        assert float(done.stdout) < 0.9  # the budget is 0.1 s; it used to wait a whole second

    def test_events_after_the_exit_hook_wait_for_the_outbox_no_longer_than_the_budget(self) -> None:
        with outbox_held_by_another_process():
            done = run_script(
                "import atexit, sys, time\n"
                "import kaibantrace\n"
                f"c = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint='http://127.0.0.1:9/v2/')\n"
                "def late():\n"
                "    started = time.perf_counter()\n"
                "    for i in range(3):\n        c.emit('late')\n"
                "    print(time.perf_counter() - started)\n"
                "atexit.register(late)\n"  # before the first event: runs after kaibantrace's hook
                "c.emit('first')\n", KAIBAN_TELEMETRY_DETACHED="0")
        assert float(done.stdout) < 1.9  # three events; each used to wait two seconds


class TestUserControl:
    def test_disable_stops_sending_within_one_request(self, collector: Collector) -> None:
        collector.respond(200, delay=0.2)
        client = kaibantrace.Telemetry(app_id=APP_ID, endpoint=collector.url, batch_size=10,
                                       flush_interval=0.01, max_per_minute=0)
        try:
            for i in range(500):
                client.emit("e", {"i": i})
            collector.wait_for_requests(1, timeout=10)
            assert kaibantrace.command_line(["disable"], client=client) == 0
            asked = len(collector.requests)
            deadline = time.monotonic() + 10
            while not client.stats()["dropped"].get("opted_out"):  # type: ignore[attr-defined]
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert len(collector.requests) <= asked + 1
        finally:
            client.shutdown()

    def test_delivery_process_shows_in_status_and_ends_within_its_bound(
            self, black_hole: BlackHole) -> None:
        leave_in_outbox(black_hole.url)
        command = [sys.executable, "-m", "kaibantrace", "deliver", "--app", APP_ID, "--endpoint",
                   black_hole.url, "--timeout", "30", "--max-time", "5", "--json"]
        started = time.monotonic()
        child = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while _handoff.running(state(), APP_ID) is None:
                assert child.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            status = subprocess.run([sys.executable, "-m", "kaibantrace", "status", "--json", "--app",
                                     APP_ID], env=subprocess_env(), capture_output=True, text=True,
                                    timeout=60)
            assert json.loads(status.stdout)["delivery_process"] == {APP_ID: child.pid}
            out, _ = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
        assert time.monotonic() - started < 20  # bounded by --max-time, not by the 30 s request
        report = json.loads(out)
        assert report["sent"] == 0 and report["left"] == 1 and "5 s" in report["problem"]

    def test_the_delivery_process_decides_opt_out_again(self, collector: Collector) -> None:
        leave_in_outbox(collector.url)
        done = subprocess.run([sys.executable, "-m", "kaibantrace", "deliver", "--app", APP_ID,
                               "--endpoint", collector.url, "--json"], capture_output=True, text=True,
                              timeout=60, env=subprocess_env(DO_NOT_TRACK="1"))
        # Opted out, it sends nothing, and removes what waited (as any opted-out process does).
        assert json.loads(done.stdout) == {"ok": False, "sent": 0, "left": 0,
                                           "problem": "telemetry is off"}
        assert collector.requests == [] and rows_in_outbox(state()) == 0


class TestPlantedRows:
    def test_rows_that_are_not_signals_of_the_app_are_dropped_never_sent(self, collector: Collector) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID, endpoint=collector.url, detached_delivery=False)
        client.emit("good", {"n": 0})
        assert client.flush(10)
        good = json.dumps(collector.signals[0], separators=(",", ":"))
        client.shutdown()
        other_app = good.replace(APP_ID, "6C1A37E0-2F4B-4E8D-9B7A-3D5E1F2A4C60")
        planted: List[object] = [
            "not json at all", other_app, good[:-1] + ',"x":"' + "y" * 5_000_000 + '"}',
            good.replace('"good"', '"go\x1eod"'), good, good,
            good.replace('"good"', '"g\xffood"').encode("latin-1")]  # bytes that are not UTF-8
        db = sqlite3.connect(outbox_path(state(), APP_ID), isolation_level=None)
        try:
            db.executemany("INSERT INTO signals (app_id, url, created, body, origin) "
                           "VALUES (?, ?, ?, CAST(? AS TEXT), ?)",
                           [(APP_ID.lower(), collector.url, time.time(), body, "planted")
                            for body in planted])
        finally:
            db.close()
        reader = kaibantrace.Telemetry(app_id=APP_ID, endpoint=collector.url, detached_delivery=False)
        try:
            reader.emit("after")
            assert reader.flush(10) is False  # something was dropped since the last flush
            types = [s["type"] for s in collector.signals]
            assert sorted(types) == ["after", "good", "good", "good"]  # the first, two planted, one new
            assert reader.stats()["dropped"]["invalid_row"] == 5  # type: ignore[index]
            assert all(s["appID"] == APP_ID for s in collector.signals)
        finally:
            reader.shutdown()
