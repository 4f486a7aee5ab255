"""A store written by the previous release (commit 9abd62a) is served by this one as it was.

tests/data/legacy_store/ holds such a store (pulled, pushed, deleted and garbage-collected
content, an abandoned upload) and what the old service answered on it, with its upstream
down (see the README there).  Its layout is version 1: opening it migrates it to 2 by
adding the repository index and layout.json, and changes nothing else; every answer is
replayed through the whole web stack, in memory,
with an upstream that refuses every connection: nothing is refetched, every manifest and
blob comes back byte for byte, deleted things stay deleted, and garbage collection plans
exactly what is garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import attrs
import pytest

from twisted.internet.task import Clock

from mirror.config import load_config
from mirror.registry.gc import collect
from mirror.storage.fs import open_filesystem_store
from tests.inmemory import InMemoryMirror, RefusingAgent
from tests.storeutil import blob_path, run_now

DATA = Path(__file__).parent / "data" / "legacy_store"
EXPECTED = json.loads((DATA / "expected.json").read_text())


@pytest.fixture
def legacy(tmp_path):
    """The legacy store extracted under tmp_path, and its config."""
    with tarfile.open(DATA / EXPECTED["tarball"]) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / EXPECTED["store_root_in_tarball"]
    config = load_config(DATA / "conf.yaml")
    return root, attrs.evolve(config, storage=attrs.evolve(config.storage, root=root))


@pytest.fixture
def mirror(legacy):
    root, config = legacy
    m = InMemoryMirror(config, open_filesystem_store(root), clock=Clock())
    m.clock.advance(os.stat(root / "gc.lock").st_mtime)  # the store's time, not 1970
    return m


def answers(node):
    """Every recorded request/answer pair in expected.json."""
    if isinstance(node, dict):
        if {"method", "path", "status"} <= node.keys():
            yield node
        for value in node.values():
            yield from answers(value)
    elif isinstance(node, list):
        for value in node:
            yield from answers(value)


def test_opening_adds_the_index_and_changes_nothing_else(legacy):
    """The migration to layout 2 adds the repository index (every repository the old
    release listed, from a walk) and layout.json; every other file and directory (empty
    ones carry meaning) is as the previous release left it, mtimes (the access record)
    included.  Opening it again writes nothing more."""
    root, _ = legacy

    def snapshot():
        return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_mtime) for p in root.rglob("*")}

    before = snapshot()
    open_filesystem_store(root)
    after = snapshot()
    assert set(after) - set(before) == {"layout.json", "repositories.index"}
    assert {path: after[path] for path in before} == before
    assert json.loads((root / "layout.json").read_text()) == {"layout": 2}
    indexed = [name for name in (root / "repositories.index").read_text().split("\n") if name]
    assert indexed == EXPECTED["catalog"]["repositories"]
    open_filesystem_store(root)
    assert snapshot() == after


def test_every_recorded_answer_is_given_again(mirror):
    """Status and error code of every request the old service answered (deleted manifests
    and blobs, uncached children, the upload session...), and never an upstream fetch."""
    recorded = list(answers(EXPECTED))
    assert len(recorded) >= 10
    for entry in recorded:
        a = mirror.request(entry["method"], entry["path"])
        assert a.code == entry["status"], entry
        if "code" in entry:
            assert a.error_code == entry["code"], entry
    assert isinstance(mirror.upstream_agent, RefusingAgent)
    fetched = mirror.registry.metrics.exposition().decode()
    assert 'outcome="ok"' not in fetched  # nothing was fetched (or could have been)


def test_catalog_tags_and_referrers_are_the_same(mirror):
    assert json.loads(mirror.get("/v2/_catalog").body) == EXPECTED["catalog"]
    for repo, answer in EXPECTED["tags_list"].items():
        assert json.loads(mirror.get(f"/v2/{repo}/tags/list").body) == answer
    ref = EXPECTED["referrers"]
    a = mirror.get(f"/v2/{ref['repository']}/referrers/{ref['subject']}")
    assert json.loads(a.body) == ref["answer"]
    a = mirror.get(f"/v2/{ref['repository']}/referrers/{ref['subject']}?artifactType={ref['filtered']['artifactType']}")
    assert json.loads(a.body) == ref["filtered"]["answer"]
    assert a.header("OCI-Filters-Applied") == ref["filtered"]["oci_filters_applied"]


def test_every_manifest_and_blob_is_served_byte_for_byte(mirror):
    """By tag and by digest, with the recorded media type; every config and layer hashes to
    its digest — from the store, with the upstream unreachable."""
    served_blobs = 0
    for repo, info in EXPECTED["repositories"].items():
        for tag, digest in info["tags"].items():
            a = mirror.get(f"/v2/{repo}/manifests/{tag}")
            assert a.code == 200 and a.header("Docker-Content-Digest") == digest, (repo, tag)
        for digest, manifest in info["manifests"].items():
            a = mirror.get(f"/v2/{repo}/manifests/{digest}")
            assert a.code == 200, (repo, digest)
            assert hashlib.sha256(a.body).hexdigest() == manifest["sha256"]
            assert a.header("Content-Type") == manifest["media_type"]
            for blob in [manifest.get("config"), *manifest.get("layers", [])]:
                if blob is None:
                    continue
                b = mirror.get(f"/v2/{repo}/blobs/{blob['digest']}")
                assert b.code == 200 and len(b.body) == blob["size"], (repo, blob)
                assert "sha256:" + hashlib.sha256(b.body).hexdigest() == blob["digest"]
                served_blobs += 1
    assert served_blobs >= 8


def test_a_blob_no_repository_holds_is_no_longer_served_through_a_mirrored_name(mirror):
    """The previous release served the orphan blob (unlinked from myorg/other) through any
    mirrored name; now the answer is the one for a digest stored nowhere (the upstream is
    unreachable here: 503), while the blobs the repository's manifests name are served."""
    orphan = EXPECTED["orphan_blobs"][0]["digest"]
    nowhere = "sha256:" + "0" * 64
    for method in ("GET", "HEAD"):
        a = mirror.request(method, f"/v2/docker.io/library/alpine/blobs/{orphan}")
        b = mirror.request(method, f"/v2/docker.io/library/alpine/blobs/{nowhere}")
        assert a.code == b.code == 503
        assert a.error_code == b.error_code
    assert mirror.get(f"/v2/myorg/other/blobs/{orphan}").code == 404


def test_an_abandoned_upload_continues(mirror):
    """The old session is still there: it reports its size, and completes (its running hash
    rebuilt from the bytes on disk) as the blob its bytes so far make."""
    upload = EXPECTED["uploads"][0]
    path = f"/v2/{upload['repository']}/blobs/uploads/{upload['id']}"
    a = mirror.get(path)
    assert a.code == 204 and a.header("Range") == upload["range"]
    done = mirror.request("PUT", f"{path}?digest={upload['sha256_so_far']}")
    assert done.code == 201 and done.header("Docker-Content-Digest") == upload["sha256_so_far"]
    blob = mirror.get(f"/v2/{upload['repository']}/blobs/{upload['sha256_so_far']}")
    assert len(blob.body) == upload["size"] and "sha256:" + hashlib.sha256(blob.body).hexdigest() == upload["sha256_so_far"]
    assert mirror.get(path).code == 404  # the session is over


def test_gc_plans_exactly_the_garbage(legacy, mirror):
    """An hour after the old service's last write, the only garbage is the blob whose last
    link was deleted (it was within the grace period when the old GC ran); mirrored images
    are within max_age, hosted ones are tagged, the untagged one is kept without
    delete_untagged.  Then a real run deletes it and everything else is still served."""
    root, config = legacy
    store = open_filesystem_store(root)
    newest = max(os.stat(p).st_mtime for p in root.rglob("*") if p.is_file())
    report = run_now(collect(store, config, now=lambda: newest + 3601, dry_run=True))
    orphan = EXPECTED["orphan_blobs"][0]["digest"]
    assert [str(d) for d in report.plan.delete_blobs] == [orphan]
    assert report.plan.drop_manifests == []
    run_now(collect(store, config, now=lambda: newest + 3601))
    assert not blob_path(root, orphan).exists()
    for repo, info in EXPECTED["repositories"].items():
        for tag in info["tags"]:
            assert mirror.get(f"/v2/{repo}/manifests/{tag}").code == 200
