"""Several ``twistd mirror`` nodes on one bucket behaving as one mirror (issue 10).

The upstream here is a small threaded HTTP server in the test process that serves one
blob slowly and counts what it is asked, so that a fill is still under way while other
nodes join it (a real Distribution answers too fast on loopback to catch one mid-way).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.integration.mirror_proc import MirrorProcess
from tests.integration.proc_util import wait_until
from tests.integration.upstream_registry import free_port, http_request

pytestmark = pytest.mark.integration

SECRET = "cluster-test-secret-0123456789"
REPO = "library/slow"


class SlowUpstream:
    """Serves ``/v2/library/slow/blobs/<digest>`` of one blob in 64 KiB pieces, ``rate``
    bytes per second (from ``Range: bytes=N-`` on, with 206, when asked); records every
    request and how far each GET got."""

    def __init__(self, data: bytes, rate: float) -> None:
        self.data = data
        self.digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.rate = rate
        self.requests: list[tuple[str, str]] = []
        self.sent = 0  # bytes of the blob sent by GETs so far
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _known(self) -> bool:
                return self.path == f"/v2/{REPO}/blobs/{upstream.digest}"

            def do_HEAD(self) -> None:
                with upstream.lock:
                    upstream.requests.append(("HEAD", self.path))
                self.send_response(200 if self._known() or self.path == "/v2/" else 404)
                self.send_header("Content-Length", str(len(upstream.data)) if self._known() else "0")
                self.end_headers()

            def do_GET(self) -> None:
                with upstream.lock:
                    upstream.requests.append(("GET", self.path))
                if not self._known():
                    self.send_response(200 if self.path == "/v2/" else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size, start = len(upstream.data), 0
                asked = (self.headers.get("Range") or "").removeprefix("bytes=").removesuffix("-")
                if asked.isdigit() and int(asked) < size:
                    start = int(asked)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(size - start))
                self.send_header("Docker-Content-Digest", upstream.digest)
                self.end_headers()
                piece = 64 * 1024
                try:
                    for i in range(start, len(upstream.data), piece):
                        self.wfile.write(upstream.data[i : i + piece])
                        with upstream.lock:
                            upstream.sent += len(upstream.data[i : i + piece])
                        time.sleep(piece / upstream.rate)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def gets(self) -> list[str]:
        with self.lock:
            return [path for method, path in self.requests if method == "GET" and "/blobs/" in path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_upstream() -> Iterator[SlowUpstream]:
    upstream = SlowUpstream(os.urandom(6 * 1024 * 1024), rate=3 * 1024 * 1024)  # about two seconds
    yield upstream
    upstream.close()


@pytest.fixture
def cluster(seaweed, workdir, slow_upstream):
    """``cluster(n)``: n nodes on one bucket prefix, each advertising its own port."""
    prefix = f"t-{secrets.token_hex(6)}/"
    started: list[MirrorProcess] = []

    def start(count: int, **extra: object) -> list[MirrorProcess]:
        for _ in range(count):
            d = workdir / f"node{len(started)}"
            d.mkdir()
            port = free_port()
            m = MirrorProcess(
                d,
                [{"registry": "docker.io", "url": slow_upstream.url, "timeout": 5}],
                listen=[f"tcp:{port}:interface=127.0.0.1"],
                storage=seaweed.storage(prefix, d / "spool"),
                cluster={"advertise": f"http://127.0.0.1:{port}", "secret": SECRET},
                gc={"interval": 0},
                **extra,
            )
            started.append(m.start())
        return started[-count:]

    yield start
    for m in started:
        m.stop()


def open_blob(node: MirrorProcess, digest: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    conn.request("GET", f"/v2/{REPO}/blobs/{digest}")
    response = conn.getresponse()
    assert response.status == 200, response.read()[:300]
    return conn, response


def test_cold_pulls_on_three_nodes_cause_one_upstream_fetch(cluster, slow_upstream):
    """Clients on three nodes ask for one cold blob while the first node fetches it: the
    upstream sends it once, each client gets its first bytes while that one fetch is still
    under way (the other nodes follow the fill instead of waiting for it), and every
    client's copy verifies."""
    a, b, c = cluster(3)
    digest, total = slow_upstream.digest, len(slow_upstream.data)
    streams = [open_blob(a, digest)]
    first = [streams[0][1].read(64 * 1024)]
    for node in (b, c):
        streams.append(open_blob(node, digest))
        first.append(streams[-1][1].read(64 * 1024))
        assert slow_upstream.sent < total, "the fill ended before a follower got its first bytes"
    for (conn, response), head in zip(streams, first, strict=True):
        body = head + response.read()
        conn.close()
        assert hashlib.sha256(body).hexdigest() == digest[7:]
    assert slow_upstream.gets() == [f"/v2/{REPO}/blobs/{digest}"]
    for node in (b, c):
        assert wait_until(lambda node=node: f"fill followed from node http://127.0.0.1:{a.port}" in node.log_text(), 10)
    # Stored once, in the bucket: a fourth request, on any node, is a hit.
    status, _, body = http_request(f"{c.url}/v2/{REPO}/blobs/{digest}", timeout=30)
    assert status == 200 and hashlib.sha256(body).hexdigest() == digest[7:]
    assert len(slow_upstream.gets()) == 1


def test_kill_9_of_the_filling_node_mid_blob(cluster, slow_upstream):
    """The node fetching a blob is killed (SIGKILL) while another node's client follows its
    fill: the follower resumes from the upstream at the byte it reached (Range), without
    waiting for the dead node's lease to expire, so that client's response goes on to the
    end, verified; the blob is then stored and served by the surviving node."""
    a, b = cluster(2)
    digest, total = slow_upstream.digest, len(slow_upstream.data)
    conn_a, response_a = open_blob(a, digest)
    response_a.read(64 * 1024)
    conn_b, response_b = open_blob(b, digest)
    got = response_b.read(64 * 1024)
    assert a.proc is not None
    os.kill(a.proc.pid, 9)
    a.proc.popen.wait(timeout=10)
    a.proc = None
    got += response_b.read()
    conn_a.close()
    conn_b.close()
    assert len(got) == total and hashlib.sha256(got).hexdigest() == digest[7:]
    assert slow_upstream.sent < 2 * total  # (resumed: not fetched twice whole)
    status, _, body = http_request(f"{b.url}/v2/{REPO}/blobs/{digest}", timeout=60)
    assert status == 200 and hashlib.sha256(body).hexdigest() == digest[7:]
    assert len(slow_upstream.gets()) == 2  # the dead node's fetch, and the survivor's resume


def sign(method: str, path: str, secret: str = SECRET, when: float | None = None) -> str:
    stamp = str(int(time.time() if when is None else when))
    mac = hmac.new(secret.encode(), f"{method}\n{path}\n{stamp}".encode(), hashlib.sha256).hexdigest()
    return f"{stamp}:{mac}"


def test_the_node_to_node_endpoint_needs_the_cluster_secret(cluster, slow_upstream, seaweed, workdir):
    """A blob is served by digest alone only to a request signed with the cluster's secret:
    unsigned, wrongly signed or stale requests are refused (403 DENIED), a correctly signed
    one is served; a node without a cluster section has no such endpoint (404)."""
    (a,) = cluster(1)
    digest = slow_upstream.digest
    assert wait_until(lambda: http_request(f"{a.url}/v2/{REPO}/blobs/{digest}", timeout=30)[0] == 200, 30)
    path = f"/_cluster/fills/{digest}"
    for header in (None, sign("GET", path, "wrong-secret-wrong-secret"), sign("GET", path, when=time.time() - 600),
                   sign("GET", "/_cluster/fills/sha256:" + "0" * 64), "garbage", "\u00b2:" + "a" * 64,
                   "1" * 5000 + ":" + "a" * 64):
        status, _, body = http_request(f"{a.url}{path}", headers={"Mirror-Cluster-Auth": header} if header else {})
        assert status == 403 and b"DENIED" in body, (header, status, body[:200])
    status, _, body = http_request(f"{a.url}{path}", headers={"Mirror-Cluster-Auth": sign("GET", path)}, timeout=30)
    assert status == 200 and hashlib.sha256(body).hexdigest() == digest[7:]
    (workdir / "lone").mkdir()
    lone = MirrorProcess(workdir / "lone", [{"registry": "docker.io", "url": slow_upstream.url}],
                         storage=seaweed.storage(f"t-{secrets.token_hex(6)}/", workdir / "lone-spool"))
    with lone:
        status, _, _ = http_request(f"{lone.url}{path}", headers={"Mirror-Cluster-Auth": sign("GET", path)})
        assert status == 404
