"""The mirror's core: answer registry reads from the store, filling misses from upstreams.

:class:`MirrorService` is what the web layer calls.  It is protocol-free: it takes
checked-or-raw names and references, returns values (:class:`Manifest`,
:class:`BlobBody`) and raises :class:`~mirror.errors.RegistryError`.

* **Manifests by digest** are immutable: served from the store, fetched once if absent.
* **Tags** are trusted for the upstream's ``tag_ttl``; then one ``HEAD`` revalidates
  them.  An upstream that is down, slow or answering 5xx/429 gets the cached digest
  served (and a warning logged).
* **Blobs** are served from the store; a miss starts one :class:`BlobFill` per digest,
  and every request for that digest follows its spool file until it commits.
* Concurrent misses for one key share one upstream request (:class:`SingleFlight`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import BinaryIO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mirror.access import AccessRecord
from mirror.config import MirrorConfig, UpstreamConfig
from mirror.errors import RegistryError
from mirror.httpheaders import accepts
from mirror.metrics import Metrics
from mirror.oci import (
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    parse_digest,
    parse_manifest,
    parse_reference,
    validate_name,
)
from mirror.routing import Route, route
from mirror.singleflight import SingleFlight
from mirror.store import DigestMismatch, Store
from mirror.streaming import BlobFill, CachedSource, Source
from mirror.upstream import Upstream, UpstreamRefused, UpstreamUnavailable

__all__ = ["BlobBody", "Manifest", "MirrorService"]


@attrs.frozen
class Manifest:
    """A manifest ready to serve."""

    data: bytes
    media_type: str
    digest: Digest


@attrs.frozen
class BlobBody:
    """A blob ready to stream: an open file, and the source saying how much is readable."""

    file: BinaryIO
    source: Source
    size: int | None  # None while a fill of unknown length is under way
    digest: Digest
    cache: str  # "hit", "miss" (this request started the fill) or "join"


@attrs.define
class _TagState:
    digest: Digest
    checked_at: float | None  # None: loaded from disk, never checked by this process


def _media_type(content_type: str | None, doc: dict[str, object]) -> str:
    """The manifest's media type: the upstream's Content-Type when it names a manifest
    type, else the document's ``mediaType``, else inferred from its shape (OCI)."""
    if content_type:
        declared = content_type.split(";", 1)[0].strip().lower()
        if declared in MANIFEST_MEDIA_TYPES:
            return declared
    field = doc.get("mediaType")
    if isinstance(field, str) and field in MANIFEST_MEDIA_TYPES:
        return field
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc or "config" in doc:
        return OCI_MANIFEST
    raise UpstreamRefused("MANIFEST_INVALID", f"upstream sent a manifest of unknown type {content_type!r}", status=502)


def _hosted_blob_unknown(r: Route, digest: Digest) -> RegistryError:
    """A hosted repository never asks an upstream: a blob it does not hold is unknown."""
    return RegistryError("BLOB_UNKNOWN", f"blob {digest} is not in repository {r.repo_key}", detail={"digest": str(digest)})


def _effective(upstream: UpstreamConfig, config: MirrorConfig) -> UpstreamConfig:
    """An upstream's settings with the global ``offline`` switch applied."""
    return attrs.evolve(upstream, offline=True) if config.offline and not upstream.offline else upstream


class MirrorService:
    """Registry reads, answered from the store and filled from upstreams on demand.

    Args:
        config: the service configuration.
        store: where content lives.
        make_upstream: builds the client of one configured upstream.
        clock: the reactor's time.
        run_blocking: runs a blocking callable in a thread; returns a Deferred.
    """

    _log = Logger()

    def __init__(
        self,
        config: MirrorConfig,
        store: Store,
        make_upstream: Callable[[UpstreamConfig], Upstream],
        clock: IReactorTime,
        run_blocking: Callable[..., Deferred[None]],
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = Metrics()
        self.metrics.watch_ratelimits(lambda: [(u.name, u.ratelimit_remaining) for u in self._upstreams.values()])
        self._make_upstream = make_upstream
        self._upstreams = {u.registry: make_upstream(_effective(u, config)) for u in config.upstreams}
        self._clock = self.clock = clock
        self._run_blocking = run_blocking
        self.access = AccessRecord(store, clock.seconds)
        self._tags: dict[tuple[str, str], _TagState] = {}
        self._manifest_flights: SingleFlight[Manifest] = SingleFlight()
        self._blob_flights: SingleFlight[BlobFill | None] = SingleFlight()
        self._fills: dict[Digest, BlobFill] = {}

    def reconfigure(self, new: MirrorConfig) -> list[str]:
        """Apply a re-read configuration while running (SIGHUP).

        Upstreams, TTLs, hosted patterns, read-only and delete take effect at once;
        upstream clients whose settings changed are rebuilt (dropping their cached
        tokens).  Returns the keys that only a restart applies.
        """
        needs_restart = [key for key in ("listen", "storage") if getattr(new, key) != getattr(self.config, key)]
        upstreams = {}
        for u in new.upstreams:
            u = _effective(u, new)
            current = self._upstreams.get(u.registry)
            upstreams[u.registry] = current if current is not None and current.config == u else self._make_upstream(u)
        self._upstreams = upstreams
        self.config = attrs.evolve(new, listen=self.config.listen, storage=self.config.storage)
        self._tags.clear()  # TTLs may have changed: revalidate tags on their next use
        return needs_restart

    @property
    def fills_in_flight(self) -> int:
        """Blob fills not yet committed to the store (their clients may be done already)."""
        return len(self._fills)

    # routing ------------------------------------------------------------------------------
    def route(self, name: str, ns: str | None) -> Route:
        """Check ``name`` and pick its upstream, or hosted (see :mod:`mirror.routing`)."""
        return route(validate_name(name), ns, self.config.upstreams, self.config.hosted)

    def _upstream(self, r: Route) -> Upstream:
        assert r.upstream is not None, "a hosted repository has no upstream"
        return self._upstreams[r.upstream.registry]

    # manifests ----------------------------------------------------------------------------
    async def get_manifest(self, name: str, ns: str | None, reference: str, accept: list[str]) -> Manifest:
        """The manifest ``name:reference`` for a client that sent ``accept``."""
        r = self.route(name, ns)
        ref = parse_reference(reference)
        upstream_accept = [*MANIFEST_MEDIA_TYPES, *(a for a in accept if a not in MANIFEST_MEDIA_TYPES and "*" not in a)]
        if r.hosted:
            manifest = self._hosted_manifest(r, ref.tag, ref.digest, name, reference)
        elif ref.digest is not None:
            digest = ref.digest
            manifest = self._local_manifest(r.repo_key, digest)
            if manifest is None:
                self._log_cache("manifest", r, reference, "miss")
                manifest = await self._manifest_flights.run(
                    (r.repo_key, reference), lambda: self._fetch_manifest(r, reference, digest, upstream_accept)
                )
            else:
                self._log_cache("manifest", r, reference, "hit")
        else:
            assert ref.tag is not None
            tag = ref.tag
            manifest = self._fresh_tag(r, tag)
            if manifest is None:
                self._log_cache("manifest", r, reference, "revalidate" if self._tag_state(r, tag) else "miss")
                manifest = await self._manifest_flights.run(
                    (r.repo_key, tag), lambda: self._refresh_tag(r, tag, upstream_accept)
                )
            else:
                self._log_cache("manifest", r, reference, "hit")
        self.access.note(manifest.digest)
        if not accepts(accept, manifest.media_type):
            raise RegistryError(
                "MANIFEST_UNKNOWN",
                f"{name}:{reference} is {manifest.media_type}, which the request's Accept header does not allow",
            )
        return manifest

    def _hosted_manifest(self, r: Route, tag: str | None, digest: Digest | None, name: str, reference: str) -> Manifest:
        """A hosted repository's manifest: only ever from the store."""
        if digest is None:
            assert tag is not None
            digest = self.store.get_tag(r.repo_key, tag)
        manifest = self._local_manifest(r.repo_key, digest) if digest is not None else None
        if manifest is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest {name}:{reference} is not in this registry", detail={"name": name, "reference": reference})
        return manifest

    def _local_manifest(self, repo: str, digest: Digest) -> Manifest | None:
        media_type = self.store.manifest_media_type(repo, digest)
        if media_type is None:
            return None
        data = self.store.read_blob(digest, self.config.max_manifest_size)
        if data is None:
            return None
        return Manifest(data, media_type, digest)

    def _tag_state(self, r: Route, tag: str) -> _TagState | None:
        state = self._tags.get((r.repo_key, tag))
        if state is None:
            digest = self.store.get_tag(r.repo_key, tag)
            if digest is not None:
                state = self._tags[(r.repo_key, tag)] = _TagState(digest, None)
        return state

    def _fresh_tag(self, r: Route, tag: str) -> Manifest | None:
        state = self._tag_state(r, tag)
        if state is None or state.checked_at is None:
            return None
        if self._clock.seconds() - state.checked_at >= r.upstream.tag_ttl:
            return None
        return self._local_manifest(r.repo_key, state.digest)

    def _trust_tag(self, r: Route, tag: str, digest: Digest) -> None:
        key = (r.repo_key, tag)
        state = self._tags.get(key)
        if state is None or state.digest != digest:
            self.store.set_tag(r.repo_key, tag, digest)
        self._tags[key] = _TagState(digest, self._clock.seconds())

    async def _refresh_tag(self, r: Route, tag: str, accept: list[str]) -> Manifest:
        upstream = self._upstream(r)
        state = self._tag_state(r, tag)
        cached = self._local_manifest(r.repo_key, state.digest) if state is not None else None
        if cached is not None:
            try:
                remote = await upstream.head_manifest(r.remote_name, tag, accept)
            except UpstreamUnavailable as e:
                return self._serve_stale(r, tag, cached, e)
            except UpstreamRefused as e:
                if e.status == 404:
                    self._forget_tag(r, tag)
                raise
            if remote == str(cached.digest):
                self._trust_tag(r, tag, cached.digest)
                return cached
        try:
            manifest = await self._fetch_manifest(r, tag, None, accept)
        except UpstreamUnavailable as e:
            if cached is not None:
                return self._serve_stale(r, tag, cached, e)
            raise
        except UpstreamRefused as e:
            if e.status == 404:
                self._forget_tag(r, tag)
            raise
        self._trust_tag(r, tag, manifest.digest)
        return manifest

    def _serve_stale(self, r: Route, tag: str, cached: Manifest, error: RegistryError) -> Manifest:
        self._log.warn(
            "serving cached {repository}:{tag} ({digest}) unchecked: {reason}",
            repository=r.repo_key,
            tag=tag,
            digest=str(cached.digest),
            reason=error.message,
            event_kind="stale_tag",
        )
        assert r.upstream is not None
        self.metrics.stale_tag(r.upstream.registry)
        # Trust it for another TTL, so that every request does not wait on a dead upstream.
        self._tags[(r.repo_key, tag)] = _TagState(cached.digest, self._clock.seconds())
        return cached

    def _forget_tag(self, r: Route, tag: str) -> None:
        self._tags.pop((r.repo_key, tag), None)
        self.store.delete_tag(r.repo_key, tag)

    async def _fetch_manifest(self, r: Route, reference: str, expected: Digest | None, accept: list[str]) -> Manifest:
        upstream = self._upstream(r)
        started = self._clock.seconds()
        outcome = "error"
        size = 0
        try:
            response = await upstream.get_manifest(r.remote_name, reference, accept, self.config.max_manifest_size)
            data = response.data
            size = len(data)
            digest = expected if expected is not None else Digest.of(data)
            if expected is not None and not expected.matches(data):
                outcome = "digest mismatch"
                raise UpstreamRefused(
                    "DIGEST_INVALID", f"upstream {upstream.name} sent a manifest that does not match {expected}", status=502
                )
            if response.digest_header:
                claimed = self._claimed_digest(response.digest_header)
                if claimed is None or not claimed.matches(data):
                    outcome = "digest mismatch"
                    raise UpstreamRefused(
                        "DIGEST_INVALID",
                        f"upstream {upstream.name} sent {r.remote_name}:{reference} whose bytes do not match "
                        f"its Docker-Content-Digest {response.digest_header[:100]}",
                        status=502,
                    )
            doc = parse_manifest(data)
            media_type = _media_type(response.content_type, doc)
            self.store.put_blob(digest, data)
            self.store.link_manifest(r.repo_key, digest, media_type)
            outcome = "stored"
            return Manifest(data, media_type, digest)
        except RegistryError as e:
            if outcome == "error":
                outcome = e.code
            raise
        finally:
            self._log_fetch("manifest", r, reference, size, started, outcome)

    @staticmethod
    def _claimed_digest(header: str) -> Digest | None:
        try:
            return parse_digest(header.strip())
        except RegistryError:
            return None

    # blobs --------------------------------------------------------------------------------
    async def get_blob(self, name: str, ns: str | None, digest_text: str, *, whole: bool = False) -> BlobBody:
        """A blob to stream.  ``whole`` (for Range requests) waits for a fill to commit."""
        r = self.route(name, ns)
        digest = parse_digest(digest_text)
        linked = not r.hosted or self.store.has_blob_link(r.repo_key, digest)
        body = self._cached_blob(digest, "hit") if linked else None
        if body is not None:
            self._log_cache("blob", r, digest_text, "hit")
            return body
        if r.hosted:
            raise _hosted_blob_unknown(r, digest)
        cache = "join"
        fill = self._fills.get(digest)
        if fill is None:
            joining = self._blob_flights.in_flight(digest)
            fill = await self._blob_flights.run(digest, lambda: self._start_fill(r, digest))
            cache = "join" if joining else "miss"
        self._log_cache("blob", r, digest_text, cache)
        if fill is not None and whole:
            await self._wait_fill(fill)
        if fill is None or fill.finished:
            body = self._cached_blob(digest, cache)
            if body is None:
                raise RegistryError("BLOB_UNKNOWN", f"blob {digest} vanished from the cache; retry")
            return body
        if fill.failure is not None:
            raise RegistryError("UNAVAILABLE", f"fetching {digest} from upstream failed: {fill.failure.getErrorMessage()}")
        try:
            file = fill.writer.open_spool()
        except FileNotFoundError:  # committed (renamed) or aborted just now
            return await self.get_blob(name, ns, digest_text, whole=whole)
        return BlobBody(file, fill, fill.expected_size, digest, cache)

    async def _wait_fill(self, fill: BlobFill) -> None:
        """Wait until ``fill`` commits or fails, without touching its shared Deferred."""
        waiter: Deferred[None] = Deferred()

        def check() -> None:
            if (fill.finished or fill.failure is not None) and not waiter.called:
                fill.unsubscribe(check)
                waiter.callback(None)

        fill.subscribe(check)
        check()
        await waiter

    def _cached_blob(self, digest: Digest, cache: str) -> BlobBody | None:
        file = self.store.open_blob(digest)
        if file is None:
            return None
        size = os.fstat(file.fileno()).st_size
        self.access.note(digest)
        return BlobBody(file, CachedSource(size), size, digest, cache)

    async def _start_fill(self, r: Route, digest: Digest) -> BlobFill | None:
        if self.store.blob_size(digest) is not None:
            return None  # landed while we were being scheduled
        upstream = self._upstream(r)
        started = self._clock.seconds()
        try:
            response = await upstream.get_blob(r.remote_name, str(digest))
        except RegistryError as e:
            self._log_fetch("blob", r, str(digest), 0, started, e.code)
            raise
        writer = self.store.new_writer()
        if digest.algorithm != "sha256":
            writer.hash_also(digest)
        length = response.length if isinstance(response.length, int) else None
        fill = BlobFill(writer, digest, length, self._clock, r.upstream.timeout, self._run_blocking)
        self._fills[digest] = fill

        def finished(result: None | Failure) -> None:
            self._fills.pop(digest, None)
            if isinstance(result, Failure):
                if result.check(DigestMismatch):
                    mismatch = result.value
                    self._log.error(
                        "digest mismatch: upstream {upstream} sent {repository}@{digest} as {actual} "
                        "({bytes} bytes); not cached",
                        upstream=upstream.name,
                        repository=r.remote_name,
                        digest=str(digest),
                        actual=str(mismatch.actual),
                        bytes=mismatch.size,
                        event_kind="digest_mismatch",
                    )
                    outcome = "digest mismatch"
                else:
                    outcome = f"failed: {result.getErrorMessage()}"
            else:
                outcome = "stored"
            self._log_fetch("blob", r, str(digest), writer.size, started, outcome)

        fill.done.addBoth(finished)
        response.deliverBody(fill)
        return fill

    async def blob_size(self, name: str, ns: str | None, digest_text: str) -> int:
        """A blob's size for ``HEAD``: from the store, a fill, or the upstream (no fetch)."""
        r = self.route(name, ns)
        digest = parse_digest(digest_text)
        linked = not r.hosted or self.store.has_blob_link(r.repo_key, digest)
        size = self.store.blob_size(digest) if linked else None
        if size is not None:
            self._log_cache("blob", r, digest_text, "hit")
            return size
        if r.hosted:
            raise _hosted_blob_unknown(r, digest)
        fill = self._fills.get(digest)
        if fill is not None and fill.expected_size is not None:
            return fill.expected_size
        size = await self._upstream(r).head_blob(r.remote_name, digest_text)
        if size is None:
            body = await self.get_blob(name, ns, digest_text, whole=True)
            body.file.close()
            assert body.size is not None
            return body.size
        return size

    # listings -----------------------------------------------------------------------------
    def tags(self, name: str, ns: str | None) -> list[str] | None:
        """Tags the registry holds for a repository, in lexical order.

        ``None`` when every tag the repository had was deleted: CNCF Distribution 2.8
        answers ``"tags": null`` then, and we answer as it does.  A repository that never
        had a tag answers the spec's empty list.
        """
        r = self.route(name, ns)
        tags = self.store.list_tags(r.repo_key)
        if tags is None:
            raise RegistryError("NAME_UNKNOWN", f"repository {name} is not known to this registry", detail={"name": name})
        if not tags and self.store.had_tags(r.repo_key):
            return None
        return tags

    async def referrers(self, name: str, ns: str | None, digest_text: str, artifact_type: str | None) -> tuple[bytes, bool]:
        """The referrers index of a manifest (OCI 1.1) and whether the artifactType filter applied.

        Hosted repositories answer from the store; mirrored ones ask the upstream, whose
        answer is checked to be an OCI index and passed on (filtered here if it did not).
        """
        r = self.route(name, ns)
        subject = parse_digest(digest_text)
        if r.hosted:
            descriptors = self.store.referrers(r.repo_key, subject)
        else:
            descriptors = await self._upstream(r).referrers(r.remote_name, str(subject), artifact_type)
        if artifact_type is not None:
            descriptors = [d for d in descriptors if d.get("artifactType") == artifact_type]
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        return json.dumps(index).encode(), artifact_type is not None

    def repositories(self) -> list[str]:
        """Every repository the mirror holds, in lexical order."""
        return list(self.store.repositories())

    # logging ------------------------------------------------------------------------------
    def _log_cache(self, kind: str, r: Route, reference: str, result: str) -> None:
        self.metrics.cache_lookup(kind, result)
        self._log.info(
            "cache {result}: {kind} {repository}@{reference}",
            result=result,
            kind=kind,
            repository=r.repo_key,
            reference=reference,
            event_kind="cache",
        )

    def _log_fetch(self, kind: str, r: Route, reference: str, size: int, started: float, outcome: str) -> None:
        assert r.upstream is not None
        self.metrics.fetched(r.upstream.registry, kind, outcome, size)
        self._log.info(
            "upstream fetch: {upstream} {kind} {repository}@{digest}: {outcome}, {bytes} bytes in {seconds:.3f} s",
            upstream=r.upstream.registry,
            kind=kind,
            repository=r.remote_name,
            digest=reference,
            bytes=size,
            seconds=self._clock.seconds() - started,
            outcome=outcome,
            event_kind="upstream_fetch",
        )
