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
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tests.integration import images
from tests.integration.clients import pull, skopeo_copy
from tests.integration.clients import skip_reason as client_skip_reason
from tests.integration.mirror_proc import MirrorProcess
from tests.integration.nginx_lb import NginxBalancer
from tests.integration.nginx_lb import skip_reason as nginx_skip_reason
from tests.integration.proc_util import WorkDir, wait_until
from tests.integration.seaweed import SECRET_KEY, SeaweedS3
from tests.integration.upstream_registry import DistributionRegistry, free_port, http_request

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
            port = free_port()
            m = MirrorProcess(
                d,
                [{"registry": "docker.io", "url": registry.url, "tag_ttl": 0, "timeout": 2}],
                listen=[f"tcp:{port}:interface=127.0.0.1"],
                storage=seaweed.storage(prefix, d / "spool"),
                cluster={"advertise": f"http://127.0.0.1:{port}", "secret": "service-test-secret-0123456789"},
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


@pytest.mark.clients
@pytest.mark.parametrize("client", ["skopeo", "podman", "ctr", "docker"])
def test_real_clients_through_nginx_in_front_of_two_nodes(client, upstream, nodes, workdir):
    """nginx balances every request round-robin over two nodes on one bucket: a real client
    pulls through it (its manifest and blob requests land on both nodes), each blob comes
    from the upstream once, a push through nginx (chunks on alternating nodes) completes,
    and skopeo pulls the pushed image back through nginx."""
    reason = client_skip_reason(client) or nginx_skip_reason()
    if reason:
        pytest.skip(reason)
    registry, seeded = upstream
    a, b = nodes(2)
    image = seeded["multi"]
    with NginxBalancer(workdir / "nginx", [a.host_port, b.host_port]) as lb:
        before = registry.mark()
        kwargs = {"all_platforms": True} if client in ("skopeo", "ctr") else {}
        digest = pull(client, lb.host_port, f"docker.io/{image.repo}:{image.tag}", **kwargs)
        if client in ("skopeo", "ctr"):
            assert digest == image.digest
        gets = blob_gets(registry, before)
        assert gets and len(gets) == len(set(gets)), gets  # each blob fetched once, by one node
        assert {a.host_port, b.host_port} <= set(lb.answered_by())
        if client == "skopeo":
            layout = images.build_standard_layout(workdir / "layout", big_layer_sizes=(1 << 20,))
            pushed = images.push_layout(layout.path, "big", lb.host_port, "team/big", "v1")
            assert skopeo_copy(f"{lb.host_port}/team/big:v1") == pushed


def mirror_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror.tools.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_warm_export_and_import_work_against_the_bucket(upstream, nodes, seaweed, workdir):
    """`mirror warm` fills the bucket while a node runs (the node then serves without an
    upstream GET), `mirror export` writes the bucket's images to an archive, and `mirror
    import` loads it into another prefix, which an offline node then serves."""
    registry, seeded = upstream
    (a,) = nodes(1)
    warm = mirror_cli("warm", "--config", str(a.config_path), "library/hello:latest", "hello:multi", "--platform", "all")
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "summary: 2 images (2 ok, 0 failed)" in warm.stdout
    mark = registry.mark()
    assert skopeo_copy(f"{a.host_port}/library/hello:multi", all_platforms=True) == seeded["multi"].digest
    assert blob_gets(registry, mark) == []
    archive = workdir / "cache.tar"
    export = mirror_cli("export", "--config", str(a.config_path), "--out", str(archive))
    assert export.returncode == 0, export.stderr
    assert "2 images" in export.stdout

    (workdir / "offline").mkdir()
    offline = MirrorProcess(workdir / "offline", [{"registry": "docker.io", "url": f"http://127.0.0.1:{free_port()}"}],
                            storage=seaweed.storage(f"t-{secrets.token_hex(6)}/", workdir / "offline" / "spool"),
                            offline=True)
    loaded = mirror_cli("import", str(archive), "--config", str(offline.config_path))
    assert loaded.returncode == 0, loaded.stderr
    with offline:
        for key, all_platforms in (("latest", False), ("multi", True)):
            image = seeded[key]
            assert skopeo_copy(f"{offline.host_port}/{image.repo}:{image.tag}", all_platforms=all_platforms) == image.digest


def test_an_unreachable_bucket_is_a_clear_503_and_the_node_recovers(upstream, workdir):
    """With its bucket down, a node answers every request at once with 503 UNAVAILABLE (the
    spec's error JSON, no hang, no traceback) and /readyz says not ready; once the bucket
    is back, the node serves again without a restart."""
    registry, seeded = upstream
    image = seeded["latest"]
    (workdir / "s3").mkdir()
    bucket = SeaweedS3(workdir / "s3")
    bucket.start()
    try:
        (workdir / "node").mkdir()
        node = MirrorProcess(workdir / "node", [{"registry": "docker.io", "url": registry.url}],
                             storage=bucket.storage("", workdir / "node" / "spool"),
                             metrics={"listen": f"tcp:{free_port()}:interface=127.0.0.1"})
        with node:
            assert skopeo_copy(f"{node.host_port}/{image.repo}:{image.tag}") == image.digest
            bucket.stop()
            started = time.monotonic()
            for path in (f"/v2/{image.repo}/manifests/{image.tag}", f"/v2/{image.repo}/blobs/{image.layers[0]}"):
                status, _, body = http_request(f"{node.url}{path}", timeout=30)
                assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE", body
            assert time.monotonic() - started < 15
            status, _, body = http_request(f"{node.url}/readyz")
            assert status == 503 and b"object store" in body
            assert "Traceback" not in node.log_text()
            bucket.start()
            # (the bucket's port answers before its S3 API does: wait, as an operator's
            # readiness probe would, until the node finds the store usable again)
            assert wait_until(lambda: http_request(f"{node.url}/readyz")[0] == 200, 30), node.log_tail()
            assert skopeo_copy(f"{node.host_port}/{image.repo}:{image.tag}") == image.digest
    finally:
        bucket.stop()


def test_gc_on_one_node_while_another_takes_a_push(upstream, nodes, workdir):
    """Node B's `mirror gc` (evicting everything idle) runs while node A takes a push of a
    new image: the pushed image stays whole (GC and the push coordinate through the
    bucket's lease and holds), and what GC evicted is fetched again on the next pull."""
    registry, seeded = upstream
    a, b = nodes(2)
    latest = seeded["latest"]
    assert skopeo_copy(f"{a.host_port}/{latest.repo}:{latest.tag}") == latest.digest
    layout = images.build_standard_layout(workdir / "layout", big_layer_sizes=(4 << 20, 4 << 20))
    time.sleep(3.5)  # everything pulled so far is now past max_age and the grace period
    config = yaml.safe_load(b.config_path.read_text())
    config["gc"] = {"grace": 2, "max_age": 1}  # (the grace protects a push's blobs until its manifest lands)
    conf = workdir / "gc.yaml"
    conf.write_text(yaml.safe_dump(config))
    pushed: list[str] = []
    pusher = threading.Thread(target=lambda: pushed.append(images.push_layout(layout.path, "big", a.host_port, "team/big", "v1")))
    pusher.start()
    out = subprocess.run([sys.executable, "-m", "mirror.tools.cli", "gc", "--json", "--config", str(conf)],
                         capture_output=True, text=True, timeout=120)
    pusher.join(timeout=120)
    assert out.returncode == 0, out.stderr
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    assert numbers["blobs_deleted"] >= len(latest.layers), numbers
    assert pushed and skopeo_copy(f"{b.host_port}/team/big:v1") == pushed[0]
    mark = registry.mark()
    assert skopeo_copy(f"{b.host_port}/{latest.repo}:{latest.tag}") == latest.digest
    assert blob_gets(registry, mark)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def redirecting_node(seaweed, workdir, registry) -> MirrorProcess:
    """A node (not started) on a fresh prefix with storage.s3.redirect on."""
    (workdir / "node").mkdir()
    storage = seaweed.storage(f"t-{secrets.token_hex(6)}/", workdir / "node" / "spool")
    storage["s3"]["redirect"] = True  # type: ignore[index]
    return MirrorProcess(workdir / "node", [{"registry": "docker.io", "url": registry.url}], storage=storage)


def test_redirect_sends_clients_to_presigned_urls_of_held_blobs_only(upstream, seaweed, workdir):
    """With storage.s3.redirect, a stored blob's GET through a repository that holds it is
    307 to a presigned URL of its object (no credentials in it; the bucket serves the bytes,
    also a Range), HEAD is still answered by the node, a digest the repository does not
    hold is still the upstream's 404, and skopeo pulls through the redirects."""
    registry, seeded = upstream
    image = seeded["latest"]
    node = redirecting_node(seaweed, workdir, registry)
    with node:
        assert skopeo_copy(f"{node.host_port}/{image.repo}:{image.tag}") == image.digest  # cold: streamed
        layer = image.layers[0]
        opener = urllib.request.build_opener(_NoRedirects)
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open(f"{node.url}/v2/{image.repo}/blobs/{layer}", timeout=30)
        info.value.close()
        assert info.value.code == 307
        location = info.value.headers["Location"]
        assert location.startswith(seaweed.endpoint) and "X-Amz-Signature=" in location
        assert SECRET_KEY not in location
        with urllib.request.urlopen(location, timeout=30) as r:
            assert "sha256:" + hashlib.sha256(r.read()).hexdigest() == layer
        ranged = urllib.request.Request(location, headers={"Range": "bytes=0-9"})
        with urllib.request.urlopen(ranged, timeout=30) as r:
            assert r.status == 206 and len(r.read()) == 10
        status, headers, _ = http_request(f"{node.url}/v2/{image.repo}/blobs/{layer}", method="HEAD")
        assert status == 200 and headers["docker-content-digest"] == layer
        status, _, body = http_request(f"{node.url}/v2/library/nothing/blobs/{layer}")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
        mark = registry.mark()
        assert skopeo_copy(f"{node.host_port}/{image.repo}:{image.tag}") == image.digest  # warm: redirected
        assert blob_gets(registry, mark) == []


@pytest.mark.clients
@pytest.mark.parametrize("client", ["podman", "ctr", "docker"])
def test_real_clients_follow_the_redirect_to_the_bucket(client, upstream, seaweed, workdir):
    """podman, containerd and dockerd pull an image whose blobs the node answers with 307 to
    presigned bucket URLs (skopeo: the test above), fetching nothing from the upstream."""
    reason = client_skip_reason(client)
    if reason:
        pytest.skip(reason)
    registry, seeded = upstream
    image = seeded["latest"]
    node = redirecting_node(seaweed, workdir, registry)
    with node:
        assert skopeo_copy(f"{node.host_port}/{image.repo}:{image.tag}") == image.digest  # fills the bucket
        mark = registry.mark()
        pull(client, node.host_port, f"docker.io/{image.repo}:{image.tag}")
        assert blob_gets(registry, mark) == []
        assert '/blobs/sha256:' in node.log_text() and '" 307 ' in node.log_text()
