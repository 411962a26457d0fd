"""Sending on ``requests``, against real loopback servers that answer in awkward ways.

Everything here is a real socket on 127.0.0.1: scripted HTTP and HTTPS servers, an HTTP
``CONNECT`` proxy, an HTTPS proxy and a SOCKS5 proxy. The one fake is name resolution
(``getaddrinfo``), which cannot be made real without a network: ``ingest.test`` resolves
to 127.0.0.1, and, in a child process, ``stuck.test`` hangs as a dead resolver would.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import pytest

import kaibantrace
from kaibantrace._delivery.transport import USER_AGENT, HttpTransport, Result
from kaibantrace._policy.endpoint import endpoint_problem
from kaibantrace.testing import Collector

from .conftest import APP_ID, subprocess_env

# An answer: bytes to send, an iterable of bytes to stream until the client hangs up, or
# None to hang up without a word. CLOSE before bytes: close the connection after them.
Reply = Union[bytes, Iterable[bytes], None]
Answer = Callable[[int], Reply]
CLOSE = b"CLOSE:"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
IDNA_HOST = "télémétrie.example"
IDNA_PUNYCODE = "xn--tlmtrie-byabb.example"
TOO_MUCH = 32 * 1024 * 1024  # far more than any socket buffers hold: a client that kept reading


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def read_request(conn: socket.socket, buffer: bytearray) -> Optional[bytes]:
    """The next whole request (head and ``Content-Length`` body) from ``conn``; ``None`` when
    the client hung up. ``buffer`` keeps what arrived past it."""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buffer[:end]).split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < end + length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    request = bytes(buffer[:end + length])
    del buffer[:end + length]
    return request


def body_of(request: bytes) -> bytes:
    return request.partition(b"\r\n\r\n")[2]


def head_of(request: bytes) -> str:
    return request.partition(b"\r\n\r\n")[0].decode("latin-1")


class LoopbackServer:
    """A TCP server on 127.0.0.1 that hands each connection to ``_handle`` on a thread,
    through TLS when given a context."""

    def __init__(self, tls: Optional[ssl.SSLContext] = None) -> None:
        self.connections = 0
        self.hangups = 0  # connections the client closed between requests
        self._tls = tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            with conn:
                self._handle(conn)
        except (OSError, ssl.SSLError):
            pass  # a client that refused our certificate, or hung up mid-answer

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


class ScriptedServer(LoopbackServer):
    """An HTTP (or, with a TLS context, HTTPS) server answering each request as ``answer``
    says; ``sent`` is how many bytes each answer got out before the client stopped it."""

    def __init__(self, answer: Answer, tls: Optional[ssl.SSLContext] = None) -> None:
        self.answer = answer
        self.requests: List[bytes] = []
        self.sent: List[int] = []
        super().__init__(tls)

    @property
    def url(self) -> str:
        if self._tls is not None:
            return f"https://localhost:{self.port}/v2/"
        return f"http://127.0.0.1:{self.port}/v2/"

    def _handle(self, conn: socket.socket) -> None:
        buffer = bytearray()
        while True:
            request = read_request(conn, buffer)
            if request is None:
                self.hangups += 1
                return
            self.requests.append(request)
            reply = self.answer(len(self.requests))
            if reply is None:
                return
            if isinstance(reply, bytes):
                conn.sendall(reply.removeprefix(CLOSE))
                self.sent.append(len(reply))
                if reply.startswith(CLOSE):
                    return
                continue
            self.sent.append(0)
            for piece in reply:  # until the client hangs up (or 5 s without it reading)
                conn.sendall(piece)
                self.sent[-1] += len(piece)
            return


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    servers: List[ScriptedServer] = []

    def start(answer: Answer, tls: Optional[ssl.SSLContext] = None) -> ScriptedServer:
        servers.append(ScriptedServer(answer, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# -- certificates and names ------------------------------------------------------------


class Certificate:
    """A self-signed certificate for localhost, ``ingest.test`` and the IDNA test host; no
    one trusts it unless told to (``REQUESTS_CA_BUNDLE``)."""

    def __init__(self, directory: Path) -> None:
        self.path, key = directory / "cert.pem", directory / "key.pem"
        names = f"DNS:localhost,DNS:ingest.test,DNS:{IDNA_PUNYCODE}"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", f"subjectAltName={names}",
                        "-keyout", str(key), "-out", str(self.path)],
                       check=True, capture_output=True, timeout=60)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(self.path), str(key))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    return Certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(certificate: Certificate, serve: Callable[..., ScriptedServer]) -> ScriptedServer:
    return serve(lambda n: OK, certificate.context)


class Names:
    """``getaddrinfo`` for the tests: ``ingest.test`` is 127.0.0.1, addresses and
    ``localhost`` resolve as usual, and any other name fails, so no test ever asks a real
    resolver. ``asked`` lists every name looked up."""

    def __init__(self) -> None:
        self.asked: List[str] = []
        self._real = socket.getaddrinfo

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        self.asked.append(name)
        if name == "ingest.test":
            return self._real("127.0.0.1", port, *args, **kwargs)
        elif name == "localhost" or _is_address(name):
            return self._real(host, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "no such name (test resolver)")


def _is_address(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> Names:
    fake = Names()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


def child_env(home: Path, **extra: str) -> Dict[str, str]:
    """The environment of a child Python: the test's, without the machine's proxy and CA
    variables, plus ``extra``."""
    env = {name: value for name, value in subprocess_env(HOME=str(home)).items()
           if not name.lower().endswith(("_proxy", "_ca_bundle"))}
    env.update(extra)
    return env


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set the proxy and CA variables for one test, and only those."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                            "requests_ca_bundle", "curl_ca_bundle"):
            monkeypatch.delenv(name)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine(proxy_env: Callable[..., None]) -> None:
    """Every test starts without proxy or CA variables, whatever the machine has."""


# -- the request ---------------------------------------------------------------------


def test_posts_the_body_with_its_headers_on_one_kept_alive_connection(
        serve: Callable[..., ScriptedServer]) -> None:
    server = serve(lambda n: OK)
    transport = HttpTransport()
    outcomes = [transport.send(server.url, f"[{n}]".encode(), 5) for n in range(3)]
    transport.close()
    assert [o.result for o in outcomes] == [Result.SENT] * 3
    assert [body_of(r) for r in server.requests] == [b"[0]", b"[1]", b"[2]"]
    assert server.connections == 1
    head = head_of(server.requests[0])
    assert head.startswith("POST /v2/ HTTP/1.1\r\n")
    assert f"User-Agent: {USER_AGENT}" in head.split("\r\n")
    assert "Content-Type: application/json; charset=utf-8" in head.split("\r\n")


def test_no_cookie_and_no_netrc_credentials_are_ever_sent(
        serve: Callable[..., ScriptedServer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``requests.Session`` would keep a cookie the server sets and add credentials that
    ``~/.netrc`` has for the host: neither may leave with a signal."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login me password secret\ndefault login me password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    server = serve(lambda n: b"HTTP/1.1 200 OK\r\nSet-Cookie: id=tracked; Path=/\r\n"
                             b"Content-Length: 2\r\n\r\nok")
    transport = HttpTransport()
    for _ in range(2):
        assert transport.send(server.url, b"[]", 5).result is Result.SENT
    transport.close()
    for request in server.requests:
        names = {line.partition(":")[0].lower() for line in head_of(request).split("\r\n")[1:]}
        assert not names & {"cookie", "authorization"}, head_of(request)


def test_retry_after_is_passed_on(serve: Callable[..., ScriptedServer]) -> None:
    server = serve(lambda n: b"HTTP/1.1 429 Slow Down\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n")
    outcome = HttpTransport().send(server.url, b"[]", 5)
    assert (outcome.result, outcome.detail, outcome.retry_after) == (Result.RETRY, "HTTP 429", 7.0)


def test_a_short_body_keeps_the_connection_a_long_one_closes_it(
        serve: Callable[..., ScriptedServer]) -> None:
    chunked = (b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
    short = serve(lambda n: chunked)
    long = serve(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000)
    transport = HttpTransport()
    for server in (short, long):
        assert [transport.send(server.url, b"[]", 5).result for _ in range(3)] == [Result.SENT] * 3
    transport.close()
    assert short.connections == 1  # read to its end: the connection carried the next request
    assert long.connections == 3  # past 64 KiB: abandoned, and its connection with it


def test_close_ends_the_connections(serve: Callable[..., ScriptedServer]) -> None:
    server = serve(lambda n: OK)
    transport = HttpTransport()
    transport.send(server.url, b"[]", 5)
    assert server.hangups == 0
    transport.close()
    assert wait_until(lambda: server.hangups == 1)


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/v2/\r\nX-Injected: 1",
                                 "http://127.0.0.1:{port}/v 2/", "http://127.0.0.1:{port}/v2/\x00"])
def test_a_url_that_would_break_the_request_is_refused_before_any_socket(
        url: str, serve: Callable[..., ScriptedServer]) -> None:
    server = serve(lambda n: OK)
    outcome = HttpTransport().send(url.format(port=server.port), b"[]", 5)
    assert (outcome.result, outcome.detail) == (Result.RETRY, "ValueError")
    assert endpoint_problem(url.format(port=server.port)) is not None
    # A connection made by the send would be queued before this probe, and accepted first.
    socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    assert wait_until(lambda: server.connections >= 1)
    assert server.connections == 1 and server.requests == []


def test_failures_are_retries_named_by_their_exception(refused_url: str, names: Names) -> None:
    transport = HttpTransport()
    assert transport.send(refused_url, b"[]", 5)[:2] == (Result.RETRY, "ConnectionError")
    assert transport.send("https://nowhere.test/v2/", b"[]", 5)[:2] == (Result.RETRY, "ConnectionError")
    assert transport.send("ftp://127.0.0.1/v2/", b"[]", 5)[:2] == (Result.RETRY, "InvalidSchema")


def test_a_server_that_never_answers_is_a_timeout(black_hole_url: str) -> None:
    started = time.monotonic()
    outcome = HttpTransport().send(black_hole_url, b"[]", 0.5)
    assert (outcome.result, outcome.detail) == (Result.RETRY, "ReadTimeout")
    assert time.monotonic() - started < 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_makes_connections_of_its_own(serve: Callable[..., ScriptedServer]) -> None:
    server = serve(lambda n: OK)
    transport = HttpTransport()
    assert transport.send(server.url, b"[1]", 5).result is Result.SENT
    pid = os.fork()
    if pid == 0:  # the parent's kept-alive connection is still the parent's
        code = 1
        try:
            transport.after_fork()
            code = 0 if transport.send(server.url, b"[2]", 5).result is Result.SENT else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert transport.send(server.url, b"[3]", 5).result is Result.SENT
    transport.close()
    assert [body_of(r) for r in server.requests] == [b"[1]", b"[2]", b"[3]"]
    assert server.connections == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_transport_given_in_code_is_reset_in_a_forked_child(
        serve: Callable[..., ScriptedServer],
        make_client: Callable[..., kaibantrace.Telemetry]) -> None:
    """The client's at-fork hook resets a transport shared with the parent: the child
    posts on a connection of its own, and the parent's still works afterwards."""
    server = serve(lambda n: OK)
    client = make_client(endpoint=server.url, transport=HttpTransport())
    client.emit("parent")
    assert client.flush(10)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            client.emit("child")
            code = 0 if client.flush(10) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    client.emit("parent_again")
    assert client.flush(10)
    sent = [s["type"] for r in server.requests for s in json.loads(body_of(r))]
    assert sent == ["parent", "child", "parent_again"]
    assert server.connections == 2


# -- redirects and TLS -----------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("where", ["another host", "another port", "the same place"])
def test_redirects_are_refused_never_followed(serve: Callable[..., ScriptedServer],
                                              status: int, where: str) -> None:
    """A redirect is refused like a 4xx and never followed: neither to another host (here
    ``localhost``, another name for the loopback), nor another port, nor the same URL."""
    elsewhere = serve(lambda n: OK)
    location = {"another host": f"http://localhost:{elsewhere.port}/v2/",
                "another port": elsewhere.url, "the same place": None}[where]
    moved: ScriptedServer = serve(lambda n: (
        f"HTTP/1.1 {status} Moved\r\nLocation: {location or moved.url}\r\n"
        "Content-Length: 0\r\n\r\n").encode())
    transport = HttpTransport()
    outcome = transport.send(moved.url, b"[]", 5)
    transport.close()
    assert (outcome.result, outcome.detail) == (Result.REJECTED, f"HTTP {status}")
    assert elsewhere.connections == 0 and len(moved.requests) == 1


def test_a_certificate_no_one_trusts_is_a_retry_never_a_send(tls_server: ScriptedServer) -> None:
    outcome = HttpTransport().send(tls_server.url, b"[]", 5)
    assert (outcome.result, outcome.detail) == (Result.RETRY, "SSLError")
    assert tls_server.requests == []


def test_a_certificate_trusted_through_requests_ca_bundle_is_used(
        tls_server: ScriptedServer, certificate: Certificate,
        proxy_env: Callable[..., None]) -> None:
    proxy_env(REQUESTS_CA_BUNDLE=str(certificate.path))
    outcome = HttpTransport().send(tls_server.url, b"[1]", 5)
    assert outcome.result is Result.SENT
    assert [body_of(r) for r in tls_server.requests] == [b"[1]"]


def test_a_client_facing_a_tls_error_fails_quietly(
        tls_server: ScriptedServer, make_client: Callable[..., kaibantrace.Telemetry]) -> None:
    client = make_client(endpoint=tls_server.url, backoff=0.05)
    client.emit("over_bad_tls")
    assert client.flush(5) is False
    stats = client.stats()
    assert stats["sent"] == 0 and stats["in_outbox"] == 1  # kept for a later run
    assert tls_server.requests == []


# -- hostile answers -----------------------------------------------------------------


def endless(head: bytes, piece: bytes) -> Callable[[int], Iterable[bytes]]:
    return lambda n: itertools.chain([head], itertools.repeat(piece))


HOSTILE: Dict[str, Tuple[Answer, str]] = {
    "an endless body": (endless(b"HTTP/1.1 200 OK\r\n\r\n", b"x" * 65536), "sent"),
    "an endless chunked body": (endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                        b"4000\r\n" + b"x" * 0x4000 + b"\r\n"), "sent"),
    "a negative chunk size": (endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"-FFFFFFFF\r\n", b"x" * 65536), "sent"),
    "a huge Content-Length": (endless(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
                                      b"x" * 65536), "sent"),
    "an endless header line": (endless(b"HTTP/1.1 200 OK\r\nX-Big: ", b"a" * 65536), "retried"),
    "endless header lines": (endless(b"HTTP/1.1 200 OK\r\n", b"X-More: 1\r\n" * 1000), "retried"),
    "garbage": (lambda n: CLOSE + b"\xff\xfe\xfd not HTTP at all\r\n\r\n", "retried"),
    "invalid UTF-8 in a 500's body": (lambda n: b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\n"
                                                b"\xff\xfe\xfd\xfc\xfb", "retried"),
    "invalid UTF-8 in a 200's head": (lambda n: b"HTTP/1.1 200 \xff\xfe\r\nX-Odd: \xc3\x28\r\n"
                                                b"Content-Length: 0\r\n\r\n", "sent"),
    # RFC 9112 lets a recipient take a bare LF for a line end; the status line decides.
    "bare LF line ends": (lambda n: b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "sent"),
    # Not a Content-Length (a space before the colon): the body's end is unknown, so it is
    # never waited for, although the server keeps the connection open.
    "Content-Length : 0": (lambda n: b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n", "sent"),
    "a redirect with an endless body": (endless(b"HTTP/1.1 302 Found\r\nLocation: "
                                                b"http://127.0.0.1:9/v2/\r\n\r\n", b"x" * 65536),
                                        "rejected"),
    "a status line cut short": (lambda n: CLOSE + b"HTTP/1.1 20", "retried"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_client_counts_what_a_hostile_endpoint_does(
        case: str, serve: Callable[..., ScriptedServer],
        make_client: Callable[..., kaibantrace.Telemetry]) -> None:
    """Each kind of answer ends as a count in stats(), in bounded time and memory (the
    server never gets far into an endless answer), with no exception."""
    answer, expected = HOSTILE[case]
    server = serve(answer)
    client = make_client(endpoint=server.url, backoff=0.05, timeout=2)
    started = time.monotonic()
    client.emit("hostile")
    delivered = client.flush(8)
    elapsed = time.monotonic() - started
    client.shutdown(2)
    stats = client.stats()
    assert elapsed < 8, elapsed
    assert delivered is (expected == "sent"), stats
    if expected == "sent":
        assert stats["sent"] == 1 and len(server.requests) == 1
    elif expected == "rejected":
        assert stats["dropped"] == {"rejected": 1} and stats["sent"] == 0
    else:
        assert stats["retried"] != 0 and stats["sent"] == 0 and stats["in_outbox"] == 1
    assert wait_until(lambda: len(server.sent) == len(server.requests))
    assert max(server.sent) < TOO_MUCH, server.sent


def test_a_2xx_cut_short_mid_body_is_delivered_once(
        serve: Callable[..., ScriptedServer],
        make_client: Callable[..., kaibantrace.Telemetry]) -> None:
    """The status line says the batch was accepted; the connection dropping afterwards
    does not make it a failure to send again."""
    answer = CLOSE + b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{"stat'
    server = serve(lambda n: answer)
    assert HttpTransport().send(server.url, b"[]", 5).result is Result.SENT
    server.requests.clear()
    client = make_client(endpoint=server.url, backoff=0.05)
    for n in range(100):
        client.emit("cut_short", {"n": n})
    assert client.flush(5) is True
    client.shutdown(2)
    received = [str(s["payload"]["n"]) for r in server.requests for s in json.loads(body_of(r))]
    assert sorted(received) == sorted(str(n) for n in range(100))  # each once
    assert client.stats()["sent"] == 100 and client.stats()["retried"] == 0


# -- proxies ---------------------------------------------------------------------------


class ScriptedProxy(LoopbackServer):
    """A loopback HTTP proxy (an HTTPS one with a TLS context): records each request's head,
    then opens the tunnel to the asked port on 127.0.0.1, whatever the host, and relays
    both ways ("tunnel"), or answers 407 ("refuse")."""

    def __init__(self, mode: str, tls: Optional[ssl.SSLContext] = None) -> None:
        self.mode = mode
        self.heads: List[str] = []
        super().__init__(tls)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _handle(self, conn: socket.socket) -> None:
        request = read_request(conn, bytearray())
        if request is None:
            return
        head = head_of(request)
        self.heads.append(head)
        if self.mode == "refuse":
            conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return
        port = int(head.split()[1].rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as upstream:
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            relay(conn, upstream)


class Socks5Proxy(LoopbackServer):
    """A loopback SOCKS5 proxy without authentication: records where each CONNECT asks to
    go, and connects there on 127.0.0.1, whatever the host."""

    def __init__(self) -> None:
        self.targets: List[Tuple[str, int]] = []
        super().__init__()

    def _handle(self, conn: socket.socket) -> None:
        def exactly(count: int) -> bytes:
            data = b""
            while len(data) < count:
                chunk = conn.recv(count - len(data))
                if not chunk:
                    raise ConnectionError("the client left")
                data += chunk
            return data

        version, methods = exactly(2)
        exactly(methods)
        conn.sendall(b"\x05\x00")  # version 5, no authentication
        version, command, _, kind = exactly(4)
        if kind == 1:
            host = socket.inet_ntop(socket.AF_INET, exactly(4))
        elif kind == 4:
            host = socket.inet_ntop(socket.AF_INET6, exactly(16))
        else:
            host = exactly(exactly(1)[0]).decode("ascii")
        (port,) = struct.unpack("!H", exactly(2))
        self.targets.append((host, port))
        if (version, command) != (5, 1):
            conn.sendall(b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00")
            return
        with socket.create_connection(("127.0.0.1", port), timeout=5) as upstream:
            conn.sendall(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", port))
            relay(conn, upstream)


def relay(client: socket.socket, upstream: socket.socket) -> None:
    """Copy bytes both ways until either side hangs up (or 5 s pass with nothing to copy).

    One thread does both directions: the client's side is a TLS socket when the proxy
    speaks HTTPS, and a TLS socket read on one thread while written on another fails now
    and then (a read raising ``BlockingIOError``, the tunnel torn down mid-handshake).
    Bytes the TLS layer has already decrypted do not wake ``select``, so they are taken
    first."""
    other = {client: upstream, upstream: client}
    while True:
        ready = [side for side in other if isinstance(side, ssl.SSLSocket) and side.pending()]
        if not ready:
            ready = select.select(list(other), [], [], 5)[0]
            if not ready:
                return
        for source in ready:
            try:
                chunk = source.recv(65536)
                if not chunk:
                    return
                other[source].sendall(chunk)
            except OSError:
                return


@pytest.fixture
def proxies() -> Iterator[Callable[..., Any]]:
    started: List[LoopbackServer] = []

    def start(kind: str, *args: Any) -> Any:
        proxy = Socks5Proxy() if kind == "socks5" else ScriptedProxy(kind, *args)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


class TestProxies:
    """Proxies as ``requests`` uses them for every Python program, except that a loopback
    endpoint never goes through one. The endpoint is a name (``ingest.test``) that only a
    proxy that connects it to 127.0.0.1 can reach, unless the test resolver is in place."""

    def test_an_https_endpoint_through_a_connect_tunnel(
            self, tls_server: ScriptedServer, certificate: Certificate, names: Names,
            proxy_env: Callable[..., None], proxies: Callable[..., Any]) -> None:
        proxy = proxies("tunnel")
        proxy_env(HTTPS_PROXY=f"http://me:s%40cret@{proxy.address}",
                  REQUESTS_CA_BUNDLE=str(certificate.path))
        transport = HttpTransport()
        outcome = transport.send(f"https://ingest.test:{tls_server.port}/v2/",
                                 b'[{"secret":"in the body"}]', 5)
        transport.close()
        assert outcome.result is Result.SENT
        (head,) = proxy.heads
        lines = head.split("\r\n")
        assert lines[0].startswith(f"CONNECT ingest.test:{tls_server.port} HTTP/1.")
        credentials = base64.b64encode(b"me:s@cret").decode()
        assert f"Proxy-Authorization: Basic {credentials}" in lines
        assert "secret" not in head.replace("s%40cret", "")  # the body went only through TLS
        assert body_of(tls_server.requests[0]) == b'[{"secret":"in the body"}]'
        assert "ingest.test" not in names.asked  # the proxy looked it up, not us

    def test_an_internationalised_host_name_goes_out_as_punycode(
            self, tls_server: ScriptedServer, certificate: Certificate, names: Names,
            proxy_env: Callable[..., None], proxies: Callable[..., Any],
            make_client: Callable[..., kaibantrace.Telemetry]) -> None:
        """``https://télémétrie.example/v2/`` is accepted at configuration and sent: the
        tunnel is asked for its IDNA form, which the certificate names too."""
        url = f"https://{IDNA_HOST}:{tls_server.port}/v2/"
        assert endpoint_problem(url) is None
        proxy = proxies("tunnel")
        proxy_env(HTTPS_PROXY=f"http://{proxy.address}", REQUESTS_CA_BUNDLE=str(certificate.path))
        client = make_client(endpoint=url)
        client.emit("from_afar")
        assert client.flush(5) is True
        connect = proxy.heads[0].split("\r\n")[0]
        assert connect.startswith(f"CONNECT {IDNA_PUNYCODE}:{tls_server.port} HTTP/1."), connect
        assert f"Host: {IDNA_PUNYCODE}:{tls_server.port}" in head_of(tls_server.requests[0])

    def test_an_https_proxy(self, tls_server: ScriptedServer, certificate: Certificate,
                            names: Names, proxy_env: Callable[..., None],
                            proxies: Callable[..., Any]) -> None:
        """A proxy spoken to over TLS: the tunnel's TLS runs inside the proxy's."""
        proxy = proxies("tunnel", certificate.context)
        proxy_env(HTTPS_PROXY=f"https://localhost:{proxy.port}",
                  REQUESTS_CA_BUNDLE=str(certificate.path))
        outcome = HttpTransport().send(f"https://ingest.test:{tls_server.port}/v2/", b"[]", 5)
        assert outcome.result is Result.SENT
        assert [h.split("\r\n")[0][:-1] for h in proxy.heads] == [
            f"CONNECT ingest.test:{tls_server.port} HTTP/1."]

    def test_a_socks5_proxy(self, tls_server: ScriptedServer, certificate: Certificate,
                            names: Names, proxy_env: Callable[..., None],
                            proxies: Callable[..., Any]) -> None:
        pytest.importorskip("socks", reason="SOCKS needs PySocks (requests[socks])")
        proxy = proxies("socks5")
        proxy_env(ALL_PROXY=f"socks5h://127.0.0.1:{proxy.port}",
                  REQUESTS_CA_BUNDLE=str(certificate.path))
        outcome = HttpTransport().send(f"https://ingest.test:{tls_server.port}/v2/", b"[7]", 5)
        assert outcome.result is Result.SENT
        assert proxy.targets == [("ingest.test", tls_server.port)]  # the proxy resolves it
        assert [body_of(r) for r in tls_server.requests] == [b"[7]"]
        assert "ingest.test" not in names.asked

    def test_a_proxy_that_refuses_the_tunnel_is_a_retry(
            self, names: Names, proxy_env: Callable[..., None],
            proxies: Callable[..., Any]) -> None:
        proxy = proxies("refuse")
        proxy_env(HTTPS_PROXY=f"http://{proxy.address}")
        outcome = HttpTransport().send("https://ingest.test/v2/", b"[]", 5)
        assert (outcome.result, outcome.detail) == (Result.RETRY, "ProxyError")
        assert len(proxy.heads) == 1

    @pytest.mark.parametrize("no_proxy", ["ingest.test", "ingest.test:{port}", ".test", "*"])
    def test_no_proxy_goes_direct(self, no_proxy: str, tls_server: ScriptedServer,
                                  certificate: Certificate, names: Names,
                                  proxy_env: Callable[..., None],
                                  proxies: Callable[..., Any]) -> None:
        proxy = proxies("refuse")
        proxy_env(HTTPS_PROXY=f"http://{proxy.address}", REQUESTS_CA_BUNDLE=str(certificate.path),
                  NO_PROXY=no_proxy.format(port=tls_server.port))
        outcome = HttpTransport().send(f"https://ingest.test:{tls_server.port}/v2/", b"[]", 5)
        assert outcome.result is Result.SENT and proxy.heads == []
        assert "ingest.test" in names.asked

    def test_a_loopback_endpoint_is_never_proxied(
            self, collector: Collector, tls_server: ScriptedServer, certificate: Certificate,
            proxy_env: Callable[..., None], proxies: Callable[..., Any]) -> None:
        """A proxy elsewhere would reach its own loopback, and plain HTTP (allowed only for
        loopback endpoints) must not cross a network."""
        proxy = proxies("refuse")
        address = f"http://{proxy.address}"
        proxy_env(ALL_PROXY=address, HTTPS_PROXY=address, HTTP_PROXY=address,
                  REQUESTS_CA_BUNDLE=str(certificate.path))
        transport = HttpTransport()
        assert transport.send(tls_server.url, b"[]", 5).result is Result.SENT  # https://localhost
        assert transport.send(collector.url, b"[]", 5).result is Result.SENT  # http://127.0.0.1
        assert transport.send(f"https://[::1]:{tls_server.port}/v2/", b"[]", 2).result is Result.RETRY
        transport.close()
        assert proxy.heads == [] and len(collector.wait_for_requests(1)) == 1


_WITHOUT_PYSOCKS_CHILD = textwrap.dedent("""
    import json, logging, sys

    sys.modules["socks"] = None  # as if PySocks were not installed: importing it fails
    said = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    logging.getLogger("kaibantrace").addHandler(Keep())
    from kaibantrace._delivery.transport import HttpTransport

    transport = HttpTransport()
    outcomes = [transport.send(sys.argv[1], b"[]", 2) for _ in range(2)]
    print(json.dumps({"outcomes": [[o.result.value, o.detail] for o in outcomes], "said": said}))
""")


def test_a_socks_proxy_without_pysocks_sends_nothing_and_says_so_once(
        serve: Callable[..., ScriptedServer], proxies: Callable[..., Any], tmp_path: Path) -> None:
    endpoint = serve(lambda n: OK)
    proxy = proxies("socks5")
    env = child_env(tmp_path, ALL_PROXY=f"socks5h://127.0.0.1:{proxy.port}")
    done = subprocess.run([sys.executable, "-c", _WITHOUT_PYSOCKS_CHILD,
                           f"https://ingest.test:{endpoint.port}/v2/"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    report = json.loads(done.stdout)
    assert report["outcomes"] == [["retry", "InvalidSchema"]] * 2
    (warning,) = report["said"]
    assert "SOCKS proxy" in warning and "PySocks" in warning
    assert proxy.connections == 0 and endpoint.connections == 0


# -- a resolver that hangs -------------------------------------------------------------

_STUCK_LOOKUP_CHILD = textwrap.dedent("""
    import json, socket, sys, threading, time

    in_lookup = threading.Event()

    def stuck(*args, **kwargs):  # a resolver that never answers
        in_lookup.set()
        threading.Event().wait(120)
        raise socket.gaierror("gave up")

    socket.getaddrinfo = stuck
    import kaibantrace

    client = kaibantrace.Telemetry(app_id=sys.argv[1], endpoint="https://stuck.test/v2/")
    client.emit("before_the_lookup")
    ready = in_lookup.wait(30)
    client.emit("during_the_lookup")
    started = time.monotonic()
    flushed = client.flush(0.5)
    print(json.dumps({"in_lookup": ready, "flushed": flushed,
                      "flush_s": time.monotonic() - started}), flush=True)
""")


def test_a_hanging_name_lookup_holds_up_neither_flush_nor_exit(tmp_path: Path) -> None:
    env = child_env(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", _STUCK_LOOKUP_CHILD, APP_ID], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stderr is not None
        line = child.stdout.readline()
        said = time.monotonic()
        code = child.wait(timeout=60)
        exit_s = time.monotonic() - said
        stderr = child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert code == 0 and stderr == "", stderr
    report = json.loads(line)
    assert report["in_lookup"] is True and report["flushed"] is False
    assert report["flush_s"] < 1.5, report  # asked for 0.5 s
    assert exit_s < 3.0, exit_s  # a 100 ms exit budget, and the interpreter's own teardown


# -- where requests is loaded ------------------------------------------------------------

_IMPORT_THREAD_CHILD = textwrap.dedent("""
    import json, sys, threading

    importers = []

    def audit(event, args):
        if event == "import" and args[0] in ("requests", "urllib3"):
            importers.append(threading.current_thread().name)

    sys.addaudithook(audit)
    import kaibantrace

    client = kaibantrace.Telemetry(app_id=sys.argv[1], endpoint=sys.argv[2])
    client.emit("first")
    flushed = client.flush(10)
    print(json.dumps({"importers": sorted(set(importers)), "flushed": flushed}))
""")


def test_requests_is_loaded_on_the_sending_thread_only(tmp_path: Path, collector: Collector) -> None:
    done = subprocess.run([sys.executable, "-c", _IMPORT_THREAD_CHILD, APP_ID, collector.url],
                          env=child_env(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    report = json.loads(done.stdout)
    assert report == {"importers": ["kaibantrace-poster"], "flushed": True}
    assert len(collector.wait_for(1)) == 1


def test_urllib3_says_nothing_about_our_requests_in_the_hosts_log(
        serve: Callable[..., ScriptedServer], collector: Collector,
        make_client: Callable[..., kaibantrace.Telemetry], caplog: pytest.LogCaptureFixture) -> None:
    """A host that logs everything at DEBUG sees no urllib3 line about kaibantrace's requests
    (a malformed answer is a WARNING with a traceback there); its own requests log as before."""
    import requests

    caplog.set_level(logging.DEBUG)
    answer, _ = HOSTILE["Content-Length : 0"]
    client = make_client(endpoint=serve(answer).url, backoff=0.05, timeout=2)
    client.emit("hostile")
    assert client.flush(8)
    client.shutdown(2)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")] == []
    requests.post(collector.url, data=b"[]", timeout=5).close()  # the host's own request
    assert any(r.name.startswith("urllib3") for r in caplog.records)
