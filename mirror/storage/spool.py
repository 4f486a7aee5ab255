"""A node's local scratch space: where a blob is written and hashed before it is verified.

Every backend writes new blobs the same way: bytes go to a file in the spool directory,
hashed as they arrive, while followers (clients of a fill under way) read the file as it
grows.  What differs is only how a verified file is published: the filesystem store
renames it into ``blobs/``, object storage uploads it.  :class:`SpoolFile` is the shared
part (:class:`SpoolWriter`, the writer without its commit); :class:`LocalSpool` is the
directory (clean-up after a crash, readiness).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

from mirror.core.oci import Digest, Hasher
from mirror.storage.base import DigestMismatch
from mirror.storage.sending import FileResponder, Responder, Source

__all__ = ["Hashes", "LocalSpool", "SpoolFile", "SpoolWriter"]


class Hashes:
    """The running sha256 of written bytes, plus one other algorithm when asked."""

    def __init__(self) -> None:
        self.sha256: Hasher = hashlib.sha256()
        self.other: Hasher | None = None
        self.size = 0

    def also(self, algorithm: str) -> None:
        if algorithm != "sha256" and self.other is None:
            self.other = hashlib.new(algorithm)

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.other is not None:
            self.other.update(data)
        self.size += len(data)

    def digest(self, algorithm: str = "sha256") -> Digest:
        if algorithm != "sha256" and self.other is not None and self.other.name == algorithm:
            return Digest(algorithm, self.other.hexdigest())
        return Digest("sha256", self.sha256.hexdigest())

    def verify(self, expected: Digest) -> None:
        """Raise :class:`DigestMismatch` unless the bytes hash to ``expected``."""
        actual = self.digest(expected.algorithm)
        if actual != expected:
            raise DigestMismatch(expected, actual, self.size)

    @classmethod
    def of_file(cls, path: Path, algorithm: str) -> Hashes:
        hashes = cls()
        hashes.also(algorithm)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                hashes.update(chunk)
        return hashes


class SpoolFile:
    """One blob being written to the spool: appended, hashed, followed, then verified.

    The backend's writer publishes it (:meth:`take_fd` hands over the open descriptor)
    or :meth:`abort` removes it.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / secrets.token_hex(16)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.hashes = Hashes()

    @property
    def size(self) -> int:
        return self.hashes.size

    def write(self, data: bytes) -> None:
        assert self._fd is not None, "write after commit or abort"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.hashes.update(data)

    def follow(self, source: Source, size: int | None) -> Responder:
        return FileResponder(open(self.path, "rb", buffering=0), source, size)

    def verify(self, expected: Digest) -> None:
        """Check the digest; on a mismatch remove the file and raise :class:`DigestMismatch`."""
        assert self._fd is not None, "commit after commit or abort"
        try:
            self.hashes.verify(expected)
        except DigestMismatch:
            self.abort()
            raise

    def take_fd(self) -> int:
        """The open descriptor, for the caller to publish and close (after :meth:`verify`)."""
        assert self._fd is not None, "commit after commit or abort"
        fd, self._fd = self._fd, None
        return fd

    def abort(self) -> None:
        """Close and remove the file.  Safe to call more than once, and after publishing."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class SpoolWriter:
    """A :class:`~mirror.storage.base.BlobWriter` over one spool file: everything but
    :meth:`commit`, which each backend writes (how a verified file is published)."""

    def __init__(self, spool: LocalSpool) -> None:
        self._file = spool.new_file()

    @property
    def path(self) -> Path:
        return self._file.path

    @property
    def size(self) -> int:
        return self._file.size

    def hash_also(self, digest: Digest) -> None:
        self._file.hashes.also(digest.algorithm)

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def actual_digest(self, algorithm: str = "sha256") -> Digest:
        return self._file.hashes.digest(algorithm)

    def follow(self, source: Source, size: int | None) -> Responder:
        return self._file.follow(source, size)

    def abort(self) -> None:
        self._file.abort()


class LocalSpool:
    """The spool directory: partial writes of a dead process are removed, and a probe
    write says whether new content can be taken."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def new_file(self) -> SpoolFile:
        return SpoolFile(self.directory)

    async def clean(self, idle_for: float) -> int:
        removed = 0
        cutoff = time.time() - idle_for
        for entry in os.scandir(self.directory):
            try:
                if not idle_for or entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass  # committed or aborted meanwhile
        return removed

    async def check_writable(self) -> str | None:
        probe = self.directory / f".ready-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"ok")
            os.unlink(probe)
        except OSError as e:
            return f"store not writable: {e.strerror}"
        return None
