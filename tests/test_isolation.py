"""A digest is not a key: a repository serves only what it holds (without sockets or real time).

The real Registry and web resource over the in-memory store and a fake upstream that,
like a real registry, serves a blob only through a repository holding it
(tests/fake_upstream.py).  A private hosted layer, a mirrored blob fetched for another
repository and a manifest asked for as a blob are each unknown through a name that does
not hold them — the same answer as for a digest stored nowhere — while everything a
repository does hold keeps being served, with the upstream down too.
"""

from __future__ import annotations

import json
import os

import pytest

from mirror.config import GcConfig, MirrorConfig, StorageConfig
from mirror.core.oci import DOCKER_MANIFEST, Digest
from mirror.registry.gc import collect
from tests.fake_upstream import FakeRegistry, digest_of
from tests.inmemory import InMemoryMirror
from tests.storeutil import Sync, run_now
from tests.test_registry import LAYER, image, make, push


@pytest.fixture
def fake():
    return FakeRegistry()


def answer(a) -> tuple[int, str | None, str]:
    """Status, error code and message (digests blanked), to compare answers for two digests."""
    body = json.loads(a.body) if a.body else {"errors": [{}]}
    error = body["errors"][0]
    message = error.get("message", "")
    for word in message.split():
        if word.startswith("sha256:") or "@sha256:" in word:
            message = message.replace(word, "<digest>")
    return a.code, error.get("code"), message


def headers(a) -> dict[bytes, list[bytes]]:
    """An answer's headers, without the date and length (the message names the digest)."""
    return {k: v for k, v in a.headers.getAllRawHeaders() if k.lower() not in (b"date", b"content-length")}


def private_layer(m: InMemoryMirror) -> str:
    """The layer of a pushed team/secret image (hosted, readable by its pushers only)."""
    push(m, "team/secret", "1")
    record = Sync(m.registry.store).metadata.scan_repository("team/secret")
    manifest = next(iter(record.manifests))
    layers = json.loads(Sync(m.registry.store).blobs.read(manifest, 1 << 20))["layers"]
    return layers[0]["digest"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_private_layer_is_not_readable_through_a_mirrored_name(fake, method):
    """GET and HEAD through a mirrored name the upstream does not know: the answer for the
    private layer is the answer for a digest stored nowhere."""
    m = make(fake, hosted=("team/*",))
    layer = private_layer(m)
    nowhere = digest_of(os.urandom(64))
    for name in ("library/doesnotexist", "docker.io/library/doesnotexist"):
        private = m.request(method, f"/v2/{name}/blobs/{layer}")
        absent = m.request(method, f"/v2/{name}/blobs/{nowhere}")
        assert private.code == 404 and absent.code == 404
        assert private.body != Sync(m.registry.store).blobs.read(Digest(*layer.split(":")), 1 << 20)
        if method == "GET":
            assert answer(private) == answer(absent)
            assert answer(private)[1] == "BLOB_UNKNOWN"
        assert headers(private) == headers(absent)
    # the pushers' repository still serves it
    assert m.get(f"/v2/team/secret/blobs/{layer}").code == 200


def test_a_private_manifest_is_not_readable_as_a_blob(fake):
    m = make(fake, hosted=("team/*",))
    digest = push(m, "team/secret", "1")
    a = m.get(f"/v2/library/doesnotexist/blobs/{digest}")
    assert a.code == 404 and a.error_code == "BLOB_UNKNOWN"
    a = m.get(f"/v2/team/other/blobs/{digest}")
    assert a.code == 404 and a.error_code == "BLOB_UNKNOWN"


def test_a_mirrored_blob_is_served_through_another_name_only_if_its_upstream_has_it(fake):
    """Fetched for library/app; library/empty (the upstream has no such blob) gets 404;
    library/twin (the upstream has it) gets the local copy after one HEAD, no second GET,
    and keeps getting it without asking again."""
    _, layer = image(fake)
    image(fake, name="library/twin")  # the same layer, in another upstream repository
    m = make(fake)
    assert m.get(f"/v2/library/app/blobs/{layer}").body == LAYER
    a = m.get(f"/v2/library/empty/blobs/{layer}")
    assert a.code == 404 and a.error_code == "BLOB_UNKNOWN"
    assert fake.count("GET", f"/blobs/{layer}") == 1
    for _ in range(2):
        assert m.get(f"/v2/library/twin/blobs/{layer}").body == LAYER
    assert fake.count("GET", f"/blobs/{layer}") == 1
    assert fake.count("HEAD", f"/v2/library/twin/blobs/{layer}") == 1
    a = m.request("HEAD", f"/v2/library/empty/blobs/{layer}")
    assert a.code == 404


def two_at_once(m: InMemoryMirror, first: str, second: str):
    """GET ``first``, then ``second`` while the (slow: a chunk per clock second) upstream
    answers the first; both responses once the clock has run the whole layer through."""
    d1 = m._client.get(f"http://mirror.test{first}")
    m.pump()
    d2 = m._client.get(f"http://mirror.test{second}")
    for _ in range(len(LAYER) // 65536 + 2):
        m.clock.advance(1)
        m.pump()
    return m.wait(d1), m.wait(d2)


def test_a_fill_for_one_repository_is_not_joined_through_a_name_that_does_not_hold_it(fake):
    """While library/app's fill streams, a request through library/empty is asked of the
    upstream for its own repository (404) instead of following the fill."""
    _, layer = image(fake)
    m = make(fake)
    fake.clock, fake.chunk_delay = m.clock, 1.0
    first, other = two_at_once(m, f"/v2/library/app/blobs/{layer}", f"/v2/library/empty/blobs/{layer}")
    assert m.wait(first.content()) == LAYER
    assert other.code == 404
    m.wait(other.content())
    assert fake.count("GET", f"/blobs/{layer}") == 1


def test_with_the_upstream_down_a_repository_serves_what_its_manifests_name_and_nothing_else(fake):
    """A store whose mirrored repositories have no blob links (as an earlier release wrote
    it, or an import): blobs the repository's manifests name are served offline (and linked
    on first use); a blob only another repository holds is refused as if absent."""
    m = make(fake, hosted=("team/*",))
    _, layer = image(fake)
    assert m.get("/v2/library/app/manifests/latest").code == 200
    assert m.get(f"/v2/library/app/blobs/{layer}").code == 200
    secret = private_layer(m)
    store = Sync(m.registry.store)
    key, digest = "docker.io/library/app", Digest(*layer.split(":"))
    assert store.metadata.unlink_blob(key, digest)  # as an earlier release left it
    nowhere = digest_of(b"stored nowhere")
    fake.faults.update({layer: "500", secret: "500", nowhere: "500"})  # the upstream is down
    fake.strict_repositories = False  # even an upstream that would serve anything is not asked
    assert m.get(f"/v2/library/app/blobs/{layer}").body == LAYER
    assert store.metadata.has_blob_link(key, digest, fetched=True)
    a, absent = m.get(f"/v2/library/app/blobs/{secret}"), m.get(f"/v2/library/app/blobs/{nowhere}")
    assert a.code == absent.code == 503 and a.error_code == absent.error_code == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("source", "mounted"),
    [
        (None, False),  # no from: an upload session, never a mount of whatever is stored
        ("library/hello", False),  # mirrored, the upstream has no such blob
        ("team/secret", True),  # holds it
        ("team/nothing", False),
    ],
)
def test_a_mount_needs_a_source_that_holds_the_blob(fake, source, mounted):
    image(fake, name="library/hello")
    m = make(fake, hosted=("team/*",))
    layer = private_layer(m)
    query = f"mount={layer}" + (f"&from={source}" if source else "")
    a = m.request("POST", f"/v2/team/b/blobs/uploads/?{query}")
    assert a.code == (201 if mounted else 202)
    assert m.get(f"/v2/team/b/blobs/{layer}").code == (200 if mounted else 404)


def test_a_mount_from_a_mirrored_repository_that_holds_the_blob(fake):
    _, layer = image(fake)
    m = make(fake, hosted=("team/*",))
    assert m.get(f"/v2/library/app/blobs/{layer}").code == 200
    a = m.request("POST", f"/v2/team/b/blobs/uploads/?mount={layer}&from=library/app")
    assert a.code == 201 and m.get(f"/v2/team/b/blobs/{layer}").body == LAYER


def test_fetched_links_leave_mirrored_content_evictable_and_go_with_their_blobs(fake):
    """A mirrored repository's links (fetched blobs) do not make it hosted: age eviction
    drops its content, and the links of deleted blobs are removed."""
    _, layer = image(fake)
    m = make(fake)
    assert m.get("/v2/library/app/manifests/latest").code == 200
    assert m.get(f"/v2/library/app/blobs/{layer}").code == 200
    store = Sync(m.registry.store)
    key, digest = "docker.io/library/app", Digest(*layer.split(":"))
    assert store.metadata.scan_repository(key).fetched_links == {digest}
    assert store.metadata.scan_repository(key).blob_links == set()
    run_now(m.registry.access.flush())
    m.clock.advance(8 * 24 * 3600)
    config = MirrorConfig(
        listen=(), storage=StorageConfig(root="unused"), upstreams=m.registry.config.upstreams,
        gc=GcConfig(grace=0, max_age=3600),
    )
    report = run_now(collect(m.registry.store, config, now=m.clock.seconds))
    assert digest in report.plan.delete_blobs
    assert store.blobs.stat(digest) is None
    assert not store.metadata.has_blob_link(key, digest, fetched=True)


def test_a_failed_fill_for_one_repository_does_not_fail_another_that_joined_it(fake):
    """library/empty's request starts a fill and the upstream refuses it (404, no such blob
    there); library/app's request, which joined meanwhile, gets its own fetch, not that
    refusal (which names another repository)."""
    _, layer = image(fake)
    m = make(fake)
    fake.clock, fake.chunk_delay = m.clock, 1.0
    fake.faults[f"library/empty@{layer}"] = "late404"
    refused, served = two_at_once(m, f"/v2/library/empty/blobs/{layer}", f"/v2/library/app/blobs/{layer}")
    assert refused.code == 404
    m.wait(refused.content())
    assert served.code == 200 and m.wait(served.content()) == LAYER
    assert b"library/empty" not in m.get(f"/v2/library/app/blobs/{layer}").body


def foreign_manifest(fake: FakeRegistry, name: str, digest: str) -> str:
    """A manifest in the upstream whose one layer is a foreign layer (``urls``) naming
    ``digest``: registries take such layers without checking the repository holds them."""
    config = fake.add_blob(b'{"os":"windows"}', name)
    return fake.add_manifest(name, "latest", {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 16, "digest": config},
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "size": 2000, "digest": digest, "urls": ["https://example.invalid/layer"],
        }],
    }, DOCKER_MANIFEST)


@pytest.mark.parametrize("upstream_down", [False, True])
def test_a_foreign_layer_in_a_mirrored_manifest_does_not_open_a_private_blob(fake, upstream_down):
    """Anyone who can push to the upstream can name our private layer as a foreign layer;
    the mirror serves the manifest, but the layer stays unknown through that name, with the
    upstream up (its HEAD says 404) and down (foreign layers do not count)."""
    m = make(fake, hosted=("team/*",))
    layer = private_layer(m)
    foreign_manifest(fake, "attacker/evil", layer)
    assert m.get("/v2/attacker/evil/manifests/latest").code == 200
    if upstream_down:
        fake.faults[layer] = "500"
    a = m.get(f"/v2/attacker/evil/blobs/{layer}")
    assert a.code == (503 if upstream_down else 404) and a.error_code == ("UNAVAILABLE" if upstream_down else "BLOB_UNKNOWN")


def test_a_mount_asks_the_upstream_alike_whether_or_not_the_digest_is_stored(fake):
    """The answer and the upstream requests (hence the time) are the same for a stored
    private layer and a digest stored nowhere: a mount is no oracle."""
    image(fake, name="library/hello")
    m = make(fake, hosted=("team/*",))
    layer, nowhere = private_layer(m), digest_of(os.urandom(64))
    before = sum(fake.requests.values())
    a = m.request("POST", f"/v2/team/b/blobs/uploads/?mount={layer}&from=library/hello")
    b = m.request("POST", f"/v2/team/b/blobs/uploads/?mount={nowhere}&from=library/hello")
    assert a.code == b.code == 202
    assert fake.count("HEAD", f"/v2/library/hello/blobs/{layer}") == fake.count("HEAD", f"/v2/library/hello/blobs/{nowhere}") == 1
    assert sum(fake.requests.values()) - before == 2


def test_a_store_that_takes_no_writes_still_serves_what_it_holds(fake, monkeypatch):
    """Links are written on reads (a fill, a confirmation): when the store refuses writes
    (full, read-only), the read is served all the same and the upstream asked again."""
    _, layer = image(fake)
    image(fake, name="library/twin")
    m = make(fake)
    assert m.get(f"/v2/library/app/blobs/{layer}").body == LAYER

    async def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(m.registry.store.metadata, "link_blob", refuse)
    for _ in range(2):
        assert m.get(f"/v2/library/twin/blobs/{layer}").body == LAYER
    assert fake.count("HEAD", f"/v2/library/twin/blobs/{layer}") == 2


def test_the_fetched_link_of_a_blob_no_manifest_names_goes_with_it(fake):
    """A blob fetched by itself (no manifest of the repository names it) is garbage once past
    the grace period; its fetched link goes too, while the repository's image stays."""
    _, layer = image(fake)
    loose = fake.add_blob(b"fetched on its own", "library/app")
    m = make(fake)
    assert m.get("/v2/library/app/manifests/latest").code == 200
    assert m.get(f"/v2/library/app/blobs/{layer}").code == 200
    assert m.get(f"/v2/library/app/blobs/{loose}").code == 200
    store = Sync(m.registry.store)
    key, digest = "docker.io/library/app", Digest(*loose.split(":"))
    run_now(m.registry.access.flush())
    m.clock.advance(3600)
    config = MirrorConfig(
        listen=(), storage=StorageConfig(root="unused"), upstreams=m.registry.config.upstreams, gc=GcConfig(grace=60)
    )
    report = run_now(collect(m.registry.store, config, now=m.clock.seconds))
    assert report.plan.delete_blobs == [digest]
    assert not store.metadata.has_blob_link(key, digest, fetched=True)
    assert store.metadata.has_blob_link(key, Digest(*layer.split(":")), fetched=True)
