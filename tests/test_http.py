"""kaibantrace's own HTTP client, against real loopback servers that answer in awkward ways."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from kaibantrace._dial import Dialer
from kaibantrace._http import IDLE_REUSE, Client, ProtocolError
from kaibantrace._transport import HttpTransport, Result
from kaibantrace.testing import Collector

Answer = Callable[[int], Optional[bytes]]  # request number -> raw answer (None: hang up)
CLOSE = b"CLOSE:"  # an answer that starts with this: send the rest, then close the connection


class LoopbackServer:
    """A TCP server on 127.0.0.1 that hands each connection to ``_handle`` on a thread."""

    def __init__(self) -> None:
        self.connections = 0
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
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


class ScriptedServer(LoopbackServer):
    """A loopback HTTP server that answers each request with the bytes ``answer`` gives."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: List[bytes] = []
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/"

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(data) < length:
                    data += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + data[:length])
                data = data[length:]
                answer = self.answer(len(self.requests))
                if answer is None:
                    return
                conn.sendall(answer.removeprefix(CLOSE))
                if answer.startswith(CLOSE):
                    return


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], ScriptedServer]]:
    servers: List[ScriptedServer] = []

    def start(answer: Answer) -> ScriptedServer:
        servers.append(ScriptedServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_keeps_the_connection_alive(serve: Callable[[Answer], ScriptedServer]) -> None:
    server = serve(lambda n: OK)
    client = Client("test-agent")
    for _ in range(5):
        assert client.post(server.url, b"[]", "application/json", 5).status == 200
    assert server.connections == 1
    head = server.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /v2/ HTTP/1.1\r\n")
    assert "User-Agent: test-agent" in head and "Content-Length: 2" in head
    client.close()


def test_reads_a_chunked_answer_and_reuses_the_connection(
        serve: Callable[[Answer], ScriptedServer]) -> None:
    chunked = (b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")
    server = serve(lambda n: chunked)
    client = Client("t")
    assert [client.post(server.url, b"[]", "application/json", 5).status for _ in range(3)] == [
        202, 202, 202]
    assert server.connections == 1


def test_a_large_or_unbounded_answer_is_not_read(serve: Callable[[Answer], ScriptedServer]) -> None:
    """A body over 64 KiB, or one that runs until the server closes, is left unread and the
    connection closed: the answer costs no time and no memory."""
    huge = b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000
    endless = b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 1000
    for answer in (huge, endless):
        server = serve(lambda n, a=answer: a)  # type: ignore[misc]
        client = Client("t")
        started = time.monotonic()
        assert client.post(server.url, b"[]", "application/json", 5).status == 200
        assert client.post(server.url, b"[]", "application/json", 5).status == 200
        assert time.monotonic() - started < 4
        assert server.connections == 2


def test_an_answer_without_a_body_keeps_the_connection(
        serve: Callable[[Answer], ScriptedServer]) -> None:
    server = serve(lambda n: b"HTTP/1.1 204 No Content\r\n\r\n")
    client = Client("t")
    assert [client.post(server.url, b"[]", "application/json", 5).status for _ in range(3)] == [
        204, 204, 204]
    assert server.connections == 1


def test_retry_after_and_connection_close(serve: Callable[[Answer], ScriptedServer]) -> None:
    busy = b"HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    server = serve(lambda n: busy)
    client = Client("t")
    answer = client.post(server.url, b"[]", "application/json", 5)
    assert (answer.status, answer.retry_after) == (429, "7")
    client.post(server.url, b"[]", "application/json", 5)
    assert server.connections == 2


def test_a_connection_the_server_closed_is_replaced(
        serve: Callable[[Answer], ScriptedServer]) -> None:
    """The server closes each connection after its answer (as servers do with idle ones):
    every request still succeeds, each reaching the server exactly once."""
    server = serve(lambda n: CLOSE + OK)
    client = Client("t")
    for body in (b"[1]", b"[2]", b"[3]"):
        assert client.post(server.url, body, "application/json", 5).status == 200
        time.sleep(0.05)  # let the server's hang-up arrive before the next request
    assert [r.rsplit(b"\r\n\r\n", 1)[1] for r in server.requests] == [b"[1]", b"[2]", b"[3]"]
    assert server.connections == 3


def test_a_new_connection_closed_without_answer_is_an_error_not_a_resend(
        serve: Callable[[Answer], ScriptedServer]) -> None:
    server = serve(lambda n: None)
    with pytest.raises(ProtocolError):
        Client("t").post(server.url, b"[]", "application/json", 5)
    assert len(server.requests) == 1


def test_bytes_past_an_answer_are_never_taken_for_the_next_one(
        serve: Callable[[Answer], ScriptedServer]) -> None:
    """A server that sends more than its answer: the next request gets its own answer on a
    new connection, not the stray bytes."""
    stray = b"HTTP/1.1 400 Stray\r\nContent-Length: 0\r\n\r\n"
    server = serve(lambda n: OK + stray if n == 1 else OK)
    client = Client("t")
    assert [client.post(server.url, b"[]", "application/json", 5).status for _ in range(2)] == [
        200, 200]
    assert server.connections == 2


def test_an_interim_answer_then_a_hang_up_is_never_a_resend(
        serve: Callable[[Answer], ScriptedServer]) -> None:
    server = serve(lambda n: OK if n == 1 else CLOSE + b"HTTP/1.1 100 Continue\r\n\r\n")
    client = Client("t")
    client.post(server.url, b"[1]", "application/json", 5)
    with pytest.raises(OSError):
        client.post(server.url, b"[2]", "application/json", 5)
    assert len(server.requests) == 2  # the second request went out once


def test_an_answer_before_the_whole_request_was_read_is_heard() -> None:
    """A server that answers 413 and hangs up after the first kilobyte of a large batch:
    the batch is refused (dropped), not retried as if the network had failed."""
    listener = socket.create_server(("127.0.0.1", 0))

    def refuse_early() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.shutdown(socket.SHUT_RDWR)

    thread = threading.Thread(target=refuse_early, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v2/"
    try:
        outcome = HttpTransport().send(url, b"[" + b"1," * 4_000_000 + b"1]", 10)
    finally:
        thread.join(5)
        listener.close()
    assert outcome.result is Result.REJECTED, outcome


def test_an_idle_connection_is_not_trusted(serve: Callable[[Answer], ScriptedServer],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(lambda n: OK)
    client = Client("t")
    client.post(server.url, b"[]", "application/json", 5)
    monkeypatch.setattr("kaibantrace._http.IDLE_REUSE", 0.0)
    client.post(server.url, b"[]", "application/json", 5)
    assert server.connections == 2 and IDLE_REUSE > 0


def test_garbage_and_slow_drip_are_bounded(serve: Callable[[Answer], ScriptedServer]) -> None:
    garbage = serve(lambda n: b"\xff\xfe not http at all\r\n\r\n")
    with pytest.raises(ProtocolError):
        Client("t").post(garbage.url, b"[]", "application/json", 5)

    def drip(n: int) -> Optional[bytes]:
        time.sleep(3)  # nothing for longer than the deadline
        return OK

    slow = serve(drip)
    started = time.monotonic()
    with pytest.raises(OSError):
        Client("t").post(slow.url, b"[]", "application/json", 0.5)
    assert time.monotonic() - started < 2


class Names:
    """DNS for the tests. It is the one part of the network that cannot be made real here,
    so ``getaddrinfo`` is replaced: ``stuck.test`` waits until the test ends, as a dead
    resolver would; ``ingest.test`` is 127.0.0.1; ``addresses`` gives a name a list of
    loopback socket addresses; ``localhost`` resolves as usual; any other name fails, so
    no test ever asks a real resolver."""

    def __init__(self) -> None:
        self.asked: List[str] = []
        self.addresses: Dict[str, List[Tuple[str, int]]] = {}
        self.release = threading.Event()
        self._real = socket.getaddrinfo

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        self.asked.append(host)
        if host == "stuck.test":
            self.release.wait(30)
        elif host == "ingest.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]
        elif host in self.addresses:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", a) for a in self.addresses[host]]
        elif host == "localhost":
            return self._real(host, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_AGAIN, "temporary failure in name resolution")


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> Iterator[Names]:
    fake = Names()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    yield fake
    fake.release.set()


class TestNameResolution:
    """Looking up the endpoint's name is part of the request's deadline."""

    @pytest.fixture
    def stuck_resolver(self, names: Names) -> List[str]:
        return names.asked

    def test_a_lookup_that_hangs_ends_at_the_deadline(self, stuck_resolver: List[str]) -> None:
        client = Client("t")
        started = time.monotonic()
        for _ in range(3):
            with pytest.raises(TimeoutError):
                client.post("http://stuck.test:9/v2/", b"[]", "application/json", 0.3)
        assert time.monotonic() - started < 5
        assert stuck_resolver == ["stuck.test"]  # the later requests waited on the same lookup

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_a_forked_child_does_not_wait_on_its_parents_lookup(
            self, stuck_resolver: List[str]) -> None:
        client = Client("t")
        with pytest.raises(TimeoutError):
            client.post("http://stuck.test:9/v2/", b"[]", "application/json", 0.2)
        pid = os.fork()
        if pid == 0:  # the parent's lookup thread is not in this process
            code = 1
            try:
                client.forget_after_fork()
                try:
                    client.post("http://stuck.test:9/v2/", b"[]", "application/json", 0.2)
                except TimeoutError:
                    code = 0 if stuck_resolver == ["stuck.test", "stuck.test"] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0

    def test_a_name_that_resolves_is_reached(self, stuck_resolver: List[str],
                                             serve: Callable[[Answer], ScriptedServer]) -> None:
        server = serve(lambda n: OK)
        port = server.url.split(":")[2].split("/")[0]
        answer = Client("t").post(f"http://localhost:{port}/v2/", b"[]", "application/json", 5)
        assert answer.status == 200 and stuck_resolver == ["localhost"]

    def test_a_literal_address_is_not_looked_up(self, stuck_resolver: List[str],
                                                serve: Callable[[Answer], ScriptedServer]) -> None:
        assert Client("t").post(serve(lambda n: OK).url, b"[]", "application/json", 5).status == 200
        assert stuck_resolver == []

    def test_an_address_that_drops_packets_leaves_time_for_the_next(self, names: Names) -> None:
        """IPv6 dropped, IPv4 fine (here: a listener whose queue is full, then a good one):
        the first attempt gets only its share of the deadline."""
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        waiting = []
        for _ in range(4):  # fill its queue: further connection attempts go unanswered
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(full.getsockname())
            waiting.append(s)
        good = socket.create_server(("127.0.0.1", 0))
        names.addresses["two.test"] = [full.getsockname(), good.getsockname()]
        try:
            started = time.monotonic()
            sock = Dialer().connect("two.test", 0, time.monotonic() + 2.0)
            elapsed = time.monotonic() - started
            assert sock.getpeername() == good.getsockname() and elapsed < 1.9
            sock.close()
        finally:
            for s in [*waiting, full, good]:
                s.close()

    def test_a_sender_facing_a_dead_resolver_keeps_its_deadlines(
            self, stuck_resolver: List[str]) -> None:
        outcome = HttpTransport().send("https://stuck.test/v2/", b"[]", 0.3)
        assert outcome.result is Result.RETRY and outcome.detail == "TimeoutError"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("where", ["another host", "another port", "the same place"])
def test_redirects_are_answers_never_followed(serve: Callable[[Answer], ScriptedServer],
                                              status: int, where: str) -> None:
    """A redirect is refused like a 4xx and never followed: neither to another host (here
    ``localhost``, another name for the loopback), nor another port, nor the same URL."""
    elsewhere = serve(lambda n: OK)
    port = elsewhere.url.split(":")[2].split("/")[0]
    location = {"another host": f"http://localhost:{port}/v2/", "another port": elsewhere.url,
                "the same place": None}[where]
    moved: ScriptedServer = serve(lambda n: (
        f"HTTP/1.1 {status} Moved\r\nLocation: {location or moved.url}\r\n"
        "Content-Length: 0\r\n\r\n").encode())
    transport = HttpTransport()
    outcome = transport.send(moved.url, b"[]", 5)
    transport.close()
    assert outcome.result is Result.REJECTED
    assert elsewhere.requests == [] and len(moved.requests) == 1


class TlsServer(LoopbackServer):
    """An HTTPS server on loopback with a self-signed certificate for ``localhost``: trusted
    only by a client told to (``REQUESTS_CA_BUNDLE``); it answers each request with OK."""

    def __init__(self, directory: Path) -> None:
        import ssl
        import subprocess

        self.cert, key = directory / "cert.pem", directory / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,DNS:ingest.test",
                        "-keyout", str(key), "-out", str(self.cert)],
                       check=True, capture_output=True, timeout=60)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(self.cert), str(key))
        self.requests: List[bytes] = []
        super().__init__()
        self.url = f"https://localhost:{self.port}/v2/"
        self.remote_url = f"https://ingest.test:{self.port}/v2/"  # a name a proxy may carry

    def _handle(self, conn: socket.socket) -> None:
        import ssl

        try:
            conn.settimeout(5)
            with self._context.wrap_socket(conn, server_side=True) as tls:
                self.requests.append(tls.recv(65536))
                tls.sendall(OK)
        except (OSError, ssl.SSLError):
            pass  # the client refused our certificate, as it should unless told to trust it


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsServer]:
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    server = TlsServer(tmp_path)
    yield server
    server.close()


@pytest.fixture
def untrusted_tls_url(tls_server: TlsServer) -> str:
    return tls_server.url


def test_a_certificate_no_one_trusts_is_a_retry_never_a_send(untrusted_tls_url: str) -> None:
    started = time.monotonic()
    outcome = HttpTransport().send(untrusted_tls_url, b"[]", 5)
    assert outcome.result is Result.RETRY and "SSL" in outcome.detail
    assert time.monotonic() - started < 5


def test_a_client_facing_a_tls_error_fails_quietly(untrusted_tls_url: str) -> None:
    import kaibantrace

    client = kaibantrace.Telemetry(app_id="15E9347E-9EE5-4971-A8FB-61D91F3EBA12",
                                   endpoint=untrusted_tls_url, backoff=0.05)
    try:
        client.emit("over_bad_tls")
        assert client.flush(3) is False
        stats = client.stats()
        assert stats["sent"] == 0 and stats["in_outbox"] == 1  # kept for a later run
    finally:
        client.shutdown()


@pytest.mark.parametrize(("answer", "expected"), [
    (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 200_000, "sent"),  # an endless body: never read
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\nxx", "sent"),  # a huge one
    (b"HTTP/1.1 307 Elsewhere\r\nLocation: http://127.0.0.1:9/v2/\r\nContent-Length: 0\r\n\r\n",
     "rejected"),
    (b"\xff\xfe\xfd not HTTP at all\r\n\r\n", "retried"),
    (b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\n\xff\xfe\xfd\xfc\xfb", "retried"),
])
def test_a_client_counts_what_a_hostile_endpoint_does(
        serve: Callable[[Answer], ScriptedServer], answer: bytes, expected: str) -> None:
    """Each kind of answer ends as a count in stats(), in bounded time, with no exception."""
    import kaibantrace

    server = serve(lambda n: CLOSE + answer)
    client = kaibantrace.Telemetry(app_id="15E9347E-9EE5-4971-A8FB-61D91F3EBA12",
                                   endpoint=server.url, backoff=0.05, timeout=2)
    started = time.monotonic()
    try:
        client.emit("hostile")
        delivered = client.flush(5)
    finally:
        client.shutdown()
    stats = client.stats()
    assert time.monotonic() - started < 10
    assert delivered is (expected == "sent")
    if expected == "sent":
        assert stats["sent"] == 1
    elif expected == "rejected":
        assert stats["dropped"] == {"rejected": 1} and stats["sent"] == 0
    else:
        assert stats["retried"] >= 1 and stats["sent"] == 0


class ScriptedProxy(LoopbackServer):
    """A loopback HTTP proxy: records each request's head, then, by ``mode``, opens the
    tunnel to the asked port on 127.0.0.1 and relays both ways ("tunnel"), answers 407
    ("refuse"), or drips an answer one byte at a time and never finishes ("drip")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.heads: List[bytes] = []
        super().__init__()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head = data.partition(b"\r\n\r\n")[0]
            self.heads.append(head)
            if self.mode == "refuse":
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Content-Length: 0\r\n\r\n")
            elif self.mode == "drip":
                for byte in b"HTTP/1.1 200 Connection established, eventually" * 100:
                    if self._stop.wait(0.05):
                        return
                    conn.sendall(bytes([byte]))
            else:
                port = head.split()[1].decode().rpartition(":")[2]  # whatever the host: loopback
                with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as upstream:
                    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    relay = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
                    relay.start()
                    _pipe(conn, upstream)
                    relay.join(5)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            chunk = source.recv(65536)
            if not chunk:
                break
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set the proxy variables for one test, and only those."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)

    def set_proxy(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_proxy


class TestProxy:
    """kaibantrace's own client speaks to the configured proxy itself, under the same
    deadline as a direct request; a proxy it cannot use is never bypassed. The endpoint is
    ``ingest.test``, a name the scripted proxy connects to 127.0.0.1 (the client never
    looks it up when a proxy carries it)."""

    def test_an_https_endpoint_through_a_tunnel(self, tls_server: TlsServer,
                                                proxy_env: Callable[..., None]) -> None:
        proxy = ScriptedProxy("tunnel")
        try:
            proxy_env(HTTPS_PROXY=f"http://me:s%40cret@{proxy.address}",
                      REQUESTS_CA_BUNDLE=str(tls_server.cert))
            transport = HttpTransport()
            outcome = transport.send(tls_server.remote_url, b'[{"secret":"in the body"}]', 5)
            transport.close()
        finally:
            proxy.close()
        assert outcome.result is Result.SENT
        (head,) = proxy.heads
        assert head.split(b"\r\n")[0] == f"CONNECT ingest.test:{tls_server.port} HTTP/1.1".encode()
        assert b"Proxy-Authorization: Basic bWU6c0BjcmV0" in head  # me:s@cret
        assert b"in the body" in tls_server.requests[0]  # the body went only through TLS

    def test_a_proxy_that_refuses_the_tunnel_is_a_retry(self, proxy_env: Callable[..., None]) -> None:
        proxy = ScriptedProxy("refuse")
        try:
            proxy_env(HTTPS_PROXY=f"http://{proxy.address}")
            outcome = HttpTransport().send("https://ingest.test/v2/", b"[]", 5)
        finally:
            proxy.close()
        assert (outcome.result, outcome.detail) == (Result.RETRY, "ProxyRefused")

    def test_a_proxy_that_drips_ends_at_the_deadline(self, proxy_env: Callable[..., None]) -> None:
        proxy = ScriptedProxy("drip")
        try:
            proxy_env(HTTPS_PROXY=f"http://{proxy.address}")
            started = time.monotonic()
            outcome = HttpTransport().send("https://ingest.test/v2/", b"[]", 0.5)
            elapsed = time.monotonic() - started
        finally:
            proxy.close()
        assert (outcome.result, outcome.detail) == (Result.RETRY, "TimeoutError")
        assert elapsed < 3

    @pytest.mark.parametrize("no_proxy", ["ingest.test", "ingest.test:{port}", ".test", "*"])
    def test_no_proxy_goes_direct(self, no_proxy: str, tls_server: TlsServer, names: Names,
                                  proxy_env: Callable[..., None]) -> None:
        proxy = ScriptedProxy("refuse")
        try:
            proxy_env(HTTPS_PROXY=f"http://{proxy.address}", REQUESTS_CA_BUNDLE=str(tls_server.cert),
                      NO_PROXY=no_proxy.format(port=tls_server.port))
            outcome = HttpTransport().send(tls_server.remote_url, b"[]", 5)
        finally:
            proxy.close()
        assert outcome.result is Result.SENT and proxy.heads == []

    def test_a_loopback_endpoint_is_never_proxied(self, collector: Collector,
                                                  tls_server: TlsServer,
                                                  proxy_env: Callable[..., None]) -> None:
        """A proxy elsewhere would reach its own loopback, and plain HTTP (allowed only for
        loopback endpoints) must not cross a network."""
        proxy = ScriptedProxy("refuse")
        try:
            proxy_env(ALL_PROXY=f"http://{proxy.address}", REQUESTS_CA_BUNDLE=str(tls_server.cert))
            transport = HttpTransport()
            assert transport.send(tls_server.url, b"[]", 5).result is Result.SENT  # localhost
            transport.send(collector.url, b"[]", 5)  # http://127.0.0.1
            transport.close()
        finally:
            proxy.close()
        assert proxy.heads == [] and len(collector.wait_for_requests(1)) == 1

    @pytest.mark.parametrize("setting", ["socks5://127.0.0.1:{port}", "https://127.0.0.1:{port}"])
    def test_a_proxy_it_cannot_speak_is_never_bypassed(
            self, setting: str, serve: Callable[[Answer], ScriptedServer], names: Names,
            proxy_env: Callable[..., None], caplog: pytest.LogCaptureFixture) -> None:
        endpoint = serve(lambda n: OK)
        proxy = serve(lambda n: OK)
        proxy_env(ALL_PROXY=setting.format(port=proxy.port))
        transport = HttpTransport()
        with caplog.at_level(logging.WARNING, logger="kaibantrace"):
            outcome = transport.send(f"https://ingest.test:{endpoint.port}/v2/", b"[]", 5)
            said_at_once = len(caplog.records)
            transport.send(f"https://ingest.test:{endpoint.port}/v2/", b"[]", 5)
        assert said_at_once == 1 and len(caplog.records) == 1  # at the first attempt, and once
        assert outcome.result is Result.RETRY and setting.split(":")[0] in outcome.detail
        assert endpoint.connections == 0 and proxy.connections == 0 and names.asked == []

    def test_a_client_behind_an_unusable_proxy_says_why_once(
            self, serve: Callable[[Answer], ScriptedServer], names: Names,
            proxy_env: Callable[..., None], caplog: pytest.LogCaptureFixture) -> None:
        import kaibantrace

        endpoint = serve(lambda n: OK)
        proxy_env(ALL_PROXY="socks5://127.0.0.1:9")
        client = kaibantrace.Telemetry(app_id="15E9347E-9EE5-4971-A8FB-61D91F3EBA12",
                                       endpoint=f"https://ingest.test:{endpoint.port}/v2/",
                                       backoff=0.05)
        try:
            with caplog.at_level(logging.WARNING, logger="kaibantrace"):
                for _ in range(3):
                    client.emit("behind_socks")
                    client.flush(2)
            stats = client.stats()
        finally:
            client.shutdown()
        assert endpoint.connections == 0 and stats["sent"] == 0 and stats["in_outbox"] == 3
        warnings = [r.getMessage() for r in caplog.records]
        assert warnings[0].startswith("kaibantrace: a socks5 proxy is configured"), warnings
        assert len(warnings) <= 2  # and, once three attempts failed, the circuit breaker's line

    def test_a_slow_proxy_decision_keeps_the_deadline(self, proxy_env: Callable[..., None],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """On macOS and Windows the system's proxy exceptions may make the decision look
        names up; here the standard library's check is made to hang as such a lookup would."""
        import urllib.request

        release = threading.Event()
        monkeypatch.setattr(urllib.request, "proxy_bypass", lambda host: release.wait(30))
        proxy_env(HTTPS_PROXY="http://127.0.0.1:9")
        transport = HttpTransport()
        started = time.monotonic()
        try:
            outcomes = [transport.send("https://ingest.test/v2/", b"[]", 0.3) for _ in range(2)]
        finally:
            release.set()
        assert [o.detail for o in outcomes] == ["TimeoutError"] * 2
        assert time.monotonic() - started < 3


class TestProxySetting:
    """Reading the settings, without any network."""

    @pytest.mark.parametrize(("variables", "host", "expected"), [
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, "ingest.example", ("proxy.corp", 3128, None)),
        ({"https_proxy": "proxy.corp:8080"}, "ingest.example", ("proxy.corp", 8080, None)),
        ({"ALL_PROXY": "http://u%20x:p@proxy.corp"}, "ingest.example",
         ("proxy.corp", 80, "Basic dSB4OnA=")),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, "127.0.0.1", None),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, "localhost", None),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, "::1", None),
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "10.0.0.0/8"}, "10.1.2.3", None),
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "10.0.0.0/8"}, "192.0.2.1",
         ("proxy.corp", 3128, None)),
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "ingest.example:8443"},
         "ingest.example", ("proxy.corp", 3128, None)),  # another port
        ({"HTTP_PROXY": "http://proxy.corp:3128"}, "ingest.example", None),  # only for http
    ])
    def test_which_proxy(self, variables: Dict[str, str], host: str, expected: Any,
                         proxy_env: Callable[..., None]) -> None:
        from kaibantrace._proxy import proxy_for

        proxy_env(**variables)
        assert proxy_for("https", host, 443) == expected
        assert proxy_for("http", host, 80) is None  # plain HTTP never goes through a proxy

    @pytest.mark.parametrize("setting", ["socks5h://proxy:1080", "https://proxy:443",
                                         "http://proxy:notaport", "http://:3128"])
    def test_what_it_cannot_use(self, setting: str, proxy_env: Callable[..., None]) -> None:
        from kaibantrace._proxy import UnsupportedProxy, proxy_for

        proxy_env(HTTPS_PROXY=setting)
        with pytest.raises(UnsupportedProxy):
            proxy_for("https", "ingest.example", 443)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/v2/\r\nX-Injected: 1", "http://127.0.0.1:9/v 2/"])
def test_a_url_that_would_break_the_request_is_refused_before_any_socket(url: str) -> None:
    with pytest.raises(ValueError):
        Client("t").post(url, b"[]", "application/json", 1)
