"""The durable outbox: bounded, private, shared safely between processes, never lost."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, List

import pytest

import kaibantrace
from kaibantrace._delivery.fallback import MEMORY_BASE, FallbackOutbox
from kaibantrace._delivery.outbox import MemoryOutbox, Outbox, SqliteOutbox, open_outbox, outbox_path, purge
from kaibantrace.testing import Collector

from .conftest import APP_ID, open_port, rows_in_outbox, subprocess_env

MakeClient = Callable[..., kaibantrace.Telemetry]
URL = "http://127.0.0.1:9/v2/"


def signals(n: int, start: float = 0.0) -> list[tuple[float, str]]:
    now = start or time.time()
    return [(now, f'{{"n":{i}}}') for i in range(n)]


@pytest.fixture(params=["sqlite", "memory", "file with memory behind"])
def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> Outbox:
    if request.param == "sqlite":
        return SqliteOutbox(str(tmp_path / "o.sqlite3"), max_signals=10)
    if request.param == "memory":
        return MemoryOutbox(max_signals=10)
    return FallbackOutbox(SqliteOutbox(str(tmp_path / "o.sqlite3"), max_signals=10))


class TestOutboxContract:
    def test_claims_oldest_first_and_leases(self, outbox: Outbox) -> None:
        """A claim takes the oldest rows and leases them, so a second claim gets the next ones."""
        outbox.add(APP_ID, URL, signals(5))
        first = outbox.claim(APP_ID, URL, 3, lease=60)
        second = outbox.claim(APP_ID, URL, 3, lease=60)
        assert [r.body for r in first] == ['{"n":0}', '{"n":1}', '{"n":2}']
        assert [r.body for r in second] == ['{"n":3}', '{"n":4}']
        assert outbox.claim(APP_ID, URL, 3, lease=60) == []

    def test_release_and_delete(self, outbox: Outbox) -> None:
        """Released rows can be claimed again at once; deleted rows are gone."""
        outbox.add(APP_ID, URL, signals(2))
        rows = outbox.claim(APP_ID, URL, 2, lease=60)
        outbox.release([rows[0].id])
        outbox.delete([rows[1].id])
        assert [r.id for r in outbox.claim(APP_ID, URL, 5, lease=60)] == [rows[0].id]
        assert outbox.count(APP_ID, URL) == 1

    def test_targets_are_separate(self, outbox: Outbox) -> None:
        """Rows for another app or endpoint are never claimed for this one."""
        outbox.add(APP_ID, URL, signals(1))
        outbox.add(APP_ID, "http://127.0.0.1:8/v2/", signals(1))
        assert len(outbox.claim(APP_ID, URL, 10, lease=60)) == 1
        assert outbox.count(APP_ID, URL) == 1

    def test_bounded_by_dropping_the_oldest(self, outbox: Outbox) -> None:
        """Past the bound (10 here, 10,000 by default) the oldest rows go, and are reported."""
        added = outbox.add(APP_ID, URL, signals(15))
        assert added.full == 5
        bodies = [r.body for r in outbox.claim(APP_ID, URL, 20, lease=60)]
        assert bodies == [f'{{"n":{i}}}' for i in range(5, 15)]

    def test_older_than_a_day_expires(self, outbox: Outbox) -> None:
        """Signals older than 24 hours are dropped (the ingest would clamp them) and reported."""
        added = outbox.add(APP_ID, URL, signals(2, start=time.time() - 25 * 3600) + signals(1))
        assert added.expired == 2 and outbox.count(APP_ID, URL) == 1

    def test_count_mine_and_drop_app(self, outbox: Outbox) -> None:
        """count_mine counts this process's rows up to an id; drop_app empties the app."""
        last = outbox.add(APP_ID, URL, signals(3)).last_id
        assert outbox.count_mine(last) == 3 and outbox.count_mine(last - 1) == 2
        assert outbox.drop_app(APP_ID) == 3 and outbox.count(APP_ID, URL) == 0


class TestFileThatStopsWorking:
    """A file that refuses writes mid-run (a full disk, a read-only remount): memory takes
    over, said once; a file merely busy with another process's write lends memory one batch."""

    def test_refused_writes_degrade_to_memory_once(self, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
        file = SqliteOutbox(str(tmp_path / "o.sqlite3"))
        box = FallbackOutbox(file)
        before = box.add(APP_ID, URL, signals(2)).last_id
        file._connection().execute("PRAGMA query_only = 1")  # SQLite now refuses every write
        with caplog.at_level(logging.DEBUG, logger="kaibantrace"):
            after = [box.add(APP_ID, URL, signals(3)).last_id for _ in range(3)]
        assert box.degraded and not box.durable
        assert before < MEMORY_BASE <= after[0] < after[1] < after[2]  # ids keep growing
        assert ["no longer be written" in r.getMessage() for r in caplog.records] == [True]
        assert box.count(APP_ID, URL) == 11 and box.count_mine(before) == 2
        # memory first (nothing else will send it); the file cannot lease, so yields nothing
        assert all(r.id >= MEMORY_BASE for r in box.claim(APP_ID, URL, 100, lease=60))
        assert box.claim(APP_ID, URL, 100, lease=60) == []

    def test_a_file_locked_too_long_degrades_too_so_ids_keep_their_order(
            self, tmp_path: Path) -> None:
        """A flush waits for every signal up to an id: had a batch gone to memory and the
        next one back to the file, a flush could answer before the first was sent."""
        path = str(tmp_path / "o.sqlite3")
        file = SqliteOutbox(path)
        box = FallbackOutbox(file)
        first = box.add(APP_ID, URL, signals(2)).last_id
        file.set_busy_timeout(0)
        other = SqliteOutbox(path)
        other._connection().execute("BEGIN IMMEDIATE")  # another process is writing
        try:
            lent = box.add(APP_ID, URL, signals(2)).last_id
        finally:
            other._connection().execute("ROLLBACK")
        after = box.add(APP_ID, URL, signals(2)).last_id  # the file is free again: memory still
        assert first < MEMORY_BASE <= lent < after and box.degraded
        assert file.count(APP_ID, URL) == 2 and box.count(APP_ID, URL) == 6
        assert box.count_mine(lent) == 4  # the file's two and the lent two
        for _ in range(2):
            box.delete([r.id for r in box.claim(APP_ID, URL, 10, lease=60)])
        assert box.count(APP_ID, URL) == 0 and box.count_mine(after) == 0

    def test_a_file_never_written_is_not_asked_what_is_left(self, tmp_path: Path) -> None:
        file = SqliteOutbox(str(tmp_path / "o.sqlite3"))
        file._connection().execute("PRAGMA query_only = 1")
        box = FallbackOutbox(file)
        last = box.add(APP_ID, URL, signals(1)).last_id
        os.remove(file.path)  # unreadable from now on: it held nothing of this process anyway
        file._local.connection.close()
        box.delete([r.id for r in box.claim(APP_ID, URL, 10, lease=60)])
        assert box.count_mine(last) == 0


class TestSqliteFile:
    def test_private_directory_and_file(self, tmp_path: Path) -> None:
        """The state directory is created 0700 and the outbox 0600."""
        directory = tmp_path / "state" / "kaibantrace"
        box = open_outbox(str(directory), APP_ID)
        box.add(APP_ID, URL, signals(1))
        assert box.durable
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for path in directory.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name

    def test_a_readable_directory_is_made_private_only_when_it_is_kaibantraces_own(
            self, tmp_path: Path) -> None:
        """KAIBAN_TELEMETRY_DIR may name any directory, the home directory even: one of
        another name keeps the user's permissions, while the files in it are 0600."""
        own, theirs = tmp_path / "kaibantrace", tmp_path / "home"
        for directory in (own, theirs):
            directory.mkdir(mode=0o755)
            directory.chmod(0o755)
            open_outbox(str(directory), APP_ID).add(APP_ID, URL, signals(1))
            assert stat.S_IMODE(Path(outbox_path(str(directory), APP_ID)).stat().st_mode) == 0o600
        assert stat.S_IMODE(own.stat().st_mode) == 0o700
        assert stat.S_IMODE(theirs.stat().st_mode) == 0o755

    def test_two_handles_never_claim_the_same_row(self, tmp_path: Path) -> None:
        """Two processes' handles on one file split the rows between them."""
        path = str(tmp_path / "o.sqlite3")
        a, b = SqliteOutbox(path), SqliteOutbox(path)
        a.add(APP_ID, URL, signals(150))
        ids_a = {r.id for r in a.claim(APP_ID, URL, 100, lease=60)}
        ids_b = {r.id for r in b.claim(APP_ID, URL, 100, lease=60)}
        assert len(ids_a) == 100 and len(ids_b) == 50 and not ids_a & ids_b

    def test_unusable_directory_falls_back_to_memory(self, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
        """A state directory that cannot be made means memory only, said once at DEBUG."""
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        with caplog.at_level(logging.DEBUG, logger="kaibantrace"):
            box = open_outbox(str(blocker / "kaibantrace"), APP_ID)
        assert isinstance(box, MemoryOutbox)
        assert [r.levelno for r in caplog.records] == [logging.DEBUG]

    def test_purge_removes_the_files(self, tmp_path: Path) -> None:
        """purge deletes the database and its WAL files without opening them."""
        box = open_outbox(str(tmp_path), APP_ID)
        box.add(APP_ID, URL, signals(1))
        assert purge(str(tmp_path), APP_ID) is True
        assert not Path(outbox_path(str(tmp_path), APP_ID)).exists()
        assert purge(str(tmp_path), APP_ID) is False


_CHILD = textwrap.dedent("""
    import os, sys, time, kaibantrace

    url, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kaibantrace.configure(app_id="15E9347E-9EE5-4971-A8FB-61D91F3EBA12", endpoint=url,
                          backoff=0.01, max_per_minute=0)  # bursts: no budget
    for i in range(count):
        kaibantrace.emit("e", {"i": i, "pid": os.getpid()})
    if mode == "flush":
        print(kaibantrace.flush(20), flush=True)
    elif mode == "park":  # wait until everything is in the outbox, say so, then hang
        kaibantrace.flush(20)
        print("parked", kaibantrace.default_client().stats()["in_outbox"], flush=True)
        time.sleep(60)
    else:
        print("exiting", flush=True)
""")


def child(url: str, count: int, mode: str = "exit", **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, url, str(count), mode],
                            env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (0, ""), err
    return out


def unique(signals_: list[dict[str, object]]) -> set[tuple[object, object]]:
    return {(s["payload"]["pid"], s["payload"]["i"]) for s in signals_}  # type: ignore[index]


_AT_EXIT_CHILD = textwrap.dedent("""
    import atexit, sys, kaibantrace

    kaibantrace.configure(app_id="15E9347E-9EE5-4971-A8FB-61D91F3EBA12", endpoint=sys.argv[1])
    atexit.register(lambda: kaibantrace.emit("from_an_exit_hook"))
""")


class TestAcrossProcesses:
    def test_a_second_outbox_of_the_same_file_keeps_the_first_ones_locks(self, tmp_path: Path) -> None:
        """Closing any descriptor of a database drops every POSIX lock the process holds on it.
        Every open connection holds a shared lock on a WAL database, which is how a process
        closing the last connection knows it may fold the WAL into the file and delete it. A
        second outbox of the same file in this process (a delivery process opens two) must
        keep that lock, or another process would delete the WAL from under the first one's
        feet and corrupt the file."""
        path = str(tmp_path / "outbox.sqlite3")
        first = SqliteOutbox(path)
        first.add(APP_ID, "https://x.test/v2/", [(time.time(), "{}")])  # the WAL now holds a write
        SqliteOutbox(path)  # a second outbox of the same file in this process
        subprocess.run([sys.executable, "-c", "import sqlite3, sys\n"
                        "sqlite3.connect(sys.argv[1]).execute('SELECT COUNT(*) FROM signals').fetchone()\n",
                        path],
                       check=True, timeout=60)  # another process opens the file and closes it
        assert os.path.exists(path + "-wal")  # it knew it was not the last one
        assert first.count(APP_ID, "https://x.test/v2/") == 1

    def test_first_event_during_shutdown_goes_to_the_outbox(self, refused_url: str) -> None:
        """An event first emitted from an exit hook starts no thread and is saved, silently."""
        directory = os.environ["KAIBAN_TELEMETRY_DIR"]
        done = subprocess.run([sys.executable, "-c", _AT_EXIT_CHILD, refused_url],
                              env=subprocess_env(), capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
        assert rows_in_outbox(directory) == 1

    def test_exit_while_down_then_next_run_delivers(self, free_port: int) -> None:
        """A run that exits while the endpoint is down leaves its events; the next run sends them."""
        directory = os.environ["KAIBAN_TELEMETRY_DIR"]
        url = f"http://127.0.0.1:{free_port}/v2/"
        assert finish(child(url, 300)) == "exiting\n"
        assert rows_in_outbox(directory) == 300
        with Collector(port=open_port(free_port)) as collector:
            assert finish(child(url, 1, "flush")) == "True\n"
            delivered = collector.wait_for(301)
        assert len(delivered) == len(unique(delivered)) == 301
        assert rows_in_outbox(directory) == 0

    def test_black_holed_exit_keeps_everything(self, free_port: int) -> None:
        """Exiting against an endpoint that never answers loses nothing."""
        directory = os.environ["KAIBAN_TELEMETRY_DIR"]
        url = f"http://127.0.0.1:{free_port}/v2/"
        with socket.socket() as hole:
            hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hole.bind(("127.0.0.1", open_port(free_port)))
            hole.listen(64)
            assert finish(child(url, 120)) == "exiting\n"
        assert rows_in_outbox(directory) == 120
        with Collector(port=open_port(free_port)) as collector:
            assert finish(child(url, 1, "flush")) == "True\n"
            assert len(unique(collector.wait_for(121))) == 121

    def test_kill_9_after_the_outbox_then_delivery(self, free_port: int) -> None:
        """Events that reached the outbox survive kill -9 and are delivered once by the next run."""
        url = f"http://127.0.0.1:{free_port}/v2/"
        parked = child(url, 200, "park")
        try:
            assert parked.stdout is not None
            assert parked.stdout.readline() == "parked 200\n"
        finally:
            parked.send_signal(signal.SIGKILL)
            parked.wait(30)
        with Collector(port=open_port(free_port)) as collector:
            assert finish(child(url, 1, "flush")) == "True\n"
            delivered = collector.wait_for(201)
        assert len(delivered) == len(unique(delivered)) == 201

    def test_processes_sharing_an_outbox_send_nothing_twice(self, free_port: int) -> None:
        """Four processes draining one outbox at once deliver every leftover exactly once."""
        url = f"http://127.0.0.1:{free_port}/v2/"
        finish(child(url, 1000))
        with Collector(port=open_port(free_port)) as collector:
            runs = [child(url, 5, "flush") for _ in range(4)]
            outputs = [finish(run) for run in runs]
            delivered = collector.wait_for(1020)
        assert outputs == ["True\n"] * 4
        assert len(delivered) == len(unique(delivered)) == 1020

    def test_opted_out_never_creates_an_outbox(self, collector: Collector) -> None:
        """An opted-out run leaves the state directory untouched."""
        directory = Path(os.environ["KAIBAN_TELEMETRY_DIR"])
        finish(child(collector.url, 50, KAIBAN_TELEMETRY_OPT_OUT="1"))
        assert list(directory.iterdir()) == [] and collector.requests == []

    def test_opt_out_at_start_purges_leftovers(self, free_port: int) -> None:
        """An opt-out found at start deletes what an earlier run left unsent."""
        directory = os.environ["KAIBAN_TELEMETRY_DIR"]
        url = f"http://127.0.0.1:{free_port}/v2/"
        finish(child(url, 10))
        assert rows_in_outbox(directory) == 10
        finish(child(url, 1, DO_NOT_TRACK="1"))
        assert list(Path(directory).iterdir()) == []
        with Collector(port=open_port(free_port)) as collector:
            assert finish(child(url, 1, "flush")) == "True\n"
            assert [s["type"] for s in collector.wait_for(1)] == ["e"]
            assert len(collector.signals) == 1


class TestFaultMatrix:
    @pytest.mark.parametrize("answers", [
        [(500, {})], [(502, {}), (503, {})], [(429, {})], [(429, {"Retry-After": "1"})],
        [(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})],
    ], ids=["500", "502-503", "429", "429-retry-after", "503-past-date"])
    def test_every_signal_arrives_once(self, make_client: MakeClient, collector: Collector,
                                       answers: list[tuple[int, dict[str, str]]]) -> None:
        """After failures short of the circuit breaker, every signal arrives exactly once."""
        for status, headers in answers:
            collector.respond(status, headers=headers, times=1)
        client = make_client(backoff=0.01)
        for i in range(250):
            client.emit("e", {"i": i, "pid": 0})
        assert client.flush(20) is True
        assert len(unique(collector.wait_for(250))) == 250
        assert client.stats()["in_outbox"] == 0

    @pytest.mark.parametrize("behaviour", ["burst", "hang", "drop"])
    def test_longer_outages_end_in_a_later_delivery(self, make_client: MakeClient,
                                                    collector: Collector, behaviour: str) -> None:
        """A burst that opens the circuit leaves signals in the outbox; a fresh client sends them once."""
        if behaviour == "burst":
            collector.respond(503, times=5)
        elif behaviour == "hang":
            # Answers long after the client gave up; a late 200 would count as delivered
            # (at-least-once allows that duplicate), so the late answer here is a 503.
            collector.respond(503, delay=1.0, times=3)
        else:
            collector.respond(drop=True, times=3)
        broken = make_client(backoff=0.01, timeout=0.3)
        for i in range(40):
            broken.emit("e", {"i": i, "pid": 0})
        assert broken.flush(20) is False
        assert broken.stats()["in_outbox"] == 40
        healthy = make_client()
        healthy.emit("e", {"i": 40, "pid": 0})
        assert healthy.flush(20) is True
        delivered = collector.wait_for(41)
        assert len(delivered) == len(unique(delivered)) == 41

    def test_rejected_batches_are_counted_not_retried(self, make_client: MakeClient,
                                                      collector: Collector) -> None:
        """A 400 drops its batch for good, counted, and later batches go through."""
        collector.respond(400, times=1)
        client = make_client()
        client.emit("refused")
        assert client.flush(10) is False
        client.emit("accepted")
        assert client.flush(10) is True
        assert [s["type"] for s in collector.signals] == ["accepted"]
        assert client.stats()["dropped"] == {"rejected": 1}


class TestForkFromC:
    def test_a_sender_from_another_process_is_replaced(self, make_client: MakeClient,
                                                       collector: Collector) -> None:
        """An event reaching a sender made by another pid (a fork the at-fork hook missed) starts over.

        A real fork from C without ``PyOS_AfterFork_Child`` leaves CPython itself
        unusable, so this plays the child's side: the sender claims another pid.
        """
        client = make_client(flush_interval=30)
        client.emit("parent_queued", {"i": 0, "pid": 0})
        inherited = client._delivery.sender
        assert inherited is not None
        inherited._s.pid = -1  # as if this process were the child of the one that made it
        client.emit("child", {"i": 1, "pid": 0})
        assert client._delivery.sender is not inherited
        assert client.flush(10) is True
        # Here the "parent" is this same process, so its sender still runs and sends its own
        # queue: the parent's event arrives once, from the parent, and the child's once.
        inherited.stop(time.monotonic() + 5)
        assert sorted(s["type"] for s in collector.wait_for(2)) == ["child", "parent_queued"]
        assert len(collector.signals) == 2


def _pool_task(n: int) -> bool:
    kaibantrace.emit("pooled", {"i": n, "pid": os.getpid()})
    return kaibantrace.flush(20)


class TestConcurrencyAtScale:
    def test_sixteen_threads(self, make_client: MakeClient, collector: Collector) -> None:
        """16 threads x 5,000 events: every one delivered exactly once (queue sized for the burst)."""
        import threading

        client = make_client(max_queue=100_000)

        def work(n: int) -> None:
            for i in range(5000):
                client.emit("t", {"i": i, "pid": n})

        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert client.flush(60) is True
        delivered = collector.wait_for(80_000, timeout=60)
        assert len(delivered) == len(unique(delivered)) == 80_000

    def test_a_busy_host_emitting_past_the_queue_loses_nothing(
            self, make_client: MakeClient, collector: Collector) -> None:
        """A thread that keeps the GIL busy starves the worker; what the queue cannot hold
        goes to the outbox, so 12,000 events through a 4,000-event queue all arrive.

        The host emits 10,000 events for each second of CPU time its thread is given: on an
        idle machine, about 10,000 a second. Other processes on a loaded machine then slow
        the host and kaibantrace's threads alike, as they would in the host's own program. By
        the clock, a process given a quarter of a core would have to take four times the
        events it has time to write (and it dropped 3,751 for a full queue). Nor does a
        pause of the process turn into one burst larger than the queue, which no queue could
        take: a thread's CPU time stands still while it waits.
        """
        client = make_client(max_queue=4_000)
        emitted = 0
        started = time.thread_time()
        while emitted < 12_000:
            sum(i * i for i in range(200))  # the host's own work, holding the GIL
            due = min(12_000, int((time.thread_time() - started) * 10_000) + 1)
            while emitted < due:
                client.emit("busy", {"i": emitted, "pid": 0})
                emitted += 1
        assert client.flush(60) is True, client.stats()
        assert client.stats()["dropped"] == {}
        delivered = collector.wait_for(12_000, timeout=60)
        assert len(delivered) == len(unique(delivered)) == 12_000

    def test_ten_thousand_asyncio_tasks(self, make_client: MakeClient,
                                        collector: Collector) -> None:
        """10,000 concurrent asyncio tasks, each in its own session: all delivered exactly once."""
        import asyncio

        client = make_client()

        @client.track("task", payload=lambda args: {"i": args["i"], "pid": 0})
        async def task(i: int) -> None:
            await asyncio.sleep(0)

        async def one(i: int) -> None:
            async with client.session():
                await task(i)

        async def main() -> None:
            await asyncio.gather(*(one(i) for i in range(10_000)))

        asyncio.run(main())
        assert client.flush(60) is True
        delivered = collector.wait_for(10_000, timeout=60)
        assert len(delivered) == len(unique(delivered)) == 10_000
        assert len({s["sessionID"] for s in delivered}) == 10_000

    # Forking while kaibantrace's threads run is exactly the case under test.
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_multiprocessing_pools(self, collector: Collector, method: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
        """Workers of a multiprocessing pool (fork and spawn) each deliver their events once."""
        import multiprocessing

        if method not in multiprocessing.get_all_start_methods():
            pytest.skip(f"no {method} here")
        monkeypatch.setenv("KAIBAN_TELEMETRY_ENDPOINT", collector.url)
        monkeypatch.setenv("KAIBAN_TELEMETRY_APP_ID", APP_ID)
        kaibantrace.emit("parent", {"i": -1, "pid": os.getpid()})  # the parent's sender runs
        with multiprocessing.get_context(method).Pool(2) as pool:
            results: List[bool] = pool.map(_pool_task, range(20), chunksize=1)
        assert results == [True] * 20
        assert kaibantrace.flush(10)
        delivered = collector.wait_for(21)
        assert len(delivered) == len(unique(delivered)) == 21

    # Forking while kaibantrace's threads run is exactly the case under test.
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_process_pool_executor(self, collector: Collector,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
        """concurrent.futures workers deliver their events once."""
        from concurrent.futures import ProcessPoolExecutor

        monkeypatch.setenv("KAIBAN_TELEMETRY_ENDPOINT", collector.url)
        monkeypatch.setenv("KAIBAN_TELEMETRY_APP_ID", APP_ID)
        with ProcessPoolExecutor(2) as pool:
            assert list(pool.map(_pool_task, range(10))) == [True] * 10
        delivered = collector.wait_for(10)
        assert len(delivered) == len(unique(delivered)) == 10
