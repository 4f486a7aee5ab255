"""The private-registry half in-process: policy (hosted, read-only, delete), uploads that
survive restarts and expire, and bad input on push that must never store anything."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

import attrs
import pytest
import pytest_twisted

from twisted.internet import defer, reactor

from mirror.core.oci import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Digest
from mirror.tap import build_registry
from tests.storeutil import Sync

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def code_of(response):
    return json.loads(await response.content())["errors"][0]["code"]


async def push_blob(m, repo: str, data: bytes) -> str:
    d = sha(data)
    r = await m.get(f"/v2/{repo}/blobs/uploads/?digest={d}", method="POST", data=data)
    assert r.code == 201, await r.content()
    await r.content()
    return d


def image_manifest(config: str, layers: list[str], **extra) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG_TYPE, "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 1} for d in layers],
        **extra,
    }
    return json.dumps(doc, indent=3).encode() + b"\n"  # odd formatting: bytes must be kept as pushed


async def push_image(m, repo: str, tag: str) -> tuple[str, bytes]:
    config = await push_blob(m, repo, b"{}")
    layer = await push_blob(m, repo, os.urandom(1000))
    body = image_manifest(config, [layer])
    r = await m.get(f"/v2/{repo}/manifests/{tag}", method="PUT", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 201, await r.content()
    await r.content()
    return sha(body), body


@pytest.fixture
def registry(make_mirror):
    return make_mirror(None, hosted=("*",))


@pytest_twisted.ensureDeferred
async def test_manifest_bytes_kept_exactly_and_served_by_tag_and_digest(registry):
    """A pushed manifest is stored byte for byte; its digest is of those bytes; 201 has Location."""
    digest, body = await push_image(registry, "team/app", "v1")
    for ref in ("v1", digest):
        r = await registry.get(f"/v2/team/app/manifests/{ref}")
        assert r.code == 200
        assert await r.content() == body
        assert r.headers.getRawHeaders("docker-content-digest") == [digest]
        assert r.headers.getRawHeaders("content-type") == [OCI_MANIFEST]


@pytest_twisted.ensureDeferred
async def test_push_to_mirrored_name_is_denied_naming_the_rule(fake_upstream, make_mirror):
    """With hosted: [myorg/*], a push to another name is DENIED and the message names the rule."""
    m = make_mirror(fake_upstream.url, hosted=("myorg/*",))
    r = await m.get("/v2/library/hello/blobs/uploads/", method="POST")
    assert r.code == 403
    body = json.loads(await r.content())["errors"][0]
    assert body["code"] == "DENIED" and "myorg/*" in body["message"] and "docker.io" in body["message"]
    r = await m.get("/v2/myorg/app/blobs/uploads/", method="POST")
    assert r.code == 202
    await r.content()
    assert fake_upstream.requests == {}  # hosted names never ask the upstream
    r = await m.get("/v2/myorg/app/manifests/latest")
    assert r.code == 404 and await code_of(r) == "MANIFEST_UNKNOWN"
    assert fake_upstream.requests == {}


@pytest_twisted.ensureDeferred
async def test_a_pushed_tag_is_served_at_once_after_a_miss(fake_upstream, make_mirror):
    """A hosted name never consults the upstream's negative cache: a tag asked for before
    it was pushed (404) is served the moment it is pushed, within any negative_ttl."""
    m = make_mirror(fake_upstream.url, hosted=("myorg/*",), negative_ttl=3600)
    for _ in range(2):
        r = await m.get("/v2/myorg/app/manifests/v1")
        assert r.code == 404 and await code_of(r) == "MANIFEST_UNKNOWN"
    digest, _ = await push_image(m, "myorg/app", "v1")
    r = await m.get("/v2/myorg/app/manifests/v1")
    assert r.code == 200 and r.headers.getRawHeaders("docker-content-digest") == [digest]
    await r.content()
    assert fake_upstream.requests == {}


@pytest_twisted.ensureDeferred
async def test_read_only_refuses_writes_but_serves_reads(make_mirror):
    """Read-only: POST, PUT and DELETE get 405 UNSUPPORTED; GET still works."""
    m = make_mirror(None, hosted=("*",))
    digest, _ = await push_image(m, "a/b", "t")
    m.registry.reconfigure(attrs.evolve(m.registry.config, read_only=True))
    for method, path in (
        ("POST", "/v2/a/b/blobs/uploads/"),
        ("PUT", "/v2/a/b/manifests/x"),
        ("DELETE", f"/v2/a/b/manifests/{digest}"),
    ):
        r = await m.get(path, method=method, data=b"{}")
        assert r.code == 405 and await code_of(r) == "UNSUPPORTED", (method, path)
    r = await m.get("/v2/a/b/manifests/t")
    assert r.code == 200
    await r.content()


@pytest_twisted.ensureDeferred
async def test_delete_disabled(make_mirror):
    """delete: false makes every DELETE a 405 UNSUPPORTED, and nothing goes."""
    m = make_mirror(None, hosted=("*",), delete=False)
    digest, _ = await push_image(m, "a/b", "t")
    r = await m.get(f"/v2/a/b/manifests/{digest}", method="DELETE")
    assert r.code == 405 and await code_of(r) == "UNSUPPORTED"
    r = await m.get("/v2/a/b/manifests/t")
    assert r.code == 200
    await r.content()


@pytest_twisted.ensureDeferred
async def test_upload_survives_restart(registry):
    """A chunked upload continues after a restart: the session and its bytes are on disk."""
    data = os.urandom(300_000)
    r = await registry.get("/v2/x/y/blobs/uploads/", method="POST")
    location = r.headers.getRawHeaders("location")[0]
    await r.content()
    r = await registry.get(location, method="PATCH", data=data[:100_000], headers={"Content-Range": "0-99999"})
    assert r.code == 202 and r.headers.getRawHeaders("range") == ["0-99999"]
    await r.content()
    # "restart": a new registry over the same store, with no memory of the session
    fresh = build_registry(registry.registry.config, reactor, registry.pool).repository("x/y")
    upload_id = location.rsplit("/", 1)[1]
    assert (await fresh.upload_status(upload_id)).size == 100_000
    await fresh.append(upload_id, io.BytesIO(data[100_000:]), 200_000, "100000-299999")
    digest = await fresh.finish(upload_id, sha(data), io.BytesIO(b""), 0, None)
    assert str(digest) == sha(data)
    r = await registry.get(f"/v2/x/y/blobs/{sha(data)}")
    assert await r.content() == data


@pytest_twisted.ensureDeferred
async def test_abandoned_uploads_expire(make_mirror):
    """Upload sessions idle past upload_expiry are removed; their URL then answers BLOB_UPLOAD_UNKNOWN."""
    m = make_mirror(None, hosted=("*",))
    r = await m.get("/v2/x/y/blobs/uploads/", method="POST")
    location = r.headers.getRawHeaders("location")[0]
    await r.content()
    m.registry.reconfigure(attrs.evolve(m.registry.config, upload_expiry=0.001))
    time.sleep(0.01)
    assert await m.registry.expire_uploads() == 1
    assert os.listdir(m.root / "uploads") == []
    r = await m.get(location, method="PATCH", data=b"abc")
    assert r.code == 404 and await code_of(r) == "BLOB_UPLOAD_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_out_of_order_chunk_is_416_and_nothing_appended(registry):
    """A Content-Range that does not continue the upload is 416 with the current Range."""
    r = await registry.get("/v2/x/y/blobs/uploads/", method="POST")
    location = r.headers.getRawHeaders("location")[0]
    await r.content()
    r = await registry.get(location, method="PATCH", data=b"abcd", headers={"Content-Range": "0-3"})
    await r.content()
    for bad in ("10-13", "0-3", "4-9", "nonsense"):
        r = await registry.get(location, method="PATCH", data=b"efgh", headers={"Content-Range": bad})
        assert r.code == 416, bad
        assert r.headers.getRawHeaders("range") == ["0-3"]
        await r.content()
    r = await registry.get(location)
    assert r.code == 204 and r.headers.getRawHeaders("range") == ["0-3"]


@pytest_twisted.ensureDeferred
async def test_digest_mismatch_stores_nothing(registry):
    """PUT with a wrong digest is DIGEST_INVALID and neither digest is stored."""
    wrong = sha(b"other")
    r = await registry.get(f"/v2/x/y/blobs/uploads/?digest={wrong}", method="POST", data=b"payload")
    assert r.code == 400 and await code_of(r) == "DIGEST_INVALID"
    for d in (wrong, sha(b"payload")):
        r = await registry.get(f"/v2/x/y/blobs/{d}", method="HEAD")
        assert r.code == 404
        await r.content()
    assert Sync(registry.store).blobs.stat(Digest.of(b"payload")) is None
    assert os.listdir(registry.root / "uploads") == []


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", OCI_MANIFEST, 400, "MANIFEST_INVALID"),
        (b"[]", OCI_MANIFEST, 400, "MANIFEST_INVALID"),
        (b'{"schemaVersion": 2, "mediaType": "%s", "manifests": []}' % DOCKER_MANIFEST.encode(),
         OCI_INDEX, 400, "MANIFEST_INVALID"),
        (b'{"schemaVersion": 1, "name": "x", "fsLayers": []}',
         "application/vnd.docker.distribution.manifest.v1+prettyjws", 400, "MANIFEST_INVALID"),
        (b" " * (4 * 1024 * 1024 + 1), OCI_MANIFEST, 413, "MANIFEST_INVALID"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_manifests_are_refused_and_not_stored(body, content_type, status, code, registry):
    """Invalid JSON, a type mismatch, schema 1, an over-size body: the spec error, nothing stored."""
    r = await registry.get("/v2/x/y/manifests/t", method="PUT", data=body, headers={"Content-Type": content_type})
    assert r.code == status and await code_of(r) == code
    r = await registry.get("/v2/x/y/tags/list")
    assert r.code == 404
    await r.content()


@pytest_twisted.ensureDeferred
async def test_manifest_with_missing_blob_is_manifest_blob_unknown(registry):
    """A manifest naming a blob the repository lacks is MANIFEST_BLOB_UNKNOWN; no tag appears."""
    config = await push_blob(registry, "x/y", b"{}")
    missing = sha(b"never pushed")
    r = await registry.get("/v2/x/y/manifests/t", method="PUT", data=image_manifest(config, [missing]),
                           headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 404
    error = json.loads(await r.content())["errors"][0]
    assert error["code"] == "MANIFEST_BLOB_UNKNOWN" and error["detail"] == {"digest": missing}
    r = await registry.get("/v2/x/y/manifests/t")
    assert r.code == 404
    await r.content()
    # a blob in ANOTHER repository does not count (until mounted)
    other = await push_blob(registry, "other/repo", b"layer")
    r = await registry.get("/v2/x/y/manifests/t", method="PUT", data=image_manifest(config, [other]),
                           headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 404
    await r.content()
    r = await registry.get(f"/v2/x/y/blobs/uploads/?mount={other}&from=other/repo", method="POST")
    assert r.code == 201
    await r.content()
    r = await registry.get("/v2/x/y/manifests/t", method="PUT", data=image_manifest(config, [other]),
                           headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 201
    await r.content()


@pytest_twisted.ensureDeferred
async def test_racing_pushes_to_one_tag(registry):
    """Two pushes racing for one tag: the tag ends on one of them, and both manifests are whole."""
    config = await push_blob(registry, "x/y", b"{}")
    bodies = [image_manifest(config, [], annotations={"n": str(i)}) for i in range(2)]
    results = await defer.gatherResults(
        [registry.get("/v2/x/y/manifests/race", method="PUT", data=b, headers={"Content-Type": OCI_MANIFEST}) for b in bodies]
    )
    assert [r.code for r in results] == [201, 201]
    r = await registry.get("/v2/x/y/manifests/race")
    assert await r.content() in bodies
    for b in bodies:
        r = await registry.get(f"/v2/x/y/manifests/{sha(b)}")
        assert await r.content() == b


@pytest_twisted.ensureDeferred
async def test_deletes_tags_and_listing(registry):
    """DELETE by tag drops only the tag; by digest, the manifest and its tags; the last tag gone
    leaves tags null (as Distribution 2.8) and the repository in _catalog; blob delete is 202."""
    digest, body = await push_image(registry, "x/y", "a")
    r = await registry.get(f"/v2/x/y/manifests/{digest}", method="PUT", data=body, headers={"Content-Type": OCI_MANIFEST})
    await r.content()
    for tag in ("b", "c"):
        r = await registry.get(f"/v2/x/y/manifests/{tag}", method="PUT", data=body, headers={"Content-Type": OCI_MANIFEST})
        await r.content()
    r = await registry.get("/v2/x/y/tags/list?n=2")
    assert json.loads(await r.content()) == {"name": "x/y", "tags": ["a", "b"]}
    assert r.headers.getRawHeaders("link") == ['</v2/x/y/tags/list?n=2&last=b>; rel="next"']
    r = await registry.get("/v2/x/y/manifests/c", method="DELETE")
    assert r.code == 202
    await r.content()
    r = await registry.get(f"/v2/x/y/manifests/{digest}")
    assert r.code == 200  # tag delete leaves the manifest
    await r.content()
    r = await registry.get(f"/v2/x/y/manifests/{digest}", method="DELETE")
    assert r.code == 202
    await r.content()
    for ref in ("a", "b", digest):
        r = await registry.get(f"/v2/x/y/manifests/{ref}")
        assert r.code == 404, ref
        await r.content()
    r = await registry.get("/v2/x/y/tags/list")
    assert json.loads(await r.content()) == {"name": "x/y", "tags": None}
    r = await registry.get("/v2/_catalog")
    assert json.loads(await r.content()) == {"repositories": ["x/y"]}
    layer = json.loads(body)["layers"][0]["digest"]
    r = await registry.get(f"/v2/x/y/blobs/{layer}", method="DELETE")
    assert r.code == 202
    await r.content()
    r = await registry.get(f"/v2/x/y/blobs/{layer}")
    assert r.code == 404 and await code_of(r) == "BLOB_UNKNOWN"
    r = await registry.get(f"/v2/x/y/blobs/{layer}", method="DELETE")
    assert r.code == 404
    await r.content()


@pytest_twisted.ensureDeferred
async def test_referrers(registry):
    """A manifest with a subject gets OCI-Subject on its 201 and is listed by the referrers API,
    filterable by artifactType."""
    subject, _ = await push_image(registry, "x/y", "v1")
    config = await push_blob(registry, "x/y", b"{}")
    sig = image_manifest(config, [], subject={"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
                         artifactType="application/example.sig")
    r = await registry.get(f"/v2/x/y/manifests/{sha(sig)}", method="PUT", data=sig, headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 201 and r.headers.getRawHeaders("oci-subject") == [subject]
    await r.content()
    r = await registry.get(f"/v2/x/y/referrers/{subject}")
    assert r.headers.getRawHeaders("content-type") == [OCI_INDEX]
    index = json.loads(await r.content())
    assert [m["digest"] for m in index["manifests"]] == [sha(sig)]
    assert index["manifests"][0]["artifactType"] == "application/example.sig"
    r = await registry.get(f"/v2/x/y/referrers/{subject}?artifactType=application/other")
    assert r.headers.getRawHeaders("oci-filters-applied") == ["artifactType"]
    assert json.loads(await r.content())["manifests"] == []
    r = await registry.get(f"/v2/x/y/referrers/{sha(b'nothing')}")
    assert r.code == 200 and json.loads(await r.content())["manifests"] == []
    r = await registry.get(f"/v2/x/y/manifests/{sha(sig)}", method="DELETE")
    await r.content()
    r = await registry.get(f"/v2/x/y/referrers/{subject}")
    assert json.loads(await r.content())["manifests"] == []


@pytest_twisted.ensureDeferred
async def test_client_gone_mid_upload_appends_nothing(registry):
    """A PATCH whose client disconnects before sending its whole body changes nothing; the
    session stays usable."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol
    from twisted.internet.task import deferLater

    r = await registry.get("/v2/x/y/blobs/uploads/", method="POST")
    location = r.headers.getRawHeaders("location")[0]
    await r.content()
    proto = Protocol()
    port = int(registry.url.rsplit(":", 1)[1])
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    proto.transport.write(
        f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
        "Content-Type: application/octet-stream\r\n\r\n".encode() + b"x" * 300_000
    )
    await deferLater(reactor, 0.1, lambda: None)
    proto.transport.abortConnection()
    await deferLater(reactor, 0.1, lambda: None)
    r = await registry.get(location)
    assert r.code == 204 and r.headers.getRawHeaders("range") == ["0-0"]
    data = b"whole"
    r = await registry.get(f"{location}?digest={sha(data)}", method="PUT", data=data)
    assert r.code == 201
    await r.content()


@pytest_twisted.ensureDeferred
async def test_foreign_layers_need_not_be_pushed(registry):
    """A non-distributable layer with urls is fetched by clients from its urls, so a manifest
    naming one is accepted without the blob (as Distribution does); an ordinary missing layer
    is still MANIFEST_BLOB_UNKNOWN."""
    config = await push_blob(registry, "x/y", b"{}")
    foreign = sha(b"lives elsewhere")
    doc = json.loads(image_manifest(config, []))
    doc["layers"] = [{
        "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "digest": foreign,
        "size": 15,
        "urls": ["https://example.com/layer"],
    }]
    body = json.dumps(doc).encode()
    r = await registry.get("/v2/x/y/manifests/f", method="PUT", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 201, await r.content()
    await r.content()
    del doc["layers"][0]["urls"]
    r = await registry.get("/v2/x/y/manifests/g", method="PUT", data=json.dumps(doc).encode(),
                           headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 404 and await code_of(r) == "MANIFEST_BLOB_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_push_by_digest_with_tag_parameters(registry):
    """PUT by digest with ?tag=a&tag=b sets both tags and answers one OCI-Tag header per tag."""
    config = await push_blob(registry, "x/y", b"{}")
    body = image_manifest(config, [])
    r = await registry.get(f"/v2/x/y/manifests/{sha(body)}?tag=a&tag=b", method="PUT", data=body,
                           headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 201
    assert r.headers.getRawHeaders("oci-tag") == ["a", "b"]
    await r.content()
    r = await registry.get("/v2/x/y/tags/list")
    assert json.loads(await r.content())["tags"] == ["a", "b"]
    r = await registry.get(f"/v2/x/y/manifests/{sha(body)}?tag=-bad", method="PUT", data=body,
                           headers={"Content-Type": OCI_MANIFEST})
    assert r.code == 400 and await code_of(r) == "TAG_INVALID"
