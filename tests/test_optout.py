"""Opt-out: every source, every value, at any time, and truly nothing happens."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest

import kaibantrace
from kaibantrace.testing import Collector

from .conftest import APP_ID, subprocess_env

MakeClient = Callable[..., kaibantrace.Telemetry]
ON_VALUES = ["1", "true", "TRUE", "yes", " on ", "2", "anything"]
OFF_VALUES = ["", "0", "false", "No", "off", "n", "F"]


def only_the_control_arrives(client: kaibantrace.Telemetry, collector: Collector,
                             monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    """Turn the variable off again, send a control event, and check it is all that arrived.

    The refused event was emitted first, so had it been queued it would have
    been delivered no later than the control.
    """
    monkeypatch.delenv(variable)
    client.emit("control")
    assert client.flush(5)
    collector.wait_for(1)
    assert [s["type"] for s in collector.signals] == ["control"]


class TestOptOutValues:
    @pytest.mark.parametrize("variable", ["KAIBAN_TELEMETRY_OPT_OUT", "DO_NOT_TRACK"])
    @pytest.mark.parametrize("value", ON_VALUES)
    def test_set_values_opt_out(self, make_client: MakeClient, collector: Collector,
                                monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
        """Any value but the false words opts out, through either variable, set after import."""
        client = make_client()
        monkeypatch.setenv(variable, value)
        assert client.enabled is False
        client.emit("refused")
        assert client._delivery.sender is None
        only_the_control_arrives(client, collector, monkeypatch, variable)

    @pytest.mark.parametrize("value", OFF_VALUES)
    def test_false_words_leave_it_on(self, make_client: MakeClient, collector: Collector,
                                     monkeypatch: pytest.MonkeyPatch, value: str) -> None:
        """Empty and the false words keep telemetry on."""
        client = make_client()
        monkeypatch.setenv("KAIBAN_TELEMETRY_OPT_OUT", value)
        client.emit("kept")
        assert client.flush(5)
        assert [s["type"] for s in collector.wait_for(1)] == ["kept"]

    def test_opt_out_set_while_running(self, make_client: MakeClient, collector: Collector,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
        """An opt-out set after events were already sent stops the next ones."""
        client = make_client()
        client.emit("before")
        assert client.flush(5)
        monkeypatch.setenv("DO_NOT_TRACK", "1")
        client.emit("after")
        monkeypatch.delenv("DO_NOT_TRACK")
        client.emit("control")
        assert client.flush(5)
        assert [s["type"] for s in collector.wait_for(2)] == ["before", "control"]

    def test_queued_events_are_dropped_when_opting_out(
            self, make_client: MakeClient, collector: Collector,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """Turning opt-out on while events wait in the queue drops them unsent."""
        client = make_client(flush_interval=30)
        for _ in range(5):
            client.emit("queued")
        monkeypatch.setenv("KAIBAN_TELEMETRY_OPT_OUT", "1")
        assert client.flush(5) is False
        assert client.stats()["dropped"] == {"opted_out": 5}
        assert collector.requests == []

    def test_code_opt_out(self, make_client: MakeClient, collector: Collector) -> None:
        """opt_out=True in code switches the client off, and configure() can switch it back."""
        client = make_client(opt_out=True)
        client.emit("refused")
        assert client.decision().decided_by == "code" and client._delivery.sender is None
        client.configure(opt_out=False)
        client.emit("control")
        assert client.flush(5)
        assert [s["type"] for s in collector.wait_for(1)] == ["control"]

    def test_own_opt_out_variable(self, make_client: MakeClient, collector: Collector,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
        """A library's own opt-out variable switches off only that library's client."""
        mine = make_client(opt_out_env="MYLIB_TELEMETRY_OPT_OUT")
        other = make_client()
        monkeypatch.setenv("MYLIB_TELEMETRY_OPT_OUT", "1")
        mine.emit("mine")
        other.emit("other")
        assert other.flush(5)
        assert [s["type"] for s in collector.wait_for(1)] == ["other"]
        assert mine._delivery.sender is None

    @pytest.mark.parametrize("variable", ["KAIBAN_TELEMETRY_OPT_OUT", "DO_NOT_TRACK"])
    def test_the_shared_variables_switch_off_libraries_with_their_own(
            self, make_client: MakeClient, collector: Collector,
            monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
        """One variable switches off every program that uses kaibantrace, whatever opt-out
        variable a library chose; also for a client that already sent (the fast path)."""
        mine = make_client(opt_out_env="MYLIB_TELEMETRY_OPT_OUT")
        mine.emit("before")
        assert mine.flush(5)
        monkeypatch.setenv(variable, "1")
        mine.emit("after")
        assert mine.decision().decided_by == variable
        monkeypatch.delenv(variable)
        mine.emit("control")
        assert mine.flush(5)
        assert [s["type"] for s in collector.wait_for(2)] == ["before", "control"]


class TestDebugAndNoAppId:
    def test_debug_prints_and_sends_nothing(self, make_client: MakeClient, collector: Collector,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
        """KAIBAN_TELEMETRY_DEBUG prints each signal as it would be sent, and sends nothing."""
        client = make_client()
        monkeypatch.setenv("KAIBAN_TELEMETRY_DEBUG", "1")
        client.emit("debugged", {"k": 1})
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"[kaibantrace debug] would send to {collector.url}: ")
        (signal,) = json.loads(line.split(": ", 1)[1])
        assert signal["type"] == "debugged" and signal["payload"] == {"k": "1"}
        assert signal["appID"] == APP_ID
        assert client._delivery.sender is None
        only_the_control_arrives(client, collector, monkeypatch, "KAIBAN_TELEMETRY_DEBUG")

    def test_debug_prints_warnings_beside_the_signals(self, make_client: MakeClient,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
        """With no logging configured, a bad name or a dropped field is still seen in debug
        mode: on stderr, once per cause, next to the signal as it would be sent."""
        client = make_client()
        monkeypatch.setenv("KAIBAN_TELEMETRY_DEBUG", "1")
        client.emit("bad name!")
        client.emit("ok", {"mail": "someone@example.com", "n": 1})
        client.emit("ok", {"mail": "other@example.com", "n": 2})
        lines = capsys.readouterr().err.splitlines()
        assert lines[0] == ("[kaibantrace debug] warning: event name 'bad name!' may only contain "
                            "letters, digits and the characters _ . : -; event dropped")
        assert lines[1] == ("[kaibantrace debug] warning: payload field 'mail' of 'ok' looks "
                            "like an e-mail address; field dropped")
        assert [line.split(":")[0] for line in lines[2:]] == ["[kaibantrace debug] would send to http"] * 2
        assert len(lines) == 4  # once per cause, as the log line

    def test_warnings_stay_off_stderr_outside_debug_mode(
            self, make_client: MakeClient, capsys: pytest.CaptureFixture[str],
            caplog: pytest.LogCaptureFixture) -> None:
        """A library's warnings are the host's logging's to show; only debug mode prints."""
        client = make_client()
        client.emit("bad name!")
        assert client.flush(5) is False  # the event was dropped...
        assert "event name 'bad name!'" in caplog.text  # ...and said so in the log
        assert capsys.readouterr().err == ""

    def test_without_app_id_nothing_is_sent(self, collector: Collector,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """With no app ID, events are dropped without a thread; debug mode still shows them."""
        client = kaibantrace.Telemetry(endpoint=collector.url)
        client.emit("lost")
        assert client._delivery.sender is None and client.stats()["dropped"] == {"no_app_id": 1}
        assert client.flush(5) is False
        monkeypatch.setenv("KAIBAN_TELEMETRY_APP_ID", APP_ID)
        client.emit("control")
        assert client.flush(5)
        assert [s["type"] for s in collector.wait_for(1)] == ["control"]
        client.shutdown()


_OPTED_OUT_CHILD = textwrap.dedent("""
    import os, sys
    touched = []

    def audit(event, args):
        if event in ("socket.__new__", "socket.connect", "_thread.start_new_thread", "os.mkdir"):
            touched.append(event)
        elif event == "open" and (args[1] or "r").strip("rbt") :
            touched.append("open for writing: %r" % (args[0],))

    sys.addaudithook(audit)
    import kaibantrace

    kaibantrace.configure(app_id="15E9347E-9EE5-4971-A8FB-61D91F3EBA12",
                          endpoint=sys.argv[1], max_per_minute=0)  # every call's event

    @kaibantrace.track("workflow_started", payload={"a": 1})
    def work():
        return 1

    @kaibantrace.track_cli("run_board")
    def main():
        return work()

    with kaibantrace.session():
        for _ in range(100):
            main()
        kaibantrace.emit("manual", {"x": 1})
    assert kaibantrace.flush(30)  # a bound for a hang, not a speed to reach
    import json, threading
    print(json.dumps({"touched": touched, "threads": threading.active_count(),
                      "http": "requests" in sys.modules or "urllib3" in sys.modules,
                      "sqlite3": "sqlite3" in sys.modules}))
""")


class TestOptedOutProcess:
    @pytest.mark.parametrize("variable", ["KAIBAN_TELEMETRY_OPT_OUT", "DO_NOT_TRACK"])
    def test_no_thread_file_socket_or_http_import(self, tmp_path: Path, collector: Collector,
                                                  variable: str) -> None:
        """An opted-out process starts no thread, writes no file, opens no socket, imports no HTTP."""
        env = subprocess_env(**{variable: "1", "HOME": str(tmp_path),
                                "KAIBAN_TELEMETRY_DIR": str(tmp_path / "state")})
        done = subprocess.run([sys.executable, "-c", _OPTED_OUT_CHILD, collector.url],
                              env=env, cwd=str(tmp_path), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        report = json.loads(done.stdout)
        assert report == {"touched": [], "threads": 1, "http": False, "sqlite3": False}
        assert list(tmp_path.iterdir()) == []
        assert collector.requests == []

    def test_control_same_child_enabled_does_start_a_thread(self, tmp_path: Path,
                                                            collector: Collector) -> None:
        """The same child with telemetry on does start a thread and send: the check can fail."""
        env = subprocess_env(HOME=str(tmp_path))
        done = subprocess.run([sys.executable, "-c", _OPTED_OUT_CHILD, collector.url],
                              env=env, cwd=str(tmp_path), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["threads"] > 1 and report["http"] is True and report["sqlite3"] is True
        assert "socket.__new__" in report["touched"]
        # 100 x 2 tracked calls, the emit, and the project's install event from the first track_cli
        assert len(collector.wait_for(202)) == 202
