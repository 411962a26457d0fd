"""Fork safety: keep ``fork()`` from landing while the worker is inside SQLite or an import.

A child process inherits the parent's memory but only the thread that forked.
Had the worker thread been inside SQLite (which holds mutexes of its own) or
halfway through importing ``requests`` (which holds that module's import lock)
at that moment, the child would inherit those locks held by a thread that does
not exist there, and hang the first time it touched the outbox or imported
the module.

So the worker does those short sections under ``guard()``, and the before-fork
hook takes the same lock: a fork waits for the section to end, and never
lands inside one. The wait is bounded, so a fork is at worst delayed, never
blocked. The child starts with a fresh lock.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

FORK_WAIT = 5.0  # seconds a fork waits for the worker to leave a guarded section

_lock = threading.RLock()
_held_for_fork = False
_pid = os.getpid()


def guard() -> threading.RLock:
    """The lock to hold around a section a fork must not split (``with guard():``)."""
    return _lock


def guarded(method: F) -> F:
    """Decorator: run ``method`` under ``guard()``."""
    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            return method(*args, **kwargs)
    return run  # type: ignore[return-value]


def before_fork() -> None:
    global _held_for_fork
    _held_for_fork = _lock.acquire(timeout=FORK_WAIT)


def after_fork_in_parent() -> None:
    global _held_for_fork
    if _held_for_fork:
        _held_for_fork = False
        _lock.release()


def after_fork_in_child() -> None:
    global _lock, _held_for_fork, _pid
    _lock = threading.RLock()
    _held_for_fork = False
    _pid = os.getpid()


def ensure_fresh_in_child() -> None:
    """For a fork from C, which runs no hooks: a fresh lock if this is a new process."""
    if os.getpid() != _pid:
        after_fork_in_child()
