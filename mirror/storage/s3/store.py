"""The store in an S3-compatible bucket, shared by any number of nodes.

Keys under the configured prefix::

    blobs/<alg>/<hex>                              content (manifests too), written only
                                                   verified and create-only
    access/<time>-<random>.json                    a batch of last reads {digest: time}: one
                                                   object per flush; GC merges them
    repositories/<name...>/_manifests/<alg>/<hex>  a manifest the repository holds (its media type)
    repositories/<name...>/_tags/<tag>             the digest the tag points at
    repositories/<name...>/_tagged                 the repository has held a tag
    repositories/<name...>/_layers/<alg>/<hex>     a blob a hosted repository holds (empty)
    repositories/<name...>/_fetched/<alg>/<hex>    a blob a mirrored repository holds (empty)
    repositories/<name...>/_referrers/<alg>/<subject hex>/<alg>/<hex>   a referrer's descriptor
    uploads/<id>/repo                              an upload session: its repository...
    uploads/<id>/parts/<offset, 16 hex digits>     ...and the bytes of each append, so that
                                                   every node can continue or commit it
    leases/gc, leases/gc-run                       GC's exclusive lease (per batch of deletes)
                                                   and its run's lease: {"holder", "expires"}
    leases/fills/<alg>/<hex>                       the node fetching that blob (a cluster)
    locks/shared/<random>                          a writer holding GC off

the same names as the filesystem layout, so that a reader of one knows the other.

Consistency: S3 (and every server we test with) reads its own writes and lists them at
once.  Content is written create-only (``If-None-Match: *``): two nodes filling the same
digest both verified the same bytes, and whichever lands second changes nothing.  A
PUT is atomic, so a crash at any instant leaves either the whole object or none; a tag or
link may outlive its blob after a crash or eviction, which readers treat as a miss, as on
disk.  Multipart uploads that fail are aborted.

New blobs are written to the node's local spool first (:mod:`mirror.storage.spool`):
clients of a fill under way follow the spool file, and the verified file is uploaded on
commit.  An upload session's appends go straight to the bucket, so a push whose
requests reach different nodes completes; commit reads the parts back through a hash.
"""

from __future__ import annotations

import bisect
import json
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse

from mirror.core.errors import RegistryError
from mirror.core.oci import Digest, parse_digest
from mirror.responses import Discard, stop_body
from mirror.storage.base import BlobInfo, RepositoryRecord, Store
from mirror.storage.leases import Renewal
from mirror.storage.s3.client import FileSlice, ObjectInfo, S3Client, S3Error
from mirror.storage.s3.responder import ObjectResponder
from mirror.storage.sending import Responder
from mirror.storage.spool import LocalSpool, Orphan, SpoolWriter

__all__ = ["open_s3_store"]

RunBlocking = Callable[..., Deferred[Any]]
_log = Logger()

#: Seconds GC's exclusive lease lasts unless renewed (it is renewed every third of it).
GC_LEASE = 60.0
#: A writer's shared hold older than this is a dead process's; GC stops waiting for it.
SHARED_HOLD = 300.0
#: Node clocks may disagree by this much: a lease counts as expired only this late.
CLOCK_SKEW = 30.0
#: How often a waiting GC looks again for writers holding it off.
POLL = 0.05
#: Bytes of small blobs (manifests) a node keeps in memory; none over a sixteenth of it.
SMALL_CACHE = 32 * 1024 * 1024
#: Reads per access-record object (about 100 bytes each), and the most one may hold.
ACCESS_BATCH = 50_000
ACCESS_READ_LIMIT = 64 * 1024 * 1024
#: Bytes read back from an upload part per write to the spool.
CHUNK = 1024 * 1024


def _digest_key(digest: Digest) -> str:
    return f"{digest.algorithm}/{digest.encoded}"


def _digest_of(rest: str) -> Digest | None:
    """The digest ``<alg>/<hex>`` names, or ``None`` for anything else."""
    algorithm, _, encoded = rest.partition("/")
    try:
        return parse_digest(f"{algorithm}:{encoded}")
    except RegistryError:
        return None


class _Keys:
    """Object keys (see the module docstring)."""

    @staticmethod
    def blob(digest: Digest) -> str:
        return f"blobs/{_digest_key(digest)}"

    @staticmethod
    def repo(repo: str) -> str:
        return f"repositories/{repo}/"

    def manifest(self, repo: str, digest: Digest) -> str:
        return f"{self.repo(repo)}_manifests/{_digest_key(digest)}"

    def tag(self, repo: str, tag: str) -> str:
        return f"{self.repo(repo)}_tags/{tag}"

    def blob_link(self, repo: str, digest: Digest, *, fetched: bool) -> str:
        return f"{self.repo(repo)}{'_fetched' if fetched else '_layers'}/{_digest_key(digest)}"

    def referrers(self, repo: str, subject: Digest) -> str:
        return f"{self.repo(repo)}_referrers/{_digest_key(subject)}/"

    @staticmethod
    def upload(upload_id: str) -> str:
        if str(uuid.UUID(upload_id)) != upload_id:  # ValueError for anything that is not one
            raise ValueError(f"not a UUID in canonical form: {upload_id[:64]!r}")
        return f"uploads/{upload_id}/"


KEYS = _Keys()


# blobs ------------------------------------------------------------------------------------------
class S3BlobWriter(SpoolWriter):
    """A spool file that commit uploads to ``blobs/`` (create-only) once verified."""

    def __init__(self, client: S3Client, spool: LocalSpool, access: S3AccessRecord, adopt: Orphan | None = None) -> None:
        super().__init__(spool, adopt)
        self._client = client
        self._access = access

    async def commit(self, expected: Digest) -> None:
        self._file.verify(expected)
        key = KEYS.blob(expected)
        try:
            # Content-addressed: a stored object is these bytes (another node stored it
            # first); it counts as just written.  Else upload, create-only.
            if await self._client.head(key) is not None or not await self._client.upload_file(
                key, str(self.path), self.size, create_only=True
            ):
                await self._access.record({expected: time.time()})
        finally:
            self._file.abort()


class S3BlobStore:
    """Content by digest under ``blobs/``."""

    def __init__(self, client: S3Client, spool: LocalSpool, access: S3AccessRecord, clock: IReactorTime) -> None:
        self._client = client
        self._spool = spool
        self._access = access
        self._clock = clock
        self._small: OrderedDict[Digest, bytes] = OrderedDict()  # small blobs read, least recent first
        self._small_bytes = 0

    async def stat(self, digest: Digest) -> int | None:
        info = await self._client.head(KEYS.blob(digest))
        return None if info is None else info.size

    async def open(self, digest: Digest) -> Responder | None:
        key = KEYS.blob(digest)
        response = await self._client.get(key)
        if response is None:
            return None
        size = response.length
        if not isinstance(size, int):
            response.deliverBody(Discard())
            raise S3Error(f"GET {key}", response.code, "NoContentLength")

        async def reopen(first: int, end: int) -> IResponse | None:
            return await self._client.get(key, first, end)

        return ObjectResponder(response, size, reopen, self._clock, self._client.config.timeout)

    async def read(self, digest: Digest, max_size: int) -> bytes | None:
        cached = self._small.get(digest)
        if cached is not None:
            self._small.move_to_end(digest)
            return cached if len(cached) <= max_size else None
        response = await self._client.get(KEYS.blob(digest))
        if response is None:
            return None
        if not isinstance(response.length, int) or response.length > max_size:
            response.deliverBody(Discard())
            return None
        data = await self._client.read_body(response, max_size)
        self._remember(digest, data)
        return data

    def _remember(self, digest: Digest, data: bytes) -> None:
        """Keep a small blob (a manifest) in memory: content by digest never changes, and
        what the store verified once stays those bytes.  Whether a repository still holds
        it is asked of the store every time (its links), so a deletion is seen at once."""
        if len(data) > SMALL_CACHE // 16:
            return
        self._small_bytes -= len(self._small.pop(digest, b""))
        self._small[digest] = data
        self._small_bytes += len(data)
        while self._small_bytes > SMALL_CACHE:
            _, dropped = self._small.popitem(last=False)
            self._small_bytes -= len(dropped)

    @property
    def redirects(self) -> bool:
        return self._client.config.redirect

    async def redirect(self, digest: Digest) -> str | None:
        if not self.redirects or await self._client.head(KEYS.blob(digest)) is None:
            return None
        return self._client.presigned_url(KEYS.blob(digest), self._client.config.redirect_expiry)

    async def put(self, digest: Digest, data: bytes) -> None:
        if not await self._client.put(KEYS.blob(digest), data, create_only=True):
            await self._access.record({digest: time.time()})  # already there: counts as just written
        self._remember(digest, data)

    def writer(self, adopt: Orphan | None = None) -> S3BlobWriter:
        return S3BlobWriter(self._client, self._spool, self._access, adopt)

    async def scan(self) -> list[BlobInfo]:
        objects, _ = await self._client.list("blobs/")
        found = []
        for item in objects:
            digest = _digest_of(item.key.removeprefix("blobs/"))
            if digest is not None:
                found.append(BlobInfo(digest, item.size, item.modified))
        return found

    async def delete_if_idle(self, digest: Digest, idle_before: float) -> int | None:
        info = await self._client.head(KEYS.blob(digest))
        if info is None or info.modified >= idle_before:
            return None
        if (await self._access.current()).get(digest, 0.0) >= idle_before:
            return None
        await self._client.delete(KEYS.blob(digest))
        self._small_bytes -= len(self._small.pop(digest, b""))
        return info.size


# repositories -----------------------------------------------------------------------------------
class S3MetadataStore:
    """Per-repository manifests, tags, blob links and referrers under ``repositories/``."""

    def __init__(self, client: S3Client) -> None:
        self._client = client
        self._tagged: set[str] = set()  # repositories whose _tagged marker this process wrote

    async def _text(self, key: str) -> str | None:
        data = await self._client.read(key, 64 * 1024)
        return None if data is None else data.decode("utf-8", "replace")

    async def _digests(self, prefix: str) -> dict[Digest, ObjectInfo]:
        objects, _ = await self._client.list(prefix)
        found = {}
        for item in objects:
            digest = _digest_of(item.key[len(prefix) :])
            if digest is not None:
                found[digest] = item
        return found

    async def link_manifest(self, repo: str, digest: Digest, media_type: str) -> None:
        if await self.manifest_media_type(repo, digest) != media_type:
            await self._client.put(KEYS.manifest(repo, digest), media_type.encode())

    async def manifest_media_type(self, repo: str, digest: Digest) -> str | None:
        return await self._text(KEYS.manifest(repo, digest)) or None

    async def list_manifests(self, repo: str) -> list[Digest]:
        return list(await self._digests(f"{KEYS.repo(repo)}_manifests/"))

    async def unlink_manifest(self, repo: str, digest: Digest) -> bool:
        return await self._delete(KEYS.manifest(repo, digest))

    async def _delete(self, key: str) -> bool:
        """Delete ``key``; whether it was there (S3's DELETE does not say)."""
        if await self._client.head(key) is None:
            return False
        await self._client.delete(key)
        return True

    async def set_tag(self, repo: str, tag: str, digest: Digest) -> None:
        if repo not in self._tagged:
            await self._client.put(f"{KEYS.repo(repo)}_tagged", b"")
            self._tagged.add(repo)
        await self._client.put(KEYS.tag(repo, tag), str(digest).encode())

    async def get_tag(self, repo: str, tag: str) -> Digest | None:
        text = await self._text(KEYS.tag(repo, tag))
        if text is None:
            return None
        try:
            return parse_digest(text.strip())
        except RegistryError:
            return None

    async def tag_record(self, repo: str, tag: str) -> tuple[Digest, float] | None:
        found = await self._client.read_with_time(KEYS.tag(repo, tag), 4096)
        if found is None:
            return None
        data, written = found
        try:
            return parse_digest(data.decode("utf-8", "replace").strip()), written
        except RegistryError:
            return None

    async def delete_tag(self, repo: str, tag: str) -> None:
        await self._client.delete(KEYS.tag(repo, tag))

    async def list_tags(self, repo: str) -> list[str] | None:
        prefix = f"{KEYS.repo(repo)}_tags/"
        objects, _ = await self._client.list(prefix)
        if objects:
            return sorted(item.key[len(prefix) :] for item in objects)
        _, children = await self._client.list(KEYS.repo(repo), delimiter="/")
        held = {f"{KEYS.repo(repo)}{part}" for part in ("_manifests/", "_tags/")}
        if held & set(children) or await self.had_tags(repo):
            return []
        return None

    async def had_tags(self, repo: str) -> bool:
        return await self._client.head(f"{KEYS.repo(repo)}_tagged") is not None

    async def link_blob(self, repo: str, digest: Digest, *, fetched: bool = False) -> None:
        key = KEYS.blob_link(repo, digest, fetched=fetched)
        if await self._client.head(key) is None:
            await self._client.put(key, b"")

    async def has_blob_link(self, repo: str, digest: Digest, *, fetched: bool = False) -> bool:
        return await self._client.head(KEYS.blob_link(repo, digest, fetched=fetched)) is not None

    async def unlink_blob(self, repo: str, digest: Digest) -> bool:
        pushed = await self._delete(KEYS.blob_link(repo, digest, fetched=False))
        return await self._delete(KEYS.blob_link(repo, digest, fetched=True)) or pushed

    async def add_referrer(self, repo: str, subject: Digest, descriptor: Mapping[str, object]) -> None:
        digest = parse_digest(str(descriptor["digest"]))
        key = KEYS.referrers(repo, subject) + _digest_key(digest)
        await self._client.put(key, json.dumps(descriptor, sort_keys=True).encode())

    async def referrers(self, repo: str, subject: Digest) -> list[dict[str, object]]:
        prefix = KEYS.referrers(repo, subject)
        found = []
        for _, item in sorted((await self._digests(prefix)).items(), key=lambda pair: pair[1].key):
            data = await self._client.read(item.key, 1024 * 1024)
            if data is None:
                continue  # removed meanwhile
            try:
                found.append(json.loads(data))
            except ValueError:
                continue
        return found

    async def remove_referrer(self, repo: str, subject: Digest, digest: Digest) -> None:
        await self._client.delete(KEYS.referrers(repo, subject) + _digest_key(digest))

    async def repositories(self, after: str | None = None, limit: int | None = None) -> list[str]:
        found: list[str] = []

        async def walk(prefix: str) -> None:
            objects, children = await self._client.list(prefix, delimiter="/")
            names = [child[len(prefix) :].rstrip("/") for child in children]
            # S3 has no empty directories: a repository whose last tag went is known by its marker
            tagged = any(item.key == f"{prefix}_tagged" for item in objects)
            if tagged or {"_manifests", "_tags", "_layers"} & set(names):
                found.append(prefix.removeprefix("repositories/").rstrip("/"))
            for name in names:
                if not name.startswith("_"):
                    await walk(f"{prefix}{name}/")

        await walk("repositories/")
        names = sorted(found)
        start = bisect.bisect_right(names, after) if after is not None else 0
        return names[start : None if limit is None else start + limit]

    async def scan_repository(self, repo: str) -> RepositoryRecord:
        base = KEYS.repo(repo)
        manifests = {digest: item.modified for digest, item in (await self._digests(f"{base}_manifests/")).items()}
        links = set(await self._digests(f"{base}_layers/"))
        fetched = set(await self._digests(f"{base}_fetched/"))
        tags = {}
        for tag in await self.list_tags(repo) or []:
            target = await self.get_tag(repo, tag)
            if target is not None:
                tags[tag] = target
        return RepositoryRecord(manifests, tags, links, fetched)


# uploads ----------------------------------------------------------------------------------------
class S3UploadStore:
    """Upload sessions under ``uploads/<id>/``: each append is an object of its own."""

    def __init__(self, client: S3Client, blobs: S3BlobStore, run_blocking: RunBlocking, clock: IReactorTime) -> None:
        self._client = client
        self._blobs = blobs
        self._run_blocking = run_blocking
        self._clock = clock

    async def create(self, repo: str) -> str:
        upload_id = str(uuid.uuid4())
        await self._client.put(KEYS.upload(upload_id) + "repo", repo.encode())
        return upload_id

    async def repository_of(self, upload_id: str) -> str | None:
        try:
            key = KEYS.upload(upload_id) + "repo"
        except ValueError:
            return None
        data = await self._client.read(key, 4096)
        return None if data is None else data.decode()

    async def _parts(self, upload_id: str) -> list[ObjectInfo]:
        """The session's parts in order, checked to follow each other without a gap."""
        prefix = KEYS.upload(upload_id) + "parts/"
        objects, _ = await self._client.list(prefix)
        offset = 0
        for item in objects:
            if int(item.key[len(prefix) :], 16) != offset:
                raise S3Error(f"upload {upload_id}", None, "PartsNotContiguous", f"a part is missing before {item.key}")
            offset += item.size
        return objects

    async def size(self, upload_id: str) -> int:
        return sum(item.size for item in await self._parts(upload_id))

    async def append(self, upload_id: str, source: BinaryIO) -> int:
        size = await self.size(upload_id)
        start = source.tell()
        length = source.seek(0, 2) - start
        source.seek(start)
        if length == 0:
            return size
        key = f"{KEYS.upload(upload_id)}parts/{size:016x}"
        fileno = _fileno(source)
        if fileno is None:  # in memory already
            created = await self._client.put(key, source.read(), create_only=True)
        else:
            created = await self._client.put(key, FileSlice(fileno, start, length), create_only=True)
        if not created:  # another request appended at the same offset first
            raise RegistryError("BLOB_UPLOAD_INVALID", "the upload changed meanwhile", status=416)
        return size + length

    async def commit(self, upload_id: str, expected: Digest) -> int:
        writer = self._blobs.writer()
        writer.hash_also(expected)
        try:
            for item in await self._parts(upload_id):
                response = await self._client.get(item.key)
                if response is None:
                    raise S3Error(f"GET {item.key}", 404, "NoSuchKey", "an upload part vanished")
                body = _SpoolBody(writer, self._run_blocking, self._clock, self._client.config.timeout)
                response.deliverBody(body)
                await body.done
            await writer.commit(expected)
        except BaseException:
            writer.abort()
            await self.delete(upload_id)
            raise
        await self.delete(upload_id)
        return writer.size

    async def delete(self, upload_id: str) -> None:
        try:
            prefix = KEYS.upload(upload_id)
        except ValueError:
            return
        objects, _ = await self._client.list(prefix)
        for item in sorted(objects, key=lambda item: item.key.endswith("/repo")):  # the session's name last
            await self._client.delete(item.key)

    async def stale(self, idle_since: float) -> list[str]:
        objects, _ = await self._client.list("uploads/")
        last: dict[str, float] = {}
        for item in objects:
            upload_id = item.key.split("/")[1]
            last[upload_id] = max(last.get(upload_id, 0.0), item.modified)
        return sorted(upload_id for upload_id, when in last.items() if when < idle_since)


def _fileno(source: BinaryIO) -> int | None:
    try:
        return source.fileno()
    except (OSError, AttributeError, ValueError):
        return None


class _SpoolBody(Protocol):
    """Writes an object's body into a spool writer (hashing it) off the reactor, in
    batches; the connection is paused while a batch is written, so memory stays bounded."""

    def __init__(self, writer: S3BlobWriter, run_blocking: RunBlocking, clock: IReactorTime, idle: float) -> None:
        self._writer = writer
        self._run_blocking = run_blocking
        self._batch: list[bytes] = []
        self._pending = 0
        self._writing: Deferred[Any] | None = None
        self._end: Failure | None = None
        self.done: Deferred[None] = Deferred()
        self._idle = idle
        self._timer = clock.callLater(idle, self._stalled)

    def _stalled(self) -> None:
        self._end = Failure(S3Error("reading an upload part", None, "Timeout", f"nothing for {self._idle:g} s"))
        stop_body(self)

    def dataReceived(self, data: bytes) -> None:
        if self._timer.active():
            self._timer.reset(self._idle)
        self._batch.append(data)
        self._pending += len(data)
        if self._pending >= CHUNK and self._writing is None:
            self._flush()

    def _flush(self) -> None:
        batch, self._batch, self._pending = self._batch, [], 0
        if self.transport is not None:
            IPushProducer(self.transport).pauseProducing()
        self._writing = self._run_blocking(_write_chunks, self._writer, batch)
        self._writing.addCallbacks(self._written, self._failed)

    def _written(self, _: object) -> None:
        self._writing = None
        if self._end is not None:
            self._finish()
        elif self.transport is not None:
            if self._timer.active():
                self._timer.reset(self._idle)  # the disk was slow, not the store
            IPushProducer(self.transport).resumeProducing()

    def _failed(self, failure: Failure) -> None:
        self._writing = None
        self._end = failure
        stop_body(self)
        self._finish()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self._end is None:
            self._end = reason
        if self._writing is None:
            self._finish()

    def _finish(self) -> None:
        if self.done.called:
            return
        end = self._end
        if end is not None and not end.check(ResponseDone):
            self.done.errback(end)
        elif self._batch:
            self._flush()  # the last bytes; _written finishes
        else:
            self.done.callback(None)


def _write_chunks(writer: S3BlobWriter, chunks: list[bytes]) -> None:
    for chunk in chunks:
        writer.write(chunk)


# access record and GC lock ----------------------------------------------------------------------
class S3AccessRecord:
    """Last reads as batches under ``access/``: one object per flush, merged by GC."""

    def __init__(self, client: S3Client) -> None:
        self._client = client
        self._read: dict[str, dict[Digest, float]] = {}  # batches this process has read, by key
        self._merged: dict[Digest, float] | None = None  # as of the last look (None: look again)

    async def record(self, accessed: Mapping[Digest, float]) -> None:
        entries = [(str(digest), when) for digest, when in accessed.items()]
        for i in range(0, len(entries), ACCESS_BATCH):  # objects of a few MB, however many blobs
            key = f"access/{time.time():017.6f}-{secrets.token_hex(6)}.json"
            await self._client.put(key, json.dumps(dict(entries[i : i + ACCESS_BATCH])).encode())
        self._merged = None

    def look_again(self) -> None:
        """Make the next :meth:`current` read the record afresh (GC took its lock: every
        writer that held it off has recorded its reads)."""
        self._merged = None

    async def current(self) -> dict[Digest, float]:
        """:meth:`latest`, read once per :meth:`look_again` (once per GC batch, not per blob)."""
        if self._merged is None:
            self._merged = await self.latest()
        return self._merged

    async def latest(self) -> dict[Digest, float]:
        """Every recorded read (the latest per blob), reading only batches not read before."""
        objects, _ = await self._client.list("access/")
        present = {item.key for item in objects}
        for key in list(self._read):
            if key not in present:
                del self._read[key]  # merged into a newer batch, which is read instead
        for key in sorted(present - set(self._read)):
            data = await self._client.read(key, ACCESS_READ_LIMIT)
            if data is None:
                continue  # merged and removed meanwhile
            batch = {}
            for text, when in json.loads(data).items():
                try:
                    batch[parse_digest(text)] = float(when)
                except (RegistryError, TypeError, ValueError):
                    continue
            self._read[key] = batch
        merged: dict[Digest, float] = {}
        for batch in self._read.values():
            for digest, when in batch.items():
                if when > merged.get(digest, 0.0):
                    merged[digest] = when
        return merged

    async def snapshot(self) -> Mapping[Digest, float]:
        merged = await self.latest()
        await self._compact(merged)
        return merged

    async def _compact(self, merged: dict[Digest, float]) -> None:
        """Replace the batches read with one, dropping blobs no longer stored.  The new
        batch is written before any old one goes, so no read is ever lost, whoever else
        compacts at the same time."""
        old = list(self._read)
        if len(old) < 2:
            return
        objects, _ = await self._client.list("blobs/")
        stored = {_digest_of(item.key.removeprefix("blobs/")) for item in objects}
        kept = {digest: when for digest, when in merged.items() if digest in stored}
        await self.record(kept)
        for key in old:
            await self._client.delete(key)
            del self._read[key]


class S3Leases:
    """Named leases as objects under ``leases/``: ``{"holder", "expires"}``.

    A lease is created only if absent (``If-None-Match: *``), so of nodes asking at once one
    gets it.  An expired lease (its holder died) is deleted and created afresh; two nodes
    taking over the same expired lease at the same instant can both believe they hold it,
    which the work leases guard (a fill, GC) tolerates: content is create-only and GC
    re-checks under the lock.
    """

    def __init__(self, client: S3Client) -> None:
        self._client = client

    @staticmethod
    def _key(name: str) -> str:
        return f"leases/{name}"

    async def current(self, name: str) -> tuple[str, float] | None:
        """(holder, expiry) of lease ``name``, if there is one."""
        data = await self._client.read(self._key(name), 4096)
        if data is None:
            return None
        try:
            doc = json.loads(data)
            return str(doc["holder"]), float(doc["expires"])
        except (ValueError, KeyError, TypeError):
            return "", 0.0  # unreadable: treat as expired

    async def acquire(self, name: str, holder: str, ttl: float) -> str | None:
        body = json.dumps({"holder": holder, "expires": time.time() + ttl}).encode()
        for _ in range(3):
            if await self._client.put(self._key(name), body, create_only=True):
                return None
            lease = await self.current(name)
            if lease is None:
                continue  # released meanwhile
            current, expires = lease
            if current != holder and expires + CLOCK_SKEW >= time.time():
                return current
            if current != holder:
                _log.info("taking over the expired lease {name} of {holder}", name=name, holder=current)
            await self._client.delete(self._key(name))
        lease = await self.current(name)  # still contended after three tries: someone has it
        return lease[0] if lease is not None and lease[0] else "another node"

    async def renew(self, name: str, holder: str, ttl: float) -> None:
        lease = await self.current(name)
        if lease is not None and lease[0] != holder:  # expired and taken over: it is not ours to extend
            _log.warn("lease {name} is held by {other} now, not {holder}", name=name, other=lease[0], holder=holder)
            return
        await self._client.put(self._key(name), json.dumps({"holder": holder, "expires": time.time() + ttl}).encode())

    async def release(self, name: str, holder: str) -> None:
        lease = await self.current(name)
        if lease is not None and lease[0] == holder:
            await self._client.delete(self._key(name))

    def live(self, lease: tuple[str, float] | None) -> bool:
        return lease is not None and lease[1] + CLOCK_SKEW >= time.time()


class S3GcLock:
    """GC's exclusive lease and writers' shared holds.

    A writer puts its hold (an object under ``locks/shared/``), then looks for the lease
    ``gc``; GC takes the lease, then waits until no hold is left.  With a store that reads
    its own writes, at least one of the two sees the other, so a writer never works while
    GC deletes.  The lease is renewed while held; a dead holder's lease expires.
    """

    def __init__(self, client: S3Client, leases: S3Leases, access: S3AccessRecord, clock: IReactorTime) -> None:
        self._client = client
        self._leases = leases
        self._access = access
        self._clock = clock
        self.owner = f"gc-{secrets.token_hex(8)}"

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        while await self._leases.acquire("gc", self.owner, GC_LEASE) is not None:
            await deferLater(self._clock, 1.0, lambda: None)
        renewal = Renewal(self._leases, "gc", self.owner, GC_LEASE, self._clock)
        try:
            while await self._live_holds():
                await deferLater(self._clock, POLL, lambda: None)
            self._access.look_again()  # the writers held off have recorded their reads
            yield
        finally:
            await renewal.stop()
            await self._leases.release("gc", self.owner)

    async def _live_holds(self) -> bool:
        objects, _ = await self._client.list("locks/shared/")
        return any(item.modified > time.time() - SHARED_HOLD for item in objects)

    async def try_shared(self) -> object | None:
        if self._leases.live(await self._leases.current("gc")):
            return None  # GC holds it: no hold of ours to keep it waiting
        key = f"locks/shared/{secrets.token_hex(12)}"
        await self._client.put(key, b"")
        try:
            held_off = not self._leases.live(await self._leases.current("gc"))  # (GC may have come meanwhile)
        except BaseException:
            await self._client.delete(key)
            raise
        if held_off:
            return key
        await self._client.delete(key)
        return None

    async def release(self, handle: object) -> None:
        assert isinstance(handle, str)
        await self._client.delete(handle)


class S3Spool(LocalSpool):
    """The node's local spool; ready when it can be written and the bucket answers."""

    def __init__(self, directory: Path, client: S3Client) -> None:
        super().__init__(directory)
        self._client = client

    async def check_writable(self) -> str | None:
        problem = await super().check_writable()
        if problem is not None:
            return problem
        try:
            await self._client.list("locks/", delimiter="/")
        except S3Error as e:
            return f"object store not reachable: {e}"
        return None


def open_s3_store(client: S3Client, spool: Path, run_blocking: RunBlocking, clock: IReactorTime) -> Store:
    """The store in ``client``'s bucket, spooling new blobs under ``spool`` (created if missing)."""
    spool.mkdir(parents=True, exist_ok=True)
    local = S3Spool(spool, client)
    access = S3AccessRecord(client)
    blobs = S3BlobStore(client, local, access, clock)
    leases = S3Leases(client)
    return Store(
        blobs=blobs,
        metadata=S3MetadataStore(client),
        uploads=S3UploadStore(client, blobs, run_blocking, clock),
        access=access,
        gc_lock=S3GcLock(client, leases, access, clock),
        spool=local,
        description=f"s3 {client.config.endpoint}/{client.config.bucket}/{client.config.prefix}",
        leases=leases,
    )
