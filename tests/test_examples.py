"""The scripts in ``examples/`` run as documented, in a real subprocess each."""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import subprocess
import sys
import uuid
from typing import List, Optional

import pytest

import kaibantrace
from kaibantrace.testing import Collector

from .conftest import subprocess_env

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
ENV_APP_ID = "2B1D6A0E-5C3F-4E8A-9D7B-0F4C2E6A8B13"
RECEIVED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LINE = re.compile(r"^  (\S+)\s+sessionID=(\S+) clientUser=([0-9a-f]{12})\.\.\. payload=(.*)$")


def run_example(script: str, *args: str, cwd: Optional[pathlib.Path] = None,
                **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<script>`` with telemetry variables cleared except ``env``."""
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd,
                          env=subprocess_env(**env), capture_output=True, text=True, timeout=30)


def printed_types(stdout: str) -> List[str]:
    """The signal types the script says its local collector received, in order."""
    return [match.group(1) for match in map(LINE.match, stdout.splitlines()) if match]


def run_against(collector: Collector, script: str, *args: str,
                **env: str) -> subprocess.CompletedProcess[str]:
    """Run the script with KAIBAN_TELEMETRY_ENDPOINT and _APP_ID aimed at ``collector``."""
    return run_example(script, *args, KAIBAN_TELEMETRY_ENDPOINT=collector.url,
                       KAIBAN_TELEMETRY_APP_ID=ENV_APP_ID, **env)


def assert_nothing_arrives(collector: Collector) -> None:
    """No request reached the collector.

    The script has exited and said from its own counters that nothing was
    sent; this looks at the receiving side too. (That an opted-out process
    opens no socket at all is proven with audit hooks in test_optout.py.)
    """
    assert collector.requests == []


QUICKSTART_LINE = re.compile(r"^(\S+)\s+sessionID=(\S+) clientUser=([0-9a-f]{12})\.\.\. payload=(.*)$")


class TestQuickstart:
    def test_runs_offline_and_shows_the_signals(self) -> None:
        """The signals reach the script's own collector, in one session, and are printed."""
        done = run_example("quickstart.py")
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        lines = [match.groups() for match in map(QUICKSTART_LINE.match, done.stdout.splitlines())
                 if match]
        assert [line[0] for line in lines] == ["workflow_started", "workflow_finished"]
        assert len({line[1] for line in lines}) == 1
        assert lines[1][3] == "{'agents': '2', 'status': 'done'}"

    def test_writes_nothing_outside_a_temporary_directory(self, tmp_path: pathlib.Path) -> None:
        """Run as a newcomer runs it (no kaibantrace directories set): the home directory
        stays empty, and the temporary directory it used is gone afterwards."""
        home, scratch = tmp_path / "home", tmp_path / "tmp"
        home.mkdir()
        scratch.mkdir()
        env = {name: value for name, value in subprocess_env().items()
               if not name.startswith(("KAIBAN_TELEMETRY_", "XDG_"))}
        env.update(HOME=str(home), TMPDIR=str(scratch))
        done = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "workflow_finished" in done.stdout
        assert list(home.rglob("*")) == []
        assert list(scratch.rglob("*")) == []

    def test_opted_out_sends_nothing(self) -> None:
        """With KAIBAN_TELEMETRY_OPT_OUT=1 it still succeeds, says so, and receives nothing."""
        done = run_example("quickstart.py", KAIBAN_TELEMETRY_OPT_OUT="1")
        assert done.returncode == 0, done.stderr
        assert done.stdout == ("Telemetry is off (decided by KAIBAN_TELEMETRY_OPT_OUT), "
                               "so nothing was sent.\n")


class TestWorkflow:
    def test_runs_offline_and_shows_the_signals(self) -> None:
        """The library's own client reports every decorated call, in three sessions."""
        done = run_example("workflow.py")
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        types = printed_types(done.stdout)
        assert sorted(types) == sorted(["workflow_started", "agent_step", "agent_step",
                                        "report_streamed"] * 3)
        assert "received 12 signal(s) in 3 session(s)" in done.stdout

    def test_honours_the_endpoint_and_app_id_variables(self, collector: Collector) -> None:
        """With both variables set, the signals go to that endpoint with that app ID."""
        done = run_against(collector, "workflow.py")
        assert done.returncode == 0, done.stderr
        assert f"Delivered 12 of 12 signal(s) to {collector.url}" in done.stdout
        signals = collector.wait_for(12, timeout=5)
        assert {s["appID"] for s in signals} == {ENV_APP_ID}
        sessions = {}
        for signal in signals:
            sessions.setdefault(signal["sessionID"], []).append(signal["type"])
        assert len(sessions) == 3
        for types in sessions.values():
            assert sorted(types) == ["agent_step", "agent_step", "report_streamed",
                                     "workflow_started"]

    def test_opted_out_sends_nothing(self, collector: Collector) -> None:
        """With KAIBAN_TELEMETRY_OPT_OUT=1 the workflow still runs, and nothing is sent."""
        done = run_against(collector, "workflow.py", KAIBAN_TELEMETRY_OPT_OUT="1")
        assert done.returncode == 0, done.stderr
        assert "has notes on pricing" in done.stdout
        assert "Telemetry is off (KAIBAN_TELEMETRY_OPT_OUT is set), so nothing was sent." \
            in done.stdout
        assert_nothing_arrives(collector)


class TestCli:
    @pytest.mark.parametrize(("command", "event"), [("init", "init_board"),
                                                    ("run", "run_board"),
                                                    ("deploy", "deploy_board")])
    def test_runs_offline_and_shows_the_signal(self, command: str, event: str) -> None:
        """Each subcommand exits 0 and its KaibanJS event reaches the local collector."""
        done = run_example("cli.py", command)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        # The first run in a project also records KaibanJS's install event.
        assert printed_types(done.stdout) == ["install_kaibanjs", event]
        assert "appID 95BF7A3E-9D86-432D-9633-3526DD3A8977" in done.stdout
        again = run_example("cli.py", command)
        assert printed_types(again.stdout) == [event]

    @pytest.mark.parametrize(("command", "event"), [("init", "init_board"),
                                                    ("run", "run_board"),
                                                    ("deploy", "deploy_board")])
    def test_sends_what_kaibanjs_cli_sends(self, command: str, event: str,
                                           tmp_path: pathlib.Path) -> None:
        """Field by field, KaibanJS's CLI signal: its CLI app, its signal name, the hashed
        project ID as clientUser, and nothing else (no payload, no test mode, no value).

        Debug mode prints each signal exactly as it would be sent (and records no install:
        the install event's fields are checked in test_user_control.py)."""
        home = tmp_path / "home"
        project = tmp_path / "my-board"
        project.mkdir()
        done = run_example("cli.py", command, cwd=project, HOME=str(home),
                           KAIBAN_TELEMETRY_DEBUG="1")
        assert done.returncode == 0, done.stderr
        printed = [json.loads(line.split(": ", 1)[1]) for line in done.stderr.splitlines()
                   if line.startswith("[kaibantrace debug] would send to ")]
        signals = [signal for body in printed for signal in body]
        assert [s["type"] for s in signals] == [event]
        project_id = kaibantrace.project_id(cwd=str(project), environ={"HOME": str(home)})
        for signal in signals:
            assert set(signal) == {"appID", "clientUser", "sessionID", "type",
                                   "telemetryClientVersion", "receivedAt"}
            assert signal["appID"] == "95BF7A3E-9D86-432D-9633-3526DD3A8977"  # KaibanJS's CLI app
            assert signal["clientUser"] == hashlib.sha256(project_id.encode()).hexdigest()
            assert str(uuid.UUID(signal["sessionID"])) == signal["sessionID"]
            assert RECEIVED_AT.match(signal["receivedAt"])

    def test_honours_the_endpoint_and_app_id_variables(self, collector: Collector) -> None:
        """With both variables set, the run_board signal goes there with that app ID."""
        done = run_against(collector, "cli.py", "run", "--watch")
        assert done.returncode == 0, done.stderr
        assert f"Delivered 2 of 2 signal(s) to {collector.url}" in done.stdout
        install, signal = collector.wait_for(2, timeout=5)
        assert install["type"] == "install_kaibanjs" and "payload" not in install
        assert signal["type"] == "run_board"
        assert signal["appID"] == ENV_APP_ID
        assert "payload" not in signal  # as KaibanJS's CLI: --watch is not sent

    def test_opted_out_sends_nothing(self, collector: Collector) -> None:
        """With KAIBAN_TELEMETRY_OPT_OUT=1 the command still succeeds, and nothing is sent."""
        done = run_against(collector, "cli.py", "run", KAIBAN_TELEMETRY_OPT_OUT="1")
        assert done.returncode == 0, done.stderr
        assert "Running the board once" in done.stdout
        assert "Telemetry is off (KAIBAN_TELEMETRY_OPT_OUT is set), so nothing was sent." \
            in done.stdout
        assert_nothing_arrives(collector)


class TestFrameworkExamples:
    @pytest.mark.parametrize("script", ["click_cli.py", "typer_cli.py"])
    def test_reports_the_sub_command_and_no_argument(self, script: str, collector: Collector
                                                     ) -> None:
        """The click and typer examples record install, then the sub-command, never 'v2'."""
        pytest.importorskip(script.split("_")[0])
        done = run_against(collector, script, "db", "migrate", "v2")
        assert done.returncode == 0, done.stderr
        assert "Migrated to v2" in done.stdout
        install, used = collector.wait_for(2, timeout=5)
        assert (install["type"], used["type"]) == ("install", "cli_used")
        assert used["payload"] == {"command": "db migrate"}
        assert b"v2" not in b"".join(r.body for r in collector.requests)

    def test_click_example_mounts_the_telemetry_commands(self) -> None:
        pytest.importorskip("click")
        done = run_example("click_cli.py", "telemetry", "status", "--json")
        assert done.returncode == 0, done.stderr
        assert '"decided_by": "default"' in done.stdout
