"""A fake upstream registry for faults a real one cannot produce.

It serves manifests and blobs from dicts and counts every request, and can be told to
misbehave per blob: send corrupt bytes, drop the connection half-way, answer 429 or
500, stall, or stream slowly.  Optionally it demands Bearer tokens from its own realm, and
redirects blob GETs elsewhere, as Docker Hub (to its CDN) and registries on object storage
(to presigned URLs) do: :class:`FakeOrigin` is such another origin.
Used by the in-process integration tests (real TCP on 127.0.0.1, real reactor) and, over
treq's in-memory agent with a Clock as ``clock``, by the unit tests (tests/inmemory.py).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry(Resource):
    """A minimal registry: ``/v2/<name>/manifests/<ref>``, ``/v2/<name>/blobs/<digest>``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}  # (name, ref) -> (data, type)
        self.blobs: dict[str, bytes] = {}
        # digest, "name@digest" or "name:ref" -> fault: "429", "500", "stall", "late404",
        # "corrupt", "drop" (a blob body cut off at its middle byte: a Range request from
        # there on gets the rest), "drop_always" (every body cut off half-way through)
        self.faults: dict[str, str] = {}
        self.name_unknown = False  # a manifest of a repository it has none of: NAME_UNKNOWN
        self.once: set[str] = set()  # fault keys whose fault applies to one request, then goes
        self.ranges = True  # answer a blob GET with Range: bytes=N- with 206 (False: 200, whole)
        self.ranges_asked: list[str] = []  # the Range headers of blob GETs
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, path) -> count
        self.token_required = False
        self.tokens_issued = 0
        self.retry_after = "7"
        self.chunk_delay = 0.0  # seconds between 64 KiB chunks of a blob
        self.clock = reactor  # what times chunk_delay (unit tests pass a Clock)
        self.lie_digest = False  # send a wrong Docker-Content-Digest on manifests
        self.stalled = []  # requests held open forever (closed at teardown)
        self.referrers: dict[str, list[dict]] | None = None  # subject -> descriptors; None: no API
        # As a real registry: a blob is served only through a repository holding it (set
        # False for tests that fetch blobs by any name).
        self.strict_repositories = True
        self.held: dict[str, set[str]] = {}  # repository -> digests of the images added to it
        # (status, Location) answering every blob GET; "{digest}" in the Location is replaced
        self.blob_redirect: tuple[int, str] | None = None
        self.redirects: dict[str, tuple[int, str]] = {}  # other paths answered with (status, Location)

    # content --------------------------------------------------------------------------
    def add_blob(self, data: bytes, name: str | None = None) -> str:
        """A blob, held by repository ``name`` (``None``: by every repository)."""
        d = digest_of(data)
        self.blobs[d] = data
        self.held.setdefault(name or "*", set()).add(d)
        return d

    def add_manifest(self, name: str, tag: str, doc: dict, media_type: str) -> str:
        data = json.dumps(doc).encode()
        d = digest_of(data)
        self.manifests[(name, tag)] = (data, media_type)
        self.manifests[(name, d)] = (data, media_type)
        return d

    def add_image(self, name: str, tag: str, layer: bytes, config: bytes) -> tuple[str, str]:
        """A one-layer Docker schema 2 image; returns (manifest digest, layer digest)."""
        layer_digest = self.add_blob(layer, name)
        config_digest = self.add_blob(config, name)
        config_type = "application/vnd.docker.container.image.v1+json"
        layer_type = "application/vnd.docker.image.rootfs.diff.tar.gzip"
        doc = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": config_type, "size": len(config), "digest": config_digest},
            "layers": [{"mediaType": layer_type, "size": len(layer), "digest": layer_digest}],
        }
        return self.add_manifest(name, tag, doc, DOCKER_MANIFEST), layer_digest

    def count(self, method: str, fragment: str) -> int:
        return sum(n for (m, p), n in self.requests.items() if m == method and fragment in p)

    # serving --------------------------------------------------------------------------
    def render(self, request):
        path = request.path.decode()
        method = request.method.decode()
        self.requests[(method, path)] += 1
        if path == "/token":
            self.tokens_issued += 1
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"token": f"tok{self.tokens_issued}", "expires_in": 300}).encode()
        if self.token_required and not (request.getHeader("authorization") or "").startswith("Bearer tok"):
            port = request.getHost().port
            request.setResponseCode(401)
            request.setHeader(
                b"www-authenticate",
                f'Bearer realm="http://127.0.0.1:{port}/token",service="fake",scope="x"'.encode(),
            )
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"auth"}]}'
        if path in self.redirects:  # after the token check: a same-origin hop keeps Authorization
            return _redirect(request, *self.redirects[path])
        parts = path.split("/")
        if path == "/v2/":
            return b"{}"
        if "referrers" in parts:
            if self.referrers is None:
                request.setResponseCode(404)
                return b"404 page not found"
            request.setHeader(b"content-type", b"application/vnd.oci.image.index.v1+json")
            doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": self.referrers.get(parts[-1], [])}
            return json.dumps(doc).encode()
        if "manifests" in parts:
            i = parts.index("manifests")
            return self._manifest(request, "/".join(parts[2:i]), parts[i + 1], method)
        if "blobs" in parts:
            i = parts.index("blobs")
            return self._blob(request, "/".join(parts[2:i]), parts[i + 1], method)
        request.setResponseCode(404)
        return b"{}"

    def _fault(self, request, key: str):
        fault = self.faults.get(key)
        if fault in ("429", "500", "stall", "late404") and key in self.once:
            del self.faults[key]
        if fault == "429":
            request.setResponseCode(429)
            request.setHeader(b"retry-after", self.retry_after.encode())
            return b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'
        if fault == "500":
            request.setResponseCode(500)
            return b"oops"
        if fault == "stall":
            self.stalled.append(request)
            return NOT_DONE_YET
        if fault == "late404":  # not found, after a (clock) second

            def answer() -> None:
                request.setResponseCode(404)
                request.write(b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}')
                request.finish()

            self.clock.callLater(1.0, answer)
            return NOT_DONE_YET
        return None

    def _manifest(self, request, name: str, ref: str, method: str):
        answer = self._fault(request, f"{name}:{ref}")
        if answer is not None:
            return answer
        entry = self.manifests.get((name, ref))
        if entry is None and self.name_unknown and not any(n == name for n, _ in self.manifests):
            request.setResponseCode(404)
            return b'{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}'
        if entry is None:
            request.setResponseCode(404)
            return b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}'
        data, media_type = entry
        request.setHeader(b"content-type", media_type.encode())
        request.setHeader(b"ratelimit-remaining", b"76;w=21600")  # as Docker Hub sends
        digest = digest_of(data) if not self.lie_digest else "sha256:" + "0" * 64
        request.setHeader(b"docker-content-digest", digest.encode())
        request.setHeader(b"content-length", str(len(data)).encode())
        return b"" if method == "HEAD" else data

    def _blob(self, request, name: str, digest: str, method: str):
        answer = self._fault(request, f"{name}@{digest}") or self._fault(request, digest)
        if answer is not None:
            return answer
        data = self.blobs.get(digest)
        held = digest in self.held.get(name, ()) or digest in self.held.get("*", ())
        if data is None or (self.strict_repositories and not held):
            request.setResponseCode(404)
            return b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}'
        fault = self.faults.get(digest)
        if digest in self.once:
            self.faults.pop(digest, None)
        if fault == "corrupt":
            data = data[:-1] + bytes([data[-1] ^ 1])
        if method == "GET" and self.blob_redirect is not None:
            code, location = self.blob_redirect
            return _redirect(request, code, location.replace("{digest}", digest))
        if method == "HEAD":
            request.setHeader(b"content-length", str(len(data)).encode())
            return b""
        size, start = len(data), 0
        asked = (request.getHeader("range") or "").removeprefix("bytes=").removesuffix("-")
        if asked:
            self.ranges_asked.append(asked)
        if asked.isdigit() and self.ranges and int(asked) < size:
            start = int(asked)
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{size - 1}/{size}".encode())
        request.setHeader(b"content-length", str(size - start).encode())
        end = size
        if fault == "drop":
            end = max(start, size // 2) if start < size // 2 else size
        elif fault == "drop_always":
            end = start + max(1, (size - start) // 2)
        chunks = [data[i : min(i + 65536, end)] for i in range(start, end, 65536)]
        gone: list[bool] = []  # the client may hang up once it has the Content-Length it wanted
        request.notifyFinish().addBoth(lambda _: gone.append(True))
        self._stream(request, chunks, drop=end < size, gone=gone)
        return NOT_DONE_YET

    def _stream(self, request, chunks, drop: bool, gone: list[bool]) -> None:
        if gone:
            return
        if not chunks:
            if drop:  # after what was written (an abort would throw away the response headers
                # too), which waits for no producer
                request.transport.unregisterProducer()
                request.transport.loseConnection()
            else:
                request.finish()
            return
        request.write(chunks[0])
        if self.chunk_delay:
            self.clock.callLater(self.chunk_delay, self._stream, request, chunks[1:], drop, gone)
        else:
            self._stream(request, chunks[1:], drop, gone)

    def close_stalled(self) -> None:
        for request in self.stalled:
            if request.channel is not None:
                request.transport.abortConnection()
        self.stalled.clear()


def _redirect(request, code: int, location: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"location", location.encode())
    return b""


class FakeOrigin(Resource):
    """Another origin a registry redirects blob GETs to: a CDN, or an object store's
    presigned URLs.

    ``GET /blobs/<digest>`` (any query) serves ``registry.blobs[digest]``.  Like a presigned
    URL it refuses a request that brings its own ``Authorization`` (400: S3 allows one auth
    mechanism).  ``redirects`` maps other paths to (status, Location), for chains and
    loops; ``corrupt`` flips a bit of every blob it sends.  ``seen`` keeps each request's
    path and headers (lower-cased names).
    """

    isLeaf = True

    def __init__(self, registry: FakeRegistry) -> None:
        super().__init__()
        self.registry = registry
        self.url = ""  # set by whoever listens
        self.redirects: dict[str, tuple[int, str]] = {}
        self.corrupt = False
        self.seen: list[tuple[str, dict[str, list[str]]]] = []

    def count(self, fragment: str) -> int:
        return sum(1 for path, _ in self.seen if fragment in path)

    def render(self, request):
        path = request.path.decode()
        headers = {k.decode().lower(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        self.seen.append((path, headers))
        if "authorization" in headers:
            request.setResponseCode(400)
            return b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>"
        if path in self.redirects:
            return _redirect(request, *self.redirects[path])
        parts = path.split("/")
        data = self.registry.blobs.get(parts[-1]) if len(parts) == 3 and parts[1] == "blobs" else None
        if data is None:
            request.setResponseCode(404)
            return b"<Error><Code>NoSuchKey</Code></Error>"
        if self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        request.setHeader(b"content-length", str(len(data)).encode())
        return data
