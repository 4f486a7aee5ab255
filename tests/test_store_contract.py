"""One contract for every store backend: the same checks against the filesystem store
(real files under tmp_path) and the in-memory store here, and against a real S3 server
in tests/integration/test_s3_store.py (which collects these tests again with its own
``store`` fixture: that is why they are coroutines run on the reactor).

What every backend promises (mirror.storage.base): content is visible only once verified,
a mismatch leaves nothing, readers follow a growing write, listings are sorted, a
repository whose last tag was deleted answers "tags": null and stays listed, uploads
verify on commit, GC deletes only idle blobs and only under the exclusive lock, and
pushers hold the lock shared.  The filesystem-only tests (layout version, mtimes as the
access record, spool clean-up) are at the end.
"""

from __future__ import annotations

import io
import json
import os

import pytest
import pytest_twisted

from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from mirror.core.oci import Digest
from mirror.storage.base import DigestMismatch
from mirror.storage.fs import LAYOUT_VERSION, StoreLayoutError, open_filesystem_store
from mirror.storage.memory import open_memory_store
from mirror.storage.sending import CachedSource
from mirror.storage.spool import FillNote, LocalSpool
from tests.storeutil import Sync, blob_path

OCI = "application/vnd.oci.image.manifest.v1+json"


class Clock:
    """The memory store's time; the filesystem store stamps with the real file times."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["fs", "memory"])
def store(request, tmp_path):
    if request.param == "fs":
        return open_filesystem_store(tmp_path / "store")
    return open_memory_store(Clock())


@implementer(IConsumer)
class Collect:
    """A consumer that keeps what it is sent."""

    def __init__(self) -> None:
        self.data = bytearray()

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass

    def write(self, data):
        self.data += data


async def read_all(store, digest):
    responder = await store.blobs.open(digest)
    assert responder is not None
    out = Collect()
    await responder.send(out)
    return bytes(out.data)


# blobs --------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_writer_commit_publishes_verified_blob(store):
    """Bytes written and committed under their digest become readable; before, nothing is."""
    w = store.blobs.writer()
    w.write(b"hello ")
    w.write(b"world")
    digest = Digest.of(b"hello world")
    assert await store.blobs.stat(digest) is None
    await w.commit(digest)
    assert await store.blobs.stat(digest) == 11
    assert await read_all(store, digest) == b"hello world"
    assert await store.blobs.read(digest, 100) == b"hello world"
    assert await store.blobs.read(digest, 5) is None  # over the size asked for


@pytest_twisted.ensureDeferred
async def test_writer_digest_mismatch_leaves_nothing(store):
    """A mismatch raises and stores nothing under either digest."""
    w = store.blobs.writer()
    w.write(b"evil")
    wanted = Digest.of(b"good")
    with pytest.raises(DigestMismatch) as info:
        await w.commit(wanted)
    assert info.value.actual == Digest.of(b"evil")
    assert await store.blobs.stat(wanted) is None
    assert await store.blobs.stat(Digest.of(b"evil")) is None


@pytest_twisted.ensureDeferred
async def test_writer_abort_is_idempotent(store):
    """Abort discards; a second abort is harmless; nothing is published."""
    w = store.blobs.writer()
    w.write(b"x")
    w.abort()
    w.abort()
    assert await store.blobs.stat(Digest.of(b"x")) is None


@pytest_twisted.ensureDeferred
async def test_a_dead_process_s_noted_fill_is_taken_over_and_finished(store):
    """What a fill leaves in the spool when its process dies — its file and its note — is
    taken by the next process (the clean-up leaves it), re-hashed, written on from its end
    and committed; an unnoted file, a garbled note and a note without a file are cleaned."""
    probe = store.blobs.writer()
    if not hasattr(probe, "path"):
        pytest.skip("the in-memory store: nothing outlives its process")
    spool = probe.path.parent
    probe.abort()
    data = os.urandom(300_000)
    digest = Digest.of(data)
    (spool / ("a" * 32)).write_bytes(data[:100_000])  # as a killed process left them
    (spool / ("a" * 32 + ".fill")).write_bytes(FillNote(str(digest), "docker.io", "library/app").dumps())
    (spool / ("b" * 32)).write_bytes(b"unnoted")
    (spool / ("c" * 32)).write_bytes(b"garbled note")
    (spool / ("c" * 32 + ".fill")).write_bytes(b"{")
    (spool / ("d" * 32 + ".fill")).write_bytes(b"a note whose file is gone")
    orphans = store.spool.take_orphans()
    assert [(o.path.name, o.note.repository) for o in orphans] == [("a" * 32, "library/app")]
    assert await store.spool.clean() == 2
    assert sorted(os.listdir(spool)) == ["a" * 32, "a" * 32 + ".fill"]
    assert store.spool.take_orphans() == []  # (held by this process now)
    w = store.blobs.writer(orphans[0])
    assert w.size == 100_000
    w.write(data[100_000:])
    await w.commit(digest)
    assert await store.blobs.read(digest, len(data)) == data
    assert os.listdir(spool) == []


@pytest_twisted.ensureDeferred
async def test_follower_sees_a_growing_write(store):
    """A responder following a writer sends what is written so far, and the rest once the
    source says it is verified."""

    class Growing:
        verified = stored = False
        failure = None

        def __init__(self, writer):
            self.writer, self.callbacks = writer, []

        def readable_end(self):
            return self.writer.size

        def subscribe(self, cb):
            self.callbacks.append(cb)

        def unsubscribe(self, cb):
            self.callbacks.remove(cb)

    w = store.blobs.writer()
    source = Growing(w)
    out = Collect()
    d = w.follow(source, 6).send(out)
    w.write(b"abc")
    for cb in list(source.callbacks):
        cb()
    assert out.data == b"abc" and not d.called
    w.write(b"def")
    source.verified = True
    for cb in list(source.callbacks):
        cb()
    assert out.data == b"abcdef" and d.called
    await w.commit(Digest.of(b"abcdef"))


@pytest_twisted.ensureDeferred
async def test_sha512_writer(store):
    """A sha512 digest verifies when the writer is told to hash with it."""
    data = b"payload"
    d = Digest.of(data, "sha512")
    w = store.blobs.writer()
    w.hash_also(d)
    w.write(data)
    await w.commit(d)
    assert await store.blobs.stat(d) == len(data)


@pytest_twisted.ensureDeferred
async def test_ranges_of_a_stored_blob(store):
    """A stored blob's responder sends any [first, end) range."""
    data = bytes(range(256)) * 10
    d = Digest.of(data)
    await store.blobs.put(d, data)
    responder = await store.blobs.open(d)
    assert responder.size == len(data) and isinstance(responder.source, CachedSource)
    out = Collect()
    await responder.send(out, 100, 1000)
    assert bytes(out.data) == data[100:1000]
    assert await store.blobs.open(Digest.of(b"absent")) is None


# repositories -------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_tags_links_and_listing(store):
    """Tags and manifest links are kept per repository and listed in lexical order."""
    d = Digest.of(b"{}")
    await store.blobs.put(d, b"{}")
    await store.metadata.link_manifest("docker.io/library/b", d, OCI)
    await store.metadata.set_tag("docker.io/library/b", "latest", d)
    await store.metadata.set_tag("docker.io/library/b", "1.0", d)
    await store.metadata.link_manifest("docker.io/library/a-c", d, "x/y")
    await store.metadata.link_manifest("docker.io/library/a/b", d, "x/y")
    assert await store.metadata.get_tag("docker.io/library/b", "latest") == d
    assert await store.metadata.get_tag("docker.io/library/b", "nope") is None
    assert await store.metadata.manifest_media_type("docker.io/library/b", d) == OCI
    assert await store.metadata.list_tags("docker.io/library/b") == ["1.0", "latest"]
    assert await store.metadata.list_tags("docker.io/library/a-c") == []
    assert await store.metadata.list_tags("docker.io/library/zzz") is None
    assert await store.metadata.repositories() == ["docker.io/library/a-c", "docker.io/library/a/b", "docker.io/library/b"]
    await store.metadata.delete_tag("docker.io/library/b", "1.0")
    assert await store.metadata.list_tags("docker.io/library/b") == ["latest"]


@pytest_twisted.ensureDeferred
async def test_repositories_by_page(store):
    """``after`` and ``limit`` page the listing in lexical order of whole names; a
    repository holding only fetched links or referrers is not listed."""
    d = Digest.of(b"{}")
    for name in ("team/b", "team/a-c", "team/a/b", "team/a"):
        await store.metadata.link_manifest(name, d, OCI)
    await store.metadata.link_blob("team/z", d)
    await store.metadata.link_blob("docker.io/library/fetched", d, fetched=True)
    await store.metadata.add_referrer("team/r", d, {"digest": str(d), "mediaType": OCI, "size": 2})
    every = ["team/a", "team/a-c", "team/a/b", "team/b", "team/z"]
    assert await store.metadata.repositories() == every
    assert await store.metadata.repositories(limit=2) == every[:2]
    assert await store.metadata.repositories(after="team/a", limit=2) == ["team/a-c", "team/a/b"]
    assert await store.metadata.repositories(after="team/a0") == ["team/b", "team/z"]  # "after" needs not be a name
    assert await store.metadata.repositories(after="team/z") == []
    assert await store.metadata.repositories(after="team/a", limit=0) == []


@pytest_twisted.ensureDeferred
async def test_last_tag_deleted_leaves_a_listed_repository_that_had_tags(store):
    """After its last tag and manifest go, a repository still lists and says it had tags."""
    d = Digest.of(b"{}")
    await store.metadata.link_manifest("team/gone", d, OCI)
    await store.metadata.set_tag("team/gone", "1", d)
    await store.metadata.delete_tag("team/gone", "1")
    assert await store.metadata.unlink_manifest("team/gone", d)
    assert not await store.metadata.unlink_manifest("team/gone", d)
    assert await store.metadata.list_tags("team/gone") == []
    assert await store.metadata.had_tags("team/gone")
    assert not await store.metadata.had_tags("team/never")
    assert "team/gone" in await store.metadata.repositories()


@pytest_twisted.ensureDeferred
async def test_blob_links_and_referrers(store):
    """Blob links per repository; referrers per subject, removable."""
    d, subject, ref = Digest.of(b"l"), Digest.of(b"s"), Digest.of(b"r")
    await store.metadata.link_blob("team/a", d)
    assert await store.metadata.has_blob_link("team/a", d) and not await store.metadata.has_blob_link("team/b", d)
    assert "team/a" in await store.metadata.repositories()
    descriptor = {"mediaType": OCI, "digest": str(ref), "size": 3, "artifactType": "x/sbom"}
    await store.metadata.add_referrer("team/a", subject, descriptor)
    assert await store.metadata.referrers("team/a", subject) == [descriptor]
    await store.metadata.remove_referrer("team/a", subject, ref)
    assert await store.metadata.referrers("team/a", subject) == []
    assert await store.metadata.unlink_blob("team/a", d)
    assert not await store.metadata.unlink_blob("team/a", d)
    record = await store.metadata.scan_repository("team/a")
    assert record.blob_links == set() and record.tags == {} and record.manifests == {}


# uploads ------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_upload_appends_and_commits_verified(store):
    """An upload grows by appends and is published only under its own digest."""
    upload = await store.uploads.create("team/a")
    assert await store.uploads.repository_of(upload) == "team/a"
    assert await store.uploads.repository_of("00000000-0000-4000-8000-000000000000") is None
    assert await store.uploads.size(upload) == 0
    await store.uploads.append(upload, io.BytesIO(b"hello "))
    assert (await store.uploads.append(upload, io.BytesIO(b"world"))) == 11
    assert (await store.uploads.commit(upload, Digest.of(b"hello world"))) == 11
    assert await store.blobs.stat(Digest.of(b"hello world")) == 11
    assert await store.uploads.repository_of(upload) is None  # the session is over


@pytest_twisted.ensureDeferred
async def test_upload_mismatch_stores_nothing_and_ends_the_session(store):
    upload = await store.uploads.create("team/a")
    await store.uploads.append(upload, io.BytesIO(b"evil"))
    with pytest.raises(DigestMismatch):
        await store.uploads.commit(upload, Digest.of(b"good"))
    assert await store.blobs.stat(Digest.of(b"evil")) is None
    assert await store.uploads.repository_of(upload) is None


# garbage collection -------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_delete_if_idle_keeps_recent_blobs_and_needs_the_exclusive_lock(store):
    """Only a blob neither written nor read since the cut-off goes; pushers are held off
    while GC holds the lock, and GC waits for none."""
    old, new = Digest.of(b"old"), Digest.of(b"new")
    await store.blobs.put(old, b"old")
    await store.blobs.put(new, b"new")
    scan = {b.digest: b for b in await store.blobs.scan()}
    assert set(scan) == {old, new} and scan[old].size == 3
    cutoff = max(b.modified for b in scan.values()) + 1
    await store.access.record({new: cutoff + 100})  # a read after the cut-off...
    await store.access.record({new: 10.0})  # ...which an older record (a late flush) does not undo
    lock = store.gc_lock

    async def sweep():
        async with lock.exclusive():
            assert await lock.try_shared() is None  # pushers wait while GC deletes
            return [await store.blobs.delete_if_idle(d, cutoff) for d in (old, new)]

    assert (await sweep()) == [3, None]
    assert await store.blobs.stat(old) is None and await store.blobs.stat(new) == 3
    handle = await store.gc_lock.try_shared()
    assert handle is not None
    await store.gc_lock.release(handle)


# filesystem only ----------------------------------------------------------------------------
def test_fs_layout_version(tmp_path):
    """A new store gets this release's layout (2: with the repository index); a store
    without layout.json is of layout 1 and is migrated when opened; a store of another
    layout (a newer release's) is refused."""
    root = tmp_path / "store"
    open_filesystem_store(root)
    assert json.loads((root / "layout.json").read_text()) == {"layout": LAYOUT_VERSION} == {"layout": 2}
    assert (root / "repositories.index").is_file()
    (root / "layout.json").unlink()  # as every release before the index left it
    open_filesystem_store(root)
    assert json.loads((root / "layout.json").read_text()) == {"layout": LAYOUT_VERSION}
    (root / "layout.json").write_text('{"layout": 99}')
    with pytest.raises(StoreLayoutError, match="layout version 99"):
        open_filesystem_store(root)


def test_fs_access_record_is_the_blob_mtime(tmp_path):
    """The access record is the blob's mtime; recording skips blobs that are gone."""
    root = tmp_path / "store"
    store = Sync(open_filesystem_store(root))
    d = Digest.of(b"x")
    store.blobs.put(d, b"x")
    later = os.stat(blob_path(root, d)).st_mtime + 1000
    store.access.record({d: later, Digest.of(b"absent"): 5.0})
    assert os.stat(blob_path(root, d)).st_mtime == later
    assert store.blobs.scan()[0].modified == later


def test_fs_clean_spool_removes_leftovers_and_keeps_live_writes(tmp_path):
    """Spool files no writer holds (a dead process's) are removed, a live writer's are
    kept; an aborted write leaves none."""
    root = tmp_path / "store"
    store = Sync(open_filesystem_store(root))
    w = store.blobs.writer()
    w.write(b"half")
    (root / "spool" / ("0123456789abcdef" * 2)).write_bytes(b"left by a crash")
    (root / "spool" / "lost+found").mkdir()  # what is not a spool file is not ours to remove
    (root / "spool" / ".ready-1234").write_bytes(b"another process's readiness probe")
    assert store.spool.clean() == 1
    assert sorted(os.listdir(root / "spool")) == sorted([w.path.name, "lost+found", ".ready-1234"])
    w.write(b" and the rest")
    w.abort()
    os.rmdir(root / "spool" / "lost+found")
    os.unlink(root / "spool" / ".ready-1234")
    w = store.blobs.writer()
    w.abort()
    assert os.listdir(root / "spool") == []


def test_fs_clean_up_at_the_moment_of_a_commit_leaves_the_blob(tmp_path, monkeypatch):
    """Another process's clean-up running between a commit's fsync and its rename finds the
    file still locked: the blob lands."""
    root = tmp_path / "store"
    store = Sync(open_filesystem_store(root))
    other = LocalSpool(root / "spool")  # another process's view of the spool
    removed = []
    rename = os.replace

    def replace(src, dst):
        removed.append(Sync(other).clean())  # (runs to its end at once: no waits in it)
        rename(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    w = store.blobs.writer()
    w.write(b"verified")
    Sync(w).commit(Digest.of(b"verified"))
    assert removed == [0] and store.blobs.stat(Digest.of(b"verified")) == 8


def test_fs_readiness_fails_when_the_store_cannot_take_writes(tmp_path):
    root = tmp_path / "store"
    store = Sync(open_filesystem_store(root))
    assert store.spool.check_writable() is None
    (root / "spool").rmdir()
    (root / "spool").write_bytes(b"")  # not a directory: nothing can be spooled, even as root
    assert "not writable" in store.spool.check_writable()


@pytest_twisted.ensureDeferred
async def test_fetched_links_are_kept_apart_from_pushed_ones(store):
    """A mirrored repository's links (fetched) are asked for, listed and kept apart from
    pushed ones (only those make GC treat a repository as hosted); unlink_blob drops both."""
    d, e = Digest.of(b"fetched"), Digest.of(b"pushed")
    await store.metadata.link_blob("docker.io/library/a", d, fetched=True)
    await store.metadata.link_blob("docker.io/library/a", e)
    assert await store.metadata.has_blob_link("docker.io/library/a", d, fetched=True)
    assert not await store.metadata.has_blob_link("docker.io/library/a", d)
    assert await store.metadata.has_blob_link("docker.io/library/a", e)
    assert not await store.metadata.has_blob_link("docker.io/library/a", e, fetched=True)
    assert not await store.metadata.has_blob_link("docker.io/library/b", d, fetched=True)
    record = await store.metadata.scan_repository("docker.io/library/a")
    assert record.fetched_links == {d} and record.blob_links == {e}
    assert await store.metadata.unlink_blob("docker.io/library/a", d)
    assert not await store.metadata.has_blob_link("docker.io/library/a", d, fetched=True)
    assert (await store.metadata.scan_repository("docker.io/library/a")).fetched_links == set()


@pytest_twisted.ensureDeferred
async def test_list_manifests(store):
    d = Digest.of(b"m")
    assert await store.metadata.list_manifests("team/a") == []
    await store.metadata.link_manifest("team/a", d, OCI)
    assert await store.metadata.list_manifests("team/a") == [d]


@pytest_twisted.ensureDeferred
async def test_tag_record_says_when_a_tag_was_last_set(store):
    """A tag's record is its digest and when it was last set, by any process: setting it
    again, unchanged, moves the time (that is how nodes share a tag's confirmation)."""
    d = Digest.of(b"m")
    assert await store.metadata.tag_record("team/a", "v1") is None
    await store.metadata.set_tag("team/a", "v1", d)
    record = await store.metadata.tag_record("team/a", "v1")
    assert record is not None and record[0] == d and record[1] > 0
    assert await store.metadata.get_tag("team/a", "v1") == d


def test_spool_file_writes_many_chunks_in_order_and_hashes_them(tmp_path, monkeypatch):
    """Chunks go to the file by writev in groups (more than IOV_MAX chunks, groups over
    WRITE_GROUP bytes), a short writev is finished byte-exact, and the hash covers all."""
    import hashlib

    from mirror.storage import spool as spool_module
    from mirror.storage.spool import WRITE_GROUP, SpoolFile

    chunks = [bytes([i % 251]) * (1 + i % 700) for i in range(3000)]  # ~1 MiB in 3000 chunks
    chunks.append(b"x" * (WRITE_GROUP + 5))
    real_writev = os.writev
    calls = []

    def short_writev(fd, buffers):
        calls.append(len(buffers))
        if len(calls) == 2:  # the second group only gets in part
            first = bytes(buffers[0])
            return os.write(fd, first[: max(1, len(first) // 2)])
        return real_writev(fd, buffers)

    monkeypatch.setattr(spool_module.os, "writev", short_writev)
    file = SpoolFile(tmp_path)
    file.write(*chunks)
    data = b"".join(chunks)
    assert file.path.read_bytes() == data
    assert file.hashes.digest() == Digest("sha256", hashlib.sha256(data).hexdigest())
    assert file.size == len(data)
    assert max(calls) <= 1024 and len(calls) > 3
    file.abort()


@pytest_twisted.ensureDeferred
async def test_leases_have_one_holder(store):
    """A store processes (or nodes) share has leases: one holder at a time, its own lease
    again after a restart, renewal and release only by the holder (expiry: the backends'
    own tests, with a fake clock for the filesystem's)."""
    if store.leases is None:
        pytest.skip("a store that only one node uses has no leases")
    name = "fills/sha256/" + "cd" * 32
    assert await store.leases.acquire(name, "node-a", 60) is None
    assert await store.leases.acquire(name, "node-b", 60) == "node-a"
    assert await store.leases.acquire(name, "node-a", 60) is None
    await store.leases.renew(name, "node-b", 60)
    await store.leases.release(name, "node-b")
    assert await store.leases.acquire(name, "node-b", 60) == "node-a"
    await store.leases.release(name, "node-a")
    assert await store.leases.acquire(name, "node-b", 60) is None
    await store.leases.release(name, "node-b")
