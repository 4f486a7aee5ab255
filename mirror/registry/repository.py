"""A repository the registry can read (and maybe write): the interface and what is shared.

The web layer asks :class:`~mirror.registry.registry.Registry` for the repository a
request names and calls it; it never asks whether the repository is hosted.  There are
two kinds, the way Distribution layers its pull-through proxy over the same blob
interface:

* :class:`~mirror.registry.hosted.HostedRepository` answers from the store only and
  takes pushes and deletes;
* :class:`~mirror.registry.mirrored.MirroredRepository` answers from the store and
  fills misses from its upstream (tag TTL and revalidation, stale answers when the
  upstream is down, one fill per blob that every client follows), and refuses writes.

This module holds the base class (reads common to both; writes refused unless a subclass
allows them), the values repositories return, and :class:`LocalContent`, the reads of
stored content both kinds share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

import attrs

from twisted.internet.interfaces import IReactorTime

from mirror.config import MirrorConfig
from mirror.core.errors import RegistryError
from mirror.core.httpheaders import accepts
from mirror.core.oci import Digest, Reference
from mirror.core.routing import Route
from mirror.registry.access import AccessBatch
from mirror.registry.events import Events
from mirror.storage.base import Store
from mirror.storage.sending import Responder

__all__ = [
    "BlobBody",
    "Context",
    "LocalContent",
    "PushedManifest",
    "Repository",
    "StoredManifest",
    "UploadState",
]


@attrs.frozen
class StoredManifest:
    """A manifest ready to serve: its exact bytes, media type and digest."""

    data: bytes
    media_type: str
    digest: Digest


@attrs.frozen
class BlobBody:
    """A blob ready to stream."""

    responder: Responder  # sends the bytes (following the fill, if one is under way)
    size: int | None  # None while a fill of unknown length is under way
    digest: Digest
    cache: str  # "hit", "miss" (this request started the fill) or "join"


@attrs.frozen
class UploadState:
    """Where an upload session stands."""

    repo: str
    upload_id: str
    size: int


@attrs.frozen
class PushedManifest:
    """A manifest accepted by a PUT."""

    digest: Digest
    subject: Digest | None
    tags: tuple[str, ...] = ()  # tags set by ?tag= on a push by digest


class LocalContent:
    """Reads of stored content.  A blob read is noted in the access record at once; a
    manifest when it is served (:meth:`Repository.get_manifest`, after the Accept check)."""

    def __init__(self, store: Store, access: AccessBatch, max_manifest_size: int) -> None:
        self._store = store
        self._access = access
        self.max_manifest_size = max_manifest_size

    async def manifest(self, key: str, digest: Digest) -> StoredManifest | None:
        """Manifest ``digest`` if repository ``key`` holds it and its bytes are stored."""
        media_type = await self._store.metadata.manifest_media_type(key, digest)
        if media_type is None:
            return None
        data = await self._store.blobs.read(digest, self.max_manifest_size)
        if data is None:
            return None
        return StoredManifest(data, media_type, digest)

    async def blob(self, digest: Digest, cache: str = "hit") -> BlobBody | None:
        """Blob ``digest`` from the store, or ``None`` if it is not stored."""
        responder = await self._store.blobs.open(digest)
        if responder is None:
            return None
        self._access.note(digest)
        return BlobBody(responder, responder.size, digest, cache)

    def note(self, digest: Digest) -> None:
        """``digest`` was served."""
        self._access.note(digest)


@attrs.frozen
class Context:
    """What every repository of one registry shares."""

    config: MirrorConfig
    store: Store
    local: LocalContent
    events: Events
    clock: IReactorTime


class Repository:
    """One repository, as a request names it (see the module docstring).

    Args:
        name: the name as the request gave it (for messages).
        route: where the router says it lives.
        context: what every repository shares.
    """

    def __init__(self, name: str, route: Route, context: Context) -> None:
        self.name = name
        self.route = route
        self.key = route.key
        self._ctx = context

    # reads --------------------------------------------------------------------------------
    async def get_manifest(self, ref: Reference, accept: Sequence[str]) -> StoredManifest:
        """The manifest ``ref`` for a client that sent ``accept``."""
        manifest = await self._resolve_manifest(ref, accept)
        self._ctx.local.note(manifest.digest)
        if not accepts(accept, manifest.media_type):
            raise RegistryError(
                "MANIFEST_UNKNOWN",
                f"{self.name}:{ref} is {manifest.media_type}, which the request's Accept header does not allow",
            )
        return manifest

    async def _resolve_manifest(self, ref: Reference, accept: Sequence[str]) -> StoredManifest:
        raise NotImplementedError

    async def get_blob(self, digest: Digest, *, wait_until_stored: bool = False) -> BlobBody:
        """A blob to stream; ``wait_until_stored`` (Range requests) waits for a fill to commit."""
        raise NotImplementedError

    async def blob_location(self, digest: Digest) -> str | None:
        """Where a client may fetch ``digest`` straight from the store instead (a store that
        redirects), when this repository holds it and it is stored; else ``None`` (the
        client gets :meth:`get_blob`'s answer)."""
        if not self._ctx.store.blobs.redirects or not await self._holds_stored(digest):
            return None
        location = await self._ctx.store.blobs.redirect(digest)
        if location is not None:
            self._ctx.local.note(digest)
            self._ctx.events.cache("blob", self.route, str(digest), "hit")
        return location

    async def _holds_stored(self, digest: Digest) -> bool:
        """Whether this repository holds ``digest`` by its own record (no upstream asked)."""
        raise NotImplementedError

    async def blob_size(self, digest: Digest) -> int:
        """A blob's size, for ``HEAD``."""
        raise NotImplementedError

    async def holds_blob(self, digest: Digest) -> bool:
        """Whether this repository can hand ``digest`` to a cross-repository mount."""
        raise NotImplementedError

    async def referrers(self, subject: Digest, artifact_type: str | None) -> list[dict[str, object]]:
        """Descriptors of the manifests whose subject is ``subject`` (OCI 1.1), unfiltered."""
        raise NotImplementedError

    async def tags(self) -> list[str] | None:
        """The repository's tags, in lexical order.

        ``None`` when every tag the repository had was deleted: CNCF Distribution 2.8
        answers ``"tags": null`` then, and we answer as it does.  A repository that never
        had a tag answers the spec's empty list.
        """
        metadata = self._ctx.store.metadata
        tags = await metadata.list_tags(self.key)
        if tags is None:
            raise RegistryError(
                "NAME_UNKNOWN", f"repository {self.name} is not known to this registry", detail={"name": self.name}
            )
        if not tags and await metadata.had_tags(self.key):
            return None
        return tags

    # writes: refused unless the repository takes them -------------------------------------
    # (they take the request's raw parameters: whether the repository may be written at all
    # is decided before they are parsed, so a mirrored name is refused the same way always)
    def refusal(self, *, deleting: bool = False) -> RegistryError:
        """Why a push or delete is refused here."""
        raise NotImplementedError

    async def start_upload(self) -> UploadState:
        """Open an upload session (POST without ``digest``)."""
        raise self.refusal()

    async def mount(self, digest_text: str, source: Repository | None) -> Digest | None:
        """Cross-repository mount of ``digest_text`` from ``source`` (``None``: no ``from``);
        ``None`` if it cannot be mounted (the client then uploads it)."""
        raise self.refusal()

    async def upload_status(self, upload_id: str) -> UploadState:
        """The size received so far (GET on the upload URL)."""
        raise self.refusal()

    async def append(self, upload_id: str, body: BinaryIO, length: int, content_range: str | None) -> UploadState:
        """Append a chunk (PATCH)."""
        raise self.refusal()

    async def finish(
        self, upload_id: str, digest_text: str | None, body: BinaryIO, length: int, content_range: str | None
    ) -> Digest:
        """Complete an upload (PUT ``?digest=``), with an optional last chunk."""
        raise self.refusal()

    async def monolithic(self, digest_text: str, body: BinaryIO, length: int) -> Digest:
        """POST with ``?digest=``: the whole blob in one request."""
        raise self.refusal()

    async def cancel(self, upload_id: str) -> None:
        """Cancel an upload session (DELETE on the upload URL)."""
        raise self.refusal()

    async def put_manifest(
        self, reference: str, content_type: str | None, data: bytes, extra_tags: Sequence[str] = ()
    ) -> PushedManifest:
        """Validate and store a pushed manifest, byte for byte, and tag it (``extra_tags``:
        the spec's ``?tag=`` parameters of a push by digest)."""
        raise self.refusal()

    async def delete_manifest(self, reference: str) -> None:
        """DELETE by digest: the manifest and every tag on it; by tag: only the tag."""
        raise self.refusal(deleting=True)

    async def delete_blob(self, digest_text: str) -> None:
        """DELETE a blob from the repository (its bytes go when GC finds them unreferenced)."""
        raise self.refusal(deleting=True)
