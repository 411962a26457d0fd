"""A typer CLI that reports which sub-command ran.

Run it with ``python examples/typer_cli.py run --name demo`` (or ``db migrate v2``).
Needs ``typer``. No internet needed: see ``_demo.py`` for the environment
variables it honours.

``track_cli`` wraps the typer app and records one event per run with the
sub-command as ``command``, named from the app's own commands, so argument
values are never sent. ``typer.testing.CliRunner().invoke(tracked, [...])`` is
counted too. ``telemetry status|disable|log`` are kaibantrace's own commands,
mounted here and never counted.
"""

from __future__ import annotations

from typing import List, Optional

import _demo  # these examples' helper: a local collector, unless KAIBAN_TELEMETRY_ENDPOINT is set
import typer

import kaibantrace

TOOL = "typer_cli.py"  # what users type; a real tool would say e.g. "boardtool"
CLI_APP_ID = "6C1A37E0-2F4B-4E8D-9B7A-3D5E1F2A4C60"  # a made-up app ID for this demo tool

app = typer.Typer(help="A pretend board tool that reports anonymous usage telemetry.")
db = typer.Typer(help="Database commands.")
app.add_typer(db, name="db")


@app.command()
def run(name: str = "my-board") -> None:
    """Run a board (the name is printed, never sent)."""
    print(f"Running {name!r} (pretend).")


@db.command()
def migrate(target: str) -> None:
    """Migrate to TARGET."""
    print(f"Migrated to {target} (pretend).")


@app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@kaibantrace.telemetry_commands  # running these is not a use of the tool: nothing is recorded
def telemetry(ctx: typer.Context) -> None:
    """See or change this tool's telemetry: status, disable, enable, log..."""
    raise typer.Exit(kaibantrace.command_line(ctx.args, prog=f"{TOOL} telemetry"))


tracked = kaibantrace.track_cli("cli_used")(app)


def main(argv: Optional[List[str]] = None) -> int:
    demo = _demo.Demo(local_app_id=CLI_APP_ID)
    kaibantrace.configure(**demo.settings, tool_name=TOOL)  # named in the first-run notice
    try:
        tracked(args=argv, standalone_mode=False)
    finally:
        kaibantrace.flush(timeout=2.0)  # a CLI exits right away: let the signal leave
        print()
        demo.report(kaibantrace.default_client())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
