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
system, which keeps its own cache and honours the records' lifetimes.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Dict, List, Optional, Tuple

AddressInfo = Tuple[int, int, int, str, Tuple[object, ...]]


class _Lookup:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: List[AddressInfo] = []
        self.error: Optional[BaseException] = None


class Dialer:
    """Connects TCP sockets to ``(host, port)`` by name, resolution included in the deadline."""

    def __init__(self) -> None:
        self._lookups: Dict[Tuple[str, int], _Lookup] = {}
        self._lock = threading.Lock()

    def connect(self, host: str, port: int, deadline: float) -> socket.socket:
        """A connected socket, or ``OSError`` (``TimeoutError`` once ``deadline`` has passed)."""
        error: Optional[OSError] = None
        for family, kind, proto, _, address in self.resolve(host, port, deadline):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left(deadline))
                sock.connect(address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
                if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
                    break
        raise error or OSError(f"no address for {host}")

    def resolve(self, host: str, port: int, deadline: float) -> List[AddressInfo]:
        if _is_address(host):  # nothing to look up
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
        key = (host, port)
        with self._lock:
            lookup = self._lookups.get(key)
            started = lookup is None
            if lookup is None:
                lookup = self._lookups[key] = _Lookup()
        if started:
            try:
                threading.Thread(target=self._look_up, args=(key, lookup),
                                 name="kaibantrace-resolver", daemon=True).start()
            except RuntimeError:  # no new threads (interpreter shutdown, a sandbox): ask inline
                self._look_up(key, lookup)
        if not lookup.done.wait(left(deadline)):
            raise TimeoutError(f"looking up {host} took longer than the request may")
        if lookup.error is not None:
            raise lookup.error
        return lookup.result

    def _look_up(self, key: Tuple[str, int], lookup: _Lookup) -> None:
        try:
            lookup.result = [
                (int(family), int(kind), proto, canonical, tuple(address))
                for family, kind, proto, canonical, address in socket.getaddrinfo(
                    key[0], key[1], type=socket.SOCK_STREAM)]
        except BaseException as exc:  # handed to the waiting request
            lookup.error = exc if isinstance(exc, OSError) else OSError(str(exc))
        finally:
            with self._lock:
                if self._lookups.get(key) is lookup:
                    del self._lookups[key]
            lookup.done.set()

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's lookups run on threads the child does not have."""
        self._lookups = {}
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
