"""The filesystem store's index of repository names: listings without a walk.

``_catalog`` and garbage collection list the repositories a store holds.  Walking
``repositories/`` for that costs a ``scandir`` per directory level per repository on every
request (hundreds of milliseconds at 10,000 repositories).  Instead the store keeps one
append-only file, ``repositories.index``: a record ``\\n<name>\\n`` for each repository,
appended (and fsynced) by whichever process is about to create the repository's
``_manifests``, ``_tags`` or ``_layers`` directory, *before* it creates it.  Every process
sharing the store — the service, its workers, ``mirror gc``/``warm``/``import`` — writes
the same file, so none misses another's repositories.

Each process keeps the names sorted in memory and, before answering, reads what was
appended since it last looked (the file's size says whether anything was; nothing is
ever rewritten), so a page of a listing is a bisect.  All of it is blocking file work:
the store calls it through ``run_blocking``.

Crash safety.  The index is written ahead: a process that dies (or fails: a full disk)
between appending a name and creating the repository's directory leaves a name without
a repository; a torn record at the end of the file (power loss) may leave a prefix of a
name.  So a name is listed only once its repository is seen to hold one of those three
directories (exactly what the walk this replaces looked for); a name seen to hold one is
remembered as confirmed, since the store never removes a repository's directories.  A
record is framed by newlines on both sides, so the record after a torn one still reads
whole; a line that could not be a repository's path is skipped.  Names appear twice when two processes
add the same repository at the same moment; reading drops the repeat.

A store from an earlier release has no index: :meth:`RepositoryIndex.build` walks it
once (the store does that when it is opened, before anything is served).
"""

from __future__ import annotations

import bisect
import errno
import heapq
import os
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RepositoryIndex", "walk_repositories"]

#: How names are stored: any str a repository's directory can have round-trips.
_ENCODING = ("utf-8", "surrogateescape")

#: What makes a directory under ``repositories/`` a repository (see the fs module).
_MARKS = ("_manifests", "_tags", "_layers")


def walk_repositories(repositories: Path) -> list[str]:
    """Every repository under ``repositories/``, sorted: each directory holding one of
    ``_manifests``, ``_tags`` or ``_layers`` (blocking; a walk of the whole tree)."""

    def walk(directory: Path, prefix: str) -> Iterator[str]:
        try:
            names = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        except FileNotFoundError:
            return
        if any(mark in names for mark in _MARKS):
            yield prefix
        for name in names:
            if not name.startswith("_"):
                yield from walk(directory / name, f"{prefix}/{name}" if prefix else name)

    # Sorting per directory level is not lexical order of full names ("a/b" vs "a-c").
    return sorted(walk(repositories, ""))


class RepositoryIndex:
    """``repositories.index`` of one store, and this process's sorted view of it.

    Every method blocks (file reads, writes, fsyncs): call them off the reactor thread.
    They are safe to call from several threads at once.
    """

    def __init__(self, path: Path, repositories: Path) -> None:
        self.path = path
        self._repositories = repositories
        self._lock = threading.Lock()
        self._offset = 0  # bytes of the file read so far (up to the end of a whole record)
        self._names: list[str] = []  # every name read from the file, sorted
        self._read: set[str] = set()  # the same names
        self._appended: set[str] = set()  # names this process appended
        self._confirmed: set[str] = set()  # names whose repository was seen to exist

    # writing --------------------------------------------------------------------------------
    def add(self, name: str) -> None:
        """Make sure ``name`` is in the index, durably: call it before creating the
        repository's ``_manifests``, ``_tags`` or ``_layers`` directory."""
        with self._lock:
            if name in self._read or name in self._appended:
                return
            self._refresh()  # another process may have added it (a restarted one, surely)
            if name in self._read:
                return
        self._append([name])
        with self._lock:
            self._appended.add(name)

    def confirm(self, name: str) -> None:
        """``name``'s repository exists now (its writer just created it)."""
        with self._lock:
            self._confirmed.add(name)

    def _append(self, names: list[str]) -> None:
        """Append records for ``names`` in one write, then fsync.  One ``write`` to an
        ``O_APPEND`` file lands whole at its end, between other processes' records; a short
        one (a full disk) is an error, never continued (that could interleave)."""
        record = "".join(f"\n{name}\n" for name in names).encode(*_ENCODING)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, record)
            if written != len(record):
                raise OSError(errno.ENOSPC, f"{self.path}: short write ({written} of {len(record)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)

    def build(self) -> int:
        """Add every repository a walk of the store finds (a store an earlier release wrote,
        or whose index was lost); how many were missing.  Safe while other processes write
        to the store: they add their new repositories themselves."""
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644))
            _fsync_directory(self.path.parent)
        found = walk_repositories(self._repositories)
        with self._lock:
            self._refresh()
            missing = [name for name in found if name not in self._read and name not in self._appended]
        if missing:
            self._append(missing)
        with self._lock:
            self._appended.update(missing)
            self._confirmed.update(found)
        return len(missing)

    # reading --------------------------------------------------------------------------------
    def page(self, after: str | None = None, limit: int | None = None) -> list[str]:
        """The repositories after ``after`` (all without), at most ``limit``, in lexical
        order: the names in the index whose repositories exist."""
        out: list[str] = []
        cursor = after
        with self._lock:
            self._refresh()
        while limit is None or len(out) < limit:
            with self._lock:
                start = bisect.bisect_right(self._names, cursor) if cursor is not None else 0
                end = len(self._names) if limit is None else start + limit - len(out)
                candidates = self._names[start:end]
                unconfirmed = {n for n in candidates if n not in self._confirmed}
            if not candidates:
                break
            holding = {n for n in unconfirmed if self._holds(n)}  # (stat calls: not under the lock)
            if holding:
                with self._lock:
                    self._confirmed |= holding
            out.extend(n for n in candidates if n not in unconfirmed or n in holding)
            cursor = candidates[-1]
        return out

    def _holds(self, name: str) -> bool:
        base = self._repositories / name
        return any(os.path.isdir(base / mark) for mark in _MARKS)

    def _refresh(self) -> None:
        """Read the records appended since the last look (holding the lock)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            if size <= self._offset:
                return
            chunk = os.pread(fd, size - self._offset, self._offset)
        finally:
            os.close(fd)
        end = chunk.rfind(b"\n")
        if end < 0:
            return  # no whole record yet
        self._offset += end + 1
        new = []
        for line in chunk[:end].split(b"\n"):
            name = line.decode(*_ENCODING)
            if name not in self._read and _plausible(name):
                self._read.add(name)
                new.append(name)
        if len(new) <= 64:
            for name in new:
                bisect.insort(self._names, name)
        else:
            new.sort()
            self._names = list(heapq.merge(self._names, new))


def _plausible(name: str) -> bool:
    """Whether a line of the index could name a repository a walk finds: a relative path
    of components that do not start with ``_`` (a mirrored repository's key starts with its
    upstream's registry, which may hold a port; a torn record or garbage may be anything,
    and is dropped here or when no such repository exists)."""
    return bool(name) and "\0" not in name and all(c and c[0] != "_" and c not in (".", "..") for c in name.split("/"))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
