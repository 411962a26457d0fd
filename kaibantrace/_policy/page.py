"""The browser page's own opt-outs, under Pyodide: the page's variable and the browser's
privacy signals.

KaibanJS's browser build reads ``window.KAIBAN_TELEMETRY_OPT_OUT`` (any non-empty
value opts out); a page running Python reads the same, on ``globalThis``. The
browser also carries the user's own wish: ``navigator.doNotTrack == "1"`` and
Global Privacy Control (``navigator.globalPrivacyControl``), which kaibantrace
honours as opt-outs. Outside Pyodide there is no page, and this module answers
``None`` without importing anything.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

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
    nothing out here (the environment's variables still apply)."""
    if not in_a_page():
        return None
    try:
        import importlib

        js = importlib.import_module("js")  # Pyodide's view of the JavaScript global scope
    except ImportError:
        return None
    try:
        if _text(getattr(js, "KAIBAN_TELEMETRY_OPT_OUT", None)):
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


def _text(value: Any) -> str:
    """A JavaScript value as text, as ``String(value)`` would read for a flag: ``undefined``
    and ``null`` (``None`` here) are empty."""
    if value is None:
        return ""
    return str(value).strip()
