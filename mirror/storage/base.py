"""The store, split by concern: what the registry needs from the place content lives.

A :class:`Store` bundles five small interfaces, each with one job:

* :class:`BlobStore` — content by digest (manifests are blobs too).  Content becomes
  visible only whole and verified: small verified bytes with :meth:`BlobStore.put`,
  large ones through a :class:`BlobWriter` that spools locally, hashes as it goes and
  publishes on :meth:`BlobWriter.commit` only if the digest matches.  Reads hand out a
  :class:`~mirror.storage.sending.Responder` that streams itself to a request (the
  local-disk one by ``sendfile``).
* :class:`MetadataStore` — per repository: the manifests it holds (with their media
  types), its tags, the blobs a hosted repository holds, and referrers.
* :class:`UploadStore` — push sessions: bytes received so far, committed by digest into
  the blob store.
* :class:`AccessRecord` — when each blob was last read (eviction is by it).  Its own
  interface because only a filesystem can keep it in file times.
* :class:`GcLock` — garbage collection's exclusive hold against writers that make
  existing blobs referenced again (mounts, manifest pushes, imports), which hold it shared.

and the node's :class:`Spool`, the local scratch space writers use before content is
verified.

Every method is asynchronous, so a backend on the network (object storage) fits without
blocking the reactor; the filesystem backend reads a small file (a tag, a link) at once,
and writes, deletes and lists in threads.
:func:`mirror.storage.open_store` builds a store from configuration; nothing else
constructs one.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, BinaryIO, Protocol

import attrs

from mirror.core.oci import Digest
from mirror.storage.sending import Responder, Source

if TYPE_CHECKING:
    from mirror.storage.spool import FillNote, Orphan

__all__ = [
    "AccessRecord",
    "BlobInfo",
    "BlobStore",
    "BlobWriter",
    "DigestMismatch",
    "GcLock",
    "LeaseStore",
    "MetadataStore",
    "RepositoryRecord",
    "Spool",
    "Store",
    "UploadStore",
]


class DigestMismatch(Exception):
    """Written bytes do not hash to the digest they were meant to have."""

    def __init__(self, expected: Digest, actual: Digest, size: int) -> None:
        super().__init__(f"expected {expected}, got {actual} over {size} bytes")
        self.expected = expected
        self.actual = actual
        self.size = size


@attrs.frozen
class BlobInfo:
    """A stored blob as garbage collection sees it."""

    digest: Digest
    size: int
    modified: float  # when written (on a filesystem also when last read: see AccessRecord)


@attrs.frozen
class RepositoryRecord:
    """Everything a repository holds, for garbage collection."""

    manifests: dict[Digest, float]  # digest -> when linked
    tags: dict[str, Digest]
    blob_links: set[Digest]  # pushed or mounted (hosted)
    fetched_links: set[Digest] = attrs.field(factory=set)  # fetched or confirmed upstream (mirrored)


class BlobWriter(Protocol):
    """A blob being written: spooled locally, hashed, visible only once committed."""

    @property
    def size(self) -> int:
        """Bytes written so far."""

    def hash_also(self, digest: Digest) -> None:
        """Also hash with ``digest``'s algorithm when it is not sha256 (before writing)."""

    def note(self, note: FillNote) -> None:
        """Record what this is the fill of, so that a restarted process can resume it."""

    def write(self, *chunks: bytes) -> None:
        """Append ``chunks`` to the spool and hash them (blocking: callers batch it in a thread)."""

    def actual_digest(self, algorithm: str = "sha256") -> Digest:
        """The digest of what was written so far."""

    def follow(self, source: Source, size: int | None) -> Responder:
        """A responder over the bytes written so far, following ``source`` as it grows."""

    async def commit(self, expected: Digest) -> None:
        """Verify against ``expected``, make durable, and publish under that digest.

        On a mismatch it discards the bytes and raises :class:`DigestMismatch`.
        """

    def abort(self) -> None:
        """Discard what was written.  Safe to call more than once, and after commit."""


class BlobStore(Protocol):
    """Content by digest."""

    async def stat(self, digest: Digest) -> int | None:
        """The size of a stored blob, or ``None`` if it is not stored."""

    async def open(self, digest: Digest) -> Responder | None:
        """A responder streaming a stored blob, or ``None`` if it is not stored."""

    async def read(self, digest: Digest, max_size: int) -> bytes | None:
        """A small stored blob's bytes (a manifest), or ``None`` if absent or too big."""

    @property
    def redirects(self) -> bool:
        """Whether :meth:`redirect` gives URLs at all (checked before anything is asked)."""

    async def redirect(self, digest: Digest) -> str | None:
        """A URL a client may fetch stored blob ``digest`` from directly, for a while
        (object storage configured to redirect); ``None`` when this store serves its blobs
        itself, or does not hold ``digest``."""

    async def put(self, digest: Digest, data: bytes) -> None:
        """Store small, already verified bytes under ``digest`` (durably); an existing blob
        counts as just written (garbage collection's grace period)."""

    def writer(self, adopt: Orphan | None = None) -> BlobWriter:
        """A writer for a new blob; or, with ``adopt``, for a dead process's unfinished
        one, to be written on from its end (its bytes are hashed again: blocking, so a
        caller adopting runs this in a thread)."""

    async def scan(self) -> list[BlobInfo]:
        """Every stored blob (garbage collection's inventory)."""

    async def delete_if_idle(self, digest: Digest, idle_before: float) -> int | None:
        """Delete a blob not written or read since ``idle_before``; the bytes freed, or
        ``None`` if it was kept or absent.  Call it holding :meth:`GcLock.exclusive`."""


class Spool(Protocol):
    """This node's scratch space, where writers put content before it is verified."""

    def take_orphans(self) -> list[Orphan]:
        """Dead processes' unfinished fills that can be resumed, taken for this process
        (before :meth:`clean`)."""

    async def clean(self) -> int:
        """Remove partial writes left by dead processes (never one a live process sharing
        the store is writing, nor one taken to resume); how many."""

    async def check_writable(self) -> str | None:
        """``None`` when new content can be taken, else why not (readiness)."""


class MetadataStore(Protocol):
    """What each repository holds: manifests, tags, blob links, referrers."""

    async def link_manifest(self, repo: str, digest: Digest, media_type: str) -> None:
        """Record that ``repo`` holds manifest ``digest`` of ``media_type``."""

    async def manifest_media_type(self, repo: str, digest: Digest) -> str | None:
        """The media type of a manifest ``repo`` holds, or ``None``."""

    async def list_manifests(self, repo: str) -> list[Digest]:
        """The manifests ``repo`` holds."""

    async def unlink_manifest(self, repo: str, digest: Digest) -> bool:
        """Drop ``repo``'s link to a manifest; False if it had none."""

    async def set_tag(self, repo: str, tag: str, digest: Digest) -> None:
        """Point ``repo:tag`` at manifest ``digest``."""

    async def get_tag(self, repo: str, tag: str) -> Digest | None:
        """The manifest digest ``repo:tag`` points at, or ``None``."""

    async def tag_record(self, repo: str, tag: str) -> tuple[Digest, float] | None:
        """The digest ``repo:tag`` points at and when it was last set (by any process
        sharing the store: a mirrored tag is set each time its upstream confirms it)."""

    async def delete_tag(self, repo: str, tag: str) -> None:
        """Remove ``repo:tag`` if present."""

    async def list_tags(self, repo: str) -> list[str] | None:
        """The repository's tags, sorted; ``None`` when the store has no such repository."""

    async def had_tags(self, repo: str) -> bool:
        """Whether ``repo`` ever held a tag (its tags may all be deleted since)."""

    async def link_blob(self, repo: str, digest: Digest, *, fetched: bool = False) -> None:
        """Record (durably) that ``repo`` holds blob ``digest``: pushed or mounted into a
        hosted repository, or (``fetched``) fetched from or confirmed by the upstream of a
        mirrored one.  The two kinds are kept apart: only pushed content is never evicted."""

    async def has_blob_link(self, repo: str, digest: Digest, *, fetched: bool = False) -> bool:
        """Whether ``repo`` holds blob ``digest`` by a link of that kind."""

    async def unlink_blob(self, repo: str, digest: Digest) -> bool:
        """Drop ``repo``'s links to a blob (the bytes stay until GC); False if none."""

    async def add_referrer(self, repo: str, subject: Digest, descriptor: Mapping[str, object]) -> None:
        """Record that the manifest ``descriptor`` describes refers to ``subject``."""

    async def referrers(self, repo: str, subject: Digest) -> list[dict[str, object]]:
        """Descriptors of ``repo``'s manifests whose subject is ``subject``."""

    async def remove_referrer(self, repo: str, subject: Digest, digest: Digest) -> None:
        """Forget that manifest ``digest`` refers to ``subject``."""

    async def repositories(self, after: str | None = None, limit: int | None = None) -> list[str]:
        """The repositories holding (or that held) a manifest, a tag or a pushed blob, in
        lexical order: those whose names sort after ``after`` (all without), at most
        ``limit`` of them (all without)."""

    async def scan_repository(self, repo: str) -> RepositoryRecord:
        """Everything ``repo`` holds (garbage collection's inventory)."""


class UploadStore(Protocol):
    """Push sessions (the spec's blob uploads)."""

    async def create(self, repo: str) -> str:
        """Start an upload session for ``repo``; returns its id (a UUID)."""

    async def repository_of(self, upload_id: str) -> str | None:
        """The repository an upload session belongs to, or ``None`` if unknown."""

    async def size(self, upload_id: str) -> int:
        """Bytes received so far."""

    async def append(self, upload_id: str, source: BinaryIO) -> int:
        """Append all of ``source``; returns the new size."""

    async def commit(self, upload_id: str, expected: Digest) -> int:
        """Verify, make durable and publish the upload as blob ``expected``; its size.

        Raises :class:`DigestMismatch` (and discards the upload) when it does not match.
        """

    async def delete(self, upload_id: str) -> None:
        """Discard an upload session."""

    async def stale(self, idle_since: float) -> list[str]:
        """Ids of upload sessions with no activity since ``idle_since``."""


class AccessRecord(Protocol):
    """When blobs were last read."""

    async def record(self, accessed: Mapping[Digest, float]) -> None:
        """Record last-read times; a time earlier than the one recorded changes nothing.

        Visible to :meth:`BlobStore.delete_if_idle` once this returns (writers that hold
        garbage collection off rely on that); not necessarily durable (no fsync).
        """

    async def snapshot(self) -> Mapping[Digest, float]:
        """Recorded reads not already reflected in :attr:`BlobInfo.modified`."""


class LeaseStore(Protocol):
    """Named leases in a store several nodes share: who does a piece of work for all."""

    async def acquire(self, name: str, holder: str, ttl: float) -> str | None:
        """Take lease ``name`` for ``holder`` for ``ttl`` seconds (or take over an expired
        one, or ``holder``'s own from before a restart).  ``None`` when taken; else the
        holder of the live lease."""

    async def renew(self, name: str, holder: str, ttl: float) -> None:
        """Extend ``holder``'s lease by ``ttl`` seconds from now."""

    async def release(self, name: str, holder: str) -> None:
        """Give up ``holder``'s lease (nothing if another holds it now)."""


class GcLock(Protocol):
    """Garbage collection (exclusive) against writers that reference existing blobs (shared)."""

    def exclusive(self) -> AbstractAsyncContextManager[None]:
        """Held by GC while it deletes a batch of blobs."""

    async def try_shared(self) -> object | None:
        """A shared hold, or ``None`` while GC deletes (try again shortly)."""

    async def release(self, handle: object) -> None:
        """Release a hold from :meth:`try_shared`."""


@attrs.frozen
class Store:
    """One store: its five concerns, and where it is (for logs).  ``leases`` is there when
    the store can be shared by several nodes (object storage), else ``None``."""

    blobs: BlobStore
    metadata: MetadataStore
    uploads: UploadStore
    access: AccessRecord
    gc_lock: GcLock
    spool: Spool
    description: str
    leases: LeaseStore | None = None
