"""Coroutine functions, generators and async generators: the event at the first step.

Calling a tracked coroutine function (or generator, or async generator
function) calls the function at once, so a bad argument raises at the call as
it would untracked, and returns an object of the same kind, named like the
original's, whose first step records the event (or, with ``duration=True``,
starts the clock) and then hands every step on to the original's object, up to
its last, where a timed event is recorded.

That object's code is one of the templates below, run under the *caller's*
globals (see ``_client.wrappers.in_caller_globals``): inside the tracked body, the frame
above belongs to the caller's module, so ``warnings.warn(stacklevel=2)`` is
attributed, and filtered, as without telemetry. The templates use only their
arguments and builtins, so they run unchanged under any module's globals.

A coroutine that is closed before its first step (a task cancelled before it
ran) must not leave an un-awaited coroutine behind to warn about it: the one
made at the call, to check the arguments, is closed at once, and the one that
runs is made at the first step.
"""

from __future__ import annotations

import functools
from types import CoroutineType, FunctionType
from typing import Any, AsyncGenerator, Generator

from .wrappers import Start, in_caller_globals

_ITERABLE_COROUTINE = 0x100  # inspect.CO_ITERABLE_COROUTINE, what types.coroutine sets

# Each template runs the work between ``steps.begin`` (the first step) and
# ``steps.end`` (completion, exhaustion, close or an exception; see ``_client.timing``).


async def _coroutine_steps(steps: Any, wrapped: Any, args: Any, kwargs: Any, /) -> Any:
    begun = steps.begin(wrapped, args, kwargs)
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as error:
        try:
            steps.end(begun, error)
        except steps.Strict:  # strict mode's report of a run that succeeded
            raise
        except Exception:  # never in place of the work's own exception
            pass
        raise
    steps.end(begun, None)
    return result


async def _awaitable_steps(steps: Any, wrapped: Any, args: Any, kwargs: Any, inner: Any, /
                           ) -> Any:
    begun = steps.begin(wrapped, args, kwargs)
    try:
        result = await inner
    except BaseException as error:
        try:
            steps.end(begun, error)
        except steps.Strict:  # strict mode's report of a run that succeeded
            raise
        except Exception:  # never in place of the work's own exception
            pass
        raise
    steps.end(begun, None)
    return result


def _generator_steps(steps: Any, wrapped: Any, args: Any, kwargs: Any, inner: Any, /
                     ) -> Generator[Any, Any, Any]:
    begun = steps.begin(wrapped, args, kwargs)
    try:
        result = yield from inner
    except BaseException as error:  # GeneratorExit too: closed before it was exhausted
        try:
            steps.end(begun, error)
        except steps.Strict:  # strict mode's report of a run that succeeded
            raise
        except Exception:  # never in place of the work's own exception
            pass
        raise
    steps.end(begun, None)
    return result


async def _async_generator_steps(steps: Any, wrapped: Any, args: Any, kwargs: Any, inner: Any, /
                                 ) -> AsyncGenerator[Any, Any]:
    begun = steps.begin(wrapped, args, kwargs)
    try:
        # Delegate asend/athrow/aclose faithfully: ``async for`` alone would not.
        step = inner.__anext__()
        while True:
            try:
                value = await step
            except StopAsyncIteration:
                break
            try:
                sent = yield value
            except GeneratorExit:
                try:
                    await inner.aclose()
                except RuntimeError:  # being closed already (asyncio closes every one at shutdown)
                    pass
                raise
            except BaseException as thrown:
                step = inner.athrow(thrown)
            else:
                step = inner.asend(sent)
    except BaseException as error:
        try:
            steps.end(begun, error)
        except steps.Strict:  # strict mode's report of a run that succeeded
            raise
        except Exception:  # never in place of the work's own exception
            pass
        raise
    steps.end(begun, None)


# A generator-based coroutine (types.coroutine) stays awaitable when tracked.
_awaitable_generator_steps = FunctionType(
    _generator_steps.__code__.replace(
        co_flags=_generator_steps.__code__.co_flags | _ITERABLE_COROUTINE),
    globals(), _generator_steps.__name__)


def _named(outer: Any, inner: Any) -> Any:
    """``outer`` named like ``inner`` (an awaitable of another kind may have no name)."""
    name = getattr(inner, "__name__", None)
    if isinstance(name, str):
        outer.__name__ = name
        outer.__qualname__ = getattr(inner, "__qualname__", name)
    return outer


def _coroutine(steps: Any, wrapped: Any, /, *args: Any, **kwargs: Any) -> Any:
    inner = wrapped(*args, **kwargs)  # checks the arguments, as the call would
    if type(inner) is CoroutineType:
        inner.close()  # made again at the first step: never left un-awaited
        return _named(in_caller_globals(_coroutine_steps)(steps, wrapped, args, kwargs), inner)
    return _named(in_caller_globals(_awaitable_steps)(steps, wrapped, args, kwargs, inner), inner)


def _generator(steps: Any, wrapped: Any, /, *args: Any, **kwargs: Any) -> Any:
    inner = wrapped(*args, **kwargs)
    code = getattr(inner, "gi_code", None)
    awaitable = code is not None and code.co_flags & _ITERABLE_COROUTINE
    template = in_caller_globals(_awaitable_generator_steps if awaitable else _generator_steps)
    return _named(template(steps, wrapped, args, kwargs, inner), inner)


def _async_generator(steps: Any, wrapped: Any, /, *args: Any, **kwargs: Any) -> Any:
    inner = wrapped(*args, **kwargs)
    return _named(in_caller_globals(_async_generator_steps)(steps, wrapped, args, kwargs, inner),
                  inner)


def first_step_start(kind: str, steps: Any) -> Start:
    """The ``Start`` of a tracked coroutine function, generator or async generator function;
    ``steps`` (``_client.timing.Firing`` or ``Timing``) says what happens at the first and last."""
    make = {"coroutine": _coroutine, "generator": _generator,
            "async generator": _async_generator}[kind]

    def start(wrapped: Any, depth: int) -> Any:
        return functools.partial(make, steps, wrapped)

    return start
