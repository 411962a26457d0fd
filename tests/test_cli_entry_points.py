"""``track_cli`` counts a CLI however it is started, and never counts kaibantrace's own commands.

Authors test click and typer applications with their ``CliRunner``, which starts
the application through ``main`` (click) or through the click command typer
builds (typer), never by calling the tracked object; these tests do as they do,
against the loopback collector.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Tuple

import pytest

import kaibantrace
from kaibantrace.testing import Collector

click = pytest.importorskip("click")
typer = pytest.importorskip("typer")
from click.testing import CliRunner  # noqa: E402
from typer.testing import CliRunner as TyperRunner  # noqa: E402

MakeClient = Callable[..., kaibantrace.Telemetry]
APP = "0F5A5C1E-0000-4000-8000-0000000C1A55"


def used(collector: Collector, client: kaibantrace.Telemetry, count: int) -> List[Tuple[str, Any]]:
    """The types and payloads of what the collector received, once ``count`` signals came."""
    assert client.flush(10)
    return [(s["type"], s.get("payload")) for s in collector.wait_for(count)]


def click_app(client: kaibantrace.Telemetry) -> Any:
    @client.track_cli("tool_used")
    @click.group()
    def cli() -> None:
        pass

    @cli.group()
    def db() -> None:
        pass

    @db.command()
    @click.argument("target")
    def migrate(target: str) -> None:
        click.echo(f"migrated {target}")

    @cli.command(context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1)
    @kaibantrace.telemetry_commands
    def telemetry(args: Tuple[str, ...]) -> None:
        sys.exit(kaibantrace.command_line(list(args), client=client, prog="tool telemetry"))

    return cli


def typer_app(client: kaibantrace.Telemetry) -> Any:
    app = client.track_cli("tool_used")(typer.Typer())
    db = typer.Typer()
    app.add_typer(db, name="db")

    @app.command()
    def run(name: str = "") -> None:
        print("ran")

    @db.command()
    def migrate(target: str) -> None:
        print(f"migrated {target}")

    @app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @kaibantrace.telemetry_commands
    def telemetry(ctx: typer.Context) -> None:
        raise typer.Exit(kaibantrace.command_line(ctx.args, client=client, prog="tool telemetry"))

    return app


class TestClick:
    def test_cli_runner_counts_the_run_and_its_sub_command(self, make_client: MakeClient,
                                                           collector: Collector) -> None:
        client = make_client()
        result = CliRunner().invoke(click_app(client), ["db", "migrate", "private-target"])
        assert result.exit_code == 0, result.output
        assert result.output == "migrated private-target\n"
        assert used(collector, client, 2) == [("install", None),
                                              ("tool_used", {"command": "db migrate"})]

    def test_main_counts_the_run(self, make_client: MakeClient, collector: Collector) -> None:
        client = make_client()
        cli = click_app(client)
        with pytest.raises(SystemExit) as ended:
            cli.main(["db", "migrate", "x"], prog_name="tool")
        assert ended.value.code == 0
        assert ("tool_used", {"command": "db migrate"}) in used(collector, client, 2)

    def test_calling_the_group_counts_once(self, make_client: MakeClient,
                                           collector: Collector) -> None:
        """Calling the tracked group runs click's own ``main``: one event, not two."""
        client = make_client()
        cli = click_app(client)
        assert cli(["db", "migrate", "x"], standalone_mode=False) is None
        client.emit("marker")
        assert [t for t, _ in used(collector, client, 3)] == ["install", "tool_used", "marker"]

    def test_own_commands_are_not_a_use_of_the_tool(self, make_client: MakeClient,
                                                    collector: Collector) -> None:
        """``tool telemetry ...`` records nothing, not even the install event, even after a
        reset has forgotten that the install was recorded."""
        client = make_client()
        cli = click_app(client)
        runner = CliRunner()
        for argv in (["telemetry", "status"], ["telemetry", "reset"],
                     ["telemetry", "project-id"]):
            result = runner.invoke(cli, argv)
            assert result.exit_code == 0, result.output
        assert "project ID" in result.output
        client.emit("marker")
        assert used(collector, client, 1) == [("marker", None)]


class TestTyper:
    @pytest.mark.parametrize(("argv", "command"), [
        (["run", "--name", "Private Name"], "run"),
        (["db", "migrate", "private-target"], "db migrate"),
    ])
    def test_cli_runner_counts_the_run(self, argv: List[str], command: str,
                                       make_client: MakeClient, collector: Collector) -> None:
        client = make_client()
        result = TyperRunner().invoke(typer_app(client), argv)
        assert result.exit_code == 0, result.output
        assert used(collector, client, 2) == [("install", None),
                                              ("tool_used", {"command": command})]

    def test_an_application_of_one_command(self, make_client: MakeClient,
                                           collector: Collector) -> None:
        client = make_client()
        app = client.track_cli("tool_used")(typer.Typer())

        @app.command()
        def only(count: int = 1) -> None:
            print("counted", count)

        result = TyperRunner().invoke(app, ["--count", "3"])
        assert (result.exit_code, result.output) == (0, "counted 3\n")
        assert used(collector, client, 2) == [("install", None), ("tool_used", None)]

    def test_calling_the_application_counts_once(self, make_client: MakeClient,
                                                 collector: Collector) -> None:
        client = make_client()
        app = typer_app(client)
        app(["db", "migrate", "x"], standalone_mode=False)
        client.emit("marker")
        assert [t for t, _ in used(collector, client, 3)] == ["install", "tool_used", "marker"]

    def test_own_commands_are_not_a_use_of_the_tool(self, make_client: MakeClient,
                                                    collector: Collector) -> None:
        client = make_client()
        app = typer_app(client)
        for argv in (["telemetry", "status"], ["telemetry", "project-id"]):
            result = TyperRunner().invoke(app, argv)
            assert result.exit_code == 0, result.output
        client.emit("marker")
        assert used(collector, client, 1) == [("marker", None)]

    def test_the_application_itself_is_not_changed(self, make_client: MakeClient) -> None:
        """What typer reads from the tracked application are copies: the author's own
        application builds the same click command as before."""
        client = make_client()
        plain = typer.Typer()
        tracked = client.track_cli("tool_used")(plain)

        @tracked.command()
        def run() -> None:
            pass

        seen: Dict[str, Any] = {"info": plain.info, "commands": list(plain.registered_commands)}
        assert tracked.info is not plain.info and tracked.info.cls is not None
        assert plain.info is seen["info"] and plain.registered_commands == seen["commands"]
        assert typer.main.get_command(plain).__class__.__name__ == "TyperCommand"
        assert type(typer.main.get_command(plain)) is not type(typer.main.get_command(tracked))


class TestArgparse:
    def test_own_commands_are_not_a_use_of_the_tool(self, make_client: MakeClient,
                                                    collector: Collector) -> None:
        import argparse

        client = make_client()
        parser = argparse.ArgumentParser(prog="tool")
        commands = parser.add_subparsers(dest="command")
        commands.add_parser("run")
        kaibantrace.telemetry_commands(commands.add_parser("telemetry"))

        @client.track_cli("tool_used", parser=parser)
        def main(argv: List[str]) -> int:
            return 0

        main(["telemetry", "status"])
        main(["run"])
        assert used(collector, client, 2) == [("install", None), ("tool_used", {"command": "run"})]

    def test_marking_something_that_takes_no_mark_is_an_error(self) -> None:
        with pytest.raises(TypeError, match="cannot mark"):
            kaibantrace.telemetry_commands(42)


def test_opted_out_the_command_line_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opted out, a tracked typer application is run once: kaibantrace does not build its
    click command again to name the sub-command."""
    monkeypatch.setenv("KAIBAN_TELEMETRY_OPT_OUT", "1")
    built: List[Any] = []
    original = typer.main.get_command

    def counting(app: Any) -> Any:
        built.append(app)
        return original(app)

    monkeypatch.setattr(typer.main, "get_command", counting)
    app = kaibantrace.Telemetry(APP).track_cli("tool_used")(typer.Typer())

    @app.command()
    def run() -> None:
        pass

    app([], standalone_mode=False)
    assert len(built) == 1  # typer's own, to run the application
