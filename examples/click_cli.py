"""A click CLI that reports which sub-command ran, and offers its own ``telemetry`` commands.

Run it with ``python examples/click_cli.py run --name demo`` (or ``db migrate v2``,
``telemetry status``). Needs ``click``. No internet needed: see ``_demo.py``
for the environment variables it honours.

``track_cli`` on the click group records one event per run, with the
sub-command (``run``, ``db migrate``) as ``command``. It learns the command
names from the group itself, so argument values such as ``--name demo`` or
``v2`` are never sent.
"""

from __future__ import annotations

from typing import List, Optional

import _demo  # these examples' helper: a local collector, unless KAIBAN_TELEMETRY_ENDPOINT is set
import click

import kaibantrace

TOOL = "click_cli.py"  # what users type; a real tool would say e.g. "boardtool"
CLI_APP_ID = "6C1A37E0-2F4B-4E8D-9B7A-3D5E1F2A4C60"  # a made-up app ID for this demo tool


@kaibantrace.track_cli("cli_used")
@click.group()
def cli() -> None:
    """A pretend board tool that reports anonymous usage telemetry."""


@cli.command()
@click.option("--name", default="my-board", help="the board's name (printed, never sent)")
def run(name: str) -> None:
    """Run a board."""
    click.echo(f"Running {name!r} (pretend).")


@cli.group()
def db() -> None:
    """Database commands."""


@db.command()
@click.argument("target")
def migrate(target: str) -> None:
    """Migrate to TARGET."""
    click.echo(f"Migrated to {target} (pretend).")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@kaibantrace.telemetry_commands  # running these is not a use of the tool: nothing is recorded
def telemetry(args: List[str]) -> None:
    """See or change this tool's telemetry: status, disable, enable, log..."""
    click.get_current_context().exit(
        kaibantrace.command_line(list(args), prog=f"{TOOL} telemetry"))


def main(argv: Optional[List[str]] = None) -> int:
    demo = _demo.Demo(local_app_id=CLI_APP_ID)
    kaibantrace.configure(**demo.settings, tool_name=TOOL)  # named in the first-run notice
    try:
        cli.main(args=argv, standalone_mode=False)  # or cli(...): both are counted
    finally:
        kaibantrace.flush(timeout=2.0)  # a CLI exits right away: let the signal leave
        print()
        demo.report(kaibantrace.default_client())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
