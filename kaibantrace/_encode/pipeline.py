"""From a raw event to a TelemetryDeck signal, in plain steps.

The calling thread only records a raw event (name, payload, session,
identifier, time), with a snapshot of the payload taken by ``snapshot_payload``
(``payload.py``: so the queue holds what will be sent, as it was at the call,
and never more than that); everything else runs later on the sender's thread,
or at the call in strict mode so that a test fails where the mistake is. The
steps, top to bottom, are in ``build_signal``:

1. check the name (decorators checked theirs already; ``emit`` did not);
2. turn the payload into flat text values as TelemetryDeck's JavaScript SDK does;
3. drop fields that use reserved keys or look like personal data;
4. drop the payload if it is over 4 KiB encoded;
5. hash the identity and assemble the wire object.

Steps 2 to 4 are ``clean_payload`` (``payload.py``), the text it makes is
``jstext.py``'s, and the name and ``float_value`` checks and the ``Reporter``
are ``checks.py``'s; this module strings them together and writes the JSON.
A field problem drops that field, and a ``float_value`` that is not a finite
number is left out; a name problem drops the event. Each is logged once per
cause at WARNING, or raised in strict mode.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

from .._errors import DropEvent, EventError
from .._fork import guard as fork_guard
from .._version import __version__
from .checks import FloatRefused, FloatValue, Reporter, float_value_of, name_problem
from .identity import Session, hash_user, keyed_identity, process_identity
from .jstext import compact_json, js_text, received_at
from .outcome import ERROR_SIGNAL, Failure, Measured
from .payload import (
    MAX_PAYLOAD_BYTES,
    OVERSIZED,
    CleanPayload,
    PayloadFailed,
    PayloadRefused,
    Unsendable,
    clean_payload,
    encoded_size,
    refuse,
    snapshot_payload,
)
from .privacy import personal_data_kind

# This module's own names, then those it imports that code outside ``_encode``
# (the client, configuration, delivery, tests) imports from here: they lived here
# before the payload, checks and text moved to modules of their own.
__all__ = [
    "CLIENT_VERSION",
    "MAX_PAYLOAD_BYTES",
    "CleanPayload",
    "DropEvent",
    "EncodeContext",
    "FloatValue",
    "PayloadFailed",
    "PayloadRefused",
    "RawEvent",
    "Reporter",
    "Unsendable",
    "build_signal",
    "clean_payload",
    "default_parameters",
    "encode_body",
    "encode_event",
    "encode_signal",
    "float_value_of",
    "js_text",
    "name_problem",
    "received_at",
    "snapshot_payload",
]

CLIENT_VERSION = f"kaibantrace {__version__}"

# A raw event, as the calling thread records it. A plain tuple, because making
# it is the only per-event allocation on the caller's side.
#   (name, payload, session, identifier or None, unix time, float value or None)
RawEvent = Tuple[str, Any, Session, Optional[str], float, FloatValue]


class EncodeContext:
    """What encoding needs from the client's settings, fixed for one batch.

    ``secret`` gives the local secret that CLI identities are keyed with
    before hashing (``None``: KaibanJS's plain identities); it is called only
    when an event has such an identity, so library-only use never makes one.
    ``defaults`` are the coarse default parameters, when the author asked.
    ``cli_app_id`` is where events with a CLI identity go, when not ``app_id``.
    """

    __slots__ = ("app_id", "cli_app_id", "defaults", "reporter", "salt", "secret", "strict",
                 "test_mode")

    def __init__(self, app_id: str, salt: str, test_mode: bool, strict: bool,
                 reporter: Reporter, secret: Optional[Callable[[], bytes]] = None,
                 defaults: Optional[Dict[str, str]] = None,
                 cli_app_id: Optional[str] = None) -> None:
        self.app_id = app_id
        self.cli_app_id = cli_app_id
        self.salt = salt
        self.test_mode = test_mode
        self.strict = strict
        self.reporter = reporter
        self.secret = secret
        self.defaults = defaults


def default_parameters(ci: bool) -> Dict[str, str]:
    """The coarse, non-personal facts ``default_parameters=True`` adds to every payload."""
    if "platform" not in sys.modules:
        # Deferred, so that only authors who ask for these pay for the import; and
        # imported under the fork guard, as the writer may be the one importing it: a
        # fork in the middle would leave a child's ``import platform`` waiting forever.
        with fork_guard("setup"):
            __import__("platform")
    system = sys.modules["platform"].system()
    family = {"Linux": "linux", "Darwin": "macos", "Windows": "windows"}.get(system, "other")
    return {
        "kaibantrace.version": __version__,
        "kaibantrace.python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "kaibantrace.os": family,
        "kaibantrace.ci": "true" if ci else "false",
    }


_known_good_names: set[str] = set()
_TIMED = (Measured, Failure)


def _check_runtime_name(name: object, ctx: EncodeContext) -> None:
    """Refuse a bad or personal event name (``emit`` names are only checked here)."""
    problem = name_problem(name)
    if problem is not None:
        shown = repr(name)[:60] if isinstance(name, str) else type(name).__name__
        ctx.reporter.problem("name", shown, "", f"event name {shown} {problem}; event dropped",
                             strict=ctx.strict)
        raise DropEvent("invalid_name", f"event name {problem}")
    assert isinstance(name, str)
    kind = personal_data_kind(name)
    if kind is not None:
        ctx.reporter.problem("name_privacy", kind, "", f"an event name looks like {kind}; event "
                             "dropped (the name is not logged)", strict=ctx.strict, privacy=True)
        raise DropEvent("privacy", "event name looks like personal data")
    if len(_known_good_names) < 4096:
        _known_good_names.add(name)


T = TypeVar("T")


def build_signal(raw: RawEvent, ctx: EncodeContext) -> Dict[str, Any]:
    """The TelemetryDeck signal for ``raw``; raises ``DropEvent`` to refuse it.

    Nothing else escapes, outside strict mode's ``EventError``: an unexpected
    failure on odd input refuses that one event, never its whole batch.
    """
    return _refusing_failures(_build, raw, ctx)


def encode_event(raw: RawEvent, ctx: EncodeContext) -> str:
    """``encode_signal(build_signal(raw, ctx))``, the same text to the byte, faster.

    Runs on the writer thread for every event, so it avoids the dictionary and the
    encoder pass; ``tests/test_pipeline.py`` checks it against the plain way.
    """
    return _refusing_failures(_encode, raw, ctx)


def _refusing_failures(step: Callable[[RawEvent, EncodeContext], T], raw: RawEvent,
                       ctx: EncodeContext) -> T:
    try:
        return step(raw, ctx)
    except (DropEvent, EventError):
        raise
    except Exception as exc:
        cause = type(exc).__name__
        ctx.reporter.problem("internal", cause, "", f"could not encode an event ({cause}); "
                             "event dropped", strict=False)
        raise DropEvent("encode_error", cause) from None


def _identify(raw: RawEvent, ctx: EncodeContext) -> Tuple[str, str, str]:
    """Check the event's name; the app it is for, its session ID and the hashed user it
    is sent as: the project for a CLI event, else the process (never the session, which
    is sent)."""
    name, payload, session, identifier, _, _ = raw
    if not (isinstance(name, str) and name in _known_good_names) and not (
            type(payload) is Failure and name == ERROR_SIGNAL):  # ours: the one reserved name sent
        _check_runtime_name(name, ctx)
    session_id = session.id
    if identifier is None:
        return ctx.app_id, session_id, hash_user(process_identity(), ctx.salt)
    if ctx.secret is not None:
        identifier = keyed_identity(identifier, ctx.secret())
    return ctx.cli_app_id or ctx.app_id, session_id, hash_user(identifier, ctx.salt)


def _fields(name: str, payload: Any, ctx: EncodeContext) -> Dict[str, str]:
    ours = None
    if type(payload) in _TIMED:  # a duration or an error: kaibantrace's fields, then the author's
        ours = payload.fields()
        payload = payload.payload
    elif payload is None and not ctx.defaults:
        return {}
    fields = clean_payload(name, payload, ctx.reporter, ctx.strict)
    if ctx.defaults:
        merged = {**ctx.defaults, **fields}
        if fields and encoded_size(merged) > MAX_PAYLOAD_BYTES:  # each fits, not both
            refuse(name, OVERSIZED, ctx.reporter, ctx.strict)
            merged = dict(ctx.defaults)
        fields = merged
    return {**fields, **ours} if ours else fields


def _build(raw: RawEvent, ctx: EncodeContext) -> Dict[str, Any]:
    name, payload, _, _, timestamp, float_value = raw
    app_id, session_id, user = _identify(raw, ctx)
    signal: Dict[str, Any] = {
        "appID": app_id,
        "clientUser": user,
        "sessionID": session_id,
        "type": name,
        "telemetryClientVersion": CLIENT_VERSION,
        "receivedAt": received_at(timestamp),
    }
    fields = _fields(name, payload, ctx)
    if fields:
        signal["payload"] = fields
    if type(float_value) is FloatRefused:
        _report_float(name, float_value, ctx)
    elif float_value is not None:
        signal["floatValue"] = float_value
    if ctx.test_mode:
        signal["isTestMode"] = True
    return signal


def _report_float(name: str, refused: FloatRefused, ctx: EncodeContext) -> None:
    shown = refused.shown
    what = f"a {shown}" if refused.cause == "float_value_type" else shown
    ctx.reporter.problem(refused.cause, name, "", f"float_value of {name!r} must be a finite "
                         f"number, not {what}; sent without floatValue", strict=ctx.strict)


# The JSON text every signal of one (app, user, session, name) starts with, up to
# the value of ``receivedAt``: made once with the JSON encoder, then reused, so an
# event costs a few string joins instead of an encoder run over the whole signal.
_heads: Dict[Tuple[str, str, str, str], str] = {}
_MAX_HEADS = 1024


def _encode(raw: RawEvent, ctx: EncodeContext) -> str:
    name, payload, _, _, timestamp, float_value = raw
    app_id, session_id, user = _identify(raw, ctx)
    key = (app_id, user, session_id, name)
    head = _heads.get(key)
    if head is None:
        if len(_heads) >= _MAX_HEADS:
            _heads.clear()
        head = _heads[key] = compact_json({
            "appID": app_id, "clientUser": user, "sessionID": session_id, "type": name,
            "telemetryClientVersion": CLIENT_VERSION})[:-1] + ',"receivedAt":"'
    text = head + received_at(timestamp) + '"'
    fields = _fields(name, payload, ctx)
    if fields:
        text += ',"payload":' + compact_json(fields)
    if type(float_value) is FloatRefused:
        _report_float(name, float_value, ctx)
    elif float_value is not None:
        text += ',"floatValue":' + compact_json(float_value)
    if ctx.test_mode:
        text += ',"isTestMode":true'
    return text + "}"



def encode_signal(signal: Dict[str, Any]) -> str:
    """One signal as compact JSON text, as stored in the outbox and sent in a body."""
    return compact_json(signal)


def encode_body(signals: list[Dict[str, Any]]) -> bytes:
    """The request body: always a JSON array, UTF-8."""
    return compact_json(signals).encode("utf-8")
