"""The store on a local filesystem directory.

Layout under ``root``::

    layout.json                                    {"layout": N}: the layout version (absent: 1;
                                                   a release that changes the layout migrates
                                                   at start and writes it)
    repositories.index                             the repositories' names, appended to before
                                                   each repository's first _manifests, _tags or
                                                   _layers directory is made (:mod:`.fsindex`)
    blobs/<algorithm>/<first two hex>/<hex>       content (manifests too); its mtime is
                                                   the last write or read (the access record)
    spool/<random>                                 blobs being written; renamed into
                                                   blobs/ only after verify + fsync
    repositories/<name...>/_manifests/<alg>/<hex>  a manifest the repository holds; the
                                                   file holds its media type
    repositories/<name...>/_tags/<tag>             the digest the tag points at
    repositories/<name...>/_layers/<alg>/<hex>     a blob a hosted repository holds (empty)
    repositories/<name...>/_fetched/<alg>/<hex>    a blob a mirrored repository holds: its
                                                   upstream served or confirmed it (empty)
    repositories/<name...>/_referrers/<alg>/<subject hex>/<alg>/<hex>
                                                   descriptor (JSON) of a manifest whose
                                                   subject is that digest
    uploads/<id>/data, uploads/<id>/repo           an upload session (push): the bytes
                                                   so far and the repository it is for
    gc.lock                                        flock: GC deletes (exclusive) vs pushes
                                                   referencing existing blobs (shared)

``_manifests``, ``_tags``, ``_layers``, ``_fetched`` and ``_referrers`` cannot collide with a nested
repository, since a name component cannot start with ``_``.  Every path component comes
from a checked name, tag or digest (:mod:`mirror.core.oci`), so nothing reaches outside
``root``.  A repository is a directory holding ``_manifests``, ``_tags`` or ``_layers``
(``_fetched`` came later, and alone makes none); the store never removes one.

Layout versions.  Version 1 (no ``layout.json``) is what every release wrote before the
index; version 2 adds ``repositories.index``.  Opening a store of version 1 (or of version
2 whose index is gone) migrates it: a walk of ``repositories/`` appends every repository
to the index, then ``layout.json`` says 2 (at start, before anything is served; other
processes writing meanwhile add their own new repositories).  A store this process
cannot write (a read-only mount, for ``mirror export``) is served as it is, its listings
walking it.  A release before version 2 refuses a store of version 2, whose index it would
not keep up; to go back to one, delete ``layout.json`` and ``repositories.index`` (the next
start of this release rebuilds them).

Crash safety: content appears under ``blobs/`` only whole and verified, and every small
file with content is written to a temporary name; both go through :func:`_publish`
(fsync, then rename), the one place that makes content durable and visible.  Empty files
(blob links) are created in place: there is nothing in them to appear whole.  A tag or
link may outlive its blob after a crash or eviction; readers treat a missing blob as a
miss.  A name in the index may outlive the creation of its repository (a crash in
between): listings check that the repository exists (see :mod:`.fsindex`).

Threads: writes, fsyncs, deletes and listings run off the caller's thread — the short ones
(tags, links, manifests, referrers, the index, upload sessions' creation and removal, the
access record, the GC lock's shared hold) through ``run_small``, blob data, commits,
upload appends and walks of all blobs through ``run_blocking``.  Reads of one small file
(a tag, a manifest's media type, whether a link exists, a blob's size, a manifest's
bytes, an upload's repository and size) run at once, on the reactor: they are the cached
manifest path (thousands of requests a second), where handing each to a thread halved the
throughput (docs/benchmarks.md); small, hot files, they come from the page cache, which
never waits for the fsyncs of writes.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import itertools
import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred

from mirror.core.errors import RegistryError
from mirror.core.oci import Digest, parse_digest
from mirror.storage.base import BlobInfo, RepositoryRecord, Store
from mirror.storage.fsindex import RepositoryIndex, walk_repositories
from mirror.storage.sending import CachedSource, FileResponder, Responder
from mirror.storage.spool import Hashes, LocalSpool, Orphan, SpoolWriter

__all__ = ["LAYOUT_VERSION", "StoreLayoutError", "open_filesystem_store"]

T = TypeVar("T")
RunBlocking = Callable[..., Deferred[Any]]

#: The layout this code reads and writes (see the module docstring).
LAYOUT_VERSION = 2

_TEMP_NAMES = itertools.count()  # (next() on it is atomic: several threads write)

_UPLOAD_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class StoreLayoutError(Exception):
    """The directory holds a store this code cannot use; ``str()`` says why."""


def _publish(path: Path, final: Path, fd: int | None = None, *, new_directory: bool = True) -> None:
    """Make ``path`` durable and visible as ``final``: fsync, then rename.

    ``fd`` is the file's open descriptor when the caller has one (it is closed here, after
    the rename: a spool writer's descriptor holds the file's lock until it has left the
    spool, so another process's clean-up never takes it in between).  ``new_directory``
    False: ``final``'s directory is known to exist (one syscall fewer).
    """
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if new_directory and not os.path.isdir(final.parent):
            final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: temp file, then :func:`_publish`."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for _ in range(100):
        # Unique among live processes; one a dead process of the same pid left is skipped.
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{next(_TEMP_NAMES)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o644)
            break
        except FileNotFoundError:  # a new directory
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{path.parent}: no free temporary name")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    _publish(tmp, path, fd, new_directory=False)


def _create_empty(path: Path) -> None:
    """Create an empty file (a link): in place, without fsync, since it has no content to
    appear whole; a crash loses it or not, like any rename not yet committed."""
    flags = os.O_WRONLY | os.O_CREAT
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:  # a new directory
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    os.close(fd)


class _Layout:
    """Paths under the store's root (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.spool = root / "spool"
        self.repositories = root / "repositories"
        self.uploads = root / "uploads"
        self.lock = root / "gc.lock"
        self.version = root / "layout.json"
        self.index = root / "repositories.index"

    def blob(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.encoded[:2] / digest.encoded

    def repo(self, repo: str) -> Path:
        return self.repositories / repo

    def manifest_link(self, repo: str, digest: Digest) -> Path:
        return self.repo(repo) / "_manifests" / digest.algorithm / digest.encoded

    def tags(self, repo: str) -> Path:
        return self.repo(repo) / "_tags"

    def blob_link(self, repo: str, digest: Digest, *, fetched: bool = False) -> str:
        # A string, not a Path: it is looked up on every blob read.
        return f"{self.repositories}/{repo}/{'_fetched' if fetched else '_layers'}/{digest.algorithm}/{digest.encoded}"

    def referrers(self, repo: str, subject: Digest) -> Path:
        return self.repo(repo) / "_referrers" / subject.algorithm / subject.encoded

    def upload(self, upload_id: str) -> Path:
        if _UPLOAD_ID_RE.fullmatch(upload_id) is None:
            raise KeyError(upload_id)
        return self.uploads / upload_id


# blobs ------------------------------------------------------------------------------------------
class FsBlobWriter(SpoolWriter):
    """A spool file that commit publishes into ``blobs/`` (rename) once verified."""

    def __init__(self, layout: _Layout, spool: LocalSpool, run_blocking: RunBlocking, adopt: Orphan | None = None) -> None:
        super().__init__(spool, adopt)
        self._layout = layout
        self._run_blocking = run_blocking

    async def commit(self, expected: Digest) -> None:
        await self._run_blocking(self._commit, expected)

    def _commit(self, expected: Digest) -> None:
        self._file.verify(expected)
        _publish(self.path, self._layout.blob(expected), self._file.take_fd())


class FsBlobStore:
    """Content by digest under ``blobs/``."""

    def __init__(self, layout: _Layout, spool: LocalSpool, run_blocking: RunBlocking, run_small: RunBlocking) -> None:
        self._layout = layout
        self._spool = spool
        self._run_blocking = run_blocking
        self._run_small = run_small

    async def stat(self, digest: Digest) -> int | None:
        try:
            return self._layout.blob(digest).stat().st_size
        except FileNotFoundError:
            return None

    async def open(self, digest: Digest) -> Responder | None:
        try:
            file = open(self._layout.blob(digest), "rb", buffering=0)
        except FileNotFoundError:
            return None
        size = os.fstat(file.fileno()).st_size
        return FileResponder(file, CachedSource(size), size)

    async def read(self, digest: Digest, max_size: int) -> bytes | None:
        try:
            with open(self._layout.blob(digest), "rb", buffering=0) as f:
                data = f.read(max_size + 1)
        except FileNotFoundError:
            return None
        return data if len(data) <= max_size else None

    redirects = False  # served by this process

    async def redirect(self, digest: Digest) -> str | None:
        return None

    async def put(self, digest: Digest, data: bytes) -> None:
        await self._run_small(self._put, digest, data)

    def _put(self, digest: Digest, data: bytes) -> None:
        path = self._layout.blob(digest)
        try:
            os.utime(path)  # already there: it counts as just written (GC grace)
        except FileNotFoundError:
            _write_atomic(path, data)

    def writer(self, adopt: Orphan | None = None) -> FsBlobWriter:
        return FsBlobWriter(self._layout, self._spool, self._run_blocking, adopt)

    async def scan(self) -> list[BlobInfo]:
        found: list[BlobInfo] = await self._run_blocking(lambda: list(self._scan()))
        return found

    def _scan(self) -> Iterator[BlobInfo]:
        for alg_entry in os.scandir(self._layout.blobs):
            for prefix in os.scandir(alg_entry.path):
                for entry in os.scandir(prefix.path):
                    if entry.name.startswith("."):
                        continue
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue  # deleted meanwhile
                    yield BlobInfo(Digest(alg_entry.name, entry.name), st.st_size, st.st_mtime)

    async def delete_if_idle(self, digest: Digest, idle_before: float) -> int | None:
        freed: int | None = await self._run_blocking(self._delete_if_idle, digest, idle_before)
        return freed

    def _delete_if_idle(self, digest: Digest, idle_before: float) -> int | None:
        path = self._layout.blob(digest)
        try:
            st = path.stat()
            if st.st_mtime >= idle_before:
                return None
            os.unlink(path)
        except FileNotFoundError:
            return None
        return st.st_size


# repositories -----------------------------------------------------------------------------------
class FsMetadataStore:
    """Per-repository manifests, tags, blob links and referrers under ``repositories/``.

    Writes, deletes and listings run through ``run_small``; reads of one small file (a
    tag, a manifest's media type, whether a link exists) run at once (see the module
    docstring).  ``index`` lists the repositories (``None``: a read-only store of an
    earlier layout, walked instead).
    """

    def __init__(self, layout: _Layout, run_small: RunBlocking, index: RepositoryIndex | None) -> None:
        self._layout = layout
        self._run_small = run_small
        self._index = index

    async def _blocking(self, f: Callable[..., T], *args: object) -> T:
        result: T = await self._run_small(f, *args)
        return result

    def _write(self, repo: str, path: Path, data: bytes | None) -> None:
        """Write a file that makes ``repo`` a repository (under ``_manifests``, ``_tags`` or
        ``_layers``; ``None``: an empty link): its name goes into the index first."""
        if self._index is not None:
            self._index.add(repo)
        if data is None:
            _create_empty(path)
        else:
            _write_atomic(path, data)
        if self._index is not None:
            self._index.confirm(repo)

    async def link_manifest(self, repo: str, digest: Digest, media_type: str) -> None:
        await self._blocking(self._link_manifest, repo, digest, media_type)

    def _link_manifest(self, repo: str, digest: Digest, media_type: str) -> None:
        if self._manifest_media_type(repo, digest) != media_type:
            self._write(repo, self._layout.manifest_link(repo, digest), media_type.encode())

    async def manifest_media_type(self, repo: str, digest: Digest) -> str | None:
        return self._manifest_media_type(repo, digest)

    def _manifest_media_type(self, repo: str, digest: Digest) -> str | None:
        try:
            return self._layout.manifest_link(repo, digest).read_text() or None
        except FileNotFoundError:
            return None

    async def list_manifests(self, repo: str) -> list[Digest]:
        return await self._blocking(self._list_manifests, repo)

    def _list_manifests(self, repo: str) -> list[Digest]:
        return [digest for digest, _ in _digest_entries(self._layout.repo(repo) / "_manifests")]

    async def unlink_manifest(self, repo: str, digest: Digest) -> bool:
        return await self._blocking(_unlink, self._layout.manifest_link(repo, digest))

    async def set_tag(self, repo: str, tag: str, digest: Digest) -> None:
        await self._blocking(self._write, repo, self._layout.tags(repo) / tag, str(digest).encode())

    async def get_tag(self, repo: str, tag: str) -> Digest | None:
        return self._read_tag(repo, tag)

    def _read_tag(self, repo: str, tag: str) -> Digest | None:
        try:
            text = (self._layout.tags(repo) / tag).read_text()
        except FileNotFoundError:
            return None
        try:
            return parse_digest(text.strip())
        except RegistryError:
            return None

    async def tag_record(self, repo: str, tag: str) -> tuple[Digest, float] | None:
        path = self._layout.tags(repo) / tag
        try:
            with open(path, "rb") as f:
                text, written = f.read(200).decode("utf-8", "replace"), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        try:
            return parse_digest(text.strip()), written
        except RegistryError:
            return None

    async def delete_tag(self, repo: str, tag: str) -> None:
        await self._blocking(_unlink, self._layout.tags(repo) / tag)

    async def list_tags(self, repo: str) -> list[str] | None:
        return await self._blocking(self._list_tags, repo)

    def _list_tags(self, repo: str) -> list[str] | None:
        try:
            entries = os.scandir(self._layout.tags(repo))
        except FileNotFoundError:
            return [] if (self._layout.repo(repo) / "_manifests").is_dir() else None
        with entries:
            return sorted(e.name for e in entries if not e.name.startswith("."))

    async def had_tags(self, repo: str) -> bool:
        return self._layout.tags(repo).is_dir()

    async def link_blob(self, repo: str, digest: Digest, *, fetched: bool = False) -> None:
        await self._blocking(self._link_blob, repo, digest, fetched)

    def _link_blob(self, repo: str, digest: Digest, fetched: bool) -> None:
        path = Path(self._layout.blob_link(repo, digest, fetched=fetched))
        if path.exists():
            return
        if fetched:  # _fetched alone does not make a repository: not indexed
            _create_empty(path)
        else:
            self._write(repo, path, None)

    async def has_blob_link(self, repo: str, digest: Digest, *, fetched: bool = False) -> bool:
        return os.path.exists(self._layout.blob_link(repo, digest, fetched=fetched))

    async def unlink_blob(self, repo: str, digest: Digest) -> bool:
        return await self._blocking(self._unlink_blob, repo, digest)

    def _unlink_blob(self, repo: str, digest: Digest) -> bool:
        pushed = _unlink(Path(self._layout.blob_link(repo, digest)))
        return _unlink(Path(self._layout.blob_link(repo, digest, fetched=True))) or pushed

    async def add_referrer(self, repo: str, subject: Digest, descriptor: Mapping[str, object]) -> None:
        digest = parse_digest(str(descriptor["digest"]))
        path = self._layout.referrers(repo, subject) / digest.algorithm / digest.encoded
        await self._blocking(_write_atomic, path, json.dumps(descriptor, sort_keys=True).encode())

    async def referrers(self, repo: str, subject: Digest) -> list[dict[str, object]]:
        return await self._blocking(self._referrers, repo, subject)

    def _referrers(self, repo: str, subject: Digest) -> list[dict[str, object]]:
        found = []
        for path in sorted(self._layout.referrers(repo, subject).glob("*/*")):
            try:
                found.append(json.loads(path.read_bytes()))
            except (OSError, ValueError):
                continue  # removed meanwhile, or a temp file
        return found

    async def remove_referrer(self, repo: str, subject: Digest, digest: Digest) -> None:
        await self._blocking(_unlink, self._layout.referrers(repo, subject) / digest.algorithm / digest.encoded)

    async def repositories(self, after: str | None = None, limit: int | None = None) -> list[str]:
        return await self._blocking(self._repositories, after, limit)

    def _repositories(self, after: str | None, limit: int | None) -> list[str]:
        if self._index is not None:
            return self._index.page(after, limit)
        names = walk_repositories(self._layout.repositories)
        start = bisect.bisect_right(names, after) if after is not None else 0
        return names[start : None if limit is None else start + limit]

    async def scan_repository(self, repo: str) -> RepositoryRecord:
        return await self._blocking(self._scan_repository, repo)

    def _scan_repository(self, repo: str) -> RepositoryRecord:
        base = self._layout.repo(repo)
        manifests: dict[Digest, float] = {}
        for digest, entry in _digest_entries(base / "_manifests"):
            try:
                manifests[digest] = entry.stat().st_mtime
            except FileNotFoundError:
                continue
        links = {digest for digest, _ in _digest_entries(base / "_layers")}
        fetched = {digest for digest, _ in _digest_entries(base / "_fetched")}
        tags = {}
        for tag in self._list_tags(repo) or []:
            target = self._read_tag(repo, tag)
            if target is not None:
                tags[tag] = target
        return RepositoryRecord(manifests, tags, links, fetched)


def _digest_entries(directory: Path) -> Iterator[tuple[Digest, os.DirEntry[str]]]:
    """``<alg>/<hex>`` entries under ``directory`` (temporary files skipped)."""
    try:
        algorithms = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for alg_entry in algorithms:
        for entry in os.scandir(alg_entry.path):
            if not entry.name.startswith("."):
                yield Digest(alg_entry.name, entry.name), entry


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# uploads ----------------------------------------------------------------------------------------
class FsUploadStore:
    """Upload sessions under ``uploads/<id>/``: appended in place, published into ``blobs/``."""

    def __init__(self, layout: _Layout, run_blocking: RunBlocking, run_small: RunBlocking) -> None:
        self._layout = layout
        self._run_blocking = run_blocking
        self._run_small = run_small
        self._hashes: dict[str, Hashes] = {}  # running sha256 per session, while this process lives

    async def create(self, repo: str) -> str:
        upload_id = str(uuid.uuid4())  # the spec: the upload location carries a UUID
        await self._run_small(self._create, upload_id, repo)
        return upload_id

    def _create(self, upload_id: str, repo: str) -> None:
        # Not fsynced, as the data appended to it is not: a session a power cut loses (or
        # cuts short) is started again by its client.  Nothing reads it before this returns.
        directory = self._layout.upload(upload_id)
        directory.mkdir()
        with open(directory / "repo", "x") as f:
            f.write(repo)
        os.close(os.open(directory / "data", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    async def repository_of(self, upload_id: str) -> str | None:
        try:
            return (self._layout.upload(upload_id) / "repo").read_text()
        except (KeyError, FileNotFoundError, NotADirectoryError):
            return None

    async def size(self, upload_id: str) -> int:
        return (self._layout.upload(upload_id) / "data").stat().st_size

    def _running_hash(self, upload_id: str, algorithm: str = "sha256") -> Hashes:
        """The session's hash, rebuilt from its data after a restart (or for another algorithm)."""
        path = self._layout.upload(upload_id) / "data"
        cached = self._hashes.get(upload_id)
        if algorithm == "sha256" and cached is not None and cached.size == path.stat().st_size:
            return cached
        hashes = Hashes.of_file(path, algorithm)
        if algorithm == "sha256":
            self._hashes[upload_id] = hashes
        return hashes

    async def append(self, upload_id: str, source: BinaryIO) -> int:
        size: int = await self._run_blocking(self._append, upload_id, source)
        return size

    def _append(self, upload_id: str, source: BinaryIO) -> int:
        hashes = self._running_hash(upload_id)
        with open(self._layout.upload(upload_id) / "data", "ab") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
                hashes.update(chunk)
        return hashes.size

    async def commit(self, upload_id: str, expected: Digest) -> int:
        size: int = await self._run_blocking(self._commit, upload_id, expected)
        return size

    def _commit(self, upload_id: str, expected: Digest) -> int:
        hashes = self._running_hash(upload_id, expected.algorithm)
        try:
            hashes.verify(expected)
            final = self._layout.blob(expected)
            if final.exists():
                os.utime(final)  # content-addressed: what we have is the same; just written again
            else:
                _publish(self._layout.upload(upload_id) / "data", final)
        finally:
            self._delete(upload_id)
        return hashes.size

    async def delete(self, upload_id: str) -> None:
        self._hashes.pop(upload_id, None)
        try:
            gone = not self._layout.upload(upload_id).is_dir()  # (a commit removed it already)
        except KeyError:
            return
        if not gone:
            await self._run_small(self._delete, upload_id)

    def _delete(self, upload_id: str) -> None:
        self._hashes.pop(upload_id, None)
        try:
            directory = self._layout.upload(upload_id)
        except KeyError:
            return
        try:
            for name in ("data", "repo"):
                _unlink(directory / name)
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # something else in it
            shutil.rmtree(directory, ignore_errors=True)

    async def stale(self, idle_since: float) -> list[str]:
        found: list[str] = await self._run_blocking(self._stale, idle_since)
        return found

    def _stale(self, idle_since: float) -> list[str]:
        stale = []
        for entry in os.scandir(self._layout.uploads):
            try:
                last = max(os.stat(os.path.join(entry.path, name)).st_mtime for name in ("data", "repo"))
            except FileNotFoundError:
                last = 0.0
            if last < idle_since:
                stale.append(entry.name)
        return stale


# access record and GC lock ----------------------------------------------------------------------
class FsAccessRecord:
    """Last reads as the blob files' mtimes: one ``utime`` per blob per flush."""

    def __init__(self, layout: _Layout, run_small: RunBlocking) -> None:
        self._layout = layout
        self._run_small = run_small

    async def record(self, accessed: Mapping[Digest, float]) -> None:
        if accessed:
            await self._run_small(self._record, dict(accessed))

    def _record(self, accessed: Mapping[Digest, float]) -> None:
        for digest, when in accessed.items():
            path = self._layout.blob(digest)
            try:
                if os.stat(path).st_mtime < when:
                    os.utime(path, (when, when))
            except FileNotFoundError:
                pass

    async def snapshot(self) -> Mapping[Digest, float]:
        return {}  # the reads are the mtimes that BlobStore.scan reports already


class FsGcLock:
    """``flock`` on ``gc.lock``: per open file, so it works between processes."""

    def __init__(self, layout: _Layout, run_blocking: RunBlocking, run_small: RunBlocking) -> None:
        self._layout = layout
        self._run_blocking = run_blocking  # the exclusive hold waits for pushes: not with the small calls
        self._run_small = run_small

    def _open(self) -> int:
        return os.open(self._layout.lock, os.O_RDWR | os.O_CREAT, 0o644)

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        fd: int = await self._run_blocking(self._open)
        try:
            await self._run_blocking(fcntl.flock, fd, fcntl.LOCK_EX)  # waits for pushes in progress
            yield
        finally:
            os.close(fd)

    async def try_shared(self) -> object | None:
        handle: int | None = await self._run_small(self._try_shared)
        return handle

    def _try_shared(self) -> int | None:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    async def release(self, handle: object) -> None:
        assert isinstance(handle, int)
        os.close(handle)


# opening ----------------------------------------------------------------------------------------
def _check_layout(layout: _Layout) -> int:
    """The store's layout version: 1 without ``layout.json`` (every release before the
    index); refuse any other than 1 and this release's."""
    try:
        doc = json.loads(layout.version.read_bytes())
        version = doc.get("layout") if isinstance(doc, dict) else None
    except FileNotFoundError:
        return 1
    except (OSError, ValueError) as e:
        raise StoreLayoutError(f"{layout.version}: unreadable ({e})") from None
    if version not in (1, LAYOUT_VERSION):
        raise StoreLayoutError(
            f"{layout.root}: store layout version {version!r}, but this release reads version {LAYOUT_VERSION}"
        )
    return int(version)


def _open_index(layout: _Layout) -> RepositoryIndex | None:
    """The store's repository index; a store of layout 1 (or whose index is gone) is
    migrated first: its repositories are walked into the index, then ``layout.json`` says
    2.  A store this process cannot write is served as it is: ``None``, listings walk."""
    index = RepositoryIndex(layout.index, layout.repositories)
    if _check_layout(layout) == LAYOUT_VERSION and layout.index.exists():
        return index
    try:
        index.build()
        _write_atomic(layout.version, json.dumps({"layout": LAYOUT_VERSION}).encode())
    except OSError as e:
        if isinstance(e, PermissionError) or e.errno == errno.EROFS:
            return None
        raise
    return index


def _run_here(f: Callable[..., T], *args: object) -> Deferred[T]:
    return maybeDeferred(f, *args)


def open_filesystem_store(root: Path, run_blocking: RunBlocking = _run_here, run_small: RunBlocking | None = None) -> Store:
    """The store under directory ``root`` (created if missing).

    ``run_blocking`` runs fsyncs and large copies (the service passes ``deferToThread``;
    the default runs them at once); ``run_small`` (default: ``run_blocking``) the short
    ones: small files, the index, the GC lock's shared hold (the service passes
    :class:`~mirror.storage.iothreads.IoThreads`).  A store of layout 1 is migrated here
    (:func:`_open_index`: a walk of its repositories, before anything is served).

    Raises:
        StoreLayoutError: the directory holds a store of another layout version.
    """
    layout = _Layout(Path(root))
    for directory in (layout.blobs, layout.spool, layout.repositories, layout.uploads):
        directory.mkdir(parents=True, exist_ok=True)
    index = _open_index(layout)
    small = run_blocking if run_small is None else run_small
    spool = LocalSpool(layout.spool)
    return Store(
        blobs=FsBlobStore(layout, spool, run_blocking, small),
        metadata=FsMetadataStore(layout, small, index),
        uploads=FsUploadStore(layout, run_blocking, small),
        access=FsAccessRecord(layout, small),
        gc_lock=FsGcLock(layout, run_blocking, small),
        spool=spool,
        description=f"filesystem {layout.root}",
    )
