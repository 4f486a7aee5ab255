"""Blob upload sessions of hosted repositories (the spec's POST / PATCH / PUT uploads).

Sessions live in the store (:class:`~mirror.storage.base.UploadStore`), so they survive
a restart.  This module adds what the protocol needs on top: a session belongs to one
repository, chunks must continue where the session stands (``Content-Range``; a 416
otherwise, and nothing is appended), one request at a time per session, the digest is
verified when the session is completed, and sessions idle for longer than
``upload_expiry`` are removed.
"""

from __future__ import annotations

import re
from typing import BinaryIO

from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mirror.core.errors import RegistryError
from mirror.core.oci import Digest
from mirror.registry.repository import UploadState
from mirror.storage.base import DigestMismatch, UploadStore

__all__ = ["UploadSessions", "upload_location"]

_CONTENT_RANGE_RE = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?")


def upload_location(repo: str, upload_id: str) -> str:
    """The upload URL of a session (relative, as the spec allows)."""
    return f"/v2/{repo}/blobs/uploads/{upload_id}"


class UploadSessions:
    """Upload sessions in a store, with per-session locks and expiry."""

    _log = Logger()

    def __init__(self, store: UploadStore, clock: IReactorTime) -> None:
        self._store = store
        self._clock = clock
        self._locks: dict[str, DeferredLock] = {}

    def _lock(self, upload_id: str) -> DeferredLock:
        return self._locks.setdefault(upload_id, DeferredLock())

    async def start(self, repo: str) -> UploadState:
        """A new session for ``repo``."""
        return UploadState(repo, await self._store.create(repo), 0)

    async def check(self, repo: str, upload_id: str) -> None:
        """Raise ``BLOB_UPLOAD_UNKNOWN`` unless ``upload_id`` is a session of ``repo``."""
        if await self._store.repository_of(upload_id) != repo:
            raise RegistryError("BLOB_UPLOAD_UNKNOWN", f"upload {upload_id[:64]!r} is not known to this registry")

    async def status(self, repo: str, upload_id: str) -> UploadState:
        """The bytes received so far."""
        await self.check(repo, upload_id)
        return UploadState(repo, upload_id, await self._store.size(upload_id))

    async def append(self, repo: str, upload_id: str, body: BinaryIO, length: int, content_range: str | None) -> UploadState:
        """Append a chunk; an out-of-order ``Content-Range`` is a 416."""
        await self.check(repo, upload_id)
        async with self._lock(upload_id):
            size = await self._store.size(upload_id)
            _check_range(content_range, size, length, repo, upload_id)
            if length:
                size = await self._store.append(upload_id, body)
        return UploadState(repo, upload_id, size)

    async def finish(
        self, repo: str, upload_id: str, digest: Digest, body: BinaryIO, length: int, content_range: str | None
    ) -> int:
        """Append the last chunk, verify, and publish the blob; its size.  The session ends
        either way."""
        async with self._lock(upload_id):
            try:
                _check_range(content_range, await self._store.size(upload_id), length, repo, upload_id)
                if length:
                    await self._store.append(upload_id, body)
                try:
                    return await self._store.commit(upload_id, digest)
                except DigestMismatch as e:
                    raise RegistryError(
                        "DIGEST_INVALID",
                        f"uploaded content is {e.actual}, not {digest}; nothing was stored",
                        detail={"digest": str(digest)},
                    ) from None
            finally:
                self._locks.pop(upload_id, None)

    async def cancel(self, repo: str, upload_id: str) -> None:
        """End a session, discarding what it received."""
        await self.check(repo, upload_id)
        await self._store.delete(upload_id)
        self._locks.pop(upload_id, None)

    async def discard(self, upload_id: str) -> None:
        """Remove a session (whatever state it is in)."""
        await self._store.delete(upload_id)

    async def expire(self, expiry: float) -> int:
        """Remove sessions idle for longer than ``expiry`` seconds; how many."""
        idle_since = self._clock.seconds() - expiry
        stale = [u for u in await self._store.stale(idle_since) if u not in self._locks]
        for upload_id in stale:
            await self._store.delete(upload_id)
        if stale:
            self._log.info("removed {count} abandoned upload sessions", count=len(stale))
        return len(stale)


def _check_range(content_range: str | None, size: int, length: int, repo: str, upload_id: str) -> None:
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
                "Location": upload_location(repo, upload_id),
                "Docker-Upload-UUID": upload_id,
            },
        )
