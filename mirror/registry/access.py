"""Batched reads for the access record: when each stored blob (manifests too) was last read.

Reads only note the time in memory; :meth:`AccessBatch.flush` writes the batch to the
store's :class:`~mirror.storage.base.AccessRecord` — periodically and at shutdown — so a
read costs no store write, and the record survives a restart.  Garbage collection evicts
by it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from mirror.core.oci import Digest
from mirror.storage.base import AccessRecord

__all__ = ["AccessBatch"]


class AccessBatch:
    """Collects last-read times and flushes them to the store's access record."""

    _log = Logger()

    def __init__(self, record: AccessRecord, now: Callable[[], float]) -> None:
        self._record = record
        self._now = now
        self._pending: dict[Digest, float] = {}

    def note(self, digest: Digest) -> None:
        """``digest`` was read just now."""
        self._pending[digest] = self._now()

    async def flush(self) -> int:
        """Write the pending times to the store; returns how many."""
        pending, self._pending = self._pending, {}
        if pending:
            try:
                await self._record.record(pending)
            except BaseException:  # kept for the next flush (with any newer reads since)
                for digest, when in pending.items():
                    self._pending[digest] = max(when, self._pending.get(digest, 0.0))
                raise
            self._log.debug("access record: flushed {count} entries", count=len(pending))
        return len(pending)
