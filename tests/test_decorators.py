"""``track`` on every kind of callable, and its decoration-time errors."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, AsyncIterator, Dict, Iterator, List

import pytest

import kaibantrace
from kaibantrace import EventError, PrivacyError
from kaibantrace.testing import capture


def types(signals: List[Dict[str, Any]]) -> List[str]:
    return [s["type"] for s in signals]


class TestCallableKinds:
    def test_plain_function(self) -> None:
        """A plain function emits when called and returns its value untouched."""
        @kaibantrace.track("plain")
        def add(a: int, b: int = 2) -> int:
            """Add numbers."""
            return a + b

        with capture() as signals:
            assert add(1) == 3
        assert types(signals) == ["plain"]
        assert add.__name__ == "add" and add.__doc__ == "Add numbers."
        assert inspect.signature(add) == inspect.signature(add.__wrapped__)
        assert list(inspect.signature(add).parameters) == ["a", "b"]

    def test_reading_call_is_not_calling(self) -> None:
        """``hasattr(f, "__call__")`` and ``f.__call__`` record nothing; calling what
        ``f.__call__`` gave records the call, once."""
        @kaibantrace.track("plain")
        def double(a: int) -> int:
            return a * 2

        with capture() as signals:
            call = double.__call__
            assert hasattr(double, "__call__") and callable(double)  # noqa: B004 (the idiom itself)
            assert types(signals) == []
            assert call(4) == 8
        assert types(signals) == ["plain"]

    def test_exceptions_pass_through(self) -> None:
        """The decorated function's exception reaches the caller unchanged, after the event."""
        @kaibantrace.track("boom")
        def fail() -> None:
            raise KeyError("mine")

        with capture() as signals, pytest.raises(KeyError, match="mine"):
            fail()
        assert types(signals) == ["boom"]

    def test_methods(self) -> None:
        """Instance methods, classmethods and staticmethods all emit and keep their binding."""
        class Team:
            size = 4

            @kaibantrace.track("method")
            def start(self, n: int) -> int:
                return self.size + n

            @kaibantrace.track("class")
            @classmethod
            def create(cls) -> Team:
                return cls()

            @classmethod
            @kaibantrace.track("class_inner")
            def create2(cls) -> Team:
                return cls()

            @kaibantrace.track("static")
            @staticmethod
            def helper(x: int) -> int:
                return x * 2

        with capture() as signals:
            team = Team.create()
            assert isinstance(Team.create2(), Team)
            assert team.start(1) == 5
            assert Team.helper(3) == 6 and team.helper(4) == 8
        assert types(signals) == ["class", "class_inner", "method", "static", "static"]

    def test_coroutine_fires_when_awaited_not_when_created(self) -> None:
        """A coroutine function emits when its work starts, not when the coroutine is made."""
        @kaibantrace.track("coro")
        async def work(x: int) -> int:
            await asyncio.sleep(0)
            return x

        assert inspect.iscoroutinefunction(work)
        with capture() as signals:
            coroutine = work(7)
            assert signals == []
            assert asyncio.run(coroutine) == 7
        assert types(signals) == ["coro"]

    def test_generator_fires_on_first_next(self) -> None:
        """A generator emits at its first next(), and send/return values pass through."""
        @kaibantrace.track("gen")
        def numbers() -> Iterator[int]:
            received = yield 1
            yield received * 10
            return

        assert inspect.isgeneratorfunction(numbers)
        with capture() as signals:
            gen = numbers()
            assert signals == []
            assert next(gen) == 1
            assert gen.send(4) == 40
            assert list(gen) == []
        assert types(signals) == ["gen"]

    def test_async_generator_fires_on_first_anext(self) -> None:
        """An async generator emits at its first __anext__, and asend/athrow are delegated."""
        @kaibantrace.track("agen")
        async def stream() -> AsyncIterator[int]:
            try:
                got = yield 1
                yield got + 1
            except ValueError:
                yield -1

        assert inspect.isasyncgenfunction(stream)

        async def main() -> tuple[int, int, int]:
            agen = stream()
            assert signals == []
            first = await agen.__anext__()
            second = await agen.asend(41)
            other = stream()
            await other.__anext__()
            thrown = await other.athrow(ValueError())
            await other.aclose()
            return first, second, thrown

        with capture() as signals:
            assert asyncio.run(main()) == (1, 42, -1)
        assert types(signals) == ["agen", "agen"]

    def test_bad_arguments_raise_at_the_call(self) -> None:
        """Tracked generators and coroutines reject bad arguments at the call, as undecorated ones do."""
        @kaibantrace.track("gen")
        def numbers(n: int) -> Iterator[int]:
            yield n

        @kaibantrace.track("coro")
        async def work(n: int) -> int:
            return n

        with capture() as signals:
            with pytest.raises(TypeError):
                numbers(1, 2)  # type: ignore[call-arg]
            with pytest.raises(TypeError):
                work()  # type: ignore[call-arg]
            gen = numbers(3)
            assert gen.__name__ == "numbers" and next(gen) == 3
        assert types(signals) == ["gen"]

    def test_async_for_over_tracked_async_generator(self) -> None:
        """A tracked async generator works in a plain async for loop."""
        @kaibantrace.track("agen")
        async def stream() -> AsyncIterator[int]:
            for i in range(3):
                yield i

        async def main() -> List[int]:
            return [i async for i in stream()]

        with capture() as signals:
            assert asyncio.run(main()) == [0, 1, 2]
        assert types(signals) == ["agen"]


class TestPayloads:
    def test_static_payload(self) -> None:
        """A static payload is sent, converted to text, with every call."""
        @kaibantrace.track("s", payload={"agents": 3})
        def f() -> None:
            pass

        with capture() as signals:
            f()
        assert signals[0]["payload"] == {"agents": "3"}

    def test_callable_payload_receives_bound_arguments(self) -> None:
        """A payload callable gets the call's arguments by name, defaults applied, self included."""
        seen: List[Dict[str, Any]] = []

        class Team:
            agents = ("a", "b")

            @kaibantrace.track("start", payload=lambda a: seen.append(a) or {
                "agents": len(a["self"].agents), "mode": a["mode"]})
            def start(self, task: str, mode: str = "fast") -> str:
                return task

        with capture() as signals:
            assert Team().start("t1") == "t1"
        assert signals[0]["payload"] == {"agents": "2", "mode": "fast"}
        assert set(seen[0]) == {"self", "task", "mode"}

    def test_payload_callable_that_raises_never_breaks_the_call(self) -> None:
        """Outside strict mode, a failing payload callable costs the payload, not the call."""
        @kaibantrace.track("p", payload=lambda a: 1 / 0)
        def f() -> int:
            return 5

        with capture(strict=False) as signals:
            assert f() == 5
        assert "payload" not in signals[0]

    def test_strict_capture_raises_for_a_bad_runtime_payload(self) -> None:
        """In strict capture (the pytest fixture) a personal value fails the call that made it."""
        @kaibantrace.track("p", payload=lambda a: {"who": a["email"]})
        def f(email: str) -> None:
            pass

        with capture(strict=True), pytest.raises(PrivacyError, match="'who'"):
            f("someone@example.com")


class TestDecorationErrors:
    @pytest.mark.parametrize(("name", "error"), [
        (123, TypeError), ("", EventError), ("x" * 129, EventError), ("bad name", EventError),
        ("TelemetryDeck.Signal", EventError)])
    def test_bad_names_raise_at_decoration(self, name: Any, error: type) -> None:
        """A bad name raises when decorating, where the author can fix it."""
        with pytest.raises(error, match="event name"):
            kaibantrace.track(name)

    def test_bad_payload_type_raises(self) -> None:
        """A payload that is neither a mapping nor a callable raises TypeError."""
        with pytest.raises(TypeError, match="mapping or a callable"):
            kaibantrace.track("x", payload=[1, 2])

    def test_bad_static_payload_raises(self) -> None:
        """A static payload is checked in full at decoration, privacy guard included."""
        with pytest.raises(EventError, match="reserved"):
            kaibantrace.track("x", payload={"appID": "a"})
        with pytest.raises(PrivacyError):
            kaibantrace.track("x", payload={"host": "10.1.2.3"})

    def test_decorating_a_non_callable_raises(self) -> None:
        """Only functions and methods can be tracked."""
        with pytest.raises(TypeError, match="needs a function"):
            kaibantrace.track("x")(42)

    def test_errors_are_value_errors(self) -> None:
        """EventError is a ValueError, as the API promises."""
        assert issubclass(EventError, ValueError) and issubclass(PrivacyError, EventError)
