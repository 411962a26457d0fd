"""What every ``kaibantrace`` command shares: how it prints, how it fails, which app it means.

Neither output ever carries a control or format character from a payload, a
file or the environment: text goes through ``printable``, JSON is ASCII-only.
A broken pipe on stdout becomes ``OutputGone``, which ``command_line`` turns
into a quiet exit (``_cli.command``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Optional

from .._policy.config import Decision, decide

if TYPE_CHECKING:
    from .._client.client import Telemetry

SOURCES = {
    "code": "the program's own code (opt_out=True)",
    "DO_NOT_TRACK": "the DO_NOT_TRACK environment variable",
    "saved preference": "your saved choice (`{prog} disable`)",
    "retired endpoint": "the ingest endpoint, which answered 410 Gone and is retired",
    "default": "the default, as no one opted out",
    # In a browser page (Pyodide): the page's variable, and the browser's own settings.
    "globalThis.KAIBAN_TELEMETRY_OPT_OUT": "the page's KAIBAN_TELEMETRY_OPT_OUT variable",
    "navigator.doNotTrack": "the browser's Do Not Track setting",
    "navigator.globalPrivacyControl": "the browser's Global Privacy Control setting",
}


class Failure(Exception):
    """A command that could not do its job; the message is the one-line reason."""


class OutputGone(Exception):
    """Writing to stdout met a broken pipe: no one reads what the command says any more."""


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


def say(text: str = "", *, start: str = "", end: str = "\n", flush: bool = False) -> None:
    """Print one line for the user, made ``printable``: every line of output comes here.
    ``start`` and ``end`` are this module's own control characters, left as they are."""
    write(start + printable(text) + end, flush=flush)


def say_json(value: Any, indent: Optional[int] = None) -> None:
    """Print ``value`` as JSON, which needs no ``printable``: ``ensure_ascii`` escapes every
    character outside printable ASCII (DEL too), and the line breaks of ``indent`` are ours."""
    write(json.dumps(value, indent=indent, ensure_ascii=True) + "\n")


def write(text: str, *, flush: bool = False) -> None:
    """Write to stdout, where a broken pipe becomes ``OutputGone``: raised only from here,
    it can only mean that stdout's reader went away, never a socket's."""
    try:
        sys.stdout.write(text)
        if flush:
            sys.stdout.flush()
    except BrokenPipeError:
        raise OutputGone from None


def discard_stdout() -> None:
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


def decision_for(telemetry: Telemetry, args: argparse.Namespace) -> Decision:
    """The decision for the app asked about (``--app``), else for the program's own."""
    if args.app is not None:
        return decide(telemetry.settings.replace(app_id=args.app), os.environ)
    return telemetry.decision()


def app_of(telemetry: Telemetry, args: argparse.Namespace, decision: Decision) -> Optional[str]:
    if args.app is not None:
        return str(args.app)
    return decision.app_id or telemetry.app_id


def describe(decided_by: str, args: argparse.Namespace) -> str:
    known = SOURCES.get(decided_by)
    return known.format(prog=args.prog) if known else f"the {decided_by} environment variable"
