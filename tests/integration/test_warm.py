"""`mirror warm` in-process against the fake upstream: the service's verified fetch path on
the real reactor, one upstream GET per blob, resume, failures named per image, -j, platform
selection, and the command itself in a child process."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

import pytest
import pytest_twisted

from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import HTTPConnectionPool

from mirror.config import MirrorConfig, StorageConfig, UpstreamConfig
from mirror.core.oci import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, parse_digest
from mirror.core.platforms import PlatformChoice, parse_platforms
from mirror.tap import build_registry
from mirror.tools.progress import Progress
from mirror.tools.warm import Warmer, read_image_list
from tests.storeutil import Sync

REPO = Path(__file__).resolve().parent.parent
AMD64 = parse_platforms("linux/amd64")
MIB = 1024 * 1024


def add_image(fake, name, tag, layers, *, arch="amd64", media_type=DOCKER_MANIFEST):
    """A schema2 (or OCI) image in the fake upstream; returns (manifest digest, [config, layers...])."""
    config = json.dumps({"architecture": arch, "os": "linux", "tag": tag}).encode()
    blobs = [fake.add_blob(config)] + [fake.add_blob(layer) for layer in layers]
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": len(config), "digest": blobs[0]},
        "layers": [
            {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": len(layer), "digest": d}
            for layer, d in zip(layers, blobs[1:], strict=True)
        ],
    }
    return fake.add_manifest(name, tag, doc, media_type), blobs


def add_index(fake, name, tag, arches):
    """An OCI index of one-layer images, one per arch; returns (index digest, {arch: blobs})."""
    children, blobs = [], {}
    for arch in arches:
        digest, blobs[arch] = add_image(fake, name, f"{tag}-{arch}", [os.urandom(5000)], arch=arch, media_type=OCI_MANIFEST)
        size = len(fake.manifests[(name, digest)][0])
        children.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                         "platform": {"os": "linux", "architecture": arch}})
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
    return fake.add_manifest(name, tag, doc, OCI_INDEX), blobs


def blob_gets(fake, digest):
    return fake.count("GET", f"/blobs/{digest}")


def in_store(root, digest):
    return (root / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()


@pytest.fixture
def warm_service(tmp_path):
    """Builds the warm command's service on one store; each call is a fresh 'run'."""
    pools = []

    def make(url, **upstream_kw):
        config = MirrorConfig(
            listen=(),
            storage=StorageConfig(root=tmp_path / "store"),
            upstreams=(UpstreamConfig(registry="docker.io", url=url, **upstream_kw),),
        )
        pool = HTTPConnectionPool(reactor, persistent=True)
        pools.append(pool)
        return build_registry(config, reactor, pool)

    yield make
    for pool in pools:
        pytest_twisted.blockon(pool.closeCachedConnections())


async def warm(service, images, *, platforms=AMD64, jobs=4):
    return await Warmer(service, platforms=platforms, jobs=jobs).run(images)


@pytest_twisted.ensureDeferred
async def test_one_get_per_blob_then_a_second_run_fetches_nothing(fake_upstream, warm_service):
    """Two images sharing a layer: every blob is fetched once, verified into the store and
    the tags set; a second run (a new process) downloads nothing and says so."""
    shared = os.urandom(300_000)
    a, blobs_a = add_image(fake_upstream, "library/a", "1", [shared, os.urandom(1000)])
    b, blobs_b = add_image(fake_upstream, "library/b", "latest", [shared])
    service = warm_service(fake_upstream.url)
    report = await warm(service, ["library/a:1", "docker.io/library/b", "library/a:1"], jobs=2)
    assert [i.image for i in report.images] == ["library/a:1", "docker.io/library/b"]  # duplicates once
    assert all(i.ok for i in report.images), [i.error for i in report.images]
    unique = set(blobs_a) | set(blobs_b)
    assert all(blob_gets(fake_upstream, d) == 1 for d in unique)
    assert all(in_store(service.config.storage.root, d) for d in unique)
    assert (report.blobs_fetched, report.blobs_cached) == (len(unique), 0)
    assert report.bytes_fetched == sum(len(fake_upstream.blobs[d]) for d in unique)
    assert Sync(service.store).metadata.get_tag("docker.io/library/a", "1") == parse_digest(a)
    assert Sync(service.store).metadata.get_tag("docker.io/library/b", "latest") == parse_digest(b)
    assert report.images[0].reference == "docker.io/library/a:1" and str(report.images[0].digest) == a
    assert os.listdir(service.config.storage.root / "spool") == []

    gets_before = sum(n for (method, _), n in fake_upstream.requests.items() if method == "GET")
    again = await warm(warm_service(fake_upstream.url), ["library/a:1", "library/b"])
    assert (again.blobs_fetched, again.bytes_fetched, again.blobs_cached) == (0, 0, len(unique))
    assert sum(n for (method, _), n in fake_upstream.requests.items() if method == "GET") == gets_before  # HEADs only
    assert "blobs: 0 fetched (0 B), 4 already cached" in again.summary()
    assert again.summary().endswith("everything was already cached")


@pytest_twisted.ensureDeferred
async def test_interrupted_run_resumes_without_refetching(fake_upstream, warm_service):
    """Interrupted mid-image: the blob under way is dropped (no spool file left), what was
    verified stays; the next run fetches only what is missing."""
    first, second = os.urandom(2 * 65536), os.urandom(40 * 65536)
    _, blobs = add_image(fake_upstream, "library/app", "latest", [first, second])
    _config_blob, first_d, second_d = blobs
    fake_upstream.chunk_delay = 0.02
    service = warm_service(fake_upstream.url)
    warmer = Warmer(service, platforms=AMD64)
    run = defer.ensureDeferred(warmer.run(["library/app"]))
    for _ in range(500):
        if in_store(service.config.storage.root, first_d) and os.listdir(service.config.storage.root / "spool"):
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert in_store(service.config.storage.root, first_d) and not in_store(service.config.storage.root, second_d)
    await warmer.interrupt()
    assert os.listdir(service.config.storage.root / "spool") == []  # the partial download is gone
    report = await run
    assert not report.images[0].ok  # interrupted

    fake_upstream.chunk_delay = 0
    again = await warm(warm_service(fake_upstream.url), ["library/app"])
    assert again.images[0].ok
    assert (again.blobs_fetched, again.blobs_cached) == (1, 2)
    assert [blob_gets(fake_upstream, d) for d in blobs] == [1, 1, 2]


@pytest_twisted.ensureDeferred
async def test_failures_are_named_per_image_and_the_rest_is_warmed(fake_upstream, warm_service):
    """A malformed reference, an unknown image, an unreachable blob and a corrupt blob each
    fail their own image with a reason; the good image is warmed; nothing corrupt is stored."""
    _good, _ = add_image(fake_upstream, "library/good", "1", [os.urandom(100)])
    _, broken = add_image(fake_upstream, "library/broken", "1", [os.urandom(100)])
    _, corrupt = add_image(fake_upstream, "library/corrupt", "1", [os.urandom(100)])
    fake_upstream.faults[broken[1]] = "500"
    fake_upstream.faults[corrupt[1]] = "corrupt"
    service = warm_service(fake_upstream.url)
    report = await warm(service, ["Library/Bad", "library/good:1", "library/missing:1", "library/broken:1",
                                  "library/corrupt:1", "quay.io/x/y"])
    errors = {i.image: i.error for i in report.images}
    assert errors["library/good:1"] is None
    assert "invalid image reference 'Library/Bad': repository names are lower case" == errors["Library/Bad"]
    assert "has no library/missing:1" in errors["library/missing:1"]
    assert "failed with 500" in errors["library/broken:1"]
    assert f"fetching blob {corrupt[1]} failed" in errors["library/corrupt:1"] and "expected" in errors["library/corrupt:1"]
    assert "no upstream for registry 'quay.io'" in errors["quay.io/x/y"]
    assert [i.image for i in report.failed] == [
        "Library/Bad", "library/missing:1", "library/broken:1", "library/corrupt:1", "quay.io/x/y",
    ]
    assert not any(path.lower().startswith("/v2/library/bad/") for _, path in fake_upstream.requests)  # nothing asked for it
    assert not in_store(service.config.storage.root, corrupt[1])
    assert "(1 ok, 5 failed)" in report.summary()


@pytest_twisted.ensureDeferred
async def test_jobs_bounds_images_in_flight(fake_upstream, warm_service):
    """-j 2 with four slow images: never more than two blob downloads at once, and two do
    run together."""
    for n in range(4):
        add_image(fake_upstream, f"library/img{n}", "latest", [os.urandom(6 * 65536)])
    fake_upstream.chunk_delay = 0.01
    active, peak = [0], [0]
    serve = fake_upstream._blob

    def counting(request, name, digest, method):
        # a download lasts from the request to its last byte (the fake finishes the
        # response a chunk_delay later, when the client may have moved on already)
        size, written, write = len(fake_upstream.blobs[digest]), [0], request.write
        active[0] += 1
        peak[0] = max(peak[0], active[0])

        def tracking(data):
            write(data)
            written[0] += len(data)
            if written[0] == size:
                active[0] -= 1

        request.write = tracking
        return serve(request, name, digest, method)

    fake_upstream._blob = counting
    report = await warm(warm_service(fake_upstream.url), [f"library/img{n}" for n in range(4)], jobs=2)
    assert all(i.ok for i in report.images)
    assert peak[0] == 2


@pytest_twisted.ensureDeferred
async def test_index_takes_the_wanted_platforms(fake_upstream, warm_service):
    """An index: the host platform's child by default, the listed ones, or all; a platform
    the index lacks fails the image naming what it has."""
    index, blobs = add_index(fake_upstream, "library/multi", "latest", ["amd64", "arm64"])
    service = warm_service(fake_upstream.url)
    report = await warm(service, ["library/multi"])
    assert report.images[0].ok and report.images[0].platforms == ["linux/amd64"]
    assert report.images[0].manifests == 2
    assert all(in_store(service.config.storage.root, d) for d in blobs["amd64"])
    assert not any(in_store(service.config.storage.root, d) for d in blobs["arm64"])
    assert str(report.images[0].digest) == index

    report = await warm(warm_service(fake_upstream.url), ["library/multi"], platforms=PlatformChoice(None))
    assert report.images[0].platforms == ["linux/amd64", "linux/arm64"]
    assert (report.blobs_fetched, report.blobs_cached) == (2, 2)

    report = await warm(warm_service(fake_upstream.url), ["library/multi"], platforms=parse_platforms("linux/s390x"))
    assert "no manifest for linux/s390x (it has linux/amd64, linux/arm64)" in report.images[0].error


@pytest_twisted.ensureDeferred
async def test_warm_leaves_a_running_services_spool_alone(fake_upstream, warm_service, tmp_path):
    """Warming cleans spool/ of what a dead process left, but a running service's fill
    there (its writer holds the file's flock) survives."""
    add_image(fake_upstream, "library/app", "latest", [os.urandom(100)])
    spool = tmp_path / "store" / "spool"
    spool.mkdir(parents=True)
    live, dead = "a" * 32, "d" * 32  # spool file names
    (spool / live).write_bytes(b"half a layer")
    (spool / dead).write_bytes(b"half a layer")
    fd = os.open(spool / live, os.O_WRONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the running service's writer does
        report = await warm(warm_service(fake_upstream.url), ["library/app"])
    finally:
        os.close(fd)
    assert report.images[0].ok
    assert os.listdir(spool) == [live]


@pytest_twisted.ensureDeferred
async def test_progress_reports_every_blob_and_image(fake_upstream, warm_service):
    """Plain progress: a line per fetched blob and per image."""
    import io

    add_image(fake_upstream, "library/app", "latest", [os.urandom(70000)])
    out = io.StringIO()
    service = warm_service(fake_upstream.url)
    report = await Warmer(service, platforms=AMD64, progress=Progress(out, reactor, tty=False)).run(["library/app"])
    lines = out.getvalue().splitlines()
    assert sum(line.startswith("fetched docker.io/library/app sha256:") for line in lines) == 2
    assert lines[-1].startswith(
        f"ok      docker.io/library/app:latest {report.images[0].digest}: 2 blobs, 2 fetched, 0 already cached"
    )


def test_image_list_files():
    """List files: one reference per line; blank lines and # comments skipped."""
    text = "# base images\nalpine:3.19\n\n  ghcr.io/org/app:1   # the app\n#ignored\n"
    assert read_image_list(text.splitlines()) == ["alpine:3.19", "ghcr.io/org/app:1"]


def write_config(tmp_path, url, **extra):
    config = {"listen": "tcp:0", "storage": {"root": str(tmp_path / "store")},
              "upstreams": [{"registry": "docker.io", "url": url, "timeout": 5}], **extra}
    path = tmp_path / "mirror.yaml"
    path.write_text(json.dumps(config))
    return path


async def mirror_command(*args):
    """Run `python -m mirror.tools.cli ARGS` without blocking the reactor (the fake upstream runs on it)."""
    out, err, code = await getProcessOutputAndValue(sys.executable, ["-m", "mirror.tools.cli", *args],
                                                    env=dict(os.environ), path=str(REPO))
    return out.decode(), err.decode(), code


@pytest_twisted.ensureDeferred
async def test_command_exit_status_summary_and_failed_images(fake_upstream, tmp_path):
    """`mirror warm`: plain progress lines, a summary, exit 1 naming every failed image on
    stderr; all good and all cached on the next run: exit 0."""
    add_image(fake_upstream, "library/app", "1", [os.urandom(1000)])
    add_index(fake_upstream, "library/multi", "latest", ["amd64", "arm64"])
    config = write_config(tmp_path, fake_upstream.url)
    images = tmp_path / "images.txt"
    images.write_text("library/multi  # every platform\n")
    out, err, code = await mirror_command("warm", "--config", str(config), "library/app:1", "library/nope", "Bad!",
                                          "-f", str(images), "--platform", "all", "-j", "2")
    assert code == 1, err
    assert "mirror warm: failed: library/nope: upstream docker.io has no library/nope:latest" in err
    assert "mirror warm: failed: Bad!: invalid image reference 'Bad!'" in err
    assert "library/app" not in err and "multi" not in err
    assert "summary: 4 images (2 ok, 2 failed), 4 manifests; blobs: 6 fetched" in out
    assert "\x1b" not in out
    out, err, code = await mirror_command("warm", "--config", str(config), "library/app:1", "-f", str(images),
                                          "--platform", "all")
    assert code == 0, err
    assert "blobs: 0 fetched (0 B), 6 already cached" in out


@pytest_twisted.ensureDeferred
async def test_command_usage_errors(tmp_path):
    """No images, a bad --platform, a bad -j or an unreadable list: exit 2, one line."""
    config = write_config(tmp_path, "http://127.0.0.1:9")
    cases = [
        ((), "mirror warm: no images given"),
        (("alpine", "--platform", "linux"), "mirror warm: invalid platform 'linux'"),
        (("alpine", "-j", "0"), "expected a whole number >= 1"),
        (("-f", str(tmp_path / "absent.txt")), "absent.txt: cannot read: No such file or directory"),
    ]
    for args, message in cases:
        _out, err, code = await mirror_command("warm", "--config", str(config), *args)
        assert code == 2 and message in err, (args, err)
        assert "Traceback" not in err
