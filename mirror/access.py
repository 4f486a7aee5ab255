"""The access record: when each stored blob (manifests too) was last read.

Reads only note the time in memory; :meth:`AccessRecord.flush` writes the batch to the
store (``Store.touch``) — periodically and at shutdown — so a read costs no disk write
and no fsync, and the record survives a restart.  Garbage collection evicts by it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from mirror.oci import Digest
from mirror.store import Store

__all__ = ["AccessRecord"]


class AccessRecord:
    """Batches last-access times and flushes them to the store."""

    _log = Logger()

    def __init__(self, store: Store, now: Callable[[], float]) -> None:
        self._store = store
        self._now = now
        self._pending: dict[Digest, float] = {}

    def note(self, digest: Digest) -> None:
        """``digest`` was read just now."""
        self._pending[digest] = self._now()

    def flush(self) -> int:
        """Write the pending times to the store; returns how many."""
        pending, self._pending = self._pending, {}
        if pending:
            self._store.touch(pending.items())
            self._log.debug("access record: flushed {count} entries", count=len(pending))
        return len(pending)
