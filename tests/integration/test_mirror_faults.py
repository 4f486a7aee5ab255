"""The mirror in-process against a fake upstream: pull-through behaviour and faults.

Real TCP on 127.0.0.1 and the real reactor; the fake upstream (tests/fake_upstream.py)
produces what a real registry cannot: corrupt bytes, dropped connections, 429, 500, stalls.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time

import pytest
import pytest_twisted

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.web.client import ResponseFailed

from mirror.core.oci import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Digest
from tests.storeutil import Sync, blob_path

LAYER = os.urandom(3 * 1024 * 1024 + 17)
CONFIG = b'{"architecture":"amd64","os":"linux"}'


def image(fake, name="library/app", tag="latest"):
    """Put a one-layer Docker schema2 image in the fake upstream; returns (manifest digest, layer digest)."""
    return fake.add_image(name, tag, LAYER, CONFIG)


async def assert_client_fails(m, path):
    """The client gets an error status, or a body cut short: never a whole-looking response."""
    r = await m.get(path)
    if r.code == 200:
        with pytest.raises(ResponseFailed):
            await r.content()
    else:
        assert r.code == 503 and await error_of(r) == "UNAVAILABLE"


async def error_of(response):
    body = json.loads(await response.content())
    return body["errors"][0]["code"]


class Events:
    """Captures twisted.logger events for the duration of a test."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def kinds(self, kind):
        return [e for e in self.events if e.get("event_kind") == kind]


@pytest.fixture
def events():
    observer = Events()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


async def sleep(seconds):
    await task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_manifest_and_blob_pulled_through_then_cached(fake_upstream, make_mirror, events):
    """A miss is fetched once, verified and stored; the second request is a hit served locally."""
    manifest_digest, layer = image(fake_upstream)
    m = make_mirror(fake_upstream.url)
    r = await m.get("/v2/library/app/manifests/latest", headers={"Accept": DOCKER_MANIFEST})
    assert r.code == 200
    assert r.headers.getRawHeaders("docker-content-digest") == [manifest_digest]
    assert r.headers.getRawHeaders("content-type") == [DOCKER_MANIFEST]
    await r.content()
    for _ in range(2):
        r = await m.get(f"/v2/library/app/blobs/{layer}")
        assert r.code == 200
        assert r.length == len(LAYER)  # Twisted's client moves Content-Length into .length
        assert r.headers.getRawHeaders("etag") == [f'"{layer}"']
        assert await r.content() == LAYER
    assert fake_upstream.count("GET", f"/blobs/{layer}") == 1
    # by digest: never touches the upstream once cached
    before = sum(fake_upstream.requests.values())
    r = await m.get(f"/v2/library/app/manifests/{manifest_digest}")
    assert r.code == 200 and Digest.of(await r.content()) == Digest.of(fake_upstream.manifests[("library/app", "latest")][0])
    assert sum(fake_upstream.requests.values()) == before
    await m.settled()  # (the blob's fetch is logged once it is stored, after its last byte went out)
    fetches = events.kinds("upstream_fetch")
    assert {e["kind"] for e in fetches} == {"manifest", "blob"}
    blob_fetch = next(e for e in fetches if e["kind"] == "blob")
    assert blob_fetch["outcome"] == "stored" and blob_fetch["bytes"] == len(LAYER)
    assert blob_fetch["upstream"] == "docker.io" and blob_fetch["repository"] == "library/app"
    assert {e["result"] for e in events.kinds("cache")} >= {"miss", "hit"}


@pytest_twisted.ensureDeferred
async def test_head_manifest_by_tag_has_digest_type_length_and_no_body(fake_upstream, make_mirror):
    """docker and containerd resolve tags with HEAD: Docker-Content-Digest must be there."""
    manifest_digest, _ = image(fake_upstream)
    m = make_mirror(fake_upstream.url)
    r = await m.get("/v2/library/app/manifests/latest", method="HEAD")
    assert r.code == 200
    assert r.headers.getRawHeaders("docker-content-digest") == [manifest_digest]
    assert r.headers.getRawHeaders("content-type") == [DOCKER_MANIFEST]
    size = len(fake_upstream.manifests[("library/app", "latest")][0])
    assert r.length in (size, 0)  # Twisted's client reports a HEAD body as 0 bytes
    assert await r.content() == b""


@pytest_twisted.ensureDeferred
async def test_blob_range_and_head(fake_upstream, make_mirror):
    """Range gives 206 with Content-Range; HEAD gives the size; a bad range is 416 RANGE_INVALID."""
    _, layer = image(fake_upstream)
    m = make_mirror(fake_upstream.url)
    r = await m.get(f"/v2/library/app/blobs/{layer}", method="HEAD")
    assert r.code == 200
    await r.content()
    assert fake_upstream.count("GET", layer) == 0  # HEAD did not download
    r = await m.get(f"/v2/library/app/blobs/{layer}", headers={"Range": "bytes=100-199"})
    assert r.code == 206
    assert r.headers.getRawHeaders("content-range") == [f"bytes 100-199/{len(LAYER)}"]
    assert await r.content() == LAYER[100:200]
    r = await m.get(f"/v2/library/app/blobs/{layer}", headers={"Range": f"bytes={len(LAYER)}-"})
    assert r.code == 416 and await error_of(r) == "RANGE_INVALID"


@pytest.mark.parametrize("streaming", [False, True])
@pytest_twisted.ensureDeferred
async def test_corrupt_blob_is_not_cached_and_client_fails(streaming, fake_upstream, make_mirror, events):
    """Bytes that do not match the digest: the client's response is cut short (or an error when
    the fill failed before it began), nothing is stored, and the mismatch is logged."""
    _, layer = image(fake_upstream)
    fake_upstream.faults[layer] = "corrupt"
    if streaming:
        fake_upstream.chunk_delay = 0.002  # the client is following the fill when it fails
    m = make_mirror(fake_upstream.url)
    if streaming:
        r = await m.get(f"/v2/library/app/blobs/{layer}")
        assert r.code == 200 and r.length == len(LAYER)
        with pytest.raises(ResponseFailed):
            await r.content()
    else:
        await assert_client_fails(m, f"/v2/library/app/blobs/{layer}")
    await sleep(0.2)
    assert Sync(m.store).blobs.stat(Digest("sha256", layer.split(":")[1])) is None
    assert os.listdir(m.root / "spool") == []
    assert events.kinds("digest_mismatch")


@pytest_twisted.ensureDeferred
async def test_body_broken_mid_way_is_resumed_with_a_range_request(fake_upstream, make_mirror, events):
    """A blob body cut off half-way is asked for again from the byte it reached: the
    client gets every byte in one response, and the blob is cached."""
    _, layer = image(fake_upstream)
    fake_upstream.faults[layer] = "drop"
    m = make_mirror(fake_upstream.url)
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert r.code == 200 and await r.content() == LAYER
    assert fake_upstream.ranges_asked == [str(len(LAYER) // 2)]
    assert fake_upstream.count("GET", layer) == 2
    await m.settled()
    assert blob_path(m.root, layer).read_bytes() == LAYER
    assert [e["offset"] for e in events.kinds("upstream_resume")] == [len(LAYER) // 2]
    assert b'mirror_upstream_resumes_total{upstream="docker.io"} 1.0' in m.registry.metrics.exposition()


@pytest_twisted.ensureDeferred
async def test_resume_from_an_upstream_without_ranges_skips_what_it_has(fake_upstream, make_mirror):
    """An upstream that answers a Range request with the whole blob (200) still resumes:
    the bytes before the offset are skipped, the digest computation goes on."""
    _, layer = image(fake_upstream)
    fake_upstream.ranges = False
    fake_upstream.faults[layer] = "drop"
    fake_upstream.once.add(layer)
    m = make_mirror(fake_upstream.url)
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert r.code == 200 and await r.content() == LAYER
    assert fake_upstream.ranges_asked == [str(len(LAYER) // 2)]
    await m.settled()
    assert blob_path(m.root, layer).read_bytes() == LAYER


@pytest_twisted.ensureDeferred
async def test_body_that_keeps_breaking_fails_the_client_and_is_not_cached(fake_upstream, make_mirror):
    """A body that breaks again and again without progress is given up: the client's
    response is cut off (never completed as if whole), nothing is cached, and the next
    request fetches afresh."""
    _, layer = image(fake_upstream)
    fake_upstream.faults[layer] = "drop_always"
    m = make_mirror(fake_upstream.url)
    await assert_client_fails(m, f"/v2/library/app/blobs/{layer}")
    await m.settled()
    assert not blob_path(m.root, layer).exists()
    gets = fake_upstream.count("GET", layer)
    assert 2 < gets < 30  # resumed, but not forever
    del fake_upstream.faults[layer]
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert await r.content() == LAYER
    assert fake_upstream.count("GET", layer) == gets + 1


@pytest.mark.parametrize("fault", ["500", "stall", "429"])
@pytest_twisted.ensureDeferred
async def test_transient_upstream_failure_is_retried(fault, fake_upstream, make_mirror, events):
    """One 5xx, stall (past the timeout) or 429 (Retry-After within the deadline) before
    the answer: the request is tried again and the client never sees the failure."""
    _, layer = image(fake_upstream)
    fake_upstream.faults[layer] = fault
    fake_upstream.once.add(layer)
    fake_upstream.retry_after = "1"
    m = make_mirror(fake_upstream.url, timeout=0.5)
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert r.code == 200 and await r.content() == LAYER
    assert fake_upstream.count("GET", layer) == 2
    assert len(events.kinds("upstream_retry")) == 1
    reason = {"500": "500", "stall": "timeout", "429": "429"}[fault]
    assert f'mirror_upstream_retries_total{{reason="{reason}",upstream="docker.io"}} 1.0'.encode() in (
        m.registry.metrics.exposition()
    )


@pytest_twisted.ensureDeferred
async def test_retries_give_up_at_the_deadline(fake_upstream, make_mirror, events):
    """An upstream that keeps failing is tried again with backoff until retry_deadline,
    then the client gets the error (and the give-up is logged and counted)."""
    _, layer = image(fake_upstream)
    fake_upstream.faults[layer] = "500"
    m = make_mirror(fake_upstream.url, retry_deadline=1.5)
    started = time.monotonic()
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert r.code == 503 and await error_of(r) == "UNAVAILABLE"
    assert 0.3 < time.monotonic() - started < 3
    assert 3 <= fake_upstream.count("GET", layer) <= 8
    assert len(events.kinds("upstream_give_up")) == 1
    assert b'mirror_upstream_give_ups_total{reason="500",upstream="docker.io"} 1.0' in m.registry.metrics.exposition()


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_requests_one_upstream_get(fake_upstream, make_mirror):
    """20 clients asking for one missing blob at once cause exactly one upstream GET."""
    _, layer = image(fake_upstream)
    fake_upstream.chunk_delay = 0.005  # stream slowly, so clients join mid-body
    m = make_mirror(fake_upstream.url)

    async def pull():
        r = await m.get(f"/v2/library/app/blobs/{layer}")
        return await r.content()

    bodies = await defer.gatherResults([defer.ensureDeferred(pull()) for _ in range(20)])
    assert all(b == LAYER for b in bodies)
    assert fake_upstream.count("GET", f"/blobs/{layer}") == 1


@pytest_twisted.ensureDeferred
async def test_client_disconnect_does_not_cancel_fill(fake_upstream, make_mirror):
    """A client that leaves mid-stream does not stop the fill: the blob still lands."""
    _, layer = image(fake_upstream)
    fake_upstream.chunk_delay = 0.005
    m = make_mirror(fake_upstream.url)
    d = m.get(f"/v2/library/app/blobs/{layer}")
    r = await d
    r.original._transport.abortConnection() if hasattr(r.original, "_transport") else None
    await sleep(0)
    # give up on the body right away
    r.deliverBody(_Abort())
    digest = Digest("sha256", layer.split(":")[1])
    for _ in range(100):
        if Sync(m.store).blobs.stat(digest) is not None:
            break
        await sleep(0.05)
    assert Sync(m.store).blobs.stat(digest) == len(LAYER)
    assert fake_upstream.count("GET", f"/blobs/{layer}") == 1


class _Abort:
    """A body protocol that drops the connection as soon as it starts."""

    def makeConnection(self, transport):
        transport.stopProducing()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


@pytest_twisted.ensureDeferred
async def test_429_passes_through_with_retry_after(fake_upstream, make_mirror):
    """An upstream 429 whose Retry-After reaches past the retry deadline, with nothing
    cached, is TOOMANYREQUESTS at once, with the upstream's Retry-After."""
    image(fake_upstream)
    fake_upstream.faults["library/app:latest"] = "429"
    m = make_mirror(fake_upstream.url, retry_deadline=5)  # Retry-After (7 s) reaches past it
    started = time.monotonic()
    r = await m.get("/v2/library/app/manifests/latest")
    assert r.code == 429 and await error_of(r) == "TOOMANYREQUESTS"
    assert r.headers.getRawHeaders("retry-after") == ["7"]
    assert time.monotonic() - started < 1 and fake_upstream.count("GET", "/manifests/latest") == 1


@pytest.mark.parametrize("fault", ["500", "429", "stall", "down"])
@pytest_twisted.ensureDeferred
async def test_stale_tag_served_when_upstream_fails(fault, fake_upstream, make_mirror, events):
    """After the TTL, an upstream that fails (5xx, 429, stalls, is gone) gets the cached digest served."""
    manifest_digest, _ = image(fake_upstream)
    m = make_mirror(fake_upstream.url, tag_ttl=0, timeout=1)
    r = await m.get("/v2/library/app/manifests/latest")
    assert r.code == 200
    await r.content()
    if fault == "down":
        upstream = m.registry._upstreams["docker.io"]
        assert hasattr(upstream, "config")  # same object; point it at a closed port instead
        object.__setattr__(upstream, "config", _closed_port_config(m))
    else:
        fake_upstream.faults["library/app:latest"] = fault
    started = time.monotonic()
    r = await m.get("/v2/library/app/manifests/latest")
    assert r.code == 200
    assert r.headers.getRawHeaders("docker-content-digest") == [manifest_digest]
    await r.content()
    assert time.monotonic() - started < 5
    assert events.kinds("stale_tag")


def _closed_port_config(m):
    import attrs

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return attrs.evolve(m.registry.config.upstreams[0], url=f"http://127.0.0.1:{port}")


@pytest_twisted.ensureDeferred
async def test_tag_revalidated_with_head_after_ttl(fake_upstream, make_mirror):
    """Within the TTL no upstream request; after it, one HEAD; a moved tag is fetched anew."""
    image(fake_upstream)
    m = make_mirror(fake_upstream.url, tag_ttl=0.3)
    for _ in range(3):
        r = await m.get("/v2/library/app/manifests/latest")
        await r.content()
    assert fake_upstream.count("GET", "/manifests/latest") == 1
    assert fake_upstream.count("HEAD", "/manifests/latest") == 0
    await sleep(0.4)
    r = await m.get("/v2/library/app/manifests/latest")
    await r.content()
    assert fake_upstream.count("HEAD", "/manifests/latest") == 1
    assert fake_upstream.count("GET", "/manifests/latest") == 1
    new_digest, _ = image(fake_upstream)  # same content: same digest; now move the tag
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
           "manifests": [{"mediaType": DOCKER_MANIFEST, "size": 1, "digest": new_digest}]}
    moved = fake_upstream.add_manifest("library/app", "latest", doc, OCI_INDEX)
    await sleep(0.4)
    r = await m.get("/v2/library/app/manifests/latest")
    assert r.headers.getRawHeaders("docker-content-digest") == [moved]
    assert r.headers.getRawHeaders("content-type") == [OCI_INDEX]
    await r.content()


@pytest_twisted.ensureDeferred
async def test_upstream_digest_header_mismatch_rejected(fake_upstream, make_mirror):
    """A manifest whose bytes disagree with the upstream's Docker-Content-Digest is refused, not stored."""
    image(fake_upstream)
    fake_upstream.lie_digest = True
    m = make_mirror(fake_upstream.url)
    r = await m.get("/v2/library/app/manifests/latest")
    assert r.code == 502 and await error_of(r) == "DIGEST_INVALID"
    assert await m.store.metadata.list_tags("docker.io/library/app") is None  # (in a thread)


@pytest_twisted.ensureDeferred
async def test_stalled_upstream_times_out(fake_upstream, make_mirror):
    """An upstream that never answers gives UNAVAILABLE after the configured timeout (and
    the retries within the deadline), not a hang."""
    _, layer = image(fake_upstream)
    fake_upstream.faults[layer] = "stall"
    m = make_mirror(fake_upstream.url, timeout=0.5, retry_deadline=1)
    started = time.monotonic()
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert r.code == 503 and await error_of(r) == "UNAVAILABLE"
    assert time.monotonic() - started < 3


@pytest_twisted.ensureDeferred
async def test_bearer_token_fetched_once_and_reused(fake_upstream, make_mirror):
    """401 + Bearer challenge: one token from the realm, reused for later requests of the repo."""
    _manifest_digest, layer = image(fake_upstream)
    fake_upstream.token_required = True
    m = make_mirror(fake_upstream.url)
    r = await m.get("/v2/library/app/manifests/latest")
    assert r.code == 200
    await r.content()
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert await r.content() == LAYER
    assert fake_upstream.tokens_issued == 1


@pytest_twisted.ensureDeferred
async def test_accept_without_stored_type_is_manifest_unknown(fake_upstream, make_mirror):
    """A client whose Accept excludes the manifest's type gets MANIFEST_UNKNOWN, never another type."""
    image(fake_upstream)
    m = make_mirror(fake_upstream.url)
    r = await m.get("/v2/library/app/manifests/latest", headers={"Accept": OCI_MANIFEST})
    assert r.code == 404 and await error_of(r) == "MANIFEST_UNKNOWN"
    r = await m.get("/v2/library/app/manifests/latest", headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"})
    assert r.code == 200
    await r.content()


@pytest_twisted.ensureDeferred
async def test_upstream_404_and_listings(fake_upstream, make_mirror):
    """Unknown upstream content is 404 with the spec codes; listings show what the mirror holds."""
    image(fake_upstream)
    m = make_mirror(fake_upstream.url)
    r = await m.get("/v2/library/app/manifests/nope")
    assert r.code == 404 and await error_of(r) == "MANIFEST_UNKNOWN"
    r = await m.get(f"/v2/library/app/blobs/sha256:{'0' * 64}")
    assert r.code == 404 and await error_of(r) == "BLOB_UNKNOWN"
    r = await m.get("/v2/library/app/tags/list")
    assert r.code == 404 and await error_of(r) == "NAME_UNKNOWN"
    for tag in ("latest",):
        await (await m.get(f"/v2/library/app/manifests/{tag}")).content()
    r = await m.get("/v2/library/app/tags/list")
    assert json.loads(await r.content()) == {"name": "library/app", "tags": ["latest"]}
    r = await m.get("/v2/_catalog")
    assert json.loads(await r.content()) == {"repositories": ["docker.io/library/app"]}


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/Library/app/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a/../b/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a/%2e%2e/b/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/" + "a" * 256 + "/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/app/manifests/-bad", 400, "TAG_INVALID"),
        ("/v2/library/app/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/library/app/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("/v2/library/app/manifests/sha256:" + "Z" * 64, 400, "DIGEST_INVALID"),
        ("/v2/library/app/blobs/uploads/", 405, "UNSUPPORTED"),
        ("/v2/_catalog?n=abc", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v3/", 404, "UNSUPPORTED"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_input_gets_spec_errors(path, status, code, fake_upstream, make_mirror):
    """Bad names, tags, digests and endpoints get the spec's JSON error, never a traceback."""
    m = make_mirror(fake_upstream.url)
    r = await _raw_get(m, path)
    assert r[0] == status, r
    assert json.loads(r[1])["errors"][0]["code"] == code
    assert sum(fake_upstream.requests.values()) == 0


async def _raw_get(m, path):
    """GET a path byte-for-byte (no client-side normalisation of '..')."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    class Raw(Protocol):
        def __init__(self):
            self.data = b""
            self.done = defer.Deferred()

        def dataReceived(self, data):
            self.data += data

        def connectionLost(self, reason):
            self.done.callback(self.data)

    port = int(m.url.rsplit(":", 1)[1])
    proto = Raw()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    proto.transport.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await proto.done
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest_twisted.ensureDeferred
async def test_tls_client_hello_refused_at_once(fake_upstream, make_mirror):
    """A TLS ClientHello on the plain port is answered 400 at once (skopeo/podman probe TLS first)."""
    m = make_mirror(fake_upstream.url)
    port = int(m.url.rsplit(":", 1)[1])
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = out.read()

    def probe():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            started = time.monotonic()
            s.sendall(hello)
            answer = s.recv(100)
            return answer, time.monotonic() - started

    from twisted.internet.threads import deferToThread

    answer, seconds = await deferToThread(probe)
    assert answer.startswith(b"HTTP/1.1 400")
    assert seconds < 1


@pytest_twisted.ensureDeferred
async def test_ns_routes_and_unknown_ns(fake_upstream, make_mirror):
    """containerd's ?ns= picks the upstream and is not part of the cache key; an unknown ns is an error."""
    manifest_digest, _layer = image(fake_upstream)
    m = make_mirror(fake_upstream.url)
    r = await m.get("/v2/library/app/manifests/latest?ns=docker.io")
    assert r.headers.getRawHeaders("docker-content-digest") == [manifest_digest]
    await r.content()
    r = await m.get("/v2/library/app/manifests/latest")  # same cache entry
    await r.content()
    r = await m.get("/v2/docker.io/app/manifests/latest")  # prefix form, library/ added
    await r.content()
    assert fake_upstream.count("GET", "/manifests/latest") == 1
    r = await m.get("/v2/library/app/manifests/latest?ns=quay.io")
    assert r.code == 404 and await error_of(r) == "NAME_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_access_record_batches_reads_and_flushes(fake_upstream, make_mirror):
    """Reads only note the time in memory; a flush writes it as the blob's mtime (no write per read)."""
    _, layer = image(fake_upstream)
    m = make_mirror(fake_upstream.url)
    digest = Digest("sha256", layer.split(":")[1])
    await (await m.get(f"/v2/library/app/blobs/{layer}")).content()
    await sleep(0.1)
    await m.registry.access.flush()
    os.utime(blob_path(m.root, digest), (1_000_000.0, 1_000_000.0))  # pretend it was last read long ago
    before = time.time()
    await (await m.get(f"/v2/library/app/blobs/{layer}")).content()
    assert os.stat(blob_path(m.root, digest)).st_mtime == 1_000_000.0  # nothing written yet
    assert await m.registry.access.flush() >= 1
    assert os.stat(blob_path(m.root, digest)).st_mtime >= before - 1


@pytest_twisted.ensureDeferred
async def test_referrers_of_mirrored_repositories_come_from_the_upstream(fake_upstream, make_mirror):
    """Referrers of a mirrored image are the upstream's (filtered here by artifactType);
    an upstream without the API gets a 404, so clients fall back to the tag schema."""
    manifest_digest, _ = image(fake_upstream)
    m = make_mirror(fake_upstream.url)
    r = await m.get(f"/v2/library/app/referrers/{manifest_digest}")
    assert r.code == 404
    await r.content()
    sig = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 10, "artifactType": "application/example.sig"}
    sbom = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "2" * 64, "size": 10, "artifactType": "application/example.sbom"}
    fake_upstream.referrers = {manifest_digest: [sig, sbom]}
    r = await m.get(f"/v2/library/app/referrers/{manifest_digest}")
    assert r.code == 200 and r.headers.getRawHeaders("content-type") == [OCI_INDEX]
    assert json.loads(await r.content())["manifests"] == [sig, sbom]
    r = await m.get(f"/v2/library/app/referrers/{manifest_digest}?artifactType=application/example.sbom")
    assert r.headers.getRawHeaders("oci-filters-applied") == ["artifactType"]
    assert json.loads(await r.content())["manifests"] == [sbom]


@pytest.mark.parametrize("scope", ["global", "upstream"])
@pytest_twisted.ensureDeferred
async def test_offline_serves_cache_and_refuses_misses_loudly(scope, fake_upstream, make_mirror):
    """offline: true (global, or per upstream) never contacts the upstream: cached tags and
    blobs are served, and a miss answers at once with an error naming the mirror as offline
    and the missing image."""
    import attrs

    _, layer = image(fake_upstream)
    m = make_mirror(fake_upstream.url, tag_ttl=0)
    r = await m.get("/v2/library/app/manifests/latest")
    await r.content()
    config = m.registry.config
    if scope == "global":
        m.registry.reconfigure(attrs.evolve(config, offline=True))
    else:
        m.registry.reconfigure(attrs.evolve(config, upstreams=(attrs.evolve(config.upstreams[0], offline=True),)))
    before = sum(fake_upstream.requests.values())
    r = await m.get("/v2/library/app/manifests/latest")  # TTL 0: would revalidate if online
    assert r.code == 200
    await r.content()
    started = time.monotonic()
    r = await m.get("/v2/library/app/manifests/other")
    assert r.code == 404
    error = json.loads(await r.content())["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "offline" in error["message"] and "docker.io/library/app:other" in error["message"]
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert r.code == 404 and await error_of(r) == "BLOB_UNKNOWN"
    assert time.monotonic() - started < 1
    assert sum(fake_upstream.requests.values()) == before


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_cache_fetches_and_stale_tags(fake_upstream, make_mirror):
    """Metrics follow what happened: requests by route and status, cache hits and misses,
    joins, upstream fetches and bytes, stale tags, rate-limit headroom; no credentials or
    repository names in labels."""
    _, layer = image(fake_upstream)
    m = make_mirror(fake_upstream.url, tag_ttl=0, timeout=1, username="alice", password="s3cret-pw")
    fake_upstream.chunk_delay = 0.002

    async def pull():
        return await (await m.get(f"/v2/library/app/blobs/{layer}")).content()

    await defer.gatherResults([defer.ensureDeferred(pull()) for _ in range(3)])
    await m.settled()
    await pull()
    await (await m.get("/v2/library/app/manifests/latest")).content()
    fake_upstream.faults["library/app:latest"] = "500"
    await (await m.get("/v2/library/app/manifests/latest")).content()
    await (await m.get("/v2/Bad/manifests/x")).content()
    text = m.registry.metrics.exposition().decode()

    def value(line_start):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))

    assert value('mirror_http_requests_total{method="GET",route="blob",status="200"}') == 4
    assert value('mirror_http_requests_total{method="GET",route="manifest",status="400"}') == 1
    assert value('mirror_cache_requests_total{kind="blob",result="hit"}') == 1
    assert value('mirror_cache_requests_total{kind="blob",result="miss"}') == 1
    assert value("mirror_inflight_joins_total") == 2
    assert value('mirror_upstream_fetches_total{kind="blob",outcome="ok",upstream="docker.io"}') == 1
    assert value('mirror_upstream_bytes_total{upstream="docker.io"}') >= len(LAYER)
    assert value('mirror_stale_tags_served_total{upstream="docker.io"}') == 1
    assert value('mirror_http_response_bytes_total{route="blob"}') == 4 * len(LAYER)
    assert 'mirror_upstream_ratelimit_remaining{upstream="docker.io"} 76.0' in text
    assert "s3cret" not in text and "alice" not in text and "library/app" not in text


@pytest_twisted.ensureDeferred
async def test_health_and_readiness(fake_upstream, make_mirror):
    """/healthz answers while alive; /readyz is 200 while the store is writable, 503 if not."""
    m = make_mirror(fake_upstream.url)
    r = await m.get("/healthz")
    assert r.code == 200 and await r.content() == b"ok\n"
    r = await m.get("/readyz")
    assert r.code == 200
    await r.content()
    (m.root / "spool").rename(m.root / "spool.away")  # a store that cannot take writes,
    (m.root / "spool").write_bytes(b"")  # even for root: spool is now a file
    try:
        r = await m.get("/readyz")
        assert r.code == 503 and b"not writable" in await r.content()
    finally:
        (m.root / "spool").unlink()
        (m.root / "spool.away").rename(m.root / "spool")


@pytest_twisted.ensureDeferred
async def test_slow_reader_of_a_cached_blob_gets_every_byte(fake_upstream, make_mirror):
    """A cached blob goes out by sendfile; a client reading slowly fills the socket, so the
    sender must wait for writability and resume: the client still gets every byte, and the
    server stays responsive meanwhile."""
    from twisted.internet.threads import deferToThread

    _, layer = image(fake_upstream)
    m = make_mirror(fake_upstream.url)
    await (await m.get(f"/v2/library/app/blobs/{layer}")).content()
    await m.settled()  # now cached
    port = int(m.url.rsplit(":", 1)[1])

    def slow_read():
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            s.sendall(f"GET /v2/library/app/blobs/{layer} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) < 1_000_000:
                    time.sleep(0.002)
            return data

    reading = deferToThread(slow_read)
    r = await m.get("/v2/")  # the reactor keeps answering while the slow client reads
    assert r.code == 200
    await r.content()
    raw = await reading
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == LAYER


@pytest_twisted.ensureDeferred
async def test_upstream_404_for_a_manifest_is_remembered_for_negative_ttl(fake_upstream, make_mirror):
    """Eight requests for a tag the upstream lacks cost one upstream request; after
    negative_ttl the upstream is asked again, and once it has the tag it is served."""
    m = make_mirror(fake_upstream.url, negative_ttl=0.5)
    for _ in range(8):
        r = await m.get("/v2/library/app/manifests/nosuchtag")
        assert r.code == 404 and await error_of(r) == "MANIFEST_UNKNOWN"
        r = await m.get("/v2/library/app/manifests/nosuchtag", method="HEAD")
        assert r.code == 404
        await r.content()
    assert fake_upstream.count("GET", "/manifests/nosuchtag") == 1
    assert fake_upstream.count("HEAD", "/manifests/nosuchtag") == 0
    image(fake_upstream, tag="nosuchtag")
    r = await m.get("/v2/library/app/manifests/nosuchtag")
    assert r.code == 404  # still remembered: the upstream is not asked within the TTL
    await r.content()
    await sleep(0.6)
    r = await m.get("/v2/library/app/manifests/nosuchtag")
    assert r.code == 200
    await r.content()
    assert fake_upstream.count("GET", "/manifests/nosuchtag") == 2


@pytest_twisted.ensureDeferred
async def test_name_unknown_is_remembered_for_every_tag_of_the_repository(fake_upstream, make_mirror):
    """An upstream that says NAME_UNKNOWN (zot, Harbor) is not asked about that repository
    again within negative_ttl, whatever the tag; another repository is asked as usual."""
    fake_upstream.name_unknown = True
    m = make_mirror(fake_upstream.url)
    for tag in ("latest", "v1", "v2"):
        r = await m.get(f"/v2/nosuch/repo/manifests/{tag}")
        assert r.code == 404 and await error_of(r) == "MANIFEST_UNKNOWN"
    r = await m.get("/v2/other/repo/manifests/latest")
    assert r.code == 404
    await r.content()
    assert fake_upstream.count("GET", "/manifests/") == 2


@pytest_twisted.ensureDeferred
async def test_negative_ttl_zero_remembers_nothing(fake_upstream, make_mirror):
    m = make_mirror(fake_upstream.url, negative_ttl=0)
    for _ in range(3):
        r = await m.get("/v2/library/app/manifests/nosuchtag")
        assert r.code == 404
        await r.content()
    assert fake_upstream.count("GET", "/manifests/nosuchtag") == 3
