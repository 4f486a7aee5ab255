"""The batched access record: reads noted in memory, flushed to the store's record."""

from __future__ import annotations

import pytest

from mirror.core.oci import Digest
from mirror.registry.access import AccessBatch
from tests.storeutil import run_now


class FlakyRecord:
    """An access record whose store fails while ``down`` (a disk or a bucket gone)."""

    def __init__(self) -> None:
        self.down = False
        self.recorded: dict[Digest, float] = {}

    async def record(self, accessed):
        if self.down:
            raise OSError("the store is unavailable")
        self.recorded.update(accessed)

    async def snapshot(self):
        return dict(self.recorded)


def test_a_failed_flush_keeps_its_reads_for_the_next_one():
    """Reads whose flush failed are flushed by the next one, merged with newer reads."""
    now = [100.0]
    record = FlakyRecord()
    batch = AccessBatch(record, lambda: now[0])
    a, b = Digest.of(b"a"), Digest.of(b"b")
    batch.note(a)
    record.down = True
    with pytest.raises(OSError):
        run_now(batch.flush())
    now[0] = 200.0
    batch.note(b)
    record.down = False
    assert run_now(batch.flush()) == 2
    assert record.recorded == {a: 100.0, b: 200.0}
