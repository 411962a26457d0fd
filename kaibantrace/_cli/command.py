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
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .._delivery import handoff as _handoff
from .._delivery import outbox as _outbox
from .._delivery import sentlog as _sentlog
from .._delivery.handoff import DELIVERY_BOUND
from .._encode.identity import hash_user, keyed_identity, project_id
from .._policy import prefs as _prefs
from .._policy.config import (
    PROFILES,
    Decision,
    canonical_app_id,
    decide,
    in_ci,
    ingest_url,
    keyed_with_local_secret,
    why_nothing_is_sent,
)
from .._policy.state import config_dir, state_dir

if TYPE_CHECKING:
    from .._client.client import Telemetry

SOURCES = {
    "code": "the program's own code (opt_out=True)",
    "DO_NOT_TRACK": "the DO_NOT_TRACK environment variable",
    "saved preference": "your saved choice (`{prog} disable`)",
    "retired endpoint": "the ingest endpoint, which answered 410 Gone and is retired",
    "default": "the default, as no one opted out",
}


OUTPUT_GONE = 141
"""The exit status when stdout's reader went away: 128 + SIGPIPE, what a shell reports for
``cat`` or ``grep`` in the same place, so a script that allows it for them allows it here."""


class Failure(Exception):
    """A command that could not do its job; the message is the one-line reason."""


class _OutputGone(Exception):
    """Writing to stdout met a broken pipe: no one reads what the command says any more."""


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
        _write("", flush=True)  # here, not at exit: a broken pipe is then seen and handled
        return status
    except _OutputGone:
        _discard_stdout()
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
    except _OutputGone:
        raise
    except Exception as exc:  # a one-line reason, never a traceback
        reason = str(exc) if isinstance(exc, Failure) else f"unexpected error: {exc!r}"
        try:
            print(printable(f"{prog}: {reason}"), file=sys.stderr)
        except BrokenPipeError:  # no one to tell: the status says it
            pass
        if args.json:
            try:  # flushed here: a failure is 1 even when no one reads stdout any more
                _say_json({"ok": False, "error": reason})
                _write("", flush=True)
            except _OutputGone:
                _discard_stdout()
        return 1
    if args.json:
        _say_json(result, indent=None if args.command == "log" else 2)
    return 0


def printable(text: str) -> str:
    """``text`` with every character a terminal could act on written as an escape.

    What is shown comes partly from files and payloads that others may have written
    (the sent log holds the host's event values as they were sent), and a terminal
    obeys control characters: an ESC or a C1 CSI starts a command, a bidi override
    or a zero-width character makes the line read other than it is. So every
    control, format, surrogate, private-use or unassigned character, and the line
    and paragraph separators, becomes ``\\uNNNN`` (``\\UNNNNNNNN`` above the BMP). In
    a request body, which is JSON, the ``\\u`` form is a JSON escape of the same
    character, so the line shown still decodes to what was sent.
    """
    if text.isprintable():  # none of those categories: the common case, at C speed
        return text
    import unicodedata

    return "".join(_escape(char) if unicodedata.category(char) in _UNPRINTABLE else char
                   for char in text)


_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _say(text: str = "", *, start: str = "", end: str = "\n", flush: bool = False) -> None:
    """Print one line for the user, made ``printable``: every line of output comes here.
    ``start`` and ``end`` are this module's own control characters, left as they are."""
    _write(start + printable(text) + end, flush=flush)


def _say_json(value: Any, indent: Optional[int] = None) -> None:
    """Print ``value`` as JSON, which needs no ``printable``: ``ensure_ascii`` escapes every
    character outside printable ASCII (DEL too), and the line breaks of ``indent`` are ours."""
    _write(json.dumps(value, indent=indent, ensure_ascii=True) + "\n")


def _write(text: str, *, flush: bool = False) -> None:
    """Write to stdout, where a broken pipe becomes ``_OutputGone``: raised only from here,
    it can only mean that stdout's reader went away, never a socket's."""
    try:
        sys.stdout.write(text)
        if flush:
            sys.stdout.flush()
    except BrokenPipeError:
        raise _OutputGone from None


def _discard_stdout() -> None:
    """Point stdout's descriptor at the null device, so that the interpreter's last flush
    of what is still buffered succeeds rather than print a second broken-pipe error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (replaced, or closed)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


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
        ("status", _status, "whether telemetry is on, which source decided, what is waiting"),
        ("enable", _enable, "allow telemetry again (an environment opt-out still wins)"),
        ("disable", _disable, "turn telemetry off for every program that uses kaibantrace, and "
         "delete what is waiting to be sent"),
        ("reset", _reset, "forget the saved choice, the first-run notice and the local secret"),
        ("log", _log, "show the last requests actually sent from this machine, exactly as sent"),
        ("project-id", _project_id, "show this project's ID and the value that would be sent"),
        ("flush", _flush, "send what is waiting now"),
        ("deliver", _deliver, "send what is waiting, in the background way: one at a time per "
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


def _decision(telemetry: Telemetry, args: argparse.Namespace) -> Decision:
    """The decision for the app asked about (``--app``), else for the program's own."""
    if args.app is not None:
        return decide(telemetry.settings.replace(app_id=args.app), os.environ)
    return telemetry.decision()


def _app_of(telemetry: Telemetry, args: argparse.Namespace, decision: Decision) -> Optional[str]:
    if args.app is not None:
        return str(args.app)
    return decision.app_id or telemetry._app_id_even_if_off()


def _describe(decided_by: str, args: argparse.Namespace) -> str:
    known = SOURCES.get(decided_by)
    return known.format(prog=args.prog) if known else f"the {decided_by} environment variable"


# -- the commands ------------------------------------------------------------------

def _status(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    decision = _decision(telemetry, args)
    app_id = _app_of(telemetry, args, decision)
    directory = state_dir()
    apps = [app_id] if app_id else _outbox.apps_with_outbox(directory)
    counts = {app: _outbox.waiting(directory, app) for app in apps}
    pending = sum(n for n in counts.values() if n is not None)
    last = _sentlog.last_sent()
    delivering = {app: pid for app in apps if (pid := _handoff.running(directory, app)) is not None}
    endpoint = ingest_url(telemetry.settings, os.environ)
    settings = telemetry.settings if args.app is None else telemetry.settings.replace(app_id=args.app)
    # The ``kaibantrace`` command itself speaks for every program on the machine, whose
    # app IDs are their own; a client handed over by a program is that program.
    any_app = app_id is None and args.client_given is False
    blocked = why_nothing_is_sent(settings, decision, os.environ, any_app=any_app)
    result = {
        "enabled": decision.enabled,
        "decided_by": decision.decided_by,
        "debug": decision.debug,
        "can_send": blocked is None,
        "cannot_send_because": blocked,
        "endpoint": endpoint,
        "app_id": app_id,
        "profile": decision.profile,
        "saved_preference": _prefs.saved_choice(),
        "ci": in_ci(os.environ),
        "state_dir": directory,
        "config_dir": config_dir(),
        "pending": pending,
        "pending_by_app": counts,
        "last_sent": last,
        "delivery_process": delivering or None,
        "delivery_runs": sum(len(_outbox.delivery_runs(directory, app)) for app in apps),
    }
    if not args.json:
        if not decision.enabled:
            _say("Telemetry is off.")
        elif blocked is not None:
            _say(f"Telemetry is on, but nothing can be sent: {blocked}.")
        else:
            _say("Telemetry is on.")
        _say(f"  decided by:  {_describe(decision.decided_by, args)}")
        _say(f"  app:         {app_id or '(none configured)'}")
        _say(f"  endpoint:    {endpoint or '(none usable)'}")
        _say(f"  profile:     {decision.profile}")
        _say(f"  waiting:     {pending} signal(s) in the outbox")
        _say(f"  last sent:   {last or 'never (from this machine)'}")
        for app, pid in delivering.items():
            shown = f"process {pid}" if pid else "a process"
            _say(f"  delivering:  {shown} is sending what waits"
                  + (f" for app {app}" if len(apps) > 1 else ""))
        _say(f"  state dir:   {directory}")
        _say(f"  config dir:  {config_dir()}")
        if in_ci(os.environ):
            _say("  CI:          yes (no notice, no files that identify this machine)")
    return result


def _enable(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    _save(_prefs.ENABLED)
    decision = telemetry.decision()
    if not args.json:
        if decision.enabled:
            _say(f"Telemetry is enabled. Turn it off again with `{args.prog} disable`.")
        else:
            _say(f"Saved. Telemetry stays off, though: {_describe(decision.decided_by, args)} "
                  "still says so, and an opt-out always wins.")
    return {"ok": True, "saved": _prefs.ENABLED, "enabled": decision.enabled,
            "decided_by": decision.decided_by}


def _disable(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    _save(_prefs.DISABLED)
    directory = state_dir()
    removed = 0
    for app in _outbox.apps_with_outbox(directory):
        removed += _outbox.waiting(directory, app) or 0
        _outbox.purge(directory, app)
    if not args.json:
        _say("Telemetry is disabled for every program that uses kaibantrace on this machine.")
        _say(f"Deleted {removed} signal(s) that were waiting to be sent. "
              f"`{args.prog} enable` turns it back on.")
    return {"ok": True, "saved": _prefs.DISABLED, "enabled": False, "deleted": removed}


def _save(choice: str) -> None:
    try:
        _prefs.save_choice(choice)
    except OSError as exc:
        raise Failure(f"could not save your choice in {config_dir()}: {exc.strerror or exc}") from None


def _reset(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    try:
        removed = _prefs.reset()
    except OSError as exc:
        raise Failure(str(exc)) from None
    decision = telemetry.decision()
    if not args.json:
        if removed:
            _say(f"Forgot {', '.join(removed)}: the saved choice, the first-run notices, the "
                  "install markers and the local secret, whichever existed.")
            _say("A new secret is made at the next CLI event; the notice shows again on a "
                  "terminal.")
        else:
            _say("Nothing to forget: no saved choice, notice or install marker, or local secret.")
        state = "on" if decision.enabled else "off"
        _say(f"Telemetry is now {state} ({_describe(decision.decided_by, args)}).")
    return {"ok": True, "removed": removed, "enabled": decision.enabled,
            "decided_by": decision.decided_by}


def _log(telemetry: Telemetry, args: argparse.Namespace) -> Any:
    records = _sentlog.read()
    if args.app:
        records = [r for r in records if canonical_app_id(r.get("app_id")) == args.app]
    shown = records[-args.limit:] if args.limit else []
    if not args.json:
        if not shown:
            _say("Nothing has been sent from this machine (or the log was cleared).")
        for record in shown:
            _say(f"{record.get('sent_at')}  {record.get('signals')} signal(s) for app "
                  f"{record.get('app_id')} to {record.get('url')}")
            _say(f"  {record['body']}")
    return shown


def _project_id(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    decision = _decision(telemetry, args)
    settings = telemetry.settings
    identifier = project_id()
    keyed = keyed_with_local_secret(settings)
    sent: Optional[str] = None
    why_none = "nothing: telemetry is off"
    if not decision.enabled:
        pass
    elif not keyed:
        sent = hash_user(identifier, settings.salt)
    elif in_ci(os.environ):  # a fresh secret in memory for each run: nothing to show
        why_none = "a different value on every run (in CI the secret is never saved)"
    else:  # the saved secret, read, never made here
        secret = _prefs.existing_secret()
        if secret is not None:
            sent = hash_user(keyed_identity(identifier, secret), settings.salt)
        else:
            why_none = "not known yet: this machine's secret is made at the first send"
    if not args.json:
        _say(f"project ID:  {identifier}  (KaibanJS's formula; never sent)")
        if sent is not None:
            how = "keyed with this machine's secret, then hashed" if keyed else "hashed"
            _say(f"sent as:     {sent}  ({how})")
        else:
            _say(f"sent as:     {why_none}")
    return {"project_id": identifier, "sent_as": sent, "keyed_with_local_secret": keyed,
            "enabled": decision.enabled}


def _flush(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    from .._client.client import Telemetry as Client

    decision = _decision(telemetry, args)
    if not decision.enabled:
        raise Failure(f"telemetry is off ({_describe(decision.decided_by, args)}); nothing is sent")
    if decision.debug:
        raise Failure("debug mode is on (KAIBAN_TELEMETRY_DEBUG): signals are printed, "
                      "never sent")
    app_ids = ([_app_of(telemetry, args, decision)] if (args.app or decision.app_id)
               else _outbox.apps_with_outbox(state_dir()))
    totals = {"sent": 0, "left": 0}
    dropped = 0
    problems: List[str] = []
    for app in filter(None, app_ids):
        assert app is not None
        waiting = _outbox.waiting(state_dir(), app) or 0
        if waiting == 0:
            continue
        s = telemetry.settings
        # The author's own transport and timeout: the same way out as every send.
        client = Client(app_id=app, endpoint=s.endpoint, namespace=s.namespace, salt=s.salt,
                        opt_out_env=s.opt_out_env, profile=s.profile, timeout=s.timeout,
                        backoff=s.backoff, transport=telemetry._transport)
        sent, left, lost, problem = _drain(client, waiting, args)
        totals["sent"] += sent
        totals["left"] += left
        dropped += lost
        if problem:
            problems.append(problem)
    if not args.json:
        _say(f"Sent {totals['sent']} signal(s); {totals['left']} still waiting.")
    reason = f" ({problems[0]})" if problems else ""
    if dropped:
        raise Failure(f"{dropped} signal(s) could not be sent and were dropped{reason}"
                      + (f"; {totals['left']} wait for a later run" if totals["left"] else ""))
    if totals["left"]:
        raise Failure(f"{totals['left']} signal(s) could not be sent{reason}; they wait for a "
                      "later run")
    return {"ok": True, **totals}


def _deliver(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    s = telemetry.settings
    decision = _decision(telemetry, args)
    app = _app_of(telemetry, args, decision)
    if app is None:
        raise Failure("no app ID: give --app or set KAIBAN_TELEMETRY_APP_ID")
    try:
        settings = s.replace(app_id=app, endpoint=args.endpoint, opt_out_env=args.opt_out_env,
                             profile=args.profile)
    except ValueError as exc:  # ConfigurationError: say what is wrong, in one line
        raise Failure(str(exc).removeprefix("kaibantrace: ")) from None
    url = ingest_url(settings, os.environ)
    if url is None:
        raise Failure("the endpoint is not usable")
    done = _handoff.deliver(app, url, opt_out_env=settings.opt_out_env, profile=settings.profile,
                            timeout=args.timeout or s.timeout, backoff=args.backoff or s.backoff,
                            bound=args.max_time, lock_fd=args.lock_fd)
    if not args.json:
        _say(f"Sent {done.sent} signal(s); {done.left} still waiting"
              + (f" ({done.problem})." if done.problem else "."))
    return {"ok": not done.problem, "sent": done.sent, "left": done.left, "problem": done.problem or None}


def _drain(client: Telemetry, waiting: int, args: argparse.Namespace) -> Tuple[int, int, int, str]:
    """Start the client's sender and wait until its outbox is empty or it gives up."""
    client._route()  # starts the sender, which sends what waits in the outbox
    sender = client._sender
    if sender is None:
        return 0, waiting, 0, "no sender could start"
    sender.ignore_shared_backoff = True  # the user asked: one try now, whoever failed before
    sender.poke()
    show = not args.json and sys.stdout.isatty()
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            stats = client.stats()
            left = int(stats["in_outbox"])  # type: ignore[call-overload]
            if show:
                _say(f"Sending for app {client.settings.app_id}: {stats['sent']} of {waiting}",
                     start="\r", end="", flush=True)
            if sender.passes and (left == 0 or sender.circuit_open):
                break
            time.sleep(0.05)
    finally:
        if show:
            _say()
        client.shutdown(timeout=1.0)
    sent = int(client.stats()["sent"])  # type: ignore[call-overload]  # after the last send
    # What is left is read, not computed: a delivery process may have sent some meanwhile.
    still = _outbox.waiting(state_dir(), str(client.settings.app_id))
    dropped = sum(client.stats()["dropped"].values())  # type: ignore[attr-defined]  # 410, refused
    left = waiting - sent - dropped if still is None else still
    return sent, left, dropped, sender.last_problem
