"""The checks on an event besides its payload, and the ``Reporter`` every check reports to.

An event's name is checked by ``name_problem`` and its ``float_value`` by
``float_value_of``; ``Reporter`` says any problem found on the way to a signal
(here, in ``payload.py`` or in ``pipeline.py``): raised in strict mode, else
logged once per cause. They sit apart from the pipeline because the calling
thread uses them too (a decorator checks its name when applied, ``emit`` keeps
its float value as ``float_value_of`` gives it), and beneath ``payload.py``,
which reports through ``Reporter``.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Optional, Tuple, Union

from .._errors import EventError, PrivacyError
from .._log import logger
from .jstext import js_number, number_text

MAX_NAME_LENGTH = 128
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


def float_value_of(value: Any) -> FloatValue:
    """What a raw event keeps of ``emit``'s ``float_value``: a finite float, ``None`` when
    none was given, or ``FloatRefused`` saying why it cannot be sent."""
    if value is None:
        return None
    if type(value) is float:
        if value - value == 0:  # finite: NaN and infinities give NaN here
            return value
        return FloatRefused("float_value_range", js_number(value))
    if isinstance(value, bool) or (not isinstance(value, (int, float))
                                   and number_text(value) is None):
        return FloatRefused("float_value_type", type(value).__name__)
    try:
        number = float(value)
    except (OverflowError, ValueError, ArithmeticError):
        return FloatRefused("float_value_range", "a number beyond a double's range")
    return float_value_of(number)
