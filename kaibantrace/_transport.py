"""How a batch reaches the ingest service, behind a two-method seam.

A transport has ``send(url, body, timeout) -> Outcome`` and ``close()``. The
HTTP transport loads its HTTP client on the worker, never at import, and
maps every way a request can end onto the outcomes the sender understands,
following TelemetryDeck's own SDKs:

* ``SENT``: any 2xx;
* ``REJECTED``: 400, 401, 403, 404, 413, 422, 501, 505, and redirects: this
  batch will never be accepted, so it is dropped rather than retried;
* ``RETRY``: anything else (429, 5xx, timeouts, refused connections, DNS
  failures, a proxy that refuses or that kaibantrace cannot use), with the
  server's ``Retry-After`` when it gave one;
* ``RETIRED``: 410 Gone, the endpoint's way of saying it will never accept
  anything again: the kill switch an author uses to silence released clients.

There is no retry here: the sender owns the single retry loop.
"""

from __future__ import annotations

import enum
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Protocol, Union

from ._log import logger
from ._proxy import Proxy, UnsupportedProxy, may_be_configured, proxy_for
from ._version import __version__

if TYPE_CHECKING:
    from ._http import Client

USER_AGENT = f"kaibantrace/{__version__}"
_CONTENT_TYPE = "application/json; charset=utf-8"
_REJECTED = frozenset({400, 401, 403, 404, 413, 422, 501, 505})


class Result(enum.Enum):
    SENT = "sent"
    REJECTED = "rejected"
    RETRY = "retry"
    RETIRED = "retired"


class Outcome(NamedTuple):
    """How one request ended; ``detail`` is for logs and never holds payload data."""

    result: Result
    detail: str = ""
    retry_after: Optional[float] = None


class Transport(Protocol):
    """What the sender needs from a transport."""

    def send(self, url: str, body: bytes, timeout: float) -> Outcome: ...

    def close(self) -> None: ...


def outcome_for_status(status: int, retry_after: Optional[str] = None) -> Outcome:
    """The outcome TelemetryDeck's answer ``status`` means."""
    if 200 <= status < 300:
        return Outcome(Result.SENT, f"HTTP {status}")
    if status == 410:
        return Outcome(Result.RETIRED, "HTTP 410")
    if status in _REJECTED or 300 <= status < 400:
        return Outcome(Result.REJECTED, f"HTTP {status}")
    return Outcome(Result.RETRY, f"HTTP {status}", parse_retry_after(retry_after))


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (a number or an HTTP date), or ``None``."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        import email.utils  # deferred: rare, and costly to import

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(seconds, 3600.0))


class HttpTransport:
    """Posts batches: TLS verified, redirects never followed, no retries underneath.

    Through kaibantrace's own small HTTP client (``_http``), directly or through
    the proxy the user configured (``_proxy``), decided once per URL.
    """

    def __init__(self) -> None:
        self._direct: Optional[Client] = None
        self._routes: Dict[str, Union[Proxy, UnsupportedProxy, None]] = {}
        self._warned = False
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Load what sending needs (TLS, and the standard library's proxy settings where a
        proxy may apply) ahead of the first send.

        Called on the worker, under the fork guard, so that no import is split by a fork.
        """
        if may_be_configured():
            import urllib.request  # noqa: F401
        self._get_direct().prepare()

    def _get_direct(self) -> Client:
        with self._lock:
            if self._direct is None:
                from ._http import Client  # deferred: sockets and TLS only for a sender

                self._direct = Client(USER_AGENT)
            return self._direct

    def _proxy(self, client: Client, url: str, deadline: float) -> Optional[Proxy]:
        """The proxy for ``url``, decided once. On macOS and Windows the system's proxy
        exceptions may make the decision look names up, so it runs under the deadline."""
        if url not in self._routes:
            from ._http import split_url

            (scheme, host, port), _, _ = split_url(url)

            def decide() -> None:
                try:
                    self._routes[url] = proxy_for(scheme, host, port)
                except UnsupportedProxy as exc:
                    self._routes[url] = exc

            client.dialer.call(("proxy", url), decide, deadline, "deciding on a proxy")
        route = self._routes[url]
        if isinstance(route, UnsupportedProxy):
            raise route
        return route

    def send(self, url: str, body: bytes, timeout: float) -> Outcome:
        try:
            client = self._get_direct()
            deadline = time.monotonic() + timeout
            proxy = self._proxy(client, url, deadline)
            answer = client.post(url, body, _CONTENT_TYPE, deadline - time.monotonic(), proxy)
            return outcome_for_status(answer.status, answer.retry_after)
        except UnsupportedProxy as exc:  # never bypassed: the signals wait in the outbox
            if not self._warned:  # at once, as a short run may never reach the circuit breaker
                self._warned = True
                logger.warning("kaibantrace: %s; nothing is sent, signals wait in the outbox", exc)
            return Outcome(Result.RETRY, str(exc))
        except Exception as exc:  # every failure of the network is "try later"
            return Outcome(Result.RETRY, type(exc).__name__)

    def close(self) -> None:
        with self._lock:
            if self._direct is not None:
                self._direct.close()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections, which the parent still uses."""
        if self._direct is not None:
            self._direct.forget_after_fork()
        self._lock = threading.Lock()


class MemoryTransport:
    """Keeps every request body in memory and answers ``SENT``; for tests.

    ``bodies`` are the exact bytes that would have been posted; ``signals``
    is every signal decoded from them, in order.
    """

    def __init__(self) -> None:
        self.bodies: List[bytes] = []
        self.urls: List[str] = []
        self._lock = threading.Lock()

    def send(self, url: str, body: bytes, timeout: float) -> Outcome:
        with self._lock:
            self.urls.append(url)
            self.bodies.append(body)
        return Outcome(Result.SENT, "memory")

    @property
    def signals(self) -> List[Any]:
        import json

        with self._lock:
            return [signal for body in self.bodies for signal in json.loads(body)]

    def close(self) -> None:
        pass
