"""An event's payload: the snapshot taken at the call, the cleaning before it is sent,
and the 4 KiB limit.

The calling thread keeps a snapshot of each payload (``snapshot_payload``), so
the queue holds what will be sent, as it was at the call, and never more than
that; the writer thread then cleans it (``clean_payload``): flat text values, with
bad, reserved and personal fields dropped, and the whole payload dropped when
over ``MAX_PAYLOAD_BYTES`` encoded. The small objects that stand in the queue
for a payload or a value already known to be refused or clean
(``PayloadRefused``, ``Unsendable``, ``PayloadFailed``, ``CleanPayload``) are
defined here too: the calling thread makes them and ``clean_payload`` reads them.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Mapping, Tuple

from .checks import Reporter
from .jstext import compact_json, field_text, is_date
from .privacy import credential_key, personal_data_kind

MAX_PAYLOAD_BYTES = 4096
RESERVED_KEYS = frozenset({"type", "clientUser", "appID", "sessionID", "floatValue", "platform"})


class PayloadFailed:
    """Stands for a payload whose callable raised; the event goes without a payload."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class PayloadRefused:
    """Stands for a payload the caller's thread already knows cannot be sent: not a mapping
    (``cause`` "payload_type", ``detail`` its type), certainly over 4 KiB ("size"), or
    failing when read ("unreadable", ``detail`` the exception). Only this small object
    waits in the queue; the writer thread reports it as it would the payload, once per cause, and
    sends the event without payload."""

    __slots__ = ("cause", "detail")

    def __init__(self, cause: str, detail: str = "") -> None:
        self.cause = cause
        self.detail = detail


class Unsendable:
    """Stands for a payload value found unsendable at the call (a set, an object, a nested
    list, bytes, a path): the field is dropped on the writer thread, whose warning names the
    value's type and why it is refused."""

    __slots__ = ("kind", "privacy", "why")

    def __init__(self, kind: str, why: str = "", privacy: bool = False) -> None:
        self.kind = kind
        self.why = why
        self.privacy = privacy


OVERSIZED = PayloadRefused("size")


class CleanPayload(Dict[str, str]):
    """A payload already cleaned (a decorator's static payload): encoding reuses it as is."""


def _why_unsendable(value: Any) -> Tuple[str, bool]:
    """Why a payload value is refused, said so the author can act on it; and whether
    the reason is privacy (a ``PrivacyError`` in strict mode)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes have no one text form: decode them (and look at what they hold) first", False
    if hasattr(type(value), "__fspath__"):
        return "a path names the user's files and folders, which is personal data", True
    uuid = sys.modules.get("uuid")
    if uuid is not None and isinstance(value, uuid.UUID):
        return ("a UUID identifies one thing, person or run; send it as clientUser or "
                "not at all"), True
    return ("only text, numbers, booleans, dates, enum members and flat lists or mappings "
            "of them can be sent"), False


def refuse(name: str, refused: PayloadRefused, reporter: Reporter, strict: bool) -> None:
    """Report a payload sent without its fields: the same words whether the caller's
    thread found the problem (``snapshot_payload``) or the writer thread did."""
    cause, detail = refused.cause, refused.detail
    if cause == "size":
        message = f"payload of {name!r} is over {MAX_PAYLOAD_BYTES} bytes encoded"
    elif cause == "payload_type":
        message = f"payload of {name!r} must be a mapping, not {detail}"
    else:
        message = f"payload of {name!r} could not be read ({detail})"
    reporter.problem(cause, name, "", message + "; sent without payload", strict=strict)


def clean_payload(name: str, payload: Any, reporter: Reporter, strict: bool) -> Dict[str, str]:
    """Flat text payload with bad, reserved and personal fields dropped."""
    if payload is None:
        return {}
    if type(payload) is CleanPayload:
        return payload
    if isinstance(payload, PayloadFailed):
        reporter.problem("payload_callable", name, payload.error, f"payload callable of {name!r} "
                         f"raised {payload.error}; sent without payload", strict=strict)
        return {}
    if isinstance(payload, PayloadRefused):
        refuse(name, payload, reporter, strict)
        return {}
    if not isinstance(payload, Mapping):
        refuse(name, PayloadRefused("payload_type", type(payload).__name__), reporter, strict)
        return {}
    result: Dict[str, str] = {}
    for key, value in payload.items():
        if not isinstance(key, str) or not key:
            reporter.problem("key_type", name, repr(type(key)), f"payload of {name!r} has a key "
                             "that is not a non-empty string; field dropped", strict=strict)
            continue
        if key in RESERVED_KEYS or key.lower().startswith("telemetrydeck."):
            reporter.problem("reserved", name, key, f"payload key {key!r} of {name!r} is reserved "
                             "by TelemetryDeck; field dropped", strict=strict)
            continue
        if value is None:
            continue
        text = None if type(value) is Unsendable else field_text(value)
        if text is None:
            if type(value) is Unsendable:
                shown, why, privacy = value.kind, value.why, value.privacy
            else:
                shown = type(value).__name__
                why, privacy = _why_unsendable(value)
            reporter.problem("value_type", name, key, f"payload field {key!r} of {name!r} is a "
                             f"{shown}; {why}; field dropped", strict=strict, privacy=privacy)
            continue
        if not (key.isascii() and text.isascii()) and not _is_utf8(key, text):
            reporter.problem("encoding", name, "", f"a payload field of {name!r} holds text "
                             "that is not valid Unicode (a lone surrogate); field dropped",
                             strict=strict)
            continue
        kind = personal_data_kind(key) or personal_data_kind(text) or (
            credential_key(key) if text else None)
        if kind is not None:
            reporter.problem("privacy", name, key, f"payload field {key!r} of {name!r} looks like "
                             f"{kind}; field dropped", strict=strict, privacy=True)
            continue
        result[key] = text
    if result and encoded_size(result) > MAX_PAYLOAD_BYTES:
        refuse(name, OVERSIZED, reporter, strict)
        return {}
    return result


def _is_utf8(*texts: str) -> bool:
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encoded_size(fields: Dict[str, str]) -> int:
    """Bytes of ``fields`` as compact JSON, or a bound above them when that is clearly small.

    No character takes more than 6 bytes in JSON (``\\u001f``), so most
    payloads are known to fit without encoding them twice.
    """
    bound = 2 + sum(6 * (len(key) + len(value)) + 6 for key, value in fields.items())
    if bound <= MAX_PAYLOAD_BYTES:
        return bound
    return len(compact_json(fields).encode("utf-8"))


def snapshot_payload(payload: Any, *, refuse_oversized: bool = True) -> Any:
    """What a raw event keeps of ``payload``: what will be sent, as it is at the call.

    Runs on the caller's thread for every event with a payload, so it does the
    least that makes the queue safe to hold: the writer thread encodes later, and by
    then the caller may have changed a list it passed, or the queue may hold
    thousands of payloads too big to send. So:

    * text, numbers, booleans, ``None`` and dates are kept as they are: they
      cannot change, and their text is made on the writer thread as before (an int
      too long to send is kept too: checking every int would cost every call);
    * anything else (lists, tuples, mappings, objects) is turned now into the
      text that will be sent, or into ``Unsendable`` when it cannot be;
    * a payload that certainly cannot fit in ``MAX_PAYLOAD_BYTES`` becomes one
      shared ``PayloadRefused``: counting the characters of its values costs
      next to nothing and every character takes at least a byte, so only a
      payload whose values alone are over the bound pays for a closer look
      (``_least_size``), and none is kept in memory;
    * a payload that is not a mapping, or that fails when read, becomes a
      ``PayloadRefused`` naming why.

    The writer thread's checks (names, reserved keys, privacy, the exact size) stay
    where they were, and report what this found in the same words.
    ``refuse_oversized=False`` is for events encoded at the call anyway
    (strict mode, a capture): their exact checks then report a payload's
    problems in their usual order, a privacy problem before its size.
    """
    if type(payload) is not dict:  # a plain dict is by far the most common: one test
        if payload is None or isinstance(payload, (CleanPayload, PayloadFailed, PayloadRefused)):
            return payload
        if not isinstance(payload, Mapping):
            return PayloadRefused("payload_type", type(payload).__name__)
    chars = 0  # of the values' text: keys come from the program's code, values carry its data
    try:
        fields = dict(payload)
        for value in fields.values():
            if type(value) is str:
                chars += len(value)
            elif type(value) not in _IMMUTABLE and not is_date(value):
                chars = _freeze(fields)  # a container: start again, slower
                break
    except Exception as exc:  # a mapping of the caller's own that fails when read
        return PayloadRefused("unreadable", type(exc).__name__)
    if chars > _MOST_VALUE_CHARS and refuse_oversized and _least_size(fields) > MAX_PAYLOAD_BYTES:
        return OVERSIZED
    return fields


def _freeze(fields: Dict[Any, Any]) -> int:
    """Replace each value that could change by its text, or by ``Unsendable``; the
    characters of all the values' text."""
    chars = 0
    for key, value in fields.items():  # replacing a value does not disturb the iteration
        kind = type(value)
        if kind is str:
            chars += len(value)
        elif kind not in _IMMUTABLE and not is_date(value):
            text = field_text(value)
            if text is None:
                fields[key] = Unsendable(kind.__name__, *_why_unsendable(value))
            else:
                fields[key] = text
                chars += len(text)
    return chars


# Kept in a snapshot as they are, like text (tested before these) and dates: they cannot
# change, and their text is short.
_IMMUTABLE = frozenset({int, float, bool, type(None)})
# Characters of value text that fit in ``MAX_PAYLOAD_BYTES`` at most: one field, ``{"k":"..."}``.
_MOST_VALUE_CHARS = MAX_PAYLOAD_BYTES - len('{"k":""}')


def _least_size(fields: Dict[Any, Any]) -> int:
    """The fewest bytes the fields that ``clean_payload`` would keep can take as JSON.

    Fields it drops for their key, their type or invalid Unicode do not count;
    what it drops as personal data cannot be known without its checks, so such a
    field counts, and a payload made too big by one is refused as too big.
    Every kept value is text of at least one character, and ``{"k":"v"}`` adds
    six characters per field, less a comma, to the key and the value.
    """
    total = 1
    for key, value in fields.items():
        if (not isinstance(key, str) or not key or key in RESERVED_KEYS
                or key.lower().startswith("telemetrydeck.")):
            continue
        if isinstance(value, str):
            if not (key.isascii() and value.isascii()) and not _is_utf8(key, value):
                continue
            total += len(key) + len(value) + 6
        elif value is not None and type(value) is not Unsendable:
            total += len(key) + 7
    return total
