"""Files read on the host's thread never block it, whatever is put under their names.

A FIFO named ``preferences.json`` used to block every decision (so every ``emit()``)
until a writer came; a link to ``/dev/zero`` was read without end. The hostile files
here are real (``os.mkfifo``, ``os.symlink``), and each call that could hang runs in a
child process with a memory cap, killed when it passes a generous bound: a regression
fails the test instead of hanging the suite or filling the machine's memory.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from kaibantrace._policy import prefs as _prefs
from kaibantrace._policy import state as _state

from .conftest import APP_ID, subprocess_env

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and symlinks (POSIX)")

BOUND = 30.0  # seconds; the calls take milliseconds when nothing blocks

_PROBE = textwrap.dedent("""
    import json, sys, kaibantrace
    from kaibantrace._policy import prefs as _prefs
    kaibantrace.configure(app_id=sys.argv[1], endpoint=sys.argv[2])
    decision = kaibantrace.default_client().decision()
    report = {"enabled": decision.enabled, "decided_by": decision.decided_by,
              "secret": _prefs.existing_secret() is not None,
              "notice_shown": _prefs.notice_shown(sys.argv[1])}
    kaibantrace.emit("probe")
    print(json.dumps(report))
""")


def _cap_memory() -> None:
    """In the child: at most 2 GiB of address space, so reading ``/dev/zero`` ends in a
    MemoryError rather than in the machine's swap."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def run_bounded(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a child Python; the test fails (the child is killed) if it takes over ``BOUND``."""
    try:
        return subprocess.run([sys.executable, *args], env=subprocess_env(), capture_output=True,
                              text=True, timeout=BOUND, preexec_fn=_cap_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args[:3]} did not end within {BOUND:g} s: a read blocked")


def probe(url: str) -> Dict[str, Any]:
    done = run_bounded(["-c", _PROBE, APP_ID, url])
    assert done.returncode == 0, done.stderr
    report: Dict[str, Any] = json.loads(done.stdout)
    return report


def plant(path: Path, kind: str) -> None:
    """Put a FIFO, or a link to an endless device, where kaibantrace expects a small file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


def config_file(name: str) -> Path:
    return Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]) / name


def state_file(name: str) -> Path:
    return Path(os.environ["KAIBAN_TELEMETRY_DIR"]) / name


def within_bound(call: Callable[[], Any]) -> Any:
    """``call()``'s result, from a thread given ``BOUND`` seconds (for reads that could only
    block, never consume memory: a regression then fails rather than hangs)."""
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(call()), daemon=True)
    worker.start()
    worker.join(BOUND)
    assert not worker.is_alive(), "the call blocked"
    return results[0]


KINDS = ["fifo", "link to /dev/zero"]


class TestNothingBlocksTheHost:
    @pytest.mark.parametrize("kind", KINDS)
    def test_preferences_keep_telemetry_off(self, kind: str, refused_url: str) -> None:
        """A preferences file that cannot be read is not a choice to turn telemetry on:
        the decision is 'off, by the saved preference', at once."""
        plant(config_file("preferences.json"), kind)
        report = probe(refused_url)
        assert (report["enabled"], report["decided_by"]) == (False, "saved preference")

    @pytest.mark.parametrize("kind", KINDS)
    def test_retired_list_retires_nothing(self, kind: str, refused_url: str) -> None:
        plant(state_file("retired.json"), kind)
        report = probe(refused_url)
        assert (report["enabled"], report["decided_by"]) == (True, "default")

    @pytest.mark.parametrize("kind", KINDS)
    def test_secret_is_not_read_from_it(self, kind: str, refused_url: str) -> None:
        plant(config_file("secret"), kind)
        assert probe(refused_url)["secret"] is False

    @pytest.mark.parametrize("kind", KINDS)
    def test_a_notice_marker_that_is_no_file_does_not_silence_the_notice(
            self, kind: str, refused_url: str) -> None:
        plant(Path(_prefs.notice_path(APP_ID)), kind)
        assert probe(refused_url)["notice_shown"] is False
        assert not _prefs.notice_shown(APP_ID)

    def test_an_install_marker_that_is_no_file_is_not_an_install(self) -> None:
        plant(Path(_prefs.install_path(APP_ID, "project")), "fifo")
        assert not _prefs.install_recorded(APP_ID, "project")
        assert _prefs.mark_install(APP_ID, "project")  # replaces it with a real marker
        assert _prefs.install_recorded(APP_ID, "project")

    @pytest.mark.parametrize("kind", KINDS)
    def test_status_and_log_skip_a_sent_log_that_is_no_file(self, kind: str) -> None:
        plant(state_file("sent.log"), kind)
        for command in (["status", "--json"], ["log", "--json"]):
            done = run_bounded(["-m", "kaibantrace", *command])
            assert done.returncode == 0 and done.stderr == ""
        assert json.loads(done.stdout) == []

    def test_enable_replaces_what_was_planted(self) -> None:
        plant(config_file("preferences.json"), "fifo")
        done = run_bounded(["-m", "kaibantrace", "enable", "--json"])
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["enabled"] is True
        assert stat.S_ISREG(config_file("preferences.json").lstat().st_mode)
        assert _prefs.saved_choice() == _prefs.ENABLED

    def test_in_process_decisions_return_too(self) -> None:
        """The same through this process's own cache, which must not remember a block."""
        plant(config_file("preferences.json"), "fifo")
        assert within_bound(_prefs.saved_choice) == _prefs.DISABLED
        assert within_bound(_prefs.saved_choice) == _prefs.DISABLED  # from the cache
        os.unlink(config_file("preferences.json"))
        assert _prefs.saved_choice() is None
        _prefs.save_choice(_prefs.ENABLED)
        assert _prefs.saved_choice() == _prefs.ENABLED


class TestWhatIsRefused:
    def write_preferences(self, text: str) -> Path:
        path = config_file("preferences.json")
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        return path

    def test_a_file_larger_than_the_cap_is_refused_and_said_once(
            self, caplog: pytest.LogCaptureFixture) -> None:
        padding = "x" * _state.READ_LIMIT
        self.write_preferences(json.dumps({"telemetry": "enabled", "padding": padding}))
        with caplog.at_level(logging.WARNING, logger="kaibantrace"):
            assert _prefs.saved_choice() == _prefs.DISABLED
            assert _prefs.saved_choice() == _prefs.DISABLED
        said = [r.getMessage() for r in caplog.records if "preferences.json" in r.getMessage()]
        assert len(said) == 1 and "larger than" in said[0]

    def test_a_file_of_exactly_the_cap_is_read(self) -> None:
        text = json.dumps({"telemetry": "enabled", "padding": ""})
        path = self.write_preferences(text[:-2] + "x" * (_state.READ_LIMIT - len(text)) + '"}')
        assert path.stat().st_size == _state.READ_LIMIT
        assert _prefs.saved_choice() == _prefs.ENABLED

    @pytest.mark.parametrize("text", ["{not json", '{"telemetry": "maybe"}', "[]", "\udcff"])
    def test_a_file_that_says_no_choice_keeps_telemetry_off(self, text: str) -> None:
        self.write_preferences(text)
        assert _prefs.saved_choice() == _prefs.DISABLED

    def test_no_file_is_no_choice(self) -> None:
        assert _prefs.saved_choice() is None

    def test_a_link_to_a_valid_file_is_refused(self, tmp_path: Path) -> None:
        elsewhere = tmp_path / "elsewhere.json"
        elsewhere.write_text(json.dumps({"telemetry": "enabled"}))
        config_file("preferences.json").symlink_to(elsewhere)
        assert _prefs.saved_choice() == _prefs.DISABLED
        with pytest.raises(OSError):
            _state.read_private_file(str(config_file("preferences.json")))

    @pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                        reason="only root can give a file to another user")
    def test_files_of_another_user_are_refused(self) -> None:
        """Run as root, the suite can make them: nobody's (65534) preferences saying
        'enabled' and retired list are refused like a FIFO."""
        url = "https://ingest.example.test/v2/"
        _prefs.mark_retired(APP_ID, url)
        assert _prefs.is_retired(APP_ID, url)
        path = self.write_preferences(json.dumps({"telemetry": "enabled"}))
        for owned in (path, Path(_prefs.retired_path())):
            os.chown(owned, 65534, 65534)
        assert _prefs.saved_choice() == _prefs.DISABLED
        assert not _prefs.is_retired(APP_ID, url)
        secret = config_file("secret")
        secret.write_text(os.urandom(32).hex())
        os.chown(secret, 65534, 65534)
        _prefs.forget_in_memory()
        assert _prefs.existing_secret() is None
