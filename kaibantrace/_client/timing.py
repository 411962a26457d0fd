"""The two ends of tracked work: ``track(..., duration=True)`` and ``timed()``.

Every kind of tracked work (a call, a coroutine, a generator, a CLI's
``main``) runs between two steps: ``begin``, when the work starts, and
``end``, when it returns, raises, is exhausted or is closed. Two kinds of
steps exist:

* ``Firing``: what ``track`` does by default, the event at ``begin`` and
  nothing at ``end``;
* ``Timing``: ``duration=True``, nothing at ``begin`` but a clock reading and
  what the event will carry (the payload, computed from the arguments as they
  are at the start), and at ``end`` one more clock reading and the event, with
  its duration and outcome, then an error signal if the work raised
  (``_encode.outcome``).

On the caller's thread that is all: two clock readings and the usual
``accept`` of each event, from one frame of ours around the work (the only way
to see it end). The exception is passed on as it was raised; only its class is
kept.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from types import TracebackType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

from .._encode.outcome import (
    ERROR,
    ERROR_SIGNAL,
    SUCCESS,
    Failure,
    Measured,
    _new_tuple,
    error_class,
    measured,
    outcome_of,
)
from .._encode.pipeline import snapshot_payload
from .._errors import EventError
from .._log import logger
from .routes import encoded_at_call
from .wrappers import Start, in_caller_globals

# What ``describe`` gives for one call: the event's payload and CLI identity, or
# ``None`` when this call records nothing (the CLI's own ``telemetry`` command).
Described = Optional[Tuple[Any, Optional[str]]]
# What ``Timing.begin`` keeps until the end: payload, identity, session, start.
Begun = Optional[Tuple[Any, Optional[str], Any, float]]

_clock = time.perf_counter
_now = time.time
_getframe = sys._getframe


class Firing:
    """Steps of work tracked without its duration: the event at the start."""

    __slots__ = ("fire",)
    Strict = EventError  # what ``end`` may raise (templates see no module names)

    def __init__(self, fire: Callable[[Any, Any, Any], None]) -> None:
        self.fire = fire

    def begin(self, wrapped: Any, args: Any, kwargs: Any) -> None:
        self.fire(wrapped, args, kwargs)

    def end(self, begun: Any, error: Optional[BaseException]) -> None:
        pass


class Timing:
    """Steps of work tracked with its duration: the event at the end."""

    __slots__ = ("_last", "client", "describe", "event", "static")
    Strict = EventError  # what ``end`` may raise (templates see no module names)

    def __init__(self, client: Any, event: str,
                 describe: Optional[Callable[[Any, Any, Any], Described]],
                 static: Any = None) -> None:
        self.client = client
        self.event = event
        self.describe = describe  # None: every call sends ``static`` as its payload
        self.static = static
        self._last: Tuple[Any, ...] = (None, None, None, None)  # see timed_start

    def begin(self, wrapped: Any, args: Any, kwargs: Any) -> Begun:
        """At the first step of a coroutine or generator, or a CLI's ``main``."""
        try:
            if self.client._route() is None:
                return None  # opted out: nothing is measured
        except Exception:
            return None
        return self.begin_routed(wrapped, args, kwargs)

    def begin_routed(self, wrapped: Any, args: Any, kwargs: Any) -> Begun:
        """``begin``, for a call already known to be recorded (``timed_start``)."""
        try:
            if self.describe is None:
                return self.static, None, self.client._session(), _clock()
            described = self.describe(wrapped, args, kwargs)
            if described is None:
                return None
            return described[0], described[1], self.client._session(), _clock()
        except EventError:  # strict mode: at the call, before the work starts
            raise
        except Exception:
            logger.debug("kaibantrace: could not start timing %r", self.event, exc_info=True)
            return None

    def end(self, begun: Begun, error: Optional[BaseException], accept: Any = None) -> None:
        if begun is not None:
            finish(self.client, self.event, begun, _clock() - begun[3], error, accept)

    def done(self, started: float, accept: Any) -> None:
        """``end`` of a call of ``_timed_static`` that returned: the shortest path."""
        seconds = _clock() - started
        try:
            accept((self.event, _new_tuple(Measured, (self.static, seconds, SUCCESS)),
                    self.client._session(), None, _now(), None))
        except EventError:
            raise
        except Exception:
            _quietly_log(self.event)

    def failed(self, started: float, error: BaseException, accept: Any) -> None:
        """``end`` of a call of ``_timed_static`` that raised ``error``."""
        try:
            begun = self.static, None, self.client._session(), started
        except Exception:
            return
        finish(self.client, self.event, begun, _clock() - started, error, accept)


def finish(client: Any, event: str, begun: Tuple[Any, Optional[str], Any, float],
           seconds: float, error: Optional[BaseException], accept: Any = None) -> None:
    """Record the timed event (and the error signal, if the work raised). Never raises
    over the work's own exception, not even near the recursion limit; in strict mode,
    raises a problem of the payload after a run that succeeded.

    ``accept`` is where the call's start was routed, for a call of a function: a
    clock reading apart. Otherwise the route is found now."""
    problem: Optional[EventError] = None
    try:
        if accept is None:
            accept = client._route()
            if accept is None:
                return
        payload, identifier, session, _ = begun
        outcome = outcome_of(error)
        now = _now()
        try:
            accept((event, measured(payload, seconds, outcome), session, identifier, now, None))
        except EventError as raised:  # strict mode: the error signal is still recorded
            problem = raised
        if outcome == ERROR:
            assert error is not None
            accept((ERROR_SIGNAL, Failure(error_class(error), event), session, identifier, now,
                    None))
    except Exception:
        _quietly_log(event)
    if problem is not None and outcome_of(error) == SUCCESS:
        raise problem


def _quietly_log(event: str) -> None:
    try:
        logger.debug("kaibantrace: could not record %r", event, exc_info=True)
    except Exception:  # RecursionError, at the depth the work itself failed at
        pass


def _timed_through(_steps: Any, _subject: Any, _call: Any, /, *args: Any, **kwargs: Any) -> Any:
    # A template run under the caller's globals: only arguments and builtins.
    _begun = _steps.begin(_subject, args, kwargs)
    try:
        _result = _call(*args, **kwargs)
    except BaseException as _error:
        try:
            _steps.end(_begun, _error)
        except _steps.Strict:  # strict mode's report of a run that succeeded (sys.exit(0))
            raise
        except Exception:  # never in place of the work's own exception
            pass
        raise
    _steps.end(_begun, None)
    return _result


def _timed_call(_timing: Any, _target: Any, _accept: Any, /, *args: Any, **kwargs: Any) -> Any:
    # The same, for a tracked function whose call was routed already (to ``_accept``).
    _begun = _timing.begin_routed(_target, args, kwargs)
    try:
        _result = _target(*args, **kwargs)
    except BaseException as _error:
        try:
            _timing.end(_begun, _error, _accept)
        except _timing.Strict:  # strict mode's report of a run that succeeded (sys.exit(0))
            raise
        except Exception:  # never in place of the work's own exception
            pass
        raise
    _timing.end(_begun, None, _accept)
    return _result


def _timed_static(_timing: Any, _target: Any, _accept: Any, _clock: Any, /, *args: Any,
                  **kwargs: Any) -> Any:
    # The shortest form, for a function with a static payload (the usual case): nothing
    # to work out at the start but the time.
    _started = _clock()
    try:
        _result = _target(*args, **kwargs)
    except BaseException as _error:
        try:
            _timing.failed(_started, _error, _accept)
        except _timing.Strict:  # strict mode's report of a run that succeeded (sys.exit(0))
            raise
        except Exception:  # never in place of the work's own exception
            pass
        raise
    _timing.done(_started, _accept)
    return _result


def run_steps(steps: Any, subject: Any, call: Any, args: Any, kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` between ``steps``, for ``subject`` (a CLI's ``main``)."""
    return _timed_through(steps, subject, call, *args, **kwargs)


def timed_start(client: Any, timing: Timing) -> Start:
    """The ``Start`` of a function tracked with ``duration=True``: opted out, the function
    itself (no frame of ours); else one frame, in the caller's module, around the call.

    The callable made for a call is kept for the next one while the function, its
    caller's module and the route stay the same: the usual loop makes it once."""
    route = client._route

    def start(wrapped: Any, depth: int) -> Any:
        try:
            accept = route()
        except RecursionError:  # the work's own, its stack full: it is the one to raise
            raise
        except Exception:  # never into the host: the call goes on untimed
            logger.debug("kaibantrace: could not decide where an event goes", exc_info=True)
            return wrapped
        if accept is None:
            return wrapped
        try:
            module_globals = _getframe(depth).f_globals
        except ValueError:
            module_globals = None
        last = timing._last
        if last[0] is module_globals and last[1] is wrapped and last[2] is accept:
            return last[3]
        if timing.describe is None:
            runner = functools.partial(in_caller_globals(_timed_static, depth), timing, wrapped,
                                       accept, _clock)
        else:
            runner = functools.partial(in_caller_globals(_timed_call, depth), timing, wrapped,
                                       accept)
        timing._last = (module_globals, wrapped, accept, runner)  # the function, not its object
        return runner

    return start


class Timer:
    """``with client.timed(name):`` (or ``async with``): the block, timed as a tracked call.

    One object may be entered again before it is left, nested or by concurrent
    threads or asyncio tasks: each block is timed on its own."""

    __slots__ = ("_begun", "_client", "_event", "_payload")

    def __init__(self, client: Any, event: str, payload: Optional[Mapping[str, Any]]) -> None:
        self._client = client
        self._event = event
        self._payload = payload
        # By thread and task, innermost last: the start, and where it was routed.
        self._begun: Dict[Tuple[int, int], List[Any]] = {}

    def __enter__(self) -> Timer:
        begun: Any = None
        try:
            client = self._client
            accept = client._route()
            if accept is not None:
                payload = self._payload
                if payload is not None:  # what will be sent, as it is now
                    payload = snapshot_payload(payload,
                                               refuse_oversized=not encoded_at_call(client))
                begun = (payload, None, client._session(), _clock(), accept)
        except Exception:
            _quietly_log(self._event)
        self._begun.setdefault(_block_key(), []).append(begun)
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], error: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        try:
            key = _block_key()
            blocks = self._begun[key]
            begun = blocks.pop()
            if not blocks:
                del self._begun[key]
            if begun is not None:
                finish(self._client, self._event, begun[:4], _clock() - begun[3], error,
                       begun[4])
        except EventError:
            if error is None:
                raise
        except Exception:
            pass

    async def __aenter__(self) -> Timer:
        return self.__enter__()

    async def __aexit__(self, kind: Optional[Type[BaseException]], error: Optional[BaseException],
                        traceback: Optional[TracebackType]) -> None:
        self.__exit__(kind, error, traceback)


def _block_key() -> Tuple[int, int]:
    """Which thread, and which asyncio task in it, a block runs in."""
    task = None
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running event loop in this thread
            pass
    return threading.get_ident(), id(task)
