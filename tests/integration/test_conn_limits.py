"""The real ``twistd mirror`` under connection pressure: a thousand clients sending their
headers byte by byte, malformed framing written raw to the socket, and a full
connection table."""

from __future__ import annotations

import errno
import http.client
import json
import resource
import selectors
import socket
import threading
import time

import pytest

from tests.integration.mirror_proc import MirrorProcess, tcp_endpoint
from tests.integration.upstream_registry import free_port

pytestmark = pytest.mark.integration

SLOW_CLIENTS = 1000
HEADER_TIMEOUT = 3.0
TICK = 0.2  # each slow client sends its next byte this often


def get_v2(port: int, timeout: float = 5.0) -> tuple[int, bytes, float]:
    """``GET /v2/`` on a new connection: (status, body, seconds taken)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/v2/")
        response = conn.getresponse()
        return response.status, response.read(), time.monotonic() - started
    finally:
        conn.close()


def fd_soft_limit(pid: int) -> int:
    """The soft open-file limit of process ``pid``."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no Max open files line")


@pytest.fixture
def enough_fds():
    """This process (and the mirror it starts, which inherits it) may open 4096 files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096
    if soft >= want:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the open-file limit ({hard}) is too low for {SLOW_CLIENTS} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class SlowClient:
    """A nonblocking connection that sends a request's headers one byte at a time and
    never finishes them; it notes when the server closes it."""

    HEADERS = b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000

    def __init__(self, port: int, *, silent: bool = False) -> None:
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", port))
        self.opened = time.monotonic()
        self.silent = silent
        self.sent = 0
        self.closed_at: float | None = None
        self.received = b""

    def send_next(self) -> None:
        if self.closed_at is not None or self.silent:
            return
        try:
            self.sent += self.sock.send(self.HEADERS[self.sent : self.sent + 1])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.EAGAIN):  # not connected yet: next tick
                return
            self.closed_at = time.monotonic()  # EPIPE, ECONNRESET: the server closed it

    def read(self) -> None:
        """The socket is readable: an answer (the 408), or the server's close."""
        try:
            while data := self.sock.recv(4096):
                self.received += data
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass  # a reset: closed too
        if self.closed_at is None:
            self.closed_at = time.monotonic()


def test_a_thousand_slow_clients_neither_block_others_nor_outlive_the_header_timeout(tmp_path, enough_fds):
    """1,000 connections trickle their headers a byte every 0.2 s (plus a silent one and a
    slow one to the metrics listener): meanwhile `GET /v2/` on new connections is answered
    within a second each, and the server closes every slow connection header_timeout
    (3 s) after it opened, not before and not much later."""
    metrics_port = free_port()
    port = free_port()
    mirror = MirrorProcess(
        tmp_path,
        [],
        listen=[tcp_endpoint(port) + ":backlog=1024"],  # a thousand connects at once: a deep accept queue
        hosted=["*"],
        gc={"interval": 0},
        limits={"header_timeout": HEADER_TIMEOUT},
        metrics={"listen": tcp_endpoint(metrics_port)},
    )
    clients: list[SlowClient] = []
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def normal_requests() -> None:
        while not stop.is_set():
            try:
                status, body, seconds = get_v2(port)
                latencies.append(seconds)
                if status != 200:
                    failures.append(f"GET /v2/ answered {status}: {body[:200]!r}")
            except OSError as e:
                failures.append(f"GET /v2/ failed: {e!r}")
            stop.wait(0.2)

    with mirror:
        assert fd_soft_limit(mirror.proc.pid) >= 2 * SLOW_CLIENTS, "the mirror could not hold the connections"
        selector = selectors.DefaultSelector()
        normal = threading.Thread(target=normal_requests)
        try:
            clients = [SlowClient(port) for _ in range(SLOW_CLIENTS)]
            clients += [SlowClient(port, silent=True), SlowClient(metrics_port)]
            for client in clients:
                selector.register(client.sock, selectors.EVENT_READ, client)
            normal.start()
            deadline = time.monotonic() + HEADER_TIMEOUT + 3.0
            while time.monotonic() < deadline and any(c.closed_at is None for c in clients):
                tick = time.monotonic() + TICK
                for client in clients:
                    client.send_next()
                while (left := tick - time.monotonic()) > 0:
                    for key, _ in selector.select(left):
                        key.data.read()
                        if key.data.closed_at is not None:
                            selector.unregister(key.fileobj)
        finally:
            stop.set()
            if normal.is_alive():
                normal.join(10)
            selector.close()
            for client in clients:
                client.sock.close()

    assert failures == []
    assert len(latencies) >= 10, latencies
    assert max(latencies) < 1.0, f"slowest GET /v2/: {max(latencies):.2f} s"
    open_still = [c for c in clients if c.closed_at is None]
    assert open_still == [], f"{len(open_still)} slow connections still open {HEADER_TIMEOUT + 3} s on"
    lifetimes = sorted(c.closed_at - c.opened for c in clients)
    assert lifetimes[0] > HEADER_TIMEOUT - 0.5, f"closed early: {lifetimes[:5]}"
    assert lifetimes[-1] < HEADER_TIMEOUT + 2.5, f"closed late: {lifetimes[-5:]}"
    assert max(c.sent for c in clients) >= HEADER_TIMEOUT / TICK - 3  # they did trickle all along
    answered = [c for c in clients if c.received]
    assert all(c.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for c in answered)


@pytest.fixture(scope="module")
def small_mirror(tmp_path_factory):
    """A mirror that takes 3 connections at most."""
    with MirrorProcess(
        tmp_path_factory.mktemp("small"),
        [],
        hosted=["*"],
        gc={"interval": 0},
        limits={"max_connections": 3, "header_timeout": 10},
    ) as mirror:
        yield mirror


RAW = {
    "bare LF line ends": b"GET /v2/ HTTP/1.1\nHost: m\n\n",
    "a bare LF before the CRLF": b"GET /v2/ HTTP/1.1\r\nHost: m\n\r\n",
    "HTTP/1.1 without Host": b"GET /v2/ HTTP/1.1\r\n\r\n",
    "two Host headers": b"GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "Transfer-Encoding identity": b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: identity\r\n"
    b"Content-Length: 2\r\n\r\nab",
    "two Content-Lengths": b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    "Content-Length and chunked": b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", RAW)
def test_malformed_framing_is_answered_400_and_closed_at_once(small_mirror, name):
    """Raw bytes on a real socket: each framing mistake is a 400 and a close within a
    second (the bare-LF and Host cases used to be held open, or served)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", small_mirror.port), timeout=5) as sock:
        sock.sendall(RAW[name])
        received = b""
        while data := sock.recv(4096):
            received += data
    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert time.monotonic() - started < 1.0


def test_connections_beyond_max_connections_get_503_until_one_closes(small_mirror):
    """Three kept-alive connections fill the table: every new one is answered 503 with an
    OCI error (read whole, not lost to a reset); when one of the three closes, new
    connections are served again."""
    port = small_mirror.port
    held = [http.client.HTTPConnection("127.0.0.1", port, timeout=5) for _ in range(3)]
    try:
        for conn in held:
            conn.request("GET", "/v2/")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        for _ in range(20):
            status, body, seconds = get_v2(port)
            assert status == 503
            assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
            assert seconds < 1.0
        held.pop().close()
        deadline = time.monotonic() + 5
        while (status := get_v2(port)[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
    finally:
        for conn in held:
            conn.close()
