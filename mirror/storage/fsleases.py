"""Named leases as files in a local directory: what processes sharing one machine's store
use to agree who does a piece of work (:class:`~mirror.storage.base.LeaseStore`).

The semantics are :class:`~mirror.storage.s3.store.S3Leases`' (the reference): a lease is
a small JSON document ``{"holder", "expires"}`` (wall-clock seconds); ``acquire`` takes an
absent lease, an expired one (its holder died) or the holder's own (from before a
restart), and otherwise names the live holder; ``renew`` extends only the holder's own
lease (or re-creates it if it is gone); ``release`` removes only the holder's own.

Here each lease is the file ``<directory>/<name>``, and every read-modify-write holds an
exclusive ``flock`` on ``<directory>/.lock``, so of processes asking at once exactly one
gets a lease (no clock skew to allow for: one machine, one clock).  A lease is written to
a temporary name and renamed over the old one, so a reader never sees half of it.  It is
not fsynced: a lease is worth nothing after a power loss (its holder is gone too), and one
a crash left empty or torn reads as expired.  The lock is held for a read and a small
write, so callers run these methods on the reactor thread, as the filesystem store does
its small metadata files.  The directory is created at the first acquire, so that opening
a store read-only (``mirror gc --dry-run``) writes nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from twisted.logger import Logger

__all__ = ["FsLeases"]

_log = Logger()
#: A lease name: ``/``-separated segments of these characters (``fills/sha256/<hex>``).
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class FsLeases:
    """Leases under ``directory`` (see the module docstring); ``clock`` gives wall-clock
    seconds (tests pass a fake one)."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._clock = clock

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if not all(_SEGMENT.fullmatch(part) for part in parts):
            raise ValueError(f"not a lease name: {name!r}")
        return self.directory.joinpath(*parts)

    @contextmanager
    def _locked(self, create: bool) -> Iterator[bool]:
        """Hold the directory's lock; yields False (holding nothing) when the directory does
        not exist and ``create`` is False: there is no lease to see."""
        if create:
            # (only this user: anyone who can open the lock file can hold it, and every
            # process waiting on it with it)
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            if create:
                raise
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)  # (lets go of the lock)

    @staticmethod
    def _read(path: Path) -> tuple[str, float] | None:
        """(holder, expiry) of the lease at ``path``; ``None`` if there is none."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(data)
            return str(doc["holder"]), float(doc["expires"])
        except (ValueError, KeyError, TypeError):
            return "", 0.0  # torn or garbled: treat as expired

    def _write(self, path: Path, holder: str, ttl: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        tmp.write_bytes(json.dumps({"holder": holder, "expires": self._clock() + ttl}).encode())
        os.replace(tmp, path)

    def current(self, name: str) -> tuple[str, float] | None:
        """(holder, expiry) of lease ``name``, if there is one."""
        return self._read(self._path(name))

    async def acquire(self, name: str, holder: str, ttl: float) -> str | None:
        path = self._path(name)
        with self._locked(create=True):
            lease = self._read(path)
            if lease is not None:
                current, expires = lease
                if current != holder and expires >= self._clock():
                    return current
                if current != holder:
                    _log.info("taking over the expired lease {name} of {holder}", name=name, holder=current or "(unreadable)")
            self._write(path, holder, ttl)
        return None

    async def renew(self, name: str, holder: str, ttl: float) -> None:
        path = self._path(name)
        with self._locked(create=True):
            lease = self._read(path)
            if lease is not None and lease[0] != holder:  # expired and taken over: not ours to extend
                _log.warn("lease {name} is held by {other} now, not {holder}", name=name, other=lease[0], holder=holder)
                return
            self._write(path, holder, ttl)

    async def release(self, name: str, holder: str) -> None:
        path = self._path(name)
        with self._locked(create=False) as present:
            lease = self._read(path) if present else None
            if lease is not None and lease[0] == holder:
                path.unlink()
