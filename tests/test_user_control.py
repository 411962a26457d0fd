"""The user's control: precedence of opt-out sources, the first-run notice, the install event,
CLI frameworks, profiles, default parameters and the kill switch."""

from __future__ import annotations

import itertools
import json
import os
import pty
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

import kaibantrace
from kaibantrace._policy import prefs as _prefs
from kaibantrace._policy.config import Settings, decide
from kaibantrace.testing import Collector

from .conftest import APP_ID, rows_in_outbox, subprocess_env

MakeClient = Callable[..., kaibantrace.Telemetry]

# -- precedence ----------------------------------------------------------------------

# Every opt-out source, strongest first, and how to switch it on.
SOURCES: List[str] = ["code", "KAIBAN_TELEMETRY_OPT_OUT", "DO_NOT_TRACK", "saved preference",
                      "retired endpoint"]
URL = "https://ingest.example.test/v2/"


def _switch_on(source: str, settings: Dict[str, Any], environ: Dict[str, str]) -> None:
    if source == "code":
        settings["opt_out"] = True
    elif source == "saved preference":
        _prefs.save_choice(_prefs.DISABLED)
    elif source == "retired endpoint":
        _prefs.mark_retired(APP_ID, URL)
    else:
        environ[source] = "1"


class TestPrecedence:
    @pytest.mark.parametrize(("first", "second"), list(itertools.combinations(SOURCES, 2)))
    def test_every_pair(self, first: str, second: str) -> None:
        """With two opt-out sources on, the stronger one is named; each alone decides too."""
        for sources, expected in (((first, second), first), ((second,), second)):
            _prefs.reset()
            retired = Path(_prefs.retired_path())
            if retired.exists():
                retired.unlink()
            _prefs.forget_in_memory()
            settings: Dict[str, Any] = {"app_id": APP_ID, "endpoint": URL}
            environ: Dict[str, str] = {}
            for source in sources:
                _switch_on(source, settings, environ)
            decision = decide(Settings().replace(**settings), environ)
            assert (decision.enabled, decision.decided_by) == (False, expected)

    def test_saved_enable_never_beats_an_opt_out(self) -> None:
        _prefs.save_choice(_prefs.ENABLED)
        decision = decide(Settings(app_id=APP_ID), {"DO_NOT_TRACK": "1"})
        assert (decision.enabled, decision.decided_by) == (False, "DO_NOT_TRACK")
        assert decide(Settings(app_id=APP_ID), {}).enabled

    def test_saved_choice_reaches_a_running_client(self, make_client: MakeClient,
                                                   collector: Collector) -> None:
        """A client already sending stops once another process saves disable."""
        client = make_client()
        client.emit("before")
        assert client.flush(5)
        _prefs.save_choice(_prefs.DISABLED)
        client.emit("after")
        assert client.flush(5) is False
        assert [s["type"] for s in collector.signals] == ["before"]


# -- a CLI run in a child, on a terminal or not ------------------------------------------

_CLI = textwrap.dedent("""
    import argparse, os, sys, kaibantrace

    def build():
        parser = argparse.ArgumentParser(prog="boardtool")
        commands = parser.add_subparsers(dest="command", required=True)
        run = commands.add_parser("run")
        run.add_argument("--name")
        commands.add_parser("init")
        if os.environ.get("MOUNTED"):  # the tool offers kaibantrace's commands as its own
            kaibantrace.telemetry_commands(commands.add_parser("telemetry"))
        return parser

    @kaibantrace.track_cli("cli_used", parser=build)
    def main(argv=None):
        build().parse_args(argv)
        return 0

    kaibantrace.configure(app_id=os.environ["APP"], endpoint=os.environ["URL"],
                          tool_name=os.environ.get("TOOL_NAME"))
    main(sys.argv[1:])
    if os.environ.get("FORK"):  # a child of this run emits and flushes too
        pid = os.fork()
        if pid == 0:
            kaibantrace.emit("from_child")
            kaibantrace.flush(10)
            os._exit(0)
        os.waitpid(pid, 0)
    if os.environ.get("FLUSH"):
        print("flushed", kaibantrace.flush(10), flush=True)
""")


def run_cli(url: str, *args: str, terminal: bool = False, cwd: Optional[Path] = None,
            **env: str) -> str:
    """Run the CLI child; its stderr goes to a pseudo-terminal when ``terminal``. Returns stderr."""
    environ = subprocess_env(APP=APP_ID, URL=url, **env)
    if not terminal:
        done = subprocess.run([sys.executable, "-c", _CLI, *args], env=environ, cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stderr
    controller, attached = pty.openpty()
    try:
        child = subprocess.Popen([sys.executable, "-c", _CLI, *args], env=environ, cwd=cwd,
                                 stdout=subprocess.DEVNULL, stderr=attached)
        os.close(attached)
        chunks = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert child.wait(60) == 0
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(controller)


class TestFirstRunNotice:
    def test_shown_once_on_a_terminal_and_that_run_sends_nothing(self, collector: Collector,
                                                                 tmp_path: Path) -> None:
        said = run_cli(collector.url, "run", terminal=True, cwd=tmp_path, FLUSH="1")
        assert " ".join(said.split()) == (
            "This program collects anonymous usage data: which commands run, never their "
            "arguments, file contents, paths or anything that identifies you. Nothing was sent "
            "this time. Turn it off with KAIBAN_TELEMETRY_OPT_OUT=1 (or DO_NOT_TRACK=1), or for "
            "every tool that uses kaibantrace with `kaibantrace disable`. `kaibantrace log` "
            "shows what was sent.")
        assert max(len(line) for line in said.splitlines()) <= 79
        assert collector.requests == []  # even though the run flushed
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 2  # install + cli_used
        assert (Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]) / f"notice-{APP_ID.lower()}").exists()

        again = run_cli(collector.url, "init", terminal=True, cwd=tmp_path, FLUSH="1")
        assert "collects anonymous usage data" not in again
        types = sorted(s["type"] for s in collector.wait_for(3))
        assert types == ["cli_used", "cli_used", "install"]

    def test_opting_out_after_the_notice_means_nothing_is_ever_sent(
            self, collector: Collector, tmp_path: Path) -> None:
        said = run_cli(collector.url, "run", terminal=True, cwd=tmp_path, FLUSH="1")
        assert "collects anonymous usage data" in said
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 2
        run_cli(collector.url, "run", cwd=tmp_path, KAIBAN_TELEMETRY_OPT_OUT="1")
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 0
        assert collector.requests == []

    def test_a_child_forked_on_the_notice_run_sends_nothing_either(
            self, collector: Collector, tmp_path: Path) -> None:
        """Where no variable names the user, the writer's first privacy check looks the user
        up in the password database; a fork during that look-up once lost the child's event
        (``TestForkWhileTheWriterHoldsALock`` makes that moment certain)."""
        said = run_cli(collector.url, "run", terminal=True, cwd=tmp_path, FLUSH="1", FORK="1")
        assert "collects anonymous usage data" in said
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 3  # the child's event too
        assert collector.requests == []

    def test_unwritable_config_directory_means_no_notice_and_nothing_sent(
            self, collector: Collector, tmp_path: Path) -> None:
        """The notice cannot be marked seen, so it is not shown (it would show on every run),
        and the run holds: nothing leaves unannounced. No install event either."""
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        said = run_cli(collector.url, "run", terminal=True, cwd=tmp_path, FLUSH="1",
                       KAIBAN_TELEMETRY_CONFIG_DIR=str(blocker / "config"))
        assert "collects anonymous usage data" not in said and "Traceback" not in said
        assert collector.requests == []
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 1  # cli_used, no install

    def test_names_the_tool_and_its_own_telemetry_commands(self, collector: Collector,
                                                           tmp_path: Path) -> None:
        """A tool that gave its name and mounted kaibantrace's commands sends its users to
        those, not to a ``kaibantrace`` command they may never have heard of."""
        said = run_cli(collector.url, "run", terminal=True, cwd=tmp_path, TOOL_NAME="boardtool",
                       MOUNTED="1")
        flat = " ".join(said.split())
        assert flat.startswith("boardtool collects anonymous usage data: ")
        assert flat.endswith("Turn it off with KAIBAN_TELEMETRY_OPT_OUT=1 (or DO_NOT_TRACK=1), "
                             "or with `boardtool telemetry disable`. `boardtool telemetry log` "
                             "shows what was sent.")

    def test_a_tool_name_without_mounted_commands_points_to_kaibantrace(
            self, collector: Collector, tmp_path: Path) -> None:
        said = run_cli(collector.url, "run", terminal=True, cwd=tmp_path, TOOL_NAME="boardtool")
        flat = " ".join(said.split())
        assert flat.startswith("boardtool collects anonymous usage data: ")
        assert "with `kaibantrace disable`. `kaibantrace log` shows what was sent." in flat

    def test_finds_the_mounted_commands_in_click_typer_and_argparse(self) -> None:
        import argparse

        import click
        import typer

        from kaibantrace._client.commands import mounted_at

        @click.group()
        def cli() -> None: ...

        @cli.group()
        def admin() -> None: ...

        @admin.command()
        @kaibantrace.telemetry_commands
        def telemetry() -> None: ...

        app = typer.Typer()

        @app.command()
        def run() -> None: ...

        @app.command("telemetry")
        @kaibantrace.telemetry_commands
        def telemetry_app() -> None: ...

        parser = argparse.ArgumentParser()
        commands = parser.add_subparsers()
        commands.add_parser("run")
        kaibantrace.telemetry_commands(commands.add_parser("privacy"))
        assert mounted_at(cli, None) == "admin telemetry"
        assert mounted_at(app, None) == "telemetry"
        assert mounted_at(None, parser) == "privacy"
        assert mounted_at(None, lambda: parser) == "privacy"
        assert mounted_at(admin.commands["telemetry"], None) is None  # nothing below it
        assert mounted_at(object(), None) is None

    @pytest.mark.parametrize("bad", ["", "my tool", "tool\n", "x" * 65, 7])
    def test_a_tool_name_that_is_no_command_is_refused(self, bad: object) -> None:
        with pytest.raises(kaibantrace.ConfigurationError, match="tool_name"):
            kaibantrace.Telemetry(tool_name=bad)  # type: ignore[arg-type]

    @pytest.mark.parametrize(("argv0", "expected"), [
        ("/usr/local/bin/boardtool", "boardtool"),
        ("/site-packages/boardtool/__main__.py", "boardtool"),  # python -m boardtool
        ("-c", None),  # python -c: no name the user would recognise
        ("", None)])
    def test_names_the_program_the_user_ran(self, monkeypatch: pytest.MonkeyPatch,
                                            argv0: str, expected: Optional[str]) -> None:
        from kaibantrace._client.firstrun import _program_name

        monkeypatch.setattr(sys, "argv", [argv0])
        assert _program_name() == expected

    def test_never_when_piped(self, collector: Collector, tmp_path: Path) -> None:
        said = run_cli(collector.url, "run", cwd=tmp_path, FLUSH="1")
        assert said == ""
        assert len(collector.wait_for(2)) == 2  # sent at once: no notice was shown
        assert not list(Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]).glob("notice-*"))

    def test_never_in_ci_and_no_identity_files(self, collector: Collector, tmp_path: Path) -> None:
        said = run_cli(collector.url, "run", terminal=True, cwd=tmp_path, FLUSH="1",
                       GITHUB_ACTIONS="true")
        assert "collects anonymous usage data" not in said
        assert [s["type"] for s in collector.wait_for(1)] == ["cli_used"]  # no install event
        assert list(Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]).iterdir()) == []


# A program that forks while kaibantrace's writer is in the middle of something that holds
# a lock: the child inherits the lock, held by a thread it does not have, and its own writer
# waits for it for ever, so the child's events never reach the outbox. Each head below makes
# such a moment last a second on a worker thread and tells the main thread, which forks
# then; the fork guard must make the fork wait for it instead.
_FORK_THEN_EMIT = """
kaibantrace.configure(app_id=os.environ["APP"], endpoint=os.environ["URL"],
                      default_parameters=True)
kaibantrace.emit("from_parent")
assert entered.wait(30), "no thread of kaibantrace got there"
pid = os.fork()
if pid == 0:
    parked = threading.Event()
    for _ in range(4):
        threading.Thread(target=parked.wait, daemon=True).start()
    kaibantrace.emit("from_child")
    print("child", kaibantrace.flush(3), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", kaibantrace.flush(10), flush=True)
"""
# Importing MODULE: the module's import lock is held. The loader holds it (in
# ``exec_module``: a finder would hold the interpreter's own import lock, which a fork waits
# for). Threads parked in the child take the stacks the parent's threads left, so that no
# new thread there has the ident of the one that held the lock (which would let it in).
_SLOW_IMPORT = textwrap.dedent("""
    import os, sys, threading, time

    entered = threading.Event()

    class SlowLoader:
        def __init__(self, loader):
            self.loader = loader

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module):
            entered.set()
            time.sleep(1.0)
            self.loader.exec_module(module)

    class SlowImport:
        def find_spec(self, name, path=None, target=None):
            if name != os.environ["MODULE"] or threading.current_thread() is threading.main_thread():
                return None
            for finder in sys.meta_path:
                spec = None if finder is self else finder.find_spec(name, path, target)
                if spec is not None:
                    spec.loader = SlowLoader(spec.loader)
                    return spec
            return None

    sys.meta_path.insert(0, SlowImport())
    # Some installs import the module at start-up already (an editable install's path hook
    # on Python 3.13 imports pwd): forgotten here, so that kaibantrace's thread imports it.
    sys.modules.pop(os.environ["MODULE"], None)
    import kaibantrace
""")
# Looking the user up in the password database, which the privacy guard does where no
# variable names the user: the C library holds a lock of its own meanwhile, which this one
# stands for. (A fork there is how the test of the notice run's forked child lost its event.)
_SLOW_LOOKUP = textwrap.dedent("""
    import os, pwd, sys, threading, time

    entered = threading.Event()
    libc_lock = threading.Lock()
    real_getpwuid = pwd.getpwuid

    def getpwuid(uid):
        with libc_lock:
            if threading.current_thread() is not threading.main_thread() and not entered.is_set():
                entered.set()
                time.sleep(1.0)
            return real_getpwuid(uid)

    pwd.getpwuid = getpwuid
    import kaibantrace
""")
_USER_VARIABLES = ("LOGNAME", "USER", "LNAME", "USERNAME")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
class TestForkWhileTheWriterHoldsALock:
    def run(self, collector: Collector, head: str, user: Optional[str], **env: str) -> None:
        environ = subprocess_env(APP=APP_ID, URL=collector.url, **env)
        for name in _USER_VARIABLES:  # none: the privacy guard asks the password database
            environ.pop(name, None)
        if user is not None:
            environ["USER"] = user
        done = subprocess.run([sys.executable, "-c", head + _FORK_THEN_EMIT], env=environ,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["child", "True", "parent", "True"], done.stderr
        assert sorted(s["type"] for s in collector.wait_for(2)) == ["from_child", "from_parent"]

    def test_importing_platform_for_the_default_parameters(self, collector: Collector) -> None:
        self.run(collector, _SLOW_IMPORT, user="kaibantester", MODULE="platform")

    # Both seen in the forked child of the notice run, under load: its writer waiting for
    # the import lock of pwd, or for glibc's lock on its list of name-service modules.
    def test_importing_pwd_for_the_privacy_guard(self, collector: Collector) -> None:
        self.run(collector, _SLOW_IMPORT, user=None, MODULE="pwd")

    def test_looking_the_user_up_for_the_privacy_guard(self, collector: Collector) -> None:
        self.run(collector, _SLOW_LOOKUP, user=None)


class TestInstallEvent:
    def test_none_when_the_marker_cannot_be_written(self, collector: Collector,
                                                    tmp_path: Path) -> None:
        """Otherwise every run of a machine with a read-only config directory is an install."""
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        for _ in range(2):
            run_cli(collector.url, "run", cwd=tmp_path, FLUSH="1",
                    KAIBAN_TELEMETRY_CONFIG_DIR=str(blocker / "config"))
        assert [s["type"] for s in collector.wait_for(2)] == ["cli_used", "cli_used"]

    def test_once_per_project(self, collector: Collector, tmp_path: Path) -> None:
        one, two = tmp_path / "one", tmp_path / "two"
        one.mkdir()
        two.mkdir()
        for project in (one, one, two):
            run_cli(collector.url, "run", cwd=project, FLUSH="1")
        signals = collector.wait_for(5)
        installs = [s for s in signals if s["type"] == "install"]
        assert len(installs) == 2 and len(signals) == 5
        assert installs[0]["clientUser"] != installs[1]["clientUser"]  # two projects
        markers = list((Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]) / "projects").iterdir())
        assert len(markers) == 2
        assert all(kaibantrace.project_id(cwd=str(p)) not in m.name for p in (one, two)
                   for m in markers)


# -- CLI frameworks ------------------------------------------------------------------

_FRAMEWORK_CLIS = {
    "argparse": """
        import argparse, kaibantrace

        def build():
            parser = argparse.ArgumentParser(prog="tool")
            commands = parser.add_subparsers(dest="command", required=True)
            run = commands.add_parser("run")
            run.add_argument("--name")
            db = commands.add_parser("db").add_subparsers(dest="db", required=True)
            db.add_parser("migrate").add_argument("target")
            return parser

        @kaibantrace.track_cli("tool_used", parser=build)
        def main(argv=None):
            build().parse_args(argv)
            return 0

        entry = main
    """,
    "click": """
        import click, kaibantrace

        @kaibantrace.track_cli("tool_used")
        @click.group()
        def cli():
            pass

        @cli.command()
        @click.option("--name")
        def run(name):
            pass

        @cli.group()
        def db():
            pass

        @db.command()
        @click.argument("target")
        def migrate(target):
            pass

        entry = lambda: cli(standalone_mode=False)
    """,
    "typer": """
        import typer, kaibantrace

        app = typer.Typer()
        db = typer.Typer()
        app.add_typer(db, name="db")

        @app.command()
        def run(name: str = ""):
            pass

        @db.command()
        def migrate(target: str):
            pass

        app = kaibantrace.track_cli("tool_used")(app)
        entry = lambda: app(standalone_mode=False)
    """,
}

_FRAMEWORK_MAIN = """
import os, sys, kaibantrace
kaibantrace.configure(app_id=os.environ["APP"], endpoint=os.environ["URL"])
entry()
print("flushed", kaibantrace.flush(10))
"""


class TestFrameworks:
    @pytest.mark.parametrize("framework", ["argparse", "click", "typer"])
    @pytest.mark.parametrize(("argv", "command"), [
        (["run", "--name", "Private Project Name"], "run"),
        (["db", "migrate", "secret-target"], "db migrate"),
    ])
    def test_records_the_sub_command_never_the_arguments(
            self, framework: str, argv: List[str], command: str, collector: Collector,
            tmp_path: Path) -> None:
        if framework != "argparse":
            pytest.importorskip(framework)
        script = textwrap.dedent(_FRAMEWORK_CLIS[framework]) + _FRAMEWORK_MAIN
        done = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path,
                              env=subprocess_env(APP=APP_ID, URL=collector.url),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "flushed True" in done.stdout
        used = [s for s in collector.wait_for(2) if s["type"] == "tool_used"]
        assert [s["payload"] for s in used] == [{"command": command}]
        everything = b"".join(r.body for r in collector.requests)
        assert argv[-1].encode() not in everything


# -- profiles, default parameters, kill switch ---------------------------------------------

class TestKaibanjsProfile:
    def test_wire_output_field_by_field(self, make_client: MakeClient, collector: Collector,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The KaibanJS profile sends exactly KaibanJS's fields: no payload, no defaults."""
        monkeypatch.chdir(str(tmp_path))
        client = make_client(app_id=None, profile="kaibanjs", default_parameters=True)

        @client.track_cli(kaibantrace.events.RUN_BOARD)
        def run(argv: List[str]) -> int:
            return 0

        run(["run"])
        client.emit(kaibantrace.events.WORKFLOW_STARTED)
        assert client.flush(5)
        install, run_board, workflow = collector.wait_for(3)
        assert [s["type"] for s in (install, run_board, workflow)] == [
            "install_kaibanjs", "run_board", "workflow_started"]
        for signal in (install, run_board, workflow):
            assert set(signal) == {"appID", "clientUser", "sessionID", "type",
                                   "telemetryClientVersion", "receivedAt"}
        # KaibanJS's CLI reports to its CLI app, its library to its library app
        assert install["appID"] == run_board["appID"] == kaibantrace.events.CLI_APP_ID
        assert workflow["appID"] == kaibantrace.events.LIBRARY_APP_ID
        assert install["clientUser"] == run_board["clientUser"] != workflow["clientUser"]

    @pytest.mark.parametrize("value", ["false", "0", "no"])
    def test_any_non_empty_opt_out_value_opts_out(self, value: str) -> None:
        environ = {"KAIBAN_TELEMETRY_OPT_OUT": value, "KAIBAN_TELEMETRY_PROFILE": "kaibanjs"}
        assert decide(Settings(), environ).enabled is False
        assert decide(Settings(app_id=APP_ID), {"KAIBAN_TELEMETRY_OPT_OUT": value}).enabled

    def test_bad_profile_in_code_is_refused(self) -> None:
        with pytest.raises(kaibantrace.ConfigurationError, match="profile"):
            kaibantrace.Telemetry(profile="posthog")


class TestDefaultParameters:
    def test_coarse_facts_under_a_prefix(self, make_client: MakeClient,
                                         collector: Collector) -> None:
        client = make_client(default_parameters=True)
        client.emit("e", {"mine": 1})
        assert client.flush(5)
        (signal,) = collector.wait_for(1)
        python = f"{sys.version_info[0]}.{sys.version_info[1]}"
        assert signal["payload"] == {
            "mine": "1", "kaibantrace.version": kaibantrace.__version__,
            "kaibantrace.python": python, "kaibantrace.ci": "false",
            "kaibantrace.os": {"linux": "linux", "darwin": "macos", "win32": "windows"}.get(
                sys.platform, "other")}

    def test_off_by_default(self, make_client: MakeClient, collector: Collector) -> None:
        client = make_client()
        client.emit("e")
        assert client.flush(5)
        assert "payload" not in collector.wait_for(1)[0]


class TestKillSwitch:
    def test_410_retires_the_endpoint_for_good(self, make_client: MakeClient,
                                               collector: Collector) -> None:
        collector.respond(410)
        client = make_client()
        for i in range(3):
            client.emit("e", {"i": i})
        assert client.flush(5) is False
        assert client.stats()["dropped"] == {"retired": 3}
        assert len(collector.requests) == 1
        # Later clients on this machine, in any process, never contact it again.
        later = make_client()
        assert later.decision().decided_by == "retired endpoint" and not later.enabled
        later.emit("ignored")
        done = subprocess.run([sys.executable, "-m", "kaibantrace", "status", "--json"],
                              env=subprocess_env(KAIBAN_TELEMETRY_APP_ID=APP_ID,
                                                 KAIBAN_TELEMETRY_ENDPOINT=collector.url),
                              capture_output=True, text=True, timeout=60)
        assert json.loads(done.stdout)["decided_by"] == "retired endpoint"
        assert len(collector.requests) == 1
        assert rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 0
