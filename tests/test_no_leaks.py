"""Nothing personal leaves the machine: every byte the collector received while the examples
ran (bodies and headers), and every log line at INFO or above, is searched for the values of the
environment, the arguments, the paths, the host name and the user name."""

from __future__ import annotations

import getpass
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from kaibantrace.testing import Collector

from .conftest import subprocess_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
APP = "2B1D6A0E-5C3F-4E8A-9D7B-0F4C2E6A8B13"
# Logs from the child at INFO and above, on stderr, so they can be searched too.
LOGGING = ("import logging, runpy, sys; logging.basicConfig(level=logging.INFO); "
           "script = sys.argv.pop(1); sys.path.insert(0, script.rsplit('/', 1)[0]); "
           "runpy.run_path(script, run_name='__main__')")
SECRET_ENV = {"DEPLOY_TOKEN": "tok-4f1e9c2a77b0", "DATABASE_URL": "postgres://admin:pw9931@db/x",
              "CUSTOMER": "acme-industries-ltd"}
QUICKSTART = "quickstart.py"
RUNS = [
    (QUICKSTART,),
    ("workflow.py",),
    ("cli.py", "init", "--name", "board-named-quietly-8812"),
    ("cli.py", "run", "--watch"),
    ("click_cli.py", "run", "--name", "click-arg-value-5521"),
    ("click_cli.py", "db", "migrate", "migration-arg-3391"),
    ("typer_cli.py", "run", "--name", "typer-arg-value-6643"),
]


def forbidden(env: Dict[str, str], project: Path) -> Dict[str, str]:
    """Every value that must never appear, with where it comes from."""
    # The app ID is sent by design: it says which TelemetryDeck app the signals are for.
    values = {f"${name}": value for name, value in env.items()
              if len(value) >= 6 and name != "KAIBAN_TELEMETRY_APP_ID"}
    # Argument values (sub-command names such as "migrate" are sent by design).
    values.update({f"argument {arg}": arg for run in RUNS for arg in run[1:]
                   if any(c.isdigit() for c in arg)})
    values.update({"the project path": str(project), "the project folder": project.name,
                   "the home directory": env["HOME"], "the examples path": str(EXAMPLES),
                   "the host name": socket.gethostname(), "the user name": getpass.getuser(),
                   "Python's path": sys.executable})
    return {where: value for where, value in values.items() if len(value) >= 4}


def test_no_value_of_the_environment_arguments_paths_or_names_is_sent_or_logged(
        collector: Collector, tmp_path: Path) -> None:
    project = tmp_path / "customer-project-zeta"
    home = tmp_path / "home-of-someone"
    project.mkdir()
    home.mkdir()
    env = subprocess_env(KAIBAN_TELEMETRY_ENDPOINT=collector.url, KAIBAN_TELEMETRY_APP_ID=APP,
                         HOME=str(home), **SECRET_ENV)
    logs: List[str] = []
    printed = b""
    for script, *args in RUNS:
        done = subprocess.run([sys.executable, "-c", LOGGING, str(EXAMPLES / script), *args],
                              env=env, cwd=project, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        logs.append(done.stderr)
        if script == QUICKSTART:  # it sends to a collector of its own, and prints what arrived
            assert "workflow_finished" in done.stdout
            printed += done.stdout.encode()
    requests = collector.requests
    assert len(requests) >= len(RUNS) - 1  # the check below is not vacuous
    sent = printed + b"\n".join(
        b"\n".join([r.body, *(f"{k}: {v}".encode() for k, v in r.headers.items())]) for r in requests)
    for where, value in forbidden(env, project).items():
        assert value.encode() not in sent, f"{where} was sent"
        assert value.lower().encode() not in sent.lower(), f"{where} was sent (in another case)"
        for log in logs:
            info = "\n".join(line for line in log.splitlines() if not line.startswith("DEBUG"))
            assert value not in info, f"{where} was logged: {info[:300]}"


@pytest.mark.parametrize("value", ["tok-4f1e9c2a77b0"])
def test_the_search_finds_what_is_there(value: str) -> None:
    """A control: the same search does find a value in bytes that hold it."""
    assert value.encode() in b'{"payload":{"x":"tok-4f1e9c2a77b0"}}'
