"""GC against real stores: the CLI and dry-run, online safety while clients push and pull,
eviction during a pull, and kill -9 in the middle of a run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import attrs
import pytest_twisted

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue

from mirror.config import GcConfig, MirrorConfig
from mirror.core.oci import OCI_MANIFEST, Digest
from mirror.registry.gc import collect
from mirror.storage.fs import open_filesystem_store
from tests.integration.test_hosted import image_manifest, push_blob, push_image, sha
from tests.integration.test_mirror_faults import LAYER, image
from tests.storeutil import Sync, blob_path

NO_GRACE = GcConfig(grace=0.0, max_age=0.0)


def with_gc(m, **gc) -> MirrorConfig:
    return m.reconfigure(gc=attrs.evolve(NO_GRACE, **gc))


async def all_manifests_whole(m, repos_tags):
    """Every tagged manifest and all its blobs can be pulled and hash to their digests."""
    for repo, tag in repos_tags:
        r = await m.get(f"/v2/{repo}/manifests/{tag}")
        assert r.code == 200, (repo, tag)
        doc = json.loads(await r.content())
        for desc in [doc["config"], *doc["layers"]]:
            r = await m.get(f"/v2/{repo}/blobs/{desc['digest']}")
            assert r.code == 200, (repo, tag, desc["digest"])
            assert sha(await r.content()) == desc["digest"]


@pytest_twisted.ensureDeferred
async def test_sweep_removes_unreferenced_and_dry_run_deletes_nothing(make_mirror, tmp_path):
    """After a manifest delete, --dry-run lists its blobs and deletes nothing; the real run
    deletes exactly those; kept images stay whole."""
    m = make_mirror(None, hosted=("*",))
    keep_digest, _ = await push_image(m, "team/keep", "v1")
    gone_digest, gone_body = await push_image(m, "team/gone", "v1")
    r = await m.get(f"/v2/team/gone/manifests/{gone_digest}", method="DELETE")
    await r.content()
    orphan = await push_blob(m, "team/gone", b"never referenced")
    config = with_gc(m)
    path = tmp_path / "m.yaml"
    path.write_text(
        json.dumps({"listen": "tcp:0", "storage": {"root": str(m.root)}, "hosted": ["*"], "gc": {"grace": 0, "max_age": 0}})
    )
    before = sorted(p.name for p in (m.root / "blobs").rglob("*") if p.is_file())
    out = subprocess.run(
        [sys.executable, "-m", "mirror.tools.cli", "gc", "--config", str(path), "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # the layer and the orphan are still linked in team/gone; the deleted manifest is linked
    # nowhere; the config ({}) is shared with team/keep and stays
    assert "team/gone: 0 manifests, 2 blobs" in out.stdout
    assert "(unreferenced): 0 manifests, 1 blobs" in out.stdout
    assert "dry run: nothing was deleted" in out.stdout
    assert sorted(p.name for p in (m.root / "blobs").rglob("*") if p.is_file()) == before
    report = await collect(m.store, config)
    gone_layer = json.loads(gone_body)["layers"][0]["digest"]
    expected = {gone_digest, gone_layer, orphan}
    assert {str(d) for d in report.plan.delete_blobs} >= expected
    store = Sync(m.store)
    for d in expected:
        assert store.blobs.stat(Digest("sha256", d[7:])) is None
    assert store.blobs.stat(Digest("sha256", keep_digest[7:])) is not None
    await all_manifests_whole(m, [("team/keep", "v1")])


@pytest_twisted.ensureDeferred
async def test_delete_untagged(make_mirror):
    """--delete-untagged drops a hosted manifest no tag points at, and then its blobs."""
    m = make_mirror(None, hosted=("*",))
    first, first_body = await push_image(m, "a/b", "t")
    _second, _ = await push_image(m, "a/b", "t")  # retags: the first is now untagged
    config = with_gc(m)
    await collect(m.store, config)
    r = await m.get(f"/v2/a/b/manifests/{first}")
    assert r.code == 200  # kept without --delete-untagged
    await r.content()
    await collect(m.store, config, delete_untagged=True)
    r = await m.get(f"/v2/a/b/manifests/{first}")
    assert r.code == 404
    await r.content()
    assert Sync(m.store).blobs.stat(Digest("sha256", json.loads(first_body)["layers"][0]["digest"][7:])) is None
    await all_manifests_whole(m, [("a/b", "t")])


@pytest_twisted.ensureDeferred
async def test_gc_is_safe_while_clients_push_and_pull(make_mirror):
    """GC runs back to back while 4 clients push and pull in a loop; afterwards every
    manifest's blobs are present and intact.

    Even rounds push fresh blobs (inside the grace period: the push must succeed). Odd rounds
    reference a blob made to look long unused, which GC is trying to delete at that moment:
    the push either wins (GC then keeps the blob) or loses cleanly with MANIFEST_BLOB_UNKNOWN;
    a manifest is never accepted with a blob missing.
    """
    m = make_mirror(None, hosted=("*",))
    config = with_gc(m, grace=5.0)
    store = m.store
    pushed: list[tuple[str, str]] = []
    lost_races = 0
    stop = False

    conf = m.root.parent / "gc-loop.yaml"
    conf.write_text(json.dumps(
        {"listen": "tcp:0", "storage": {"root": str(m.root)}, "hosted": ["*"], "gc": {"grace": 5, "max_age": 0}}
    ))

    async def gc_loop():
        # `mirror gc` in its own process, as the service runs it: the real sharing of the store
        runs = 0
        while not stop or runs < 3:
            _out, err, code = await getProcessOutputAndValue(
                sys.executable, ["-m", "mirror.tools.cli", "gc", "--config", str(conf)], env=os.environ
            )
            assert code == 0, err
            runs += 1
            concurrent_runs.append(not stop)
        return runs

    concurrent_runs: list[bool] = []

    async def client(n):
        nonlocal lost_races
        for i in range(10):
            repo, tag = f"load/c{n}", f"t{i}"
            config_digest = await push_blob(m, repo, b'{"n": %d, "i": %d}' % (n, i))
            layer = await push_blob(m, repo, os.urandom(20_000))
            if i % 2:
                old = time.time() - 3600
                os.utime(blob_path(m.root, layer), (old, old))
            body = image_manifest(config_digest, [layer])
            r = await m.get(f"/v2/{repo}/manifests/{tag}", method="PUT", data=body, headers={"Content-Type": OCI_MANIFEST})
            if r.code == 404 and i % 2:
                assert json.loads(await r.content())["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
                lost_races += 1
                continue
            assert r.code == 201, (repo, tag, await r.content())
            await r.content()
            pushed.append((repo, tag))
            await all_manifests_whole(m, [(repo, tag)])

    gc = defer.ensureDeferred(gc_loop())
    await defer.gatherResults([defer.ensureDeferred(client(n)) for n in range(4)])
    stop = True
    runs = await gc
    assert runs >= 3 and concurrent_runs[0]  # GC ran while the clients were pushing
    assert len(pushed) >= 20  # every even round, plus the odd rounds that won their race
    await collect(store, config)  # one more run after the dust settles
    await all_manifests_whole(m, pushed)


@pytest_twisted.ensureDeferred
async def test_pull_during_eviction_gets_whole_blob_or_fresh_fetch(fake_upstream, make_mirror):
    """Eviction while a client is mid-download: that client still gets every verified byte,
    and the next request fetches the blob afresh from the upstream."""
    _, layer = image(fake_upstream)
    m = make_mirror(fake_upstream.url)
    r = await m.get("/v2/library/app/manifests/latest")
    await r.content()
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    await r.content()
    await m.settled()  # cached now
    config = with_gc(m, max_age=0.001)
    time.sleep(0.01)
    slow = await m.get(f"/v2/library/app/blobs/{layer}")  # headers in; body streams as read
    report = await collect(m.store, config)
    assert any(str(d) == layer for d in report.plan.delete_blobs)
    assert Sync(m.store).blobs.stat(Digest("sha256", layer[7:])) is None
    assert await slow.content() == LAYER
    r = await m.get(f"/v2/library/app/blobs/{layer}")
    assert await r.content() == LAYER
    assert fake_upstream.count("GET", f"/blobs/{layer}") == 2


def test_kill_9_during_gc_leaves_a_store_the_next_gc_finishes(tmp_path):
    """kill -9 in the middle of `mirror gc`: every remaining manifest keeps its blobs, and the
    next run removes all the garbage."""
    root = tmp_path / "store"
    store = Sync(open_filesystem_store(root))
    kept = []
    for i in range(20):
        config_blob, layer = b'{"i": %d}' % i, os.urandom(2000)
        for blob in (config_blob, layer):
            store.blobs.put(Digest.of(blob), blob)
            store.metadata.link_blob("team/app", Digest.of(blob))
        body = image_manifest(sha(config_blob), [sha(layer)])
        store.blobs.put(Digest.of(body), body)
        store.metadata.link_manifest("team/app", Digest.of(body), OCI_MANIFEST)
        store.metadata.set_tag("team/app", f"t{i}", Digest.of(body))
        kept.append(Digest.of(body))
    for i in range(30_000):  # garbage to keep GC busy long enough to be killed (no fsync: quick)
        blob = b"garbage %d" % i
        path = blob_path(root, Digest.of(blob))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    old = time.time() - 7200
    for path in (root / "blobs").rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    conf = tmp_path / "m.yaml"
    conf.write_text(json.dumps({"listen": "tcp:0", "storage": {"root": str(root)}, "hosted": ["*"], "gc": {"grace": 60}}))
    proc = subprocess.Popen([sys.executable, "-m", "mirror.tools.cli", "gc", "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        count = sum(1 for _ in (root / "blobs").rglob("*"))
        while time.monotonic() < deadline:  # wait until it is deleting, then kill it
            time.sleep(0.02)
            now_count = sum(1 for _ in (root / "blobs").rglob("*"))
            if now_count < count - 100:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "gc finished before it could be killed"
    remaining = sum(1 for p in (root / "blobs").rglob("*") if p.is_file())
    assert remaining > 60  # it was interrupted with garbage left

    def check_kept():
        for digest in kept:
            data = store.blobs.read(digest, 1 << 20)
            assert data is not None and Digest.of(data) == digest
            doc = json.loads(data)
            for desc in [doc["config"], *doc["layers"]]:
                d = Digest("sha256", desc["digest"][7:])
                assert hashlib.sha256(blob_path(root, d).read_bytes()).hexdigest() == d.encoded

    check_kept()
    out = subprocess.run([sys.executable, "-m", "mirror.tools.cli", "gc", "--config", str(conf)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    check_kept()
    assert sum(1 for p in (root / "blobs").rglob("*") if p.is_file()) == 60  # 20 x (manifest, config, layer)
