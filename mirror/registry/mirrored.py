"""A mirrored repository: local content in front of an upstream registry.

* **Manifests by digest** are immutable: served from the store, fetched once if absent.
* **Tags** are trusted for the upstream's ``tag_ttl``; then one ``HEAD`` revalidates
  them (:mod:`mirror.core.tagcache`).  An upstream that is down, slow or answering
  5xx/429 gets the cached digest served (and a warning logged), after at most
  :data:`STALE_PATIENCE` seconds of retries rather than the upstream's whole
  ``retry_deadline``.
* **Blobs** are served from the store if this repository holds them: a link written when
  the blob was fetched for it, or the upstream's ``HEAD`` for it (when the upstream cannot
  be asked: a manifest it holds naming the digest as a layer or config).  A digest it
  does not hold is the upstream's to answer for this repository, even when another
  repository's copy is stored — a digest is not a key.  A miss starts one
  :class:`~mirror.registry.fills.BlobFill` per digest, and every request for that digest
  follows its spool until it commits (:class:`~mirror.registry.fills.Fills`).  A body
  that breaks mid-way is resumed from the upstream with a ``Range`` request.
* Concurrent misses for one manifest share one upstream request.
* Writes are refused with ``DENIED``, naming the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from mirror.core.errors import RegistryError
from mirror.core.manifest import parse_manifest
from mirror.core.oci import MANIFEST_MEDIA_TYPES, Digest, Reference, parse_digest
from mirror.core.routing import Route
from mirror.core.tagcache import Freshness, TagCache, TagState
from mirror.registry.cluster import Cluster
from mirror.registry.fills import BlobFill, Fills
from mirror.registry.repository import BlobBody, Context, Repository, StoredManifest
from mirror.registry.singleflight import SingleFlight
from mirror.responses import Discard
from mirror.storage.base import BlobWriter, DigestMismatch
from mirror.storage.spool import FillNote, Orphan
from mirror.upstream.client import Upstream, UpstreamRefused, UpstreamUnavailable

__all__ = ["MirrorState", "MirroredRepository"]

#: Repositories whose manifests' references are remembered (then the memo starts over).
_NAMED_CACHE = 1024
#: Seconds a fill following another node waits for the last byte, which that node sends
#: once it has uploaded the blob to the shared store (a large blob's upload takes a while).
FOLLOW_TAIL = 600.0
#: Seconds of retries when there is a local answer to fall back on (a cached tag to serve
#: stale, a manifest naming the blob): a failing upstream is not worth waiting longer for.
STALE_PATIENCE = 1.0
_log = Logger()


@attrs.frozen
class MirrorState:
    """What the mirrored repositories of one registry share."""

    run_blocking: Callable[..., Deferred[Any]]  # runs batches of fill writes in a thread
    cluster: Cluster  # the other nodes on the store, if any: who fills what
    tags: TagCache = attrs.Factory(TagCache)
    fills: Fills = attrs.Factory(Fills)
    manifest_flights: SingleFlight[StoredManifest] = attrs.Factory(SingleFlight)
    # repository -> (its manifests, the configs and layers they name), for _confirm offline
    named: dict[str, tuple[frozenset[Digest], frozenset[Digest]]] = attrs.Factory(dict)


class MirroredRepository(Repository):
    """A repository mirrored from ``upstream`` (see the module docstring)."""

    def __init__(self, name: str, route: Route, context: Context, upstream: Upstream, state: MirrorState) -> None:
        super().__init__(name, route, context)
        assert route.upstream is not None, "a mirrored repository has an upstream"
        self._upstream = upstream
        self._ttl = route.upstream.tag_ttl
        self._state = state

    def refusal(self, *, deleting: bool = False) -> RegistryError:
        assert self.route.upstream is not None
        patterns = ", ".join(self._ctx.config.hosted) or "none configured"
        return RegistryError(
            "DENIED",
            f"repository {self.name} is mirrored from {self.route.upstream.registry} and read-only here; "
            f"pushes and deletes go to hosted repositories (hosted patterns: {patterns})",
        )

    # manifests ----------------------------------------------------------------------------
    async def _resolve_manifest(self, ref: Reference, accept: Sequence[str]) -> StoredManifest:
        upstream_accept = [*MANIFEST_MEDIA_TYPES, *(a for a in accept if a not in MANIFEST_MEDIA_TYPES and "*" not in a)]
        events, flights = self._ctx.events, self._state.manifest_flights
        if ref.digest is not None:
            digest = ref.digest
            manifest = await self._ctx.local.manifest(self.key, digest)
            if manifest is not None:
                events.cache("manifest", self.route, str(ref), "hit")
                return manifest
            events.cache("manifest", self.route, str(ref), "miss")
            return await flights.run((self.key, str(ref)), lambda: self._fetch_manifest(str(ref), digest, upstream_accept))
        assert ref.tag is not None
        tag = ref.tag
        state = await self._tag_state(tag)
        freshness = self._state.tags.freshness(state, self._ctx.clock.seconds(), self._ttl)
        if freshness is Freshness.FRESH:
            assert state is not None
            manifest = await self._ctx.local.manifest(self.key, state.digest)
            if manifest is not None:
                events.cache("manifest", self.route, tag, "hit")
                return manifest
        events.cache("manifest", self.route, tag, "miss" if freshness is Freshness.UNKNOWN else "revalidate")
        return await flights.run((self.key, tag), lambda: self._refresh_tag(tag, upstream_accept))

    async def _tag_state(self, tag: str, *, from_store: bool = False) -> TagState | None:
        """What is known of ``tag``: in memory, else (or with ``from_store``: first) in the
        store, where every process sharing it records each confirmation."""
        state = None if from_store else self._state.tags.get(self.key, tag)
        if state is None:
            record = await self._ctx.store.metadata.tag_record(self.key, tag)
            if record is not None:
                state = self._state.tags.loaded(self.key, tag, *record)
        return state

    async def _trust_tag(self, tag: str, digest: Digest) -> None:
        """The upstream confirmed ``tag`` as ``digest``: record it, also when unchanged, so
        that other nodes sharing the store see it fresh (not with a TTL of 0: never fresh)."""
        if self._state.tags.confirmed(self.key, tag, digest, self._ctx.clock.seconds()) or self._ttl > 0:
            await self._ctx.store.metadata.set_tag(self.key, tag, digest)

    async def _forget_tag(self, tag: str) -> None:
        self._state.tags.forget(self.key, tag)
        await self._ctx.store.metadata.delete_tag(self.key, tag)

    async def _refresh_tag(self, tag: str, accept: list[str]) -> StoredManifest:
        state = await self._tag_state(tag, from_store=True)  # another node may have confirmed it since
        cached = await self._ctx.local.manifest(self.key, state.digest) if state is not None else None
        if cached is not None and self._state.tags.freshness(state, self._ctx.clock.seconds(), self._ttl) is Freshness.FRESH:
            return cached
        if cached is None:
            return await self._ask_upstream(tag, None, accept)
        cluster = self._state.cluster
        if not await cluster.claim_tag(self.key, tag):
            # Another process sharing the store is asking the upstream right now: what is
            # cached is served, as it was a moment ago; its answer is in the store next time.
            return cached
        try:
            return await self._ask_upstream(tag, cached, accept)
        finally:
            await cluster.release_tag(self.key, tag)

    async def _ask_upstream(self, tag: str, cached: StoredManifest | None, accept: list[str]) -> StoredManifest:
        """Revalidate ``cached`` (a ``HEAD``), or fetch the tag's manifest, and record the answer."""
        if cached is not None:
            try:
                remote = await self._upstream.head_manifest(self.route.remote_name, tag, accept, patience=STALE_PATIENCE)
            except UpstreamUnavailable as e:
                return self._serve_stale(tag, cached, e)
            except UpstreamRefused as e:
                if e.status == 404:
                    await self._forget_tag(tag)
                raise
            if remote == str(cached.digest):
                await self._trust_tag(tag, cached.digest)
                return cached
        try:
            manifest = await self._fetch_manifest(tag, None, accept, patience=STALE_PATIENCE if cached is not None else None)
        except UpstreamUnavailable as e:
            if cached is not None:
                return self._serve_stale(tag, cached, e)
            raise
        except UpstreamRefused as e:
            if e.status == 404:
                await self._forget_tag(tag)
            raise
        await self._trust_tag(tag, manifest.digest)
        return manifest

    def _serve_stale(self, tag: str, cached: StoredManifest, error: RegistryError) -> StoredManifest:
        self._ctx.events.stale_tag(self.route, tag, cached.digest, error.message)
        # Trust it for another TTL, so that every request does not wait on a dead upstream.
        self._state.tags.confirmed(self.key, tag, cached.digest, self._ctx.clock.seconds())
        return cached

    async def _fetch_manifest(
        self, reference: str, expected: Digest | None, accept: list[str], *, patience: float | None = None
    ) -> StoredManifest:
        upstream = self._upstream
        started = self._ctx.clock.seconds()
        outcome = "error"
        size = 0
        try:
            response = await upstream.get_manifest(
                self.route.remote_name, reference, accept, self._ctx.config.max_manifest_size, patience=patience
            )
            data = response.data
            size = len(data)
            if expected is not None and not expected.matches(data):
                outcome = "digest mismatch"
                raise UpstreamRefused(
                    "DIGEST_INVALID", f"upstream {upstream.name} sent a manifest that does not match {expected}", status=502
                )
            digest = expected if expected is not None else Digest.of(data)
            if response.digest_header:
                claimed = _claimed_digest(response.digest_header)
                if claimed is None or not claimed.matches(data):
                    outcome = "digest mismatch"
                    raise UpstreamRefused(
                        "DIGEST_INVALID",
                        f"upstream {upstream.name} sent {self.route.remote_name}:{reference} whose bytes do not match "
                        f"its Docker-Content-Digest {response.digest_header[:100]}",
                        status=502,
                    )
            try:
                media_type = parse_manifest(data, response.content_type).media_type
            except RegistryError as e:
                raise UpstreamRefused(
                    "MANIFEST_INVALID", f"upstream {upstream.name} sent an invalid manifest: {e.message}", status=502
                ) from None
            await self._ctx.store.blobs.put(digest, data)
            await self._ctx.store.metadata.link_manifest(self.key, digest, media_type)
            outcome = "stored"
            return StoredManifest(data, media_type, digest)
        except RegistryError as e:
            if outcome == "error":
                outcome = e.code
            raise
        finally:
            self._ctx.events.fetched("manifest", self.route, reference, size, started, outcome)

    # blobs --------------------------------------------------------------------------------
    # A digest is not a key: a stored blob is served through this repository only if the
    # repository holds it — a link written when it was fetched for the repository, or the
    # upstream's confirmation (:meth:`_confirm`).  A digest it does not hold gets the
    # upstream's answer for this repository, whether or not another repository's copy is
    # stored here.
    async def get_blob(self, digest: Digest, *, wait_until_stored: bool = False) -> BlobBody:
        held = await self._linked(digest)
        if not held and await self._ctx.store.blobs.stat(digest) is not None:
            await self._confirm(digest)
            held = True
        if held:
            local = await self._ctx.local.blob(digest)
            if local is not None:
                self._ctx.events.cache("blob", self.route, str(digest), "hit")
                return local
        fill, started = await self._state.fills.join_or_start(digest, lambda: self._start_fill(digest), self.key)
        if not held and not (started and fill is not None) and not await self._linked(digest):
            # Another repository's fill, or a copy stored since: this repository's upstream
            # has not been asked yet (a fill for this repository linked it as it started).
            await self._confirm(digest)
        cache = "miss" if started else "join"
        self._ctx.events.cache("blob", self.route, str(digest), cache)
        if fill is not None and wait_until_stored:
            await _until_settled(fill)
        if fill is None or fill.stored:
            body = await self._ctx.local.blob(digest, cache)
            if body is None:
                raise RegistryError("BLOB_UNKNOWN", f"blob {digest} vanished from the cache; retry")
            return body
        if fill.failure is not None:
            raise RegistryError("UNAVAILABLE", f"fetching {digest} from upstream failed: {fill.failure.getErrorMessage()}")
        try:
            responder = fill.follower()
        except FileNotFoundError:  # committed (renamed) or aborted just now
            return await self.get_blob(digest, wait_until_stored=wait_until_stored)
        return BlobBody(responder, fill.expected_size, digest, cache)

    async def _holds_stored(self, digest: Digest) -> bool:
        return await self._linked(digest)  # an unlinked digest takes get_blob's way (the upstream is asked)

    async def _linked(self, digest: Digest) -> bool:
        """Whether the blob was fetched for (or confirmed to) this repository before."""
        return await self._ctx.store.metadata.has_blob_link(self.key, digest, fetched=True)

    async def _link(self, digest: Digest) -> None:
        """Remember that this repository holds ``digest``.  Best effort: a store that takes
        no writes (full, read-only) still serves what it has; the upstream is asked again."""
        try:
            await self._ctx.store.metadata.link_blob(self.key, digest, fetched=True)
        except OSError as e:
            _log.warn(
                "could not record that {repository} holds {digest}: {error}",
                repository=self.key,
                digest=str(digest),
                error=str(e),
            )

    async def _confirm(self, digest: Digest) -> int | None:
        """Make sure this repository holds ``digest``, and link it: the upstream's ``HEAD``
        for this repository says so, or — when the upstream cannot be asked (offline, down,
        rate limiting) — a manifest this repository holds names it as a layer or config
        (:meth:`_named_by_a_manifest`), as a store an earlier release wrote needs offline.

        Returns the size the upstream gave, if any.

        Raises:
            RegistryError: the upstream's answer otherwise (``BLOB_UNKNOWN`` for a 404),
                the same as for a digest stored nowhere here.
        """
        named = await self._named_by_a_manifest(digest)
        try:
            # With a manifest to fall back on, a failing upstream is not worth waiting for.
            size = await self._upstream.head_blob(self.route.remote_name, str(digest), patience=STALE_PATIENCE if named else None)
        except UpstreamUnavailable:
            if not named:
                raise
            size = None
        await self._link(digest)
        return size

    async def _named_by_a_manifest(self, digest: Digest) -> bool:
        """Whether a manifest this repository holds names ``digest`` as its config or a
        layer — one its upstream must have checked the repository holds before taking the
        manifest: not a layer with ``urls`` (a registry takes those unchecked) and not a
        child manifest (a blob read is no way to read a manifest)."""
        store = self._ctx.store
        manifests = frozenset(await store.metadata.list_manifests(self.key))
        known = self._state.named.get(self.key)
        if known is not None and known[0] == manifests:  # parsed already: no work per probe
            return digest in known[1]
        named: set[Digest] = set()
        for manifest_digest in manifests:
            data = await store.blobs.read(manifest_digest, self._ctx.config.max_manifest_size)
            if data is None:
                continue
            try:
                manifest = parse_manifest(data)
            except RegistryError:
                continue
            named.update(d.digest for d in (manifest.config, *manifest.layers) if d is not None and "urls" not in d.extra)
        if len(self._state.named) >= _NAMED_CACHE:
            self._state.named.clear()
        self._state.named[self.key] = (manifests, frozenset(named))
        return digest in named

    async def resume_fill(self, orphan: Orphan) -> None:
        """Resume a fill a dead process left (see :mod:`mirror.storage.spool`): from the
        bytes on disk on, unless the blob is stored or being fetched meanwhile."""
        try:
            if self._upstream.config.offline:
                return  # nothing to resume from
            digest = parse_digest(orphan.note.digest)
            await self._state.fills.join_or_start(digest, lambda: self._start_fill(digest, orphan), self.key)
        finally:
            orphan.discard()  # (unless a fill adopted it: then nothing to do)

    async def _start_fill(self, digest: Digest, orphan: Orphan | None = None) -> BlobFill | None:
        """Start fetching ``digest``; ``None`` if it was stored meanwhile (a fill that
        committed between this request's store lookup and its turn here).  With other
        nodes on the store, the node holding the blob's fill lease fetches it and the
        others follow its fill (:mod:`mirror.registry.cluster`).  With ``orphan`` (a dead
        process's unfinished fill of it), the upstream is asked only for the rest."""
        if await self._ctx.store.blobs.stat(digest) is not None:
            return None
        started = self._ctx.clock.seconds()
        cluster = self._state.cluster
        assert self.route.upstream is not None
        peer = await cluster.claim(digest)
        source: str | None = None  # the node whose fill this follows; None: the upstream's body
        response: IResponse | None = None
        writer: BlobWriter | None = None
        skip = 0  # bytes of the body from before what the writer holds
        try:
            if peer is None and cluster.enabled and await self._ctx.store.blobs.stat(digest) is not None:
                await cluster.release(digest)  # another node stored it and let go of the lease meanwhile
                return None
            if peer is not None:
                await self._confirm(digest)  # this repository holds it upstream (the peer's fill may be for another)
                response = await cluster.follow(peer, digest, self.route.upstream.timeout)
                source = peer if response is not None else None
            if response is None and orphan is not None:  # (following another node: the orphan goes)
                # (re-hashes what is on disk, in a thread; the writer then owns the file)
                writer = await self._state.run_blocking(self._ctx.store.blobs.writer, orphan)
                if writer.actual_digest(digest.algorithm) == digest:  # died between the last byte and the commit
                    await writer.commit(digest)
                    if peer is None:
                        await cluster.release(digest)
                    return None
                self._ctx.events.resumed(self.route, str(digest), writer.size, "a fill interrupted by a restart")
                response, skip = await self._upstream.resume_blob(self.route.remote_name, str(digest), writer.size)
                await self._link(digest)
            if response is None:
                response = await self._upstream.get_blob(self.route.remote_name, str(digest))
                await self._link(digest)  # the upstream's 200 says its repository has the digest
            if writer is None:
                writer = self._ctx.store.blobs.writer()
            writer.note(FillNote(str(digest), self.route.upstream.registry, self.route.remote_name))
        except BaseException as e:
            if writer is not None:
                writer.abort()
            if response is not None:
                response.deliverBody(Discard())
            if peer is None:
                await cluster.release(digest)
            if isinstance(e, RegistryError):
                self._ctx.events.fetched("blob", self.route, str(digest), 0, started, e.code)
            raise
        if digest.algorithm != "sha256":
            writer.hash_also(digest)
        held = writer.size - skip  # where the body starts in the blob
        length = held + response.length if isinstance(response.length, int) else None
        timeout = self.route.upstream.timeout
        # A node followed holds back the last byte until it has stored the blob (its upload):
        # wait that long, not an idle upstream's timeout.
        tail = max(timeout, FOLLOW_TAIL) if source is not None else None
        upstream = self._upstream

        async def resume(offset: int, why: str) -> tuple[IResponse, int]:
            # From the upstream, whoever sent the first bytes: the digest decides, not the source.
            self._ctx.events.resumed(self.route, str(digest), offset, why)
            return await upstream.resume_blob(self.route.remote_name, str(digest), offset)

        fill = BlobFill(
            writer,
            digest,
            length,
            self._ctx.clock,
            timeout,
            self._state.run_blocking,
            tail_timeout=tail,
            resume=resume,
            received=writer.size,
            skip=skip,
        )

        def finished(result: Failure | None) -> None:
            outcome = "stored"
            if isinstance(result, Failure):
                if result.check(DigestMismatch):
                    mismatch = result.value
                    assert isinstance(mismatch, DigestMismatch)
                    self._ctx.events.digest_mismatch(self.route, digest, mismatch.actual, mismatch.size)
                    outcome = "digest mismatch"
                else:
                    outcome = f"failed: {result.getErrorMessage()}"
            if source is not None:
                self._ctx.events.followed(self.route, str(digest), source, writer.size, started, outcome)
            else:
                self._ctx.events.fetched("blob", self.route, str(digest), writer.size, started, outcome)

        fill.done.addBoth(finished)
        if peer is None:
            cluster.keep(digest, fill.done)
        response.deliverBody(fill)
        return fill

    async def blob_size(self, digest: Digest) -> int:
        if await self._linked(digest):
            size = await self._ctx.store.blobs.stat(digest)
            if size is not None:
                self._ctx.events.cache("blob", self.route, str(digest), "hit")
                return size
            size = self._state.fills.expected_size(digest)
            if size is not None:
                return size
        size = await self._confirm(digest)  # the upstream's word (for an unlinked digest, first)
        stored = await self._ctx.store.blobs.stat(digest)
        if stored is not None:
            return stored
        if size is None:
            body = await self.get_blob(digest, wait_until_stored=True)
            body.responder.close()
            assert body.size is not None
            return body.size
        return size

    async def holds_blob(self, digest: Digest) -> bool:
        # The upstream is asked whether or not the blob is stored here, so that a mount
        # takes as long either way and tells nothing about what other repositories hold.
        if not await self._linked(digest):
            try:
                await self._confirm(digest)
            except RegistryError:
                return False
        return await self._ctx.store.blobs.stat(digest) is not None

    async def referrers(self, subject: Digest, artifact_type: str | None) -> list[dict[str, object]]:
        return await self._upstream.referrers(self.route.remote_name, str(subject), artifact_type)


def _claimed_digest(header: str) -> Digest | None:
    try:
        return parse_digest(header.strip())
    except RegistryError:
        return None


async def _until_settled(fill: BlobFill) -> None:
    """Wait until ``fill`` is stored or has failed, without touching its shared Deferred."""
    waiter: Deferred[None] = Deferred()

    def check() -> None:
        if (fill.stored or fill.failure is not None) and not waiter.called:
            fill.unsubscribe(check)
            waiter.callback(None)

    fill.subscribe(check)
    check()
    await waiter
