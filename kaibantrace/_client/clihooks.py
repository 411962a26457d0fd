"""``track_cli`` on a click or typer application: counted however it is started.

A click application is started by calling it (``cli()``), but also by its
``main`` method, which is what click's ``CliRunner`` calls, and so what every
test of a click application runs. A typer application's ``CliRunner`` does not
call the application at all: it asks typer for the click command the
application becomes and runs that command's ``main``.

So the tracked proxy of a CLI answers three more names than a tracked
function does, each only for the kind of object that has it:

* ``main`` of a click command: the same method, recording the event first
  (or, with ``duration=True``, timing it);
* ``info``, ``registered_callback`` and ``registered_commands`` of a typer
  application: the same objects seen through a view whose ``cls``, the class
  of the click command typer builds, is a subclass whose ``main`` records the
  event first. Every other read and write reaches the real object, so the
  application itself is never changed, and calling it records the event once,
  as before.

Whatever goes wrong here, the attribute is answered as it is, untracked: a
CLI must never fail because of its telemetry.
"""

from __future__ import annotations

import functools
from typing import Any, Dict

import wrapt

from .._log import logger
from .timing import run_steps
from .wrappers import Start, Tracked, _get, lookup

_TYPER_NAMES = frozenset({"info", "registered_callback", "registered_commands"})



class TrackedCli(Tracked):
    """A tracked CLI entry point: a function, a click command or a typer application."""

    def __init__(self, wrapped: Any, start: Start, steps: Any) -> None:
        super().__init__(wrapped, start)
        self._self_steps = steps  # timing.Firing or Timing: what happens around ``main``
        self._self_classes: Dict[type, type] = {}

    def __getattribute__(self, name: str) -> Any:
        if name != "main" and name not in _TYPER_NAMES:
            return super().__getattribute__(name)
        value = lookup(self, name)
        try:
            return _tracked_attribute(self, name, value)
        except Exception:
            logger.debug("kaibantrace: could not track %s of the CLI", name, exc_info=True)
            return value


def _tracked_attribute(proxy: Any, name: str, value: Any) -> Any:
    wrapped = _get(proxy, "__wrapped__")
    if name == "main":
        if callable(value) and hasattr(wrapped, "make_context"):  # a click command
            return functools.partial(_main, _get(proxy, "_self_steps"), wrapped)
        return value
    if not _is_typer(wrapped):
        return value
    from typer.core import TyperCommand, TyperGroup  # type: ignore[import-not-found,unused-ignore]

    if name == "info":
        return _with_class(value, proxy, TyperGroup)
    if name == "registered_callback":
        return None if value is None else _with_class(value, proxy, TyperGroup, only_if_set=True)
    if len(value) == 1 and not wrapped.registered_groups and not _typer_has_callback(wrapped):
        return _FirstWithClass(value, lambda item: _with_class(item, proxy, TyperCommand))
    return value


def _main(steps: Any, command: Any, /, *args: Any, **kwargs: Any) -> Any:
    return run_steps(steps, command, command.main, args, kwargs)


def _is_typer(value: Any) -> bool:
    kind = type(value)
    return kind.__name__ == "Typer" and kind.__module__.startswith("typer")


def _typer_has_callback(app: Any) -> bool:
    return bool(app.registered_callback) or _given(app.info.callback) is not None


def _given(value: Any) -> Any:
    """A typer setting's value, or ``None`` when it is still typer's placeholder default."""
    return None if type(value).__name__ == "DefaultPlaceholder" else value


def _with_class(info: Any, proxy: Any, default: type, *, only_if_set: bool = False) -> Any:
    """typer's ``info`` as it is, but with a ``cls`` that records the event in ``main``."""
    base = _given(info.cls)
    if base is None:
        if only_if_set:
            return info
        base = default
    classes = _get(proxy, "_self_classes")
    tracked = classes.get(base)
    if tracked is None:
        tracked = classes[base] = _recording_subclass(base, _get(proxy, "_self_steps"))
    return _WithClass(info, tracked)


class _WithClass(wrapt.ObjectProxy):  # type: ignore[type-arg,misc,unused-ignore]
    """One of typer's info objects seen through: every read and write reaches it, so the
    author's ``app.info.help = ...`` still counts, but ``cls`` reads the recording class."""

    def __init__(self, info: Any, cls: type) -> None:
        super().__init__(info)
        self._self_cls = cls

    @property
    def cls(self) -> Any:
        return self._self_cls

    @cls.setter
    def cls(self, value: Any) -> None:
        self.__wrapped__.cls = value


class _FirstWithClass(wrapt.ObjectProxy):  # type: ignore[type-arg,misc,unused-ignore]
    """The application's list of commands, itself, whose first item typer reads with the
    recording class when it makes an application of one command."""

    def __init__(self, commands: Any, cls_of: Any) -> None:
        super().__init__(commands)
        self._self_cls_of = cls_of

    def __getitem__(self, index: Any) -> Any:
        item = self.__wrapped__[index]
        return self._self_cls_of(item) if index == 0 else item


def _recording_subclass(base: type, steps: Any) -> type:
    def main(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(base.main, self)  # type: ignore[attr-defined]
        return run_steps(steps, self, call, args, kwargs)

    return type(base.__name__, (base,), {"main": main, "__module__": base.__module__,
                                        "__qualname__": base.__qualname__})
