"""A node's local scratch space: where a blob is written and hashed before it is verified.

Every backend writes new blobs the same way: bytes go to a file in the spool directory,
hashed as they arrive, while followers (clients of a fill under way) read the file as it
grows.  What differs is only how a verified file is published: the filesystem store
renames it into ``blobs/``, object storage uploads it.  :class:`SpoolFile` is the shared
part (:class:`SpoolWriter`, the writer without its commit); :class:`LocalSpool` is the
directory (clean-up after a crash, readiness).

A writer holds an exclusive ``flock`` on its file for as long as it has it open (until
the file has left the spool: renamed into the store, or uploaded and removed), and the
kernel lets go of it when the process dies, however it dies.  So the clean-up at start
removes exactly the files no live process is writing — a ``kill -9`` leaves nothing
behind once the service is up again — while the fills of a second service or a
``mirror warm`` on the same store go on untouched.  The spool is local scratch space:
on NFS, Linux emulates ``flock`` with POSIX locks, which a process drops when it closes
*any* descriptor of the file (a follower's), so a spool shared over NFS is not protected;
where locks are not supported at all, writers go on unlocked (and say so once) and the
clean-up removes nothing it cannot lock.

A fill from an upstream leaves a note beside its file (``<name>.fill``: the digest, the
upstream and the repository, :class:`FillNote`).  A restarted service takes the dead
process's noted files (:meth:`LocalSpool.take_orphans`, locking them) before the
clean-up, and resumes each fill from the bytes on disk, re-hashed
(:meth:`SpoolFile.adopted`), instead of downloading them again.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
from pathlib import Path

import attrs

from twisted.logger import Logger

from mirror.core.oci import Digest, Hasher
from mirror.storage.base import DigestMismatch
from mirror.storage.sending import FileResponder, Responder, Source

__all__ = ["FillNote", "Hashes", "LocalSpool", "Orphan", "SpoolFile", "SpoolWriter"]

_log = Logger()
#: The name of a spool file (what :class:`SpoolFile` creates; the clean-up touches no other).
_SPOOL_NAME = re.compile(r"[0-9a-f]{32}")
#: The name of a spool file's note.
_NOTE_NAME = re.compile(r"([0-9a-f]{32})\.fill")
#: Bytes written by one ``writev`` and then hashed, in :meth:`SpoolFile.write`: small
#: enough to stay in a CPU's cache between the two (measured here: hashing a group right
#: after writing it costs up to a third less than a 1 MiB chunk written, then hashed).
WRITE_GROUP = 256 * 1024
#: Buffers one ``writev`` takes at most (Linux's IOV_MAX).
_IOV_MAX = 1024


def _note_path(path: Path) -> Path:
    return path.with_name(path.name + ".fill")


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@attrs.frozen
class FillNote:
    """What a spool file is the fill of: enough for a restarted process to resume it."""

    digest: str
    registry: str  # the upstream's registry name
    repository: str  # the repository as the upstream names it

    def dumps(self) -> bytes:
        return json.dumps(attrs.asdict(self)).encode()

    @classmethod
    def loads(cls, data: bytes) -> FillNote | None:
        try:
            doc = json.loads(data)
            note = cls(doc["digest"], doc["registry"], doc["repository"])
        except (ValueError, KeyError, TypeError):
            return None
        return note if all(isinstance(v, str) for v in attrs.astuple(note)) else None


class Orphan:
    """A dead process's unfinished fill, taken by this one: its file is open read-write
    and locked until a writer adopts it (:meth:`SpoolFile.adopted`), or this process lets
    it go (:meth:`discard`, :meth:`release`)."""

    def __init__(self, path: Path, fd: int, note: FillNote) -> None:
        self.path = path
        self.note = note
        self._fd: int | None = fd

    def take_fd(self) -> int:
        """The descriptor, for a writer that takes the file over (and its lock) from here."""
        assert self._fd is not None, "an orphan adopted or let go already"
        fd, self._fd = self._fd, None
        return fd

    def discard(self) -> None:
        """Not to be resumed after all: remove it.  Does nothing once a writer adopted it
        (or it was let go), so callers may call it on every path."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _unlink(_note_path(self.path))
        _unlink(self.path)
        os.close(fd)

    def release(self) -> None:
        """Let it go, file and note kept, for another process to resume."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


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
        while True:
            path = directory / secrets.token_hex(16)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            if _lock(fd) and _names(path, fd):
                break
            os.close(fd)  # a clean-up holds or took it between its creation and the lock: another name
        self.path = path
        self._fd: int | None = fd
        self.hashes = Hashes()

    @classmethod
    def adopted(cls, orphan: Orphan) -> SpoolFile:
        """A dead process's file, to be written on from its end: its bytes are hashed
        again (blocking: run it in a thread), with its digest's algorithm too."""
        file = cls.__new__(cls)
        file.path = orphan.path
        file.hashes = Hashes.of_file(orphan.path, orphan.note.digest.partition(":")[0])
        file._fd = orphan.take_fd()
        os.lseek(file._fd, 0, os.SEEK_END)
        return file

    @property
    def size(self) -> int:
        return self.hashes.size

    def note(self, note: FillNote) -> None:
        """Say beside the file what it is the fill of (see the module docstring)."""
        _note_path(self.path).write_bytes(note.dumps())

    def write(self, *chunks: bytes) -> None:
        """Append ``chunks`` and hash them: a group of about :data:`WRITE_GROUP` bytes at a
        time goes to the file in one ``writev`` and is hashed right after, while it is
        still in the CPU's cache (the hash is most of a fill's CPU time)."""
        assert self._fd is not None, "write after commit or abort"
        group: list[bytes] = []
        size = 0
        for chunk in chunks:
            group.append(chunk)
            size += len(chunk)
            if size >= WRITE_GROUP or len(group) >= _IOV_MAX:
                self._write_group(group, size)
                group, size = [], 0
        if group:
            self._write_group(group, size)

    def _write_group(self, group: list[bytes], size: int) -> None:
        assert self._fd is not None
        written = os.writev(self._fd, group)
        if written < size:  # a short write (a signal, a nearly full disk): the rest, byte-exact
            rest = memoryview(b"".join(group))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]
        for chunk in group:
            self.hashes.update(chunk)

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
        _unlink(_note_path(self.path))  # (leaving the spool: nothing to resume any more)
        fd, self._fd = self._fd, None
        return fd

    def abort(self) -> None:
        """Close and remove the file.  Safe to call more than once, and after publishing."""
        _unlink(_note_path(self.path))
        _unlink(self.path)  # (before the close, which lets go of the lock: no one takes it between)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _lock(fd: int) -> bool:
    """Lock a new spool file for this process: ``False`` if someone else holds it (a
    clean-up about to remove it); ``True`` also where locks are not supported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
        _warn_unlocked(e.strerror or str(e))
    return True


@functools.cache
def _warn_unlocked(reason: str) -> None:
    """Said once per process (and reason)."""
    _log.warn("the spool's filesystem does not lock files ({reason}); writing unlocked", reason=reason)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the name of the open file ``fd``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class SpoolWriter:
    """A :class:`~mirror.storage.base.BlobWriter` over one spool file: everything but
    :meth:`commit`, which each backend writes (how a verified file is published)."""

    def __init__(self, spool: LocalSpool, adopt: Orphan | None = None) -> None:
        """A new spool file; or, with ``adopt``, a dead process's (re-hashed: blocking)."""
        self._file = SpoolFile.adopted(adopt) if adopt is not None else spool.new_file()

    @property
    def path(self) -> Path:
        return self._file.path

    @property
    def size(self) -> int:
        return self._file.size

    def hash_also(self, digest: Digest) -> None:
        self._file.hashes.also(digest.algorithm)

    def note(self, note: FillNote) -> None:
        self._file.note(note)

    def write(self, *chunks: bytes) -> None:
        self._file.write(*chunks)

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

    def take_orphans(self) -> list[Orphan]:
        """The noted files no live process holds, locked for this one to resume (before
        :meth:`clean`, which then leaves them be)."""
        orphans = []
        for entry in os.scandir(self.directory):
            match = _NOTE_NAME.fullmatch(entry.name)
            if match is None:
                continue
            path = self.directory / match[1]
            try:
                note = FillNote.loads(Path(entry.path).read_bytes())
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # its file is gone: clean removes the note
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # a live writer's
                continue
            if note is None:
                os.close(fd)  # unreadable: clean removes both
                continue
            orphans.append(Orphan(path, fd, note))
        return orphans

    async def clean(self) -> int:
        """Remove the files no live process is writing (see the module docstring); the
        number removed.  Runs to its end without waiting: at start, before listening."""
        removed = 0
        for entry in os.scandir(self.directory):
            note = _NOTE_NAME.fullmatch(entry.name)
            if note is not None and not (self.directory / note[1]).exists():
                _unlink(Path(entry.path))  # its file was committed, or removed below
                continue
            if _SPOOL_NAME.fullmatch(entry.name) is None or not entry.is_file(follow_symlinks=False):
                continue  # not a spool file (a readiness probe, lost+found, ...): not ours to remove
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except OSError:
                continue  # committed or aborted meanwhile, or not readable: left alone
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(entry.path)  # (a writer's own open+lock sees its name gone: it takes another)
                _unlink(_note_path(Path(entry.path)))
                removed += 1
            except OSError:
                pass  # a live writer holds it (BlockingIOError), it went meanwhile, or no locks here
            finally:
                os.close(fd)
        return removed

    async def check_writable(self) -> str | None:
        probe = self.directory / f".ready-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"ok")
            os.unlink(probe)
        except OSError as e:
            return f"store not writable: {e.strerror}"
        return None
