"""The real ``twistd mirror`` on an S3 bucket (SeaweedFS), one node and two.

Two nodes share one bucket and prefix: what one pulled or pushed, the other serves; a
push whose upload requests alternate between the nodes completes; after both restart
with the upstream gone, they still serve by tag; and ``mirror gc``, a separate process,
evicts from the bucket while a node serves.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import time

import pytest
import yaml

from tests.integration import images
from tests.integration.clients import skip_reason as client_skip_reason
from tests.integration.clients import skopeo_copy
from tests.integration.mirror_proc import MirrorProcess
from tests.integration.proc_util import WorkDir
from tests.integration.upstream_registry import DistributionRegistry, http_request

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _need_skopeo():
    reason = client_skip_reason("skopeo")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def upstream():
    """A Distribution of our own (it is stopped mid-test), holding latest and multi."""
    with WorkDir("mirror-s3-upstream.") as w:
        registry = DistributionRegistry(w / "registry")
        registry.start()
        try:
            yield registry, images.seed_images(registry, big_layer_sizes=None, only=["latest", "multi"])
        finally:
            registry.close()


@pytest.fixture
def nodes(seaweed, workdir, upstream):
    """``nodes(n)``: n twistd nodes on one bucket prefix in front of ``upstream``."""
    registry, _ = upstream
    prefix = f"t-{secrets.token_hex(6)}/"
    started: list[MirrorProcess] = []

    def start(count: int, **extra: object) -> list[MirrorProcess]:
        for i in range(count):
            d = workdir / f"node{i}"
            d.mkdir()
            m = MirrorProcess(
                d,
                [{"registry": "docker.io", "url": registry.url, "tag_ttl": 0, "timeout": 2}],
                storage=seaweed.storage(prefix, d / "spool"),
                hosted=["team/*"],
                **extra,
            )
            started.append(m.start())
        return started

    yield start
    for m in started:
        m.stop()


def blob_gets(registry, since):
    return [e.path for e in registry.access_log(since=since) if e.method == "GET" and "/blobs/" in e.path]


def test_two_nodes_on_one_bucket_serve_as_one(upstream, nodes, workdir):
    """A pull through node A fills the bucket; node B then serves the same image without one
    upstream blob GET; a push to A pulls from B and lists in B's catalog; and after both
    restart with the upstream gone, B still serves both images by tag and by digest."""
    registry, seeded = upstream
    a, b = nodes(2)
    latest, multi = seeded["latest"], seeded["multi"]
    assert skopeo_copy(f"{a.host_port}/{latest.repo}:{latest.tag}") == latest.digest
    assert skopeo_copy(f"{a.host_port}/{multi.repo}:{multi.tag}", all_platforms=True) == multi.digest
    before = registry.mark()
    assert skopeo_copy(f"{b.host_port}/{latest.repo}:{latest.tag}") == latest.digest
    assert skopeo_copy(f"{b.host_port}/{multi.repo}:{multi.tag}", all_platforms=True) == multi.digest
    assert blob_gets(registry, before) == []

    layout = images.build_standard_layout(workdir / "layout", big_layer_sizes=None)
    pushed = images.push_layout(layout.path, "latest", a.host_port, "team/app", "v1")
    assert skopeo_copy(f"{b.host_port}/team/app:v1") == pushed
    status, _, body = http_request(f"{b.url}/v2/_catalog")
    assert status == 200 and "team/app" in json.loads(body)["repositories"]

    registry.stop()
    for m in (a, b):
        m.stop()
        m.start()
    for image, all_platforms in ((latest, False), (multi, True)):
        assert skopeo_copy(f"{b.host_port}/{image.repo}:{image.tag}", all_platforms=all_platforms) == image.digest
        assert skopeo_copy(f"{a.host_port}/{image.repo}@{image.digest}", all_platforms=all_platforms) == image.digest


def test_a_push_whose_requests_alternate_between_nodes_completes(nodes):
    """POST on one node, PATCH on the other, PATCH again on the first, PUT on the second:
    the session is in the bucket, the blob verifies, and either node serves it."""
    a, b = nodes(2)
    data = [secrets.token_bytes(300_000), secrets.token_bytes(200_000)]  # over Twisted's in-memory body size
    digest = "sha256:" + hashlib.sha256(b"".join(data)).hexdigest()
    status, headers, _ = http_request(f"{a.url}/v2/team/split/blobs/uploads/", method="POST")
    assert status == 202
    location = headers["location"]
    offset = 0
    for m, chunk in ((b, data[0]), (a, data[1])):
        status, headers, body = http_request(
            f"{m.url}{location}", method="PATCH", data=chunk,
            headers={"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{offset + len(chunk) - 1}"},
        )  # fmt: skip
        assert status == 202, body
        offset += len(chunk)
        assert headers["range"] == f"0-{offset - 1}"
    status, _, body = http_request(f"{b.url}{location}?digest={digest}", method="PUT", data=b"")
    assert status == 201, body
    for m in (a, b):
        status, headers, body = http_request(f"{m.url}/v2/team/split/blobs/{digest}")
        assert status == 200 and hashlib.sha256(body).hexdigest() == digest[7:]
    status, _, body = http_request(f"{a.url}{location}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"


def test_gc_process_evicts_from_the_bucket_while_a_node_serves(upstream, nodes, workdir):
    """`mirror gc` against the bucket (another process) evicts by the access record the
    node flushed there; the node then fetches afresh from the upstream and serves again."""
    registry, seeded = upstream
    (a,) = nodes(1)
    latest = seeded["latest"]
    assert skopeo_copy(f"{a.host_port}/{latest.repo}:{latest.tag}") == latest.digest
    config = yaml.safe_load(a.config_path.read_text())
    dry = subprocess.run([sys.executable, "-m", "mirror.tools.cli", "gc", "--dry-run", "--config", str(a.config_path)],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "would delete 0 manifests and 0 blobs" in dry.stdout and "dry run" in dry.stdout, dry.stdout
    time.sleep(2.5)  # the node flushes its access record every second; then all is over max_age
    config["gc"] = {"grace": 0, "max_age": 1}
    conf = workdir / "gc.yaml"
    conf.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "mirror.tools.cli", "gc", "--json", "--config", str(conf)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    assert numbers["blobs_deleted"] >= len(latest.layers) and numbers["store_blobs"] == 0, numbers
    before = registry.mark()
    assert skopeo_copy(f"{a.host_port}/{latest.repo}:{latest.tag}") == latest.digest
    assert any(latest.layers[0] in path for path in blob_gets(registry, before))
