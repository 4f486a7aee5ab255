"""The filesystem store's repository index (mirror/storage/fsindex.py) and its blocking
work off the reactor thread.

Real files under tmp_path.  Two store instances on one directory stand for two processes
sharing a store (the service and ``mirror import``, or two workers): each keeps its own
view of the index in memory and must not miss the other's writes.  A crash between an
index record and the repository it announces is made by writing the record alone; a
store of an earlier release by writing its directories without an index.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from twisted.internet.defer import Deferred, maybeDeferred

from mirror.core.oci import OCI_MANIFEST, Digest
from mirror.storage import fsindex
from mirror.storage.fs import open_filesystem_store
from tests.storeutil import Sync

D = Digest.of(b"{}")


def names_in_index(root: Path) -> list[str]:
    return [line for line in (root / "repositories.index").read_text().split("\n") if line]


def test_a_listing_is_sorted_and_paged_from_the_index(tmp_path):
    """Names sort as whole strings ("a-c" < "a/b"); ``after`` and ``limit`` page them; a
    mirrored repository's fetched links alone do not make it a repository (as the walk);
    a mirrored repository's key may start with a registry and port."""
    store = Sync(open_filesystem_store(tmp_path / "store"))
    meta = store.metadata
    for name in ("team/b", "team/a-c", "team/a/b", "team/a"):
        meta.link_manifest(name, D, OCI_MANIFEST)
    meta.link_blob("docker.io/library/x", D, fetched=True)
    meta.set_tag("docker.io/library/y", "1", D)
    meta.link_blob("team/pushed", D)
    meta.link_manifest("localhost:5000/library/z", D, OCI_MANIFEST)
    every = ["docker.io/library/y", "localhost:5000/library/z", "team/a", "team/a-c", "team/a/b", "team/b", "team/pushed"]
    assert meta.repositories() == every == fsindex.walk_repositories(tmp_path / "store" / "repositories")
    assert meta.repositories(limit=2) == every[:2]
    assert meta.repositories(after="team/a", limit=2) == ["team/a-c", "team/a/b"]
    assert meta.repositories(after="team/a-b") == every[3:]  # not itself a name
    assert meta.repositories(after="team/pushed") == []
    assert meta.repositories(limit=0) == []
    assert sorted(names_in_index(tmp_path / "store")) == every  # each once


def test_two_stores_on_one_directory_see_each_others_repositories(tmp_path):
    """What one process adds, another that listed before (and cached) lists after; a
    repository both add is in the index once per process at most, and listed once."""
    root = tmp_path / "store"
    one, two = Sync(open_filesystem_store(root)), Sync(open_filesystem_store(root))
    one.metadata.set_tag("team/a", "1", D)
    assert two.metadata.repositories() == ["team/a"]
    two.metadata.link_manifest("team/b", D, OCI_MANIFEST)
    one.metadata.link_blob("team/c", D)
    assert one.metadata.repositories() == two.metadata.repositories() == ["team/a", "team/b", "team/c"]
    assert one.metadata.repositories(after="team/a", limit=1) == ["team/b"]
    one.metadata.set_tag("team/b", "2", D)  # already indexed (by the other): nothing appended
    two.metadata.set_tag("team/a", "2", D)
    assert names_in_index(root) == ["team/a", "team/b", "team/c"]
    three = Sync(open_filesystem_store(root))  # a process started later reads it all
    assert three.metadata.repositories() == ["team/a", "team/b", "team/c"]


def test_a_record_left_by_a_crash_lists_nothing_until_its_repository_exists(tmp_path):
    """A process that died between the record and the repository's directory, and a torn
    last record (power loss), leave names without repositories: they are not listed; the
    record written after a torn one still reads whole; a repository created later under
    a recorded name is listed then."""
    root = tmp_path / "store"
    store = Sync(open_filesystem_store(root))
    store.metadata.set_tag("team/real", "1", D)
    with open(root / "repositories.index", "ab") as f:
        f.write(b"\nteam/ghost\n")  # recorded, then the process died
        f.write(b"\nteam/torn-na")  # the start of a record, then the power went
        f.write(b"\nNOT A NAME\n")  # garbage is skipped
    assert store.metadata.repositories() == ["team/real"]
    other = Sync(open_filesystem_store(root))
    other.metadata.link_manifest("team/after", D, OCI_MANIFEST)  # appended after the torn record
    assert store.metadata.repositories() == ["team/after", "team/real"]
    assert store.metadata.repositories(limit=1) == ["team/after"]
    (root / "repositories" / "team" / "ghost" / "_fetched").mkdir(parents=True)
    assert "team/ghost" not in store.metadata.repositories()  # _fetched alone is no repository
    (root / "repositories" / "team" / "ghost" / "_tags").mkdir()  # another process's write lands
    assert store.metadata.repositories() == ["team/after", "team/ghost", "team/real"]
    assert store.metadata.repositories(after="team/after", limit=1) == ["team/ghost"]


def write_like_an_earlier_release(root: Path) -> None:
    """Repositories as releases before the index wrote them (no index, no layout.json)."""
    for path in ("repositories/team/a/_tags/1", "repositories/team/a-b/_manifests/sha256/00",
                 "repositories/registry.test:5000/x/_tags/1",
                 "repositories/docker.io/library/x/_layers/sha256/00", "repositories/docker.io/library/y/_fetched/sha256/00"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")
    (root / "repositories" / "team" / "empty" / "_tags").mkdir(parents=True)  # its last tag deleted


def test_a_store_of_an_earlier_release_is_indexed_when_opened(tmp_path):
    """No index: the store is walked once when opened, the index written and the layout
    raised to 2; a layout-2 store whose index was lost is rebuilt the same way."""
    root = tmp_path / "store"
    write_like_an_earlier_release(root)
    expected = ["docker.io/library/x", "registry.test:5000/x", "team/a", "team/a-b", "team/empty"]
    store = Sync(open_filesystem_store(root))
    assert names_in_index(root) == expected
    assert json.loads((root / "layout.json").read_text()) == {"layout": 2}
    assert store.metadata.repositories() == expected
    os.unlink(root / "repositories.index")
    assert Sync(open_filesystem_store(root)).metadata.repositories() == expected
    assert names_in_index(root) == expected


def test_a_store_that_cannot_be_indexed_is_listed_by_walking(tmp_path, monkeypatch):
    """A store of an earlier release this process cannot write (a read-only mount, for
    ``mirror export``) is served as it is: listings walk it, layout.json is not written.
    (The tests run as root, who may write anything: the refusal is faked.)"""
    root = tmp_path / "store"
    write_like_an_earlier_release(root)

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(fsindex.RepositoryIndex, "build", refuse)
    store = Sync(open_filesystem_store(root))
    assert store.metadata.repositories() == ["docker.io/library/x", "registry.test:5000/x", "team/a", "team/a-b", "team/empty"]
    assert store.metadata.repositories(after="team/a", limit=1) == ["team/a-b"]
    assert not (root / "layout.json").exists()


class Later:
    """A ``run_blocking`` that runs nothing until told: what runs before :meth:`run_all` ran
    on the calling (reactor) thread."""

    def __init__(self) -> None:
        self.queued: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queued.append((f, args, d))
        return d

    def run_all(self) -> int:
        ran = 0
        while self.queued:
            f, args, d = self.queued.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)
            ran += 1
        return ran


def started(coroutine: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)


def test_pushes_deletes_and_listings_do_their_file_work_through_run_blocking(tmp_path):
    """Every write, fsync, delete and listing of a push, a delete and a catalog waits for
    ``run_blocking``: until it runs the queued work, no file of the push exists and no call
    has finished; small reads (a tag, a link, a blob's size) answer at once."""
    root = tmp_path / "store"
    later = Later()
    store = open_filesystem_store(root, later)
    data = b'{"schemaVersion":2}'
    digest = Digest.of(data)
    repo_dir = root / "repositories" / "team" / "app"
    index_before = (root / "repositories.index").read_bytes()

    pending = {
        "put": started(store.blobs.put(digest, data)),
        "link_manifest": started(store.metadata.link_manifest("team/app", digest, OCI_MANIFEST)),
        "set_tag": started(store.metadata.set_tag("team/app", "1", digest)),
        "link_blob": started(store.metadata.link_blob("team/app", D)),
        "referrer": started(store.metadata.add_referrer("team/app", D, {"digest": str(digest), "size": 1})),
        "upload": started(store.uploads.create("team/app")),
        "record": started(store.access.record({digest: 1.0})),
        "shared": started(store.gc_lock.try_shared()),
    }
    assert not any(d.called for d in pending.values())
    assert not repo_dir.exists() and not (root / "blobs" / "sha256").exists()
    assert os.listdir(root / "uploads") == []
    assert (root / "repositories.index").read_bytes() == index_before
    assert later.run_all() == len(pending)
    assert all(d.called for d in pending.values())
    upload_id = pending["upload"].result
    for d in pending.values():
        d.addErrback(lambda f: pytest.fail(str(f)))
    assert (repo_dir / "_tags" / "1").read_text() == str(digest)
    assert names_in_index(root) == ["team/app"]

    # small reads answer at once, without run_blocking
    sync = Sync(store)
    assert sync.metadata.get_tag("team/app", "1") == digest
    assert sync.metadata.manifest_media_type("team/app", digest) == OCI_MANIFEST
    assert sync.metadata.has_blob_link("team/app", D)
    assert sync.blobs.stat(digest) == len(data)
    assert sync.uploads.repository_of(upload_id) == "team/app"

    # deletes and listings wait too
    pending = {
        "tags": started(store.metadata.list_tags("team/app")),
        "catalog": started(store.metadata.repositories()),
        "referrers": started(store.metadata.referrers("team/app", D)),
        "scan": started(store.metadata.scan_repository("team/app")),
        "delete_tag": started(store.metadata.delete_tag("team/app", "1")),
        "unlink_manifest": started(store.metadata.unlink_manifest("team/app", digest)),
        "unlink_blob": started(store.metadata.unlink_blob("team/app", D)),
        "upload_delete": started(store.uploads.delete(upload_id)),
        "stale": started(store.uploads.stale(0.0)),
        "blobs": started(store.blobs.scan()),
        "evict": started(store.blobs.delete_if_idle(digest, 1e12)),
    }
    assert not any(d.called for d in pending.values())
    assert (repo_dir / "_tags" / "1").exists() and (root / "uploads" / upload_id).exists()
    assert later.run_all() >= len(pending)
    assert pending["tags"].result == ["1"] and pending["catalog"].result == ["team/app"]
    assert pending["unlink_manifest"].result is True and pending["evict"].result == len(data)
    assert not (repo_dir / "_tags" / "1").exists() and not (root / "uploads" / upload_id).exists()


def test_short_file_work_and_long_work_go_to_their_own_threads(tmp_path):
    """With ``run_small`` given (the service's IoThreads), small files, the index and the
    GC lock's shared hold go there; blob data, upload appends and commits and walks of
    every blob stay on ``run_blocking`` (a long commit must not hold up tags and links)."""
    root = tmp_path / "store"
    big, small = Later(), Later()
    store = open_filesystem_store(root, big, small)
    started(store.metadata.set_tag("team/app", "1", D))
    started(store.blobs.put(D, b"{}"))
    started(store.gc_lock.try_shared())
    upload = started(store.uploads.create("team/app"))
    assert (len(big.queued), small.run_all()) == (0, 4)
    upload_id = upload.result
    started(store.uploads.append(upload_id, io.BytesIO(b"x")))
    started(store.blobs.scan())
    writer = store.blobs.writer()
    writer.write(b"layer")
    started(writer.commit(Digest.of(b"layer")))
    assert (len(small.queued), big.run_all()) == (0, 3)
