"""The store on a local filesystem directory.

Layout under ``root``::

    blobs/<algorithm>/<first two hex>/<hex>       content (manifests too); its mtime is
                                                   the last access (the access record)
    spool/<random>                                 blobs being written; renamed into
                                                   blobs/ only after verify + fsync
    repositories/<name...>/_manifests/<alg>/<hex>  a manifest the repository holds; the
                                                   file holds its media type
    repositories/<name...>/_tags/<tag>             the digest the tag points at
    gc.lock                                        flock: GC deletes (exclusive) vs pushes
                                                   referencing existing blobs (shared)
    repositories/<name...>/_layers/<alg>/<hex>     a blob a hosted repository holds (empty)
    repositories/<name...>/_referrers/<alg>/<subject hex>/<alg>/<hex>
                                                   descriptor (JSON) of a manifest whose
                                                   subject is that digest
    uploads/<id>/data, uploads/<id>/repo           an upload session (push): the bytes
                                                   so far and the repository it is for

``_manifests``, ``_tags``, ``_layers`` and ``_referrers`` cannot collide with a nested repository, since a name
component cannot start with ``_``.  Every path component comes from a checked name,
tag or digest (:mod:`mirror.oci`), so nothing reaches outside ``root``.

Crash safety: a blob appears under ``blobs/`` only whole and verified (fsync, then
rename); small files are written to a temporary name, fsynced and renamed.  A tag or
link may outlive its blob after a crash or eviction; readers treat a missing blob as a
miss.  Stale spool files are removed at start-up.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mirror.oci import Digest, parse_digest
from mirror.store import DigestMismatch

__all__ = ["FilesystemStore"]

_UPLOAD_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class FilesystemBlobWriter:
    """Spools a blob to ``spool/``, hashing as it goes; commit verifies and renames."""

    def __init__(self, store: FilesystemStore) -> None:
        self._store = store
        self.path = store.root / "spool" / secrets.token_hex(16)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._sha256 = hashlib.sha256()
        self._other: hashlib._Hash | None = None  # when a digest is not sha256
        self.size = 0

    def hash_also(self, digest: Digest) -> None:
        """Hash with ``digest``'s algorithm too (call before the first write)."""
        if digest.algorithm != "sha256" and self._other is None:
            self._other = digest.hasher()

    def write(self, data: bytes) -> None:
        assert self._fd is not None, "write after commit or abort"
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._sha256.update(data)
        if self._other is not None:
            self._other.update(data)
        self.size += len(data)

    def open_spool(self) -> BinaryIO:
        return open(self.path, "rb", buffering=0)

    def actual_digest(self, algorithm: str = "sha256") -> Digest:
        """The digest of what was written, in ``algorithm`` if it was hashed with it."""
        if algorithm != "sha256" and self._other is not None and self._other.name == algorithm:
            return Digest(algorithm, self._other.hexdigest())
        return Digest("sha256", self._sha256.hexdigest())

    def commit(self, expected: Digest) -> None:
        assert self._fd is not None, "commit after commit or abort"
        actual = self.actual_digest(expected.algorithm)
        if actual != expected:
            self.abort()
            raise DigestMismatch(expected, actual, self.size)
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self._store.blob_path(expected)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, final)

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class FilesystemStore:
    """:class:`mirror.store.Store` on a directory tree (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._upload_hashes: dict[str, tuple[hashlib._Hash, int]] = {}
        for sub in ("blobs", "spool", "repositories", "uploads"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def clean_spool(self, idle_for: float = 0.0) -> int:
        """Delete spool files left by a previous process (call at start-up only); with
        ``idle_for``, keep files written within that many seconds (another process, e.g.
        ``mirror warm``, may be filling them)."""
        removed = 0
        cutoff = time.time() - idle_for
        for entry in os.scandir(self.root / "spool"):
            try:
                if not idle_for or entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass  # committed or aborted meanwhile
        return removed

    # paths -----------------------------------------------------------------------------
    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.encoded[:2] / digest.encoded

    def _repo(self, repo: str) -> Path:
        return self.root / "repositories" / repo

    # blobs -----------------------------------------------------------------------------
    def blob_size(self, digest: Digest) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: Digest) -> BinaryIO | None:
        try:
            return open(self.blob_path(digest), "rb", buffering=0)
        except FileNotFoundError:
            return None

    def read_blob(self, digest: Digest, max_size: int) -> bytes | None:
        f = self.open_blob(digest)
        if f is None:
            return None
        with f:
            data = f.read(max_size + 1)
        return data if len(data) <= max_size else None

    def put_blob(self, digest: Digest, data: bytes) -> None:
        path = self.blob_path(digest)
        try:
            os.utime(path)  # already there: it counts as just written (GC grace)
        except FileNotFoundError:
            _write_atomic(path, data)

    def new_writer(self) -> FilesystemBlobWriter:
        return FilesystemBlobWriter(self)

    def touch(self, accessed: Iterable[tuple[Digest, float]]) -> None:
        for digest, when in accessed:
            try:
                os.utime(self.blob_path(digest), (when, when))
            except FileNotFoundError:
                pass

    def last_access(self, digest: Digest) -> float | None:
        """The recorded last access of a stored blob."""
        try:
            return self.blob_path(digest).stat().st_mtime
        except FileNotFoundError:
            return None

    # repositories ----------------------------------------------------------------------
    def _link_path(self, repo: str, digest: Digest) -> Path:
        return self._repo(repo) / "_manifests" / digest.algorithm / digest.encoded

    def link_manifest(self, repo: str, digest: Digest, media_type: str) -> None:
        path = self._link_path(repo, digest)
        if self.manifest_media_type(repo, digest) != media_type:
            _write_atomic(path, media_type.encode())

    def manifest_media_type(self, repo: str, digest: Digest) -> str | None:
        try:
            return self._link_path(repo, digest).read_text() or None
        except FileNotFoundError:
            return None

    def set_tag(self, repo: str, tag: str, digest: Digest) -> None:
        _write_atomic(self._repo(repo) / "_tags" / tag, str(digest).encode())

    def get_tag(self, repo: str, tag: str) -> Digest | None:
        try:
            text = (self._repo(repo) / "_tags" / tag).read_text()
        except FileNotFoundError:
            return None
        try:
            return parse_digest(text.strip())
        except Exception:
            return None

    def delete_tag(self, repo: str, tag: str) -> None:
        try:
            os.unlink(self._repo(repo) / "_tags" / tag)
        except FileNotFoundError:
            pass

    def list_tags(self, repo: str) -> list[str] | None:
        base = self._repo(repo)
        try:
            entries = os.scandir(base / "_tags")
        except FileNotFoundError:
            return [] if (base / "_manifests").is_dir() else None
        with entries:
            return sorted(e.name for e in entries if not e.name.startswith("."))

    def had_tags(self, repo: str) -> bool:
        return (self._repo(repo) / "_tags").is_dir()

    def repositories(self) -> Iterator[str]:
        top = self.root / "repositories"

        def walk(directory: Path, prefix: str) -> Iterator[str]:
            try:
                names = sorted(e.name for e in os.scandir(directory) if e.is_dir())
            except FileNotFoundError:
                return
            if "_manifests" in names or "_tags" in names or "_layers" in names:
                yield prefix
            for name in names:
                if not name.startswith("_"):
                    yield from walk(directory / name, f"{prefix}/{name}" if prefix else name)

        # Sorting per directory level is not lexical order of full names ("a/b" vs "a-c"),
        # so sort the (small) result once.
        yield from sorted(walk(top, ""))

    def unlink_manifest(self, repo: str, digest: Digest) -> bool:
        try:
            os.unlink(self._link_path(repo, digest))
        except FileNotFoundError:
            return False
        return True

    # blob links (hosted repositories) --------------------------------------------------
    def _blob_link(self, repo: str, digest: Digest) -> Path:
        return self._repo(repo) / "_layers" / digest.algorithm / digest.encoded

    def link_blob(self, repo: str, digest: Digest) -> None:
        path = self._blob_link(repo, digest)
        if not path.exists():
            _write_atomic(path, b"")

    def has_blob_link(self, repo: str, digest: Digest) -> bool:
        return self._blob_link(repo, digest).exists()

    def unlink_blob(self, repo: str, digest: Digest) -> bool:
        try:
            os.unlink(self._blob_link(repo, digest))
        except FileNotFoundError:
            return False
        return True

    # referrers -------------------------------------------------------------------------
    def _referrer_dir(self, repo: str, subject: Digest) -> Path:
        return self._repo(repo) / "_referrers" / subject.algorithm / subject.encoded

    def add_referrer(self, repo: str, subject: Digest, descriptor: dict[str, object]) -> None:
        digest = parse_digest(str(descriptor["digest"]))
        path = self._referrer_dir(repo, subject) / digest.algorithm / digest.encoded
        _write_atomic(path, json.dumps(descriptor, sort_keys=True).encode())

    def referrers(self, repo: str, subject: Digest) -> list[dict[str, object]]:
        base = self._referrer_dir(repo, subject)
        found = []
        for path in sorted(base.glob("*/*")):
            try:
                found.append(json.loads(path.read_bytes()))
            except (OSError, ValueError):
                continue  # removed meanwhile, or a temp file
        return found

    def remove_referrer(self, repo: str, subject: Digest, digest: Digest) -> None:
        try:
            os.unlink(self._referrer_dir(repo, subject) / digest.algorithm / digest.encoded)
        except FileNotFoundError:
            pass

    # upload sessions -------------------------------------------------------------------
    def _upload_dir(self, upload_id: str) -> Path:
        if _UPLOAD_ID_RE.fullmatch(upload_id) is None:
            raise KeyError(upload_id)
        return self.root / "uploads" / upload_id

    def create_upload(self, repo: str) -> str:
        upload_id = str(uuid.uuid4())  # the spec: the upload location carries a UUID
        directory = self._upload_dir(upload_id)
        directory.mkdir()
        (directory / "data").touch()
        _write_atomic(directory / "repo", repo.encode())
        return upload_id

    def upload_repo(self, upload_id: str) -> str | None:
        try:
            return (self._upload_dir(upload_id) / "repo").read_text()
        except (KeyError, FileNotFoundError, NotADirectoryError):
            return None

    def upload_size(self, upload_id: str) -> int:
        return (self._upload_dir(upload_id) / "data").stat().st_size

    def _upload_hasher(self, upload_id: str, algorithm: str = "sha256") -> tuple[hashlib._Hash, int]:
        """The running hash of an upload, rebuilt from its data after a restart."""
        path = self._upload_dir(upload_id) / "data"
        size = path.stat().st_size
        cached = self._upload_hashes.get(upload_id)
        if algorithm == "sha256" and cached is not None and cached[1] == size:
            return cached
        hasher = hashlib.new(algorithm)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        if algorithm == "sha256":
            self._upload_hashes[upload_id] = (hasher, size)
        return hasher, size

    def append_upload(self, upload_id: str, source: BinaryIO) -> int:
        hasher, size = self._upload_hasher(upload_id)
        with open(self._upload_dir(upload_id) / "data", "ab") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
                hasher.update(chunk)
                size += len(chunk)
        self._upload_hashes[upload_id] = (hasher, size)
        return size

    def commit_upload(self, upload_id: str, expected: Digest) -> int:
        directory = self._upload_dir(upload_id)
        hasher, size = self._upload_hasher(upload_id, expected.algorithm)
        actual = Digest(expected.algorithm, hasher.hexdigest())
        if actual != expected:
            self.delete_upload(upload_id)
            raise DigestMismatch(expected, actual, size)
        data = directory / "data"
        final = self.blob_path(expected)
        if final.exists():
            self.delete_upload(upload_id)  # content-addressed: what we have is the same
            os.utime(final)  # just written again, as far as GC's grace period goes
            return size
        fd = os.open(data, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(data, final)
        self.delete_upload(upload_id)
        return size

    def delete_upload(self, upload_id: str) -> None:
        self._upload_hashes.pop(upload_id, None)
        try:
            shutil.rmtree(self._upload_dir(upload_id))
        except (KeyError, FileNotFoundError):
            pass

    def stale_uploads(self, idle_since: float) -> list[str]:
        stale = []
        for entry in os.scandir(self.root / "uploads"):
            try:
                last = max(os.stat(os.path.join(entry.path, name)).st_mtime for name in ("data", "repo"))
            except FileNotFoundError:
                last = 0.0
            if last < idle_since:
                stale.append(entry.name)
        return stale

    # garbage collection ----------------------------------------------------------------
    def scan_blobs(self) -> Iterator[tuple[Digest, int, float]]:
        """Every stored blob with its size and last access (mtime)."""
        for alg_entry in os.scandir(self.root / "blobs"):
            for prefix in os.scandir(alg_entry.path):
                for entry in os.scandir(prefix.path):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue  # deleted meanwhile
                    if entry.name.startswith("."):
                        continue
                    yield Digest(alg_entry.name, entry.name), st.st_size, st.st_mtime

    def scan_repository(self, repo: str) -> tuple[dict[Digest, float], dict[str, Digest], set[Digest]]:
        """A repository's manifest links (with when they were written), tags and blob links."""
        base = self._repo(repo)
        manifests: dict[Digest, float] = {}
        links: set[Digest] = set()
        for sub, into in (("_manifests", manifests), ("_layers", links)):
            try:
                algorithms = list(os.scandir(base / sub))
            except FileNotFoundError:
                continue
            for alg_entry in algorithms:
                for entry in os.scandir(alg_entry.path):
                    if entry.name.startswith("."):
                        continue
                    digest = Digest(alg_entry.name, entry.name)
                    if isinstance(into, dict):
                        try:
                            into[digest] = entry.stat().st_mtime
                        except FileNotFoundError:
                            continue
                    else:
                        into.add(digest)
        tags = {}
        for tag in self.list_tags(repo) or []:
            digest = self.get_tag(repo, tag)
            if digest is not None:
                tags[tag] = digest
        return manifests, tags, links

    def delete_blob_if_idle(self, digest: Digest, idle_before: float) -> int | None:
        """Delete a blob unless it was accessed or written at/after ``idle_before``.

        Call it holding :meth:`gc_lock`, so that a push that has just touched the blob
        (under :meth:`try_push_lock`) is seen.  Returns the bytes freed, or None.
        """
        path = self.blob_path(digest)
        try:
            st = path.stat()
            if st.st_mtime >= idle_before:
                return None
            os.unlink(path)
        except FileNotFoundError:
            return None
        return st.st_size

    def _lock_file(self) -> int:
        return os.open(self.root / "gc.lock", os.O_RDWR | os.O_CREAT, 0o644)

    @contextmanager
    def gc_lock(self) -> Iterator[None]:
        """Exclusive against pushes (held by GC while it deletes a batch of blobs)."""
        fd = self._lock_file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def try_push_lock(self) -> int | None:
        """A shared lock held while a push references existing blobs; None if GC is
        deleting right now (try again shortly).  Release with :meth:`release_lock`."""
        fd = self._lock_file()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def release_lock(self, handle: int) -> None:
        """Release a lock from :meth:`try_push_lock`."""
        os.close(handle)
