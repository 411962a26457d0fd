"""kaibantrace under Pyodide (Python in the browser), run by Node.js with no network.

A pinned ``pyodide`` from npm runs Python files with kaibantrace's source and wrapt's pure
wheel installed from local files; ``fetch`` is replaced in JavaScript by a recorder
(``tests/pyodide/driver.mjs``), so a test sees each request the page would make. One test
installs kaibantrace's built wheel with micropip, by name, from a package index on
127.0.0.1. Skipped, saying why, where Node.js or npm is missing or the package cannot be
installed.

Each run loads Pyodide from a memory snapshot of a fresh interpreter, made once per Node.js
version, in a fifth of the time a fresh start takes; the driver then gives the run its own
environment variables and random state, as a page load would. The test of the environment's
opt-out starts Python afresh, to read the variable as ``loadPyodide({env})`` hands it over.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from .real_libraries import default_cache_dir

PYODIDE_VERSION = "314.0.8"  # Python 3.14 in the browser
ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "pyodide" / "driver.mjs"
APP_ID = "6C1A37E0-2F4B-4E8D-9B7A-3D5E1F2A4C60"
INGEST = "https://nom.telemetrydeck.com/v2/"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One preparation at a time across the suite's workers."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Runtime:
    """Pyodide and the wheels, ready in the cache; ``run`` executes a script there."""

    def __init__(self, pyodide: Path, wheels: Dict[str, Path], scratch: Path) -> None:
        self.pyodide = pyodide
        self.wheels = wheels
        """Pure wheels by project name: wrapt, and micropip with what it needs."""
        self.wrapt_wheel = wheels["wrapt"]
        self.scratch = scratch
        self.snapshot: Optional[Path] = None
        """A fresh interpreter's memory, which each run loads instead of starting Python."""

    def run(self, script: str, *, statuses: Optional[List[Any]] = None,
            env: Optional[Dict[str, str]] = None,
            page_globals: Optional[Dict[str, Any]] = None,
            packages: Optional[Dict[str, str]] = None, fresh: bool = False) -> Dict[str, Any]:
        """Run ``script`` with ``packages`` installed (by default kaibantrace's source tree
        and wrapt's wheel) and return what the driver reports. ``fresh``: start Python
        afresh, as a page does, rather than from the snapshot."""
        script_path = self.scratch / f"script-{os.urandom(4).hex()}.py"
        script_path.write_text(textwrap.dedent(script), encoding="utf-8")
        if packages is None:
            packages = {"kaibantrace": str(ROOT / "kaibantrace"), "wrapt": str(self.wrapt_wheel)}
        config = {"packages": packages,
                  "script": str(script_path), "statuses": statuses or [],
                  "env": env or {}, "globals": page_globals or {}}
        if self.snapshot is not None and not fresh:
            config["snapshot"] = str(self.snapshot)
        done = self._drive(config, script_path.with_suffix(".json"))
        outcome: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        assert outcome["error"] is None, outcome["error"]
        return outcome

    def make_snapshot(self, path: Path) -> None:
        """Write a fresh interpreter's memory snapshot to ``path`` for the runs to load:
        Pyodide then starts in about 0.4 s instead of 2.7 s, for each of the tests here."""
        part = path.with_name(path.name + ".part")
        self._drive({"make_snapshot": str(part)}, self.scratch / "snapshot.json")
        part.replace(path)
        self.snapshot = path

    def _drive(self, config: Dict[str, Any], config_path: Path) -> subprocess.CompletedProcess[str]:
        config_path.write_text(json.dumps(config), encoding="utf-8")
        done = subprocess.run(["node", str(DRIVER), str(self.pyodide), str(config_path)],
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        return done


# The pure wheels a page gets from local files: wrapt, and micropip (the version this
# Pyodide release ships) with its one dependency.
WHEELS = {"wrapt": "wrapt", "micropip": "micropip==0.11.1", "packaging": "packaging"}


@pytest.fixture(scope="session")
def pyodide_runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm are needed to run Pyodide (apt install nodejs npm)")
    cache = default_cache_dir() / f"pyodide-{PYODIDE_VERSION}"
    cache.mkdir(exist_ok=True)
    pyodide = cache / "node_modules" / "pyodide"
    with _locked(cache / ".lock"):
        if not (pyodide / "pyodide.mjs").exists():
            done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix",
                                   str(cache), f"pyodide@{PYODIDE_VERSION}"],
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0 or not (pyodide / "pyodide.mjs").exists():
                pytest.skip(f"could not install pyodide@{PYODIDE_VERSION} from npm: "
                            f"{done.stderr.strip()[-300:]}")
        wheels = {name: _pure_wheel(cache / "wheels", name, requirement)
                  for name, requirement in WHEELS.items()}
        runtime = Runtime(pyodide, wheels, tmp_path_factory.mktemp("pyodide"))
        # One per Node.js version: a snapshot holds the engine's view of the memory too.
        snapshot = cache / f"snapshot-node-{_node_version(node)}.bin"
        if snapshot.exists():
            runtime.snapshot = snapshot
        else:
            runtime.make_snapshot(snapshot)
    return runtime


def _node_version(node: str) -> str:
    return subprocess.run([node, "--version"], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def _pip(arguments: List[str]) -> subprocess.CompletedProcess[str]:
    """pip, with a home directory of its own: what it runs to describe the machine (a
    rustup shim answering ``rustc --version`` writes its settings) lands nowhere real."""
    with tempfile.TemporaryDirectory() as home:
        return subprocess.run([sys.executable, "-m", "pip", *arguments], capture_output=True,
                              text=True, timeout=300,
                              env={**os.environ, "HOME": home, "PIP_NO_CACHE_DIR": "1"})


def _pure_wheel(directory: Path, name: str, requirement: str) -> Path:
    """The pure wheel of ``requirement`` for Pyodide's Python, downloaded once."""
    pattern = f"{name}-{requirement.partition('==')[2] or '*'}-py3-none-any.whl"
    found = sorted(directory.glob(pattern))
    if not found:
        done = _pip(["download", "--quiet", "--no-deps", "--only-binary=:all:", "--platform",
                     "any", "--python-version", "3.14", "--dest", str(directory), requirement])
        found = sorted(directory.glob(pattern))
        if not found:
            pytest.skip(f"could not download {requirement}'s pure wheel: "
                        f"{done.stderr.strip()[-300:]}")
    return found[-1]


def one_keepalive_batch(fetches: List[Dict[str, Any]], types: List[str]) -> List[Any]:
    """The signals of the only request in ``fetches``, checked to be what a page posts: one
    ``keepalive`` JSON POST to TelemetryDeck of signals of ``types``, in order, for
    ``APP_ID``."""
    (request,) = fetches
    assert request["url"] == INGEST and request["method"] == "POST"
    assert request["keepalive"] is True
    assert request["headers"] == {"content-type": "application/json"}
    signals: List[Any] = json.loads(request["body"])
    assert [s["type"] for s in signals] == types
    assert {s["appID"] for s in signals} == {APP_ID}
    return signals


# What a page must not load for kaibantrace: its ways out of a normal process. (Pyodide
# itself has loaded ``subprocess`` by the time a script runs; the tests look at what
# importing and using kaibantrace adds.)
NOT_IN_THE_BROWSER = ("requests", "urllib3", "subprocess", "sqlite3")
LOADED_BEFORE = f"BEFORE = set(sys.modules) & set({NOT_IN_THE_BROWSER!r})"
LOADED_SINCE = f"[m for m in {NOT_IN_THE_BROWSER!r} if m in sys.modules and m not in BEFORE]"


class TestImport:
    def test_imports_and_makes_a_client_without_the_machinery_of_a_process(
            self, pyodide_runtime: Runtime) -> None:
        outcome = pyodide_runtime.run(f"""
            import json, sys
            {LOADED_BEFORE}
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r})
            RESULT = json.dumps({{"platform": sys.platform,
                                 "loaded": {LOADED_SINCE},
                                 "version": kaibantrace.__version__}})
        """)
        assert outcome["result"]["platform"] == "emscripten"
        assert outcome["result"]["loaded"] == []
        assert outcome["fetches"] == []


class TestNeverInThePageWay:
    def test_an_opted_out_page_makes_no_request_and_starts_nothing(
            self, pyodide_runtime: Runtime) -> None:
        outcome = pyodide_runtime.run(f"""
            import json, sys
            {LOADED_BEFORE}
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r})

            @client.track("board_started")
            def start():
                return "started"

            ran = start()
            client.emit("task_done", {{"n": 1}})
            RESULT = json.dumps({{"ran": ran, "stats": client.stats(),
                                 "loaded": {LOADED_SINCE}}})
        """, env={"KAIBAN_TELEMETRY_OPT_OUT": "1"}, fresh=True)  # env as loadPyodide takes it
        result = outcome["result"]
        assert result["ran"] == "started" and result["stats"]["queued"] == 0
        assert result["loaded"] == [] and outcome["fetches"] == []

    def test_tracked_work_runs_where_no_thread_can_start(self, pyodide_runtime: Runtime) -> None:
        """Telemetry on, in a runtime that refuses threads: the page's own work runs and
        returns, and nothing is raised into it."""
        outcome = pyodide_runtime.run(f"""
            import json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r})

            @client.track("board_started", duration=True)
            def start(n):
                return n * 2

            results = [start(n) for n in range(3)]
            client.emit("task_done", {{"n": 1}})
            with client.session():
                client.emit("in_a_session")
            RESULT = json.dumps({{"results": results, "flushed": client.flush(0.1)}})
        """)
        assert outcome["result"]["results"] == [0, 2, 4]


    def test_a_cli_entry_point_writes_no_file_and_counts_no_install(
            self, pyodide_runtime: Runtime) -> None:
        """``track_cli`` in a page: its event is sent, keyed with a secret kept in memory;
        no secret, notice or install marker is written (a page's files go with it, so a
        marker would make every load an install)."""
        outcome = pyodide_runtime.run(f"""
            import json, os, sys
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r})

            @client.track_cli("run_board")
            def main():
                return 0

            sys.argv = ["mytool", "run"]
            main()
            await client.aflush(5)
            written = [os.path.join(folder, name)
                       for folder, _, names in os.walk(os.path.expanduser("~")) for name in names]
            RESULT = json.dumps({{"written": written}})
        """)
        assert outcome["result"]["written"] == []
        (request,) = outcome["fetches"]
        assert [s["type"] for s in json.loads(request["body"])] == ["run_board"]


class TestThePagesOptOuts:
    """KaibanJS's browser build reads ``window.KAIBAN_TELEMETRY_OPT_OUT``; the browser carries
    the user's Do Not Track and Global Privacy Control. Each one alone switches it off."""

    @pytest.mark.parametrize("page_globals, source, wording", [
        ({"KAIBAN_TELEMETRY_OPT_OUT": "yes"}, "globalThis.KAIBAN_TELEMETRY_OPT_OUT",
         "the page's KAIBAN_TELEMETRY_OPT_OUT variable"),
        ({"navigator": {"doNotTrack": "1"}}, "navigator.doNotTrack",
         "the browser's Do Not Track setting"),
        ({"navigator": {"globalPrivacyControl": True}}, "navigator.globalPrivacyControl",
         "the browser's Global Privacy Control setting"),
    ])
    def test_each_switches_it_off(self, pyodide_runtime: Runtime, page_globals: Dict[str, Any],
                                  source: str, wording: str) -> None:
        """Each source alone: no request, the decision names it, and ``status`` says it in
        words."""
        outcome = pyodide_runtime.run(f"""
            import contextlib, io, json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r})
            client.emit("task_done")
            decision = client.decision()
            shown = io.StringIO()
            with contextlib.redirect_stdout(shown):
                kaibantrace.command_line(["status"], client=client)
            RESULT = json.dumps({{"enabled": decision.enabled, "by": decision.decided_by,
                                 "queued": client.stats()["queued"],
                                 "status": shown.getvalue()}})
        """, page_globals=page_globals)
        status = outcome["result"].pop("status")
        assert outcome["result"] == {"enabled": False, "by": source, "queued": 0}
        assert status.startswith("Telemetry is off.")
        assert f"decided by:  {wording}\n" in status
        assert outcome["fetches"] == []

    def test_read_alike_in_one_javascript_call_and_from_python(
            self, pyodide_runtime: Runtime) -> None:
        """The page's opt-outs are read by one JavaScript function (cheap enough for every
        event); a page whose policy refuses making it reads them from Python. Both answer
        alike for every kind of value, and ``false``, ``0``, blank and ``null`` leave it on."""
        outcome = pyodide_runtime.run("""
            import json, js
            from kaibantrace._policy import page
            values = ["undefined", "null", "''", "'  '", "'0'", "'1'", "'yes'", "false",
                      "true", "0", "1", "NaN", "({})"]
            answers = {}
            for value in values:
                for place in ("globalThis.KAIBAN_TELEMETRY_OPT_OUT",
                              "globalThis.navigator.doNotTrack",
                              "globalThis.navigator.globalPrivacyControl"):
                    js.eval("globalThis.KAIBAN_TELEMETRY_OPT_OUT = undefined;"
                            f"globalThis.navigator = {{}}; {place} = {value};")
                    answers[f"{place} = {value}"] = [page.page_opt_out(),
                                                     page._read_from_python()]
            RESULT = json.dumps({"answers": answers, "in_javascript":
                                 page._check is not page._read_from_python})
        """)
        assert outcome["result"]["in_javascript"] is True
        answers = outcome["result"]["answers"]
        assert {key: a for key, (a, b) in answers.items() if a != b} == {}
        opted_out = sorted(key for key, (a, _) in answers.items() if a is not None)
        assert opted_out == sorted(
            [f"globalThis.KAIBAN_TELEMETRY_OPT_OUT = {v}"
             for v in ("'0'", "'1'", "'yes'", "true", "1", "({})")]
            + ["globalThis.navigator.doNotTrack = '1'", "globalThis.navigator.doNotTrack = 1",
               "globalThis.navigator.globalPrivacyControl = true"])

    def test_set_while_the_page_runs_it_applies_from_the_next_event(
            self, pyodide_runtime: Runtime) -> None:
        """A consent banner may set the variable at any time: from then on no event is even
        queued, what waited is dropped unsent, and clearing it turns telemetry back on."""
        outcome = pyodide_runtime.run(f"""
            import json, js
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30)
            client.emit("before")
            js.globalThis.KAIBAN_TELEMETRY_OPT_OUT = "1"
            client.emit("while_off")
            off = client.stats()
            off_delivered = await client.aflush(5)
            js.globalThis.KAIBAN_TELEMETRY_OPT_OUT = ""
            client.emit("after")
            on_delivered = await client.aflush(5)
            RESULT = json.dumps({{"off": off, "off_delivered": off_delivered,
                                 "on_delivered": on_delivered, "stats": client.stats()}})
        """)
        result = outcome["result"]
        assert result["off"]["queued"] == 1  # "while_off" was never accepted
        assert result["off_delivered"] is False  # "before" was dropped, and flush says so
        assert result["on_delivered"] is True
        assert result["stats"]["dropped"] == {"opted_out": 1}
        (request,) = outcome["fetches"]
        assert [s["type"] for s in json.loads(request["body"])] == ["after"]

    @pytest.mark.parametrize("page_globals", [
        {}, {"KAIBAN_TELEMETRY_OPT_OUT": ""}, {"navigator": {"doNotTrack": "0"}},
        {"navigator": {"globalPrivacyControl": False}},
    ])
    def test_their_absence_leaves_it_on(self, pyodide_runtime: Runtime,
                                        page_globals: Dict[str, Any]) -> None:
        outcome = pyodide_runtime.run(f"""
            import json
            import kaibantrace
            decision = kaibantrace.Telemetry(app_id={APP_ID!r}).decision()
            RESULT = json.dumps({{"enabled": decision.enabled, "by": decision.decided_by}})
        """, page_globals=page_globals)
        assert outcome["result"] == {"enabled": True, "by": "default"}


class TestSendingFromAPage:
    def test_events_go_out_in_one_batch_with_fetch_after_the_interval(
            self, pyodide_runtime: Runtime) -> None:
        """No thread: the send is scheduled on the page's event loop and made with fetch,
        keepalive so that it may finish after the page is closed."""
        outcome = pyodide_runtime.run(f"""
            import asyncio, json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=0.05)

            @client.track("board_started")
            def start():
                return "started"

            start()
            client.emit("task_done", {{"n": 1}})
            before = client.stats()["sent"]
            for _ in range(100):  # the page goes on with its own work meanwhile
                await asyncio.sleep(0.02)
                if client.stats()["sent"] == 2:
                    break
            RESULT = json.dumps({{"before": before, "stats": client.stats()}})
        """)
        assert outcome["result"]["before"] == 0
        assert outcome["result"]["stats"]["sent"] == 2
        one_keepalive_batch(outcome["fetches"], ["board_started", "task_done"])

    def test_aflush_waits_and_a_refused_request_is_retried_not_raised(
            self, pyodide_runtime: Runtime) -> None:
        outcome = pyodide_runtime.run(f"""
            import asyncio, json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30, backoff=0.01)
            client.emit("task_done")
            first = await client.aflush(5)  # the network refuses: not delivered, not raised
            for _ in range(100):
                await asyncio.sleep(0.02)
                if client.stats()["sent"]:
                    break
            RESULT = json.dumps({{"first": first, "stats": client.stats(),
                                 "second": await client.aflush(5)}})
        """, statuses=[0, 200])
        result = outcome["result"]
        assert result["first"] is False
        assert result["stats"]["sent"] == 1 and result["stats"]["retried"] == 1
        assert result["second"] is True
        bodies = [f["body"] for f in outcome["fetches"]]
        assert len(bodies) == 2 and bodies[0] == bodies[1]  # the same batch, sent again

    def test_aflush_keeps_to_the_servers_retry_after(self, pyodide_runtime: Runtime) -> None:
        """A flush cuts our own backoff short, never the server's ``Retry-After``: one that
        cannot wait it out returns at once without asking; one that can waits, then sends."""
        outcome = pyodide_runtime.run(f"""
            import json, time
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30, backoff=0.01)
            client.emit("task_done")
            first = await client.aflush(5)
            began = time.monotonic()
            short = await client.aflush(0.3)
            short_took = time.monotonic() - began
            requests_then = client.stats()["requests"]
            waited = await client.aflush(5)
            RESULT = json.dumps({{"first": first, "short": short, "short_took": short_took,
                                 "requests_then": requests_then, "waited": waited}})
        """, statuses=[{"status": 503, "headers": {"Retry-After": "1"}}, 200])
        result = outcome["result"]
        assert result["first"] is False and result["short"] is False
        assert result["short_took"] < 0.25  # gave up at once: 0.3 s could not cover it
        assert result["requests_then"] == 1
        assert result["waited"] is True
        first, second = outcome["fetches"]
        assert second["at"] - first["at"] >= 1000  # not before the second the server asked for
        assert second["body"] == first["body"]

    @pytest.mark.parametrize("statuses, cause, requests", [
        ([0, 0, 0], "unreachable", 3),  # three failures in a row
        ([410], "retired", 1),  # the endpoint is gone
    ])
    def test_once_it_stops_sending_nothing_is_kept_for_a_send_that_cannot_come(
            self, pyodide_runtime: Runtime, statuses: List[int], cause: str,
            requests: int) -> None:
        """A page that gave up sending drops what waits and every later event, counted by
        cause, instead of holding them in memory until it closes."""
        outcome = pyodide_runtime.run(f"""
            import asyncio, json, time
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30, backoff=0.01, batch_size=1)
            client.emit("first")
            client.emit("second")
            await client.aflush(5)
            deadline = time.monotonic() + 10
            while client.stats()["pending"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the retries run on their own schedule
            client.emit("later")
            RESULT = json.dumps({{"stats": client.stats(), "flushed": await client.aflush(1)}})
        """, statuses=statuses)
        stats = outcome["result"]["stats"]
        assert stats["dropped"] == {cause: 3} and stats["pending"] == 0
        assert stats["requests"] == requests == len(outcome["fetches"])
        assert {f["body"] for f in outcome["fetches"]} == {outcome["fetches"][0]["body"]}
        assert outcome["result"]["flushed"] is False

    def test_large_signals_go_in_requests_a_browser_accepts_with_keepalive(
            self, pyodide_runtime: Runtime) -> None:
        """Browsers fail a keepalive request over 64 KiB (the driver does too): a batch of
        large signals goes out in several requests, each within the limit, none lost."""
        outcome = pyodide_runtime.run(f"""
            import json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30, max_per_minute=1000)
            for n in range(100):
                client.emit("note_taken", {{"n": n, "text": "a long note " * 40}})
            RESULT = json.dumps({{"delivered": await client.aflush(10),
                                 "stats": client.stats()}})
        """)
        assert outcome["result"]["delivered"] is True
        assert outcome["result"]["stats"]["sent"] == 100
        bodies = [f["body"] for f in outcome["fetches"]]
        assert len(bodies) >= 2
        assert all(len(body.encode("utf-8")) <= 60_000 for body in bodies)
        numbers = [s["payload"]["n"] for body in bodies for s in json.loads(body)]
        assert numbers == [str(n) for n in range(100)]  # each once, in order

    def test_a_request_past_its_timeout_is_aborted_then_retried(
            self, pyodide_runtime: Runtime) -> None:
        """No answer within ``timeout``: the request is aborted (so it cannot arrive beside
        its retry), counted as a failure, and the batch is sent again."""
        outcome = pyodide_runtime.run(f"""
            import asyncio, json, time
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30, timeout=0.2, backoff=0.01)
            client.emit("task_done")
            first = await client.aflush(5)
            deadline = time.monotonic() + 10
            while not client.stats()["sent"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the retry runs on its own schedule
            RESULT = json.dumps({{"first": first, "stats": client.stats(),
                                 "then": await client.aflush(5)}})
        """, statuses=[{"status": 200, "delay": 5000}, 200])
        result = outcome["result"]
        assert result["first"] is False and result["then"] is True
        assert result["stats"]["sent"] == 1 and result["stats"]["retried"] == 1
        assert [f["aborted"] for f in outcome["fetches"]] == [True, False]

    def test_a_flush_is_not_done_while_its_request_is_in_flight(
            self, pyodide_runtime: Runtime) -> None:
        outcome = pyodide_runtime.run(f"""
            import json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30)
            client.emit("task_done")
            short = await client.aflush(0.3)
            in_flight = client.stats()["in_flight"]
            at_once = client.flush(0)
            RESULT = json.dumps({{"short": short, "in_flight": in_flight, "at_once": at_once,
                                 "waited": await client.aflush(5)}})
        """, statuses=[{"status": 200, "delay": 800}])
        assert outcome["result"] == {"short": False, "in_flight": 1, "at_once": False,
                                     "waited": True}

    def test_the_module_level_aflush_waits_for_the_default_client(
            self, pyodide_runtime: Runtime) -> None:
        outcome = pyodide_runtime.run(f"""
            import json
            import kaibantrace
            kaibantrace.configure(app_id={APP_ID!r}, endpoint={INGEST!r}, flush_interval=30)
            kaibantrace.emit("task_done")
            RESULT = json.dumps({{"delivered": await kaibantrace.aflush(5),
                                 "sent": kaibantrace.default_client().stats()["sent"]}})
        """)
        assert outcome["result"] == {"delivered": True, "sent": 1}
        assert len(outcome["fetches"]) == 1

    def test_status_shows_the_pages_queue_and_what_it_sent(
            self, pyodide_runtime: Runtime) -> None:
        """A page has no outbox and no sent log: ``status`` says what its queue holds and
        how many signals went since it was loaded, and ``status --json`` counts the same
        queue."""
        outcome = pyodide_runtime.run(f"""
            import contextlib, io, json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30)
            client.emit("task_done")
            await client.aflush(5)
            client.emit("task_done")
            shown, as_json = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(shown):
                kaibantrace.command_line(["status"], client=client)
            with contextlib.redirect_stdout(as_json):
                kaibantrace.command_line(["status", "--json"], client=client)
            RESULT = json.dumps({{"text": shown.getvalue(), "json": as_json.getvalue()}})
        """)
        status = outcome["result"]["text"]
        assert "  waiting:     1 signal(s) in this page's queue\n" in status
        assert "  sent:        1 signal(s) since the page was loaded\n" in status
        shown = json.loads(outcome["result"]["json"])
        assert shown["pending"] == 1 and shown["pending_by_app"] == {APP_ID: 1}
        assert shown["last_sent"] is None and shown["delivery_process"] is None
        assert "outbox" not in status and "last sent" not in status

    def test_shutdown_sends_what_is_queued(self, pyodide_runtime: Runtime) -> None:
        """A page cannot wait in ``shutdown()``: it sends what is queued at once; events
        after it are ignored, as a process's are."""
        outcome = pyodide_runtime.run(f"""
            import asyncio, json, time
            import kaibantrace
            kaibantrace.configure(app_id={APP_ID!r}, endpoint={INGEST!r}, flush_interval=30)
            kaibantrace.emit("first")
            kaibantrace.emit("second")
            kaibantrace.shutdown(2)
            kaibantrace.emit("after_shutdown")
            client = kaibantrace.default_client()
            deadline = time.monotonic() + 10
            while client.stats()["sent"] < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            RESULT = json.dumps({{"stats": client.stats()}})
        """)
        stats = outcome["result"]["stats"]
        assert (stats["sent"], stats["queued"], stats["pending"]) == (2, 2, 0)
        (request,) = outcome["fetches"]
        assert [s["type"] for s in json.loads(request["body"])] == ["first", "second"]

    def test_a_batch_waiting_for_its_retry_is_counted_once(
            self, pyodide_runtime: Runtime) -> None:
        outcome = pyodide_runtime.run(f"""
            import json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30, backoff=30)
            client.emit("task_done")
            await client.aflush(5)
            RESULT = json.dumps(client.stats())
        """, statuses=[0])
        stats = outcome["result"]
        assert (stats["queued"], stats["pending"], stats["retried"]) == (1, 1, 1)

    def test_a_shorter_flush_interval_applies_to_what_waits(
            self, pyodide_runtime: Runtime) -> None:
        outcome = pyodide_runtime.run(f"""
            import asyncio, json, time
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30)
            client.emit("task_done")
            client.configure(flush_interval=0.05)
            deadline = time.monotonic() + 10
            while not client.stats()["sent"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            RESULT = json.dumps(client.stats())
        """)
        assert outcome["result"]["sent"] == 1

    def test_an_internationalised_endpoint_is_checked_without_requests(
            self, pyodide_runtime: Runtime) -> None:
        """A page has no ``requests`` (nor its ``idna``): a host name that is not ASCII is
        checked with Python's own codec, so a good one is used and a bad one is refused
        where the author can fix it."""
        outcome = pyodide_runtime.run(f"""
            import json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint="https://bücher.example/v2/")
            client.emit("task_done")
            delivered = await client.aflush(5)
            try:
                kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint="https://a..bé/v2/")
                refused = None
            except kaibantrace.ConfigurationError as error:
                refused = str(error)
            RESULT = json.dumps({{"delivered": delivered, "refused": refused}})
        """)
        assert outcome["result"]["delivered"] is True
        assert "IDNA cannot encode" in outcome["result"]["refused"]
        assert [f["url"] for f in outcome["fetches"]] == ["https://bücher.example/v2/"]

    @pytest.mark.parametrize("hiding, sent_at_once", [
        ("document.visibilityState = 'hidden';"
         " document.dispatchEvent(new Event('visibilitychange'))", True),
        ("dispatchEvent(new Event('pagehide'))", True),
        ("document.dispatchEvent(new Event('visibilitychange'))", False),  # still visible
    ])
    def test_what_waits_is_sent_at_once_as_the_page_hides(
            self, pyodide_runtime: Runtime, hiding: str, sent_at_once: bool) -> None:
        """The page may never run again once it is hidden or closed: the request is made in
        the event's own turn, before any ``await``, not half a second later."""
        outcome = pyodide_runtime.run(f"""
            import json, js
            js.eval(\"\"\"
                const events = new EventTarget();
                globalThis.addEventListener = events.addEventListener.bind(events);
                globalThis.dispatchEvent = events.dispatchEvent.bind(events);
                globalThis.document = new EventTarget();
                document.visibilityState = "visible";
            \"\"\")
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30)
            client.emit("first")
            client.emit("second")
            js.eval({hiding!r})
            requests = client.stats()["requests"]  # no await since the event
            RESULT = json.dumps({{"requests": requests, "delivered": await client.aflush(5)}})
        """)
        assert outcome["result"] == {"requests": 1 if sent_at_once else 0, "delivered": True}
        one_keepalive_batch(outcome["fetches"], ["first", "second"])

    def test_flush_cannot_wait_in_a_page_and_says_so(self, pyodide_runtime: Runtime) -> None:
        outcome = pyodide_runtime.run(f"""
            import asyncio, json, time
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30)
            client.emit("task_done")
            at_once = client.flush(5)  # starts the send; cannot block the page to wait
            deadline = time.monotonic() + 10
            while not client.stats()["sent"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the page goes on meanwhile
            RESULT = json.dumps({{"at_once": at_once, "later": client.flush(5),
                                 "sent": client.stats()["sent"]}})
        """)
        assert outcome["result"] == {"at_once": False, "later": True, "sent": 1}
        assert len(outcome["fetches"]) == 1

    def test_drain_answers_at_once_in_a_page(self, pyodide_runtime: Runtime) -> None:
        """``drain()`` waits in a process; a page cannot, so it starts the send and says
        whether anything is left, without blocking the page."""
        outcome = pyodide_runtime.run(f"""
            import json, time
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30)
            client.emit("task_done")
            began = time.monotonic()
            first = client.drain(5)
            took = time.monotonic() - began
            delivered = await client.aflush(5)
            RESULT = json.dumps({{"first": first, "took": took, "delivered": delivered,
                                 "then": client.drain(5)}})
        """)
        result = outcome["result"]
        assert result["first"] is False and result["took"] < 1.0  # 5 s were allowed
        assert result["delivered"] is True and result["then"] is True
        assert len(outcome["fetches"]) == 1

    def test_a_loss_is_reported_by_one_flush_not_by_every_later_one(
            self, pyodide_runtime: Runtime) -> None:
        """``flush()`` answers for what was accepted since the last flush: a rejected batch
        makes the next answer ``False``, and once later events are delivered, ``True``."""
        outcome = pyodide_runtime.run(f"""
            import asyncio, json, time
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r},
                                           flush_interval=30)

            async def until(condition):
                deadline = time.monotonic() + 10
                while not condition() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)

            client.emit("refused")
            client.flush(0)
            await until(lambda: client.stats()["dropped"])
            after_loss = client.flush(0)
            client.emit("taken")
            client.flush(0)
            await until(lambda: client.stats()["sent"])
            RESULT = json.dumps({{"after_loss": after_loss, "then": client.flush(0),
                                 "stats": client.stats()}})
        """, statuses=[400, 200])
        result = outcome["result"]
        assert result["stats"]["dropped"] == {"rejected": 1} and result["stats"]["sent"] == 1
        assert (result["after_loss"], result["then"]) == (False, True)


class TestTheWire:
    def test_a_page_sends_what_a_process_sends(self, pyodide_runtime: Runtime) -> None:
        """The same events, encoded in a page and in CPython: the same signals, key for key
        and value for value, apart from the times and the random IDs of each run."""
        events = """
            @client.track("board_started", payload={"team": "blue", "size": 3})
            def start():
                return 1

            start()
            client.emit("task_done", {"n": 1.5, "ok": True, "tags": ["a", "b"]}, float_value=2.5)
        """
        outcome = pyodide_runtime.run(f"""
            import json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r})
            {textwrap.indent(textwrap.dedent(events), " " * 12).strip()}
            await client.aflush(5)
        """)
        (request,) = outcome["fetches"]
        in_page = json.loads(request["body"])

        import kaibantrace
        from kaibantrace.testing import capture

        client = kaibantrace.Telemetry(app_id=APP_ID)
        with capture() as signals:
            exec(textwrap.dedent(events), {"client": client})  # the same source, in CPython

        def comparable(signal: Dict[str, Any]) -> Dict[str, Any]:
            return {k: v for k, v in signal.items()
                    if k not in {"sessionID", "clientUser", "receivedAt"}}

        assert len(in_page) == 2
        assert [comparable(s) for s in in_page] == [comparable(s) for s in signals]
        assert [sorted(s) for s in in_page] == [sorted(s) for s in signals]  # the same keys


class TestWithoutMd5:
    def test_the_project_id_is_kaibanjss_where_the_runtime_lacks_md5(
            self, pyodide_runtime: Runtime) -> None:
        """A runtime built without MD5 (``hashlib.md5`` missing) gets the package's own, so the
        project ID is the same value KaibanJS and CPython compute."""
        outcome = pyodide_runtime.run("""
            import hashlib, json
            del hashlib.md5  # as in a build without it
            import kaibantrace
            RESULT = json.dumps(kaibantrace.project_id("/home/pyodide/my-board",
                                                       {"HOME": "/home/pyodide"}))
        """)
        import kaibantrace

        expected = kaibantrace.project_id("/home/pyodide/my-board", {"HOME": "/home/pyodide"})
        assert outcome["result"] == expected


@pytest.fixture(scope="session")
def kaibantrace_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kaibantrace's wheel, built from a copy of this tree as a release builds it (so the
    build leaves nothing in the tree)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.cfg", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "kaibantrace", source / "kaibantrace",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    done = _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)])
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = out.glob("kaibantrace-*-py3-none-any.whl")
    return wheel


class PackageIndex:
    """A simple package index (PEP 503) on 127.0.0.1 serving given wheels, recording each
    path asked for."""

    def __init__(self, root: Path, wheels: List[Path]) -> None:
        self.asked: List[str] = []
        index = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, format: str, *args: Any) -> None:
                index.asked.append(self.path)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/simple"
        (root / "files").mkdir(parents=True)
        for wheel in wheels:
            shutil.copy2(wheel, root / "files" / wheel.name)
            project = wheel.name.split("-")[0]
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            link = f"{self.url[:-len('/simple')]}/files/{wheel.name}#sha256={digest}"
            page = root / "simple" / project / "index.html"
            page.parent.mkdir(parents=True)
            page.write_text(f'<!DOCTYPE html><html><body><a href="{link}">{wheel.name}</a>'
                            f"</body></html>\n", encoding="utf-8")
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


class TestMicropip:
    def test_micropip_installs_it_by_name_without_requests(
            self, pyodide_runtime: Runtime, kaibantrace_wheel: Path, tmp_path: Path) -> None:
        """``micropip.install("kaibantrace")`` from an index: the wheel's ``requests`` is
        marked not for emscripten, so the resolver never asks for it, and the installed
        package sends. wrapt is already on the page, as Pyodide's distribution provides it
        (its build for the browser is not on PyPI, and this machine has no CDN)."""
        index = PackageIndex(tmp_path / "index", [kaibantrace_wheel])
        try:
            wheels = pyodide_runtime.wheels
            outcome = pyodide_runtime.run(f"""
                import importlib.metadata, importlib.util, json
                import micropip
                await micropip.install("kaibantrace", index_urls=[{index.url!r}])
                import kaibantrace
                client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r})
                client.emit("task_done")
                RESULT = json.dumps({{
                    "version": importlib.metadata.version("kaibantrace"),
                    "file": kaibantrace.__file__,
                    "requests": importlib.util.find_spec("requests") is not None,
                    "installed": sorted(micropip.list()),
                    "delivered": await client.aflush(5)}})
            """, packages={name: str(wheel) for name, wheel in wheels.items()})
        finally:
            index.close()
        result = outcome["result"]
        assert result["version"] == kaibantrace_wheel.name.split("-")[1]
        assert "site-packages" in result["file"]
        assert result["requests"] is False
        assert "kaibantrace" in result["installed"] and "requests" not in result["installed"]
        assert result["delivered"] is True and len(outcome["fetches"]) == 1
        assert index.asked[0] == "/simple/kaibantrace/"
        assert not [path for path in index.asked if "requests" in path or "urllib3" in path]


class TestIdentity:
    def test_one_random_identity_per_page_load(self, pyodide_runtime: Runtime) -> None:
        """Every signal of a page load carries the same anonymous user (a hash, never the
        UUID itself), and the next load of the page is someone new: nothing is kept."""
        script = f"""
            import json
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r})
            client.emit("task_done")
            with client.session():
                client.emit("task_done")
            await client.aflush(5)
        """
        loads = [pyodide_runtime.run(script) for _ in range(2)]
        users = []
        for outcome in loads:
            (request,) = outcome["fetches"]
            signals = json.loads(request["body"])
            assert len(signals) == 2
            assert signals[0]["clientUser"] == signals[1]["clientUser"]
            assert signals[0]["sessionID"] != signals[1]["sessionID"]
            users.append(signals[0]["clientUser"])
        assert all(len(user) == 64 and int(user, 16) >= 0 for user in users)  # SHA-256, hex
        assert users[0] != users[1]
