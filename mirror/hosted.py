"""Writes to hosted repositories: blob uploads, manifest pushes and deletes.

Reads of hosted repositories go through :class:`~mirror.service.MirrorService` like any
other (it serves them from the store and never asks an upstream); this module is the
other half of the private registry.  Every write checks the policy first: the name must
match a ``hosted`` pattern, the registry must not be read-only, and deletes must be
enabled.  Content becomes visible only whole and verified: uploads are committed by
digest (:meth:`~mirror.store.Store.commit_upload`), and a manifest is accepted only when
every blob and child manifest it names is already in the repository.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import BinaryIO, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mirror.errors import RegistryError
from mirror.oci import (
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    is_index,
    manifest_references,
    parse_digest,
    parse_manifest,
    parse_reference,
    validate_tag,
)
from mirror.routing import Route
from mirror.service import MirrorService
from mirror.store import DigestMismatch

__all__ = ["HostedRegistry", "PushedManifest", "UploadState"]

T = TypeVar("T")

_CONTENT_RANGE_RE = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?")


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


class HostedRegistry:
    """Uploads, manifest pushes and deletes for hosted repositories.

    Args:
        reads: the read side; its config, routing and store are shared.
        run_blocking: runs a blocking store call in a thread; returns a Deferred.
    """

    _log = Logger()

    def __init__(self, reads: MirrorService, run_blocking: Callable[..., Deferred[object]]) -> None:
        self._reads = reads
        self._run_blocking = run_blocking
        self._locks: dict[str, DeferredLock] = {}

    @property
    def store(self):  # noqa: ANN201 - the Store protocol
        return self._reads.store

    # policy -------------------------------------------------------------------------------
    def writable(self, name: str, ns: str | None, *, deleting: bool = False) -> Route:
        """Route ``name`` and check that it may be written (pushed to, or deleted from)."""
        config = self._reads.config
        r = self._reads.route(name, ns)
        if not r.hosted:
            assert r.upstream is not None
            patterns = ", ".join(config.hosted) or "none configured"
            raise RegistryError(
                "DENIED",
                f"repository {name} is mirrored from {r.upstream.registry} and read-only here; "
                f"pushes and deletes go to hosted repositories (hosted patterns: {patterns})",
            )
        if config.read_only:
            raise RegistryError("UNSUPPORTED", "the registry is in read-only mode: pushes and deletes are refused")
        if deleting and not config.delete:
            raise RegistryError("UNSUPPORTED", "deletes are disabled in this registry's configuration")
        return r

    def _lock(self, upload_id: str) -> DeferredLock:
        return self._locks.setdefault(upload_id, DeferredLock())

    # uploads ------------------------------------------------------------------------------
    async def start_upload(self, name: str, ns: str | None) -> UploadState:
        """Open an upload session (POST without ``digest``)."""
        r = self.writable(name, ns)
        upload_id = self.store.create_upload(r.repo_key)
        return UploadState(r.repo_key, upload_id, 0)

    async def _gc_safe(self, work: Callable[[], T]) -> T:
        """Run ``work`` holding the shared side of the store's GC lock.

        Work that makes existing blobs referenced (a mount, a manifest push) touches them
        under this lock first, so a concurrent GC either deleted them already (and the
        push sees them missing) or sees them as just used and keeps them.
        """
        for _ in range(1000):
            handle = self.store.try_push_lock()
            if handle is not None:
                try:
                    return work()
                finally:
                    self.store.release_lock(handle)
            await deferLater(self._reads.clock, 0.01, lambda: None)
        raise RegistryError("UNAVAILABLE", "garbage collection is holding the store; retry shortly")

    async def mount(self, name: str, ns: str | None, digest_text: str, from_name: str | None) -> Digest | None:
        """Cross-repository mount: link an existing blob; ``None`` if it cannot be mounted."""
        r = self.writable(name, ns)
        try:
            digest = parse_digest(digest_text)
        except RegistryError:
            return None
        if from_name is not None:
            try:
                source = self._reads.route(from_name, None)
            except RegistryError:
                return None
            if source.hosted and not self.store.has_blob_link(source.repo_key, digest):
                return None

        def link() -> Digest | None:
            self.store.touch([(digest, self._reads.clock.seconds())])
            if self.store.blob_size(digest) is None:
                return None
            self.store.link_blob(r.repo_key, digest)
            return digest

        return await self._gc_safe(link)

    def _session(self, name: str, ns: str | None, upload_id: str) -> Route:
        r = self.writable(name, ns)
        if self.store.upload_repo(upload_id) != r.repo_key:
            raise RegistryError("BLOB_UPLOAD_UNKNOWN", f"upload {upload_id[:64]!r} is not known to this registry")
        return r

    def upload_state(self, name: str, ns: str | None, upload_id: str) -> UploadState:
        """The size received so far (GET on the upload URL)."""
        r = self._session(name, ns, upload_id)
        return UploadState(r.repo_key, upload_id, self.store.upload_size(upload_id))

    async def append(
        self, name: str, ns: str | None, upload_id: str, body: BinaryIO, length: int, content_range: str | None
    ) -> UploadState:
        """Append a chunk (PATCH).  An out-of-order ``Content-Range`` is a 416."""
        r = self._session(name, ns, upload_id)
        async with self._lock(upload_id):
            size = self.store.upload_size(upload_id)
            self._check_range(content_range, size, length, upload_id, r)
            if length:
                size = await self._run_blocking(self.store.append_upload, upload_id, body)
        return UploadState(r.repo_key, upload_id, size)

    def _check_range(self, content_range: str | None, size: int, length: int, upload_id: str, r: Route) -> None:
        if content_range is None:
            return
        match = _CONTENT_RANGE_RE.fullmatch(content_range.strip())
        ok = match is not None and int(match.group(1)) == size and int(match.group(2)) - int(match.group(1)) + 1 == length
        if not ok:
            raise RegistryError(
                "BLOB_UPLOAD_INVALID",
                f"Content-Range {content_range[:64]!r} does not continue the upload at byte {size} with {length} bytes",
                status=416,
                headers={
                    "Range": f"0-{max(size - 1, 0)}",
                    "Location": upload_location(r.repo_key, upload_id),
                    "Docker-Upload-UUID": upload_id,
                },
            )

    async def finish(
        self, name: str, ns: str | None, upload_id: str, digest_text: str | None, body: BinaryIO, length: int, content_range: str | None
    ) -> Digest:
        """Complete an upload (PUT ``?digest=``), with an optional last chunk."""
        r = self._session(name, ns, upload_id)
        if not digest_text:
            raise RegistryError("DIGEST_INVALID", "the digest parameter is required to complete an upload")
        digest = parse_digest(digest_text)
        async with self._lock(upload_id):
            self._check_range(content_range, self.store.upload_size(upload_id), length, upload_id, r)
            if length:
                await self._run_blocking(self.store.append_upload, upload_id, body)
            try:
                size = await self._run_blocking(self.store.commit_upload, upload_id, digest)
            except DigestMismatch as e:
                raise RegistryError(
                    "DIGEST_INVALID", f"uploaded content is {e.actual}, not {digest}; nothing was stored", detail={"digest": str(digest)}
                ) from None
            finally:
                self._locks.pop(upload_id, None)
        self.store.link_blob(r.repo_key, digest)
        self._log.info("pushed blob {repository}@{digest} ({bytes} bytes)", repository=r.repo_key, digest=str(digest), bytes=size)
        return digest

    async def monolithic(self, name: str, ns: str | None, digest_text: str, body: BinaryIO, length: int) -> Digest:
        """POST with ``?digest=``: the whole blob in one request."""
        r = self.writable(name, ns)
        parse_digest(digest_text)
        upload_id = self.store.create_upload(r.repo_key)
        try:
            return await self.finish(name, ns, upload_id, digest_text, body, length, None)
        finally:
            self.store.delete_upload(upload_id)

    def cancel(self, name: str, ns: str | None, upload_id: str) -> None:
        """Cancel an upload session (DELETE on the upload URL)."""
        self._session(name, ns, upload_id)
        self.store.delete_upload(upload_id)
        self._locks.pop(upload_id, None)

    def expire_uploads(self) -> int:
        """Remove upload sessions idle for longer than ``upload_expiry``."""
        idle_since = self._reads.clock.seconds() - self._reads.config.upload_expiry
        stale = [u for u in self.store.stale_uploads(idle_since) if u not in self._locks]
        for upload_id in stale:
            self.store.delete_upload(upload_id)
        if stale:
            self._log.info("removed {count} abandoned upload sessions", count=len(stale))
        return len(stale)

    # manifests ----------------------------------------------------------------------------
    async def put_manifest(
        self, name: str, ns: str | None, reference: str, content_type: str | None, data: bytes, extra_tags: Sequence[str] = ()
    ) -> PushedManifest:
        """Validate and store a pushed manifest, byte for byte, and tag it.

        ``extra_tags`` are the spec's ``?tag=`` parameters of a push by digest.
        """
        r = self.writable(name, ns)
        ref = parse_reference(reference)
        tags = [ref.tag] if ref.tag is not None else [validate_tag(t) for t in extra_tags]
        limit = self._reads.config.max_manifest_size
        if len(data) > limit:
            raise RegistryError("MANIFEST_INVALID", f"manifest of {len(data)} bytes is over the limit of {limit}", status=413)
        doc = parse_manifest(data)
        media_type = _pushed_media_type(content_type, doc)
        digest = Digest.of(data, ref.digest.algorithm if ref.digest is not None else "sha256")
        if ref.digest is not None and ref.digest != digest:
            raise RegistryError("DIGEST_INVALID", f"manifest body is {digest}, not {ref.digest}", detail={"digest": str(ref.digest)})
        references = list(manifest_references(doc))
        subject = next((target for role, target in references if role == "subject"), None)

        def store() -> None:
            now = self._reads.clock.seconds()
            self.store.touch([(target, now) for role, target in references if role != "subject"])
            missing = []
            for role, target in references:
                if role in ("subject", "foreign"):
                    continue  # a subject may be pushed later; foreign layers live at their urls
                if role == "manifest":
                    if self.store.manifest_media_type(r.repo_key, target) is None or self.store.blob_size(target) is None:
                        missing.append(target)
                elif not self.store.has_blob_link(r.repo_key, target) or self.store.blob_size(target) is None:
                    missing.append(target)
            if missing:
                raise RegistryError(
                    "MANIFEST_BLOB_UNKNOWN",
                    f"manifest references {len(missing)} blob(s) or manifest(s) not in {name}: {', '.join(map(str, missing[:5]))}",
                    detail={"digest": str(missing[0])},
                )
            self.store.put_blob(digest, data)
            self.store.link_manifest(r.repo_key, digest, media_type)
            if subject is not None:
                self.store.add_referrer(r.repo_key, subject, _descriptor(doc, media_type, digest, len(data)))
            for tag in tags:
                self.store.set_tag(r.repo_key, tag, digest)

        await self._gc_safe(store)
        self._log.info(
            "pushed manifest {repository}:{reference} = {digest} ({media_type})",
            repository=r.repo_key, reference=reference, digest=str(digest), media_type=media_type,
        )
        return PushedManifest(digest, subject, tuple(tags) if ref.tag is None else ())

    def delete_manifest(self, name: str, ns: str | None, reference: str) -> None:
        """DELETE by digest: the manifest and every tag on it; by tag: only the tag."""
        r = self.writable(name, ns, deleting=True)
        ref = parse_reference(reference)
        if ref.tag is not None:
            if self.store.get_tag(r.repo_key, ref.tag) is None:
                raise RegistryError("MANIFEST_UNKNOWN", f"tag {name}:{ref.tag} does not exist")
            self.store.delete_tag(r.repo_key, ref.tag)
            return
        digest = ref.digest
        assert digest is not None
        media_type = self.store.manifest_media_type(r.repo_key, digest)
        if media_type is None:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest {name}@{digest} does not exist")
        for tag in self.store.list_tags(r.repo_key) or []:
            if self.store.get_tag(r.repo_key, tag) == digest:
                self.store.delete_tag(r.repo_key, tag)
        data = self.store.read_blob(digest, self._reads.config.max_manifest_size)
        if data is not None:
            subject = next((t for role, t in _safe_references(data) if role == "subject"), None)
            if subject is not None:
                self.store.remove_referrer(r.repo_key, subject, digest)
        self.store.unlink_manifest(r.repo_key, digest)
        self._log.info("deleted manifest {repository}@{digest}", repository=r.repo_key, digest=str(digest))

    def delete_blob(self, name: str, ns: str | None, digest_text: str) -> None:
        """DELETE a blob from a repository (its bytes go when GC finds them unreferenced)."""
        r = self.writable(name, ns, deleting=True)
        digest = parse_digest(digest_text)
        if not self.store.unlink_blob(r.repo_key, digest):
            raise RegistryError("BLOB_UNKNOWN", f"blob {digest} is not in {name}", detail={"digest": str(digest)})


def upload_location(repo: str, upload_id: str) -> str:
    """The upload URL of a session (relative, as the spec allows)."""
    return f"/v2/{repo}/blobs/uploads/{upload_id}"


def _safe_references(data: bytes) -> list[tuple[str, Digest]]:
    try:
        return list(manifest_references(parse_manifest(data)))
    except RegistryError:
        return []


def _pushed_media_type(content_type: str | None, doc: dict[str, object]) -> str:
    """The media type a pushed manifest is stored and served with.

    The ``Content-Type`` when it names a manifest type (and agrees with the document's
    ``mediaType`` field, if any); else the field; else OCI, inferred from the shape.
    """
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    field = doc.get("mediaType")
    if field is not None and not isinstance(field, str):
        raise RegistryError("MANIFEST_INVALID", "mediaType is not a string")
    if declared in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED) or field in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
        raise RegistryError("MANIFEST_INVALID", "Docker schema 1 manifests are not accepted; push schema 2 or OCI")
    if declared in MANIFEST_MEDIA_TYPES:
        if field is not None and field != declared:
            raise RegistryError("MANIFEST_INVALID", f"Content-Type {declared} does not match the manifest's mediaType {field}")
        media_type = declared
    elif field in MANIFEST_MEDIA_TYPES:
        media_type = field
    elif "manifests" in doc:
        media_type = OCI_INDEX
    elif "config" in doc or "layers" in doc:
        media_type = OCI_MANIFEST
    else:
        raise RegistryError("MANIFEST_INVALID", f"not a manifest of a known type (Content-Type {declared or 'missing'})")
    if doc.get("schemaVersion") != 2:
        raise RegistryError("MANIFEST_INVALID", "schemaVersion must be 2")
    if is_index(media_type) and not isinstance(doc.get("manifests"), list):
        raise RegistryError("MANIFEST_INVALID", "an index needs a manifests list")
    if not is_index(media_type) and not isinstance(doc.get("config"), dict):
        raise RegistryError("MANIFEST_INVALID", "an image manifest needs a config descriptor")
    return media_type


def _descriptor(doc: dict[str, object], media_type: str, digest: Digest, size: int) -> dict[str, object]:
    """The descriptor of a manifest as listed by the referrers API."""
    descriptor: dict[str, object] = {"mediaType": media_type, "digest": str(digest), "size": size}
    artifact_type = doc.get("artifactType")
    if artifact_type is None and isinstance(doc.get("config"), dict):
        artifact_type = doc["config"].get("mediaType")  # type: ignore[union-attr]
    if isinstance(artifact_type, str):
        descriptor["artifactType"] = artifact_type
    if isinstance(doc.get("annotations"), dict):
        descriptor["annotations"] = doc["annotations"]
    return descriptor
