"""How a batch reaches the ingest service, behind a two-method seam.

A transport has ``send(url, body, timeout) -> Outcome`` and ``close()``. The
HTTP transport imports ``requests`` on its first send, never at import, and
maps every way a request can end onto three outcomes the sender understands,
following TelemetryDeck's own SDKs:

* ``SENT``: any 2xx;
* ``REJECTED``: 400, 401, 403, 404, 413, 422, 501, 505, and redirects: this
  batch will never be accepted, so it is dropped rather than retried;
* ``RETRY``: anything else (429, 5xx, timeouts, refused connections, DNS
  failures), with the server's ``Retry-After`` when it gave one;
* ``RETIRED``: 410 Gone, the endpoint's way of saying it will never accept
  anything again: the kill switch an author uses to silence released clients.

There is no retry here: the sender owns the single retry loop.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Protocol

from ._version import __version__

if TYPE_CHECKING:
    import requests

    from ._http import Client

USER_AGENT = f"kaibantrace/{__version__}"
_MAX_ANSWER_READ = 64 * 1024
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

    Directly, with kaibantrace's own small HTTP client (``_http``), unless a
    proxy is configured for the URL's scheme: then through ``requests``, which
    knows proxies (environment variables, and the system's settings on macOS and
    Windows). ``requests`` is imported only in that case.
    """

    def __init__(self) -> None:
        self._direct: Optional[Client] = None
        self._session: Optional[requests.Session] = None
        self._proxied: Dict[str, bool] = {}
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Load what sending needs (TLS, or ``requests`` for a proxy) ahead of the first send.

        Called on the worker, under the fork guard, so that no import is split by a fork.
        """
        if self._uses_proxy("https://") or self._uses_proxy("http://"):
            self._get_session()
        self._get_direct().prepare()

    def _uses_proxy(self, url: str) -> bool:
        scheme = url.partition(":")[0].lower()
        known = self._proxied.get(scheme)
        if known is None:
            known = self._proxied[scheme] = _proxy_configured(scheme)
        return known

    def _get_direct(self) -> Client:
        with self._lock:
            if self._direct is None:
                from ._http import Client  # deferred: sockets and TLS only for a sender

                self._direct = Client(USER_AGENT)
            return self._direct

    def _get_session(self) -> requests.Session:
        with self._lock:
            if self._session is None:
                import requests  # deferred: about 90 ms that most programs never need

                session = requests.Session()
                session.headers["User-Agent"] = USER_AGENT
                # The sender owns the only retry loop: no urllib3 retries underneath it.
                adapter = requests.adapters.HTTPAdapter(max_retries=0)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                self._session = session
            return self._session

    def send(self, url: str, body: bytes, timeout: float) -> Outcome:
        try:
            if self._uses_proxy(url):
                return self._send_through_proxy(url, body, timeout)
            answer = self._get_direct().post(url, body, _CONTENT_TYPE, timeout)
            return outcome_for_status(answer.status, answer.retry_after)
        except Exception as exc:  # every failure of the network is "try later"
            return Outcome(Result.RETRY, type(exc).__name__)

    def _send_through_proxy(self, url: str, body: bytes, timeout: float) -> Outcome:
        response = self._get_session().post(
            url,
            data=body,
            headers={"Content-Type": _CONTENT_TYPE},
            timeout=(min(timeout, 2.0), timeout),
            allow_redirects=False,
            stream=True,  # read below only when small, so a huge answer costs nothing
        )
        try:
            outcome = outcome_for_status(response.status_code, response.headers.get("Retry-After"))
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) <= _MAX_ANSWER_READ:
                response.content  # reading it lets the connection be reused  # noqa: B018
            return outcome
        finally:
            response.close()

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None
            if self._direct is not None:
                self._direct.close()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections, which the parent still uses."""
        self._session = None
        if self._direct is not None:
            self._direct.forget_after_fork()
        self._lock = threading.Lock()


def _proxy_configured(scheme: str) -> bool:
    """Whether a proxy is set for ``scheme`` (``requests`` then decides, ``no_proxy`` too)."""
    import sys

    if sys.platform in ("darwin", "win32"):  # proxies may be system settings there
        import urllib.request

        proxies = urllib.request.getproxies()
        return bool(proxies.get(scheme) or proxies.get("all"))
    wanted = {f"{scheme}_proxy", "all_proxy"}
    return any(name.lower() in wanted and value.strip() for name, value in os.environ.items())


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
