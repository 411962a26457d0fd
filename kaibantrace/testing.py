"""Helpers for testing code that uses kaibantrace.

* ``capture()``: record, in memory and without any network, the signals every
  client would send while the block runs.
* ``Collector``: a real TelemetryDeck-compatible HTTP server on 127.0.0.1, in a
  thread of its own, that checks each request as the real ingest does and
  records the signals; it can be told to fail, stall or drop connections.
* ``reset()``: put the default client back as it was at import.
* ``MemoryTransport``: a transport for ``Telemetry(transport=...)`` that keeps
  every request body in memory instead of sending it.

They restore what they change in ``finally`` blocks. They are not meant for
production code, and ``Collector`` is not a hardened server: bind it to
loopback only, as it does by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Type

from ._client import client as _client
from ._client.capture import Capture
from ._delivery.transport import MemoryTransport
from ._policy.config import Settings

__all__ = ["Collector", "MemoryTransport", "ReceivedRequest", "capture", "reset"]


@contextlib.contextmanager
def capture(*, strict: bool = True, respect_opt_out: bool = False) -> Iterator[List[Dict[str, Any]]]:
    """Record the signals every client would send inside the block, as wire-format dicts.

    Nothing is queued, no thread starts, nothing is sent and no file is written
    (no outbox, secret or first-run marker; a CLI run records no install event).
    By default the capture ignores the machine's opt-out (the environment, a
    saved ``kaibantrace disable``), so it works under the pytest plugin, which
    opts the whole test run out; ``opt_out=True`` in a client's code is still
    honoured. Pass ``respect_opt_out=True`` to check that an opted-out program
    records nothing. With ``strict`` (the default) a bad event name or payload
    raises at the call instead of being logged, so the test fails where the
    mistake is.
    """
    sink = Capture(strict=strict, respect_opt_out=respect_opt_out)
    _client.install_capture(sink)
    try:
        yield sink.signals
    finally:
        _client.remove_capture(sink)


def reset() -> None:
    """Stop the default client's sender and restore its import-time settings and state.

    Files are read again afterwards (the saved choice, the local secret), so a
    test that points ``KAIBAN_TELEMETRY_CONFIG_DIR`` elsewhere sees that directory.
    """
    from . import default_client
    from ._policy import prefs as _prefs

    _client.restore(default_client(), Settings())
    _prefs.forget_in_memory()


@dataclasses.dataclass
class ReceivedRequest:
    """One request the collector answered (or refused)."""

    path: str
    headers: Dict[str, str]
    body: bytes
    status: int
    signals: List[Dict[str, Any]]
    error: Optional[str] = None
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    """``time.monotonic()`` when the request had been read."""


@dataclasses.dataclass
class _Behaviour:
    status: int = 200
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


_PATH = re.compile(r"^/v2/(?:namespace/[A-Za-z0-9_.%-]+/)?$")
_MAX_BODY = 10 * 1024 * 1024


class Collector:
    """A TelemetryDeck-compatible ingest server on loopback, for tests and examples.

    ``url`` is the ingest URL to configure a client with. Every valid request is
    answered 200 and its signals appended to ``signals``; an invalid one (not a
    POST to ``/v2/`` or ``/v2/namespace/<ns>/``, not JSON, not an array of
    signals with string ``appID`` (a UUID), ``clientUser`` and ``type``, or a
    payload that is not flat) is answered 400 and recorded with its ``error``.

    ``port`` picks the port (default: any free one), so a test can bring an
    endpoint back where it was down. ``respond()`` changes how the next requests are answered: a status and
    headers (``Retry-After``), a delay before answering, or a dropped
    connection.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._lock = threading.Condition()
        self._script: List[Tuple[_Behaviour, Optional[int]]] = []
        self._stopping = threading.Event()
        self.requests: List[ReceivedRequest] = []
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- life cycle ---------------------------------------------------------

    def start(self) -> Collector:
        handler = _make_handler(self)
        server = _QuietServer((self._host, self._port), handler)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="kaibantrace-collector", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the collector is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The ingest URL (``http://127.0.0.1:<port>/v2/``)."""
        return f"http://{self._host}:{self.port}/v2/"

    # -- behaviour ----------------------------------------------------------

    def respond(self, status: int = 200, *, headers: Optional[Mapping[str, str]] = None,
                delay: float = 0.0, drop: bool = False, times: Optional[int] = None) -> None:
        """Answer the next ``times`` requests this way (all further ones if ``None``).

        ``drop=True`` closes the connection without any answer after reading the request.
        Calls queue up: ``respond(503, times=2); respond(200)`` fails twice, then heals.
        """
        with self._lock:
            if self._script and self._script[-1][1] is None:
                self._script.pop()
            self._script.append((_Behaviour(status, dict(headers or {}), delay, drop), times))

    def _next_behaviour(self) -> _Behaviour:
        with self._lock:
            if not self._script:
                return _Behaviour()
            behaviour, times = self._script[0]
            if times is not None:
                if times <= 1:
                    self._script.pop(0)
                else:
                    self._script[0] = (behaviour, times - 1)
            return behaviour

    # -- what arrived ---------------------------------------------------------

    @property
    def signals(self) -> List[Dict[str, Any]]:
        """Every signal of every accepted request, in arrival order."""
        with self._lock:
            return [s for r in self.requests if 200 <= r.status < 300 for s in r.signals]

    def wait_for(self, count: int, timeout: float = 10.0) -> List[Dict[str, Any]]:
        """Wait until at least ``count`` signals were accepted; raise ``TimeoutError`` if not."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                signals = [s for r in self.requests if 200 <= r.status < 300 for s in r.signals]
                if len(signals) >= count:
                    return signals
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {count} signals within {timeout} s, "
                                       f"got {len(signals)}")
                self._lock.wait(remaining)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> List[ReceivedRequest]:
        """Wait until at least ``count`` requests arrived, whatever the answer."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {count} requests within {timeout} s, "
                                       f"got {len(self.requests)}")
                self._lock.wait(remaining)
            return list(self.requests)

    def _record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self.requests.append(request)
            self._lock.notify_all()


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-request is normal here, not an error to print."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def check_request(path: str, content_type: str, body: bytes) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """The signals in a request, or the reason TelemetryDeck's ingest would refuse it."""
    if not _PATH.match(path):
        return [], f"unknown path {path!r}"
    if not content_type.lower().startswith("application/json"):
        return [], f"content type {content_type!r} is not application/json"
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return [], "body is not JSON"
    if not isinstance(data, list):
        return [], "body is not a JSON array"
    for index, signal in enumerate(data):
        problem = _signal_problem(signal)
        if problem is not None:
            return [], f"signal {index}: {problem}"
    return data, None


def _signal_problem(signal: Any) -> Optional[str]:
    if not isinstance(signal, dict):
        return "not an object"
    for field in ("appID", "clientUser", "type"):
        if not isinstance(signal.get(field), str) or not signal[field]:
            return f"{field} missing or not a string"
    try:
        uuid.UUID(signal["appID"])
    except ValueError:
        return "appID is not a UUID"
    payload = signal.get("payload")
    if payload is not None:
        if not isinstance(payload, dict):
            return "payload is not an object"
        if any(isinstance(v, (dict, list)) for v in payload.values()):
            return "payload is not flat"
    if "floatValue" in signal and not isinstance(signal["floatValue"], (int, float)):
        return "floatValue is not a number"
    if "isTestMode" in signal and not isinstance(signal["isTestMode"], bool):
        return "isTestMode is not a boolean"
    return None


def _make_handler(collector: Collector) -> Type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in two writes; with Nagle on, the second waits
        # for the client's delayed ACK and every request costs 40 ms.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # quiet in tests
            pass

        def do_GET(self) -> None:
            self._answer(405, b"only POST", {})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, _MAX_BODY))
            behaviour = collector._next_behaviour()
            if behaviour.delay:
                collector._stopping.wait(behaviour.delay)
            headers = {k: v for k, v in self.headers.items()}
            signals, error = check_request(self.path, self.headers.get("Content-Type", ""), body)
            if behaviour.drop:
                collector._record(ReceivedRequest(self.path, headers, body, 0, signals, "dropped"))
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            status = 400 if error is not None else behaviour.status
            collector._record(ReceivedRequest(self.path, headers, body, status, signals, error))
            answer = json.dumps({"error": error} if error else {"status": status}).encode()
            self._answer(status, answer, behaviour.headers)

        def _answer(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
            with contextlib.suppress(OSError):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

    return Handler
