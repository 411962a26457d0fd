"""Shared fixtures: a clean environment, a loopback collector, and clients aimed at it."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import time
from typing import Any, Callable, Dict, Iterator, List

import pytest

import kaibantrace
from kaibantrace._delivery import handoff as _handoff
from kaibantrace._delivery.outbox import outbox_path
from kaibantrace.testing import Collector, reset

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_ID = "15E9347E-9EE5-4971-A8FB-61D91F3EBA12"

_OUR_VARIABLES = [
    "KAIBAN_TELEMETRY_OPT_OUT",
    "DO_NOT_TRACK",
    "KAIBAN_TELEMETRY_DEBUG",
    "KAIBAN_TELEMETRY_ENDPOINT",
    "KAIBAN_TELEMETRY_APP_ID",
    "KAIBAN_TELEMETRY_DIR",
    "KAIBAN_TELEMETRY_CONFIG_DIR",
    "KAIBAN_TELEMETRY_PROFILE",
    "KAIBAN_TELEMETRY_DETACHED",
]
# The suite may itself run in CI; tests that want CI say so.
CI_VARIABLES = ["TF_BUILD", "GITHUB_ACTIONS", "APPVEYOR", "CI", "TRAVIS", "CIRCLECI",
                "CODEBUILD_BUILD_ID", "BUILD_ID", "TEAMCITY_VERSION", "JB_SPACE_API_URL"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[None]:
    """Each test starts with telemetry on (the plugin opts the run out), a fresh default client,
    and a state directory of its own, which child processes inherit."""
    for name in _OUR_VARIABLES + CI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("KAIBAN_TELEMETRY_DIR", str(state))
    # Processes the tests start leave what they could not send for the next one, as they
    # did before delivery processes existed; the tests of those turn them back on.
    monkeypatch.setenv("KAIBAN_TELEMETRY_DETACHED", "0")
    monkeypatch.setenv("KAIBAN_TELEMETRY_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
    # Child processes import this working tree, whatever copy happens to be installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
    reset()
    yield
    reset()
    assert_no_delivery_process_left(str(state))


def assert_no_delivery_process_left(directory: str, timeout: float = 45.0) -> None:
    """Fail unless every delivery process that worked on ``directory`` has ended (waiting for
    them up to ``timeout``: each ends within its 30 s bound)."""
    deadline = time.monotonic() + timeout
    try:
        locks = [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith("delivery-")]
    except OSError:
        return
    for path in locks:
        app_id = os.path.basename(path)[len("delivery-"):-len(".lock")]
        while _handoff.running(directory, app_id) is not None:
            assert time.monotonic() < deadline, f"a delivery process still runs for {app_id}"
            time.sleep(0.05)


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


@pytest.fixture
def make_client(collector: Collector) -> Iterator[Callable[..., kaibantrace.Telemetry]]:
    """Build clients sending to the test's collector; all are shut down after the test."""
    made: List[kaibantrace.Telemetry] = []

    def make(**settings: Any) -> kaibantrace.Telemetry:
        settings.setdefault("app_id", APP_ID)
        settings.setdefault("endpoint", collector.url)
        settings.setdefault("flush_interval", 0.02)
        # These clients test delivery, often with bursts of one event name; the budget
        # that holds such bursts back by default has tests of its own (test_budget.py).
        settings.setdefault("max_per_minute", 0)
        client = kaibantrace.Telemetry(**settings)
        made.append(client)
        return client

    yield make
    for client in made:
        client.shutdown(timeout=2.0)


_HELD_PORTS: Dict[int, socket.socket] = {}


@pytest.fixture
def free_port() -> Iterator[int]:
    """A loopback port on which nothing listens (yet): bound, not listening, for the whole
    test. Connecting to it is refused, and no other server can take it meanwhile (the
    other test workers bind servers to new ports all the time, and one on this port would
    accept what a test means to be refused). ``open_port`` gives it up for the test's own
    server."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = int(holder.getsockname()[1])
    _HELD_PORTS[port] = holder
    yield port
    open_port(port)


def open_port(port: int) -> int:
    """Give up the hold on a ``free_port`` just before binding a server to it."""
    holder = _HELD_PORTS.pop(port, None)
    if holder is not None:
        holder.close()
    return port


@pytest.fixture
def refused_url(free_port: int) -> str:
    """A loopback URL on which nothing listens."""
    return f"http://127.0.0.1:{free_port}/v2/"


@pytest.fixture
def black_hole_url() -> Iterator[str]:
    """A loopback URL whose server accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/v2/"


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment for a child Python: ours without kaibantrace's variables (but the
    test's state and config directories, and whether delivery processes start), plus overrides."""
    env = {k: v for k, v in os.environ.items()
           if k not in _OUR_VARIABLES
           or k in ("KAIBAN_TELEMETRY_DIR", "KAIBAN_TELEMETRY_CONFIG_DIR", "KAIBAN_TELEMETRY_DETACHED")}
    env.update(overrides)
    return env


def rows_in_outbox(directory: str, app_id: str = APP_ID) -> int:
    """Signals in the app's outbox file under ``directory`` (0 when there is no file)."""
    path = outbox_path(directory, app_id)
    if not os.path.exists(path):
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM signals").fetchone()[0])
