"""Ways a tracked callable could differ from the untracked one, each a case that broke once.

Each test uses the same code tracked and untracked where it can, and checks the
tracked one answers as the untracked one does (and records its event once).
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import functools
import gc
import inspect
import re
import subprocess
import sys
import textwrap
import types
import typing
import warnings
import weakref
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List

import pytest

import kaibantrace
from kaibantrace.testing import capture

from .conftest import subprocess_env

track = kaibantrace.track


def events(signals: List[Dict[str, Any]]) -> List[str]:
    return [s["type"] for s in signals]


class TestKindIsTheDecoratedFunctions:
    """The event waits for the first step only when the decorated function itself returns a
    coroutine or generator: a decorator below ``track`` may have made it something else."""

    def test_over_contextmanager(self) -> None:
        @track("opened")
        @contextlib.contextmanager
        def opened() -> Iterator[str]:
            yield "resource"

        with capture() as signals, opened() as value:
            assert value == "resource"
        assert events(signals) == ["opened"]

    def test_over_a_wraps_decorator_that_drains_a_generator(self) -> None:
        def listify(fn: Callable[..., Iterator[int]]) -> Callable[..., List[int]]:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> List[int]:
                return list(fn(*args, **kwargs))
            return wrapper

        @track("items")
        @listify
        def items() -> Iterator[int]:
            yield 1
            yield 2

        with capture() as signals:
            assert items() == [1, 2]
        assert events(signals) == ["items"]

    def test_over_asynccontextmanager(self) -> None:
        @track("session")
        @contextlib.asynccontextmanager
        async def session() -> AsyncIterator[int]:
            yield 7

        async def use() -> int:
            async with session() as value:
                return value

        with capture() as signals:
            assert asyncio.run(use()) == 7
        assert events(signals) == ["session"]


def test_wraps_over_a_tracked_wrapper_keeps_the_wrapper_body() -> None:
    """``functools.wraps`` sets ``__wrapped__`` on the wrapper it decorates: on a tracked
    wrapper that names the function it wraps, and never replaces what is called."""
    def logged(fn: Callable[..., int]) -> Callable[..., Any]:
        @functools.wraps(fn)
        @track("call")
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return ("logged", fn(*args, **kwargs))
        return wrapper

    @logged
    def add(a: int, b: int) -> int:
        return a + b

    original = add.__wrapped__.__wrapped__  # the tracked wrapper function, then add itself
    with capture() as signals:
        assert add(1, 2) == ("logged", 3)
    assert events(signals) == ["call"]
    assert add.__name__ == "add" and inspect.unwrap(add) is original
    assert original(2, 3) == 5


@pytest.mark.parametrize("name", ["wrapped", "fire", "proxy"])
def test_parameters_of_any_name_pass_by_keyword(name: str) -> None:
    def gen(root: str, **options: bool) -> Iterator[Any]:
        yield root, options

    async def coro(root: str, **options: bool) -> Any:
        return root, options

    async def agen(root: str, **options: bool) -> AsyncIterator[Any]:
        yield root, options

    async def first(stream: AsyncIterator[Any]) -> Any:
        return await stream.__anext__()

    def plain(root: str, **options: bool) -> Any:
        return root, options

    expected = ("/", {name: True})
    with capture() as signals:
        assert next(track("gen")(gen)("/", **{name: True})) == expected
        assert asyncio.run(track("coro")(coro)("/", **{name: True})) == expected
        assert asyncio.run(first(track("agen")(agen)("/", **{name: True}))) == expected
        assert track("plain")(plain).__call__("/", **{name: True}) == expected
    assert events(signals) == ["gen", "coro", "agen", "plain"]


def test_a_function_is_no_container_or_number() -> None:
    """isinstance and hasattr answer for a tracked function as for a function."""
    def untracked() -> None:
        pass

    tracked = track("f")(untracked)
    checks: List[Callable[[Any], bool]] = [
        lambda f: isinstance(f, collections.abc.Iterable),
        lambda f: isinstance(f, collections.abc.Sized),
        lambda f: isinstance(f, collections.abc.Container),
        lambda f: isinstance(f, collections.abc.Reversible),
        lambda f: isinstance(f, contextlib.AbstractContextManager),
        lambda f: isinstance(f, contextlib.AbstractAsyncContextManager),
        lambda f: isinstance(f, typing.SupportsInt),
        lambda f: isinstance(f, typing.SupportsIndex),
        lambda f: isinstance(f, typing.SupportsAbs),
        lambda f: isinstance(f, collections.abc.Callable),
        lambda f: hasattr(f, "__enter__"),
        lambda f: hasattr(f, "__len__"),
        lambda f: hasattr(f, "__iter__"),
        lambda f: hasattr(f, "__getitem__"),
        lambda f: bool(f),
    ]
    assert [check(tracked) for check in checks] == [check(untracked) for check in checks]
    with pytest.raises(TypeError):
        iter(tracked)
    assert repr(tracked) == repr(untracked)


class TestFirstStepFrames:
    """The body of a tracked generator or coroutine sees its caller's module above it."""

    def test_deprecation_warning_is_attributed_to_the_caller(self) -> None:
        @track("old")
        def old_items() -> Iterator[int]:
            warnings.warn("old_items() is deprecated", DeprecationWarning, stacklevel=2)
            yield 1

        @track("old_async")
        async def old_call() -> int:
            warnings.warn("old_call() is deprecated", DeprecationWarning, stacklevel=2)
            return 1

        # As Python's default filters show a DeprecationWarning to __main__ only: a filter
        # for the calling module applies, so the warning is seen.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("error", category=DeprecationWarning,
                                    module=re.escape(__name__))
            with pytest.raises(DeprecationWarning, match="old_items"):
                list(old_items())
            with pytest.raises(DeprecationWarning, match="old_call"):
                asyncio.run(old_call())

    def test_the_frame_above_the_body_reports_the_callers_module(self) -> None:
        @track("where")
        def where() -> Iterator[str]:
            yield sys._getframe(1).f_globals["__name__"]

        assert next(where()) == __name__


def test_closing_an_unawaited_coroutine_leaves_nothing_to_warn_about() -> None:
    @track("work")
    async def work() -> int:
        return 1

    gc.collect()  # earlier tests' garbage, with warnings of its own, goes first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coroutine = work()
        coroutine.close()
        del coroutine
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_implicit_classmethods_stay_classmethods() -> None:
    seen: List[str] = []

    class Plugin:
        @track("plugin_defined")
        def __init_subclass__(cls, **kwargs: Any) -> None:
            super().__init_subclass__(**kwargs)
            seen.append(cls.__name__)

        @track("plugin_typed")
        def __class_getitem__(cls, item: Any) -> str:
            return f"{cls.__name__}[{item.__name__}]"

    with capture() as signals:
        class CSV(Plugin):
            pass

        assert Plugin[int] == "Plugin[int]"
    assert seen == ["CSV"]
    assert events(signals) == ["plugin_defined", "plugin_typed"]


def test_weak_methods_of_tracked_methods() -> None:
    """``weakref.WeakMethod`` (which signal libraries keep) rebuilds a tracked method."""
    class Button:
        @track("clicked")
        def on_click(self) -> str:
            return "clicked"

        @track("made")
        @classmethod
        def make(cls) -> str:
            return cls.__name__

    button = Button()
    assert button.on_click.__func__ is Button.on_click
    with capture() as signals:
        assert weakref.WeakMethod(button.on_click)()() == "clicked"  # type: ignore[misc]
        assert weakref.WeakMethod(Button.make)()() == "Button"  # type: ignore[misc]
    assert events(signals) == ["clicked", "made"]


def test_a_suspended_async_generator_closes_quietly_at_shutdown() -> None:
    @track("ticks")
    async def ticks() -> AsyncIterator[int]:
        for i in range(10):
            yield i

    errors: List[Dict[str, Any]] = []

    async def main() -> int:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        stream = ticks()
        value = await stream.__anext__()
        globals()["_kept_stream"] = stream  # still suspended when asyncio.run ends
        return value

    try:
        assert asyncio.run(main()) == 0
    finally:
        globals().pop("_kept_stream", None)
    assert errors == []


def test_generator_based_coroutines_stay_awaitable() -> None:
    @track("outer")
    @types.coroutine
    def outer() -> Any:
        yield from asyncio.sleep(0).__await__()
        return 1

    @types.coroutine
    @track("inner")
    def inner() -> Any:
        yield from asyncio.sleep(0).__await__()
        return 2

    async def both() -> int:
        return await outer() + await inner()

    with capture() as signals:
        assert asyncio.run(both()) == 3
    assert events(signals) == ["outer", "inner"]


def test_a_tracked_del_at_interpreter_exit_prints_nothing() -> None:
    script = textwrap.dedent("""
        import kaibantrace

        class Resource:
            @kaibantrace.track("released")
            def __del__(self):
                pass

        keep = Resource()  # collected while the interpreter shuts down
    """)
    for opt_out in ("1", ""):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=subprocess_env(KAIBAN_TELEMETRY_OPT_OUT=opt_out), timeout=60)
        assert (done.returncode, done.stderr) == (0, "")


def test_a_class_is_refused_at_decoration() -> None:
    class Point:
        pass

    with pytest.raises(TypeError, match="needs a function or method, not a class"):
        track("point")(Point)


def test_the_typer_application_takes_the_authors_changes() -> None:
    typer = pytest.importorskip("typer")
    app = kaibantrace.track_cli("tool_used")(typer.Typer())
    app.info.help = "What this tool does."

    @app.command()
    def only() -> None:
        pass

    assert app.__wrapped__.info.help == "What this tool does."
    app.registered_commands.clear()
    assert app.__wrapped__.registered_commands == []


@pytest.mark.skipif(not hasattr(inspect, "markcoroutinefunction"), reason="Python 3.12+")
def test_a_function_marked_as_a_coroutine_function_returning_another_awaitable() -> None:
    class Ready:
        def __await__(self) -> Any:
            yield from asyncio.sleep(0).__await__()
            return 5

    def ready() -> Ready:
        return Ready()

    tracked = track("ready")(inspect.markcoroutinefunction(ready))  # type: ignore[attr-defined,unused-ignore]

    async def main() -> Any:
        return await tracked()

    with capture() as signals:
        assert asyncio.run(main()) == 5
    assert events(signals) == ["ready"]
