"""Blob GETs the upstream redirects to another origin.

Docker Hub answers a blob GET with a 307 to its CDN; registries on object storage redirect
to presigned URLs.  Here the fake upstream (127.0.0.1, demanding Bearer tokens) redirects
to a :class:`~tests.fake_upstream.FakeOrigin` on 127.0.0.2, which, like a presigned URL,
refuses requests carrying an ``Authorization`` header.  The blob must be fetched from
there, verified and cached; the upstream's credential must never reach the other origin;
redirect chains are bounded; redirects to anything but http(s) are refused.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.web.server import Site

from mirror.core.oci import DOCKER_MANIFEST, Digest
from mirror.upstream.redirects import MAX_REDIRECTS
from tests.fake_upstream import FakeOrigin
from tests.integration.test_mirror_faults import CONFIG, LAYER, assert_client_fails, image, sleep
from tests.storeutil import Sync


@pytest.fixture
def cdn(fake_upstream):
    """A FakeOrigin serving the fake upstream's blobs on 127.0.0.2 (another origin)."""
    origin = FakeOrigin(fake_upstream)
    port = reactor.listenTCP(0, Site(origin), interface="127.0.0.2")
    origin.url = f"http://127.0.0.2:{port.getHost().port}"
    yield origin
    pytest_twisted.blockon(port.stopListening())


def _digest(layer: str) -> Digest:
    return Digest("sha256", layer.split(":")[1])


def _authorized_at(cdn: FakeOrigin) -> list[str]:
    """Paths of requests that reached the other origin with an Authorization header."""
    return [path for path, headers in cdn.seen if "authorization" in headers]


async def _pull_blob(m, layer: str) -> bytes:
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert r.code == 200, await r.content()
    return await r.content()


async def _assert_cached_and_served_locally(m, fake_upstream, cdn, layer: str) -> None:
    """The blob is in the store, and a later pull touches neither the upstream nor the CDN."""
    await m.settled()
    assert Sync(m.store).blobs.stat(_digest(layer)) == len(LAYER)
    before = (sum(fake_upstream.requests.values()), len(cdn.seen))
    assert await _pull_blob(m, layer) == LAYER
    assert (sum(fake_upstream.requests.values()), len(cdn.seen)) == before


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("form", ["absolute", "scheme-relative"])
@pytest_twisted.ensureDeferred
async def test_redirected_blob_is_fetched_verified_and_cached(status, form, fake_upstream, cdn, make_mirror):
    """A blob GET answered with a redirect to another origin: the blob comes from there, is
    verified and stored; the upstream got the Bearer token, the other origin never did."""
    _, layer = image(fake_upstream)
    fake_upstream.token_required = True
    base = cdn.url if form == "absolute" else cdn.url.removeprefix("http:")
    fake_upstream.blob_redirect = (status, base + "/blobs/{digest}?X-Amz-Signature=abc")
    m = make_mirror(fake_upstream.url)
    assert await _pull_blob(m, layer) == LAYER
    assert cdn.count(f"/blobs/{layer}") == 1
    assert _authorized_at(cdn) == []
    assert fake_upstream.tokens_issued >= 1  # the upstream itself was asked with a token
    await _assert_cached_and_served_locally(m, fake_upstream, cdn, layer)


@pytest_twisted.ensureDeferred
async def test_relative_redirect_within_the_upstream_then_to_another_origin(fake_upstream, cdn, make_mirror):
    """A relative Location is resolved against the upstream (and keeps the token there, the
    same origin); the next hop to another origin drops it."""
    _, layer = image(fake_upstream)
    fake_upstream.token_required = True
    fake_upstream.blob_redirect = (307, "/_storage/{digest}")
    fake_upstream.redirects[f"/_storage/{layer}"] = (302, f"{cdn.url}/blobs/{layer}")
    m = make_mirror(fake_upstream.url)
    assert await _pull_blob(m, layer) == LAYER
    assert fake_upstream.count("GET", f"/_storage/{layer}") == 1  # reached with the token (else 401)
    assert _authorized_at(cdn) == []
    await _assert_cached_and_served_locally(m, fake_upstream, cdn, layer)


@pytest_twisted.ensureDeferred
async def test_relative_redirect_on_the_other_origin(fake_upstream, cdn, make_mirror):
    """A relative Location sent by the other origin is resolved against the other origin,
    not against the upstream the chain started at."""
    _, layer = image(fake_upstream)
    fake_upstream.token_required = True
    fake_upstream.blob_redirect = (307, cdn.url + "/signed/{digest}")
    cdn.redirects[f"/signed/{layer}"] = (302, f"/blobs/{layer}")
    m = make_mirror(fake_upstream.url)
    assert await _pull_blob(m, layer) == LAYER
    assert cdn.count(f"/blobs/{layer}") == 1
    assert _authorized_at(cdn) == []
    await _assert_cached_and_served_locally(m, fake_upstream, cdn, layer)


@pytest_twisted.ensureDeferred
async def test_redirect_chain_is_bounded(fake_upstream, cdn, make_mirror):
    """A redirect loop ends promptly in 503 UNAVAILABLE after a bounded number of hops; nothing
    is stored."""
    _, layer = image(fake_upstream)
    fake_upstream.blob_redirect = (302, cdn.url + "/loop/a")
    cdn.redirects["/loop/a"] = (302, cdn.url + "/loop/b")
    cdn.redirects["/loop/b"] = (302, cdn.url + "/loop/a")
    m = make_mirror(fake_upstream.url)
    started = time.monotonic()
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert r.code == 503
    body = json.loads(await r.content())["errors"][0]
    assert body["code"] == "UNAVAILABLE" and f"more than {MAX_REDIRECTS} redirects" in body["message"]
    assert time.monotonic() - started < 5
    assert cdn.count("/loop/") == MAX_REDIRECTS  # the upstream's redirect, then the loop's
    assert Sync(m.store).blobs.stat(_digest(layer)) is None


@pytest.mark.parametrize(
    "location",
    ["file:///etc/passwd", "ftp://127.0.0.2/blobs/x", "data:,not-a-blob", "gopher://127.0.0.2:70/x"],
)
@pytest_twisted.ensureDeferred
async def test_redirect_to_a_non_http_url_is_refused(location, fake_upstream, cdn, make_mirror):
    """Only http and https are followed: any other scheme is 503 UNAVAILABLE, nothing stored;
    the message names the hop without its query (a presigned URL's signature)."""
    _, layer = image(fake_upstream)
    fake_upstream.blob_redirect = (307, cdn.url + "/signed?X-Amz-Signature=secret")
    cdn.redirects["/signed"] = (302, location)
    m = make_mirror(fake_upstream.url)
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert r.code == 503
    body = json.loads(await r.content())["errors"][0]
    assert body["code"] == "UNAVAILABLE" and "only http and https are followed" in body["message"]
    assert f"from {cdn.url}/signed:" in body["message"] and "secret" not in body["message"]
    assert Sync(m.store).blobs.stat(_digest(layer)) is None


@pytest_twisted.ensureDeferred
async def test_wrong_bytes_from_the_other_origin_are_not_cached(fake_upstream, cdn, make_mirror):
    """The redirected body is verified like any other: wrong bytes fail the client and are
    not stored; once the origin serves the right bytes the blob is fetched and cached."""
    _, layer = image(fake_upstream)
    fake_upstream.blob_redirect = (307, cdn.url + "/blobs/{digest}")
    cdn.corrupt = True
    m = make_mirror(fake_upstream.url)
    await assert_client_fails(m, f"/v2/library/app/blobs/{layer}")
    await sleep(0.2)
    assert Sync(m.store).blobs.stat(_digest(layer)) is None
    assert os.listdir(m.root / "spool") == []
    cdn.corrupt = False
    assert await _pull_blob(m, layer) == LAYER
    await _assert_cached_and_served_locally(m, fake_upstream, cdn, layer)


@pytest_twisted.ensureDeferred
async def test_manifest_then_redirected_blobs_of_an_image(fake_upstream, cdn, make_mirror):
    """A whole pull: the manifest from the upstream, config and layer through the redirect."""
    manifest_digest, layer = image(fake_upstream)
    fake_upstream.token_required = True
    fake_upstream.blob_redirect = (307, cdn.url + "/blobs/{digest}")
    m = make_mirror(fake_upstream.url)
    r = await m.get("/v2/library/app/manifests/latest", headers={"Accept": DOCKER_MANIFEST})
    assert r.code == 200 and r.headers.getRawHeaders("docker-content-digest") == [manifest_digest]
    await r.content()
    config = Digest.of(CONFIG)
    assert await _pull_blob(m, str(config)) == CONFIG
    assert await _pull_blob(m, layer) == LAYER
    assert cdn.count("/blobs/") == 2 and _authorized_at(cdn) == []
