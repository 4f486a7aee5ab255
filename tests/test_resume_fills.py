"""A restarted service resumes the fills a dead process left in the spool.

The real Registry over a filesystem store, a fake upstream reached in memory
(tests/inmemory.py), no sockets and no real time: what a killed process leaves (a spool
file and its note) is taken at start and resumed from its bytes on disk, or removed when
it cannot be.
"""

from __future__ import annotations

import os

import pytest

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mirror.config import MirrorConfig, StorageConfig, UpstreamConfig
from mirror.core.oci import Digest
from mirror.storage.fs import open_filesystem_store
from mirror.storage.spool import FillNote
from tests.fake_upstream import FakeRegistry
from tests.inmemory import InMemoryMirror
from tests.storeutil import Sync

LAYER = os.urandom(300_000)
DIGEST = str(Digest.of(LAYER))


@pytest.fixture
def fake():
    fake = FakeRegistry()
    fake.add_blob(LAYER, "library/app")
    return fake


def mirror(tmp_path, fake, *, offline=False):
    root = tmp_path / "store"
    upstream = UpstreamConfig(registry="docker.io", url="http://upstream.test", timeout=5, offline=offline)
    config = MirrorConfig(listen=(), storage=StorageConfig(root=root), upstreams=(upstream,))
    return InMemoryMirror(config, open_filesystem_store(root), upstream=fake, clock=Clock()), root / "spool"


def left_behind(spool, data, digest=DIGEST, name="a" * 32):
    """What a killed process leaves: the bytes it had written, and the note of its fill."""
    spool.mkdir(parents=True, exist_ok=True)
    (spool / name).write_bytes(data)
    (spool / f"{name}.fill").write_bytes(FillNote(digest, "docker.io", "library/app").dumps())


def restart(m):
    """What the service does at start: take the orphans, clean the rest, resume."""
    orphans = m.registry.store.spool.take_orphans()
    Sync(m.registry.store.spool).clean()
    m.wait(Deferred.fromCoroutine(m.registry.resume_fills(orphans)))
    for _ in range(5):
        m.pump()


def test_a_fill_is_resumed_from_the_bytes_on_disk(tmp_path, fake):
    m, spool = mirror(tmp_path, fake)
    left_behind(spool, LAYER[:100_000])
    restart(m)
    assert fake.ranges_asked == ["100000"]
    assert Sync(m.registry.store).blobs.read(Digest.of(LAYER), len(LAYER)) == LAYER
    assert os.listdir(spool) == []


def test_a_fill_that_died_before_its_commit_is_committed_without_asking(tmp_path, fake):
    m, spool = mirror(tmp_path, fake)
    left_behind(spool, LAYER)
    restart(m)
    assert fake.count("GET", "/blobs/") == 0
    assert Sync(m.registry.store).blobs.stat(Digest.of(LAYER)) == len(LAYER)
    assert os.listdir(spool) == []


@pytest.mark.parametrize(
    "why",
    ["a garbled digest", "offline", "the upstream no longer has it", "wrong bytes on disk"],
)
def test_a_fill_that_cannot_be_resumed_is_removed(tmp_path, fake, why):
    m, spool = mirror(tmp_path, fake, offline=why == "offline")
    if why == "a garbled digest":
        left_behind(spool, LAYER[:100_000], digest="sha256:not-a-digest")
    elif why == "the upstream no longer has it":
        fake.blobs.clear()
        left_behind(spool, LAYER[:100_000])
    elif why == "wrong bytes on disk":  # (a power loss can leave a damaged tail)
        left_behind(spool, b"\0" * 100_000)
    else:
        left_behind(spool, LAYER[:100_000])
    restart(m)
    assert os.listdir(spool) == []
    assert Sync(m.registry.store).blobs.stat(Digest.of(LAYER)) is None
    if why in ("a garbled digest", "offline"):
        assert fake.count("GET", "/blobs/") == 0


def test_a_fill_left_for_another_process_keeps_its_file_and_note(tmp_path, fake):
    """``mirror warm`` takes the orphans (so its clean-up leaves them) and lets them go."""
    m, spool = mirror(tmp_path, fake)
    left_behind(spool, LAYER[:100_000])
    (orphan,) = m.registry.store.spool.take_orphans()
    Sync(m.registry.store.spool).clean()
    orphan.release()
    orphan.discard()  # (let go already: nothing happens)
    assert sorted(os.listdir(spool)) == ["a" * 32, "a" * 32 + ".fill"]
