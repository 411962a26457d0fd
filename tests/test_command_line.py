"""The ``kaibantrace`` command, each sub-command in a real subprocess with its own directories."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

import pytest

import kaibantrace
from kaibantrace._policy import prefs as _prefs
from kaibantrace.testing import Collector

from .conftest import APP_ID, open_port, rows_in_outbox, subprocess_env


def kaibantrace_command(*args: str, cwd: Any = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kaibantrace", *args], env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


_LEAVE_SIGNALS = textwrap.dedent("""
    import sys, kaibantrace
    kaibantrace.configure(app_id=sys.argv[1], endpoint=sys.argv[2], backoff=0.01)
    for i in range(int(sys.argv[3])):
        kaibantrace.emit("left_behind", {"i": i})
    kaibantrace.flush(5)  # the endpoint refuses: the signals stay in the outbox
""")


def leave_signals(url: str, count: int) -> None:
    """A process that leaves ``count`` signals in the outbox (its endpoint refuses them)."""
    subprocess.run([sys.executable, "-c", _LEAVE_SIGNALS, APP_ID, url, str(count)],
                   env=subprocess_env(), check=True, timeout=60)
    assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == count


class TestStatus:
    def test_on_by_default(self) -> None:
        """status says on, decided by the default, in words and as JSON."""
        done = kaibantrace_command("status", KAIBAN_TELEMETRY_APP_ID=APP_ID)
        assert done.returncode == 0 and done.stderr == ""
        assert "Telemetry is on." in done.stdout and APP_ID in done.stdout
        assert "  endpoint:    https://nom.telemetrydeck.com/v2/\n" in done.stdout
        assert "  decided by:  the default, as no one opted out\n" in done.stdout
        report = as_json(kaibantrace_command("status", "--json", KAIBAN_TELEMETRY_APP_ID=APP_ID))
        assert report["enabled"] is True and report["decided_by"] == "default"
        assert (report["can_send"], report["cannot_send_because"]) == (True, None)
        assert report["endpoint"] == "https://nom.telemetrydeck.com/v2/"
        assert report["app_id"] == APP_ID and report["pending"] == 0
        assert report["state_dir"] == os.environ["KAIBAN_TELEMETRY_DIR"]
        assert report["last_sent"] is None

    @pytest.mark.parametrize(("env", "why"), [
        ({"KAIBAN_TELEMETRY_ENDPOINT": "ftp://x", "KAIBAN_TELEMETRY_APP_ID": APP_ID},
         "KAIBAN_TELEMETRY_ENDPOINT=ftp://x is unusable: it must be an https:// URL"),
        ({"KAIBAN_TELEMETRY_ENDPOINT": "http://collector.example/v2/"},
         "KAIBAN_TELEMETRY_ENDPOINT=http://collector.example/v2/ is unusable: it must use "
         "https:// unless the host is loopback (127.0.0.1, ::1, localhost)"),
        ({"KAIBAN_TELEMETRY_DEBUG": "1", "KAIBAN_TELEMETRY_APP_ID": APP_ID},
         "in debug mode signals are printed on stderr, never sent")])
    def test_says_plainly_when_nothing_can_be_sent(self, env: Dict[str, str], why: str) -> None:
        """On, yet every event would be dropped (or only printed): status says so and why,
        never a bare "Telemetry is on."."""
        done = kaibantrace_command("status", **env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == f"Telemetry is on, but nothing can be sent: {why}."
        report = as_json(kaibantrace_command("status", "--json", **env))
        assert report["enabled"] is True
        assert (report["can_send"], report["cannot_send_because"]) == (False, why)
        usable = "KAIBAN_TELEMETRY_ENDPOINT" not in env
        assert report["endpoint"] == ("https://nom.telemetrydeck.com/v2/" if usable else None)
        assert ("  endpoint:    (none usable)\n" in done.stdout) is not usable

    def test_an_authors_client_without_an_app_id_cannot_send(
            self, capsys: pytest.CaptureFixture[str]) -> None:
        """Mounted in a tool whose client has no app ID, status says that is why; the
        ``kaibantrace`` command itself speaks for every program, whatever their app IDs."""
        assert kaibantrace.command_line(["status"], client=kaibantrace.Telemetry(),
                                        prog="mytool telemetry") == 0
        assert capsys.readouterr().out.splitlines()[0] == (
            "Telemetry is on, but nothing can be sent: no app ID is configured (app_id in the "
            "program's code, or KAIBAN_TELEMETRY_APP_ID).")
        assert kaibantrace_command("status").stdout.splitlines()[0] == "Telemetry is on."

    @pytest.mark.parametrize("variable", ["KAIBAN_TELEMETRY_OPT_OUT", "DO_NOT_TRACK"])
    def test_names_the_variable_that_decided(self, variable: str) -> None:
        done = kaibantrace_command("status", **{variable: "1"})
        assert "Telemetry is off." in done.stdout and variable in done.stdout
        report = as_json(kaibantrace_command("status", "--json", **{variable: "1"}))
        assert (report["enabled"], report["decided_by"]) == (False, variable)
        assert (report["can_send"], report["cannot_send_because"]) == (False, "telemetry is off")

    def test_counts_what_waits_in_the_outbox(self, refused_url: str) -> None:
        leave_signals(refused_url, 7)
        report = as_json(kaibantrace_command("status", "--json"))
        assert report["pending"] == 7 and report["pending_by_app"] == {APP_ID.upper(): 7}

    @pytest.mark.parametrize("spelling", [APP_ID.lower(), APP_ID.upper(), "{" + APP_ID + "}",
                                          "urn:uuid:" + APP_ID])
    def test_app_option_finds_the_outbox_however_the_id_is_written(self, spelling: str,
                                                                    refused_url: str) -> None:
        leave_signals(refused_url, 3)
        report = as_json(kaibantrace_command("status", "--json", "--app", spelling))
        assert report["pending_by_app"] == {APP_ID.upper(): 3}

    def test_app_option_decides_for_that_app(self) -> None:
        """An endpoint retired for one app is reported for that app, not for another."""
        other = "0F5A5C1E-0000-4000-8000-000000000001"
        url = "http://127.0.0.1:9/v2/"
        _prefs.mark_retired(other, url)
        asked = as_json(kaibantrace_command("status", "--json", "--app", other,
                                            KAIBAN_TELEMETRY_APP_ID=APP_ID,
                                            KAIBAN_TELEMETRY_ENDPOINT=url))
        own = as_json(kaibantrace_command("status", "--json", KAIBAN_TELEMETRY_APP_ID=APP_ID,
                                          KAIBAN_TELEMETRY_ENDPOINT=url))
        assert (asked["enabled"], asked["decided_by"]) == (False, "retired endpoint")
        assert (own["enabled"], own["decided_by"]) == (True, "default")

    def test_files_that_are_not_outboxes_are_ignored(self) -> None:
        state = Path(os.environ["KAIBAN_TELEMETRY_DIR"])
        state.mkdir(parents=True, exist_ok=True)
        (state / "outbox-not-an-app.sqlite3").write_text("junk")
        assert as_json(kaibantrace_command("status", "--json"))["pending_by_app"] == {}


class TestEnableDisable:
    def test_disable_is_saved_honoured_everywhere_and_purges(self, refused_url: str,
                                                             collector: Collector) -> None:
        """disable saves the choice (0600), deletes what waits, and every process honours it."""
        leave_signals(refused_url, 5)
        report = as_json(kaibantrace_command("disable", "--json"))
        assert report == {"ok": True, "saved": "disabled", "enabled": False, "deleted": 5}
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 0
        saved = Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]) / "preferences.json"
        assert json.loads(saved.read_text())["telemetry"] == "disabled"
        if os.name == "posix":
            assert saved.stat().st_mode & 0o777 == 0o600
        status = as_json(kaibantrace_command("status", "--json"))
        assert (status["enabled"], status["decided_by"]) == (False, "saved preference")
        # A program run afterwards sends nothing and creates no outbox.
        subprocess.run([sys.executable, "-c", _LEAVE_SIGNALS, APP_ID, collector.url, "3"],
                       env=subprocess_env(), check=True, timeout=60)
        assert collector.requests == []
        assert not list(Path(os.environ["KAIBAN_TELEMETRY_DIR"]).glob("outbox-*"))

    def test_enable_never_overrides_an_environment_opt_out(self) -> None:
        assert kaibantrace_command("disable").returncode == 0
        done = kaibantrace_command("enable", DO_NOT_TRACK="1")
        assert done.returncode == 0 and "stays off" in done.stdout and "DO_NOT_TRACK" in done.stdout
        report = as_json(kaibantrace_command("enable", "--json", DO_NOT_TRACK="1"))
        assert (report["enabled"], report["decided_by"]) == (False, "DO_NOT_TRACK")
        assert as_json(kaibantrace_command("status", "--json"))["enabled"] is True

    def test_unwritable_config_directory_is_a_one_line_failure(self, tmp_path: Path) -> None:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        done = kaibantrace_command("disable", KAIBAN_TELEMETRY_CONFIG_DIR=str(blocker / "sub"))
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith("kaibantrace: could not save your choice")
        assert len(done.stderr.strip().splitlines()) == 1


def make_secret() -> bytes:
    """What the first keyed send does: make this machine's secret (in the test's directory)."""
    secret = _prefs.local_secret(persist=True)
    _prefs.forget_in_memory()
    return secret


class TestIdentityCommands:
    def test_project_id_and_reset_rotating_the_secret(self, tmp_path: Path) -> None:
        """project-id shows the seed's ID and what is sent; reset rotates the secret, so the
        sent value changes while the project ID stays."""
        secret_file = Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]) / "secret"
        before = as_json(kaibantrace_command("project-id", "--json", cwd=tmp_path))
        assert before["project_id"] == kaibantrace.project_id(cwd=str(tmp_path))
        assert before["sent_as"] is None and before["keyed_with_local_secret"] is True
        assert not secret_file.exists()  # looking never makes the secret

        secret = make_secret()
        first = as_json(kaibantrace_command("project-id", "--json", cwd=tmp_path))
        assert bytes.fromhex(secret_file.read_text().strip()) == secret
        keyed = hmac.new(secret, first["project_id"].encode(), hashlib.sha256).hexdigest()
        assert first["sent_as"] == hashlib.sha256(keyed.encode()).hexdigest()
        assert first["project_id"] not in first["sent_as"]

        reset = as_json(kaibantrace_command("reset", "--json"))
        assert "secret" in reset["removed"] and not secret_file.exists()
        make_secret()
        second = as_json(kaibantrace_command("project-id", "--json", cwd=tmp_path))
        assert second["project_id"] == first["project_id"]
        assert second["sent_as"] not in (None, first["sent_as"])

    def test_kaibanjs_profile_in_code_sends_the_plain_hash(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.chdir(tmp_path)
        client = kaibantrace.Telemetry(profile="kaibanjs")
        assert kaibantrace.command_line(["project-id", "--json"], client=client) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["sent_as"] == hashlib.sha256(report["project_id"].encode()).hexdigest()

    def test_the_profile_variable_alone_keeps_the_secret_and_lends_no_app_id(
            self, tmp_path: Path) -> None:
        """Only code may choose the seed's reversible identities or KaibanJS's app ID."""
        make_secret()
        report = as_json(kaibantrace_command("project-id", "--json", cwd=tmp_path,
                                             KAIBAN_TELEMETRY_PROFILE="kaibanjs"))
        assert report["keyed_with_local_secret"] is True
        assert report["sent_as"] != hashlib.sha256(report["project_id"].encode()).hexdigest()
        status = as_json(kaibantrace_command("status", "--json",
                                             KAIBAN_TELEMETRY_PROFILE="kaibanjs"))
        assert status["profile"] == "kaibanjs" and status["app_id"] is None

    def test_processes_making_the_secret_at_once_agree_on_one(self) -> None:
        code = ("from kaibantrace._policy import prefs; "
                "print(prefs.local_secret(persist=True).hex())")
        children = [subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(),
                                     stdout=subprocess.PIPE, text=True) for _ in range(6)]
        secrets = {child.communicate(timeout=60)[0].strip() for child in children}
        saved = (Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]) / "secret").read_text().strip()
        assert secrets == {saved}

    def test_reset_that_cannot_remove_a_file_fails_in_one_line(self) -> None:
        (Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]) / "preferences.json").mkdir()
        done = kaibantrace_command("reset")
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.startswith("kaibantrace: could not remove")
        assert len(done.stderr.strip().splitlines()) == 1


class TestLogAndFlush:
    def test_log_is_exactly_what_the_collector_received(self, collector: Collector) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID, endpoint=collector.url, flush_interval=0.01,
                                       batch_size=3)
        try:
            for i in range(7):
                client.emit("audited", {"i": i})
            assert client.flush(10)
        finally:
            client.shutdown()
        records = as_json(kaibantrace_command("log", "--json", "--limit", "100"))
        assert [r["body"].encode("utf-8") for r in records] == [r.body for r in collector.requests]
        assert sum(r["signals"] for r in records) == 7
        assert {r["url"] for r in records} == {collector.url}
        text = kaibantrace_command("log", "--limit", "1")
        assert text.returncode == 0 and records[-1]["body"] in text.stdout
        status = as_json(kaibantrace_command("status", "--json", KAIBAN_TELEMETRY_APP_ID=APP_ID))
        assert status["last_sent"] == records[-1]["sent_at"]

    def test_flush_sends_what_waits(self, free_port: int) -> None:
        url = f"http://127.0.0.1:{free_port}/v2/"
        leave_signals(url, 12)
        with Collector(port=open_port(free_port)) as collector:
            report = as_json(kaibantrace_command("flush", "--json", KAIBAN_TELEMETRY_ENDPOINT=url))
            assert report == {"ok": True, "sent": 12, "left": 0}
            assert [s["type"] for s in collector.wait_for(12)] == ["left_behind"] * 12
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 0

    def test_flush_that_cannot_send_fails_in_one_line(self, refused_url: str) -> None:
        leave_signals(refused_url, 2)
        done = kaibantrace_command("flush", "--timeout", "20", KAIBAN_TELEMETRY_ENDPOINT=refused_url)
        assert done.returncode == 1
        assert done.stderr.startswith("kaibantrace: 2 signal(s) could not be sent")
        assert len(done.stderr.strip().splitlines()) == 1
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 2


    def test_flush_after_410_says_the_endpoint_is_retired(self, free_port: int) -> None:
        url = f"http://127.0.0.1:{free_port}/v2/"
        leave_signals(url, 3)
        with Collector(port=open_port(free_port)) as collector:
            collector.respond(410)
            done = kaibantrace_command("flush", KAIBAN_TELEMETRY_ENDPOINT=url)
        assert done.returncode == 1 and "410 Gone" in done.stderr and "retired" in done.stderr
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 0  # dropped, as promised

    def test_flush_in_debug_mode_says_nothing_is_sent(self, refused_url: str) -> None:
        leave_signals(refused_url, 1)
        done = kaibantrace_command("flush", KAIBAN_TELEMETRY_ENDPOINT=refused_url,
                                   KAIBAN_TELEMETRY_DEBUG="1")
        assert done.returncode == 1 and "debug mode" in done.stderr
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 1

    def test_log_survives_a_damaged_file(self, collector: Collector) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID, endpoint=collector.url, flush_interval=0.01)
        try:
            client.emit("kept")
            assert client.flush(10)
        finally:
            client.shutdown()
        from kaibantrace._delivery import sentlog as _sentlog

        with open(_sentlog.log_path(), "ab") as handle:
            handle.write(b"\xff\xfe not json \x80\n")
        records = as_json(kaibantrace_command("log", "--json"))
        assert [json.loads(r["body"])[0]["type"] for r in records] == ["kept"]


class TestUsage:
    @pytest.mark.parametrize("args", [["bogus"], [], ["log", "--limit", "many"],
                                      ["log", "--limit", "-1"], ["status", "--app", "not-a-uuid"],
                                      ["log", "--app", "nope"]])
    def test_usage_errors(self, args: list[str]) -> None:
        done = kaibantrace_command(*args)
        assert done.returncode == 2 and "usage:" in done.stderr and "Traceback" not in done.stderr

    def test_options_before_the_command(self) -> None:
        report = as_json(kaibantrace_command("--json", "--app", APP_ID, "status"))
        assert report["app_id"] == APP_ID and report["enabled"] is True

    def test_an_unexpected_error_is_one_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        class Broken(kaibantrace.Telemetry):
            def decision(self) -> kaibantrace.Decision:
                raise RuntimeError("disk on fire")

        assert kaibantrace.command_line(["status"], client=Broken(app_id=APP_ID)) == 1
        err = capsys.readouterr().err
        assert err.startswith("kaibantrace: unexpected error") and "disk on fire" in err
        assert len(err.strip().splitlines()) == 1

    def test_help(self) -> None:
        done = kaibantrace_command("--help")
        assert done.returncode == 0
        for name in ("status", "enable", "disable", "reset", "log", "project-id", "flush"):
            assert name in done.stdout

    def test_mounted_in_an_authors_cli(self, capsys: pytest.CaptureFixture[str]) -> None:
        """command_line() reports on the author's own client."""
        client = kaibantrace.Telemetry(app_id=APP_ID, opt_out_env="MYTOOL_NO_TELEMETRY")
        os.environ["MYTOOL_NO_TELEMETRY"] = "1"
        try:
            code = kaibantrace.command_line(["status", "--json"], client=client,
                                            prog="mytool telemetry")
        finally:
            del os.environ["MYTOOL_NO_TELEMETRY"]
        report: Dict[str, Any] = json.loads(capsys.readouterr().out)
        assert code == 0 and report["decided_by"] == "MYTOOL_NO_TELEMETRY"

    def test_mounted_messages_name_the_authors_command(
            self, capsys: pytest.CaptureFixture[str]) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)
        assert kaibantrace.command_line(["disable"], client=client, prog="mytool telemetry") == 0
        assert "`mytool telemetry enable`" in capsys.readouterr().out
        assert kaibantrace.command_line(["status"], client=client, prog="mytool telemetry") == 0
        assert "`mytool telemetry disable`" in capsys.readouterr().out


class TestTransparencyLogFormat:
    def test_each_request_is_a_line_of_facts_then_the_body_as_sent(
            self, collector: Collector) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID, endpoint=collector.url, flush_interval=0.01)
        try:
            client.emit("seen", {"text": 'quotes " and \\\\ and ünïcode'})
            assert client.flush(10)
        finally:
            client.shutdown()
        from kaibantrace._delivery import sentlog as _sentlog

        facts, body, end = Path(_sentlog.log_path()).read_bytes().split(b"\n")
        assert body == collector.requests[0].body and end == b""
        assert json.loads(facts)["body_bytes"] == len(body)

    def test_records_of_the_one_line_form_are_still_read(self) -> None:
        from kaibantrace._delivery import sentlog as _sentlog

        path = Path(_sentlog.log_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"sent_at": "2026-01-01T00:00:00.000Z", "app_id": APP_ID,
                                    "url": "u", "signals": 1, "body": "[{}]"}) + "\n")
        assert [r["body"] for r in as_json(kaibantrace_command("log", "--json"))] == ["[{}]"]

    def test_bounded_by_rotating_before_a_write_would_pass_the_limit(self) -> None:
        """Each file stays within 256 KiB; the newest records are read across both files."""
        from kaibantrace._delivery import sentlog as _sentlog

        body = b'[{"type":"' + b"x" * 3000 + b'"}]'
        for i in range(300):  # about 900 KB in all: rotates several times
            _sentlog.append(APP_ID, f"https://ingest.example/{i}", [(body, 1)])
        path = Path(_sentlog.log_path())
        sizes = [path.stat().st_size, Path(str(path) + ".1").stat().st_size]
        assert all(0 < size <= _sentlog.MAX_BYTES for size in sizes)
        assert sum(sizes) > _sentlog.MAX_BYTES  # the older file kept its records
        urls = [r["url"] for r in _sentlog.read()]
        assert urls == sorted(urls, key=lambda u: int(u.rsplit("/", 1)[1]))  # oldest first
        assert urls[-1].endswith("/299") and stat.S_IMODE(path.stat().st_mode) == 0o600
