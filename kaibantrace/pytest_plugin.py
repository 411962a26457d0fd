"""pytest plugin, loaded automatically when kaibantrace is installed.

For the whole test run it opts telemetry out, by setting
``KAIBAN_TELEMETRY_OPT_OUT=1`` and ``DO_NOT_TRACK=1``, and points kaibantrace's
state and config directories (``KAIBAN_TELEMETRY_DIR``,
``KAIBAN_TELEMETRY_CONFIG_DIR``) at a temporary directory removed at the end.
Unless the run names one, it also points ``KAIBAN_TELEMETRY_ENDPOINT`` at a
closed port on 127.0.0.1. Subprocesses inherit these variables. So a test
suite never sends anything, even from clients with an opt-out variable of
their own, and even a test that opts back in can reach no endpoint but the one
it gives in code (a ``telemetry_collector``'s); nor does it ever write an
outbox, a sent log, a secret or a marker in the real home directory. It offers
two fixtures:

* ``telemetry_events``: the signals recorded by ``kaibantrace.testing.capture``
  in strict mode, so a bad event name or payload fails the test at the call;
* ``telemetry_collector``: a running ``kaibantrace.testing.Collector``.

Disable it with ``-p no:kaibantrace``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from ._policy.config import ENV_DO_NOT_TRACK, ENV_ENDPOINT, ENV_OPT_OUT
from ._policy.state import ENV_CONFIG_DIR, ENV_DIR
from .testing import Collector, capture

_VARIABLES = (ENV_OPT_OUT, ENV_DO_NOT_TRACK, ENV_DIR, ENV_CONFIG_DIR, ENV_ENDPOINT)
NOWHERE = "http://127.0.0.1:9/v2/"
"""Where signals go in a test run that names no endpoint: the discard port, closed on
loopback, so a connection is refused at once and nothing leaves the machine."""
_saved: List[Tuple[str, Dict[str, Optional[str]]]] = []


def pytest_configure(config: pytest.Config) -> None:
    scratch = tempfile.mkdtemp(prefix="kaibantrace-pytest-")
    _saved.append((scratch, {name: os.environ.get(name) for name in _VARIABLES}))
    os.environ.update({ENV_OPT_OUT: "1", ENV_DO_NOT_TRACK: "1",
                       ENV_DIR: os.path.join(scratch, "state"),
                       ENV_CONFIG_DIR: os.path.join(scratch, "config")})
    if not os.environ.get(ENV_ENDPOINT, "").strip():
        os.environ[ENV_ENDPOINT] = NOWHERE


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _saved:
        return
    scratch, previous = _saved.pop()
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def telemetry_events() -> Iterator[List[Dict[str, Any]]]:
    """Signals every client would send during the test, recorded in memory (strict mode)."""
    with capture(strict=True) as signals:
        yield signals


@pytest.fixture
def telemetry_collector() -> Iterator[Collector]:
    """A TelemetryDeck-compatible collector on 127.0.0.1, stopped after the test."""
    with Collector() as collector:
        yield collector
