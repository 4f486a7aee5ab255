"""A hosted repository: the private registry's side, answered from the store only.

Reads never ask an upstream: a manifest or blob the repository does not hold is unknown.
Writes — blob uploads (:mod:`mirror.registry.uploads`), cross-repository mounts,
manifest pushes and deletes — are checked against the policy first: the registry must
not be read-only, and deletes must be enabled.  Content becomes visible only whole and
verified: uploads are committed by digest, and a manifest is accepted only when every
blob and child manifest it names is already in the repository.  Writes that make
existing blobs referenced again coordinate with garbage collection
(:func:`mirror.registry.gc.holding_off_gc`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

from twisted.logger import Logger

from mirror.core.errors import RegistryError
from mirror.core.manifest import parse_manifest
from mirror.core.oci import Digest, Reference, parse_digest, parse_reference, validate_tag
from mirror.core.routing import Route
from mirror.registry.gc import holding_off_gc
from mirror.registry.repository import BlobBody, Context, PushedManifest, Repository, StoredManifest, UploadState
from mirror.registry.uploads import UploadSessions

__all__ = ["HostedRepository"]


class HostedRepository(Repository):
    """A repository this registry hosts (see the module docstring)."""

    _log = Logger()

    def __init__(self, name: str, route: Route, context: Context, uploads: UploadSessions) -> None:
        super().__init__(name, route, context)
        self._uploads = uploads

    # policy -------------------------------------------------------------------------------
    def refusal(self, *, deleting: bool = False) -> RegistryError:
        if self._ctx.config.read_only:
            return RegistryError("UNSUPPORTED", "the registry is in read-only mode: pushes and deletes are refused")
        if deleting:
            return RegistryError("UNSUPPORTED", "deletes are disabled in this registry's configuration")
        return RegistryError("UNSUPPORTED", f"this operation is not supported on {self.name}")

    def _writable(self, *, deleting: bool = False) -> None:
        config = self._ctx.config
        if config.read_only or (deleting and not config.delete):
            raise self.refusal(deleting=deleting)

    # reads --------------------------------------------------------------------------------
    async def _resolve_manifest(self, ref: Reference, accept: Sequence[str]) -> StoredManifest:
        digest = ref.digest
        if digest is None:
            assert ref.tag is not None
            digest = await self._ctx.store.metadata.get_tag(self.key, ref.tag)
        manifest = await self._ctx.local.manifest(self.key, digest) if digest is not None else None
        if manifest is None:
            raise RegistryError(
                "MANIFEST_UNKNOWN",
                f"manifest {self.name}:{ref} is not in this registry",
                detail={"name": self.name, "reference": str(ref)},
            )
        return manifest

    def _blob_unknown(self, digest: Digest) -> RegistryError:
        return RegistryError("BLOB_UNKNOWN", f"blob {digest} is not in repository {self.key}", detail={"digest": str(digest)})

    async def get_blob(self, digest: Digest, *, wait_until_stored: bool = False) -> BlobBody:
        body = await self._ctx.local.blob(digest) if await self.holds_blob(digest) else None
        if body is None:
            raise self._blob_unknown(digest)
        self._ctx.events.cache("blob", self.route, str(digest), "hit")
        return body

    async def blob_size(self, digest: Digest) -> int:
        size = await self._ctx.store.blobs.stat(digest) if await self.holds_blob(digest) else None
        if size is None:
            raise self._blob_unknown(digest)
        self._ctx.events.cache("blob", self.route, str(digest), "hit")
        return size

    async def holds_blob(self, digest: Digest) -> bool:
        return await self._ctx.store.metadata.has_blob_link(self.key, digest)

    async def _holds_stored(self, digest: Digest) -> bool:
        return await self.holds_blob(digest)

    async def referrers(self, subject: Digest, artifact_type: str | None) -> list[dict[str, object]]:
        return await self._ctx.store.metadata.referrers(self.key, subject)

    # uploads ------------------------------------------------------------------------------
    async def start_upload(self) -> UploadState:
        self._writable()
        return await self._uploads.start(self.key)

    async def mount(self, digest_text: str, source: Repository | None) -> Digest | None:
        self._writable()
        try:
            digest = parse_digest(digest_text)
        except RegistryError:
            return None
        # Only from a repository the caller may read (checked by the web layer) that holds
        # the digest: a digest alone grants nothing.  No ``from``: no mount (the spec's
        # fallback, an upload session).
        if source is None or not await source.holds_blob(digest):
            return None
        store = self._ctx.store

        async def link() -> Digest | None:
            await store.access.record({digest: self._ctx.clock.seconds()})
            if await store.blobs.stat(digest) is None:
                return None
            await store.metadata.link_blob(self.key, digest)
            return digest

        return await holding_off_gc(store.gc_lock, self._ctx.clock, link)

    async def upload_status(self, upload_id: str) -> UploadState:
        self._writable()
        return await self._uploads.status(self.key, upload_id)

    async def append(self, upload_id: str, body: BinaryIO, length: int, content_range: str | None) -> UploadState:
        self._writable()
        return await self._uploads.append(self.key, upload_id, body, length, content_range)

    async def finish(
        self, upload_id: str, digest_text: str | None, body: BinaryIO, length: int, content_range: str | None
    ) -> Digest:
        self._writable()
        await self._uploads.check(self.key, upload_id)
        if not digest_text:
            raise RegistryError("DIGEST_INVALID", "the digest parameter is required to complete an upload")
        digest = parse_digest(digest_text)
        size = await self._uploads.finish(self.key, upload_id, digest, body, length, content_range)
        await self._ctx.store.metadata.link_blob(self.key, digest)
        self._log.info("pushed blob {repository}@{digest} ({bytes} bytes)", repository=self.key, digest=str(digest), bytes=size)
        return digest

    async def monolithic(self, digest_text: str, body: BinaryIO, length: int) -> Digest:
        self._writable()
        parse_digest(digest_text)
        state = await self._uploads.start(self.key)
        try:
            return await self.finish(state.upload_id, digest_text, body, length, None)
        finally:
            await self._uploads.discard(state.upload_id)

    async def cancel(self, upload_id: str) -> None:
        self._writable()
        await self._uploads.cancel(self.key, upload_id)

    # manifests ----------------------------------------------------------------------------
    async def put_manifest(
        self, reference: str, content_type: str | None, data: bytes, extra_tags: Sequence[str] = ()
    ) -> PushedManifest:
        self._writable()
        ref = parse_reference(reference)
        tags = [ref.tag] if ref.tag is not None else [validate_tag(t) for t in extra_tags]
        limit = self._ctx.config.max_manifest_size
        if len(data) > limit:
            raise RegistryError("MANIFEST_INVALID", f"manifest of {len(data)} bytes is over the limit of {limit}", status=413)
        manifest = parse_manifest(data, content_type, push=True)
        digest = Digest.of(data, ref.digest.algorithm if ref.digest is not None else "sha256")
        if ref.digest is not None and ref.digest != digest:
            raise RegistryError(
                "DIGEST_INVALID", f"manifest body is {digest}, not {ref.digest}", detail={"digest": str(ref.digest)}
            )
        store = self._ctx.store

        async def store_it() -> None:
            await store.access.record(dict.fromkeys(manifest.references(), self._ctx.clock.seconds()))
            missing = []
            for child in manifest.children:
                if (
                    await store.metadata.manifest_media_type(self.key, child.digest) is None
                    or await store.blobs.stat(child.digest) is None
                ):
                    missing.append(child.digest)
            for blob in manifest.blobs:  # a subject may be pushed later; foreign layers live at their urls
                if not await store.metadata.has_blob_link(self.key, blob.digest) or await store.blobs.stat(blob.digest) is None:
                    missing.append(blob.digest)
            if missing:
                raise RegistryError(
                    "MANIFEST_BLOB_UNKNOWN",
                    f"manifest references {len(missing)} blob(s) or manifest(s) not in {self.name}: "
                    f"{', '.join(map(str, missing[:5]))}",
                    detail={"digest": str(missing[0])},
                )
            await store.blobs.put(digest, data)
            await store.metadata.link_manifest(self.key, digest, manifest.media_type)
            if manifest.subject is not None:
                await store.metadata.add_referrer(
                    self.key, manifest.subject.digest, manifest.referrer_descriptor(digest, len(data))
                )
            for tag in tags:
                await store.metadata.set_tag(self.key, tag, digest)

        await holding_off_gc(store.gc_lock, self._ctx.clock, store_it)
        self._log.info(
            "pushed manifest {repository}:{reference} = {digest} ({media_type})",
            repository=self.key,
            reference=reference,
            digest=str(digest),
            media_type=manifest.media_type,
        )
        return PushedManifest(
            digest, manifest.subject.digest if manifest.subject else None, tuple(tags) if ref.tag is None else ()
        )

    async def delete_manifest(self, reference: str) -> None:
        self._writable(deleting=True)
        ref = parse_reference(reference)
        metadata = self._ctx.store.metadata
        if ref.tag is not None:
            if await metadata.get_tag(self.key, ref.tag) is None:
                raise RegistryError("MANIFEST_UNKNOWN", f"tag {self.name}:{ref.tag} does not exist")
            await metadata.delete_tag(self.key, ref.tag)
            return
        digest = ref.digest
        assert digest is not None
        if await metadata.manifest_media_type(self.key, digest) is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest {self.name}@{digest} does not exist")
        for tag in await metadata.list_tags(self.key) or []:
            if await metadata.get_tag(self.key, tag) == digest:
                await metadata.delete_tag(self.key, tag)
        data = await self._ctx.store.blobs.read(digest, self._ctx.config.max_manifest_size)
        if data is not None:
            try:
                subject = parse_manifest(data).subject
            except RegistryError:
                subject = None
            if subject is not None:
                await metadata.remove_referrer(self.key, subject.digest, digest)
        await metadata.unlink_manifest(self.key, digest)
        self._log.info("deleted manifest {repository}@{digest}", repository=self.key, digest=str(digest))

    async def delete_blob(self, digest_text: str) -> None:
        self._writable(deleting=True)
        digest = parse_digest(digest_text)
        if not await self._ctx.store.metadata.unlink_blob(self.key, digest):
            raise RegistryError("BLOB_UNKNOWN", f"blob {digest} is not in {self.name}", detail={"digest": str(digest)})
