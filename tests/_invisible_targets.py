"""Tracked callables of every kind, at module level so that pickle finds them by name and
child processes (spawn, forkserver) can import them, each beside an undecorated twin.

``CLIENT`` is given no app ID and no endpoint in code: the tests set
``KAIBAN_TELEMETRY_APP_ID`` and ``KAIBAN_TELEMETRY_ENDPOINT`` (a loopback collector),
which child processes inherit. Without them it sends nothing anywhere.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import sys
from types import FrameType
from typing import Any, AsyncIterator, Callable, Dict, Iterator, Optional, Type

import kaibantrace

CLIENT = kaibantrace.Telemetry(flush_interval=0.02)

ORIGINALS: Dict[str, Callable[..., Any]] = {}


def _keep(func: Callable[..., Any]) -> Callable[..., Any]:
    """Remember the undecorated function, to check that ``inspect.unwrap`` reaches it."""
    ORIGINALS[func.__qualname__] = func
    return func


@CLIENT.track("square")
@_keep
def square(x: int, power: int = 2) -> int:
    """Raise ``x`` to ``power``."""
    return int(x ** power)


def plain_square(x: int, power: int = 2) -> int:
    """Raise ``x`` to ``power``."""
    return int(x ** power)


@CLIENT.track("halve")
async def halve(x: int, *, exact: bool = False) -> float:
    """Half of ``x``, after one turn of the event loop."""
    await asyncio.sleep(0)
    return x / 2 if exact else x // 2


async def plain_halve(x: int, *, exact: bool = False) -> float:
    """Half of ``x``, after one turn of the event loop."""
    await asyncio.sleep(0)
    return x / 2 if exact else x // 2


@CLIENT.track("countdown")
def countdown(start: int, step: int = 1) -> Iterator[int]:
    """``start``, ``start - step``, ... down to 1."""
    yield from range(start, 0, -step)


def plain_countdown(start: int, step: int = 1) -> Iterator[int]:
    """``start``, ``start - step``, ... down to 1."""
    yield from range(start, 0, -step)


@CLIENT.track("ticks")
async def ticks(n: int, *names: str) -> AsyncIterator[int]:
    """0 to ``n - 1``, one per turn of the event loop."""
    for i in range(n):
        await asyncio.sleep(0)
        yield i


async def plain_ticks(n: int, *names: str) -> AsyncIterator[int]:
    """0 to ``n - 1``, one per turn of the event loop."""
    for i in range(n):
        await asyncio.sleep(0)
        yield i


class _Sized:
    """What ``Team`` and its twin share: a size, compared by value."""

    base = 10

    def __init__(self, size: int) -> None:
        self.size = size

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.size == self.size

    def __hash__(self) -> int:
        return hash(self.size)


class Team(_Sized):
    """Tracked methods of each kind."""

    @CLIENT.track("scale")
    def scale(self, n: int, offset: int = 0) -> int:
        """The team's size times ``n``."""
        return self.size * n + offset

    @CLIENT.track("sized")
    @classmethod
    def sized(cls, n: int) -> int:
        """The class's base times ``n``."""
        return cls.base * n

    @CLIENT.track("double")
    @staticmethod
    def double(x: int, *, twice: bool = False) -> int:
        """``x`` doubled (or quadrupled)."""
        return x * (4 if twice else 2)


class PlainTeam(_Sized):
    """``Team`` undecorated."""

    def scale(self, n: int, offset: int = 0) -> int:
        """The team's size times ``n``."""
        return self.size * n + offset

    @classmethod
    def sized(cls, n: int) -> int:
        """The class's base times ``n``."""
        return cls.base * n

    @staticmethod
    def double(x: int, *, twice: bool = False) -> int:
        """``x`` doubled (or quadrupled)."""
        return x * (4 if twice else 2)


class Holder:
    """An instance that keeps tracked callables as attributes (copied with it)."""

    def __init__(self, team: Team) -> None:
        self.team = team
        self.callback = square
        self.action: Any = team.scale

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Holder) and other.team == self.team


# The caller's module and frame, as library factories look them up.

@CLIENT.track("caller_module")
def caller_module() -> str:
    """The name of the module that called this function."""
    return str(sys._getframe(1).f_globals["__name__"])


@CLIENT.track("caller_frame")
def caller_frame() -> FrameType:
    """The frame of this function's caller."""
    return sys._getframe(1)


@CLIENT.track("make_enum")
def make_enum(name: str, members: str, module: Optional[str] = None) -> Type[enum.Enum]:
    """An enum made with the functional API, belonging to the caller's module (as the
    functional API itself does when called directly)."""
    if module is None:
        module = sys._getframe(1).f_globals["__name__"]
    return enum.Enum(name, members, module=module)  # type: ignore[return-value]


def run(func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)`` with its work done: a coroutine awaited, a generator or an async
    generator drained into a list (what a worker process hands back)."""
    result = func(*args)
    if inspect.iscoroutine(result):
        return asyncio.run(result)
    if inspect.isgenerator(result):
        return list(result)
    if inspect.isasyncgen(result):
        async def drain() -> Any:
            return [item async for item in result]

        return asyncio.run(drain())
    return result
