"""The ``kaibantrace`` command: see, stop, audit and flush telemetry.

``kaibantrace status|enable|disable|reset|log|project-id|flush`` (also
``python -m kaibantrace``). Output is for people by default; ``--json`` prints
one JSON value for scripts. Neither ever carries a control or format character
from a payload, a file or the environment: the text is escaped (``printable``),
the JSON ASCII-only. Exit status: 0 success, 2 usage error (argparse's
own), 1 failure with a one-line reason on stderr, 141 (what a shell reports for
a program ended by SIGPIPE) with nothing said when the reader of the output
went away, as in ``kaibantrace log | head -1``.

``command_line(argv, client=..., prog=...)`` runs the same commands for any
client, so a CLI author can offer ``mytool telemetry status`` that reports on
their own app ID, opt-out variable and profile.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from .._delivery.handoff import DELIVERY_BOUND
from .._policy.config import PROFILES, canonical_app_id
from . import choices, sending
from .common import Failure, OutputGone, discard_stdout, printable, say_json, write

if TYPE_CHECKING:
    from .._client.client import Telemetry

OUTPUT_GONE = 141
"""The exit status when stdout's reader went away: 128 + SIGPIPE, what a shell reports for
``cat`` or ``grep`` in the same place, so a script that allows it for them allows it here."""


def command_line(argv: Optional[Sequence[str]] = None, *, client: Optional[Telemetry] = None,
                 prog: str = "kaibantrace") -> int:
    """Run one ``kaibantrace`` command; the exit status (0, 1, 2 for a usage error, or
    ``OUTPUT_GONE``).

    When the reader of stdout has gone (``| head -1``), the command stops without a word
    or a traceback, and stdout's descriptor is pointed at the null device: what is left
    in its buffer would otherwise fail again when Python flushes it at exit. Only then
    is the author's stdout touched, when the program mounts these commands in its own.
    """
    try:
        status = _run(argv, client, prog)
        write("", flush=True)  # here, not at exit: a broken pipe is then seen and handled
        return status
    except OutputGone:
        discard_stdout()
        return OUTPUT_GONE


def _run(argv: Optional[Sequence[str]], client: Optional[Telemetry], prog: str) -> int:
    from .. import default_client

    telemetry = client if client is not None else default_client()
    parser = _parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) and usage errors (2)
        return int(stop.code or 0)
    args.client_given = client is not None
    try:
        result: Dict[str, Any] = args.run(telemetry, args)
    except OutputGone:
        raise
    except Exception as exc:  # a one-line reason, never a traceback
        reason = str(exc) if isinstance(exc, Failure) else f"unexpected error: {exc!r}"
        try:
            print(printable(f"{prog}: {reason}"), file=sys.stderr)
        except BrokenPipeError:  # no one to tell: the status says it
            pass
        if args.json:
            try:  # flushed here: a failure is 1 even when no one reads stdout any more
                say_json({"ok": False, "error": reason})
                write("", flush=True)
            except OutputGone:
                discard_stdout()
        return 1
    if args.json:
        say_json(result, indent=None if args.command == "log" else 2)
    return 0


def main() -> None:
    """The ``kaibantrace`` console script; ``command_line`` already ends quietly on a broken
    pipe, so nothing is left for the interpreter to report at exit."""
    sys.exit(command_line())


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="See, stop and audit the anonymous usage telemetry that programs "
        "built with kaibantrace send.")
    parser.set_defaults(prog=prog)
    # --json and --app work before or after the command: the command's copies
    # default to SUPPRESS so they never overwrite a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    for target, top in ((parser, True), (common, False)):
        target.add_argument("--json", action="store_true",
                            default=False if top else argparse.SUPPRESS,
                            help="print one JSON value, for scripts")
        target.add_argument("--app", metavar="APP_ID", type=_app_id_argument,
                            default=None if top else argparse.SUPPRESS,
                            help="the TelemetryDeck app ID to look at (default: the program's "
                            "own, or KAIBAN_TELEMETRY_APP_ID)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, run, text in [
        ("status", choices.run_status, "whether telemetry is on, which source decided, what is waiting"),
        ("enable", choices.run_enable, "allow telemetry again (an environment opt-out still wins)"),
        ("disable", choices.run_disable, "turn telemetry off for every program that uses kaibantrace, and "
         "delete what is waiting to be sent"),
        ("reset", choices.run_reset, "forget the saved choice, the first-run notice and the local secret"),
        ("log", choices.run_log, "show the last requests actually sent from this machine, exactly as sent"),
        ("project-id", choices.run_project_id, "show this project's ID and the value that would be sent"),
        ("flush", sending.run_flush, "send what is waiting now"),
        ("deliver", sending.run_deliver, "send what is waiting, in the background way: one at a time per "
         "app (an OS lock), at low priority, for at most --max-time seconds; what programs "
         "start at exit when they leave signals behind"),
    ]:
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(run=run)
        if name == "log":
            sub.add_argument("--limit", type=_count_argument, default=10, metavar="N",
                             help="how many requests to show (default 10)")
        if name == "flush":
            sub.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                             help="give up after this long (default 30)")
        if name == "deliver":
            sub.add_argument("--endpoint", metavar="URL", default=None,
                             help="the ingest URL (default: KAIBAN_TELEMETRY_ENDPOINT or TelemetryDeck's)")
            sub.add_argument("--opt-out-env", metavar="NAME", default=None,
                             help="the program's own opt-out variable (default KAIBAN_TELEMETRY_OPT_OUT)")
            sub.add_argument("--profile", choices=PROFILES, default=None, help=argparse.SUPPRESS)
            sub.add_argument("--timeout", type=_seconds_argument, default=None, metavar="SECONDS",
                             help="deadline of one request (default 3)")
            sub.add_argument("--backoff", type=_seconds_argument, default=None, help=argparse.SUPPRESS)
            sub.add_argument("--max-time", type=_seconds_argument, default=DELIVERY_BOUND,
                             metavar="SECONDS", help=f"end after this long (default {DELIVERY_BOUND:g})")
            sub.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _app_id_argument(text: str) -> str:
    """The app ID in its one spelling, so ``--app`` finds an outbox however it is written."""
    app_id = canonical_app_id(text)
    if app_id is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TelemetryDeck app ID (a UUID)")
    return app_id


def _seconds_argument(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < number <= 300:
        raise argparse.ArgumentTypeError("must be above 0 and at most 300")
    return number


def _count_argument(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number
