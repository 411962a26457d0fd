"""The object ``track`` returns: a transparent stand-in for the decorated callable.

It is a ``wrapt.ObjectProxy``, so every attribute, ``isinstance`` answer,
signature, docstring and comparison is the decorated callable's own. What it
adds, and why:

* **Calling it leaves no frame of ours on the stack.** ``__call__`` is not a
  method but a descriptor. When the proxy is called, Python looks the
  descriptor up and asks it for the callable to run; the descriptor records
  the event and answers with the decorated function itself, which Python then
  calls directly. So the function's caller is its caller:
  ``sys._getframe(1)``, ``sys._getframemodulename`` (what ``namedtuple`` and
  enum's functional API use to name the module of the classes they make),
  tracebacks and recursion depth are exactly as without telemetry. Only the
  cases that need the call's arguments (a payload callable, ``track_cli``)
  run one frame of ours, made with the *caller's* globals, so that even then
  the frame above the function reports the caller's module.
* **Reading ``__call__`` is not calling.** ``hasattr(f, "__call__")`` records
  nothing; what it returns records the event when it is called.
* **Methods bind like functions.** Looked up on an instance it gives a new
  proxy of the bound method (as a function gives a new bound method); on the
  class, itself; a tracked ``staticmethod`` gives the same proxy every time.
* **Pickling and copying work as for the original.** A function is pickled by
  reference (its module and qualified name, which name this proxy), a bound
  method as "this attribute of that object", as Python does for its own;
  ``copy`` and ``deepcopy`` return a function itself. So process pools (fork,
  spawn, forkserver) take tracked functions, and the child tracks them too.
"""

from __future__ import annotations

import functools
import sys
from types import FunctionType
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
        self._self_static: Optional[Tracked] = None

    def __getattribute__(self, name: str) -> Any:
        if name == "__call__":  # read, not called: call through the proxy when it is
            return functools.partial(_call, self)
        return _get(self, name)

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
                static = type(self)(bound, _get(self, "_self_start"))
                self._self_static = static
            return static
        return type(self)(bound, _get(self, "_self_start"))

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


def _call(proxy: Any, *args: Any, **kwargs: Any) -> Any:
    return proxy(*args, **kwargs)


def _is_bound_method(value: Any) -> bool:
    return getattr(value, "__self__", None) is not None and hasattr(value, "__func__")


# -- one frame of ours, in the caller's name ----------------------------------------


def _through(_before: Any, _target: Any, /, *args: Any, **kwargs: Any) -> Any:
    # Uses only its arguments (no global name), so it runs unchanged under any globals.
    _before(_target, args, kwargs)
    return _target(*args, **kwargs)


_runners: Dict[int, Tuple[Dict[str, Any], Any]] = {}
_RUNNERS_KEPT = 256


def call_with_caller_globals(before: Callable[[Any, Any, Any], Any], target: Any,
                             depth: int) -> Any:
    """A callable that runs ``before(target, args, kwargs)`` then ``target``, whose one frame
    carries the globals of the frame ``depth`` levels above this function's caller."""
    try:
        module_globals = sys._getframe(depth + 1).f_globals
    except ValueError:  # called from the top of a thread: no caller to imitate
        return functools.partial(_through, before, target)
    entry = _runners.get(id(module_globals))
    if entry is None or entry[0] is not module_globals:
        if len(_runners) >= _RUNNERS_KEPT:
            _runners.clear()  # code run by exec() with fresh globals each time: keep it bounded
        code = _through.__code__
        runner = FunctionType(code, module_globals, code.co_name)
        runner.__qualname__ = _through.__qualname__
        entry = _runners[id(module_globals)] = (module_globals, runner)
    return functools.partial(entry[1], before, target)
