"""pytest plugin, loaded automatically when kaibantrace is installed.

It opts telemetry out for the whole test run by setting
``KAIBAN_TELEMETRY_OPT_OUT=1`` and ``DO_NOT_TRACK=1`` (subprocesses inherit
them), so a test suite never sends anything, even from clients with an opt-out
variable of their own. It offers two fixtures:

* ``telemetry_events``: the signals recorded by ``kaibantrace.testing.capture``
  in strict mode, so a bad event name or payload fails the test at the call;
* ``telemetry_collector``: a running ``kaibantrace.testing.Collector``.

Disable it with ``-p no:kaibantrace``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional

import pytest

from ._config import ENV_DO_NOT_TRACK, ENV_OPT_OUT
from .testing import Collector, capture

_VARIABLES = (ENV_OPT_OUT, ENV_DO_NOT_TRACK)
_saved: List[Dict[str, Optional[str]]] = []


def pytest_configure(config: pytest.Config) -> None:
    _saved.append({name: os.environ.get(name) for name in _VARIABLES})
    for name in _VARIABLES:
        os.environ[name] = "1"


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _saved:
        return
    for name, previous in _saved.pop().items():
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


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
