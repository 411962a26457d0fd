"""The helpers shipped for users' tests: Collector, capture(), reset() and the pytest plugin."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest

import kaibantrace
from kaibantrace._encode.identity import hash_user, keyed_identity
from kaibantrace._policy import prefs as _prefs
from kaibantrace._policy.config import keyed_with_local_secret
from kaibantrace.testing import Collector, capture, check_request

from .conftest import APP_ID, subprocess_env

pytest_plugins = ["pytester"]


def post(url: str, body: Any, content_type: str = "application/json") -> int:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


GOOD = {"appID": APP_ID, "clientUser": "u", "type": "t"}


class TestCollector:
    def test_accepts_valid_batches(self, collector: Collector) -> None:
        """A valid array of signals is answered 200 and recorded."""
        assert post(collector.url, [GOOD, GOOD]) == 200
        assert collector.signals == [GOOD, GOOD]

    @pytest.mark.parametrize(("body", "reason"), [
        (GOOD, "not a JSON array"),
        (b"{nope", "not JSON"),
        ([{"appID": APP_ID, "type": "t"}], "clientUser"),
        ([{**GOOD, "appID": "not-a-uuid"}], "UUID"),
        ([{**GOOD, "payload": {"a": {"b": 1}}}], "flat"),
        ([{**GOOD, "isTestMode": "true"}], "isTestMode"),
    ])
    def test_refuses_what_the_ingest_refuses(self, collector: Collector, body: Any,
                                            reason: str) -> None:
        """Requests the real ingest would refuse are answered 400 with the reason recorded."""
        assert post(collector.url, body) == 400
        (request,) = collector.requests
        assert reason in (request.error or "") and collector.signals == []

    def test_refuses_wrong_path_and_content_type(self, collector: Collector) -> None:
        """Only POSTs of JSON to /v2/ or /v2/namespace/<ns>/ are accepted."""
        assert post(collector.url.replace("/v2/", "/v1/"), [GOOD]) == 400
        assert post(collector.url, [GOOD], content_type="text/plain") == 400
        assert post(collector.url + "namespace/ns/", [GOOD]) == 200

    def test_scripted_answers_then_healthy(self, collector: Collector) -> None:
        """respond() answers the next requests as told, then goes back to 200."""
        collector.respond(503, headers={"Retry-After": "7"}, times=2)
        assert [post(collector.url, [GOOD]) for _ in range(3)] == [503, 503, 200]
        assert len(collector.signals) == 1

    def test_dropped_connection(self, collector: Collector) -> None:
        """drop=True closes the connection without an answer."""
        collector.respond(drop=True, times=1)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            post(collector.url, [GOOD])
        assert collector.requests[0].error == "dropped"

    def test_wait_for_times_out_clearly(self, collector: Collector) -> None:
        """wait_for raises TimeoutError saying how many signals came."""
        with pytest.raises(TimeoutError, match="got 0"):
            collector.wait_for(1, timeout=0.05)

    def test_binds_loopback_only(self, collector: Collector) -> None:
        """The collector listens on 127.0.0.1 only."""
        assert collector.url.startswith("http://127.0.0.1:")
        with socket.create_connection(("127.0.0.1", collector.port), timeout=2):
            pass

    def test_check_request_is_reusable(self) -> None:
        """check_request gives the decoded signals of a valid body."""
        assert check_request("/v2/", "application/json", json.dumps([GOOD]).encode()) == ([GOOD], None)


class TestCapture:
    def test_records_without_network_or_thread(self) -> None:
        """capture() records signals in wire format, starting no sender."""
        client = kaibantrace.Telemetry(app_id=APP_ID)
        with capture() as signals:
            client.emit("captured", {"n": 1})
        assert signals[0]["type"] == "captured" and signals[0]["payload"] == {"n": "1"}
        assert client._delivery.sender is None

    def test_ignores_environment_opt_out_by_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """By default capture works under the plugin's opt-out; respect_opt_out=True honours it."""
        monkeypatch.setenv("KAIBAN_TELEMETRY_OPT_OUT", "1")
        with capture() as signals:
            kaibantrace.emit("seen")
        with capture(respect_opt_out=True) as honoured:
            kaibantrace.emit("unseen")
        assert [s["type"] for s in signals] == ["seen"] and honoured == []

    def test_honours_an_opt_out_written_in_code(self) -> None:
        """``opt_out=True`` is the program's own decision, not the test run's: a library's
        test that its switch works passes under the plugin's fixture too."""
        switched_off = kaibantrace.Telemetry(app_id=APP_ID, opt_out=True)
        with capture() as signals:
            switched_off.emit("never")
            kaibantrace.Telemetry(app_id=APP_ID).emit("control")
        assert [s["type"] for s in signals] == ["control"]

    def test_restores_routing_afterwards(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """After the block, an opted-out client is opted out again."""
        monkeypatch.setenv("KAIBAN_TELEMETRY_OPT_OUT", "1")
        client = kaibantrace.Telemetry(app_id=APP_ID)
        with capture():
            client.emit("x")
        assert client._route() is None


def home_only_env(home: pathlib.Path, **extra: str) -> dict[str, str]:
    """A child's environment as on a user's machine: no kaibantrace or XDG directories set,
    ``home`` as the home directory."""
    env = {name: value for name, value in subprocess_env().items()
           if not name.startswith(("KAIBAN_TELEMETRY_", "XDG_", "PYTEST_", "DO_NOT_TRACK"))}
    env.update(HOME=str(home), **extra)
    return env


class TestNothingWrittenAtHome:
    def test_capture_writes_no_file(self, tmp_path: pathlib.Path) -> None:
        """A capture around a CLI run (keyed by the local secret, a first run in this project)
        and an event leaves the home directory empty, outside pytest and opted in too: no
        secret, no install marker, no notice marker, no outbox."""
        home = tmp_path / "home"
        home.mkdir()
        code = f"""if True:
            import kaibantrace
            from kaibantrace.testing import capture

            kaibantrace.configure(app_id={APP_ID!r})
            assert kaibantrace.default_client().enabled

            @kaibantrace.track_cli("run_board")
            def main():
                kaibantrace.emit("workflow_started")

            with capture() as signals:
                main()
            print(sorted(s["type"] for s in signals))
        """
        done = subprocess.run([sys.executable, "-c", code], env=home_only_env(home), cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "['run_board', 'workflow_started']\n"
        assert list(home.rglob("*")) == []

    def test_capture_keys_cli_identities_with_the_saved_secret(
            self, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
        """Where a secret was saved, a capture shows the clientUser a real run would send."""
        monkeypatch.chdir(tmp_path)
        _prefs.forget_in_memory()
        saved = _prefs.local_secret(persist=True)
        assert os.path.exists(_prefs.secret_path())
        _prefs.forget_in_memory()

        @kaibantrace.track_cli("run_board")
        def main() -> None:
            pass

        with capture() as signals:
            main()
        settings = kaibantrace.default_client().settings
        assert keyed_with_local_secret(settings)  # else the secret would not matter
        keyed = keyed_identity(kaibantrace.project_id(), saved)
        assert signals[0]["clientUser"] == hash_user(keyed, settings.salt)


class TestReset:
    def test_reset_restores_the_default_client(self, collector: Collector) -> None:
        """testing.reset() stops the default sender and forgets configuration."""
        kaibantrace.configure(app_id=APP_ID, endpoint=collector.url, flush_interval=0.01)
        kaibantrace.emit("one")
        assert kaibantrace.flush(5)
        kaibantrace.testing.reset()
        client = kaibantrace.default_client()
        assert client.settings == kaibantrace.Settings() and client._delivery.sender is None
        assert client.stats()["sent"] == 0


class TestPytestPlugin:
    def test_plugin_opts_out_and_offers_fixtures(self, pytester: pytest.Pytester,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """Under the plugin the run is opted out, and both fixtures work in a user's suite."""
        monkeypatch.delenv("KAIBAN_TELEMETRY_OPT_OUT", raising=False)
        pytester.makepyfile(test_user="""
            import os, pytest, kaibantrace
            APP = "6C1A37E0-2F4B-4E8D-9B7A-3D5E1F2A4C60"

            def test_opted_out():
                assert os.environ["KAIBAN_TELEMETRY_OPT_OUT"] == "1"
                own = kaibantrace.Telemetry(app_id=APP, opt_out_env="MYLIB_TELEMETRY_OPT_OUT")
                assert not own.enabled  # DO_NOT_TRACK covers clients with their own variable
                assert not kaibantrace.Telemetry(app_id="6C1A37E0-2F4B-4E8D-9B7A-3D5E1F2A4C60").enabled

            def test_events(telemetry_events):
                kaibantrace.emit("from_user_code", {"n": 2})
                assert telemetry_events[0]["type"] == "from_user_code"

            def test_strict(telemetry_events):
                with pytest.raises(kaibantrace.PrivacyError):
                    kaibantrace.emit("leaky", {"mail": "a@example.com"})

            def test_collector(telemetry_collector):
                assert telemetry_collector.url.startswith("http://127.0.0.1:")
        """)
        result = pytester.runpytest_subprocess()
        result.assert_outcomes(passed=4)

    def test_a_users_suite_writes_nothing_in_the_home_directory(
            self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
            tmp_path: pathlib.Path) -> None:
        """Even a test that opts back in and sends to the collector writes its outbox and
        sent log in the plugin's temporary directory, which is gone after the run."""
        home = tmp_path / "home"
        home.mkdir()
        for name, value in home_only_env(home).items():
            monkeypatch.setenv(name, value)
        for name in list(os.environ):
            if name.startswith(("KAIBAN_TELEMETRY_", "XDG_")):
                monkeypatch.delenv(name)
        where = tmp_path / "where.txt"
        pytester.makepyfile(test_user=f"""
            import os, kaibantrace
            from kaibantrace.testing import capture
            APP = "6C1A37E0-2F4B-4E8D-9B7A-3D5E1F2A4C60"

            def test_sends(telemetry_collector, monkeypatch):
                monkeypatch.delenv("KAIBAN_TELEMETRY_OPT_OUT")
                monkeypatch.delenv("DO_NOT_TRACK")
                client = kaibantrace.Telemetry(app_id=APP, endpoint=telemetry_collector.url)
                client.emit("ping")
                assert client.flush(5)
                client.shutdown()
                state = os.environ["KAIBAN_TELEMETRY_DIR"]
                assert "sent.log" in os.listdir(state)
                with open({str(where)!r}, "w") as out:
                    out.write(state)

            def test_no_endpoint_beyond_this_machine(monkeypatch):
                monkeypatch.delenv("KAIBAN_TELEMETRY_OPT_OUT")
                monkeypatch.delenv("DO_NOT_TRACK")
                assert kaibantrace.command_line(["status", "--json"],
                                                client=kaibantrace.Telemetry(app_id=APP)) == 0

            def test_cli_under_capture():
                @kaibantrace.track_cli("run_board")
                def main():
                    pass
                with capture() as signals:
                    main()
                assert signals[0]["type"] == "run_board"
        """)
        result = pytester.runpytest_subprocess("-s")
        result.assert_outcomes(passed=3)
        assert '"endpoint": "http://127.0.0.1:9/v2/"' in result.stdout.str()
        state = where.read_text()
        assert not state.startswith(str(home))
        assert not os.path.exists(state)
        assert list(home.rglob("*")) == []

    def test_plugin_can_be_disabled(self, pytester: pytest.Pytester,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """-p no:kaibantrace leaves the environment alone."""
        monkeypatch.delenv("KAIBAN_TELEMETRY_OPT_OUT", raising=False)
        monkeypatch.delenv("DO_NOT_TRACK", raising=False)
        pytester.makepyfile(test_user="""
            import os
            def test_untouched():
                assert "KAIBAN_TELEMETRY_OPT_OUT" not in os.environ
                assert "DO_NOT_TRACK" not in os.environ
        """)
        result = pytester.runpytest_subprocess("-p", "no:kaibantrace")
        result.assert_outcomes(passed=1)
