"""The filesystem store's repository index (mirror/storage/fsindex.py).

Real files under tmp_path.  Two store instances on one directory stand for two processes
sharing a store (the service and ``mirror import``, or two workers): each keeps its own
view of the index in memory and must not miss the other's writes.  A crash between an
index record and the repository it announces is made by writing the record alone; a
store of an earlier release by writing its directories without an index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mirror.core.oci import OCI_MANIFEST, Digest
from mirror.storage import fsindex
from mirror.storage.fs import open_filesystem_store
from tests.storeutil import Sync

D = Digest.of(b"{}")


def names_in_index(root: Path) -> list[str]:
    return [line for line in (root / "repositories.index").read_text().split("\n") if line]


def test_a_listing_is_sorted_and_paged_from_the_index(tmp_path):
    """Names sort as whole strings ("a-c" < "a/b"); ``after`` and ``limit`` page them; a
    mirrored repository's fetched links alone do not make it a repository (as the walk)."""
    store = Sync(open_filesystem_store(tmp_path / "store"))
    meta = store.metadata
    for name in ("team/b", "team/a-c", "team/a/b", "team/a"):
        meta.link_manifest(name, D, OCI_MANIFEST)
    meta.link_blob("docker.io/library/x", D, fetched=True)
    meta.set_tag("docker.io/library/y", "1", D)
    meta.link_blob("team/pushed", D)
    every = ["docker.io/library/y", "team/a", "team/a-c", "team/a/b", "team/b", "team/pushed"]
    assert meta.repositories() == every == fsindex.walk_repositories(tmp_path / "store" / "repositories")
    assert meta.repositories(limit=2) == every[:2]
    assert meta.repositories(after="team/a", limit=2) == ["team/a-c", "team/a/b"]
    assert meta.repositories(after="team/a-b") == every[2:]  # not itself a name
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
                 "repositories/docker.io/library/x/_layers/sha256/00", "repositories/docker.io/library/y/_fetched/sha256/00"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")
    (root / "repositories" / "team" / "empty" / "_tags").mkdir(parents=True)  # its last tag deleted


def test_a_store_of_an_earlier_release_is_indexed_when_opened(tmp_path):
    """No index: the store is walked once when opened, the index written and the layout
    raised to 2; a layout-2 store whose index was lost is rebuilt the same way."""
    root = tmp_path / "store"
    write_like_an_earlier_release(root)
    expected = ["docker.io/library/x", "team/a", "team/a-b", "team/empty"]
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
    assert store.metadata.repositories() == ["docker.io/library/x", "team/a", "team/a-b", "team/empty"]
    assert store.metadata.repositories(after="team/a", limit=1) == ["team/a-b"]
    assert not (root / "layout.json").exists()
