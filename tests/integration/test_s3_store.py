"""The store contract (tests/test_store_contract.py) against a real S3 server, plus what
only an object store has: create-only content, uploads split across nodes, the GC lease
between nodes, access batches merged by GC, and the bucket's errors.

SeaweedFS (``weed mini``) runs once per session on 127.0.0.1 with signatures enforced;
each test gets a fresh key prefix in one bucket, so tests cannot see each other's objects.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets

import attrs
import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from mirror.config import MirrorConfig, StorageConfig
from mirror.core.oci import Digest
from mirror.registry.gc import GcBusy, collect
from mirror.storage import open_store
from mirror.storage.s3 import client as s3client
from mirror.storage.s3.client import S3Error, ensure_bucket

# The contract's tests, collected here again with this module's `store` fixture.
from tests.test_store_contract import (  # noqa: F401
    Collect,
    test_a_dead_process_s_noted_fill_is_taken_over_and_finished,
    test_blob_links_and_referrers,
    test_delete_if_idle_keeps_recent_blobs_and_needs_the_exclusive_lock,
    test_fetched_links_are_kept_apart_from_pushed_ones,
    test_follower_sees_a_growing_write,
    test_last_tag_deleted_leaves_a_listed_repository_that_had_tags,
    test_leases_have_one_holder,
    test_list_manifests,
    test_ranges_of_a_stored_blob,
    test_sha512_writer,
    test_tag_record_says_when_a_tag_was_last_set,
    test_tags_links_and_listing,
    test_upload_appends_and_commits_verified,
    test_upload_mismatch_stores_nothing_and_ends_the_session,
    test_writer_abort_is_idempotent,
    test_writer_commit_publishes_verified_blob,
    test_writer_digest_mismatch_leaves_nothing,
)

pytestmark = pytest.mark.integration


def open_s3(seaweed, tmp_path, prefix=None):
    """A store in the shared bucket under a fresh prefix, spooling under tmp_path."""
    prefix = prefix or f"t-{secrets.token_hex(6)}/"
    config = StorageConfig(s3=seaweed.config(prefix=prefix), spool=tmp_path / "spool")
    return open_store(config, deferToThread, reactor)


@pytest.fixture
def store(seaweed, tmp_path):
    return open_s3(seaweed, tmp_path)


# object storage only -----------------------------------------------------------------------------
def nodes(seaweed, tmp_path, count=2):
    """``count`` stores on one bucket and prefix: what several nodes see."""
    prefix = f"t-{secrets.token_hex(6)}/"
    return [open_s3(seaweed, tmp_path / f"node{i}", prefix) for i in range(count)]


@pytest_twisted.ensureDeferred
async def test_content_is_create_only(seaweed, tmp_path):
    """A second write of the same key with If-None-Match is refused by the server (so two
    nodes filling one digest cannot interleave), and a second commit of the same verified
    blob succeeds, leaving the first object."""
    a, b = nodes(seaweed, tmp_path)
    client = a.blobs._client
    assert await client.put("probe", b"first", create_only=True)
    assert not await client.put("probe", b"second", create_only=True)
    assert await client.read("probe") == b"first"
    data = os.urandom(1000)
    for store in (a, b):
        w = store.blobs.writer()
        w.write(data)
        await w.commit(Digest.of(data))
    assert await b.blobs.read(Digest.of(data), 2000) == data
    assert not os.listdir(tmp_path / "node0" / "spool") and not os.listdir(tmp_path / "node1" / "spool")


@pytest_twisted.ensureDeferred
async def test_multipart_upload_of_a_large_blob(seaweed, tmp_path, monkeypatch):
    """A blob over the part size goes up in parts and reads back whole; the multipart
    upload is completed, not left behind."""
    monkeypatch.setattr(s3client, "PART_SIZE", 5 * 1024 * 1024)
    (store,) = nodes(seaweed, tmp_path, 1)
    data = os.urandom(12 * 1024 * 1024 + 17)
    w = store.blobs.writer()
    w.write(data)
    await w.commit(Digest.of(data))
    assert await store.blobs.stat(Digest.of(data)) == len(data)
    out = Collect()
    await (await store.blobs.open(Digest.of(data))).send(out)
    assert hashlib.sha256(out.data).hexdigest() == Digest.of(data).encoded
    response = await store.blobs._client.request("GET", None, query={"uploads": ""})
    listing = await store.blobs._client.read_body(response)
    assert b"<Upload>" not in listing


@pytest_twisted.ensureDeferred
async def test_an_upload_split_across_nodes_completes(seaweed, tmp_path):
    """POST on one node, PATCHes on both, PUT on the other: the session lives in the bucket."""
    a, b = nodes(seaweed, tmp_path)
    upload = await a.uploads.create("team/app")
    assert await b.uploads.repository_of(upload) == "team/app"
    assert await b.uploads.append(upload, io.BytesIO(b"hello ")) == 6
    with open(tmp_path / "chunk", "w+b") as chunk:  # a request body Twisted spooled to disk
        chunk.write(b"world")
        chunk.seek(0)
        assert await a.uploads.append(upload, chunk) == 11
    assert await b.uploads.size(upload) == 11
    assert await b.uploads.commit(upload, Digest.of(b"hello world")) == 11
    assert await a.blobs.read(Digest.of(b"hello world"), 100) == b"hello world"
    assert await a.uploads.repository_of(upload) is None


@pytest_twisted.ensureDeferred
async def test_two_appends_at_one_offset_cannot_both_land(seaweed, tmp_path):
    """Two nodes appending to one session at the same offset: one wins, the other is
    refused (416), and the session's bytes are one of them, never a mix."""
    a, b = nodes(seaweed, tmp_path)
    upload = await a.uploads.create("team/app")
    results = []
    for store, data in ((a, b"aaaa"), (b, b"bbbb")):
        d = Deferred.fromCoroutine(store.uploads.append(upload, io.BytesIO(data)))
        d.addBoth(results.append)
    await deferLater(reactor, 1.0, lambda: None)
    assert sorted(type(r).__name__ for r in results) in (["Failure", "int"], ["int", "int"])
    assert await a.uploads.size(upload) in (4, 8)  # sequential appends are both fine


@pytest_twisted.ensureDeferred
async def test_gc_lease_excludes_writers_on_other_nodes(seaweed, tmp_path):
    """While one node's GC holds the lease, no node gets a shared hold; a node's GC waits
    for shared holds on other nodes to be released."""
    a, b = nodes(seaweed, tmp_path)
    async with a.gc_lock.exclusive():
        assert await b.gc_lock.try_shared() is None
        assert await a.gc_lock.try_shared() is None
        holds, _ = await a.blobs._client.list("locks/shared/")
        assert holds == []  # a writer that backs off leaves no hold to keep GC waiting
    handle = await b.gc_lock.try_shared()
    assert handle is not None
    entered = []

    async def collect():
        async with a.gc_lock.exclusive():
            entered.append(True)

    d = Deferred.fromCoroutine(collect())
    await deferLater(reactor, 0.5, lambda: None)
    assert not entered  # b's hold keeps a's GC out
    await b.gc_lock.release(handle)
    await d
    assert entered


@pytest_twisted.ensureDeferred
async def test_access_batches_from_nodes_merge_and_compact(seaweed, tmp_path):
    """Reads recorded on two nodes are seen by GC on either; a snapshot merges the
    batches into one and drops blobs no longer stored."""
    a, b = nodes(seaweed, tmp_path)
    kept, gone = Digest.of(b"kept"), Digest.of(b"gone")
    await a.blobs.put(kept, b"kept")
    await a.access.record({kept: 100.0, gone: 100.0})
    await b.access.record({kept: 200.0})
    await a.access.record({kept: 150.0})  # a late flush of an older read changes nothing
    assert await b.access.snapshot() == {kept: 200.0, gone: 100.0}
    objects, _ = await a.blobs._client.list("access/")
    assert len(objects) == 1
    assert await a.access.snapshot() == {kept: 200.0}


def test_missing_bucket_is_created_and_bad_credentials_are_one_clear_error(seaweed):
    config = seaweed.config(bucket=f"fresh-{secrets.token_hex(4)}")
    ensure_bucket(config)
    ensure_bucket(config)  # exists now
    with pytest.raises(S3Error, match="403"):
        ensure_bucket(attrs.evolve(config, secret_key="wrong"))
    with pytest.raises(S3Error, match=r"ConnectionRefused|URLError"):
        ensure_bucket(attrs.evolve(config, endpoint="http://127.0.0.1:9"))


@pytest_twisted.ensureDeferred
async def test_one_gc_run_at_a_time_across_nodes(seaweed, tmp_path):
    """While one node's GC run holds the store's gc-run lease, another node's run is
    refused with GcBusy naming the holder (a dry run still reports); once released, it runs."""
    a, b = nodes(seaweed, tmp_path)
    config = MirrorConfig(listen=(), storage=StorageConfig(s3=seaweed.config()))
    assert await a.leases.acquire("gc-run", "node-a:123", 60) is None
    with pytest.raises(GcBusy, match="node-a:123"):
        await collect(b, config, clock=reactor)
    assert (await collect(b, config, dry_run=True)).dry_run
    await a.leases.release("gc-run", "node-a:123")
    report = await collect(b, config, clock=reactor)
    assert not report.dry_run
    assert await b.leases.acquire("gc-run", "node-b:1", 60) is None  # the run released its lease


@pytest_twisted.ensureDeferred
async def test_a_failed_multipart_upload_is_aborted_and_stores_nothing(seaweed, tmp_path, monkeypatch):
    """A multipart upload the server refuses to complete (parts under S3's 5 MiB minimum:
    EntityTooSmall) fails the commit with S3Error, leaves no object and no multipart
    upload behind (it was aborted), and the spool file is gone."""
    monkeypatch.setattr(s3client, "PART_SIZE", 1024 * 1024)
    (store,) = nodes(seaweed, tmp_path, 1)
    data = os.urandom(3 * 1024 * 1024 + 5)
    w = store.blobs.writer()
    w.write(data)
    with pytest.raises(S3Error, match="EntityTooSmall"):
        await w.commit(Digest.of(data))
    assert await store.blobs.stat(Digest.of(data)) is None
    client = store.blobs._client
    listing = await client.read_body(await client.request("GET", None, query={"uploads": "", "prefix": client.config.prefix}))
    assert b"<Upload>" not in listing, listing[:500]
    assert not os.listdir(tmp_path / "node0" / "spool")


@pytest_twisted.ensureDeferred
async def test_access_batches_stay_small_however_many_blobs(seaweed, tmp_path, monkeypatch):
    """A flush or a merge of many reads is written as several objects of a bounded number
    of entries (so that no object outgrows what GC reads at once), and merges back whole."""
    from mirror.storage.s3 import store as s3store

    monkeypatch.setattr(s3store, "ACCESS_BATCH", 2)
    (a,) = nodes(seaweed, tmp_path, 1)
    digests = [Digest.of(bytes([i])) for i in range(5)]
    for d in digests:
        await a.blobs.put(d, b"x" + d.encoded.encode())
    await a.access.record({d: 100.0 + i for i, d in enumerate(digests)})
    objects, _ = await a.blobs._client.list("access/")
    assert len(objects) == 3
    await a.access.record({digests[0]: 500.0})
    expected = {d: 100.0 + i for i, d in enumerate(digests)} | {digests[0]: 500.0}
    assert await a.access.snapshot() == expected  # merged, then compacted into batches of two
    objects, _ = await a.blobs._client.list("access/")
    assert len(objects) == 3
    assert await a.access.snapshot() == expected
