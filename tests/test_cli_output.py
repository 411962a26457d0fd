"""What the ``kaibantrace`` command writes: nothing a terminal would act on, and no traceback
when the reader of its output goes away."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import List

import pytest

import kaibantrace
from kaibantrace._cli.command import OUTPUT_GONE, printable
from kaibantrace._delivery import sentlog as _sentlog
from kaibantrace.testing import Collector

from .conftest import APP_ID, subprocess_env
from .test_command_line import as_json, kaibantrace_command

# Characters a terminal obeys or that make a line read other than it is: ESC and BEL (C0),
# DEL, CSI and NEL (C1), bidi overrides and isolates, zero-width and BOM (format), the
# line and paragraph separators, a private-use and an unassigned one, and a tag (above the BMP).
HOSTILE = ("\x1b", "\x07", "\x7f", "\x9b", "\x85", "\u202a", "\u202e", "\u2066", "\u2069",
           "\u200b", "\u200f", "\ufeff", "\u2028", "\u2029", "\ue000", "\U0010fffd", "\U000e0001")
TEXT = "red \x1b[31m and " + " ".join(HOSTILE) + " end"


def escape_of(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def assert_clean(output: str, expected: List[str]) -> None:
    """No hostile character in ``output``; each of ``expected`` there as its escape."""
    raw = [hex(ord(char)) for char in HOSTILE if char in output]
    assert raw == [], f"raw in the output: {raw}"
    for char in expected:
        assert escape_of(char) in output, hex(ord(char))


def send_hostile_payload(collector: Collector) -> bytes:
    """Send one event with ``TEXT`` through the real client; the body the collector received."""
    client = kaibantrace.Telemetry(app_id=APP_ID, endpoint=collector.url, flush_interval=0.01)
    try:
        client.emit("typed", {"text": TEXT})
        assert client.flush(10)
    finally:
        client.shutdown()
    body: bytes = collector.requests[0].body
    assert any(char.encode("utf-8") in body for char in HOSTILE)  # the body does carry some raw
    return body


class TestEscaping:
    def test_the_categories_escaped(self) -> None:
        for char in HOSTILE:
            assert printable(f"a{char}b") == f"a{escape_of(char)}b"
        assert printable("plain ünïcode, 日本, a\u00a0space, é") == "plain ünïcode, 日本, a\u00a0space, é"
        assert printable("\ud800") == "\\ud800"  # a lone surrogate, which json.loads can give
        every = "".join(map(chr, range(0x110000)))
        shown = printable(every)
        left = {unicodedata.category(c) for c in shown if not c.isprintable() and c != " "}
        assert left <= {"Zs"}, left  # only spaces of other widths are left as they are

    def test_log_shows_the_payload_escaped(self, collector: Collector) -> None:
        body = send_hostile_payload(collector)
        done = kaibantrace_command("log")
        assert done.returncode == 0 and done.stderr == ""
        # The ESC and BEL are JSON-escaped in the body already; the others arrive raw.
        assert_clean(done.stdout, [c for c in HOSTILE if c not in "\x1b\x07"])
        facts, shown, end = done.stdout.split("\n")
        assert end == "" and APP_ID in facts
        # The escapes are JSON's: the line shown still decodes to what was sent, once the
        # characters above the BMP, written as Python writes them, are put back.
        for char in HOSTILE:
            if ord(char) > 0xFFFF:
                shown = shown.replace(escape_of(char), char)
        assert json.loads(shown) == json.loads(body)

    def test_log_json_is_escaped_and_exact(self, collector: Collector) -> None:
        body = send_hostile_payload(collector)
        done = kaibantrace_command("log", "--json")
        assert_clean(done.stdout, [])
        assert [r["body"].encode("utf-8") for r in as_json(done)] == [body]

    def test_facts_written_by_someone_else_are_escaped_too(self) -> None:
        """The facts line of the log is a file too: its URL and app ID are escaped, and a
        line separator in them cannot make a record look like two."""
        url = "https://ingest.example/\x1b]0;owned\x07/\u2028/\x9b2J"
        _sentlog.append("app\u202eid", url, [(b'[{"type":"x"}]', 1)])
        done = kaibantrace_command("log")
        assert_clean(done.stdout, ["\x1b", "\x07", "\u2028", "\x9b", "\u202e"])
        assert len(done.stdout.splitlines()) == 2
        report = as_json(kaibantrace_command("log", "--json"))
        assert report[0]["url"] == url  # JSON keeps the exact value, escaped

    def test_status_escapes_values_read_from_files_and_the_environment(
            self, tmp_path: Path) -> None:
        """``last sent`` comes from the log file, the directories from variables."""
        path = Path(_sentlog.log_path())
        record = {"sent_at": "2026\x1b[2J\u202e", "app_id": APP_ID, "url": "u", "signals": 1,
                  "body": "[]"}
        path.write_text(json.dumps(record) + "\n")
        path.chmod(0o600)
        config = tmp_path / "config\x9b\u2066"
        done = kaibantrace_command("status", KAIBAN_TELEMETRY_APP_ID=APP_ID,
                                   KAIBAN_TELEMETRY_CONFIG_DIR=str(config))
        assert done.returncode == 0 and done.stderr == ""
        assert_clean(done.stdout, ["\x1b", "\u202e", "\x9b", "\u2066"])
        assert as_json(kaibantrace_command("status", "--json", KAIBAN_TELEMETRY_APP_ID=APP_ID,
                                           KAIBAN_TELEMETRY_CONFIG_DIR=str(config))
                       )["last_sent"] == record["sent_at"]

    def test_a_failure_reason_is_escaped(self, tmp_path: Path) -> None:
        blocker = tmp_path / "a-file\x1b[8m\u202e"
        blocker.write_text("")
        done = kaibantrace_command("disable", KAIBAN_TELEMETRY_CONFIG_DIR=str(blocker / "sub"))
        assert done.returncode == 1 and done.stderr.startswith("kaibantrace: could not save")
        assert_clean(done.stderr, ["\x1b", "\u202e"])
        assert len(done.stderr.splitlines()) == 1
        assert os.path.exists(blocker)


def run_into_closed_pipe(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the command with stdout a pipe whose only reader is already gone: its first
    write meets a broken pipe, every time."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([sys.executable, "-m", "kaibantrace", *args], stdout=writer,
                              stderr=subprocess.PIPE, env=subprocess_env(**env), text=True,
                              timeout=60)
    finally:
        os.close(writer)


def start_long_log() -> subprocess.Popen[bytes]:
    """``kaibantrace log`` started with about 450 KB to write, far more than a pipe holds:
    a reader that leaves after the first line leaves it writing into a broken pipe."""
    body = b'[{"type":"' + b"x" * 3000 + b'"}]'
    for i in range(150):
        _sentlog.append(APP_ID, f"https://ingest.example/{i}", [(body, 1)])
    return subprocess.Popen([sys.executable, "-m", "kaibantrace", "log", "--limit", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())


class TestReaderGoneAway:
    def test_status_json_ends_quietly(self) -> None:
        done = run_into_closed_pipe("status", "--json")
        assert (done.returncode, done.stderr) == (OUTPUT_GONE, "")

    def test_a_failure_still_says_why_on_stderr(self) -> None:
        """A command that failed says so (status 1, the reason on stderr) even when its
        JSON report has no reader."""
        done = run_into_closed_pipe("flush", "--json", KAIBAN_TELEMETRY_OPT_OUT="1")
        assert done.returncode == 1
        assert done.stderr == "kaibantrace: telemetry is off (the KAIBAN_TELEMETRY_OPT_OUT " \
            "environment variable); nothing is sent\n"

    def test_log_whose_reader_leaves_after_one_line(self) -> None:
        """Like ``kaibantrace log | head -1``: the reader takes the first line and leaves while
        the command still has far more to write than a pipe holds."""
        child = start_long_log()
        assert child.stdout is not None and child.stderr is not None
        first = child.stdout.readline()
        child.stdout.close()
        error = child.stderr.read()
        child.stderr.close()
        assert child.wait(60) == OUTPUT_GONE and error == b""
        assert first.startswith(b"20") and b"signal(s) for app" in first

    def test_through_head(self) -> None:
        """The case reported, with a real ``head -1`` reading the output of ``log``."""
        if shutil.which("head") is None:
            pytest.skip("no head(1) here")
        child = start_long_log()
        assert child.stdout is not None
        head = subprocess.run(["head", "-1"], stdin=child.stdout, capture_output=True, timeout=60)
        child.stdout.close()
        _, error = child.communicate(timeout=60)
        assert head.stdout.count(b"\n") == 1 and error == b""
        assert child.returncode == OUTPUT_GONE

    def test_mounted_command_line_returns_instead_of_raising(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An author's CLI calling command_line() gets a status, not a BrokenPipeError; only
        then is its stdout, whose reader is gone, pointed at the null device."""
        reader, writer = os.pipe()
        os.close(reader)
        with os.fdopen(writer, "w") as broken:
            monkeypatch.setattr(sys, "stdout", broken)
            assert kaibantrace.command_line(["status", "--json"]) == OUTPUT_GONE
            broken.write("later output of the author's program\n")
            broken.flush()  # goes to the null device: no second error
            assert os.path.samestat(os.fstat(broken.fileno()), os.stat(os.devnull))

    def test_stdout_that_still_works_is_left_alone(self, capsys: pytest.CaptureFixture[str]) -> None:
        reader, writer = os.pipe()
        try:
            with os.fdopen(os.dup(writer), "w") as healthy, pytest.MonkeyPatch.context() as patch:
                patch.setattr(sys, "stdout", healthy)
                assert kaibantrace.command_line(["status", "--json"]) == 0
                assert not os.path.samestat(os.fstat(healthy.fileno()), os.stat(os.devnull))
            os.close(writer)
            with os.fdopen(reader, "rb") as output:
                assert json.loads(output.read())["enabled"] is True
        finally:
            for fd in (reader, writer):
                try:
                    os.close(fd)
                except OSError:
                    pass
