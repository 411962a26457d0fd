"""Reaching a server by name within a request's deadline.

``socket.create_connection`` resolves the name with ``getaddrinfo``, which
takes no timeout: a resolver that does not answer (a dead DNS server, a
captive network) holds the caller for as long as the system's resolver
settings allow, 30 seconds and more. The worker would then miss its deadline
and the backoff it decides from. So a name is looked up on a short-lived helper
thread, and the request waits for it only until its deadline.

A lookup that outlives one request is not started again by the next: that one
waits for the same lookup, so a resolver that hangs costs one stuck helper,
never a pile of them. Addresses are not cached: each new connection asks the
system, which keeps its own cache and honours the records' lifetimes. The same
bounded call serves the proxy decision, which on macOS and Windows may look
names up too (the system's proxy exceptions).

A name with several addresses (IPv6 and IPv4, say) gives each attempt its share
of the time left, so one address that drops packets cannot use up the deadline
before the next is tried.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

AddressInfo = Tuple[int, int, int, str, Tuple[object, ...]]


class _Call:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None


class Dialer:
    """Connects TCP sockets to ``(host, port)`` by name, resolution included in the deadline."""

    def __init__(self) -> None:
        self._calls: Dict[Hashable, _Call] = {}
        self._lock = threading.Lock()

    def connect(self, host: str, port: int, deadline: float) -> socket.socket:
        """A connected socket, or ``OSError`` (``TimeoutError`` once ``deadline`` has passed)."""
        error: Optional[OSError] = None
        addresses = self.resolve(host, port, deadline)
        for index, (family, kind, proto, _, address) in enumerate(addresses):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left(deadline) / (len(addresses) - index))  # a share of what is left
                sock.connect(address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
                if time.monotonic() >= deadline:
                    break
        if isinstance(error, socket.timeout) and not isinstance(error, TimeoutError):  # Python 3.9
            raise TimeoutError(str(error)) from error
        raise error or OSError(f"no address for {host}")

    def resolve(self, host: str, port: int, deadline: float) -> List[AddressInfo]:
        if _is_address(host):  # nothing to look up
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
        result: List[AddressInfo] = self.call(("getaddrinfo", host, port), lambda: [
            (int(family), int(kind), proto, canonical, tuple(address))
            for family, kind, proto, canonical, address in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM)], deadline, f"looking up {host}")
        return result

    def call(self, key: Hashable, function: Callable[[], Any], deadline: float, what: str) -> Any:
        """``function()`` on a helper thread, waited for until ``deadline`` only; a call with
        the same ``key`` still running is waited for rather than started again."""
        with self._lock:
            running = self._calls.get(key)
            started = running is None
            if running is None:
                running = self._calls[key] = _Call()
        if started:
            try:
                threading.Thread(target=self._run, args=(key, running, function),
                                 name="kaibantrace-resolver", daemon=True).start()
            except RuntimeError:  # no new threads (interpreter shutdown, a sandbox): call inline
                self._run(key, running, function)
        if not running.done.wait(left(deadline)):
            raise TimeoutError(f"{what} took longer than the request may")
        if running.error is not None:
            raise running.error
        return running.result

    def _run(self, key: Hashable, call: _Call, function: Callable[[], Any]) -> None:
        try:
            call.result = function()
        except BaseException as exc:  # handed to the waiting request
            call.error = exc if isinstance(exc, OSError) else OSError(str(exc))
        finally:
            with self._lock:
                if self._calls.get(key) is call:
                    del self._calls[key]
            call.done.set()

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's calls run on threads the child does not have."""
        self._calls = {}
        self._lock = threading.Lock()


def left(deadline: float) -> float:
    """Seconds until ``deadline``; ``TimeoutError`` once it has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the request ran out of time")
    return remaining


def _is_address(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):
            pass
    return False
