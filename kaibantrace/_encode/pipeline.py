"""From a raw event to a TelemetryDeck signal, in plain steps.

The calling thread only records a raw event (name, payload, session,
identifier, time), with a snapshot of the payload taken by ``snapshot_payload``
(so the queue holds what will be sent, as it was at the call, and never more
than that); everything else runs later on the sender's thread, or at the call
in strict mode so that a test fails where the mistake is. The steps, top to
bottom, are in ``build_signal``:

1. check the name (decorators checked theirs already; ``emit`` did not);
2. turn the payload into flat text values as TelemetryDeck's JavaScript SDK does;
3. drop fields that use reserved keys or look like personal data;
4. drop the payload if it is over 4 KiB encoded;
5. hash the identity and assemble the wire object.

A field problem drops that field, and a ``float_value`` that is not a finite
number is left out; a name problem drops the event. Each is logged once per
cause at WARNING, or raised in strict mode.
"""

from __future__ import annotations

import math
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar, Union

from .._errors import DropEvent, EventError, PrivacyError
from .._fork import guard as fork_guard
from .._log import logger
from .._version import __version__
from .identity import Session, hash_user, keyed_identity, process_identity
from .outcome import ERROR_SIGNAL, Failure, Measured
from .privacy import credential_key, personal_data_kind

if TYPE_CHECKING:
    import datetime

CLIENT_VERSION = f"kaibantrace {__version__}"
MAX_NAME_LENGTH = 128
MAX_PAYLOAD_BYTES = 4096
RESERVED_KEYS = frozenset({"type", "clientUser", "appID", "sessionID", "floatValue", "platform"})
_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


class FloatRefused:
    """Stands for a ``float_value`` that cannot be sent (not a number, NaN, infinite, or
    beyond a double): the event goes without ``floatValue``, and the step that encodes it
    reports why, once per cause, or raises in strict mode, as for a payload field."""

    __slots__ = ("cause", "shown")

    def __init__(self, cause: str, shown: str) -> None:
        self.cause = cause
        self.shown = shown


FloatValue = Optional[Union[float, FloatRefused]]

# A raw event, as the calling thread records it. A plain tuple, because making
# it is the only per-event allocation on the caller's side.
#   (name, payload, session, identifier or None, unix time, float value or None)
RawEvent = Tuple[str, Any, Session, Optional[str], float, FloatValue]

class PayloadFailed:
    """Stands for a payload whose callable raised; the event goes without a payload."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class PayloadRefused:
    """Stands for a payload the caller's thread already knows cannot be sent: not a mapping
    (``cause`` "payload_type", ``detail`` its type), certainly over 4 KiB ("size"), or
    failing when read ("unreadable", ``detail`` the exception). Only this small object
    waits in the queue; the worker reports it as it would the payload, once per cause, and
    sends the event without payload."""

    __slots__ = ("cause", "detail")

    def __init__(self, cause: str, detail: str = "") -> None:
        self.cause = cause
        self.detail = detail


class Unsendable:
    """Stands for a payload value found unsendable at the call (a set, an object, a nested
    list, bytes, a path): the field is dropped on the worker, whose warning names the
    value's type and why it is refused."""

    __slots__ = ("kind", "privacy", "why")

    def __init__(self, kind: str, why: str = "", privacy: bool = False) -> None:
        self.kind = kind
        self.why = why
        self.privacy = privacy


_OVERSIZED = PayloadRefused("size")


class CleanPayload(Dict[str, str]):
    """A payload already cleaned (a decorator's static payload): encoding reuses it as is."""


def name_problem(name: object) -> Optional[str]:
    """What is wrong with an event name, or ``None`` when it is valid."""
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}"
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters (it has {len(name)})"
    if _NAME.fullmatch(name) is None:
        return "may only contain letters, digits and the characters _ . : -"
    if name.lower().startswith("telemetrydeck."):
        return "must not start with the reserved prefix 'TelemetryDeck.'"
    return None


class Reporter:
    """Reports a problem: raises in strict mode, else logs a WARNING once per cause.

    With ``echo`` (debug mode) the warning is also printed on stderr, beside the
    signals debug mode prints there: a developer trying things out has rarely
    configured logging, and the ``kaibantrace`` logger is silent until they do.
    """

    _MAX_REMEMBERED = 1024

    def __init__(self, *, echo: bool = False) -> None:
        self._seen: set[Tuple[str, str, str]] = set()
        self._echo = echo

    def problem(self, cause: str, event: str, key: str, message: str, *, strict: bool,
                privacy: bool = False) -> None:
        if strict:
            raise (PrivacyError if privacy else EventError)(f"kaibantrace: {message}")
        marker = (cause, event, key)
        if marker not in self._seen and len(self._seen) < self._MAX_REMEMBERED:
            self._seen.add(marker)
            logger.warning("kaibantrace: %s", message)
            if self._echo:
                try:
                    sys.stderr.write(f"[kaibantrace debug] warning: {message}\n")
                except Exception:  # a closed or replaced stream: the log line stands
                    pass


def js_text(value: Any) -> str:
    """A payload value as text, the way TelemetryDeck's JavaScript SDK writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _js_number(value)
    if _is_date(value):
        return _iso(value)
    return str(value)


def _is_date(value: Any) -> bool:
    # A date or datetime exists only once ``datetime`` is imported: asking
    # ``sys.modules`` keeps this module from importing it for every program.
    module = sys.modules.get("datetime")
    return module is not None and isinstance(value, module.date)


def _js_number(value: float) -> str:
    """``Number.prototype.toString`` for a double: ``1.0`` → ``"1"``, ``1e21`` → ``"1e+21"``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "0"
    # repr() gives the shortest digits that round-trip, as JavaScript does:
    # "1.5e-07", "123.25", "1e+16". Read them as digits x 10^exponent.
    mantissa, _, power = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    exponent = int(power or 0) - len(fraction)
    significant = digits.rstrip("0")
    exponent += len(digits) - len(significant)
    digits = significant
    k, n = len(digits), len(digits) + exponent  # value = 0.digits * 10^n
    prefix = "-" if value < 0 else ""
    if k <= n <= 21:
        return prefix + digits + "0" * (n - k)
    if 0 < n <= 21:
        return prefix + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return prefix + "0." + "0" * -n + digits
    mantissa = digits[0] + ("." + digits[1:] if k > 1 else "")
    return f"{prefix}{mantissa}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"


def _iso(value: datetime.date) -> str:
    import datetime

    if isinstance(value, datetime.datetime):
        # A naive datetime is local time, as Python treats it everywhere else.
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return value.isoformat(timespec="milliseconds") + "Z"
    return value.isoformat()


_last_second: Tuple[int, str] = (-1, "")


def received_at(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds, as JavaScript's ``Date.toISOString``."""
    global _last_second
    seconds = int(timestamp)
    millis = int((timestamp - seconds) * 1000)
    last, prefix = _last_second  # events come in bursts: format each second once
    if last != seconds:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, prefix)
    return f"{prefix}.{millis:03d}Z"


_SCALARS = (str, int, float)
_PLAIN = frozenset({str, int, float, bool})


def _field_text(value: Any) -> Optional[str]:
    """Text for one payload value, or ``None`` when the value cannot be sent."""
    try:
        return _convert(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None  # e.g. an int too long to print, a date out of range


def _convert(value: Any) -> Optional[str]:
    if type(value) in _PLAIN:  # nearly every value: one test, before any other
        return js_text(value)
    enum = sys.modules.get("enum")
    if enum is not None and isinstance(value, enum.Enum):
        # By value, before the scalars: a member of a ``str`` or ``int`` enum would
        # otherwise be written as ``Color.RED`` on some Python versions.
        return _convert(value.value)
    if isinstance(value, _SCALARS) or _is_date(value):
        return js_text(value)
    number = _number_text(value)
    if number is not None:
        return number
    if isinstance(value, (list, tuple)):
        items = _js_json_items(value)
        return None if items is None else "[" + ",".join(items) + "]"
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        ordered = _js_key_order(value)
        texts = _js_json_items(v for _, v in ordered)
        if texts is None:
            return None
        return "{" + ",".join(f"{_compact_json(k)}:{text}"
                              for (k, _), text in zip(ordered, texts)) + "}"
    return None


def _js_json_items(values: Any) -> Optional[List[str]]:
    texts = []
    for value in values:
        text = _js_json_item(value)
        if text is None:
            return None
        texts.append(text)
    return texts


def _js_json_item(value: Any) -> Optional[str]:
    """One item of a flat list or mapping as ``JSON.stringify`` writes it (TelemetryDeck's
    SDK stringifies objects with it): numbers as JavaScript writes them, NaN and the
    infinities as ``null``, dates as ``toISOString``; ``None`` for a nested container or
    anything else that cannot be sent."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _compact_json(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return _js_number(value) if math.isfinite(value) else "null"
    if _is_date(value):
        return '"' + _iso(value) + '"'
    enum = sys.modules.get("enum")
    if enum is not None and isinstance(value, enum.Enum):
        return _js_json_item(value.value)  # by value, as a scalar member is sent
    if isinstance(value, str):
        return _compact_json(str(value))
    if isinstance(value, (int, float)):
        return _js_json_item(int(value) if isinstance(value, int) else float(value))
    return None


def _js_key_order(mapping: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    """The mapping's items in JavaScript's property order: keys that are array indices
    ("0", "7", "10"; not "01" or "-1") first, ascending, then the others as inserted."""
    indices = [(k, v) for k, v in mapping.items() if _is_array_index(k)]
    if not indices:
        return list(mapping.items())
    others = [(k, v) for k, v in mapping.items() if not _is_array_index(k)]
    return sorted(indices, key=lambda item: int(item[0])) + others


def _is_array_index(key: str) -> bool:
    return key.isascii() and key.isdigit() and (key == "0" or key[0] != "0") and int(
        key) < 4294967295


def _number_text(value: Any) -> Optional[str]:
    """Text for a ``Decimal``, a ``Fraction`` or another real number type (numpy's), or
    ``None`` for anything else.

    TelemetryDeck's JavaScript SDK only ever sees JavaScript numbers, which are
    doubles, so a number that is not whole is sent as the double nearest it is
    written by ``String(number)``: ``Decimal("1.10")`` → ``"1.1"``,
    ``Fraction(1, 3)`` → ``"0.3333333333333333"``, the same text as the equal
    ``float``, so one dashboard value is not split by the type that made it.
    Whole-number types (``numbers.Integral``) are written as ``int`` is, digit
    for digit. Their modules are looked up in ``sys.modules``, never imported:
    a value of a type exists only once its module was.
    """
    decimal = sys.modules.get("decimal")
    if decimal is not None and isinstance(value, decimal.Decimal):
        return _js_number(float(value))  # a signalling NaN raises ValueError: refused
    numbers = sys.modules.get("numbers")
    if numbers is None or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return _js_number(float(value))


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


def float_value_of(value: Any) -> FloatValue:
    """What a raw event keeps of ``emit``'s ``float_value``: a finite float, ``None`` when
    none was given, or ``FloatRefused`` saying why it cannot be sent."""
    if value is None:
        return None
    if type(value) is float:
        if value - value == 0:  # finite: NaN and infinities give NaN here
            return value
        return FloatRefused("float_value_range", _js_number(value))
    if isinstance(value, bool) or (not isinstance(value, (int, float))
                                   and _number_text(value) is None):
        return FloatRefused("float_value_type", type(value).__name__)
    try:
        number = float(value)
    except (OverflowError, ValueError, ArithmeticError):
        return FloatRefused("float_value_range", "a number beyond a double's range")
    return float_value_of(number)


def _report_float(name: str, refused: FloatRefused, ctx: EncodeContext) -> None:
    shown = refused.shown
    what = f"a {shown}" if refused.cause == "float_value_type" else shown
    ctx.reporter.problem(refused.cause, name, "", f"float_value of {name!r} must be a finite "
                         f"number, not {what}; sent without floatValue", strict=ctx.strict)


def _refuse(name: str, refused: PayloadRefused, reporter: Reporter, strict: bool) -> None:
    """Report a payload sent without its fields: the same words whether the caller's
    thread found the problem (``snapshot_payload``) or the worker did."""
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
        _refuse(name, payload, reporter, strict)
        return {}
    if not isinstance(payload, Mapping):
        _refuse(name, PayloadRefused("payload_type", type(payload).__name__), reporter, strict)
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
        text = None if type(value) is Unsendable else _field_text(value)
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
    if result and _encoded_size(result) > MAX_PAYLOAD_BYTES:
        _refuse(name, _OVERSIZED, reporter, strict)
        return {}
    return result


def _is_utf8(*texts: str) -> bool:
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _encoded_size(fields: Dict[str, str]) -> int:
    """Bytes of ``fields`` as compact JSON, or a bound above them when that is clearly small.

    No character takes more than 6 bytes in JSON (``\\u001f``), so most
    payloads are known to fit without encoding them twice.
    """
    bound = 2 + sum(6 * (len(key) + len(value)) + 6 for key, value in fields.items())
    if bound <= MAX_PAYLOAD_BYTES:
        return bound
    return len(_compact_json(fields).encode("utf-8"))


def snapshot_payload(payload: Any, *, refuse_oversized: bool = True) -> Any:
    """What a raw event keeps of ``payload``: what will be sent, as it is at the call.

    Runs on the caller's thread for every event with a payload, so it does the
    least that makes the queue safe to hold: the worker encodes later, and by
    then the caller may have changed a list it passed, or the queue may hold
    thousands of payloads too big to send. So:

    * text, numbers, booleans, ``None`` and dates are kept as they are: they
      cannot change, and their text is made on the worker as before (an int
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

    The worker's checks (names, reserved keys, privacy, the exact size) stay
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
            elif type(value) not in _IMMUTABLE and not _is_date(value):
                chars = _freeze(fields)  # a container: start again, slower
                break
    except Exception as exc:  # a mapping of the caller's own that fails when read
        return PayloadRefused("unreadable", type(exc).__name__)
    if chars > _MOST_VALUE_CHARS and refuse_oversized and _least_size(fields) > MAX_PAYLOAD_BYTES:
        return _OVERSIZED
    return fields


def _freeze(fields: Dict[Any, Any]) -> int:
    """Replace each value that could change by its text, or by ``Unsendable``; the
    characters of all the values' text."""
    chars = 0
    for key, value in fields.items():  # replacing a value does not disturb the iteration
        kind = type(value)
        if kind is str:
            chars += len(value)
        elif kind not in _IMMUTABLE and not _is_date(value):
            text = _field_text(value)
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

    Runs on the worker for every event, so it avoids the dictionary and the
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
        if fields and _encoded_size(merged) > MAX_PAYLOAD_BYTES:  # each fits, not both
            _refuse(name, _OVERSIZED, ctx.reporter, ctx.strict)
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
        head = _heads[key] = _compact_json({
            "appID": app_id, "clientUser": user, "sessionID": session_id, "type": name,
            "telemetryClientVersion": CLIENT_VERSION})[:-1] + ',"receivedAt":"'
    text = head + received_at(timestamp) + '"'
    fields = _fields(name, payload, ctx)
    if fields:
        text += ',"payload":' + _compact_json(fields)
    if type(float_value) is FloatRefused:
        _report_float(name, float_value, ctx)
    elif float_value is not None:
        text += ',"floatValue":' + _compact_json(float_value)
    if ctx.test_mode:
        text += ',"isTestMode":true'
    return text + "}"


_encoder: Optional[Callable[[Any], str]] = None


def _compact_json(value: Any) -> str:
    """Compact JSON text, by one encoder made at the first use and reused (importing
    ``json`` is left to the first payload or batch that needs it)."""
    global _encoder
    encode = _encoder
    if encode is None:
        import json

        encode = _encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    return encode(value)


def encode_signal(signal: Dict[str, Any]) -> str:
    """One signal as compact JSON text, as stored in the outbox and sent in a body."""
    return _compact_json(signal)


def encode_body(signals: list[Dict[str, Any]]) -> bytes:
    """The request body: always a JSON array, UTF-8."""
    return _compact_json(signals).encode("utf-8")
