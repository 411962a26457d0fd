"""Fork safety: keep ``fork()`` from landing while our threads are inside SQLite or an import.

A child process inherits the parent's memory but only the thread that forked.
Had the sender's writer been inside SQLite (which holds mutexes of its own) or
its poster halfway through importing the TLS stack (which holds that module's import lock)
at that moment, the child would inherit those locks held by a thread that does
not exist there, and hang the first time it touched the outbox or imported
the module.

So those short sections run under ``guard()``, and the before-fork hook takes
the same locks: a fork waits for the section to end, and never lands inside
one. The wait is bounded, so a fork is at worst delayed, never blocked. The
child starts with fresh locks.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any, Callable, List, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

FORK_WAIT = 5.0  # seconds a fork waits for a thread to leave a guarded section

# Two locks, so that the outbox never waits for an import: one held around
# SQLite calls (it also keeps this process's threads from contending for the
# database's write lock), one around setting up the HTTP stack.
_locks = {"outbox": threading.RLock(), "setup": threading.RLock()}
_held_for_fork: List[threading.RLock] = []
_pid = os.getpid()


def guard(section: str = "setup") -> threading.RLock:
    """The lock to hold around a section a fork must not split (``with guard():``)."""
    return _locks[section]


def guarded(method: F) -> F:
    """Decorator for outbox methods: run ``method`` under ``guard("outbox")``."""
    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _locks["outbox"]:
            return method(*args, **kwargs)
    return run  # type: ignore[return-value]


def before_fork() -> None:
    deadline = time.monotonic() + FORK_WAIT
    for name in ("setup", "outbox"):  # always in this order
        lock = _locks[name]
        if lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            _held_for_fork.append(lock)


def after_fork_in_parent() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


def after_fork_in_child() -> None:
    global _pid
    for name in _locks:
        _locks[name] = threading.RLock()
    _held_for_fork.clear()
    _pid = os.getpid()


def ensure_fresh_in_child() -> bool:
    """For a fork from C, which runs no hooks: fresh locks if this is a new process."""
    if os.getpid() == _pid:
        return False
    after_fork_in_child()
    return True
