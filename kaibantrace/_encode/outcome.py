"""How long tracked work ran and how it ended, in TelemetryDeck's own terms.

``track(..., duration=True)`` and ``timed()`` send these so that TelemetryDeck's
dashboards and presets read them unchanged:

* the tracked event itself, when the work ends, with
  ``TelemetryDeck.Signal.durationInSeconds`` (seconds with three decimals, as
  TelemetryDeck's SDKs write duration signals) and ``kaibantrace.outcome``;
* when the work raised, also ``TelemetryDeck.Error.occurred`` with
  ``TelemetryDeck.Error.id`` (the exception's qualified class name) and
  ``TelemetryDeck.Error.category`` ``thrown-exception``. Never the exception's
  message, arguments or traceback: those hold the user's data.

The objects here stand in an event's payload slot. They are made on the
caller's thread with nothing but a clock reading and the exception's class;
the text is made later, by the encoder. Their fields are kaibantrace's own, so
they pass the ``TelemetryDeck.`` prefix that author payloads may not use.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .privacy import personal_data_kind

DURATION_KEY = "TelemetryDeck.Signal.durationInSeconds"
OUTCOME_KEY = "kaibantrace.outcome"
ERROR_SIGNAL = "TelemetryDeck.Error.occurred"
ERROR_ID_KEY = "TelemetryDeck.Error.id"
ERROR_CATEGORY_KEY = "TelemetryDeck.Error.category"
THROWN = "thrown-exception"
EVENT_KEY = "kaibantrace.event"  # on an error signal: which tracked event raised

SUCCESS = "success"  # returned, exhausted, or exited with status 0
ERROR = "error"  # raised an exception, or exited with another status
CANCELLED = "cancelled"  # cancelled (asyncio, trio) or interrupted (Ctrl-C)
CLOSED = "closed"  # a generator closed before it was exhausted

_MAX_ID_CHARS = 200


def outcome_of(error: Optional[BaseException]) -> str:
    """How work that raised ``error`` (``None``: returned) ended."""
    if error is None:
        return SUCCESS
    if isinstance(error, Exception):
        return ERROR
    if isinstance(error, SystemExit):  # sys.exit(), and click's way of ending a command
        if error.code is None or (type(error.code) in (int, bool) and error.code == 0):
            return SUCCESS
        # click ends Ctrl-C with sys.exit(1): an interruption still
        return CANCELLED if issubclass(error_class(error), KeyboardInterrupt) else ERROR
    if isinstance(error, GeneratorExit):
        return CLOSED
    # KeyboardInterrupt, asyncio.CancelledError, trio.Cancelled: stopped from outside.
    return CANCELLED


class Measured(Tuple[Any, float, str]):
    """A timed event's payload: the author's, plus its duration and outcome.

    A tuple, made with ``measured()``: on the caller's thread that costs a third
    of an object with attributes."""

    __slots__ = ()

    @property
    def payload(self) -> Any:
        return self[0]

    def with_payload(self, payload: Any) -> Measured:
        return measured(payload, self[1], self[2])

    def fields(self) -> Dict[str, str]:
        return {DURATION_KEY: f"{max(self[1], 0.0):.3f}", OUTCOME_KEY: self[2]}


def measured(payload: Any, seconds: float, outcome: str) -> Measured:
    """``Measured`` holding the three, as cheaply as Python makes an object."""
    made: Measured = _new_tuple(Measured, (payload, seconds, outcome))
    return made


_new_tuple: Any = tuple.__new__  # also used by _client.timing's shortest path


class Failure:
    """An error signal's payload: the exception's class, and the event whose work raised."""

    __slots__ = ("error", "event", "payload")

    def __init__(self, error: type, event: str, payload: Any = None) -> None:
        self.error = error
        self.event = event
        self.payload = payload  # none of the author's; the signal budget's count, if any

    def with_payload(self, payload: Any) -> Failure:
        return Failure(self.error, self.event, payload)

    def fields(self) -> Dict[str, str]:
        fields = {ERROR_ID_KEY: error_id(self.error), ERROR_CATEGORY_KEY: THROWN}
        if personal_data_kind(self.event) is None:
            fields[EVENT_KEY] = self.event
        return fields


def error_class(error: BaseException) -> type:
    """The class an error signal names: the exception's own, except for a ``SystemExit``
    raised while handling another, as click ends a command that failed (a
    ``ClickException``, or Ctrl-C as ``Abort``): then the one that started it."""
    seen = error
    for _ in range(3):  # click: KeyboardInterrupt -> Abort -> SystemExit(1)
        if not isinstance(seen, SystemExit) or seen.__context__ is None:
            break
        seen = seen.__context__
    while isinstance(seen.__context__, KeyboardInterrupt) and not isinstance(seen, KeyboardInterrupt):
        seen = seen.__context__  # Abort from Ctrl-C: it was an interruption
    return type(seen)


def error_id(error: type) -> str:
    """The exception class's qualified name: ``ValueError``, ``json.decoder.JSONDecodeError``.

    A class is named in code, not by the user; but one made at run time could
    be named anything, so a name that looks personal gives way to the nearest
    built-in class it derives from.
    """
    name = _qualified(error)
    if len(name) <= _MAX_ID_CHARS and personal_data_kind(name) is None:
        return name
    for base in error.__mro__:
        if getattr(base, "__module__", None) == "builtins":
            return str(base.__qualname__)
    return "Exception"


def _qualified(error: type) -> str:
    module = getattr(error, "__module__", None)
    qualname = getattr(error, "__qualname__", None) or getattr(error, "__name__", "Exception")
    if not isinstance(module, str) or module == "builtins":
        return str(qualname)
    return f"{module}.{qualname}"
