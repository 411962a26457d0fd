"""Tracking is invisible: a tracked callable of every kind pickles, copies, introspects,
chains with ``functools.wraps``, crosses process boundaries and finds its caller as the
undecorated one does, with telemetry on (events reach a loopback collector) and opted out
(nothing does).

The tracked objects live in ``tests/_invisible_targets.py``, beside undecorated twins,
so that pickle finds them by name and spawned children can import them.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import functools
import inspect
import multiprocessing
import pickle
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Mapping, Optional, TypeVar

import pytest

import kaibantrace
from kaibantrace._client.client import restore
from kaibantrace.testing import Collector

from . import _invisible_targets as targets
from .conftest import APP_ID

F = TypeVar("F", bound=Callable[..., Any])
PROTOCOLS = range(2, pickle.HIGHEST_PROTOCOL + 1)


@dataclasses.dataclass
class Setup:
    """How telemetry is set for one test, and the check of what reached the collector."""

    on: bool
    collector: Collector
    client: kaibantrace.Telemetry  # for tracked objects made inside a test

    def delivered(self, expected: Mapping[str, int], *,
                  children: Optional[Mapping[str, int]] = None) -> None:
        """With telemetry on, exactly ``expected`` events of each type reach the collector
        (plus at most ``children`` more, from child processes that may or may not send);
        opted out, no request does."""
        assert targets.CLIENT.flush(10) is True
        assert self.client.flush(10) is True
        if not self.on:
            assert self.collector.requests == []
            return
        signals = self.collector.wait_for(sum(expected.values()))
        got = collections.Counter(s["type"] for s in signals)
        extra = children or {}
        assert set(got) <= set(expected) | set(extra), got
        for name, count in expected.items():
            assert count <= got[name] <= count + extra.get(name, 0), (name, got)


@pytest.fixture(params=["on", "opted_out"])
def setup(request: pytest.FixtureRequest, collector: Collector, monkeypatch: pytest.MonkeyPatch,
          make_client: Callable[..., kaibantrace.Telemetry]) -> Iterator[Setup]:
    """Telemetry on, sending to the test's collector, or opted out: by the environment for
    the targets' client and for child processes, and in code too for the test's own client."""
    on = request.param == "on"
    monkeypatch.setenv("KAIBAN_TELEMETRY_APP_ID", APP_ID)
    monkeypatch.setenv("KAIBAN_TELEMETRY_ENDPOINT", collector.url)
    if not on:
        monkeypatch.setenv("KAIBAN_TELEMETRY_OPT_OUT", "1")
    restore(targets.CLIENT)  # a sender of its own for this test's collector and state directory
    try:
        yield Setup(on, collector, make_client() if on else make_client(opt_out=True))
    finally:
        restore(targets.CLIENT)


async def _collect(stream: AsyncIterator[int]) -> List[int]:
    return [item async for item in stream]


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of tracked callable: how to get it, its undecorated twin, and a use of it."""

    name: str
    tracked: Callable[[], Any]
    plain: Callable[[], Any]
    use: Callable[[Any], Any]
    event: str
    module_level: bool  # a module's attribute, which pickle and copy return as itself

    def __str__(self) -> str:
        return self.name


KINDS = [
    Kind("function", lambda: targets.square, lambda: targets.plain_square,
         lambda f: f(3), "square", True),
    Kind("method", lambda: targets.Team(3).scale, lambda: targets.PlainTeam(3).scale,
         lambda f: f(2, offset=1), "scale", False),
    Kind("classmethod", lambda: targets.Team.sized, lambda: targets.PlainTeam.sized,
         lambda f: f(4), "sized", False),
    Kind("staticmethod", lambda: targets.Team.double, lambda: targets.PlainTeam.double,
         lambda f: f(5, twice=True), "double", False),
    Kind("coroutine function", lambda: targets.halve, lambda: targets.plain_halve,
         lambda f: asyncio.run(f(7)), "halve", True),
    Kind("generator function", lambda: targets.countdown, lambda: targets.plain_countdown,
         lambda f: list(f(5, 2)), "countdown", True),
    Kind("async generator function", lambda: targets.ticks, lambda: targets.plain_ticks,
         lambda f: asyncio.run(_collect(f(3, "a"))), "ticks", True),
]
MODULE_LEVEL = [kind for kind in KINDS if kind.module_level]


def check_pickle_round_trip(kind: Kind, obj: Any) -> int:
    """Pickle ``obj`` with every protocol from 2; what comes back works like the twin, and is
    ``obj`` itself for a module's function, else a method bound to an equal object.
    Returns how many times it was used."""
    uses = 0
    for protocol in PROTOCOLS:
        loaded = pickle.loads(pickle.dumps(obj, protocol))
        if kind.module_level:
            assert loaded is obj, protocol
        elif kind.name == "method":  # bound methods compare their instances by identity
            assert loaded.__self__ == obj.__self__ and loaded.__self__ is not obj.__self__, protocol
        else:
            assert loaded == obj, protocol
            if kind.name == "classmethod":
                assert loaded.__self__ is obj.__self__, protocol
        assert loaded.__name__ == obj.__name__
        assert kind.use(loaded) == kind.use(kind.plain()), protocol
        uses += 1
    return uses


class TestPickle:
    @pytest.mark.parametrize("kind", KINDS, ids=str)
    def test_tracked_callables_pickle(self, setup: Setup, kind: Kind) -> None:
        """Every kind pickles with protocols 2 to the highest, and what comes back is still
        tracked: a module's function is the same object, a method is bound to an equal object."""
        uses = check_pickle_round_trip(kind, kind.tracked())
        setup.delivered({kind.event: uses})

    @pytest.mark.parametrize("kind", KINDS, ids=str)
    def test_the_checks_hold_for_the_undecorated_twins(self, kind: Kind) -> None:
        """The round trip above, applied to the undecorated twins, holds: it asks of tracked
        callables only what plain ones do."""
        assert check_pickle_round_trip(kind, kind.plain()) == len(PROTOCOLS)

    def test_an_instance_holding_tracked_callables_pickles(self, setup: Setup) -> None:
        """An object whose attributes are a tracked function and a tracked bound method
        pickles; the function comes back as itself, the method bound to the copy's team."""
        holder = targets.Holder(targets.Team(2))
        for protocol in PROTOCOLS:
            loaded = pickle.loads(pickle.dumps(holder, protocol))
            assert loaded == holder
            assert loaded.callback is targets.square
            assert loaded.action.__self__ is loaded.team
            assert loaded.action(5) == 10
        setup.delivered({"scale": len(PROTOCOLS)})


class TestCopy:
    @pytest.mark.parametrize("kind", MODULE_LEVEL, ids=str)
    def test_copying_a_tracked_function_returns_it(self, setup: Setup, kind: Kind) -> None:
        """copy.copy and copy.deepcopy return a tracked function itself, as for a plain one."""
        obj = kind.tracked()
        assert copy.copy(obj) is obj
        assert copy.deepcopy(obj) is obj
        assert copy.deepcopy([obj, {"f": obj}]) == [obj, {"f": obj}]
        setup.delivered({})

    def test_copying_a_local_tracked_function_returns_it(self, setup: Setup) -> None:
        """A function tracked inside another function copies as itself too, and still tracks."""
        @setup.client.track("local")
        def local(x: int) -> int:
            return x + 1

        assert copy.copy(local) is local
        assert copy.deepcopy(local) is local
        assert copy.deepcopy(local)(1) == 2
        setup.delivered({"local": 1})

    @pytest.mark.parametrize("kind", [k for k in KINDS if not k.module_level], ids=str)
    def test_copying_methods(self, setup: Setup, kind: Kind) -> None:
        """Copies of tracked methods work and stay bound as the undecorated ones do: to the same
        instance for copy.copy, to a copy of it for copy.deepcopy, to the class for classmethods."""
        obj = kind.tracked()
        shallow, deep = copy.copy(obj), copy.deepcopy(obj)
        assert shallow == obj
        plain = kind.plain()
        if inspect.ismethod(plain):
            plain_deep = copy.deepcopy(plain)
            assert shallow.__self__ is obj.__self__
            assert (deep.__self__ is obj.__self__) == (plain_deep.__self__ is plain.__self__)
            assert deep.__self__ == obj.__self__
        expected = kind.use(plain)
        assert kind.use(shallow) == expected and kind.use(deep) == expected
        setup.delivered({kind.event: 2})

    def test_copying_instances_of_a_class_with_tracked_methods(self, setup: Setup) -> None:
        """Instances of a class with tracked methods, and objects holding tracked callables,
        copy and deep-copy; the copies' methods work and are still tracked."""
        team = targets.Team(3)
        for copied in (copy.copy(team), copy.deepcopy(team)):
            assert copied == team and copied is not team
            assert copied.scale(2) == 6
        holder = targets.Holder(team)
        shallow = copy.copy(holder)
        assert shallow.callback is targets.square and shallow.action.__self__ is team
        deep = copy.deepcopy(holder)
        assert deep.callback is targets.square
        assert deep.team == team and deep.team is not team
        assert deep.action.__self__ is deep.team
        assert deep.action(4) == 12 and deep.callback(2) == 4
        setup.delivered({"scale": 3, "square": 1})


class TestIntrospection:
    @pytest.mark.parametrize("kind", KINDS, ids=str)
    def test_signature_name_and_doc_are_the_originals(self, setup: Setup, kind: Kind) -> None:
        """inspect.signature, __name__ and __doc__ of each kind equal the undecorated twin's."""
        tracked, plain = kind.tracked(), kind.plain()
        assert inspect.signature(tracked) == inspect.signature(plain)
        assert str(inspect.signature(tracked)) == str(inspect.signature(plain))
        assert tracked.__name__ == plain.__name__.replace("plain_", "")  # the twins' names
        assert tracked.__doc__ == plain.__doc__
        setup.delivered({})


def user_decorator(func: F) -> F:
    """A decorator written the usual way, with functools.wraps."""
    @functools.wraps(func)
    def inner(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return inner  # type: ignore[return-value]


class TestWrapsChains:
    def test_a_wraps_decorator_over_a_tracked_function(self, setup: Setup) -> None:
        """functools.wraps on top of a tracked function: signature, name and doc are the
        original's, __wrapped__ is the tracked function, and inspect.unwrap reaches the original."""
        outer = user_decorator(targets.square)
        assert inspect.signature(outer) == inspect.signature(targets.plain_square)
        assert outer.__name__ == "square" and outer.__doc__ == targets.plain_square.__doc__
        assert outer.__wrapped__ is targets.square  # type: ignore[attr-defined]
        assert inspect.unwrap(outer) is targets.ORIGINALS["square"]
        assert outer(3) == 9
        setup.delivered({"square": 1})

    def test_tracking_a_function_wrapped_with_wraps(self, setup: Setup) -> None:
        """Tracking a function that functools.wraps already wraps: signature, name and doc are
        the original's, and the __wrapped__ chain leads through the user's wrapper to it."""
        wrapped = user_decorator(targets.plain_square)
        tracked = setup.client.track("chained")(wrapped)
        assert inspect.signature(tracked) == inspect.signature(targets.plain_square)
        assert tracked.__name__ == "plain_square" and tracked.__doc__ == targets.plain_square.__doc__
        assert inspect.unwrap(tracked) is targets.plain_square
        chain = []
        current: Any = tracked
        while hasattr(current, "__wrapped__"):
            current = current.__wrapped__
            chain.append(current)
        assert wrapped in chain and chain[-1] is targets.plain_square
        assert tracked(4) == 16
        setup.delivered({"chained": 1})

    def test_tracked_between_two_wraps_decorators(self, setup: Setup) -> None:
        """A tracked function between two functools.wraps decorators keeps the chain whole."""
        def add(a: int, b: int = 1) -> int:
            """Add."""
            return a + b

        stacked = user_decorator(setup.client.track("stacked")(user_decorator(add)))
        assert inspect.signature(stacked) == inspect.signature(add)
        assert stacked.__name__ == "add" and stacked.__doc__ == "Add."
        assert inspect.unwrap(stacked) is add
        assert stacked(1, b=2) == 3
        setup.delivered({"stacked": 1})

    def test_wraps_over_tracked_methods(self, setup: Setup) -> None:
        """functools.wraps on top of tracked methods of each kind keeps their signatures."""
        team = targets.Team(2)
        for tracked, plain in ((team.scale, targets.PlainTeam(2).scale),
                               (targets.Team.sized, targets.PlainTeam.sized),
                               (targets.Team.double, targets.PlainTeam.double)):
            outer = user_decorator(tracked)
            if sys.version_info < (3, 10) and inspect.ismethod(tracked):
                # Python 3.9's inspect.signature follows __wrapped__ on through a bound
                # method whose function has one, as for any decorated method (with
                # functools.wraps too), and so shows self or cls; 3.10 stops at the method.
                expected = inspect.signature(tracked.__func__.__wrapped__)
            else:
                expected = inspect.signature(plain)
            assert inspect.signature(outer) == expected
            assert outer.__name__ == plain.__name__
        assert user_decorator(team.scale)(3) == 6
        setup.delivered({"scale": 1})


class TestCallersModule:
    def test_a_tracked_function_sees_its_callers_module(self, setup: Setup) -> None:
        """sys._getframe(1).f_globals["__name__"] inside a tracked function names the module
        that called it, not kaibantrace's."""
        assert targets.caller_module() == __name__
        setup.delivered({"caller_module": 1})

    def test_a_tracked_namedtuple_factory_makes_picklable_classes(
            self, setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
        """collections.namedtuple, tracked, gives its class the calling module, so instances
        of a class kept at module level pickle."""
        tracked_namedtuple = setup.client.track("namedtuple")(collections.namedtuple)
        point_class: Any = tracked_namedtuple("InvisiblePoint", "x y")
        assert point_class.__module__ == __name__
        monkeypatch.setattr(sys.modules[__name__], "InvisiblePoint", point_class, raising=False)
        point = point_class(1, 2)
        for protocol in PROTOCOLS:
            assert pickle.loads(pickle.dumps(point, protocol)) == point
        setup.delivered({"namedtuple": 1})

    def test_a_tracked_enum_factory_makes_picklable_enums(
            self, setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
        """An enum made with the functional API by a tracked factory that names the caller's
        module belongs to the calling module, and its members pickle."""
        colour = targets.make_enum("InvisibleColour", "RED GREEN")
        assert colour.__module__ == __name__
        monkeypatch.setattr(sys.modules[__name__], "InvisibleColour", colour, raising=False)
        for protocol in PROTOCOLS:
            assert pickle.loads(pickle.dumps(colour["RED"], protocol)) is colour["RED"]
        setup.delivered({"make_enum": 1})

    def test_the_frame_above_a_tracked_function_is_its_callers(self, setup: Setup) -> None:
        """sys._getframe(1) inside a tracked function is the caller's frame itself: no frame of
        kaibantrace's stands between them."""
        frame = targets.caller_frame()
        assert frame.f_code is sys._getframe(0).f_code
        setup.delivered({"caller_frame": 1})


# Forking while kaibantrace's sender thread runs is part of what is under test.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
class TestProcesses:
    INPUTS = [1, 2, 3]

    @pytest.fixture(autouse=True)
    def fresh_forkserver(self) -> Iterator[None]:
        """The forkserver is started once and keeps the environment of the test that started
        it (another test's collector and state directory): each test gets its own."""
        yield
        if "forkserver" in multiprocessing.get_all_start_methods():
            from multiprocessing import forkserver

            forkserver._forkserver._stop()  # type: ignore[attr-defined]

    # Every kind, handed to the worker by pickling: a function, a bound method, a classmethod,
    # a staticmethod, and coroutine, generator and async generator functions (whose work
    # targets.run does in the worker).
    CALLABLES = {"square": targets.square, "scale": targets.Team(3).scale,
                 "sized": targets.Team.sized, "double": targets.Team.double,
                 "halve": functools.partial(targets.run, targets.halve),
                 "countdown": functools.partial(targets.run, targets.countdown),
                 "ticks": functools.partial(targets.run, targets.ticks)}

    def expected(self) -> Dict[str, List[Any]]:
        """The results, computed by the tracked callables in this process (which emits)."""
        return {name: [func(x) for x in self.INPUTS] for name, func in self.CALLABLES.items()}

    def check(self, setup: Setup, results: Dict[str, List[Any]], *, children_end: bool) -> None:
        """The results are right; the parent's events arrive, and so do the children's when
        the workers ended by themselves (``children_end``). Workers ended by
        ``Pool.terminate()`` are killed, and may lose what they had not written yet."""
        assert results == self.expected()
        n = len(self.INPUTS)
        if children_end:  # saved by each worker as it ends, sent by the parent's flush
            setup.delivered({name: 2 * n for name in self.CALLABLES})
        else:
            setup.delivered({name: n for name in self.CALLABLES},
                            children={name: n for name in self.CALLABLES})

    def pool_map(self, pool: Any) -> Dict[str, List[Any]]:
        return {name: list(pool.map(func, self.INPUTS)) for name, func in self.CALLABLES.items()}

    @pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
    def test_multiprocessing_pool_map(self, setup: Setup, method: str) -> None:
        """Pool.map runs a tracked function, staticmethod and classmethod in child processes;
        leaving the ``with`` block terminates the workers."""
        if method not in multiprocessing.get_all_start_methods():
            pytest.skip(f"no {method} start method here")
        with multiprocessing.get_context(method).Pool(2) as pool:
            results = self.pool_map(pool)
        self.check(setup, results, children_end=False)

    @pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
    def test_a_closed_pool_delivers_what_its_workers_recorded(self, setup: Setup,
                                                              method: str) -> None:
        """Workers that end by themselves (``close()`` and ``join()``) keep every event, also
        forked ones, which end with ``os._exit()`` and so skip atexit hooks."""
        if method not in multiprocessing.get_all_start_methods():
            pytest.skip(f"no {method} start method here")
        pool = multiprocessing.get_context(method).Pool(2)
        try:
            results = self.pool_map(pool)
        finally:
            pool.close()
            pool.join()
        self.check(setup, results, children_end=True)

    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_process_pool_executor_map(self, setup: Setup, method: str) -> None:
        """ProcessPoolExecutor.map runs a tracked function, staticmethod and classmethod, and
        every event its workers recorded arrives."""
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method)) as pool:
            results = self.pool_map(pool)
        self.check(setup, results, children_end=True)
