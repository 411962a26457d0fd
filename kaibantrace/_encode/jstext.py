"""Values as text, the way TelemetryDeck's JavaScript SDK writes them.

TelemetryDeck's dashboards see what its JavaScript SDK sends: every payload
value as text, numbers as ``Number.prototype.toString`` writes them, dates and
``receivedAt`` as ``Date.toISOString``, flat lists and objects as
``JSON.stringify``. All of that text is made here, and the compact JSON of
the wire too (``compact_json``), apart from the payload rules and checks that
use it, so that matching the JavaScript SDK is one module's job
(``tests/test_js_json.py`` holds Node.js's own output). It imports no sibling
module, so every other module of ``_encode`` can use it.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Tuple

if TYPE_CHECKING:
    import datetime


def js_text(value: Any) -> str:
    """A payload value as text, the way TelemetryDeck's JavaScript SDK writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return js_number(value)
    if is_date(value):
        return _iso(value)
    return str(value)


def is_date(value: Any) -> bool:
    # A date or datetime exists only once ``datetime`` is imported: asking
    # ``sys.modules`` keeps this module from importing it for every program.
    module = sys.modules.get("datetime")
    return module is not None and isinstance(value, module.date)


def js_number(value: float) -> str:
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


def field_text(value: Any) -> Optional[str]:
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
    if isinstance(value, _SCALARS) or is_date(value):
        return js_text(value)
    number = number_text(value)
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
        return "{" + ",".join(f"{compact_json(k)}:{text}"
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
        return compact_json(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return js_number(value) if math.isfinite(value) else "null"
    if is_date(value):
        return '"' + _iso(value) + '"'
    enum = sys.modules.get("enum")
    if enum is not None and isinstance(value, enum.Enum):
        return _js_json_item(value.value)  # by value, as a scalar member is sent
    if isinstance(value, str):
        return compact_json(str(value))
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


def number_text(value: Any) -> Optional[str]:
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
        return js_number(float(value))  # a signalling NaN raises ValueError: refused
    numbers = sys.modules.get("numbers")
    if numbers is None or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return js_number(float(value))


_encoder: Optional[Callable[[Any], str]] = None


def compact_json(value: Any) -> str:
    """Compact JSON text, by one encoder made at the first use and reused (importing
    ``json`` is left to the first payload or batch that needs it)."""
    global _encoder
    encode = _encoder
    if encode is None:
        import json

        encode = _encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    return encode(value)
