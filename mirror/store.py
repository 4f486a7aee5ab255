"""The store interface: what the registry needs from the place content lives.

It is small on purpose: content-addressed blobs (manifests are blobs too), and per
repository the manifests it holds and its tags.  :class:`mirror.fsstore.FilesystemStore`
implements it on a local directory; an object-store implementation (several nodes
sharing one bucket) implements the same methods.  Writers always spool to a local
temporary file first, because content is verified before it becomes visible; readers of
a growing fill follow that spool file (:meth:`BlobWriter.open_spool`).

All methods are synchronous and quick on a local disk (metadata operations and small
files); the slow parts — fsync and renames of large files — are in
:meth:`BlobWriter.commit`, which callers run off the reactor thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol

from mirror.oci import Digest

__all__ = ["BlobWriter", "DigestMismatch", "Store"]


class DigestMismatch(Exception):
    """Written bytes do not hash to the digest they were meant to have."""

    def __init__(self, expected: Digest, actual: Digest, size: int) -> None:
        super().__init__(f"expected {expected}, got {actual} over {size} bytes")
        self.expected = expected
        self.actual = actual
        self.size = size


class BlobWriter(Protocol):
    """A blob being written: hashed as it is written, visible only once committed."""

    @property
    def size(self) -> int:
        """Bytes written so far."""

    def hash_also(self, digest: Digest) -> None:
        """Also hash with ``digest``'s algorithm when it is not sha256 (before writing)."""

    def write(self, data: bytes) -> None:
        """Append ``data`` (and hash it)."""

    def actual_digest(self, algorithm: str = "sha256") -> Digest:
        """The digest of what was written so far."""

    def open_spool(self) -> BinaryIO:
        """A new reader of the bytes written so far (for clients following a fill)."""

    def commit(self, expected: Digest) -> None:
        """Verify against ``expected``, make durable, and publish under that digest.

        Blocking (fsync, rename): run it in a thread.  On a mismatch it discards the
        bytes and raises :class:`DigestMismatch`.
        """

    def abort(self) -> None:
        """Discard what was written.  Safe to call more than once, and after commit."""


class Store(Protocol):
    """Where blobs, manifests and tags live."""

    # blobs -----------------------------------------------------------------------------
    def blob_size(self, digest: Digest) -> int | None:
        """The size of a stored blob, or ``None`` if it is not stored."""

    def open_blob(self, digest: Digest) -> BinaryIO | None:
        """A reader of a stored blob, or ``None`` if it is not stored."""

    def read_blob(self, digest: Digest, max_size: int) -> bytes | None:
        """A small stored blob's bytes (a manifest), or ``None`` if absent or too big."""

    def put_blob(self, digest: Digest, data: bytes) -> None:
        """Store small, already verified bytes under ``digest`` (durably)."""

    def new_writer(self) -> BlobWriter:
        """A writer for a new blob."""

    def touch(self, accessed: Iterable[tuple[Digest, float]]) -> None:
        """Record last-access times (the access record; no fsync)."""

    # repositories ----------------------------------------------------------------------
    def link_manifest(self, repo: str, digest: Digest, media_type: str) -> None:
        """Record that ``repo`` holds manifest ``digest`` of ``media_type``."""

    def manifest_media_type(self, repo: str, digest: Digest) -> str | None:
        """The media type of a manifest ``repo`` holds, or ``None``."""

    def set_tag(self, repo: str, tag: str, digest: Digest) -> None:
        """Point ``repo:tag`` at manifest ``digest``."""

    def get_tag(self, repo: str, tag: str) -> Digest | None:
        """The manifest digest ``repo:tag`` points at, or ``None``."""

    def delete_tag(self, repo: str, tag: str) -> None:
        """Remove ``repo:tag`` if present."""

    def list_tags(self, repo: str) -> list[str] | None:
        """The repository's tags, sorted; ``None`` when the store has no such repository."""

    def had_tags(self, repo: str) -> bool:
        """Whether ``repo`` ever held a tag (its tags may all be deleted since)."""

    def repositories(self) -> Iterator[str]:
        """Every repository holding a manifest or a tag, in lexical order."""

    def unlink_manifest(self, repo: str, digest: Digest) -> bool:
        """Drop ``repo``'s link to a manifest; False if it had none."""

    def link_blob(self, repo: str, digest: Digest) -> None:
        """Record (durably) that hosted ``repo`` holds blob ``digest``."""

    def has_blob_link(self, repo: str, digest: Digest) -> bool:
        """Whether ``repo`` holds blob ``digest``."""

    def unlink_blob(self, repo: str, digest: Digest) -> bool:
        """Drop ``repo``'s link to a blob (the bytes stay until GC); False if none."""

    def add_referrer(self, repo: str, subject: Digest, descriptor: dict[str, object]) -> None:
        """Record that the manifest ``descriptor`` describes refers to ``subject``."""

    def referrers(self, repo: str, subject: Digest) -> list[dict[str, object]]:
        """Descriptors of ``repo``'s manifests whose subject is ``subject``."""

    def remove_referrer(self, repo: str, subject: Digest, digest: Digest) -> None:
        """Forget that manifest ``digest`` refers to ``subject``."""

    # upload sessions (blocking methods: run them in a thread) ----------------------------
    def create_upload(self, repo: str) -> str:
        """Start an upload session for ``repo``; returns its id."""

    def upload_repo(self, upload_id: str) -> str | None:
        """The repository an upload session belongs to, or ``None`` if unknown."""

    def upload_size(self, upload_id: str) -> int:
        """Bytes received so far."""

    def append_upload(self, upload_id: str, source: BinaryIO) -> int:
        """Append all of ``source`` (blocking); returns the new size."""

    def commit_upload(self, upload_id: str, expected: Digest) -> int:
        """Verify, make durable and publish the upload as blob ``expected`` (blocking).

        Raises :class:`DigestMismatch` (and discards the upload) when it does not match.
        """

    def delete_upload(self, upload_id: str) -> None:
        """Discard an upload session."""

    def stale_uploads(self, idle_since: float) -> list[str]:
        """Ids of upload sessions with no activity since ``idle_since``."""

    # garbage collection (blocking; see mirror.gc) ----------------------------------------
    def scan_blobs(self) -> Iterator[tuple[Digest, int, float]]:
        """Every stored blob with its size and last access."""

    def scan_repository(self, repo: str) -> tuple[dict[Digest, float], dict[str, Digest], set[Digest]]:
        """A repository's manifest links (with when written), tags and blob links."""

    def delete_blob_if_idle(self, digest: Digest, idle_before: float) -> int | None:
        """Delete a blob not accessed or written since ``idle_before``; bytes freed or None."""

    def gc_lock(self) -> AbstractContextManager[None]:
        """Exclusive against pushes referencing existing blobs (see :mod:`mirror.gc`)."""

    def try_push_lock(self) -> object | None:
        """The shared side of the GC lock, or None while GC deletes."""

    def release_lock(self, handle: object) -> None:
        """Release a handle from :meth:`try_push_lock`."""
