"""A broken or hostile state directory: telemetry degrades quietly, loses nothing it can keep,
and never writes where it should not."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import kaibantrace
from kaibantrace._delivery.outbox import MemoryOutbox, SqliteOutbox, open_outbox, outbox_path, purge
from kaibantrace.testing import Collector

from .conftest import APP_ID, open_port, rows_in_outbox, subprocess_env

URL = "https://ingest.example.test/v2/"


def aside(directory: Path) -> list[Path]:
    """The damaged outboxes moved aside (their journal files move with them)."""
    return sorted(p for p in directory.glob("outbox-*.sqlite3.corrupt-*")
                  if not p.name.endswith(("-wal", "-shm")))


def send_one(collector: Collector, name: str) -> None:
    """One event through a client of this process, delivered before it shuts down."""
    client = kaibantrace.Telemetry(app_id=APP_ID, endpoint=collector.url)
    try:
        client.emit(name)
        assert client.flush(10)
    finally:
        client.shutdown()


class TestDamagedOutbox:
    def test_junk_is_moved_aside_and_a_new_outbox_made(self, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
        path = Path(outbox_path(str(tmp_path), APP_ID))
        path.write_bytes(b"not a database: junk left by something else" * 20)
        with caplog.at_level(logging.DEBUG, logger="kaibantrace"):
            box = open_outbox(str(tmp_path), APP_ID)
        assert isinstance(box, SqliteOutbox)
        box.add(APP_ID, URL, [(0.0 + 1e9 * 2, '{"n":1}')])
        (moved,) = aside(tmp_path)
        assert moved.read_bytes().startswith(b"not a database")  # kept, not deleted
        assert len([r for r in caplog.records if "moved aside" in r.getMessage()]) == 1

    def test_a_truncated_outbox_is_moved_aside(self, tmp_path: Path) -> None:
        path = Path(outbox_path(str(tmp_path), APP_ID))
        box = SqliteOutbox(str(path))
        box.add(APP_ID, URL, [(2e9, f'{{"n":{i}}}') for i in range(2000)])
        with contextlib.closing(sqlite3.connect(str(path))) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
        fresh = open_outbox(str(tmp_path), APP_ID)
        assert isinstance(fresh, SqliteOutbox) and fresh.count(APP_ID, URL) == 0
        assert len(aside(tmp_path)) == 1

    def test_a_client_delivers_through_a_damaged_outbox(self, collector: Collector) -> None:
        directory = Path(os.environ["KAIBAN_TELEMETRY_DIR"])
        directory.mkdir(parents=True, exist_ok=True)
        Path(outbox_path(str(directory), APP_ID)).write_bytes(b"\x00garbage" * 100)
        send_one(collector, "after_damage")
        assert [s["type"] for s in collector.signals] == ["after_damage"]
        assert len(aside(directory)) == 1

    def test_purge_removes_what_was_moved_aside_too(self, tmp_path: Path) -> None:
        Path(outbox_path(str(tmp_path), APP_ID)).write_bytes(b"junk" * 50)
        open_outbox(str(tmp_path), APP_ID)
        assert aside(tmp_path)
        assert purge(str(tmp_path), APP_ID) is True
        assert aside(tmp_path) == [] and list(tmp_path.glob("outbox-*")) == []


@functools.cache
def _can_mount_a_tiny_disk() -> bool:
    """Whether this machine lets a test mount a small tmpfs in a mount namespace of its own
    (as root, or as a user where unprivileged user namespaces are allowed)."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as where:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "mount",
                                "-t", "tmpfs", "-o", "size=64k", "tmpfs", where],
                               capture_output=True, timeout=30)
    return probe.returncode == 0


_SEND = textwrap.dedent("""
    import sys, kaibantrace
    client = kaibantrace.Telemetry(app_id=sys.argv[1], endpoint=sys.argv[2])
    client.emit("despite_the_directory")
    print(client.flush(10))
""")


class TestUnusableStateDirectory:
    @pytest.mark.parametrize("kind", ["a file", "a symbolic link", "read-only", "another user's",
                                      "writable by everyone", "outbox a link to /dev/full",
                                      "outbox another user's"])
    def test_memory_only_and_the_host_unchanged(self, kind: str, tmp_path: Path,
                                                collector: Collector) -> None:
        """Whatever is wrong with the directory, the program runs as it would without
        telemetry (status 0, nothing on stderr) and the signal is still delivered."""
        state = tmp_path / "state"
        elsewhere = tmp_path / "someone-elses"
        elsewhere.mkdir()
        command = [sys.executable, "-c", _SEND, APP_ID, collector.url]
        if kind == "a file":
            state.write_text("")
        elif kind == "a symbolic link":
            state.symlink_to(elsewhere, target_is_directory=True)
        elif kind == "read-only":
            state.mkdir(mode=0o500)
            if os.geteuid() == 0:  # root writes anywhere: run the child without that power
                if shutil.which("setpriv") is None:
                    pytest.skip("root writes to read-only directories, and no setpriv here")
                command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
        elif kind == "writable by everyone":
            state.mkdir()
            state.chmod(0o777)
        elif kind == "another user's":
            if os.geteuid() != 0:
                pytest.skip("only root can give a directory to another user")
            state.mkdir(mode=0o700)
            os.chown(state, 65534, 65534)  # nobody
        elif kind == "outbox another user's":  # as a program run with sudo would leave it
            if os.geteuid() != 0:
                pytest.skip("only root can give a file to another user")
            state.mkdir(mode=0o700)
            planted = Path(outbox_path(str(state), APP_ID))
            planted.write_bytes(b"")
            os.chown(planted, 65534, 65534)
        elif kind == "outbox a link to /dev/full":
            if not Path("/dev/full").exists():
                pytest.skip("no /dev/full here")
            state.mkdir(mode=0o700)
            os.symlink("/dev/full", outbox_path(str(state), APP_ID))
        done = subprocess.run(command, env=subprocess_env(KAIBAN_TELEMETRY_DIR=str(state)),
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr, done.stdout.strip()) == (0, "", "True")
        assert [s["type"] for s in collector.signals] == ["despite_the_directory"]
        assert list(elsewhere.iterdir()) == []  # nothing written through the link
        if kind in ("another user's", "writable by everyone", "read-only"):
            assert list(state.iterdir()) == []  # nothing written into it
        if kind == "outbox another user's":
            assert planted.read_bytes() == b"" and planted.stat().st_uid == 65534  # untouched

    @pytest.mark.skipif(not _can_mount_a_tiny_disk(), reason="no mount namespace here")
    def test_a_read_only_file_system_holding_an_earlier_outbox(self, collector: Collector) -> None:
        """The state directory is remounted read-only after an earlier run left signals there:
        this run delivers from memory, and the earlier signals wait, intact, for a later run."""
        state = Path(os.environ["KAIBAN_TELEMETRY_DIR"])
        collector.respond(503)  # the earlier run could not deliver (and backed off briefly)
        earlier = kaibantrace.Telemetry(app_id=APP_ID, endpoint=collector.url, backoff=0.01)
        for i in range(3):
            earlier.emit("earlier", {"i": i})
        assert earlier.flush(2) is False
        earlier.shutdown()
        assert rows_in_outbox(str(state)) == 3
        collector.respond(200)
        shell = 'mount --bind "$3" "$3" && mount -o remount,bind,ro "$3" && exec "$4" -c "$5" "$1" "$2"'
        done = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell, "sh",
             APP_ID, collector.url, str(state), sys.executable, _SEND],
            env=subprocess_env(KAIBAN_TELEMETRY_DIR=str(state)),
            capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr, done.stdout.strip()) == (0, "", "True")
        assert [s["type"] for s in collector.signals] == ["despite_the_directory"]
        send_one(collector, "writable_again")
        assert sorted(s["type"] for s in collector.wait_for(5)) == [
            "despite_the_directory", "earlier", "earlier", "earlier", "writable_again"]

    def test_created_private(self, collector: Collector) -> None:
        send_one(collector, "private")
        state = Path(os.environ["KAIBAN_TELEMETRY_DIR"])
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for path in state.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_a_secret_planted_in_a_directory_others_can_write_is_never_used(tmp_path: Path) -> None:
    """Had another user written the secret, they could reverse the identities it keys."""
    from kaibantrace._policy import prefs as _prefs

    config = Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"])
    config.mkdir(parents=True, exist_ok=True)
    planted = bytes(range(32))
    (config / "secret").write_text(planted.hex() + "\n")
    config.chmod(0o777)
    _prefs.forget_in_memory()
    try:
        assert _prefs.existing_secret() is None
        assert _prefs.local_secret(persist=True) != planted
        assert (config / "secret").read_text().strip() == planted.hex()  # left as it was
    finally:
        config.chmod(0o700)
        _prefs.forget_in_memory()
    assert _prefs.existing_secret() == planted  # the same file, once the directory is private


def test_memory_outbox_is_what_a_broken_directory_gets(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert isinstance(open_outbox(str(blocker), APP_ID), MemoryOutbox)


_NO_THREADS = textwrap.dedent("""
    import sys, threading, time, kaibantrace

    def refuse(self):
        raise RuntimeError("can't start new thread")

    threading.Thread.start = refuse  # as in a sandbox without threads
    client = kaibantrace.Telemetry(app_id=sys.argv[1], endpoint=sys.argv[2])
    for i in range(3):
        client.emit("threadless", {"i": i})
    started = time.monotonic()
    print(client.flush(5), client.stats()["in_outbox"], round(time.monotonic() - started))
""")


class TestWithoutThreads:
    def test_events_go_to_the_outbox_and_the_next_process_delivers_them(
            self, collector: Collector) -> None:
        done = subprocess.run([sys.executable, "-c", _NO_THREADS, APP_ID, collector.url],
                              env=subprocess_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stderr == ""
        assert done.stdout.split() == ["False", "3", "0"]  # not delivered, kept, no waiting
        assert collector.requests == []
        send_one(collector, "with_threads")
        assert sorted(s["type"] for s in collector.wait_for(4)) == ["threadless"] * 3 + [
            "with_threads"]


_ENDINGS = textwrap.dedent("""
    import os, signal, sys, threading, time, kaibantrace

    how = sys.argv[3]
    # os._exit ends the process at once. Were a request under way, its rows would stay
    # leased to the dead process until that request would have timed out; the long flush
    # interval makes sure none is, so the next run may take them at once.
    settings = {"flush_interval": 60} if how == "os_exit" else {}
    client = kaibantrace.Telemetry(app_id=sys.argv[1], endpoint=sys.argv[2], **settings)
    for i in range(5):
        client.emit("ending", {"i": i})
    if how == "sigterm":  # a handler that exits, as servers install
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # never reached: the handler exits first
    elif how == "thread_exit":  # sys.exit in a thread ends that thread only
        worker = threading.Thread(target=lambda: (client.emit("from_thread"), sys.exit(3)))
        worker.start()
        worker.join()
    elif how == "os_exit":  # skips every exit hook: only what reached the outbox survives
        deadline = time.monotonic() + 20
        while client.stats()["in_outbox"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(0)
""")


class TestEndings:
    @pytest.mark.parametrize("how", ["sigterm", "thread_exit", "os_exit"])
    def test_no_hang_no_traceback_and_nothing_lost_that_reached_the_outbox(
            self, how: str, free_port: int) -> None:
        """The endpoint is down while the process ends; a later process delivers to it."""
        url = f"http://127.0.0.1:{free_port}/v2/"
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", _ENDINGS, APP_ID, url, how],
                              env=subprocess_env(), capture_output=True, text=True, timeout=60)
        assert time.monotonic() - started < 20  # no hang (the os_exit case waits for the outbox)
        assert (done.returncode, done.stderr) == (0, "")
        with Collector(port=open_port(free_port)) as collector:
            send_one(collector, "next_run")
            expected = 5 + (how == "thread_exit") + 1
            assert len(collector.wait_for(expected)) == expected


_MID_SEND = textwrap.dedent("""
    import sys, time, kaibantrace

    client = kaibantrace.Telemetry(app_id=sys.argv[1], endpoint=sys.argv[2])
    client.emit("warm")
    assert client.flush(10)  # the sender is ready, as in a program that has run a while
    for i in range(20):
        client.emit("mid_send", {"i": i})
    deadline = time.monotonic() + 10
    while client.stats()["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)  # until a request is on its way to the slow server
    print(client.stats()["in_flight"], time.time(), flush=True)
""")


def test_exit_while_a_request_is_in_flight(collector: Collector) -> None:
    """The interpreter exits while the worker waits for a slow answer: no hang, no traceback,
    and every event arrives, at the latest through the next process."""
    collector.respond(200, times=1)  # the warm-up
    collector.respond(200, delay=3.0)  # then answers that take longer than exit allows
    done = subprocess.run([sys.executable, "-c", _MID_SEND, APP_ID, collector.url],
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    ended = time.time()
    assert (done.returncode, done.stderr) == (0, "")
    in_flight, exiting_at = done.stdout.split()
    assert int(in_flight) > 0
    assert ended - float(exiting_at) < 2.5  # exit did not wait for the 3-second answer
    collector.respond(200)
    send_one(collector, "next_run")
    arrived = {s["payload"]["i"] for s in collector.wait_for(22, timeout=30)
               if s["type"] == "mid_send"}
    assert arrived == {str(i) for i in range(20)}


_FULL_DISK = textwrap.dedent("""
    import errno, logging, os, sys, kaibantrace

    app, url, state, when = sys.argv[1:5]
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger("kaibantrace")
    log.addHandler(Keep())
    log.setLevel(logging.DEBUG)

    def fill_the_disk():
        with open(os.path.join(state, "filler"), "wb", buffering=0) as filler:
            for size in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        filler.write(b"\\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc

    client = kaibantrace.Telemetry(app_id=app, endpoint=url, max_per_minute=0)  # a burst
    if when == "while running":
        client.emit("before_full")
        assert client.flush(10)  # the outbox file is open and working
    fill_the_disk()
    for i in range(3000):
        client.emit("while_full", {"i": i, "pad": "x" * 100})
    delivered = client.flush(20)
    os.remove(os.path.join(state, "filler"))
    if when == "while running":  # a refused COMMIT must not have left the file locked
        import sqlite3
        other = sqlite3.connect(os.path.join(state, f"outbox-{app}.sqlite3"), timeout=0,
                                isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    print(delivered, sorted(client.stats()["dropped"].items()))
    print(sum(("no longer be written" in line or "no outbox file" in line) for line in lines))
    client.shutdown()
""")

_DELIVER_WHAT_IS_LEFT = textwrap.dedent("""
    import sys, kaibantrace
    client = kaibantrace.Telemetry(app_id=sys.argv[1], endpoint=sys.argv[2])
    client.flush(10)
""")


@pytest.mark.skipif(not _can_mount_a_tiny_disk(), reason="no way to mount a small tmpfs here")
class TestFullDisk:
    """A real full disk: the state directory is a 1 MB tmpfs, filled to the last byte."""

    @pytest.mark.parametrize("when", ["before starting", "while running"])
    def test_memory_only_one_log_line_nothing_lost(self, when: str, tmp_path: Path,
                                                   collector: Collector) -> None:
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        script = tmp_path / "full_disk.py"
        script.write_text(_FULL_DISK)
        then = tmp_path / "deliver.py"
        then.write_text(_DELIVER_WHAT_IS_LEFT)
        # One mount namespace for both processes: the tiny disk lives as long as it does.
        shell = ('mount -t tmpfs -o size=1m,mode=0700 tmpfs "$3" && '
                 '"$4" "$5" "$1" "$2" "$3" "$6" && "$4" "$7" "$1" "$2"')
        done = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell, "sh",
             APP_ID, collector.url, str(state), sys.executable, str(script), when, str(then)],
            env=subprocess_env(KAIBAN_TELEMETRY_DIR=str(state)),
            capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stderr) == (0, "")
        delivered, log_lines = done.stdout.strip().splitlines()
        assert delivered == "True []"  # delivered from memory, nothing dropped
        assert log_lines == "1"  # one line said the outbox fell back to memory
        arrived = [s["payload"]["i"] for s in collector.signals if s["type"] == "while_full"]
        assert sorted(set(arrived), key=int) == [str(i) for i in range(3000)]
