"""Project IDs, hashing, and sessions across threads and asyncio tasks."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

import kaibantrace
from kaibantrace._encode.identity import hash_user
from kaibantrace.testing import Collector

from .conftest import APP_ID

MakeClient = Callable[..., kaibantrace.Telemetry]


class TestProjectId:
    @pytest.mark.parametrize(("cwd", "home", "expected"), [
        ("/srv/work/my-board", "/home/alice", "e0eef4db4ec3062ca9a4479a72f22f6d"),
        ("/", "/home/dave", "03d5a75bbc7364b74c30276118ee4ac3"),
    ])
    def test_check_values_from_kaibanjs(self, cwd: str, home: str, expected: str) -> None:
        """The seed's formula gives the check values computed by KaibanJS on Node.js."""
        assert kaibantrace.project_id(cwd=cwd, environ={"HOME": home}) == expected

    @pytest.mark.parametrize(("cwd", "home", "expected"), [
        ("/srv/work/my-board", "/home/alice", "e0eef4db4ec3062ca9a4479a72f22f6d"),
        ("/", "/home/dave", "03d5a75bbc7364b74c30276118ee4ac3"),
    ])
    def test_check_values_where_md5_is_refused(self, cwd: str, home: str, expected: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
        """As on a FIPS-mode OpenSSL that refuses MD5 even as a fingerprint: the pure-Python
        MD5 gives the same IDs."""
        def refused(*args: object, **kwargs: object) -> object:
            raise ValueError("[digital envelope routines] unsupported")

        monkeypatch.setattr(hashlib, "md5", refused)
        assert kaibantrace.project_id(cwd=cwd, environ={"HOME": home}) == expected

    def test_pure_python_md5_matches_hashlib(self) -> None:
        import random

        from kaibantrace._encode.md5 import md5_hex

        rng = random.Random(7)
        for size in [*range(130), 1000, 4097]:  # every padding case, and several blocks
            data = bytes(rng.getrandbits(8) for _ in range(size))
            assert md5_hex(data) == hashlib.md5(data).hexdigest()

    def test_empty_home_falls_back_to_userprofile(self) -> None:
        """JavaScript's || semantics: an empty HOME counts as missing."""
        with_profile = kaibantrace.project_id("/p/x", {"HOME": "", "USERPROFILE": "C:\\Users\\a"})
        assert with_profile == kaibantrace.project_id("/p/x", {"USERPROFILE": "C:\\Users\\a"})
        assert with_profile != kaibantrace.project_id("/p/x", {})

    def test_trailing_separator_is_ignored(self) -> None:
        """Node's basename ignores a trailing separator."""
        env = {"HOME": "/home/alice"}
        assert kaibantrace.project_id("/srv/work/my-board/", env) == kaibantrace.project_id(
            "/srv/work/my-board", env)

    def test_defaults_to_working_directory(self, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without arguments, the working directory and real environment are used."""
        monkeypatch.chdir(str(tmp_path))
        monkeypatch.setenv("HOME", "/home/zed")
        assert kaibantrace.project_id() == kaibantrace.project_id(str(tmp_path), {"HOME": "/home/zed"})


class TestHashing:
    def test_client_user_is_sha256_of_identifier_and_salt(self) -> None:
        """clientUser is lowercase hex SHA-256 of identifier + salt."""
        expected = hashlib.sha256(b"abcpepper").hexdigest()
        assert hash_user("abc", "pepper") == expected


class TestSessions:
    def test_id_is_made_lazily_and_stays(self) -> None:
        """A session's UUID is made on first read and then never changes."""
        with kaibantrace.session() as s:
            assert "not yet made" in repr(s)
            first = s.id
            assert s.id == first and len(first) == 36

    def test_nested_sessions_restore_the_outer_one(self) -> None:
        """Leaving an inner session brings back the outer one."""
        client = kaibantrace.default_client()
        with kaibantrace.session() as outer:
            with kaibantrace.session() as inner:
                assert client._session() is inner
            assert client._session() is outer

    def test_threads_do_not_see_each_others_sessions(self) -> None:
        """Concurrent threads with their own session() never share an ID."""
        client = kaibantrace.default_client()
        seen: dict[int, set[str]] = {}
        barrier = threading.Barrier(8)

        def work(n: int) -> None:
            with kaibantrace.session() as s:
                barrier.wait()
                seen[n] = {client._session().id for _ in range(50)}
                assert s.id in seen[n]

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        ids = [next(iter(v)) for v in seen.values()]
        assert all(len(v) == 1 for v in seen.values()) and len(set(ids)) == 8

    def test_asyncio_tasks_inherit_and_isolate(self) -> None:
        """Tasks inherit the session they were created in; tasks with their own stay apart."""
        client = kaibantrace.default_client()

        async def own() -> str:
            async with kaibantrace.session():
                await asyncio.sleep(0)
                return client._session().id

        async def inherited() -> str:
            await asyncio.sleep(0)
            return client._session().id

        async def main() -> tuple[str, list[str], str]:
            with kaibantrace.session() as s:
                children = await asyncio.gather(*(own() for _ in range(20)))
                child = await asyncio.create_task(inherited())
                return s.id, children, child

        parent, children, child = asyncio.run(main())
        assert child == parent
        assert len(set(children)) == 20 and parent not in children

    def test_one_scope_entered_by_concurrent_tasks(self) -> None:
        """One session() object shared by concurrent tasks enters and leaves cleanly in each."""
        client = kaibantrace.default_client()
        scope = kaibantrace.session()

        async def use(delay: float) -> str:
            async with scope as s:
                await asyncio.sleep(delay)
                assert client._session() is s
            return client._session().id

        async def main() -> list[str]:
            return await asyncio.gather(use(0.01), use(0))

        outside = asyncio.run(main())
        assert outside == [client._session().id] * 2

    def test_a_thread_started_in_a_block_is_outside_it(self) -> None:
        """Python starts threads with empty context variables: the block does not follow."""
        client = kaibantrace.default_client()
        seen: list[str] = []
        with kaibantrace.session() as s:
            thread = threading.Thread(target=lambda: seen.append(client._session().id))
            thread.start()
            thread.join(10)
        assert seen == [client._process_session.id] != [s.id]

    def test_wrap_and_run_carry_the_session_into_threads(self) -> None:
        """``scope.wrap(fn)`` and ``scope.run`` make ``fn`` run in the block's session, in a
        ``threading.Thread`` and in a ``ThreadPoolExecutor``, and leave the worker as it was."""
        from concurrent.futures import ThreadPoolExecutor

        client = kaibantrace.default_client()

        def session_id(label: str) -> tuple[str, str]:
            return label, client._session().id

        seen: list[tuple[str, str]] = []
        scope = kaibantrace.session()
        with scope as s:
            thread = threading.Thread(target=lambda: seen.append(scope.wrap(session_id)("thread")))
            thread.start()
            thread.join(10)
            with ThreadPoolExecutor(2) as pool:
                seen.append(pool.submit(scope.wrap(session_id), "wrap").result(10))
                seen.append(pool.submit(scope.run, session_id, "run").result(10))
                seen.append(pool.submit(session_id, "plain").result(10))
        assert seen[:3] == [("thread", s.id), ("wrap", s.id), ("run", s.id)]
        assert seen[3] == ("plain", client._process_session.id)
        assert scope.wrap(session_id).__name__ == "session_id"

    def test_copy_context_carries_the_session_into_threads(self) -> None:
        """The standard library's way works too: the context, copied, run in the thread."""
        import contextvars
        from concurrent.futures import ThreadPoolExecutor

        client = kaibantrace.default_client()
        with kaibantrace.session() as s, ThreadPoolExecutor(1) as pool:
            context = contextvars.copy_context()
            assert pool.submit(context.run, lambda: client._session().id).result(10) == s.id

    def test_outside_sessions_share_the_process_session(self) -> None:
        """Outside any session() every event shares one process-wide ID."""
        client = kaibantrace.default_client()
        assert client._session() is client._session()

    def test_clients_do_not_share_sessions(self) -> None:
        """Two libraries' clients keep separate sessions, so their IDs never correlate."""
        a, b = kaibantrace.Telemetry(), kaibantrace.Telemetry()
        with a.session() as s:
            assert a._session() is s
            assert b._session() is not s


class TestWhoAnEventIsFrom:
    """clientUser names the process (or, for CLI events, the project); sessionID the session."""

    def test_sessions_of_one_process_are_one_user(self, make_client: MakeClient,
                                                  collector: Collector) -> None:
        client = make_client()
        with client.session() as first:
            client.emit("workflow_started")
        with client.session() as second:
            client.emit("workflow_started")
        client.emit("workflow_started")  # outside any block: the client's own session
        assert client.flush(10)
        signals = collector.wait_for(3)
        assert [s["sessionID"] for s in signals] == [first.id, second.id,
                                                     client._session().id]
        assert len({s["sessionID"] for s in signals}) == 3
        assert len({s["clientUser"] for s in signals}) == 1

    def test_the_user_is_not_derived_from_anything_sent(self, make_client: MakeClient,
                                                        collector: Collector) -> None:
        """Neither the sessionID nor any other sent value hashes to clientUser."""
        client = make_client(salt="pepper")
        client.emit("workflow_started", {"board": "b"})
        assert client.flush(10)
        (signal,) = collector.wait_for(1)
        sent = [signal["sessionID"], signal["appID"], signal["type"], "b", ""]
        for value in sent:
            for salt in ("", "pepper"):
                assert hash_user(value, salt) != signal["clientUser"]
        assert len(signal["clientUser"]) == 64 and int(signal["clientUser"], 16) >= 0

    def test_two_processes_are_two_users(self, collector: Collector) -> None:
        script = ("import sys, kaibantrace\n"
                  "kaibantrace.configure(app_id=sys.argv[1], endpoint=sys.argv[2])\n"
                  "kaibantrace.emit('workflow_started')\n"
                  "assert kaibantrace.flush(10)\n")
        for _ in range(2):
            subprocess.run([sys.executable, "-c", script, APP_ID, collector.url],
                           check=True, timeout=60)
        signals = collector.wait_for(2)
        assert len({s["clientUser"] for s in signals}) == 2
        assert len({s["sessionID"] for s in signals}) == 2

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_forked_child_is_a_new_user(self, make_client: MakeClient,
                                          collector: Collector) -> None:
        """The child does not inherit the parent's identity, even one already made."""
        client = make_client()
        client.emit("parent")
        assert client.flush(10)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                client.emit("child")
                code = 0 if client.flush(10) else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
        client.emit("parent")
        assert client.flush(10)
        users = {}
        for s in collector.wait_for(3):
            users.setdefault(s["type"], set()).add(s["clientUser"])
        assert len(users["parent"]) == 1  # the parent keeps its identity after the fork
        assert users["child"].isdisjoint(users["parent"])

    def test_cli_events_keep_the_project_identity(self, make_client: MakeClient,
                                                  collector: Collector, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        """In the KaibanJS profile (no local secret) a CLI event's clientUser is the hashed
        project ID, whichever session it is in, and a runtime event's is not."""
        monkeypatch.chdir(tmp_path)
        client = make_client(profile="kaibanjs")

        @client.track_cli("run_board")
        def run() -> None:
            client.emit("workflow_started")

        with client.session():
            run()
        assert client.flush(10)
        by_type = {s["type"]: s for s in collector.wait_for(3)}
        project = hash_user(kaibantrace.project_id(), "")
        assert by_type["run_board"]["clientUser"] == project
        assert by_type["install_kaibanjs"]["clientUser"] == project
        assert by_type["workflow_started"]["clientUser"] != project
        assert by_type["workflow_started"]["sessionID"] == by_type["run_board"]["sessionID"]
