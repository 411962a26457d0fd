"""kaibantrace under Pyodide in a real browser: headless Chromium, with no network.

``tests/test_pyodide.py`` runs Pyodide under Node.js, which is quick and lets a test stage
any host; but JupyterLite and PyScript users run Python in a browser page, where ``fetch``,
``navigator`` and the event loop are the browser's own. This module loads the same pinned
Pyodide from a static server on 127.0.0.1 into Debian's Chromium, unpacks kaibantrace and
wrapt's pure wheel there, and runs a script. The page (``tests/browser/page.mjs``) records
the ``fetch`` calls the script makes instead of sending them, and posts what happened back
to the server. Chromium resolves no host name, so nothing can leave the machine.

Skipped, saying why, where Chromium is missing (and, by the Pyodide fixture, where
Node.js or npm is).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, cast

import pytest

from . import test_pyodide
from .test_pyodide import APP_ID, INGEST, ROOT, Runtime, one_keepalive_batch

PAGE = Path(__file__).resolve().parent / "browser"
DEADLINE = 120.0  # seconds for Chromium to load Pyodide, run the script and answer
SHUTDOWN_GRACE = 10.0

# That module's fixture, offered here too: its Pyodide and wheels are cached on disk, so a
# second session instance for this module costs a lock and a glob.
pyodide_runtime = test_pyodide.pyodide_runtime


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium's launcher; session-scoped and asked for first, so that a machine without it
    skips before the Pyodide fixture installs anything."""
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("Debian's chromium is needed for the browser test (apt install chromium)")
    return found


class _Server(http.server.ThreadingHTTPServer):
    """The page's origin: static files from one directory, ``POST /result``, and an
    ingest endpoint, ``POST /v2/``, for signals that must really leave the page."""

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.result: Optional[Dict[str, Any]] = None
        self.arrived = threading.Event()
        self.ingested: List[Any] = []  # each request's signals
        self.ingest_arrived = threading.Event()
        self.log: List[str] = []  # each request, for a failure's message

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(http.server.SimpleHTTPRequestHandler):
    # Module scripts must be served as JavaScript and WebAssembly as itself (streaming
    # compilation checks it); the system's MIME table may know neither.
    extensions_map = {".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".json": "application/json",
                      ".html": "text/html; charset=utf-8", ".py": "text/plain; charset=utf-8",
                      ".zip": "application/zip", ".whl": "application/zip"}

    def do_POST(self) -> None:
        server = cast(_Server, self.server)
        if self.path not in ("/result", "/v2/"):
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(204 if self.path == "/result" else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if self.path == "/result":
            server.result = json.loads(body)
            server.arrived.set()
        else:
            server.ingested.append(json.loads(body))
            server.ingest_arrived.set()

    def log_message(self, format: str, *args: Any) -> None:
        cast(_Server, self.server).log.append(format % args)


@contextlib.contextmanager
def _serving(root: Path) -> Iterator[_Server]:
    server = _Server(root)
    thread = threading.Thread(target=server.serve_forever, name="page-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(SHUTDOWN_GRACE)


@contextlib.contextmanager
def _browsing(chromium: str, url: str, scratch: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Headless Chromium on ``url``, with a new profile and a home of its own (Debian's
    launcher script deletes old crash reports under ``$HOME``, and the crash handler keeps
    its database there); ended with its whole process group."""
    home = scratch / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={scratch / 'profile'}",
               # Every name resolves to nothing: only the loopback address can be reached.
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               url]
    with open(scratch / "chromium.log", "wb") as log:
        browser = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield browser
    finally:
        _end_group(browser, scratch)


def _end_group(browser: subprocess.Popen[bytes], scratch: Path) -> None:
    """Terminate the browser's process group (zygotes, renderers, GPU and network processes),
    wait for every one of its processes to end, and kill the group after the grace period."""
    group = browser.pid  # start_new_session: the group is named after the browser
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE
    while (browser.poll() is None or _still_running(scratch)) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    browser.wait(SHUTDOWN_GRACE)


def _still_running(scratch: Path) -> List[str]:
    """Chromium's processes that still run: each names ``scratch`` on its command line (its
    profile; the crash handlers, in sessions of their own, their database under the home).
    Zombies have ended; here init may reap them late."""
    found = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            state = (process / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):  # ended meanwhile
            continue
        if state != "Z" and f"{scratch}{os.sep}" in command:
            found.append(command[:200])
    return found


def _crash_reports(scratch: Path) -> List[str]:
    """The minidumps Chromium's crash handler wrote, each with the kind of process that
    crashed (its ``ptype`` crash key: ``renderer``, say): a page that never answers has
    often lost its renderer."""
    found = []
    for dump in sorted((scratch / "home").rglob("*.dmp")):
        data = dump.read_bytes()
        # The key and its value are each stored after their length, a 32-bit integer.
        key = re.search(rb"\x05\x00\x00\x00ptype\x00{0,3}([\x01-\xff])\x00\x00\x00", data)
        kind = "process unknown"
        if key is not None:
            kind = data[key.end():key.end() + key[1][0]].decode(errors="replace")
        found.append(f"{dump.name} ({kind})")
    return found


def _package_zip(target: Path) -> Path:
    """kaibantrace's source as the page unpacks it into site-packages."""
    with zipfile.ZipFile(target, "w") as archive:
        for source in sorted((ROOT / "kaibantrace").rglob("*.py")):
            if "__pycache__" not in source.parts:
                archive.write(source, source.relative_to(ROOT).as_posix())
    return target


def run_in_chromium(chromium: str, runtime: Runtime, scratch: Path, script: str,
                    query: str = "", *, ingested: Optional[List[Any]] = None
                    ) -> Dict[str, Any]:
    """Run ``script`` (top-level ``await`` allowed; it sets ``RESULT`` to JSON text) in a page;
    the page's report: ``result``, ``fetches``, ``error`` and ``jspi``. With ``ingested``,
    also wait for a request to the page's own ``/v2/`` and put what arrived there in it."""
    root = scratch / "site"
    root.mkdir()
    for name in ("page.html", "page.mjs"):
        shutil.copy(PAGE / name, root / name)
    (root / "pyodide").symlink_to(runtime.pyodide, target_is_directory=True)
    shutil.copy(runtime.wrapt_wheel, root / "wrapt.whl")
    _package_zip(root / "kaibantrace.zip")
    (root / "script.py").write_text(textwrap.dedent(script), encoding="utf-8")

    with _serving(root) as server, \
            _browsing(chromium, f"{server.url}page.html{query}", scratch) as browser:
        deadline = time.monotonic() + DEADLINE
        # Waits on the page's answer, checking now and then that the browser still runs.
        while not server.arrived.wait(0.5):
            if browser.poll() is not None or time.monotonic() > deadline:
                log = (scratch / "chromium.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"no result from the page (browser exit status {browser.poll()});\n"
                            f"crash reports: {_crash_reports(scratch)}\n"
                            f"requests: {server.log}\nchromium: {log}")
        report = server.result
        if ingested is not None:
            # Generous: a deadline that only a page that never sends reaches.
            assert server.ingest_arrived.wait(30), f"nothing arrived; requests: {server.log}"
    if ingested is not None:  # read once the browser has ended: a late duplicate counts too
        ingested.extend(server.ingested)
    assert not _still_running(scratch), "Chromium's processes outlived the test"
    assert report is not None
    assert report["error"] is None, report["error"]
    assert report["jspi"] is False, "the page could not hide stack switching from Pyodide"
    return report


SCRIPT = f"""
    import json, sys
    import js
    import kaibantrace

    client = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={INGEST!r}, flush_interval=0.05)

    @client.track("board_started")
    def start():
        return "started"

    ran = start()
    with client.session():
        client.emit("task_done", {{"n": 1}})
    flushed = await client.aflush(5)
    RESULT = json.dumps({{"ran": ran, "flushed": flushed, "stats": client.stats(),
                         "decided_by": client.decision().decided_by,
                         "platform": sys.platform, "user_agent": str(js.navigator.userAgent)}})
"""


class TestInChromium:
    def test_a_page_sends_one_keepalive_batch_with_the_browsers_fetch(
            self, chromium: str, pyodide_runtime: Runtime, tmp_path: Path) -> None:
        report = run_in_chromium(chromium, pyodide_runtime, tmp_path, SCRIPT)
        result = report["result"]
        assert result["platform"] == "emscripten"
        assert "Chrome/" in result["user_agent"]  # this ran in the browser, not in Node.js
        assert result["ran"] == "started" and result["flushed"] is True
        assert result["stats"]["sent"] == 2 and result["stats"]["requests"] == 1

        signals = one_keepalive_batch(report["fetches"], ["board_started", "task_done"])
        # The session block gave its event a session of its own.
        assert signals[0]["sessionID"] != signals[1]["sessionID"]

    def test_the_pages_opt_out_variable_keeps_everything_in(
            self, chromium: str, pyodide_runtime: Runtime, tmp_path: Path) -> None:
        report = run_in_chromium(chromium, pyodide_runtime, tmp_path, SCRIPT, "?optout=1")
        result = report["result"]
        assert result["platform"] == "emscripten" and "Chrome/" in result["user_agent"]
        assert result["decided_by"] == "globalThis.KAIBAN_TELEMETRY_OPT_OUT"
        assert result["ran"] == "started"  # the page's own work still runs
        assert result["stats"]["queued"] == 0 and result["stats"]["sent"] == 0
        assert report["fetches"] == []

    def test_what_waits_when_the_page_is_closed_still_arrives(
            self, chromium: str, pyodide_runtime: Runtime, tmp_path: Path) -> None:
        """Signals queued moments before the user leaves the page (the flush interval not yet
        over): the page's ``pagehide`` sends them with a keepalive request, which the
        browser completes after the page is gone. Here the request really leaves the page,
        for its own origin's ``/v2/``."""
        script = f"""
            import json, js
            import kaibantrace
            client = kaibantrace.Telemetry(app_id={APP_ID!r},
                                           endpoint=str(js.location.origin) + "/v2/",
                                           flush_interval=30)
            client.emit("board_started")
            client.emit("board_closed")
            RESULT = json.dumps({{"requests": client.stats()["requests"]}})
        """
        ingested: List[Any] = []
        report = run_in_chromium(chromium, pyodide_runtime, tmp_path, script, "?leave=1",
                                 ingested=ingested)
        assert report["result"] == {"requests": 0}  # nothing had gone before the page left
        assert [[s["type"] for s in signals] for signals in ingested] == [
            ["board_started", "board_closed"]]
