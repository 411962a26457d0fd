"""The object ``track`` returns: a transparent stand-in for the decorated callable.

It is a ``wrapt.ObjectProxy``, so every attribute, signature, docstring and
comparison is the decorated callable's own. What it adds, and why:

* **Calling it leaves no frame of ours on the stack.** ``__call__`` is not a
  method but a descriptor. When the proxy is called, Python looks the
  descriptor up and asks it for the callable to run; the descriptor records
  the event and answers with the decorated function itself, which Python then
  calls directly. So the function's caller is its caller:
  ``sys._getframe(1)``, ``sys._getframemodulename`` (what ``namedtuple`` and
  enum's functional API use to name the module of the classes they make) and
  tracebacks are as without telemetry. (The call does pass through C, as any
  object's call does, which costs recursion depth.) Only the cases that need
  the call's arguments (a payload callable, ``track_cli``) run one frame of
  ours, made with the *caller's* globals, so that even then the frame above
  the function reports the caller's module.
* **Reading ``__call__`` is not calling.** ``hasattr(f, "__call__")`` records
  nothing; what it returns records the event when it is called.
* **It is a function, not a container.** wrapt's proxy forwards iteration,
  numbers and context management for any object; a function has none of
  them, so ``isinstance(f, Iterable)`` and ``hasattr(f, "__enter__")`` must
  not say otherwise.
* **Methods bind like functions.** Read from an instance it gives a real bound
  method whose ``__func__`` is this proxy (so ``WeakMethod``, pickling and
  copying treat it as any method); from the class, itself; a tracked
  ``staticmethod`` gives the same proxy every time.
* **Pickling and copying work as for the original.** A function is pickled by
  reference (its module and qualified name, which name this proxy); ``copy``
  and ``deepcopy`` return a function itself. So process pools (fork, spawn,
  forkserver) take tracked functions, and the child tracks them too.
"""

from __future__ import annotations

import functools
import sys
from types import FunctionType, MethodType
from typing import Any, Callable, Dict, Optional, Tuple

import wrapt

# What a proxy runs when it is called: given the decorated callable (bound, for
# a method) and how many frames up its caller is, the callable Python should
# call with the call's arguments.
Start = Callable[[Any, int], Any]

_get = wrapt.ObjectProxy.__getattribute__  # the proxy's own lookup, from C


class _CallHook:
    """``Tracked.__call__``: called through, it records and hands Python the real callable."""

    __slots__ = ()

    def __get__(self, proxy: Any, owner: Any = None) -> Any:
        if proxy is None:
            return self
        return _get(proxy, "_self_start")(_get(proxy, "__wrapped__"), 2)


class Tracked(wrapt.ObjectProxy):  # type: ignore[type-arg,misc,unused-ignore]
    """A tracked callable; see the module docstring."""

    __call__ = _CallHook()

    def __init__(self, wrapped: Any, start: Start) -> None:
        super().__init__(wrapped)
        self._self_start = start
        self._self_static: Optional[Tracked] = None  # a staticmethod's function, tracked
        self._self_function: Optional[Tracked] = None  # a classmethod's function, tracked

    def __getattribute__(self, name: str) -> Any:
        if name == "__call__":  # read, not called: call through the proxy when it is
            return functools.partial(_call, self)
        if name in _NOT_OF_A_FUNCTION:  # the function's own answer, not the proxy's forwarding
            return getattr(_get(self, "__wrapped__"), name)
        return _get(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "__wrapped__":
            # functools.wraps applied over a tracked function sets this: it belongs to the
            # function, as without telemetry; the proxy goes on calling what it tracks.
            setattr(_get(self, "__wrapped__"), name, value)
        else:
            wrapt.ObjectProxy.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return repr(_get(self, "__wrapped__"))

    def __set_name__(self, owner: Any, name: str) -> None:
        wrapped = _get(self, "__wrapped__")
        hook = getattr(type(wrapped), "__set_name__", None)
        if hook is not None:
            hook(wrapped, owner, name)
        if name in _IMPLICIT_CLASSMETHODS and isinstance(wrapped, FunctionType):
            # Python makes these classmethods only when the class body holds a plain function.
            setattr(owner, name, classmethod(self))

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        wrapped = _get(self, "__wrapped__")
        binder = getattr(type(wrapped), "__get__", None)
        if binder is None:
            return self  # a callable object: attributes do not bind
        bound = binder(wrapped, instance, owner)
        if bound is wrapped:
            return self  # a function read from its class
        if not _is_bound_method(bound):  # a staticmethod: the same function each time
            static = _get(self, "_self_static")
            if static is None or _get(static, "__wrapped__") is not bound:
                static = Tracked(bound, _get(self, "_self_start"))
                self._self_static = static
            return static
        # A real bound method of the tracked function, as Python binds a function: its
        # __func__ is this proxy, so calling it records the event, and pickling, copying,
        # comparing it and weakref.WeakMethod work as for any method.
        if bound.__func__ is wrapped:
            return MethodType(self, bound.__self__)
        function = _get(self, "_self_function")  # a classmethod: its function, tracked
        if function is None or _get(function, "__wrapped__") is not bound.__func__:
            function = Tracked(bound.__func__, _get(self, "_self_start"))
            self._self_function = function
        return MethodType(function, bound.__self__)

    def __reduce_ex__(self, protocol: Any) -> Any:
        wrapped = _get(self, "__wrapped__")
        if _is_bound_method(wrapped):
            return getattr, (wrapped.__self__, wrapped.__func__.__name__)
        qualname = getattr(wrapped, "__qualname__", None)
        if isinstance(qualname, str):
            return qualname  # by reference: the module's attribute of that name is this proxy
        return wrapped.__reduce_ex__(protocol)  # a callable object: pickled as it would be

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: Dict[int, Any]) -> Any:
        wrapped = _get(self, "__wrapped__")
        if _is_bound_method(wrapped) and not isinstance(wrapped.__self__, type):
            import copy

            # As Python deep-copies a bound method: the same method of a copy of its object.
            return getattr(copy.deepcopy(wrapped.__self__, memo), wrapped.__func__.__name__)
        return self


# What wrapt's proxy answers for any object and a function has not (iteration, numbers,
# context managers...): left out, so that isinstance(f, Iterable), hasattr(f, "__enter__")
# and the typing protocols answer as for the function.
def _a_function() -> None:
    pass


_NOT_OF_A_FUNCTION = frozenset(
    name for name in dir(wrapt.ObjectProxy)
    if name.startswith("__") and not hasattr(_a_function, name) and name not in {
        "__bool__", "__copy__", "__deepcopy__", "__getattr__", "__wrapped__",
        "__object_proxy__", "__self_setattr__", "__mro_entries__", "__fspath__"})
for _name in _NOT_OF_A_FUNCTION:
    setattr(Tracked, _name, None)
del _name

_IMPLICIT_CLASSMETHODS = ("__init_subclass__", "__class_getitem__")


def lookup(proxy: Any, name: str) -> Any:
    """An attribute of the proxy as ``getattr`` finds it, also where ``wrapt`` runs without
    its C extension, whose proxies find the wrapped object's attributes in ``__getattr__``."""
    try:
        return _get(proxy, name)
    except AttributeError:
        fallback = getattr(type(proxy), "__getattr__", None)
        if fallback is None:
            raise
        return fallback(proxy, name)


def _call(proxy: Any, /, *args: Any, **kwargs: Any) -> Any:
    return proxy(*args, **kwargs)


def _is_bound_method(value: Any) -> bool:
    return getattr(value, "__self__", None) is not None and hasattr(value, "__func__")


# -- one frame of ours, in the caller's name ----------------------------------------


def _through(_before: Any, _target: Any, /, *args: Any, **kwargs: Any) -> Any:
    # Uses only its arguments (no global name), so it runs unchanged under any globals.
    _before(_target, args, kwargs)
    return _target(*args, **kwargs)


_runners: Dict[Tuple[int, int], Tuple[Dict[str, Any], Any]] = {}
_RUNNERS_KEPT = 256


def in_caller_globals(template: Any, depth: int = 1) -> Any:
    """``template`` (a function using only its arguments and builtins) made anew with the
    globals of the frame ``depth`` levels above the function calling this one, so that its
    frame reports that caller's module."""
    try:
        module_globals = sys._getframe(depth + 1).f_globals
    except ValueError:  # called from the top of a thread: no caller to imitate
        return template
    key = (id(template), id(module_globals))
    entry = _runners.get(key)
    if entry is None or entry[0] is not module_globals:
        if len(_runners) >= _RUNNERS_KEPT:
            _runners.clear()  # code run by exec() with fresh globals each time: keep it bounded
        code = template.__code__
        runner = FunctionType(code, module_globals, code.co_name)
        runner.__qualname__ = template.__qualname__
        entry = _runners[key] = (module_globals, runner)
    return entry[1]


def call_with_caller_globals(before: Callable[[Any, Any, Any], Any], target: Any,
                             depth: int) -> Any:
    """A callable that runs ``before(target, args, kwargs)`` then ``target``, whose one frame
    carries the globals of the frame ``depth`` levels above this function's caller."""
    return functools.partial(in_caller_globals(_through, depth + 1), before, target)
