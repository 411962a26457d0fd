"""A command-line tool that reports KaibanJS's CLI events: init, run and deploy.

Run it with ``python examples/cli.py run`` (or ``init``, ``deploy``; add
``--help`` for options). No internet needed; see ``_demo.py`` for the
environment variables it honours.

CLI events differ from library events in who they are from. ``track_cli``
identifies them by the project ID, the formula KaibanJS uses (a hash of the
working directory's name and of the home directory), so every run in the same
project counts as the same user. Only a salted SHA-256 of that ID is sent.

It runs in the KaibanJS profile and sends what KaibanJS's own CLI sends for
``kaiban init``, ``run`` and ``deploy``, field for field: no payload. A tool
of your own, in the default profile, can add one (see ``workflow.py``).
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import _demo  # these examples' helper: a local collector, unless KAIBAN_TELEMETRY_ENDPOINT is set

import kaibantrace
from kaibantrace import events

# One decorated function per subcommand. The event name is fixed when the
# decorator runs, so main() itself cannot be decorated with the right one:
# it parses the command line and hands over to the function for the command.


@kaibantrace.track_cli(events.INIT_BOARD)
def init_board(args: argparse.Namespace) -> int:
    # The board name is the user's content: it is printed, never sent.
    print(f"Created board {args.name!r} (pretend: this demo writes no files).")
    return 0


@kaibantrace.track_cli(events.RUN_BOARD)
def run_board(args: argparse.Namespace) -> int:
    mode = "watching for changes" if args.watch else "once"
    print(f"Running the board {mode} (pretend).")
    return 0


@kaibantrace.track_cli(events.DEPLOY_BOARD)
def deploy_board(args: argparse.Namespace) -> int:
    print("Deployed the board (pretend: nothing left this machine but telemetry).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py", description="A pretend board tool that reports anonymous usage telemetry. "
        "Set KAIBAN_TELEMETRY_OPT_OUT=1 or DO_NOT_TRACK=1 to switch telemetry off.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="create a board")
    init.add_argument("--name", default="my-board", help="the board's name")
    init.set_defaults(handler=init_board)

    run = commands.add_parser("run", help="run the board")
    run.add_argument("--watch", action="store_true", help="run again when files change")
    run.set_defaults(handler=run_board)

    deploy = commands.add_parser("deploy", help="deploy the board")
    deploy.set_defaults(handler=deploy_board)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # --help and usage errors exit here

    demo = _demo.Demo(local_app_id=None)
    # The KaibanJS profile, so this sends exactly what KaibanJS's CLI sends: its CLI app
    # ID (no app ID is configured), its signal names with no payload, KaibanJS's project
    # identity, and its install event ("install_kaibanjs") the first time the tool runs
    # in a project on this machine.
    kaibantrace.configure(**demo.settings, profile="kaibanjs")
    try:
        return int(args.handler(args))
    finally:
        # A CLI exits right away: wait (at most 2 s) for the signal to leave.
        kaibantrace.flush(timeout=2.0)
        print()
        demo.report(kaibantrace.default_client())


if __name__ == "__main__":
    raise SystemExit(main())
