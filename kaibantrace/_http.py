"""A small HTTP/1.1 client for the one request kaibantrace makes: POST a JSON body.

Why not ``requests`` for every send: at the rates a busy service emits, the
worker's time under the GIL is time taken from the host's own threads, and
``requests`` spends over a millisecond of it per request (preparing, merging
environment settings, parsing headers through ``email``). This client writes
the request in one ``sendall`` and reads the answer with plain byte
operations: a fraction of that cost.

What it does, and all it does:

* one keep-alive connection per origin (and proxy), made again after 4 seconds idle (servers
  close idle connections; a request on a dead one would fail), or when it has
  anything to read before a request (closed, or bytes no request asked for);
* TLS with certificate and host name verification: the system's certificates,
  plus ``certifi``'s bundle and ``REQUESTS_CA_BUNDLE`` when present;
* an HTTP proxy when one is configured (``_proxy``): a ``CONNECT`` tunnel, TLS
  end to end through it, under the same deadline;
* a deadline for the whole request, name resolution included (``_dial``),
  checked at every socket operation;
* bounded reading: at most 64 KiB of headers; a body is read (to keep the
  connection) only when short, otherwise the connection is closed; a redirect is
  an answer like any other, never followed;
* a request that finds its reused connection closed by the server before any
  byte of an answer is sent once more on a new connection; nothing else is ever
  repeated (the sender owns the only retry loop). A server that answers before
  reading the whole request (a 413) is heard, not taken for a closed connection.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Dict, Optional, Tuple

from ._config import breaks_a_request_line
from ._dial import Dialer, left
from ._proxy import Proxy

if TYPE_CHECKING:
    import ssl

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_READ = 64 * 1024
IDLE_REUSE = 4.0  # seconds an idle connection is trusted to still be open

Origin = Tuple[str, str, int]  # scheme, host, port
Route = Tuple[Origin, Optional[Proxy]]  # where a connection goes, and through what


class ProtocolError(OSError):
    """The server's answer is not HTTP/1.x as this client reads it."""


class Answer:
    """The part of a response the sender needs."""

    __slots__ = ("retry_after", "status")

    def __init__(self, status: int, retry_after: Optional[str]) -> None:
        self.status = status
        self.retry_after = retry_after


class _Connection:
    __slots__ = ("last_used", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.last_used = time.monotonic()


def split_url(url: str) -> Tuple[Origin, str, str]:
    """``(origin, host header, path)`` of an ``http`` or ``https`` URL."""
    from urllib.parse import urlsplit

    if breaks_a_request_line(url):  # checked at configuration too; this is the last line
        raise ValueError("the URL holds spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    default = 443 if scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    header = shown if port == default else f"{shown}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (scheme, host, port), header, path


class Client:
    """Posts bodies over kept-alive connections; safe to share between threads."""

    def __init__(self, user_agent: str) -> None:
        self._user_agent = user_agent
        self._connections: Dict[Route, _Connection] = {}
        self._urls: Dict[Tuple[str, Optional[Proxy]], Tuple[Route, bytes]] = {}
        self._tls: Optional[ssl.SSLContext] = None
        self.dialer = Dialer()
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Import what a send needs (the URL parser, TLS, certifi) ahead of the first send,
        so that a send never imports. The TLS context itself, whose certificates take
        milliseconds to load, is made at the first ``https`` request only."""
        import ssl  # noqa: F401
        import urllib.parse  # noqa: F401

        _certifi_bundle()

    def post(self, url: str, body: bytes, content_type: str, timeout: float,
             proxy: Optional[Proxy] = None) -> Answer:
        """Send ``body`` (through ``proxy`` if given); the answer, or ``OSError``
        (``TimeoutError`` past the deadline)."""
        try:
            return self._post(url, body, content_type, timeout, proxy)
        except socket.timeout as exc:  # Python 3.9's is not a TimeoutError yet
            if isinstance(exc, TimeoutError):
                raise
            raise TimeoutError(str(exc)) from exc

    def _post(self, url: str, body: bytes, content_type: str, timeout: float,
              proxy: Optional[Proxy]) -> Answer:
        deadline = time.monotonic() + timeout
        route, head = self._target(url, proxy)
        request = head + b"Content-Type: " + content_type.encode("ascii") + \
            b"\r\nContent-Length: " + str(len(body)).encode("ascii") + b"\r\n\r\n" + body
        with self._lock:
            connection = self._connections.pop(route, None)
            if connection is not None and (time.monotonic() - connection.last_used > IDLE_REUSE
                                           or _has_input(connection.sock)):
                # Idle too long, or the server said something (closed it, or sent bytes no
                # request asked for): a request there could fail or get a stranger's answer.
                _close(connection)
                connection = None
            reused = connection is not None
            if connection is None:
                connection = self._connect(route, deadline)
            try:
                answer, keep = self._exchange(connection, request, deadline)
            except _StaleConnection:
                _close(connection)
                if not reused:
                    raise ProtocolError("the server closed the connection without answering") from None
                connection = self._connect(route, deadline)
                try:
                    answer, keep = self._exchange(connection, request, deadline)
                except BaseException:
                    _close(connection)
                    raise
            except BaseException:
                _close(connection)
                raise
            if keep:
                connection.last_used = time.monotonic()
                self._connections[route] = connection
            else:
                _close(connection)
            return answer

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, {}
        for connection in connections.values():
            _close(connection)

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connections without touching them."""
        self._connections = {}
        self.dialer.forget_after_fork()
        self._lock = threading.Lock()

    # -- the parts -------------------------------------------------------------

    def _target(self, url: str, proxy: Optional[Proxy]) -> Tuple[Route, bytes]:
        known = self._urls.get((url, proxy))
        if known is None:
            origin, host, path = split_url(url)
            if proxy is not None and origin[0] != "https":  # plain HTTP is for loopback only
                raise ValueError("a proxy carries only https requests")
            head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {self._user_agent}\r\n"
                    "Accept: */*\r\nConnection: keep-alive\r\n").encode("ascii")
            known = self._urls[(url, proxy)] = ((origin, proxy), head)
        return known

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            import ssl

            context = ssl.create_default_context()
            for bundle in (_certifi_bundle(), os.environ.get("REQUESTS_CA_BUNDLE")):
                if bundle:
                    try:
                        context.load_verify_locations(bundle)
                    except (OSError, ssl.SSLError):
                        pass
            self._tls = context
        return self._tls

    def _connect(self, route: Route, deadline: float) -> _Connection:
        (scheme, host, port), proxy = route
        if proxy is None:
            sock = self.dialer.connect(host, port, deadline)
        else:
            sock = self.dialer.connect(proxy.host, proxy.port, deadline)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if proxy is not None:
                    self._tunnel(sock, host, port, proxy, deadline)
                sock.settimeout(left(deadline))
                sock = self._tls_context().wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return _Connection(sock)

    def _tunnel(self, sock: socket.socket, host: str, port: int, proxy: Proxy,
                deadline: float) -> None:
        """Ask the proxy for a tunnel to ``host:port``; TLS then runs through it, end to end."""
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        if proxy.authorization:
            request += f"Proxy-Authorization: {proxy.authorization}\r\n"
        request += f"User-Agent: {self._user_agent}\r\n\r\n"
        sock.settimeout(left(deadline))
        sock.sendall(request.encode("ascii"))
        data = b""
        end = -1
        while end < 0:
            if len(data) > MAX_HEADER_BYTES:
                raise ProtocolError("the proxy's answer is too long")
            data = _more(sock, data, deadline)
            end = data.find(b"\r\n\r\n")
        status, _, _ = _parse_head(data[:end])
        if not 200 <= status < 300:
            raise ProxyRefused(f"the proxy refused the tunnel ({status})")
        if data[end + 4:]:  # the tunnel must start silent: the server speaks only after TLS
            raise ProtocolError("the proxy sent bytes before the tunnel opened")

    def _exchange(self, connection: _Connection, request: bytes,
                  deadline: float) -> Tuple[Answer, bool]:
        sock = connection.sock
        send_failed = False
        try:
            sock.settimeout(left(deadline))
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            # The server may have answered already (a 413 before reading the whole body,
            # say): read what it said; with nothing to read, the connection was stale.
            send_failed = True
        data = b""
        heard = False  # any byte of an answer arrived: then the request is never resent
        while True:  # the head of the answer; 1xx answers are skipped
            end = data.find(b"\r\n\r\n")
            while end < 0:
                if len(data) > MAX_HEADER_BYTES:
                    raise ProtocolError("the answer's headers are too long")
                try:
                    chunk = _recv(sock, deadline)
                except ConnectionResetError as exc:
                    if heard:
                        raise
                    raise _StaleConnection() from exc
                if not chunk:
                    if not heard:
                        raise _StaleConnection()
                    raise ProtocolError("the answer ended inside its headers")
                heard = True
                data += chunk
                end = data.find(b"\r\n\r\n")
            status, version, headers = _parse_head(data[:end])
            data = data[end + 4:]
            if status >= 200 or status == 101:
                break
        tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
        keep = version == b"HTTP/1.1" and b"close" not in tokens and not send_failed
        encoding = headers.get(b"transfer-encoding", b"").lower()
        length = headers.get(b"content-length")
        if status in (204, 304):  # never a body
            pass
        elif encoding == b"chunked":
            data, done = _read_chunked(sock, data, deadline)
            keep = keep and done
        elif length is not None and length.isdigit():
            size = int(length)
            if size > MAX_BODY_READ:
                keep = False  # not worth reading: close instead
            else:
                while len(data) < size:
                    data = _more(sock, data, deadline)
                data = data[size:]
        else:
            keep = False  # the body runs until the server closes: never read it
        if data:  # bytes past the answer: no request asked for them
            keep = False
        retry_after = headers.get(b"retry-after")
        return Answer(status, retry_after.decode("latin-1") if retry_after else None), keep


class ProxyRefused(OSError):
    """The proxy answered the ``CONNECT`` with something other than 2xx (407: credentials)."""


class _StaleConnection(OSError):
    """The connection was closed before any answer: safe to send once more."""


def _has_input(sock: socket.socket) -> bool:
    """Whether an idle connection has something to read (the server closed it, or sent
    bytes unasked): either way it is not fit for another request."""
    import select

    try:
        if hasattr(select, "poll"):  # any descriptor number, unlike select()
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(left(deadline))
    return sock.recv(65536)


def _parse_head(head: bytes) -> Tuple[int, bytes, Dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError("the answer is not HTTP/1.x")
    headers: Dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), parts[0], headers


def _read_chunked(sock: socket.socket, data: bytes, deadline: float) -> Tuple[bytes, bool]:
    """Read a chunked body, discarding it; ``(bytes after it, True)``, or ``False`` as the
    second item when it was too long to be worth reading (the connection is then closed)."""
    total = 0
    while True:
        size_line, data = _line(sock, data, deadline, 1024, "a chunk size line is too long")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise ProtocolError("a chunk size is not a number") from None
        total += size
        if total > MAX_BODY_READ:
            return b"", False
        if size == 0:  # the last chunk; then trailers, if any, and an empty line
            while True:
                trailer, data = _line(sock, data, deadline, MAX_HEADER_BYTES,
                                      "the answer's trailers are too long")
                if not trailer:
                    return data, True
        while len(data) < size + 2:
            data = _more(sock, data, deadline)
        data = data[size + 2:]


def _line(sock: socket.socket, data: bytes, deadline: float, limit: int,
          too_long: str) -> Tuple[bytes, bytes]:
    """The next CRLF-ended line (without its CRLF) and what follows it; at most ``limit``
    bytes are buffered while looking for its end."""
    end = data.find(b"\r\n")
    while end < 0:
        if len(data) > limit:
            raise ProtocolError(too_long)
        data = _more(sock, data, deadline)
        end = data.find(b"\r\n")
    return data[:end], data[end + 2:]


def _more(sock: socket.socket, data: bytes, deadline: float) -> bytes:
    """``data`` and the next bytes to arrive; an error if the answer ends first."""
    chunk = _recv(sock, deadline)
    if not chunk:
        raise ProtocolError("the answer ended early")
    return data + chunk


def _close(connection: _Connection) -> None:
    try:
        connection.sock.close()
    except OSError:
        pass


def _certifi_bundle() -> Optional[str]:
    try:
        import certifi  # installed with requests; its bundle helps where the system has none
    except ImportError:
        return None
    try:
        return str(certifi.where())
    except Exception:
        return None
