"""How a batch reaches the ingest service, behind a two-method seam.

A transport has ``send(url, body, timeout) -> Outcome`` and ``close()``. The
HTTP transport posts with ``requests``, loaded on the poster thread, never
at import, and maps every way a request can end onto the outcomes the poster
understands, following TelemetryDeck's own SDKs:

* ``SENT``: any 2xx;
* ``REJECTED``: 400, 401, 403, 404, 413, 422, 501, 505, and redirects: this
  batch will never be accepted, so it is dropped rather than retried;
* ``RETRY``: anything else (429, 5xx, timeouts, refused connections, DNS
  failures, a proxy that refuses or that cannot be used, an answer that is not
  HTTP), with the server's ``Retry-After`` when it gave one;
* ``RETIRED``: 410 Gone, the endpoint's way of saying it will never accept
  anything again: the kill switch an author uses to silence released clients.

There is no retry here: the poster (``_delivery.posting``, with ``retry`` and
``backoff``) owns the single retry loop.
"""

from __future__ import annotations

import enum
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Protocol, Union

from .._fork import guard as fork_guard
from .._log import logger
from .._policy.endpoint import breaks_a_request_line, is_loopback
from .._version import __version__

if TYPE_CHECKING:
    import requests
    from requests.adapters import BaseAdapter

USER_AGENT = f"kaibantrace/{__version__}"
_CONTENT_TYPE = "application/json; charset=utf-8"
_HEADERS = {"User-Agent": USER_AGENT, "Content-Type": _CONTENT_TYPE, "Accept": "*/*",
            "Connection": "keep-alive"}
_REJECTED = frozenset({400, 401, 403, 404, 413, 422, 501, 505})
MAX_BODY_READ = 64 * 1024  # an answer's body longer than this is abandoned, its connection closed
_READ_SIZE = 16 * 1024


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


class _Route(NamedTuple):
    """How requests to one URL go: the session's adapter, the proxies, the CA setting."""

    adapter: BaseAdapter
    proxies: Dict[str, str]
    verify: Union[bool, str]  # True (certifi's bundle), or the bundle REQUESTS_CA_BUNDLE names


class HttpTransport:
    """Posts batches with ``requests``: TLS verified, redirects never followed, no retries
    underneath, the answer's body read only while it is short.

    One ``requests.Session`` per process, made at ``prepare()`` (on the sender's
    thread, under the fork guard, so no import is split by a fork) or at the
    first send. The request goes to the session's adapter directly rather than
    through ``Session.send``, which, even told not to follow a redirect, reads a
    redirect's whole body to prepare the request it would make next (an
    endless body would never end), keeps cookies between requests, and reads
    ``~/.netrc`` for credentials to add. What users set for every program that
    uses ``requests`` still applies, read as ``requests`` reads it: the proxy
    variables (``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``, SOCKS with
    ``requests[socks]``), and ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``.

    ``timeout`` bounds connecting (to each address a name has) and each wait
    for the answer; the status line decides the outcome. Looking the name up
    has no timeout (``getaddrinfo`` takes none): the sender's caller-facing
    bounds do not depend on it, since ``flush()`` and exit never wait for the
    sending thread longer than their budgets.
    """

    def __init__(self) -> None:
        self._session: Optional[requests.Session] = None
        self._routes: Dict[str, _Route] = {}
        self._inherited: List[object] = []  # sessions of the parent process, never used here
        self._warned = False
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Import ``requests`` and make the session ahead of the first send, so that no
        request, least of all one in the exit budget, waits for that import."""
        self._get_session()

    def _get_session(self) -> requests.Session:
        session = self._session
        if session is None:
            with self._lock:
                if self._session is None:
                    with fork_guard("setup"):  # the import must not be split by a fork
                        self._session = _new_session()
                session = self._session
        return session

    def _route(self, url: str) -> _Route:
        """How to reach ``url``, decided once per URL, as ``requests`` decides it for
        ``session.post``; a loopback or plain-HTTP endpoint always goes direct (a proxy
        elsewhere would reach its own loopback, and plain HTTP must not cross a network)."""
        route = self._routes.get(url)
        if route is None:
            from urllib.parse import urlsplit

            session = self._get_session()
            parts = urlsplit(url)
            settings = session.merge_environment_settings(url, {}, True, None, None)
            proxies: Dict[str, str] = dict(settings["proxies"] or {})
            if parts.scheme != "https" or is_loopback(parts.hostname or ""):
                proxies = {}
            route = _Route(session.get_adapter(url), proxies, settings["verify"])
            self._check_proxy(url, proxies)
            self._routes[url] = route
        return route

    def _check_proxy(self, url: str, proxies: Dict[str, str]) -> None:
        """Say once, at the first attempt, when the proxy is SOCKS and PySocks is missing:
        nothing can be sent then, and a short run may never reach the circuit breaker."""
        from requests.utils import select_proxy

        proxy = select_proxy(url, proxies) or ""
        if self._warned or not proxy.lower().startswith("socks"):
            return
        import importlib.util

        if importlib.util.find_spec("socks") is None:
            self._warned = True
            logger.warning("kaibantrace: a SOCKS proxy is configured and PySocks is not installed "
                           "(pip install 'requests[socks]'); nothing is sent, signals wait in "
                           "the outbox")

    def send(self, url: str, body: bytes, timeout: float) -> Outcome:
        try:
            return self._post(url, body, timeout)
        except Exception as exc:  # every failure of the network is "try later"
            return Outcome(Result.RETRY, type(exc).__name__)

    def _post(self, url: str, body: bytes, timeout: float) -> Outcome:
        if breaks_a_request_line(url):  # checked at configuration too; this is the last line
            raise ValueError("the URL holds spaces or control characters")
        deadline = time.monotonic() + timeout
        route = self._route(url)
        import requests  # loaded by the session already: a lookup in sys.modules

        request = requests.PreparedRequest()
        request.prepare(method="POST", url=url, headers=_HEADERS, data=body)
        response = route.adapter.send(request, stream=True, timeout=(timeout, timeout),
                                      verify=route.verify, proxies=route.proxies)
        try:
            # The status line decides: a 2xx whose body is then cut short was accepted all
            # the same, and sending it again would deliver it twice.
            outcome = outcome_for_status(response.status_code, response.headers.get("Retry-After"))
            try:
                _finish(response, deadline)
            except Exception:
                pass
        finally:
            response.close()
        return outcome

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            self._routes = {}
        if session is not None:
            session.close()

    def after_fork(self) -> None:
        """In a forked child: the parent's session holds the parent's connections, still in
        use there; a request on one would mix two processes' bytes on one socket. It is
        set aside, not closed (that could end the parent's connections too), and the
        child makes a session of its own at its next send."""
        if self._session is not None:
            self._inherited.append(self._session)
        self._session = None
        self._routes = {}
        self._lock = threading.Lock()


def _not_ours(record: Any) -> bool:
    return not str(getattr(record, "threadName", "")).startswith("kaibantrace")


_URLLIB3_LOGGERS = ("urllib3.connectionpool", "urllib3.connection", "urllib3.response",
                    "urllib3.util.retry")


def _quiet_urllib3() -> None:
    """Keep urllib3's own log lines about our requests (a malformed answer is a WARNING
    with a traceback there) out of the host's logs: telemetry fails quietly. Only
    records from kaibantrace's threads are held back; the host's requests log as before."""
    import logging

    for name in _URLLIB3_LOGGERS:
        target = logging.getLogger(name)
        if _not_ours not in target.filters:
            target.addFilter(_not_ours)


def _new_session() -> requests.Session:
    import requests
    from requests.adapters import HTTPAdapter

    _quiet_urllib3()

    session = requests.Session()
    adapter = HTTPAdapter(max_retries=0)  # urllib3 retries nothing: the sender owns the retry loop
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _finish(response: requests.Response, deadline: float) -> None:
    """Read the rest of a short answer, so its connection can carry the next request.

    Only a body whose end is known (a ``Content-Length`` up to 64 KiB, or chunks)
    is read, and only up to 64 KiB and until ``deadline``; anything else is
    abandoned, and closing the response then closes its connection. The body
    is read raw, never decompressed, and thrown away.
    """
    raw = response.raw
    length = raw.length_remaining
    if not raw.chunked and (length is None or length > MAX_BODY_READ):
        return
    read = getattr(raw, "read1", None) or raw.read  # read1: one wait on the socket per call
    total = 0
    while total <= MAX_BODY_READ and time.monotonic() < deadline:
        chunk = read(_READ_SIZE, decode_content=False)
        if not chunk:
            return
        total += len(chunk)


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
