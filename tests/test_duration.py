"""How long tracked work runs and how it ends: ``duration=True``, ``timed()``, error signals,
and the author's ``default_payload``, in TelemetryDeck's own conventions."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import traceback
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List

import pytest

import kaibantrace
from kaibantrace._client import timing as _timing
from kaibantrace.testing import Collector, capture

from .conftest import APP_ID

MakeClient = Callable[..., kaibantrace.Telemetry]
DURATION = "TelemetryDeck.Signal.durationInSeconds"
OUTCOME = "kaibantrace.outcome"
ERROR = "TelemetryDeck.Error.occurred"
THREE_DECIMALS = re.compile(r"^\d+\.\d{3}$")


class BoardError(Exception):
    """An author's own exception: its qualified name is what an error signal carries."""


def click_chains() -> bool:
    """Whether the installed click raises a failed command's SystemExit while handling the
    exception that failed it (before 8.5), so that the exception is its ``__context__``."""
    import click
    from click.testing import CliRunner

    @click.command()
    def fail() -> None:
        raise click.UsageError("x")

    seen: List[BaseException] = []
    main = fail.main

    def recording(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except SystemExit as exit:
            seen.append(exit)
            raise

    fail.main = recording  # type: ignore[method-assign]
    CliRunner().invoke(fail, [])
    return seen[0].__context__ is not None


def seconds(signal: Dict[str, Any]) -> float:
    text = signal["payload"][DURATION]
    assert THREE_DECIMALS.match(text), text
    return float(text)


def by_type(signals: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {s["type"]: s for s in signals}


class TestCalls:
    def test_one_signal_when_the_call_returns_with_its_duration(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("board_built", duration=True, payload={"agents": 2})
        def build(pause: float) -> str:
            assert signals == []  # nothing is sent when the work starts
            time.sleep(pause)
            return "built"

        with capture() as signals:
            assert build(0.05) == "built"
        (signal,) = signals
        assert signal["type"] == "board_built"
        assert signal["payload"] == {"agents": "2", DURATION: signal["payload"][DURATION],
                                     OUTCOME: "success"}
        assert 0.05 <= seconds(signal) < 30

    def test_a_raising_call_sends_its_outcome_and_an_error_signal(self) -> None:
        """The exception propagates untouched; only its class's qualified name is sent."""
        client = kaibantrace.Telemetry(app_id=APP_ID)
        raised = BoardError("secret board /home/alice/plans")

        @client.track("board_built", duration=True)
        def build() -> None:
            raise raised

        with capture() as signals, pytest.raises(BoardError) as caught:
            build()
        assert caught.value is raised
        assert caught.value.args == ("secret board /home/alice/plans",)
        frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
        assert frames[-1] == "build"  # raised where it was raised
        timed, error = signals
        assert timed["type"] == "board_built" and timed["payload"][OUTCOME] == "error"
        assert error["type"] == ERROR
        assert error["payload"] == {"TelemetryDeck.Error.id": "tests.test_duration.BoardError",
                                    "TelemetryDeck.Error.category": "thrown-exception",
                                    "kaibantrace.event": "board_built"}
        assert error["sessionID"] == timed["sessionID"]
        assert "secret" not in json.dumps(signals) and "alice" not in json.dumps(signals)

    def test_a_builtin_exception_is_named_without_its_module(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("parse", duration=True)
        def parse(text: str) -> Any:
            return json.loads(text)

        with capture() as signals, pytest.raises(ValueError):
            parse("{not json")
        assert by_type(signals)[ERROR]["payload"]["TelemetryDeck.Error.id"] == \
            "json.decoder.JSONDecodeError"
        with capture() as signals, pytest.raises(KeyError):
            client.track("lookup", duration=True)(lambda: {}["x"])()
        assert by_type(signals)[ERROR]["payload"]["TelemetryDeck.Error.id"] == "KeyError"

    @pytest.mark.parametrize(("code", "outcome"), [(0, "success"), (None, "success"), (2, "error")])
    def test_sys_exit_counts_by_its_status(self, code: Any, outcome: str) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("run", duration=True)
        def run() -> None:
            sys.exit(code)

        with capture() as signals, pytest.raises(SystemExit):
            run()
        assert signals[0]["payload"][OUTCOME] == outcome
        assert [s["type"] for s in signals] == (["run", ERROR] if outcome == "error" else ["run"])

    def test_ctrl_c_is_cancelled_not_an_error(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("run", duration=True)
        def run() -> None:
            raise KeyboardInterrupt

        with capture() as signals, pytest.raises(KeyboardInterrupt):
            run()
        assert [(s["type"], s["payload"][OUTCOME]) for s in signals] == [("run", "cancelled")]

    def test_methods_and_the_payload_callable_see_the_call(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        class Team:
            @client.track("kickoff", duration=True, payload=lambda call: {"n": call["n"]})
            def kickoff(self, n: int) -> int:
                return n * 2

        with capture() as signals:
            assert Team().kickoff(3) == 6
        assert signals[0]["payload"]["n"] == "3"

    def test_opted_out_the_function_runs_with_no_frame_of_ours(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("KAIBAN_TELEMETRY_OPT_OUT", "1")
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("run", duration=True)
        def run() -> str:
            return sys._getframe(1).f_code.co_name

        with capture(respect_opt_out=True) as signals:
            assert run() == "test_opted_out_the_function_runs_with_no_frame_of_ours"
        assert signals == []

    def test_enabled_the_frame_above_belongs_to_the_caller_module(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("run", duration=True)
        def run() -> Any:
            return sys._getframe(1).f_globals["__name__"]

        with capture():
            assert run() == __name__

    def test_the_session_is_the_one_where_the_work_started(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("stream", duration=True)
        def stream() -> Iterator[int]:
            yield from range(3)

        with capture() as signals:
            with client.session() as started_in:
                items = stream()
                first = next(items)
            assert [first, *items] == [0, 1, 2]  # exhausted outside the block
        assert signals[0]["sessionID"] == started_in.id


class TestCoroutinesAndGenerators:
    def test_a_coroutine_is_timed_from_its_first_step_to_completion(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("agent_step", duration=True)
        async def step(pause: float) -> str:
            await asyncio.sleep(pause)
            return "done"

        async def main() -> str:
            pending = step(0.05)
            await asyncio.sleep(0.05)  # created, not started: not counted
            return await pending

        with capture() as signals:
            assert asyncio.run(main()) == "done"
        (signal,) = signals
        assert signal["payload"][OUTCOME] == "success"
        assert 0.05 <= seconds(signal) < 30

    def test_a_cancelled_coroutine_is_cancelled_and_not_an_error(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)
        started = asyncio.Event

        @client.track("agent_step", duration=True)
        async def step(ready: asyncio.Event) -> None:
            ready.set()
            await asyncio.Event().wait()  # until cancelled

        async def main() -> None:
            ready = started()
            task = asyncio.ensure_future(step(ready))
            await ready.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        with capture() as signals:
            asyncio.run(main())
        assert [(s["type"], s["payload"][OUTCOME]) for s in signals] == [("agent_step", "cancelled")]

    def test_a_raising_coroutine_sends_the_error_signal(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("agent_step", duration=True)
        async def step() -> None:
            raise BoardError("no")

        with capture() as signals, pytest.raises(BoardError):
            asyncio.run(step())
        assert [s["type"] for s in signals] == ["agent_step", ERROR]

    def test_a_generator_exhausted_closed_or_raising(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("report_streamed", duration=True)
        def words(fail: bool = False) -> Iterator[str]:
            yield "a"
            yield "b"
            if fail:
                raise BoardError("late")

        with capture() as signals:
            assert list(words()) == ["a", "b"]
            for _ in words():
                break  # closed before it was exhausted
            with pytest.raises(BoardError):
                list(words(fail=True))
            words()  # never started: nothing to time
        assert [(s["type"], s["payload"].get(OUTCOME)) for s in signals] == [
            ("report_streamed", "success"), ("report_streamed", "closed"),
            ("report_streamed", "error"), (ERROR, None)]

    def test_an_async_generator_exhausted_and_closed(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("report_streamed", duration=True)
        async def words() -> AsyncIterator[str]:
            for word in ("a", "b", "c"):
                yield word

        async def main() -> List[str]:
            got = [word async for word in words()]
            early = words()
            got.append(await early.__anext__())
            await early.aclose()
            return got

        with capture() as signals:
            assert asyncio.run(main()) == ["a", "b", "c", "a"]
        assert [s["payload"][OUTCOME] for s in signals] == ["success", "closed"]


class TestTimedBlocks:
    def test_with_and_async_with(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)

        async def main() -> None:
            async with client.timed("upload_finished"):
                await asyncio.sleep(0.02)

        with capture() as signals:
            with client.timed("import_finished", {"files": 3}):
                time.sleep(0.02)
            asyncio.run(main())
        first, second = signals
        assert first["type"] == "import_finished" and first["payload"]["files"] == "3"
        assert second["type"] == "upload_finished"
        assert all(seconds(s) >= 0.02 and s["payload"][OUTCOME] == "success" for s in signals)

    def test_an_exception_passes_through_the_block(self) -> None:
        with capture() as signals, pytest.raises(BoardError), kaibantrace.timed("import_finished"):
            raise BoardError("x")
        assert [s["type"] for s in signals] == ["import_finished", ERROR]
        assert signals[0]["payload"][OUTCOME] == "error"

    def test_opted_out_nothing_is_recorded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("KAIBAN_TELEMETRY_OPT_OUT", "1")
        with capture(respect_opt_out=True) as signals, kaibantrace.timed("import_finished"):
            pass
        assert signals == []

    def test_a_bad_name_never_raises_into_the_host(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)
        with capture(strict=False) as signals, client.timed("not a valid name"):
            pass
        assert signals == []


class TestDefaultPayload:
    def test_every_event_carries_it_and_the_event_s_own_fields_win(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID,
                                       default_payload={"mylib.version": "1.4.0", "tier": "a"})

        @client.track("kickoff", duration=True)
        def kickoff() -> None:
            raise BoardError("x")

        with capture() as signals:
            client.emit("plain")
            client.emit("own", {"tier": "b"})
            with pytest.raises(BoardError):
                kickoff()
        assert [s["payload"]["mylib.version"] for s in signals] == ["1.4.0"] * 4
        assert [s["payload"]["tier"] for s in signals] == ["a", "b", "a", "a"]

    @pytest.mark.parametrize(("payload", "message"), [
        ({"contact": "alice@example.com"}, "looks like an e-mail address"),
        ({"TelemetryDeck.Signal.x": "1"}, "reserved"),
        ({"bad": object()}, "'bad' is a object; only text"),
        ({"kaibantrace.held_back": "9"}, "prefix kaibantrace adds"),
        ({"big": "x" * 2000}, "at most 1 KiB"),
        (["not", "a", "mapping"], "must be a mapping"),
    ])
    def test_checked_once_when_configured(self, payload: Any, message: str) -> None:
        with pytest.raises(kaibantrace.ConfigurationError, match=message) as raised:
            kaibantrace.Telemetry(app_id=APP_ID, default_payload=payload)
        assert "alice" not in str(raised.value)
        with pytest.raises(kaibantrace.ConfigurationError, match="default_payload"):
            kaibantrace.configure(default_payload=payload)

    def test_configure_sets_and_clears_it(self) -> None:
        kaibantrace.configure(app_id=APP_ID, default_payload={"mylib.version": "2"})
        with capture() as signals:
            kaibantrace.emit("a")
            kaibantrace.configure(default_payload={})
            kaibantrace.emit("b")
        assert [s.get("payload") for s in signals] == [{"mylib.version": "2"}, None]


class TestOnTheWire:
    def test_duration_and_error_signals_reach_the_collector(
            self, make_client: MakeClient, collector: Collector) -> None:
        """Exact keys, all text, as the TelemetryDeck ingest takes them."""
        client = make_client(default_payload={"mylib.version": "1.4.0"})

        @client.track("board_built", duration=True)
        def build(fail: bool) -> None:
            if fail:
                raise BoardError("x")

        build(False)
        with pytest.raises(BoardError):
            build(True)
        assert client.flush(10)
        ok, failed, error = collector.wait_for(3)
        for signal in (ok, failed, error):
            assert set(signal) == {"appID", "clientUser", "sessionID", "type",
                                   "telemetryClientVersion", "receivedAt", "payload"}
            assert all(isinstance(v, str) for v in signal["payload"].values())
        assert set(ok["payload"]) == {DURATION, OUTCOME, "mylib.version"}
        assert (ok["payload"][OUTCOME], failed["payload"][OUTCOME]) == ("success", "error")
        assert THREE_DECIMALS.match(ok["payload"][DURATION])
        assert error["type"] == ERROR
        assert error["payload"] == {"TelemetryDeck.Error.id": "tests.test_duration.BoardError",
                                    "TelemetryDeck.Error.category": "thrown-exception",
                                    "kaibantrace.event": "board_built",
                                    "mylib.version": "1.4.0"}


class TestCli:
    def test_click_runs_timed_through_clirunner(self, tmp_path: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
        """click ends a command with SystemExit(0): a success; a failing one, an error."""
        import click
        from click.testing import CliRunner

        monkeypatch.chdir(tmp_path)
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @click.group()
        def cli() -> None:
            pass

        @cli.command()
        def run() -> None:
            click.echo("ran")

        @cli.command()
        def deploy() -> None:
            raise click.ClickException("no target")

        tracked = client.track_cli("cli_used", duration=True)(cli)
        runner = CliRunner()
        with capture() as signals:
            assert runner.invoke(tracked, ["run"]).output == "ran\n"
            assert runner.invoke(tracked, ["deploy"]).exit_code == 1
        timed = [s for s in signals if s["type"] == "cli_used"]
        assert [(s["payload"]["command"], s["payload"][OUTCOME]) for s in timed] == [
            ("run", "success"), ("deploy", "error")]
        errors = [s for s in signals if s["type"] == ERROR]
        # what ended the command, where click raises its SystemExit(1) while handling it
        expected = "click.exceptions.ClickException" if click_chains() else "SystemExit"
        assert [e["payload"]["TelemetryDeck.Error.id"] for e in errors] == [expected]
        # CLI events keep the project identity, the error signal too
        assert errors[0]["clientUser"] == timed[1]["clientUser"]

    def test_an_argparse_main_is_timed(self, tmp_path: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track_cli("run_board", duration=True)
        def main(argv: List[str]) -> int:
            return 0

        with capture() as signals:
            assert main(["run"]) == 0
        assert [s["type"] for s in signals] == ["run_board"]  # a capture records no install
        assert signals[0]["payload"][OUTCOME] == "success"

    def test_a_typer_app_is_timed_through_its_clirunner(self, tmp_path: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        typer = pytest.importorskip("typer")
        from typer.testing import CliRunner

        monkeypatch.chdir(tmp_path)
        client = kaibantrace.Telemetry(app_id=APP_ID)
        app = typer.Typer()

        @app.command()
        def hello(name: str) -> None:
            if name == "fail":
                raise BoardError("x")
            print(f"hi {name}")

        tracked = client.track_cli("cli_used", duration=True)(app)
        with capture() as signals:
            assert CliRunner().invoke(tracked, ["you"]).output == "hi you\n"
            assert isinstance(CliRunner().invoke(tracked, ["fail"]).exception, BoardError)
        assert [(s["type"], s["payload"].get(OUTCOME)) for s in signals
                if s["type"] != "install"] == [
            ("cli_used", "success"), ("cli_used", "error"), (ERROR, None)]


class TestNeverInTheWay:
    def test_a_failure_deciding_where_events_go_never_reaches_the_call(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Deciding (the opt-out sources, the sender's start) fails: the timed function
        still runs and returns, untimed, and nothing is raised into its caller."""
        from kaibantrace._client import client as _client
        from kaibantrace._client import router as _router

        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("run", duration=True)
        def run() -> str:
            return "ran"

        def broken(*args: Any) -> None:
            raise RuntimeError("telemetry is broken")

        monkeypatch.setattr(_router, "decide", broken)
        _client.bump_generation()  # decide again at the next event
        assert run() == "ran"

    @pytest.mark.parametrize("payload", [None, "callable"])
    def test_a_failure_inside_telemetry_never_reaches_the_call(
            self, payload: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """Whatever breaks in kaibantrace, the work runs and returns or raises as its own."""
        client = kaibantrace.Telemetry(app_id=APP_ID)

        def broken() -> None:
            raise RuntimeError("telemetry is broken")

        kwargs: Dict[str, Any] = {} if payload is None else {"payload": lambda call: {"n": 1}}

        @client.track("run", duration=True, **kwargs)
        def run(fail: bool) -> str:
            if fail:
                raise BoardError("its own")
            return "ran"

        with capture(strict=False):
            monkeypatch.setattr(client, "_session", broken)
            assert run(False) == "ran"
            with pytest.raises(BoardError, match="its own"):
                run(True)
            with client.timed("block"):
                pass

    def test_the_signal_budget_counts_timed_and_error_signals_too(
            self, make_client: MakeClient, collector: Collector,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """Beyond the budget they are held back, and the next one let through carries the
        count, as for any event."""
        now = [time.time()]
        monkeypatch.setattr(_timing, "_now", lambda: now[0])  # the clock events are stamped with
        client = make_client(max_per_minute=1)

        @client.track("loop", duration=True)
        def step() -> None:
            raise BoardError("x")

        for _ in range(3):
            with pytest.raises(BoardError):
                step()
        assert client.stats()["held_back"] == 4
        now[0] += 60  # a minute later: a token of each name again
        with pytest.raises(BoardError):
            step()
        assert client.flush(10)
        signals = collector.wait_for(4)
        assert [(s["type"], s["payload"].get("kaibantrace.held_back")) for s in signals] == [
            ("loop", None), (ERROR, None), ("loop", "2"), (ERROR, "2")]
        assert signals[2]["payload"][OUTCOME] == "error"

    def test_a_timed_method_does_not_keep_its_object_alive(self) -> None:
        import gc
        import weakref

        client = kaibantrace.Telemetry(app_id=APP_ID)

        class Team:
            @client.track("kickoff", duration=True)
            def kickoff(self) -> None:
                pass

        with capture():
            team = Team()
            team.kickoff()
            gone = weakref.ref(team)
            del team
            gc.collect()
        assert gone() is None


class TestReviewedEdges:
    def test_a_value_naming_this_machine_is_dropped_not_raised(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """It may pass on the author's machine: on a user's, it must not stop the program."""
        monkeypatch.setenv("LOGNAME", "community")
        monkeypatch.setenv("USER", "community")
        from kaibantrace._encode import privacy as _privacy

        _privacy.forget_local_markers()
        try:
            client = kaibantrace.Telemetry(app_id=APP_ID,
                                           default_payload={"edition": "community", "v": "1"})
        finally:
            monkeypatch.undo()
            _privacy.forget_local_markers()
        assert dict(client.settings.default_payload or {}) == {"v": "1"}

    def test_event_and_default_payload_together_stay_under_4_kib(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID, default_payload={"a": "x" * 900})
        with capture(strict=False) as signals:
            client.emit("ev", {"b": "y" * 3500})
        assert signals[0]["payload"] == {"a": "x" * 900}  # the event's own fields were too many

    def test_strict_mode_reports_a_bad_payload_of_a_run_that_succeeded(self) -> None:
        """click ends every command with SystemExit(0): that is a success, checked in strict
        mode; and a run that raised still records its error signal, its own exception raised."""
        client = kaibantrace.Telemetry(app_id=APP_ID, strict=True)

        @client.track("ok", duration=True, payload=lambda call: {"mail": "bob@example.com"})
        def ok() -> None:
            sys.exit(0)

        @client.track("bad", duration=True, payload=lambda call: {"mail": "bob@example.com"})
        def bad() -> None:
            raise BoardError("x")

        with capture(), pytest.raises(kaibantrace.PrivacyError):
            ok()
        with capture() as signals, pytest.raises(BoardError):
            bad()
        assert [s["type"] for s in signals] == [ERROR]

    def test_recursion_error_of_the_work_is_the_one_raised(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID, max_per_minute=0)

        @client.track("deep", duration=True)
        def deep(n: int) -> int:
            return deep(n + 1)

        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(300)
        try:
            with capture(strict=False), pytest.raises(RecursionError) as caught:
                deep(0)
        finally:
            sys.setrecursionlimit(limit)
        assert caught.value.__context__ is None

    def test_click_ctrl_c_is_cancelled_and_a_click_error_named(
            self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        import click
        from click.testing import CliRunner

        monkeypatch.chdir(tmp_path)
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @click.group()
        def cli() -> None:
            pass

        @cli.command()
        def interrupt() -> None:
            raise KeyboardInterrupt

        @cli.command()
        def fail() -> None:
            raise click.UsageError("no target")

        tracked = client.track_cli("cli_used", duration=True)(cli)
        with capture() as signals:
            CliRunner().invoke(tracked, ["interrupt"])
            CliRunner().invoke(tracked, ["fail"])
        got = [(s["type"], s["payload"].get(OUTCOME), s["payload"].get("TelemetryDeck.Error.id"))
               for s in signals if s["type"] != "install"]
        if click_chains():  # click before 8.5 exits while handling what ended the command
            assert got == [("cli_used", "cancelled", None), ("cli_used", "error", None),
                           (ERROR, None, "click.exceptions.UsageError")]
        else:  # click 8.5 exits after it: only the exit status is left
            assert got == [("cli_used", "error", None), (ERROR, None, "SystemExit"),
                           ("cli_used", "error", None), (ERROR, None, "SystemExit")]

    @pytest.mark.parametrize(("handled", "outcome", "error_id"), [
        (KeyboardInterrupt, "cancelled", None), (ValueError, "error", "ValueError")])
    def test_an_exit_while_handling_an_exception_is_named_by_it(
            self, handled: type, outcome: str, error_id: Any) -> None:
        """``except X: sys.exit(1)``, as CLIs end a failed run: the error is X."""
        client = kaibantrace.Telemetry(app_id=APP_ID)

        @client.track("run", duration=True)
        def run() -> None:
            try:
                raise handled()
            except handled:
                sys.exit(1)

        with capture() as signals, pytest.raises(SystemExit):
            run()
        assert signals[0]["payload"][OUTCOME] == outcome
        assert [s["payload"].get("TelemetryDeck.Error.id") for s in signals[1:]] == (
            [error_id] if error_id else [])

    def test_one_timer_times_overlapping_blocks(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)
        timer = client.timed("load")

        async def job(pause: float) -> None:
            async with timer:
                await asyncio.sleep(pause)

        async def main() -> None:
            await asyncio.gather(job(0.02), job(0.2))

        with capture() as signals:
            asyncio.run(main())
            with timer:
                with timer:
                    pass
                time.sleep(0.02)
        durations = [seconds(s) for s in signals]
        assert len(durations) == 4
        assert 0.02 <= durations[0] < 0.2 <= durations[1]
        assert durations[2] < durations[3] and durations[3] >= 0.02  # each block its own

    def test_the_error_signal_name_stays_reserved_for_emit(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)
        with capture(strict=False) as signals:
            client.emit(ERROR, {"TelemetryDeck.Error.id": "forged"})
        assert signals == []

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    # Other tests of the same worker may have left a thread running (a collector's).
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_forked_child_is_a_new_user_in_a_capture_too(self) -> None:
        client = kaibantrace.Telemetry(app_id=APP_ID)
        read, write = os.pipe()
        with capture() as signals:
            client.emit("parent")
            pid = os.fork()
            if pid == 0:
                try:
                    client.emit("child")
                    os.write(write, signals[-1]["clientUser"].encode())
                finally:
                    os._exit(0)
            os.close(write)
            with os.fdopen(read) as pipe:
                child_user = pipe.read()
            os.waitpid(pid, 0)
        assert len(child_user) == 64 and child_user != signals[0]["clientUser"]
