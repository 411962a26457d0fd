"""The browser page's own opt-outs, under Pyodide: the page's variable and the browser's
privacy signals.

KaibanJS's browser build reads ``window.KAIBAN_TELEMETRY_OPT_OUT`` (any non-empty
value opts out); a page running Python reads the same, on ``globalThis``: a string
that is not blank, or another value JavaScript counts as true (``false`` and ``0``
leave telemetry on, as an author writing them means). The browser also carries the
user's own wish: ``navigator.doNotTrack == "1"`` and Global Privacy Control
(``navigator.globalPrivacyControl``), which kaibantrace honours as opt-outs. Outside
Pyodide there is no page, and this module answers ``None`` without importing anything.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

PAGE_OPT_OUT = "globalThis.KAIBAN_TELEMETRY_OPT_OUT"
DO_NOT_TRACK = "navigator.doNotTrack"
PRIVACY_CONTROL = "navigator.globalPrivacyControl"


def in_a_page() -> bool:
    """Whether this Python runs in a JavaScript host (Pyodide: a browser page, a worker,
    or Node.js)."""
    return sys.platform == "emscripten"


def page_opt_out() -> Optional[str]:
    """The page's source that opts out, or ``None``: the page's variable, then the
    browser's Do Not Track and Global Privacy Control. A host that cannot be read opts
    nothing out here (the environment's variables still apply).

    A page's router asks for every event, so this is one call into JavaScript (0.7 µs
    under Node.js) rather than a read of each property from Python (4 µs); a page whose
    Content Security Policy forbids making that function gets the reads from Python."""
    if not in_a_page():
        return None
    check = _check or _make_check()
    if check is _read_from_python:
        return _read_from_python()
    try:
        return _SOURCES[int(check())]
    except Exception:  # a hostile or odd host: never an error into the page
        return None


_SOURCES = (None, PAGE_OPT_OUT, DO_NOT_TRACK, PRIVACY_CONTROL)
# The same reads as _read_from_python, in JavaScript: the index of the source in _SOURCES.
_CHECK = """
const g = globalThis, n = g.navigator, v = g.KAIBAN_TELEMETRY_OPT_OUT;
if (typeof v === "string" ? v.trim() !== "" : Boolean(v)) return 1;
if (n != null && n.doNotTrack != null && String(n.doNotTrack).trim() === "1") return 2;
if (n != null && n.globalPrivacyControl === true) return 3;
return 0;
"""
_check: Optional[Callable[[], Any]] = None


def _make_check() -> Callable[[], Any]:
    """The JavaScript function that reads the page's opt-outs, made once; where it cannot
    be made (no ``js`` module, or a policy refusing ``Function``), the reads from Python."""
    global _check
    try:
        import importlib

        js = importlib.import_module("js")  # Pyodide's view of the JavaScript global scope
        _check = js.Function.new(_CHECK)
    except Exception:
        _check = _read_from_python
    return _check


def _read_from_python() -> Optional[str]:
    """The page's opt-outs, each property read from Python."""
    try:
        import importlib

        js = importlib.import_module("js")
    except ImportError:
        return None
    try:
        if _set(getattr(js, "KAIBAN_TELEMETRY_OPT_OUT", None)):
            return PAGE_OPT_OUT
        navigator = getattr(js, "navigator", None)
        if navigator is not None:
            if _text(getattr(navigator, "doNotTrack", None)) == "1":
                return DO_NOT_TRACK
            if getattr(navigator, "globalPrivacyControl", None) is True:
                return PRIVACY_CONTROL
    except Exception:  # a hostile or odd host: never an error into the page
        return None
    return None


def _set(value: Any) -> bool:
    """Whether the page's variable opts out: a string that is not blank, or any other value
    JavaScript counts as true (``true``, a number but 0); ``false``, ``0``, ``""``,
    ``null`` and ``undefined`` leave telemetry on."""
    if isinstance(value, str):
        return bool(value.strip())
    if _is_null(value):
        return False
    try:
        return bool(value) and value == value  # NaN, false in JavaScript too
    except Exception:
        return True  # an object: true in JavaScript


def _text(value: Any) -> str:
    """A JavaScript value as text, as ``String(value)`` would read for a flag: ``undefined``
    and ``null`` are empty."""
    if _is_null(value):
        return ""
    return str(value).strip()


def _is_null(value: Any) -> bool:
    """``undefined`` (``None`` here) or ``null`` (Pyodide's ``jsnull``)."""
    return value is None or type(value).__name__ == "JsNull"
