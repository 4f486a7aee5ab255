"""An in-memory store: the same five interfaces on dictionaries, for unit tests.

It keeps every promise the filesystem store keeps (content visible only once verified,
sorted listings, ``"tags": null`` after the last tag goes, idle checks for GC) so that
the store contract tests run against both; nothing is durable.  ``now`` is the clock it
stamps writes with, so tests control time.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, BinaryIO

import attrs

from mirror.core.oci import Digest, Hasher
from mirror.storage.base import BlobInfo, DigestMismatch, RepositoryRecord, Store
from mirror.storage.sending import CachedSource, FileResponder, Responder, Source

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from mirror.storage.spool import FillNote, Orphan

__all__ = ["open_memory_store"]


class _GrowingReader(io.RawIOBase):
    """Reads a writer's buffer as it grows (what following a spool file is on disk)."""

    def __init__(self, buffer: bytearray) -> None:
        self._buffer = buffer
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else (self._pos + pos if whence == 1 else len(self._buffer) + pos)
        return self._pos

    def readinto(self, target: WriteableBuffer) -> int:
        view = memoryview(target).cast("B")
        data = self._buffer[self._pos : self._pos + len(view)]
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


@attrs.define
class _Blob:
    data: bytes
    modified: float


@attrs.define
class _Repo:
    manifests: dict[Digest, tuple[str, float]] = attrs.Factory(dict)
    tags: dict[str, Digest] = attrs.Factory(dict)
    tag_times: dict[str, float] = attrs.Factory(dict)  # when each tag was last set
    blob_links: set[Digest] = attrs.Factory(set)
    fetched_links: set[Digest] = attrs.Factory(set)
    # Like the filesystem's directories, these stay once set: a repository whose last tag
    # was deleted answers "tags": null, and stays listed.
    had_tags: bool = False
    had_manifests: bool = False
    had_blobs: bool = False
    referrers: dict[Digest, dict[Digest, dict[str, object]]] = attrs.Factory(dict)


class _State:
    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.blobs: dict[Digest, _Blob] = {}
        self.repos: dict[str, _Repo] = {}
        self.uploads: dict[str, tuple[str, bytearray, float]] = {}
        self.writers = 0  # spooled, uncommitted writers (tests check nothing leaks)
        self.gc_holders = 0
        self.gc_exclusive = False

    def repo(self, name: str) -> _Repo:
        return self.repos.setdefault(name, _Repo())

    def publish(self, digest: Digest, data: bytes) -> None:
        self.blobs[digest] = _Blob(bytes(data), self.now())


def _hash(data: bytes | bytearray, algorithm: str) -> Digest:
    h: Hasher = hashlib.new(algorithm)
    h.update(bytes(data))
    return Digest(algorithm, h.hexdigest())


class _Writer:
    def __init__(self, state: _State) -> None:
        self._state = state
        self._buffer = bytearray()
        self._open = True
        state.writers += 1

    @property
    def size(self) -> int:
        return len(self._buffer)

    def hash_also(self, digest: Digest) -> None:
        pass  # every algorithm is computed on demand

    def note(self, note: FillNote) -> None:
        pass  # nothing survives the process to resume

    def write(self, *chunks: bytes) -> None:
        assert self._open, "write after commit or abort"
        for chunk in chunks:
            self._buffer += chunk

    def actual_digest(self, algorithm: str = "sha256") -> Digest:
        return _hash(self._buffer, algorithm)

    def follow(self, source: Source, size: int | None) -> Responder:
        return FileResponder(io.BufferedReader(_GrowingReader(self._buffer)), source, size)

    async def commit(self, expected: Digest) -> None:
        assert self._open, "commit after commit or abort"
        actual = self.actual_digest(expected.algorithm)
        if actual != expected:
            self.abort()
            raise DigestMismatch(expected, actual, len(self._buffer))
        self._state.publish(expected, bytes(self._buffer))
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._state.writers -= 1

    def abort(self) -> None:
        self._close()


class _Blobs:
    def __init__(self, state: _State) -> None:
        self._s = state

    async def stat(self, digest: Digest) -> int | None:
        blob = self._s.blobs.get(digest)
        return len(blob.data) if blob is not None else None

    async def open(self, digest: Digest) -> Responder | None:
        blob = self._s.blobs.get(digest)
        if blob is None:
            return None
        return FileResponder(io.BytesIO(blob.data), CachedSource(len(blob.data)), len(blob.data))

    async def read(self, digest: Digest, max_size: int) -> bytes | None:
        blob = self._s.blobs.get(digest)
        return blob.data if blob is not None and len(blob.data) <= max_size else None

    redirects = False  # served by this process

    async def redirect(self, digest: Digest) -> str | None:
        return None

    async def put(self, digest: Digest, data: bytes) -> None:
        blob = self._s.blobs.get(digest)
        if blob is not None:
            blob.modified = self._s.now()
        else:
            self._s.publish(digest, data)

    def writer(self, adopt: Orphan | None = None) -> _Writer:
        assert adopt is None, "nothing survives the process to adopt"
        return _Writer(self._s)

    async def scan(self) -> list[BlobInfo]:
        return [BlobInfo(d, len(b.data), b.modified) for d, b in self._s.blobs.items()]

    async def delete_if_idle(self, digest: Digest, idle_before: float) -> int | None:
        assert self._s.gc_exclusive, "delete_if_idle outside the exclusive GC lock"
        blob = self._s.blobs.get(digest)
        if blob is None or blob.modified >= idle_before:
            return None
        del self._s.blobs[digest]
        return len(blob.data)


class _Spool:
    def take_orphans(self) -> list[Orphan]:
        return []

    async def clean(self) -> int:
        return 0  # nothing survives the process

    async def check_writable(self) -> str | None:
        return None


class _Metadata:
    def __init__(self, state: _State) -> None:
        self._s = state

    def _get(self, repo: str) -> _Repo | None:
        return self._s.repos.get(repo)

    async def link_manifest(self, repo: str, digest: Digest, media_type: str) -> None:
        r = self._s.repo(repo)
        if r.manifests.get(digest, (None,))[0] != media_type:  # as on disk: a relink keeps its time
            r.manifests[digest] = (media_type, self._s.now())
        r.had_manifests = True

    async def manifest_media_type(self, repo: str, digest: Digest) -> str | None:
        r = self._get(repo)
        entry = r.manifests.get(digest) if r is not None else None
        return entry[0] if entry is not None else None

    async def list_manifests(self, repo: str) -> list[Digest]:
        r = self._get(repo)
        return list(r.manifests) if r is not None else []

    async def unlink_manifest(self, repo: str, digest: Digest) -> bool:
        r = self._get(repo)
        return r is not None and r.manifests.pop(digest, None) is not None

    async def set_tag(self, repo: str, tag: str, digest: Digest) -> None:
        r = self._s.repo(repo)
        r.tags[tag] = digest
        r.tag_times[tag] = self._s.now()
        r.had_tags = True

    async def get_tag(self, repo: str, tag: str) -> Digest | None:
        r = self._get(repo)
        return r.tags.get(tag) if r is not None else None

    async def tag_record(self, repo: str, tag: str) -> tuple[Digest, float] | None:
        r = self._get(repo)
        if r is None or tag not in r.tags:
            return None
        return r.tags[tag], r.tag_times.get(tag, 0.0)

    async def delete_tag(self, repo: str, tag: str) -> None:
        r = self._get(repo)
        if r is not None:
            r.tags.pop(tag, None)

    async def list_tags(self, repo: str) -> list[str] | None:
        r = self._get(repo)
        if r is None or not (r.had_tags or r.had_manifests):
            return None
        return sorted(r.tags)

    async def had_tags(self, repo: str) -> bool:
        r = self._get(repo)
        return r is not None and r.had_tags

    async def link_blob(self, repo: str, digest: Digest, *, fetched: bool = False) -> None:
        r = self._s.repo(repo)
        if fetched:
            r.fetched_links.add(digest)
        else:
            r.blob_links.add(digest)
            r.had_blobs = True

    async def has_blob_link(self, repo: str, digest: Digest, *, fetched: bool = False) -> bool:
        r = self._get(repo)
        return r is not None and digest in (r.fetched_links if fetched else r.blob_links)

    async def unlink_blob(self, repo: str, digest: Digest) -> bool:
        r = self._get(repo)
        if r is None or not (digest in r.blob_links or digest in r.fetched_links):
            return False
        r.blob_links.discard(digest)
        r.fetched_links.discard(digest)
        return True

    async def add_referrer(self, repo: str, subject: Digest, descriptor: Mapping[str, object]) -> None:
        digest = Digest(*str(descriptor["digest"]).split(":", 1))
        self._s.repo(repo).referrers.setdefault(subject, {})[digest] = dict(descriptor)

    async def referrers(self, repo: str, subject: Digest) -> list[dict[str, object]]:
        r = self._get(repo)
        found = r.referrers.get(subject, {}) if r is not None else {}
        return [dict(found[d]) for d in sorted(found, key=str)]

    async def remove_referrer(self, repo: str, subject: Digest, digest: Digest) -> None:
        r = self._get(repo)
        if r is not None:
            r.referrers.get(subject, {}).pop(digest, None)

    async def repositories(self, after: str | None = None, limit: int | None = None) -> list[str]:
        names = sorted(name for name, r in self._s.repos.items() if r.had_manifests or r.had_tags or r.had_blobs)
        start = bisect.bisect_right(names, after) if after is not None else 0
        return names[start : None if limit is None else start + limit]

    async def scan_repository(self, repo: str) -> RepositoryRecord:
        r = self._get(repo) or _Repo()
        manifests = {d: when for d, (_, when) in r.manifests.items()}
        return RepositoryRecord(manifests, dict(r.tags), set(r.blob_links), set(r.fetched_links))


class _Uploads:
    def __init__(self, state: _State) -> None:
        self._s = state

    async def create(self, repo: str) -> str:
        upload_id = str(uuid.uuid4())
        self._s.uploads[upload_id] = (repo, bytearray(), self._s.now())
        return upload_id

    async def repository_of(self, upload_id: str) -> str | None:
        entry = self._s.uploads.get(upload_id)
        return entry[0] if entry is not None else None

    async def size(self, upload_id: str) -> int:
        return len(self._s.uploads[upload_id][1])

    async def append(self, upload_id: str, source: BinaryIO) -> int:
        repo, data, _ = self._s.uploads[upload_id]
        data += source.read()
        self._s.uploads[upload_id] = (repo, data, self._s.now())
        return len(data)

    async def commit(self, upload_id: str, expected: Digest) -> int:
        _, data, _ = self._s.uploads.pop(upload_id)
        actual = _hash(data, expected.algorithm)
        if actual != expected:
            raise DigestMismatch(expected, actual, len(data))
        await _Blobs(self._s).put(expected, bytes(data))
        return len(data)

    async def delete(self, upload_id: str) -> None:
        self._s.uploads.pop(upload_id, None)

    async def stale(self, idle_since: float) -> list[str]:
        return [u for u, (_, _, last) in self._s.uploads.items() if last < idle_since]


class _Access:
    def __init__(self, state: _State) -> None:
        self._s = state

    async def record(self, accessed: Mapping[Digest, float]) -> None:
        for digest, when in accessed.items():
            blob = self._s.blobs.get(digest)
            if blob is not None and blob.modified < when:
                blob.modified = when

    async def snapshot(self) -> Mapping[Digest, float]:
        return {}


class _GcLock:
    def __init__(self, state: _State) -> None:
        self._s = state

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        assert not self._s.gc_holders, "the in-memory GC lock cannot wait for pushes"
        self._s.gc_exclusive = True
        try:
            yield
        finally:
            self._s.gc_exclusive = False

    async def try_shared(self) -> object | None:
        if self._s.gc_exclusive:
            return None
        self._s.gc_holders += 1
        return self

    async def release(self, handle: object) -> None:
        self._s.gc_holders -= 1


def open_memory_store(now: Callable[[], float] = time.time) -> Store:
    """A new, empty in-memory store stamping writes with ``now()``."""
    state = _State(now)
    return Store(
        blobs=_Blobs(state),
        metadata=_Metadata(state),
        uploads=_Uploads(state),
        access=_Access(state),
        gc_lock=_GcLock(state),
        spool=_Spool(),
        description="memory",
    )
