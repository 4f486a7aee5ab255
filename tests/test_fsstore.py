"""Tests of the filesystem store on real files under tmp_path."""

import os

import pytest

from mirror.fsstore import FilesystemStore
from mirror.oci import Digest
from mirror.store import DigestMismatch


@pytest.fixture
def store(tmp_path):
    return FilesystemStore(tmp_path / "store")


def test_writer_commit_publishes_verified_blob(store):
    """Bytes written and committed under their digest become readable, and the spool is gone."""
    w = store.new_writer()
    w.write(b"hello ")
    w.write(b"world")
    digest = Digest.of(b"hello world")
    assert store.blob_size(digest) is None
    w.commit(digest)
    assert store.blob_size(digest) == 11
    with store.open_blob(digest) as f:
        assert f.read() == b"hello world"
    assert os.listdir(store.root / "spool") == []


def test_writer_digest_mismatch_leaves_nothing(store):
    """A mismatch raises, stores nothing under either digest and removes the spool file."""
    w = store.new_writer()
    w.write(b"evil")
    wanted = Digest.of(b"good")
    with pytest.raises(DigestMismatch) as info:
        w.commit(wanted)
    assert info.value.actual == Digest.of(b"evil")
    assert store.blob_size(wanted) is None
    assert store.blob_size(Digest.of(b"evil")) is None
    assert os.listdir(store.root / "spool") == []


def test_writer_abort_is_idempotent(store):
    """Abort removes the spool; a second abort is harmless."""
    w = store.new_writer()
    w.write(b"x")
    w.abort()
    w.abort()
    assert os.listdir(store.root / "spool") == []


def test_spool_reader_follows_growing_file(store):
    """A reader opened on the spool sees bytes as they are written, and survives the rename."""
    w = store.new_writer()
    reader = w.open_spool()
    w.write(b"abc")
    assert os.pread(reader.fileno(), 10, 0) == b"abc"
    w.write(b"def")
    w.commit(Digest.of(b"abcdef"))
    assert os.pread(reader.fileno(), 10, 0) == b"abcdef"
    reader.close()


def test_sha512_writer(store):
    """A sha512 digest verifies when the writer is told to hash with it."""
    data = b"payload"
    d = Digest.of(data, "sha512")
    w = store.new_writer()
    w.hash_also(d)
    w.write(data)
    w.commit(d)
    assert store.blob_size(d) == len(data)


def test_clean_spool_removes_leftovers(store):
    """Spool files of a crashed process are removed at start-up."""
    w = store.new_writer()
    w.write(b"half")
    assert store.clean_spool() == 1
    assert os.listdir(store.root / "spool") == []


def test_tags_links_and_listing(store):
    """Tags and manifest links are kept per repository and listed in lexical order."""
    d = Digest.of(b"{}")
    store.put_blob(d, b"{}")
    store.link_manifest("docker.io/library/b", d, "application/vnd.oci.image.manifest.v1+json")
    store.set_tag("docker.io/library/b", "latest", d)
    store.set_tag("docker.io/library/b", "1.0", d)
    store.link_manifest("docker.io/library/a-c", d, "x/y")
    store.link_manifest("docker.io/library/a/b", d, "x/y")
    assert store.get_tag("docker.io/library/b", "latest") == d
    assert store.get_tag("docker.io/library/b", "nope") is None
    assert store.manifest_media_type("docker.io/library/b", d) == "application/vnd.oci.image.manifest.v1+json"
    assert store.list_tags("docker.io/library/b") == ["1.0", "latest"]
    assert store.list_tags("docker.io/library/a-c") == []
    assert store.list_tags("docker.io/library/zzz") is None
    assert list(store.repositories()) == ["docker.io/library/a-c", "docker.io/library/a/b", "docker.io/library/b"]
    store.delete_tag("docker.io/library/b", "1.0")
    assert store.list_tags("docker.io/library/b") == ["latest"]


def test_touch_records_access_time(store):
    """The access record is the blob's mtime; touch sets it without rewriting content."""
    d = Digest.of(b"x")
    store.put_blob(d, b"x")
    store.touch([(d, 1_000_000.0)])
    assert store.last_access(d) == 1_000_000.0
    store.touch([(Digest.of(b"absent"), 5.0)])  # a missing blob is skipped
