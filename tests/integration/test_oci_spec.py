"""The private registry against the OCI Distribution Specification, requirement by requirement.

Source: ``spec.md`` of opencontainers/distribution-spec at 967efdc (main, after v1.1.1).
That text is a little stricter than the v1.1.1 release: ``Docker-Content-Digest`` and
``Content-Length`` are MUSTs on successful pulls and HEADs, an out-of-order final chunk in
the closing PUT must be 416, and it adds "Cancel a blob upload" (end-14).

Every requirement the spec puts on a *registry* (MUST / MUST NOT / SHOULD / SHOULD NOT)
has a test here, grouped like the spec: API basics, Pull, Push, Content Discovery,
Content Management, Registry Proxying.  Each docstring names the section and says what is
required.  Requirements on clients are not tested; the few registry requirements that
cannot be observed over HTTP are listed at the end of the file with the reason.

Every test starts its own in-process registry (``make_mirror(None, hosted=("*",))``: no
upstream, every name is a pushable repository, deletes enabled) and uses its own
uuid-based repository names.  All requests go through :func:`call`, which also checks
that any ``Warning`` header is well-formed (API / Warnings).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from urllib.parse import quote, urljoin

import attrs
import pytest
import pytest_twisted

import treq
from twisted.internet import defer

# media types (OCI image-spec and Docker), spelled out here rather than imported from
# mirror/ so that the tests depend on the spec only
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ACCEPT_ALL = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
OCTET = {"Content-Type": "application/octet-stream"}

SBOM = "application/vnd.example.sbom.v1"
SIGNATURE = "application/vnd.example.signature.v1+json"  # a "+" that must survive the query string

MIB = 1024 * 1024

#: API / Error Codes: the table of codes a JSON error body may carry.
SPEC_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)
#: Overview / Legacy Docker support error codes: clients may also meet Docker Registry
#: v2 codes ("such as TAG_INVALID"); we accept exactly Docker's set on top of the table.
LEGACY_DOCKER_CODES = frozenset(
    {"TAG_INVALID", "MANIFEST_UNVERIFIED", "RANGE_INVALID", "PAGINATION_NUMBER_INVALID", "UNKNOWN", "UNAVAILABLE"}
)
ALLOWED_CODES = SPEC_CODES | LEGACY_DOCKER_CODES

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# API / Warnings: 299, agent "-", a quoted text, no date; several may share one header line
_WARNING = r'299 - "(?:[^"\\]|\\.)*"'
WARNING_RE = re.compile(rf"\s*{_WARNING}(?:\s*,\s*{_WARNING})*\s*")
LINK_NEXT_RE = re.compile(r'\s*<([^>]*)>\s*;\s*rel="?next"?\s*')


# helpers ----------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


def new_repo(prefix: str = "oci") -> str:
    """A repository name of our own, unique to the calling test."""
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def dumps(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def with_query(url: str, **params: str) -> str:
    """Add query parameters to a (possibly already parametrised) upload location."""
    query = "&".join(f"{k}={quote(v, safe=':')}" for k, v in params.items())
    return url + ("&" if "?" in url else "?") + query


@attrs.define(repr=False)
class Reply:
    """One response, its body read."""

    url: str
    method: str
    code: int
    headers: object  # twisted.web.http_headers.Headers
    length: object
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return self.headers.getRawHeaders(name) or []

    def json(self) -> object:
        return json.loads(self.body)

    def location(self) -> str:
        """The Location header, resolved against this request's URL (it may be relative)."""
        loc = self.header("location")
        assert loc, f"no Location header: {self!r}"
        return urljoin(self.url, loc)

    def __repr__(self) -> str:
        body = self.body[:300] + (b"..." if len(self.body) > 300 else b"")
        return f"<{self.method} {self.url} -> {self.code} {body!r}>"


def check_warnings(reply: Reply) -> None:
    """API / Warnings: any Warning header has code 299, agent "-", no date; <= 4096 bytes in all."""
    values = reply.all("warning")
    for value in values:
        assert WARNING_RE.fullmatch(value), f"malformed Warning header {value!r}"
    assert sum(len(v.encode()) for v in values) <= 4096


async def call(reg, method: str, target: str, *, headers: dict | None = None, data: bytes | None = None) -> Reply:
    """One request to the registry: ``target`` is a path or an (absolute) Location."""
    url = urljoin(reg.url + "/", target)
    headers = dict(headers or {})
    if url.startswith(reg.url + "/"):
        response = await reg.get(url[len(reg.url) :], method=method, headers=headers, data=data)
    else:  # a Location on another host: the spec allows offloading uploads elsewhere
        response = await treq.request(method, url, persistent=False, headers=headers, data=data)
    body = await response.content()
    reply = Reply(url, method, response.code, response.headers, response.length, body)
    check_warnings(reply)
    return reply


def assert_error(reply: Reply, status: int | tuple[int, ...], codes: str | tuple[str, ...] | None = None) -> list[str]:
    """The status is one of ``status`` and the body is the spec's JSON error document.

    API / Error Codes: ``{"errors": [{"code", "message"?, "detail"?}, ...]}``; each code
    only upper-case letters and underscores, one of the spec's table; a message, when
    present, a string.  Returns the codes.
    """
    statuses = (status,) if isinstance(status, int) else status
    assert reply.code in statuses, reply
    if reply.method == "HEAD":
        assert reply.body == b""
        return []
    doc = reply.json()
    assert isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"], reply
    found = []
    for entry in doc["errors"]:
        assert isinstance(entry, dict), reply
        code = entry.get("code")
        assert isinstance(code, str) and re.fullmatch(r"[A-Z_]+", code), reply
        assert code in ALLOWED_CODES, f"{code} is not a spec error code"
        if "message" in entry:
            assert isinstance(entry["message"], str), reply
        assert set(entry) <= {"code", "message", "detail"}, reply
        found.append(code)
    if codes is not None:
        wanted = (codes,) if isinstance(codes, str) else codes
        assert found[0] in wanted, f"expected {wanted}, got {found}"
    return found


def next_link(reply: Reply) -> str | None:
    """The ``rel="next"`` target of an RFC 5988 Link header, resolved; None when absent."""
    value = reply.header("link")
    if value is None:
        return None
    match = LINK_NEXT_RE.fullmatch(value)
    assert match, f'Link header is not <url>; rel="next": {value!r}'
    return urljoin(reply.url, match.group(1))


# pushing ----------------------------------------------------------------------------------


async def push_blob(reg, repo: str, data: bytes) -> str:
    """POST then PUT; returns the digest."""
    digest = sha256(data)
    r = await call(reg, "POST", f"/v2/{repo}/blobs/uploads/")
    assert r.code == 202, r
    r = await call(reg, "PUT", with_query(r.location(), digest=digest), headers=OCTET, data=data)
    assert r.code == 201, r
    return digest


def descriptor(media_type: str, data: bytes, **extra) -> dict:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def bare_manifest(config: bytes) -> bytes:
    """An OCI image manifest with this config and no layers."""
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config), "layers": []}
    return dumps(doc)


@attrs.frozen
class Pushed:
    """A manifest we pushed."""

    digest: str
    data: bytes
    media_type: str
    reply: Reply

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


async def push_manifest(reg, repo: str, ref: str | None, data: bytes, media_type: str) -> Reply:
    """PUT a manifest by ``ref`` (tag or digest; by its own digest when None)."""
    ref = ref or sha256(data)
    return await call(reg, "PUT", f"/v2/{repo}/manifests/{ref}", headers={"Content-Type": media_type}, data=data)


async def push_image(
    reg,
    repo: str,
    ref: str | None = None,
    *,
    layers: int = 1,
    subject: Pushed | None = None,
    artifact_type: str | None = None,
    annotations: dict | None = None,
    config_media_type: str = OCI_CONFIG,
) -> Pushed:
    """Push random config and layer blobs and an OCI image manifest over them; 201 expected."""
    config = b'{"architecture":"amd64","os":"linux","nonce":"%s"}' % uuid.uuid4().hex.encode()
    await push_blob(reg, repo, config)
    layer_descs = []
    for _ in range(layers):
        layer = os.urandom(1024)
        await push_blob(reg, repo, layer)
        layer_descs.append(descriptor(OCI_LAYER, layer))
    doc: dict = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config_media_type, config),
        "layers": layer_descs,
    }
    return await push_document(reg, repo, ref, doc, OCI_MANIFEST, subject, artifact_type, annotations)


async def push_index(
    reg,
    repo: str,
    children: list[Pushed],
    ref: str | None = None,
    *,
    subject: Pushed | None = None,
    artifact_type: str | None = None,
    annotations: dict | None = None,
) -> Pushed:
    """Push an OCI image index over manifests already pushed; 201 expected."""
    doc: dict = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [c.descriptor() for c in children]}
    return await push_document(reg, repo, ref, doc, OCI_INDEX, subject, artifact_type, annotations)


async def push_document(
    reg, repo: str, ref: str | None, doc: dict, media_type: str,
    subject: Pushed | None, artifact_type: str | None, annotations: dict | None,
) -> Pushed:
    """Push manifest ``doc`` with its optional OCI 1.1 fields; 201 expected."""
    if artifact_type is not None:
        doc["artifactType"] = artifact_type
    if subject is not None:
        doc["subject"] = subject.descriptor()
    if annotations is not None:
        doc["annotations"] = annotations
    data = dumps(doc)
    r = await push_manifest(reg, repo, ref, data, media_type)
    assert r.code == 201, r
    return Pushed(sha256(data), data, media_type, r)


async def patch_chunk(reg, location: str, chunk: bytes, start: int) -> Reply:
    """PATCH one chunk with the spec's headers (Content-Length is set by the client library)."""
    headers = {**OCTET, "Content-Range": f"{start}-{start + len(chunk) - 1}"}
    return await call(reg, "PATCH", location, headers=headers, data=chunk)


async def start_chunked(reg, repo: str) -> tuple[Reply, int]:
    """POST with an empty body (Content-Length: 0); returns the reply and a chunk size that
    respects the registry's OCI-Chunk-Min-Length when it sends one."""
    r = await call(reg, "POST", f"/v2/{repo}/blobs/uploads/")
    assert r.code == 202, r
    minimum = r.header("oci-chunk-min-length")
    if minimum is not None:
        # Push / Pushing a blob in chunks: the header is a size in bytes
        assert re.fullmatch(r"[0-9]+", minimum), minimum
    return r, max(int(minimum or 0), 1024)


async def get_referrers(reg, repo: str, digest: str, artifact_type: str | None = None) -> tuple[Reply, list[dict]]:
    """GET the referrers list, following Link pages; returns the first reply and all descriptors."""
    path = f"/v2/{repo}/referrers/{digest}"
    if artifact_type is not None:
        path += "?artifactType=" + quote(artifact_type, safe="")
    first = r = await call(reg, "GET", path)
    descriptors: list[dict] = []
    for _ in range(100):
        assert r.code == 200, r
        assert (r.header("content-type") or "").split(";")[0].strip() == OCI_INDEX, r.header("content-type")
        doc = r.json()
        assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX, doc
        assert isinstance(doc["manifests"], list), doc
        descriptors += doc["manifests"]
        link = next_link(r)
        if link is None:
            return first, descriptors
        r = await call(reg, "GET", link)
    raise AssertionError("the referrers Link chain does not end")


# fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def registry(make_mirror):
    """A private registry: no upstream, every name hosted and pushable, deletes allowed."""
    try:
        return make_mirror(None, hosted=("*",))
    except TypeError as e:  # the fixture has not grown the private-registry keywords yet
        pytest.skip(f"make_mirror(None, hosted=...) is not available yet ({e})")


@pytest.fixture
def registry_without_delete(make_mirror):
    """A private registry with deletes disabled (config ``delete: false``)."""
    try:
        return make_mirror(None, hosted=("*",), delete=False)
    except TypeError as e:
        pytest.skip(f"make_mirror(None, hosted=..., delete=False) is not available ({e})")


# API --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_base_endpoint_answers_200(registry):
    """API / Determining Support (end-1): a registry implementing the spec answers GET /v2/ with 200 OK."""
    r = await call(registry, "GET", "/v2/")
    assert r.code == 200, r


@pytest_twisted.ensureDeferred
async def test_method_not_allowed_carries_allow_header(registry):
    """API: where the spec is silent, registries SHOULD follow RFC 9110; a 405 (a method the
    endpoint does not take) must list the allowed methods in Allow, with a JSON error body."""
    r = await call(registry, "DELETE", "/v2/")
    assert_error(r, 405, "UNSUPPORTED")
    assert r.header("allow"), r


@pytest.mark.parametrize(
    "method, path, status, code",
    [
        ("GET", "/v2/{repo}/manifests/nosuchtag", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/{repo}/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/{repo}/blobs/uploads/" + str(uuid.UUID(int=1)), 404, "BLOB_UPLOAD_UNKNOWN"),
        ("GET", "/v2/nosuch/repository-{uid}/tags/list", 404, "NAME_UNKNOWN"),
        ("PUT", "/v2/{repo}/manifests/latest", 400, "MANIFEST_INVALID"),
    ],
    ids=["manifest", "blob", "upload", "name", "invalid-manifest"],
)
@pytest_twisted.ensureDeferred
async def test_error_bodies_have_the_spec_format(registry, method, path, status, code):
    """API / Error Codes: a JSON error body is {"errors": [{code, message?, detail?}]}; codes are
    upper case with underscores and come from the spec's table (here the one each case calls for)."""
    repo = new_repo()
    await push_image(registry, repo, "v1")
    target = path.format(repo=repo, uid=uuid.uuid4().hex[:8])
    data = b"this is not a manifest" if method == "PUT" else None
    headers = {"Content-Type": OCI_MANIFEST} if method == "PUT" else None
    r = await call(registry, method, target, headers=headers, data=data)
    assert_error(r, status, code)


@pytest_twisted.ensureDeferred
async def test_warning_headers_if_any_are_well_formed(registry):
    """API / Warnings: a registry may send Warning headers; each MUST be code 299 with agent "-"
    and no date, and all of them together MUST NOT exceed 4096 bytes (checked by call() on every
    response of this file; this test walks one push-and-pull round trip)."""
    repo = new_repo()
    image = await push_image(registry, repo, "v1")
    for path in (f"/v2/{repo}/manifests/v1", f"/v2/{repo}/tags/list", f"/v2/{repo}/referrers/{image.digest}"):
        r = await call(registry, "GET", path, headers={"Accept": ACCEPT_ALL})
        assert r.code == 200, r


# Pull -------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest_twisted.ensureDeferred
async def test_get_manifest(registry, by):
    """Pull / Pulling manifests (end-3): GET of an existing manifest, by tag or by digest, MUST be
    200 with the manifest itself and MUST carry Docker-Content-Digest, the digest of that body;
    Content-Type SHOULD be the pushed type, without parameters."""
    repo = new_repo()
    image = await push_image(registry, repo, "v1")
    ref = "v1" if by == "tag" else image.digest
    r = await call(registry, "GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL})
    assert r.code == 200, r
    assert r.body == image.data
    assert r.header("docker-content-digest") == image.digest == sha256(r.body)
    assert r.header("content-type") == OCI_MANIFEST


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
@pytest_twisted.ensureDeferred
async def test_manifest_content_type_is_the_pushed_type(registry, media_type):
    """Pull / Pulling manifests: the Content-Type of a pulled manifest SHOULD match the type the
    client pushed it with, and the registry SHOULD NOT add parameters to it."""
    repo = new_repo()
    config = b'{"os":"linux"}'
    await push_blob(registry, repo, config)
    if media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
        cfg_type = OCI_CONFIG if media_type == OCI_MANIFEST else DOCKER_CONFIG
        doc = {"schemaVersion": 2, "mediaType": media_type, "config": descriptor(cfg_type, config), "layers": []}
    else:
        child = await push_image(registry, repo)
        child_desc = {**child.descriptor(), "platform": {"architecture": "amd64", "os": "linux"}}
        doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": [child_desc]}
    data = dumps(doc)
    r = await push_manifest(registry, repo, "t", data, media_type)
    assert r.code == 201, r
    for method in ("GET", "HEAD"):
        r = await call(registry, method, f"/v2/{repo}/manifests/t", headers={"Accept": ACCEPT_ALL})
        assert r.code == 200, r
        assert r.header("content-type") == media_type
    assert r.body == b""


@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest_twisted.ensureDeferred
async def test_head_manifest(registry, by):
    """Pull / Checking if content exists: HEAD of an existing manifest MUST be 200 and MUST carry
    Docker-Content-Digest and Content-Length (the manifest's size), without a body."""
    repo = new_repo()
    image = await push_image(registry, repo, "v1")
    ref = "v1" if by == "tag" else image.digest
    r = await call(registry, "HEAD", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL})
    assert r.code == 200, r
    assert r.header("docker-content-digest") == image.digest
    assert r.header("content-length") == str(len(image.data))
    assert r.body == b""


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest_twisted.ensureDeferred
async def test_missing_manifest_is_404(registry, method, by):
    """Pull / Pulling manifests and Checking if content exists: a manifest that is not in the
    repository MUST be 404 (MANIFEST_UNKNOWN), by tag or by digest, for GET and HEAD."""
    repo = new_repo()
    await push_image(registry, repo, "v1")
    ref = "nosuchtag" if by == "tag" else sha256(b"no such manifest")
    r = await call(registry, method, f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL})
    assert_error(r, 404, "MANIFEST_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_manifest_of_another_repository_is_404(registry):
    """Pull / Pulling manifests: "not found in the repository" means 404; a manifest pushed to
    one repository is not served by digest from another."""
    one, other = new_repo(), new_repo()
    image = await push_image(registry, one, "v1")
    await push_image(registry, other, "v1")
    r = await call(registry, "GET", f"/v2/{other}/manifests/{image.digest}", headers={"Accept": ACCEPT_ALL})
    assert_error(r, 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("what", ["manifest-tag", "manifest-digest", "blob", "blob-head"])
@pytest_twisted.ensureDeferred
async def test_nonexistent_repository_is_404(registry, what):
    """Push / Pushing Manifests and Pull: pulling from a repository that does not exist MUST be
    404 (NAME_UNKNOWN, or the MANIFEST_UNKNOWN / BLOB_UNKNOWN of the thing asked for)."""
    repo = new_repo("never-pushed")
    digest = sha256(b"anything")
    path, method, code = {
        "manifest-tag": (f"/v2/{repo}/manifests/latest", "GET", "MANIFEST_UNKNOWN"),
        "manifest-digest": (f"/v2/{repo}/manifests/{digest}", "GET", "MANIFEST_UNKNOWN"),
        "blob": (f"/v2/{repo}/blobs/{digest}", "GET", "BLOB_UNKNOWN"),
        "blob-head": (f"/v2/{repo}/blobs/{digest}", "HEAD", "BLOB_UNKNOWN"),
    }[what]
    r = await call(registry, method, path, headers={"Accept": ACCEPT_ALL})
    assert_error(r, 404, ("NAME_UNKNOWN", code))


@pytest_twisted.ensureDeferred
async def test_get_blob(registry):
    """Pull / Pulling blobs (end-2): GET of an existing blob MUST be 200 with the blob, and MUST
    carry Docker-Content-Digest, which MUST be the digest of the body."""
    repo = new_repo()
    data = os.urandom(5000)
    digest = await push_blob(registry, repo, data)
    r = await call(registry, "GET", f"/v2/{repo}/blobs/{digest}")
    assert r.code == 200, r
    assert r.body == data
    assert r.header("docker-content-digest") == digest


@pytest_twisted.ensureDeferred
async def test_head_blob(registry):
    """Pull / Checking if content exists: HEAD of an existing blob MUST be 200 with
    Docker-Content-Digest and Content-Length (the blob's size), without a body."""
    repo = new_repo()
    data = os.urandom(5000)
    digest = await push_blob(registry, repo, data)
    r = await call(registry, "HEAD", f"/v2/{repo}/blobs/{digest}")
    assert r.code == 200, r
    assert r.header("docker-content-digest") == digest
    assert r.header("content-length") == str(len(data))
    assert r.body == b""


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest_twisted.ensureDeferred
async def test_missing_blob_is_404(registry, method):
    """Pull / Pulling blobs and Checking if content exists: a blob not in the repository MUST be
    404 (BLOB_UNKNOWN)."""
    repo = new_repo()
    await push_image(registry, repo, "v1")
    r = await call(registry, method, f"/v2/{repo}/blobs/{sha256(b'no such blob')}")
    assert_error(r, 404, "BLOB_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_blob_of_another_repository_is_404(registry):
    """Pull / Pulling blobs: "not found in the repository" means 404; a blob pushed to one
    repository is not served from another (mounting it is the way to share it)."""
    one, other = new_repo(), new_repo()
    digest = await push_blob(registry, one, os.urandom(100))
    await push_blob(registry, other, os.urandom(100))
    r = await call(registry, "GET", f"/v2/{other}/blobs/{digest}")
    assert_error(r, 404, "BLOB_UNKNOWN")


BLOB_SIZE = 4096


@pytest.mark.parametrize(
    "range_header, first, last",
    [
        ("bytes=0-9", 0, 9),
        ("bytes=100-1099", 100, 1099),
        ("bytes=4000-", 4000, BLOB_SIZE - 1),
        ("bytes=-96", BLOB_SIZE - 96, BLOB_SIZE - 1),
        ("bytes=3000-9999", 3000, BLOB_SIZE - 1),  # last-pos past the end is clipped
    ],
)
@pytest_twisted.ensureDeferred
async def test_blob_range_request(registry, range_header, first, last):
    """Pull / Pulling blobs: a registry SHOULD support Range per RFC 9110 section 14: 206 with
    Content-Range "bytes first-last/size" and exactly those bytes."""
    repo = new_repo()
    data = os.urandom(BLOB_SIZE)
    digest = await push_blob(registry, repo, data)
    r = await call(registry, "GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": range_header})
    assert r.code == 206, r
    assert r.header("content-range") == f"bytes {first}-{last}/{BLOB_SIZE}"
    assert r.body == data[first : last + 1]


@pytest_twisted.ensureDeferred
async def test_blob_unsatisfiable_range_is_416(registry):
    """Pull / Pulling blobs (RFC 9110 section 15.5.17): a range starting at or past the end of
    the blob cannot be satisfied: 416."""
    repo = new_repo()
    digest = await push_blob(registry, repo, os.urandom(BLOB_SIZE))
    r = await call(registry, "GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes={BLOB_SIZE}-"})
    assert r.code == 416, r


@pytest.mark.parametrize("name", ["a", "a0/b1/c2/d3", "a.b/c_d/e__f/g-h/i---j", "x" * 200])
@pytest_twisted.ensureDeferred
async def test_names_matching_the_grammar_are_usable(registry, name):
    """Pull / Pulling manifests: <name> matches [a-z0-9]+((.|_|__|-+)[a-z0-9]+)*(/...)*; any such
    name (several components, every separator, a long one) works for push and pull."""
    image = await push_image(registry, name, "v1")
    r = await call(registry, "GET", f"/v2/{name}/manifests/v1", headers={"Accept": ACCEPT_ALL})
    assert r.code == 200 and r.body == image.data, r


@pytest.mark.parametrize("name", ["Upper/case", "a..b/c", "_a/b", "a___b/c", "a-/b", "a/.b"])
@pytest_twisted.ensureDeferred
async def test_names_outside_the_grammar_are_refused(registry, name):
    """Pull / Pulling manifests: <name> MUST match the name grammar; a push to a name that does
    not is refused (400 NAME_INVALID, or 404 NAME_UNKNOWN: it is no repository)."""
    r = await call(registry, "POST", f"/v2/{name}/blobs/uploads/")
    assert_error(r, (400, 404), ("NAME_INVALID", "NAME_UNKNOWN"))


@pytest.mark.parametrize("tag", ["a" * 128, "_", "0", "A.b-c_D", "v1.2.3-rc.1"])
@pytest_twisted.ensureDeferred
async def test_tags_matching_the_grammar_are_usable(registry, tag):
    """Pull / Pulling manifests: a tag matches [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127} (so up to 128
    characters); every such tag can be pushed and pulled."""
    repo = new_repo()
    image = await push_image(registry, repo, tag)
    r = await call(registry, "GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT_ALL})
    assert r.code == 200 and r.body == image.data, r


@pytest.mark.parametrize("tag", ["a" * 129, ".a", "-a", "a+b", "a%25b"])
@pytest_twisted.ensureDeferred
async def test_references_outside_the_grammar_are_refused(registry, tag):
    """Pull / Pulling manifests: <tag-or-digest> MUST be a digest or a tag of at most 128
    characters matching the tag grammar, nothing else; a manifest PUT to such a reference is
    400 (TAG_INVALID, a legacy Docker code, or MANIFEST_INVALID) and a GET is a 4xx error."""
    repo = new_repo()
    config = b"{}"
    await push_blob(registry, repo, config)
    data = bare_manifest(config)
    r = await push_manifest(registry, repo, tag, data, OCI_MANIFEST)
    assert_error(r, 400, ("TAG_INVALID", "MANIFEST_INVALID"))
    r = await call(registry, "GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT_ALL})
    assert_error(r, (400, 404))


# Push: blobs ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_monolithic_post_then_put(registry):
    """Push / POST then PUT (end-4a, end-6): POST MUST be 202 with a Location containing a UUID;
    PUT <location>?digest= with the bytes MUST be 201 with a Location that is a pullable blob URL."""
    repo = new_repo()
    data = os.urandom(3000)
    r = await call(registry, "POST", f"/v2/{repo}/blobs/uploads/")
    assert r.code == 202, r
    assert UUID_RE.search(r.header("location")), r.header("location")
    r = await call(registry, "PUT", with_query(r.location(), digest=sha256(data)), headers=OCTET, data=data)
    assert r.code == 201, r
    r = await call(registry, "GET", r.location())
    assert r.code == 200 and r.body == data, r


@pytest_twisted.ensureDeferred
async def test_upload_sessions_are_unique(registry):
    """Push / POST then PUT: the Location carries a unique session ID; two POSTs get two sessions."""
    repo = new_repo()
    first = await call(registry, "POST", f"/v2/{repo}/blobs/uploads/")
    second = await call(registry, "POST", f"/v2/{repo}/blobs/uploads/")
    assert first.code == second.code == 202
    assert first.location() != second.location()


@pytest_twisted.ensureDeferred
async def test_single_post_upload(registry):
    """Push / Single POST (end-4b): POST ?digest= with the bytes MUST be 201 with a pullable
    Location; a registry that does not do single-POST uploads SHOULD answer 202 with a Location
    instead, and the upload then completes with a PUT."""
    repo = new_repo()
    data = os.urandom(3000)
    digest = sha256(data)
    r = await call(registry, "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", headers=OCTET, data=data)
    assert r.code in (201, 202), r
    if r.code == 202:
        r = await call(registry, "PUT", with_query(r.location(), digest=digest), headers=OCTET, data=data)
        assert r.code == 201, r
    r = await call(registry, "GET", r.location())
    assert r.code == 200 and r.body == data, r


BAD_DIGESTS = [
    "sha256:" + "z" * 64,  # not hex
    "sha256:" + "a" * 63,  # wrong length
    "sha256:" + "A" * 64,  # upper-case hex
    "md5:" + "a" * 32,  # an algorithm nobody supports
    "notadigest",
]


@pytest.mark.parametrize("how", ["put", "single-post"])
@pytest.mark.parametrize("bad", BAD_DIGESTS)
@pytest_twisted.ensureDeferred
async def test_invalid_or_unsupported_digest_is_400(registry, how, bad):
    """Push / Pushing blobs: a digest that is invalid or of an unsupported algorithm SHOULD be
    answered 400 Bad Request (DIGEST_INVALID, or UNSUPPORTED for the algorithm)."""
    repo = new_repo()
    data = os.urandom(100)
    if how == "put":
        r = await call(registry, "POST", f"/v2/{repo}/blobs/uploads/")
        assert r.code == 202, r
        r = await call(registry, "PUT", with_query(r.location(), digest=bad), headers=OCTET, data=data)
    else:
        path = f"/v2/{repo}/blobs/uploads/?digest={quote(bad, safe=':')}"
        r = await call(registry, "POST", path, headers=OCTET, data=data)
    assert_error(r, 400, ("DIGEST_INVALID", "UNSUPPORTED"))


@pytest.mark.parametrize("how", ["put", "single-post"])
@pytest_twisted.ensureDeferred
async def test_digest_not_matching_the_bytes_is_refused(registry, how):
    """Push / Pushing a blob monolithically (end-6 / end-4b, failure 400): the <digest> MUST be the
    blob's; bytes that do not hash to it are refused with 400 DIGEST_INVALID and not stored."""
    repo = new_repo()
    data, claimed = os.urandom(100), sha256(b"something else")
    if how == "put":
        r = await call(registry, "POST", f"/v2/{repo}/blobs/uploads/")
        assert r.code == 202, r
        r = await call(registry, "PUT", with_query(r.location(), digest=claimed), headers=OCTET, data=data)
    else:
        r = await call(registry, "POST", f"/v2/{repo}/blobs/uploads/?digest={claimed}", headers=OCTET, data=data)
    assert_error(r, 400, "DIGEST_INVALID")
    r = await call(registry, "HEAD", f"/v2/{repo}/blobs/{claimed}")
    assert r.code == 404, r


@pytest_twisted.ensureDeferred
async def test_sha512_upload(registry):
    """Push / Pushing a blob in chunks (end-4c): a client pushing a non-sha256 blob names the
    algorithm with ?digest-algorithm=; the registry either stores it (201, pullable by that
    digest) or, not supporting the algorithm, SHOULD say 400."""
    repo = new_repo()
    data = os.urandom(2000)
    digest = sha512(data)
    r = await call(registry, "POST", f"/v2/{repo}/blobs/uploads/?digest-algorithm=sha512")
    if r.code == 400:
        assert_error(r, 400)
        return
    assert r.code == 202, r
    r = await call(registry, "PUT", with_query(r.location(), digest=digest), headers=OCTET, data=data)
    if r.code == 400:
        assert_error(r, 400, ("DIGEST_INVALID", "UNSUPPORTED"))
        return
    assert r.code == 201, r
    r = await call(registry, "GET", f"/v2/{repo}/blobs/{digest}")
    assert r.code == 200 and r.body == data, r
    assert r.header("docker-content-digest") in (digest, sha256(data))


@pytest_twisted.ensureDeferred
async def test_chunked_upload(registry):
    """Push / Pushing a blob in chunks (end-4a, end-5, end-13, end-6): POST (Content-Length: 0)
    is 202; each PATCH with Content-Range/Content-Length/application/octet-stream MUST be 202 with
    Location and Range: 0-<end>; GET of the session MUST be 204 with the same two headers; the
    closing PUT ?digest= of the whole blob MUST be 201 with a pullable Location."""
    repo = new_repo()
    r, size = await start_chunked(registry, repo)
    data = os.urandom(3 * size + size // 2)
    location, offset = r.location(), 0
    while offset < len(data):
        chunk = data[offset : offset + size]
        r = await patch_chunk(registry, location, chunk, offset)
        offset += len(chunk)
        assert r.code == 202, r
        assert r.header("range") == f"0-{offset - 1}"
        location = r.location()  # each chunk goes to the location the previous answer gave
        status = await call(registry, "GET", location)
        assert status.code == 204, status
        assert status.header("range") == f"0-{offset - 1}"
        assert status.header("location"), status
        location = status.location()
    r = await call(registry, "PUT", with_query(location, digest=sha256(data)))
    assert r.code == 201, r
    r = await call(registry, "GET", r.location())
    assert r.code == 200 and r.body == data, r


@pytest_twisted.ensureDeferred
async def test_chunked_upload_with_final_chunk_in_put(registry):
    """Push / Pushing a blob in chunks: the final chunk MAY come in the closing PUT, with its
    Content-Range; the PUT MUST then be 201 and the whole blob pullable."""
    repo = new_repo()
    r, size = await start_chunked(registry, repo)
    data = os.urandom(size + 300)
    r = await patch_chunk(registry, r.location(), data[:size], 0)
    assert r.code == 202, r
    headers = {**OCTET, "Content-Range": f"{size}-{len(data) - 1}"}
    r = await call(registry, "PUT", with_query(r.location(), digest=sha256(data)), headers=headers, data=data[size:])
    assert r.code == 201, r
    r = await call(registry, "GET", f"/v2/{repo}/blobs/{sha256(data)}")
    assert r.code == 200 and r.body == data, r


@pytest.mark.parametrize("kind", ["gap", "repeat", "overlap"])
@pytest_twisted.ensureDeferred
async def test_out_of_order_chunk_is_416_and_the_upload_resumes(registry, kind):
    """Push / Pushing a blob in chunks: a chunk that does not start right after the previous one
    MUST be 416; GET of the session then MUST be 204 with the unchanged Range, and the upload can
    resume from there (the "Resumable Push" use case)."""
    repo = new_repo()
    r, size = await start_chunked(registry, repo)
    data = os.urandom(2 * size)
    r = await patch_chunk(registry, r.location(), data[:size], 0)
    assert r.code == 202, r
    location = r.location()
    start = {"gap": size + 10, "repeat": 0, "overlap": size - 10}[kind]
    bad = await patch_chunk(registry, location, data[start : start + 100] or b"x" * 100, start)
    assert bad.code == 416, bad
    status = await call(registry, "GET", location)
    assert status.code == 204, status
    assert status.header("range") == f"0-{size - 1}"
    r = await patch_chunk(registry, status.location(), data[size:], size)
    assert r.code == 202, r
    r = await call(registry, "PUT", with_query(r.location(), digest=sha256(data)))
    assert r.code == 201, r
    r = await call(registry, "GET", f"/v2/{repo}/blobs/{sha256(data)}")
    assert r.code == 200 and r.body == data, r


@pytest_twisted.ensureDeferred
async def test_first_chunk_must_start_at_zero(registry):
    """Push / Pushing a blob in chunks: the first chunk's range MUST begin at 0; one that does
    not is out of order: 416."""
    repo = new_repo()
    r, _ = await start_chunked(registry, repo)
    r = await patch_chunk(registry, r.location(), os.urandom(100), 10)
    assert r.code == 416, r


@pytest_twisted.ensureDeferred
async def test_out_of_order_final_chunk_in_put_is_416(registry):
    """Push / Pushing a blob in chunks (end-6, failure 416): a final chunk in the closing PUT that
    does not follow the uploaded bytes MUST be 416."""
    repo = new_repo()
    r, size = await start_chunked(registry, repo)
    data = os.urandom(size + 300)
    r = await patch_chunk(registry, r.location(), data[:size], 0)
    assert r.code == 202, r
    headers = {**OCTET, "Content-Range": f"{size + 50}-{size + 349}"}
    r = await call(registry, "PUT", with_query(r.location(), digest=sha256(data)), headers=headers, data=data[size:])
    assert r.code == 416, r


@pytest_twisted.ensureDeferred
async def test_closing_put_names_the_whole_blob(registry):
    """Push / Pushing a blob in chunks: the closing PUT MUST carry the digest of the whole blob,
    not of the last chunk; the last chunk's digest does not match: 400 DIGEST_INVALID."""
    repo = new_repo()
    r, size = await start_chunked(registry, repo)
    data = os.urandom(2 * size)
    r = await patch_chunk(registry, r.location(), data[:size], 0)
    assert r.code == 202, r
    r = await patch_chunk(registry, r.location(), data[size:], size)
    assert r.code == 202, r
    r = await call(registry, "PUT", with_query(r.location(), digest=sha256(data[size:])))
    assert_error(r, 400, "DIGEST_INVALID")


@pytest_twisted.ensureDeferred
async def test_upload_status_of_a_fresh_session(registry):
    """Push / Pushing a blob in chunks (end-13): GET of an active session MUST be 204 with
    Location and Range, also before any byte arrived (the spec gives no <end> for an empty
    upload; "0-0", as Distribution sends, or "0--1" are accepted)."""
    repo = new_repo()
    r, _ = await start_chunked(registry, repo)
    status = await call(registry, "GET", r.location())
    assert status.code == 204, status
    assert status.header("location"), status
    assert status.header("range") in ("0-0", "0--1"), status.header("range")


@pytest.mark.parametrize("method", ["GET", "PATCH", "PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_unknown_upload_session_is_404(registry, method):
    """Push (end-5, end-6, end-13, end-14, failure 404): an upload session the registry does not
    know is 404 BLOB_UPLOAD_UNKNOWN."""
    repo = new_repo()
    await push_blob(registry, repo, b"make the repository exist")
    url = f"/v2/{repo}/blobs/uploads/{uuid.uuid4()}"
    data = os.urandom(10)
    if method == "PATCH":
        r = await patch_chunk(registry, url, data, 0)
    elif method == "PUT":
        r = await call(registry, "PUT", with_query(url, digest=sha256(data)), headers=OCTET, data=data)
    else:
        r = await call(registry, method, url)
    assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_cancel_upload(registry):
    """Push / Cancel a blob upload (end-14): DELETE of the session SHOULD be 204; the session is
    gone afterwards (404 BLOB_UPLOAD_UNKNOWN) and its bytes never become a blob."""
    repo = new_repo()
    r, size = await start_chunked(registry, repo)
    chunk = os.urandom(size)
    r = await patch_chunk(registry, r.location(), chunk, 0)
    assert r.code == 202, r
    location = r.location()
    r = await call(registry, "DELETE", location)
    assert r.code == 204, r
    assert_error(await call(registry, "GET", location), 404, "BLOB_UPLOAD_UNKNOWN")
    r = await call(registry, "PUT", with_query(location, digest=sha256(chunk)))
    assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
    assert (await call(registry, "HEAD", f"/v2/{repo}/blobs/{sha256(chunk)}")).code == 404


@pytest_twisted.ensureDeferred
async def test_mount_existing_blob(registry):
    """Push / Mounting a blob from another repository (end-11): POST ?mount=<digest>&from=<repo>
    for a blob in <repo> MUST be 201 with a Location for the blob; it is then pullable from the
    target repository (and Docker-Content-Digest, if sent, is its digest)."""
    source, target = new_repo(), new_repo()
    data = os.urandom(2000)
    digest = await push_blob(registry, source, data)
    r = await call(registry, "POST", f"/v2/{target}/blobs/uploads/?mount={digest}&from={source}")
    assert r.code == 201, r
    assert r.header("docker-content-digest") in (None, digest)
    pulled = await call(registry, "GET", r.location())
    assert pulled.code == 200 and pulled.body == data, pulled
    pulled = await call(registry, "GET", f"/v2/{target}/blobs/{digest}")
    assert pulled.code == 200 and pulled.body == data, pulled


@pytest.mark.parametrize("case", ["nowhere", "from-lacks-it", "from-does-not-exist"])
@pytest_twisted.ensureDeferred
async def test_mount_of_a_blob_that_cannot_be_mounted_starts_an_upload(registry, case):
    """Push / Mounting a blob: when the blob cannot be mounted, the registry SHOULD answer 202,
    an upload session the client MAY then use to push the blob."""
    source, target = new_repo(), new_repo()
    data = os.urandom(2000)
    digest = sha256(data)
    if case == "from-lacks-it":
        await push_blob(registry, source, os.urandom(10))
    elif case == "from-does-not-exist":
        source = new_repo("never-pushed")
    r = await call(registry, "POST", f"/v2/{target}/blobs/uploads/?mount={digest}&from={source}")
    assert r.code == 202, r
    r = await call(registry, "PUT", with_query(r.location(), digest=digest), headers=OCTET, data=data)
    assert r.code == 201, r
    assert (await call(registry, "GET", f"/v2/{target}/blobs/{digest}")).body == data


@pytest_twisted.ensureDeferred
async def test_mount_without_from(registry):
    """Push / Mounting a blob: the registry MAY treat `from` as optional and mount a blob it finds
    (201), or start an upload session (202); either way the client ends up with the blob."""
    source, target = new_repo(), new_repo()
    data = os.urandom(2000)
    digest = await push_blob(registry, source, data)
    r = await call(registry, "POST", f"/v2/{target}/blobs/uploads/?mount={digest}")
    assert r.code in (201, 202), r
    if r.code == 202:
        r = await call(registry, "PUT", with_query(r.location(), digest=digest), headers=OCTET, data=data)
        assert r.code == 201, r
    pulled = await call(registry, "GET", f"/v2/{target}/blobs/{digest}")
    assert pulled.code == 200 and pulled.body == data, pulled


@pytest_twisted.ensureDeferred
async def test_same_blob_uploaded_twice_at_once(registry):
    """Use Cases / Layer Upload De-duplication: two uploads of the same blob at the same time
    both proceed and both succeed; the blob is stored once and pullable."""
    repo = new_repo()
    data = os.urandom(200_000)
    sessions = [await call(registry, "POST", f"/v2/{repo}/blobs/uploads/") for _ in range(2)]
    puts = [
        defer.Deferred.fromCoroutine(
            call(registry, "PUT", with_query(s.location(), digest=sha256(data)), headers=OCTET, data=data)
        )
        for s in sessions
    ]
    replies = await defer.gatherResults(puts)
    assert [r.code for r in replies] == [201, 201], replies
    r = await call(registry, "GET", f"/v2/{repo}/blobs/{sha256(data)}")
    assert r.code == 200 and r.body == data, r


# Push: manifests --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_push_manifest_by_tag(registry):
    """Push / Pushing Manifests (end-7a): PUT by tag MUST be 201 with a Location that is a
    pullable manifest URL; Docker-Content-Digest is the digest of the pushed bytes."""
    repo = new_repo()
    image = await push_image(registry, repo, "v1")
    r = image.reply
    assert r.header("docker-content-digest") == image.digest
    pulled = await call(registry, "GET", r.location(), headers={"Accept": ACCEPT_ALL})
    assert pulled.code == 200 and pulled.body == image.data, pulled


@pytest_twisted.ensureDeferred
async def test_push_manifest_by_digest(registry):
    """Push / Pushing Manifests (end-7a): PUT by digest MUST be 201 with a pullable Location, and
    Docker-Content-Digest MUST equal the digest the client gave."""
    repo = new_repo()
    image = await push_image(registry, repo)  # by its digest
    assert image.reply.header("docker-content-digest") == image.digest
    pulled = await call(registry, "GET", image.reply.location(), headers={"Accept": ACCEPT_ALL})
    assert pulled.code == 200 and pulled.body == image.data, pulled


@pytest_twisted.ensureDeferred
async def test_manifest_is_stored_byte_for_byte(registry):
    """Push / Pushing Manifests: the registry MUST store the manifest in the exact bytes the
    client sent (odd indentation, key order, trailing newline and all)."""
    repo = new_repo()
    config = b"{}"
    await push_blob(registry, repo, config)
    doc = {"layers": [], "config": descriptor(OCI_CONFIG, config), "mediaType": OCI_MANIFEST, "schemaVersion": 2}
    data = json.dumps(doc, indent=3).encode() + b"\n\n"
    r = await push_manifest(registry, repo, "odd", data, OCI_MANIFEST)
    assert r.code == 201, r
    for ref in ("odd", sha256(data)):
        pulled = await call(registry, "GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL})
        assert pulled.code == 200 and pulled.body == data, pulled
        assert pulled.header("docker-content-digest") == sha256(data)


@pytest_twisted.ensureDeferred
async def test_manifest_pushed_under_a_wrong_digest_is_refused(registry):
    """Push / Pushing Manifests: the registry's digest MUST equal the client's; a PUT by a digest
    the bytes do not hash to is refused, 400 DIGEST_INVALID, and nothing is stored under it."""
    repo = new_repo()
    config = b"{}"
    await push_blob(registry, repo, config)
    data = bare_manifest(config)
    wrong = sha256(data + b" ")
    r = await push_manifest(registry, repo, wrong, data, OCI_MANIFEST)
    assert_error(r, 400, "DIGEST_INVALID")
    assert (await call(registry, "HEAD", f"/v2/{repo}/manifests/{wrong}")).code == 404


@pytest_twisted.ensureDeferred
async def test_manifest_without_layers_is_accepted(registry):
    """Push / Pushing Manifests: the list of blobs a manifest references MAY be empty."""
    repo = new_repo()
    image = await push_image(registry, repo, "empty", layers=0)
    r = await call(registry, "GET", f"/v2/{repo}/manifests/empty", headers={"Accept": ACCEPT_ALL})
    assert r.code == 200 and r.body == image.data, r


@pytest_twisted.ensureDeferred
async def test_content_type_parameters_are_ignored(registry):
    """Push / Pushing Manifests: the registry SHOULD ignore parameters on the Content-Type of a
    manifest PUT; Pull / Pulling manifests: it SHOULD NOT send parameters back."""
    repo = new_repo()
    config = b"{}"
    await push_blob(registry, repo, config)
    data = bare_manifest(config)
    headers = {"Content-Type": OCI_MANIFEST + "; charset=utf-8"}
    r = await call(registry, "PUT", f"/v2/{repo}/manifests/p", headers=headers, data=data)
    assert r.code == 201, r
    r = await call(registry, "GET", f"/v2/{repo}/manifests/p", headers={"Accept": ACCEPT_ALL})
    assert r.code == 200, r
    assert r.header("content-type") == OCI_MANIFEST


@pytest.mark.parametrize("missing", ["config", "layer", "index-child"])
@pytest_twisted.ensureDeferred
async def test_manifest_referencing_unknown_content_is_manifest_blob_unknown(registry, missing):
    """Push: a registry MAY refuse a manifest whose descriptors (other than subject) name a blob
    or manifest it does not have, and when it does the errors MUST be MANIFEST_BLOB_UNKNOWN.
    This registry checks references, so the push is refused and nothing is stored."""
    repo = new_repo()
    config, layer = b'{"os":"linux"}', os.urandom(100)
    if missing != "config":
        await push_blob(registry, repo, config)
    if missing != "layer":
        await push_blob(registry, repo, layer)
    if missing == "index-child":
        absent = {"mediaType": OCI_MANIFEST, "digest": sha256(b"no such manifest"), "size": 16}
        data, media_type = dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [absent]}), OCI_INDEX
    else:
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, layer)],
        }
        data, media_type = dumps(doc), OCI_MANIFEST
    r = await push_manifest(registry, repo, "v1", data, media_type)
    assert r.code in range(400, 500), r
    codes = assert_error(r, r.code, "MANIFEST_BLOB_UNKNOWN")
    assert set(codes) == {"MANIFEST_BLOB_UNKNOWN"}
    assert (await call(registry, "HEAD", f"/v2/{repo}/manifests/v1")).code == 404


def padded_manifest(config: bytes, size: int) -> bytes:
    """A valid OCI image manifest of exactly ``size`` bytes (padded with an annotation)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [],
        "annotations": {"pad": ""},
    }
    doc["annotations"]["pad"] = "x" * (size - len(dumps(doc)))
    data = dumps(doc)
    assert len(data) == size
    return data


@pytest_twisted.ensureDeferred
async def test_manifest_of_4_mib_is_accepted(registry):
    """Push / Pushing Manifests: registries SHOULD accept manifest pushes of at least 4 megabytes;
    a 4 MiB manifest is stored and pulled back intact."""
    repo = new_repo()
    config = b"{}"
    await push_blob(registry, repo, config)
    data = padded_manifest(config, 4 * MIB)
    r = await push_manifest(registry, repo, "big", data, OCI_MANIFEST)
    assert r.code == 201, r
    r = await call(registry, "GET", f"/v2/{repo}/manifests/big", headers={"Accept": ACCEPT_ALL})
    assert r.code == 200 and r.body == data, r


@pytest_twisted.ensureDeferred
async def test_manifest_over_the_limit_is_413(registry):
    """Push / Pushing Manifests: a registry SHOULD enforce a manifest size limit and SHOULD answer
    a push over it with 413 Payload Too Large.  This registry's documented default limit
    (max_manifest_size) is 4 MiB, so one byte more is over it."""
    repo = new_repo()
    config = b"{}"
    await push_blob(registry, repo, config)
    data = padded_manifest(config, 4 * MIB + 1)
    r = await push_manifest(registry, repo, "huge", data, OCI_MANIFEST)
    assert r.code == 413, r
    if r.header("content-type") == "application/json":
        assert_error(r, 413)


@pytest_twisted.ensureDeferred
async def test_manifest_with_subject_gets_oci_subject_header(registry):
    """Push / Pushing Manifests with Subject: a registry supporting the referrers API MUST answer
    the push of an image manifest with a subject with OCI-Subject: <subject digest>."""
    repo = new_repo()
    subject = await push_image(registry, repo, "v1")
    artifact = await push_image(registry, repo, subject=subject, artifact_type=SBOM)
    assert artifact.reply.header("oci-subject") == subject.digest


@pytest_twisted.ensureDeferred
async def test_manifest_with_subject_that_does_not_exist_is_accepted(registry):
    """Push: a registry MUST accept an otherwise valid manifest whose subject names a manifest not
    (yet) in the repository, so referrers and subject can be pushed in either order; the referrer
    is listed, before and after the subject arrives."""
    repo = new_repo()
    config = b'{"later":true}'
    await push_blob(registry, repo, config)
    later = bare_manifest(config)
    subject = Pushed(sha256(later), later, OCI_MANIFEST, None)
    artifact = await push_image(registry, repo, subject=subject, artifact_type=SBOM)
    assert artifact.reply.header("oci-subject") == subject.digest
    _, listed = await get_referrers(registry, repo, subject.digest)
    assert [d["digest"] for d in listed] == [artifact.digest]
    r = await push_manifest(registry, repo, "later", later, OCI_MANIFEST)
    assert r.code == 201, r
    _, listed = await get_referrers(registry, repo, subject.digest)
    assert [d["digest"] for d in listed] == [artifact.digest]


@pytest_twisted.ensureDeferred
async def test_push_by_digest_with_tag_parameters(registry):
    """Push / Pushing Manifests (end-7b): a registry MAY take ?tag= parameters on a push by digest;
    if it does it SHOULD take at least 10 and MUST list each accepted tag in OCI-Tag headers
    (RFC 9110 list syntax); every tag it lists resolves to the pushed digest."""
    repo = new_repo()
    config = b"{}"
    await push_blob(registry, repo, config)
    data = bare_manifest(config)
    digest = sha256(data)
    tags = [f"t{i}" for i in range(10)]
    query = "&".join(f"tag={t}" for t in tags)
    path = f"/v2/{repo}/manifests/{digest}?{query}"
    r = await call(registry, "PUT", path, headers={"Content-Type": OCI_MANIFEST}, data=data)
    assert r.code == 201, r
    accepted = [t.strip() for value in r.all("oci-tag") for t in value.split(",") if t.strip()]
    if accepted:  # the feature is optional; when offered, all 10 SHOULD be taken
        assert sorted(accepted) == sorted(tags)
    for tag in accepted:
        got = await call(registry, "HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT_ALL})
        assert got.code == 200 and got.header("docker-content-digest") == digest, got


# Content Discovery: tags ------------------------------------------------------------------

TAGS = ["b", "A", "a", "C", "1.0", "_x", "latest", "Z9"]


def tag_order_ok(tags: list[str]) -> bool:
    """Lexical (case-insensitive) or "ASCIIbetical" (Go's sort.Strings) order."""
    return tags == sorted(tags) or tags == sorted(tags, key=lambda t: (t.lower(), t))


async def tagged_repo(reg, tags=TAGS) -> str:
    repo = new_repo()
    image = await push_image(reg, repo, tags[0])
    for tag in tags[1:]:
        r = await push_manifest(reg, repo, tag, image.data, OCI_MANIFEST)
        assert r.code == 201, r
    return repo


@pytest_twisted.ensureDeferred
async def test_tags_list(registry):
    """Content Discovery / Listing Tags (end-8a): 200 with {"name", "tags"}, every tag once, in
    lexical or ASCIIbetical order."""
    repo = await tagged_repo(registry)
    r = await call(registry, "GET", f"/v2/{repo}/tags/list")
    assert r.code == 200, r
    doc = r.json()
    assert doc["name"] == repo
    assert sorted(doc["tags"]) == sorted(TAGS)
    assert tag_order_ok(doc["tags"]), doc["tags"]


@pytest_twisted.ensureDeferred
async def test_tags_list_of_a_repository_without_tags(registry):
    """Content Discovery / Listing Tags: for a repository that exists but has no tags the list MAY
    be empty; the answer is still 200 in the same format."""
    repo = new_repo()
    await push_image(registry, repo)  # by digest only
    r = await call(registry, "GET", f"/v2/{repo}/tags/list")
    assert r.code == 200, r
    assert r.json() == {"name": repo, "tags": []}


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest_twisted.ensureDeferred
async def test_tags_list_pagination_with_n_and_link(registry, n):
    """Content Discovery / Listing Tags (end-8b): with ?n= a page MUST hold n tags unless fewer
    remain or a Link header is given; a Link MUST be RFC 5988 with rel="next"; following the
    Links walks the whole list in order, each tag once."""
    repo = await tagged_repo(registry)
    full = (await call(registry, "GET", f"/v2/{repo}/tags/list")).json()["tags"]
    seen: list[str] = []
    url: str | None = f"/v2/{repo}/tags/list?n={n}"
    for _ in range(2 * len(TAGS)):
        if url is None or len(seen) >= len(TAGS):
            break
        r = await call(registry, "GET", url)
        assert r.code == 200, r
        page = r.json()["tags"]
        link = next_link(r)
        assert len(page) <= n, page
        if len(page) < n:
            assert link is not None or len(seen) + len(page) == len(TAGS), (page, link)
        seen += page
        if link is not None:
            url = link
        elif len(seen) < len(TAGS):  # no Link: the client goes on with ?last=
            url = f"/v2/{repo}/tags/list?n={n}&last={seen[-1]}"
        else:
            url = None
    assert seen == full


@pytest_twisted.ensureDeferred
async def test_tags_list_n_larger_than_the_list(registry):
    """Content Discovery / Listing Tags: fewer than n tags are fine when fewer exist; all of them
    come back, in order."""
    repo = await tagged_repo(registry)
    r = await call(registry, "GET", f"/v2/{repo}/tags/list?n=100")
    assert r.code == 200, r
    assert sorted(r.json()["tags"]) == sorted(TAGS) and tag_order_ok(r.json()["tags"])


@pytest_twisted.ensureDeferred
async def test_tags_list_n_zero(registry):
    """Content Discovery / Listing Tags: n=0 MUST give an empty list and MUST NOT give a Link."""
    repo = await tagged_repo(registry)
    r = await call(registry, "GET", f"/v2/{repo}/tags/list?n=0")
    assert r.code == 200, r
    assert r.json()["tags"] == []
    assert r.header("link") is None


@pytest.mark.parametrize("with_n", [True, False])
@pytest_twisted.ensureDeferred
async def test_tags_list_last(registry, with_n):
    """Content Discovery / Listing Tags (end-8b): ?last=<tag> gives the tags after it (not itself),
    in order; n is optional with last."""
    repo = await tagged_repo(registry)
    full = (await call(registry, "GET", f"/v2/{repo}/tags/list")).json()["tags"]
    last = full[2]
    query = f"n=3&last={last}" if with_n else f"last={last}"
    r = await call(registry, "GET", f"/v2/{repo}/tags/list?{query}")
    assert r.code == 200, r
    page = r.json()["tags"]
    expected = full[3:6] if with_n else full[3:]
    assert page == expected[: len(page)]
    assert len(page) == len(expected) or next_link(r) is not None, (page, expected)


@pytest_twisted.ensureDeferred
async def test_tags_list_of_nonexistent_repository_is_404(registry):
    """Content Discovery / Listing Tags (end-8a, failure 404): a repository that is not found is
    404 NAME_UNKNOWN."""
    r = await call(registry, "GET", f"/v2/{new_repo('never-pushed')}/tags/list")
    assert_error(r, 404, "NAME_UNKNOWN")


# Content Discovery: referrers -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_referrers_list(registry):
    """Content Discovery / Listing Referrers (end-12a): 200, Content-Type the OCI index type, an
    image index of exactly the manifests and indexes in this repository whose subject is the
    digest; each descriptor has mediaType/size/digest, the manifest's artifactType (else, for an
    image manifest, its config mediaType; for an index, none) and the manifest's annotations."""
    repo = new_repo()
    subject = await push_image(registry, repo, "v1")
    other = await push_image(registry, repo, "v2")
    annotations = {"org.example.sbom.format": "json"}
    sbom = await push_image(
        registry, repo, subject=subject, artifact_type=SBOM, config_media_type=OCI_EMPTY, annotations=annotations
    )
    sig = await push_image(registry, repo, subject=subject, config_media_type=SIGNATURE)  # no artifactType
    index = await push_index(registry, repo, [other], subject=subject, annotations={"org.example.kind": "bundle"})
    await push_image(registry, repo, subject=other, artifact_type=SBOM)  # refers to something else
    r, listed = await get_referrers(registry, repo, subject.digest)
    assert r.code == 200
    # an empty annotations map is the same as none
    by_digest = {d["digest"]: {k: v for k, v in d.items() if v != {}} for d in listed}
    assert len(listed) == len(by_digest) == 3, listed
    assert by_digest[sbom.digest] == {
        "mediaType": OCI_MANIFEST,
        "digest": sbom.digest,
        "size": len(sbom.data),
        "artifactType": SBOM,
        "annotations": {"org.example.sbom.format": "json"},
    }
    assert by_digest[sig.digest] == {**sig.descriptor(), "artifactType": SIGNATURE}
    entry = by_digest[index.digest]
    assert "artifactType" not in entry, entry
    assert entry == {**index.descriptor(), "annotations": {"org.example.kind": "bundle"}}


@pytest.mark.parametrize("case", ["subject-without-referrers", "unknown-subject", "unknown-repository"])
@pytest_twisted.ensureDeferred
async def test_referrers_empty(registry, case):
    """Content Discovery / Listing Referrers: with no matching referrers an empty manifests list
    MUST come back, with 200; a registry supporting the API MUST NOT answer a referrers request
    with 404 (clients would fall back to the tag schema), even for a subject or repository it
    does not know."""
    repo = new_repo()
    digest = sha256(b"unknown subject")
    if case == "subject-without-referrers":
        digest = (await push_image(registry, repo, "v1")).digest
    elif case == "unknown-subject":
        await push_image(registry, repo, "v1")
    r, listed = await get_referrers(registry, repo, digest)
    assert r.code == 200 and listed == [], r


@pytest_twisted.ensureDeferred
async def test_referrers_are_per_repository(registry):
    """Content Discovery / Listing Referrers: the descriptors are of manifests in the same <name>
    namespace; a referrer pushed to another repository is not listed."""
    repo, elsewhere = new_repo(), new_repo()
    subject = await push_image(registry, repo, "v1")
    await push_image(registry, elsewhere, subject=subject, artifact_type=SBOM)
    _, listed = await get_referrers(registry, repo, subject.digest)
    assert listed == []


@pytest_twisted.ensureDeferred
async def test_referrers_artifact_type_filter(registry):
    """Content Discovery / Listing Referrers (end-12b): a registry SHOULD filter on ?artifactType=;
    when it applied the filter it MUST say so with OCI-Filters-Applied: artifactType, and only
    referrers of that type are listed (an unmatched type gives an empty list)."""
    repo = new_repo()
    subject = await push_image(registry, repo, "v1")
    sbom = await push_image(registry, repo, subject=subject, artifact_type=SBOM)
    sig = await push_image(registry, repo, subject=subject, artifact_type=SIGNATURE)
    for wanted, expected in ((SBOM, [sbom]), (SIGNATURE, [sig]), ("application/vnd.example.none", [])):
        r, listed = await get_referrers(registry, repo, subject.digest, artifact_type=wanted)
        assert r.header("oci-filters-applied") == "artifactType", r
        assert [d["digest"] for d in listed] == [p.digest for p in expected]
        assert all(d["artifactType"] == wanted for d in listed)


@pytest.mark.parametrize("bad", ["sha256:" + "z" * 64, "sha256:abc", "notadigest", "md5:" + "a" * 32])
@pytest_twisted.ensureDeferred
async def test_referrers_with_invalid_digest_is_400(registry, bad):
    """Content Discovery / Listing Referrers: an invalid request, such as a digest with invalid
    syntax, MUST be 400 Bad Request."""
    repo = new_repo()
    await push_image(registry, repo, "v1")
    r = await call(registry, "GET", f"/v2/{repo}/referrers/{bad}")
    assert_error(r, 400)


# Content Management -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_manifest_by_digest(registry):
    """Content Management / Deleting Manifests (end-9): DELETE by digest MUST be 202; afterwards
    GET by the digest and by any tag that pointed to it is 404."""
    repo = new_repo()
    image = await push_image(registry, repo, "v1")
    r = await push_manifest(registry, repo, "v1-alias", image.data, OCI_MANIFEST)
    assert r.code == 201, r
    r = await call(registry, "DELETE", f"/v2/{repo}/manifests/{image.digest}")
    assert r.code == 202, r
    for ref in (image.digest, "v1", "v1-alias"):
        for method in ("GET", "HEAD"):
            r = await call(registry, method, f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL})
            assert_error(r, 404, "MANIFEST_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_delete_tag(registry):
    """Content Management / Deleting tags (end-9): DELETE by tag MUST be 202; afterwards GET of the
    tag is 404 and the tag is gone from the tag list."""
    repo = new_repo()
    await push_image(registry, repo, "v1")
    await push_image(registry, repo, "v2")
    r = await call(registry, "DELETE", f"/v2/{repo}/manifests/v1")
    assert r.code == 202, r
    r = await call(registry, "GET", f"/v2/{repo}/manifests/v1", headers={"Accept": ACCEPT_ALL})
    assert_error(r, 404, "MANIFEST_UNKNOWN")
    assert (await call(registry, "GET", f"/v2/{repo}/tags/list")).json()["tags"] == ["v2"]


@pytest.mark.parametrize("case", ["unknown-digest", "unknown-tag", "unknown-repository"])
@pytest_twisted.ensureDeferred
async def test_delete_unknown_manifest_is_404(registry, case):
    """Content Management / Deleting Manifests (end-9, failure 404): deleting a manifest or tag
    that is not there, or in a repository that does not exist, MUST be 404."""
    repo = new_repo()
    ref = sha256(b"no such manifest") if case != "unknown-tag" else "nosuchtag"
    if case == "unknown-repository":
        repo = new_repo("never-pushed")
    else:
        await push_image(registry, repo, "v1")
    r = await call(registry, "DELETE", f"/v2/{repo}/manifests/{ref}")
    assert_error(r, 404, ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"))


@pytest_twisted.ensureDeferred
async def test_delete_blob(registry):
    """Content Management / Deleting Blobs (end-10): DELETE of a blob MUST be 202; afterwards GET
    and HEAD of it are 404 BLOB_UNKNOWN, and a second DELETE is 404."""
    repo = new_repo()
    digest = await push_blob(registry, repo, os.urandom(1000))
    r = await call(registry, "DELETE", f"/v2/{repo}/blobs/{digest}")
    assert r.code == 202, r
    for method in ("GET", "HEAD"):
        assert_error(await call(registry, method, f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert_error(await call(registry, "DELETE", f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_delete_unknown_blob_is_404(registry):
    """Content Management / Deleting Blobs: if the blob is not found, 404 MUST be returned."""
    repo = new_repo()
    await push_blob(registry, repo, b"make the repository exist")
    r = await call(registry, "DELETE", f"/v2/{repo}/blobs/{sha256(b'no such blob')}")
    assert_error(r, 404, "BLOB_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_deleted_referrer_leaves_the_referrers_list(registry):
    """Content Discovery / Listing Referrers with Content Management: the list holds manifests in
    the repository; once a referrer is deleted by digest it is no longer listed."""
    repo = new_repo()
    subject = await push_image(registry, repo, "v1")
    keep = await push_image(registry, repo, subject=subject, artifact_type=SBOM)
    gone = await push_image(registry, repo, subject=subject, artifact_type=SIGNATURE)
    r = await call(registry, "DELETE", f"/v2/{repo}/manifests/{gone.digest}")
    assert r.code == 202, r
    _, listed = await get_referrers(registry, repo, subject.digest)
    assert [d["digest"] for d in listed] == [keep.digest]


@pytest.mark.parametrize("what", ["tag", "manifest", "blob"])
@pytest_twisted.ensureDeferred
async def test_disabled_deletes_are_400_or_405(registry_without_delete, what):
    """Content Management / Deleting tags, Deleting Manifests, Deleting Blobs: when deletion is
    disabled the registry MUST answer 400 or 405 (here 405 UNSUPPORTED), and nothing is deleted."""
    reg = registry_without_delete
    repo = new_repo()
    image = await push_image(reg, repo, "v1")
    config_digest = json.loads(image.data)["config"]["digest"]
    path = {
        "tag": f"/v2/{repo}/manifests/v1",
        "manifest": f"/v2/{repo}/manifests/{image.digest}",
        "blob": f"/v2/{repo}/blobs/{config_digest}",
    }[what]
    r = await call(reg, "DELETE", path)
    assert_error(r, (400, 405), "UNSUPPORTED")
    r = await call(reg, "HEAD", path, headers={"Accept": ACCEPT_ALL})
    assert r.code == 200, r


# Registry Proxying --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pull_through_scoped_by_ns_returns_oci_namespace(fake_upstream, make_mirror):
    """Registry Proxying: a registry that uses the ns query parameter to scope a request SHOULD
    echo its value in an OCI-Namespace response header (the pull-through half: ns picks the
    upstream)."""
    config = b'{"os":"linux"}'
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": fake_upstream.add_blob(config), "size": len(config)},
        "layers": [],
    }
    fake_upstream.add_manifest("library/app", "latest", doc, OCI_MANIFEST)
    m = make_mirror(fake_upstream.url)
    r = await call(m, "GET", "/v2/library/app/manifests/latest?ns=docker.io", headers={"Accept": ACCEPT_ALL})
    assert r.code == 200, r
    assert r.header("oci-namespace") == "docker.io"


# Registry requirements this file cannot observe over HTTP ---------------------------------
#
# * Requirements: "MUST implement all APIs in a claimed category" is the sum of the tests
#   above (Pull, Push, Content Discovery, Content Management), not a test of its own.
# * Push / Pushing a blob in chunks: "the server SHOULD eventually time out unfinished
#   uploads" needs a clock the test cannot advance through HTTP (a unit test of the upload
#   store's expiry is the place).
# * Push / Single POST: "Content-Length MUST match the blob's length" is a client rule; a
#   client library cannot send a body that disagrees with its own Content-Length framing.
# * Push / Pushing a blob in chunks: OCI-Chunk-Min-Length is sent only "if the registry has
#   a minimum chunk size"; start_chunked() checks its form and honours it when present.
# * Content Discovery / Listing Referrers: "a Link header MUST be included when the list
#   cannot be returned in a single manifest" depends on a page size the spec leaves to the
#   registry; get_referrers() follows Link pages whenever the registry sends them.
# * Upgrade Procedures / Enabling the Referrers API: "MUST include preexisting manifests
#   listed in a referrers-tag-schema index" concerns content stored before the API was
#   enabled; this registry has the API from its first push, so every subject manifest is
#   "newly pushed" and covered by test_referrers_list.
# * API / Error Codes: "a 429 SHOULD carry Retry-After" needs a rate limiter; a private
#   registry with no upstream never answers 429 (the pull-through 429 is covered by
#   tests/test_mirror_faults.py).
# * API: redirects are a MAY for registries; the other rules there bind clients.
