"""The web edge: the registry HTTP API as one Twisted resource.

Requests go through :data:`ROUTES` (a regular expression on the raw path per endpoint)
to a thin handler that parses the request, asks the
:class:`~mirror.registry.registry.Registry` for the repository it names, calls it once
and renders the answer.  Client authentication (:mod:`mirror.web.auth`) runs first.  Every error is the spec's JSON body
(:func:`mirror.core.errors.error_body`); anything unexpected is logged and answered 500
``UNKNOWN`` — a client never sees a traceback.  A failure after the headers went out
aborts the connection, so a truncated body never looks complete.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirror.core.errors import RegistryError, error_body
from mirror.core.httpheaders import parse_accept, parse_range
from mirror.core.oci import OCI_INDEX, Digest, parse_digest, parse_reference
from mirror.registry.cluster import AUTH_HEADER
from mirror.registry.registry import Registry
from mirror.registry.repository import BlobBody, Repository, UploadState
from mirror.registry.uploads import upload_location
from mirror.storage.sending import ClientGone, sendfile_transport
from mirror.web.auth import Authenticator, Need, Principal, carries_secret, requirements, valid_host

__all__ = ["ROUTES", "RegistryResource", "paginate"]

API_VERSION = b"registry/2.0"

Handler = Callable[["_Call"], Awaitable[None]]

#: (path pattern, {method: handler name}); names are raw-path matches, checked later.
ROUTES: list[tuple[re.Pattern[str], dict[str, str]]] = [
    (re.compile(r"/v2/?"), {"GET": "base", "HEAD": "base"}),
    (re.compile(r"/auth/token"), {"GET": "token", "POST": "token"}),
    (re.compile(r"/healthz"), {"GET": "healthz"}),
    (re.compile(r"/readyz"), {"GET": "readyz"}),
    (re.compile(r"/v2/_catalog"), {"GET": "catalog"}),
    (re.compile(r"/v2/(?P<name>.+)/tags/list"), {"GET": "tags"}),
    (
        re.compile(r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)"),
        {"GET": "manifest", "HEAD": "manifest", "PUT": "put_manifest", "DELETE": "delete_manifest"},
    ),
    (re.compile(r"/v2/(?P<name>.+)/blobs/uploads/?"), {"POST": "start_upload"}),
    (
        re.compile(r"/v2/(?P<name>.+)/blobs/uploads/(?P<upload>[^/]+)"),
        {"GET": "upload_status", "PATCH": "upload_chunk", "PUT": "upload_finish", "DELETE": "upload_cancel"},
    ),
    (re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)"), {"GET": "blob", "HEAD": "blob", "DELETE": "delete_blob"}),
    (re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)"), {"GET": "referrers"}),
    (re.compile(r"/_cluster/fills/(?P<digest>[^/]+)"), {"GET": "cluster_fill"}),
]


def match_route(method: str, path: str) -> tuple[str, dict[str, str]]:
    """The handler name and path parameters for a request.

    Raises:
        RegistryError: 404 for an unknown path, 405 ``UNSUPPORTED`` for a method the
            endpoint does not take.
    """
    for pattern, methods in ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        handler = methods.get(method)
        if handler is None:
            allowed = ", ".join(methods) or "none"
            raise RegistryError(
                "UNSUPPORTED",
                f"{method} is not supported on this endpoint by this registry (allowed: {allowed})",
                headers={"Allow": ", ".join(methods)} if methods else None,
            )
        return handler, {k: v for k, v in match.groupdict().items() if v is not None}
    raise RegistryError("UNSUPPORTED", f"no registry endpoint at {path[:200]!r}", status=404)


def page_size(n: str | None) -> int | None:
    """The spec's ``n`` (``None``: no limit); ``PAGINATION_NUMBER_INVALID`` when it is no number."""
    if n is None:
        return None
    if not n.isdigit() or len(n) > 9:
        raise RegistryError("PAGINATION_NUMBER_INVALID", f"invalid page size n={n[:20]!r}", status=400)
    return int(n)


def paginate(items: list[str], n: str | None, last: str | None) -> tuple[list[str], str | None]:
    """Apply the spec's ``n``/``last`` pagination to a sorted list.

    Returns the page and, when more remain, the ``last`` value for the next page.
    """
    size = page_size(n)
    start = bisect.bisect_right(items, last) if last else 0
    if size is None:
        return items[start:], None
    page = items[start : start + size]
    more = len(items) - start > size and size > 0
    return page, (page[-1] if more else None)


class _Call:
    """One request in flight: its parsed parts and the response it builds."""

    def __init__(self, request: Request, params: dict[str, str]) -> None:
        self.request = request
        self.params = params
        self.method = request.method.decode("latin-1")
        self.gone = False  # the client disconnected
        self.principal: Principal | None = None  # who is calling, when auth is on
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, _: Failure) -> None:
        self.gone = True

    def arg(self, name: str) -> str | None:
        values = self.request.args.get(name.encode())
        return values[0].decode("utf-8", "replace") if values else None

    def header(self, name: str) -> str | None:
        # By bytes: asked by str, Twisted decodes the value as UTF-8 and raises on other bytes.
        value = self.request.getHeader(name.encode("ascii"))
        return value.decode("latin-1") if value is not None else None

    def set_header(self, name: str, value: str | int) -> None:
        self.request.setHeader(name.encode(), str(value).encode("latin-1"))

    def finish(self, status: int, body: bytes = b"", content_type: str | None = None) -> None:
        if self.gone:
            return
        self.request.setResponseCode(status)
        if content_type is not None:
            self.set_header("Content-Type", content_type)
        self.set_header("Content-Length", len(body))
        if body and self.method != "HEAD":
            self.request.write(body)
        self.request.finish()

    def body(self) -> tuple[BinaryIO, int]:
        """The request body (Twisted has spooled it: a temp file when large) and its length."""
        content = self.request.content
        assert content is not None, "Twisted gives every request a content file"
        content.seek(0, 2)
        length = content.tell()
        content.seek(0)
        return content, length

    def finish_json(self, doc: object, status: int = 200, link: str | None = None) -> None:
        if link is not None:
            self.set_header("Link", f'<{link}>; rel="next"')
        self.finish(status, json.dumps(doc).encode(), "application/json")


class RegistryResource(Resource):
    """The whole ``/v2/`` API, dispatched by :func:`match_route`.

    Args:
        registry: the repositories.
        auth: client authentication, or None for an open registry (replaced on a reload).
        run_blocking: runs a blocking callable (bcrypt) in a thread; returns a Deferred.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, registry: Registry, auth: Authenticator | None, run_blocking: Callable[..., Deferred[Any]]) -> None:
        Resource.__init__(self)
        self._registry = registry
        self.auth = auth
        self._run_blocking = run_blocking

    def render(self, request: Request) -> Any:
        request.setHeader(b"Docker-Distribution-Api-Version", API_VERSION)
        path = (request.path or b"").decode("latin-1")
        method = (request.method or b"").decode("latin-1")
        metrics = self._registry.metrics
        try:
            handler_name, params = match_route(method, path)
        except RegistryError as e:
            metrics.request("unknown", "other", e.status, 0)
            _render_error(request, e)
            return NOT_DONE_YET
        call = _Call(request, params)
        request.notifyFinish().addBoth(lambda _: metrics.request(handler_name, method, request.code, request.sentLength))
        ns = call.arg("ns")
        if ns is not None and self._registry.router.serves(ns):
            # Registry proxying: the ns that scoped the request is echoed back.
            call.set_header("OCI-Namespace", ns)
        handler: Handler = getattr(self, f"_{handler_name}")
        d = Deferred.fromCoroutine(self._authorized(handler, call, requirements(handler_name, params, call.arg)))
        d.addErrback(self._failed, call)
        return NOT_DONE_YET

    async def _authorized(self, handler: Handler, call: _Call, required: Sequence[tuple[str, str]]) -> None:
        auth = self.auth
        if auth is not None and required:
            needs = [self._need(call, name, action) for name, action in required]
            call.principal = await auth.authorize(
                call.header("Authorization"), partial(self._realm, call), needs, self._run_blocking
            )
        await handler(call)

    def _need(self, call: _Call, name: str, action: str) -> Need:
        """What the request needs, on the repository it reaches (the names rules match)."""
        if action == "login":
            return Need(action)
        router = self._registry.router
        return Need(action, name, router.rule_names(router.route(name, call.arg("ns"))))

    @staticmethod
    def _realm(call: _Call) -> str:
        """The token endpoint's URL, on the host the client asked for (when ``auth.realm``
        does not say); a ``Host`` that is not a plain host and port is refused."""
        host = call.header("Host") or "localhost"
        if not valid_host(host):
            raise RegistryError("UNSUPPORTED", "the request's Host header is not a valid host", status=400)
        return f"{'https' if call.request.isSecure() else 'http'}://{host}/auth/token"

    def _repository(self, call: _Call) -> Repository:
        """The repository the request names (``NAME_INVALID``/``NAME_UNKNOWN`` otherwise)."""
        return self._registry.repository(call.params["name"], call.arg("ns"))

    async def _token(self, call: _Call) -> None:
        """The Docker token endpoint: GET (optional Basic) or POST (OAuth2 password grant in
        the form body, or Basic).  Credentials are taken only from the ``Authorization``
        header and the form body, never from the URL (it is logged, and kept by proxies)."""
        auth = self.auth
        if auth is None or not auth.config.token:
            raise RegistryError("UNSUPPORTED", "this registry issues no tokens", status=404)
        raw_query = urlsplit(call.request.uri or b"").query
        if carries_secret(raw_query):
            raise RegistryError(
                "UNSUPPORTED",
                "credentials in the URL are refused: send them in the Authorization header or a form body",
                status=400,
            )
        query = parse_qs(raw_query.decode("latin-1"))
        scopes = [s for v in query.get("scope", []) for s in v.split()]
        realm = partial(self._realm, call)
        creds = auth.basic_credentials(call.header("Authorization"), realm)
        if call.method == "POST":
            form = _form_body(call, auth, realm)
            scopes += [s for v in form.get("scope", []) for s in v.split()]
            if creds is None and form.get("grant_type") == ["password"]:
                user, password = (form.get("username") or [""])[0], (form.get("password") or [""])[0]
                auth.check_shape(user, password, realm)
                creds = user, password
        if creds is not None and not await auth.check_password(*creds, self._run_blocking):
            raise auth.refused("authentication failed", realm)
        router = self._registry.router
        token = auth.issue_token(
            creds[0] if creds else None, scopes, lambda n: [router.rule_names(r) for r in router.candidates(n)]
        )
        call.set_header("Cache-Control", "no-store")
        call.finish_json(token)

    def _failed(self, failure: Failure, call: _Call) -> None:
        request = call.request
        if call.gone or failure.check(ClientGone):
            return
        if request.startedWriting:
            self._log.failure("response failed after its headers were sent; aborting", failure)
            if request.producer is not None:
                request.unregisterProducer()
            _abort(request)
            return
        if isinstance(failure.value, RegistryError):
            _render_error(request, failure.value)
            return
        if isinstance(failure.value, OSError):  # the store's disk or bucket: a client may retry
            self._log.error(
                "store unavailable answering {method} {path}: {error}",
                method=call.method,
                path=request.path,
                error=str(failure.value),
            )
            _render_error(request, RegistryError("UNAVAILABLE", "the store is unavailable; retry shortly"))
            return
        self._log.failure("unexpected error answering {method} {path}", failure, method=call.method, path=request.path)
        _render_error(request, RegistryError("UNKNOWN", "internal error; see the registry's log"))

    # handlers -----------------------------------------------------------------------------
    async def _base(self, call: _Call) -> None:
        call.finish_json({})

    async def _healthz(self, call: _Call) -> None:
        call.finish(200, b"ok\n", "text/plain")

    async def _readyz(self, call: _Call) -> None:
        problem = await self._registry.store.spool.check_writable()
        if problem is not None:
            call.finish(503, f"not ready: {problem}\n".encode(), "text/plain")
        else:
            call.finish(200, b"ready\n", "text/plain")

    async def _catalog(self, call: _Call) -> None:
        size = page_size(call.arg("n"))
        auth = self.auth
        visible: Callable[[str], bool] | None = None
        if auth is not None and call.principal is not None:
            user, router = call.principal.user, self._registry.router

            def pullable(key: str) -> bool:  # the rules' answer for that repository, as a pull gets
                route = router.route_stored(key)
                return "pull" in auth.rule_actions(user, router.rule_names(route) if route is not None else (key,))

            visible = pullable
        page, more = await self._registry.catalog_page(call.arg("last") or None, size, visible)
        link = f"/v2/_catalog?{urlencode({'n': call.arg('n'), 'last': page[-1]})}" if more else None
        call.finish_json({"repositories": page}, link=link)

    async def _tags(self, call: _Call) -> None:
        name = call.params["name"]
        tags = await self._repository(call).tags()
        if tags is None:  # all deleted: Distribution 2.8's answer
            call.finish_json({"name": name, "tags": None})
            return
        page, last = paginate(tags, call.arg("n"), call.arg("last"))
        link = f"/v2/{name}/tags/list?{urlencode({'n': call.arg('n'), 'last': last})}" if last else None
        call.finish_json({"name": name, "tags": page}, link=link)

    async def _manifest(self, call: _Call) -> None:
        repo = self._repository(call)
        ref = parse_reference(call.params["reference"])
        accept = parse_accept(call.request.requestHeaders.getRawHeaders(b"accept"))
        manifest = await repo.get_manifest(ref, accept)
        etag = f'"{manifest.digest}"'
        call.set_header("Docker-Content-Digest", str(manifest.digest))
        call.set_header("ETag", etag)
        if call.header("If-None-Match") == etag:
            call.finish(304)
            return
        call.finish(200, manifest.data, manifest.media_type)

    async def _blob(self, call: _Call) -> None:
        repo = self._repository(call)
        digest = parse_digest(call.params["digest"])
        if call.method == "HEAD":
            size = await repo.blob_size(digest)
            self._blob_headers(call, digest)
            call.set_header("Content-Length", size)
            call.request.setResponseCode(200)
            call.request.finish()
            return
        location = await repo.blob_location(digest)
        if location is not None:  # the store serves it: 307 to its object (the client's Range goes there too)
            self._blob_headers(call, digest)
            call.set_header("Location", location)
            call.finish(307)
            return
        range_header = call.header("Range")
        body = await repo.get_blob(digest, wait_until_stored=range_header is not None)
        try:
            byte_range = parse_range(range_header, body.size) if body.size is not None else None
        except RegistryError:
            body.responder.close()
            raise
        if call.gone:
            body.responder.close()
            return
        self._blob_headers(call, body.digest)
        if byte_range is not None:
            call.request.setResponseCode(206)
            call.set_header("Content-Range", byte_range.content_range())
            call.set_header("Content-Length", byte_range.length)
            await self._send(call, body, byte_range.first, byte_range.last + 1)
        else:
            if body.size is not None:
                call.set_header("Content-Length", body.size)
            await self._send(call, body, 0, None)

    async def _cluster_fill(self, call: _Call) -> None:
        """Another node follows this one's fill of a blob (:mod:`mirror.registry.cluster`):
        only with a request signed by the cluster's secret, since it is served by digest
        alone, outside every repository."""
        cluster = self._registry.cluster
        if not cluster.enabled:
            raise RegistryError("UNSUPPORTED", "this registry is not a cluster node", status=404)
        path = (call.request.path or b"").decode("latin-1")
        if not cluster.verify(call.method, path, call.header(AUTH_HEADER)):
            raise RegistryError("DENIED", "node-to-node requests must be signed with the cluster's secret")
        digest = parse_digest(call.params["digest"])
        body = await self._registry.peer_fill(digest)
        if body is None:
            raise RegistryError("BLOB_UNKNOWN", f"no fill of {digest} here", detail={"digest": str(digest)})
        if call.gone:
            body.responder.close()
            return
        self._blob_headers(call, digest)
        if body.size is not None:
            call.set_header("Content-Length", body.size)
        await self._send(call, body, 0, None)

    async def _delete_blob(self, call: _Call) -> None:
        await self._repository(call).delete_blob(call.params["digest"])
        call.finish(202)

    async def _referrers(self, call: _Call) -> None:
        repo = self._repository(call)
        subject = parse_digest(call.params["digest"])
        artifact_type = call.arg("artifactType")
        descriptors = await repo.referrers(subject, artifact_type)
        if artifact_type is not None:
            descriptors = [d for d in descriptors if d.get("artifactType") == artifact_type]
            call.set_header("OCI-Filters-Applied", "artifactType")
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        call.finish(200, json.dumps(index).encode(), OCI_INDEX)

    # pushes -------------------------------------------------------------------------------
    async def _put_manifest(self, call: _Call) -> None:
        name = call.params["name"]
        repo = self._repository(call)
        content, _ = call.body()
        data = content.read(self._registry.config.max_manifest_size + 1)
        extra_tags = [t.decode("utf-8", "replace") for t in (call.request.args or {}).get(b"tag", [])]
        pushed = await repo.put_manifest(call.params["reference"], call.header("Content-Type"), data, extra_tags)
        if pushed.tags:
            call.request.responseHeaders.setRawHeaders(b"OCI-Tag", [t.encode() for t in pushed.tags])
        call.set_header("Location", f"/v2/{name}/manifests/{pushed.digest}")
        call.set_header("Docker-Content-Digest", str(pushed.digest))
        if pushed.subject is not None:
            call.set_header("OCI-Subject", str(pushed.subject))
        call.finish(201)

    async def _delete_manifest(self, call: _Call) -> None:
        await self._repository(call).delete_manifest(call.params["reference"])
        call.finish(202)

    async def _start_upload(self, call: _Call) -> None:
        name = call.params["name"]
        repo = self._repository(call)
        mount, digest = call.arg("mount"), call.arg("digest")
        source_name = call.arg("from")
        # A mount needs a source the caller may pull (and that holds the blob: the
        # repository checks); otherwise the client gets an upload session (the spec's fallback).
        if mount is not None and source_name is not None:
            try:
                source: Repository | None = self._registry.repository(source_name)
            except RegistryError:
                source = None  # a source that is no repository here: nothing to mount
            if source is not None and self._may_pull(call, source):
                mounted = await repo.mount(mount, source)
                if mounted is not None:
                    self._blob_created(call, name, mounted)
                    return
        if digest is not None:
            content, length = call.body()
            self._blob_created(call, name, await repo.monolithic(digest, content, length))
            return
        self._upload_answer(call, await repo.start_upload(), 202)

    def _may_pull(self, call: _Call, source: Repository) -> bool:
        if self.auth is None or call.principal is None:
            return True
        return self.auth.permitted(call.principal, Need("pull", source.name, self._registry.router.rule_names(source.route)))

    async def _upload_status(self, call: _Call) -> None:
        self._upload_answer(call, await self._repository(call).upload_status(call.params["upload"]), 204)

    async def _upload_chunk(self, call: _Call) -> None:
        repo = self._repository(call)
        content, length = call.body()
        state = await repo.append(call.params["upload"], content, length, call.header("Content-Range"))
        self._upload_answer(call, state, 202)

    async def _upload_finish(self, call: _Call) -> None:
        repo = self._repository(call)
        content, length = call.body()
        digest = await repo.finish(call.params["upload"], call.arg("digest"), content, length, call.header("Content-Range"))
        self._blob_created(call, call.params["name"], digest)

    async def _upload_cancel(self, call: _Call) -> None:
        await self._repository(call).cancel(call.params["upload"])
        call.finish(204)

    def _upload_answer(self, call: _Call, state: UploadState, status: int) -> None:
        call.set_header("Location", upload_location(call.params["name"], state.upload_id))
        call.set_header("Range", f"0-{max(state.size - 1, 0)}")
        call.set_header("Docker-Upload-UUID", state.upload_id)
        call.finish(status)

    def _blob_created(self, call: _Call, name: str, digest: Digest) -> None:
        call.set_header("Location", f"/v2/{name}/blobs/{digest}")
        call.set_header("Docker-Content-Digest", str(digest))
        call.finish(201)

    def _blob_headers(self, call: _Call, digest: Digest) -> None:
        call.set_header("Content-Type", "application/octet-stream")
        call.set_header("Docker-Content-Digest", str(digest))
        call.set_header("ETag", f'"{digest}"')
        call.set_header("Accept-Ranges", "bytes")
        call.set_header("Cache-Control", "max-age=31536000")

    async def _send(self, call: _Call, body: BlobBody, first: int, end: int | None) -> None:
        request = call.request
        socket = sendfile_transport(request.channel.transport) if request.channel is not None else None
        if socket is not None and not request.chunked:
            request.write(b"")  # the headers go first, through Twisted's buffer; then sendfile
        else:
            socket = None
        sending = body.responder.send(request, first, end, socket)
        producer = request.producer  # registered by the responder as it started
        if producer is not None:
            request.notifyFinish().addErrback(lambda _: producer.stopProducing())
        try:
            await sending
        finally:
            request.unregisterProducer()
            request.sentLength += body.responder.sent  # Twisted counts only what passes through write()
        if not call.gone:
            request.finish()


#: Largest token request body read (a form with a user, password and scopes).
_MAX_FORM = 64 * 1024


def _form_body(call: _Call, auth: Authenticator, realm: Callable[[], str]) -> dict[str, list[str]]:
    """The token request's ``application/x-www-form-urlencoded`` body (the URL's query apart).

    Raises:
        RegistryError: 413 for a body over :data:`_MAX_FORM`; ``UNAUTHORIZED`` for one that
            is not UTF-8 (it carries credentials that cannot be right).
    """
    content, length = call.body()
    if length > _MAX_FORM:
        raise RegistryError("UNSUPPORTED", f"token request body over {_MAX_FORM} bytes", status=413)
    try:
        return parse_qs(content.read().decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise auth.refused("malformed credentials in the form body", realm) from None


def _abort(request: Request) -> None:
    """Drop the connection at once, so that a body cut short never looks complete (TCP and
    TLS transports have ``abortConnection``, though ``ITransport`` does not declare it)."""
    transport = request.transport
    if transport is not None:
        getattr(transport, "abortConnection", transport.loseConnection)()


def _render_error(request: Request, error: RegistryError) -> None:
    request.setResponseCode(error.status)
    for key, value in error.headers.items():
        request.setHeader(key.encode(), value.encode("latin-1"))
    body = error_body(error)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
