"""The real ``twistd mirror`` in front of a real CNCF Distribution registry.

Images are pushed to the upstream with skopeo (tests/integration/images.py) and pulled
through the mirror with skopeo directly, by digest, with Range and HEAD, and after the
upstream is gone.  The four real clients, each through its own mirror setting, are in
test_clients.py.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.integration import images
from tests.integration.clients import skip_reason as client_skip_reason
from tests.integration.clients import skopeo_copy
from tests.integration.proc_util import WorkDir
from tests.integration.upstream_registry import DistributionRegistry

pytestmark = pytest.mark.integration

ACCEPT_ALL = ", ".join(
    [
        images.MT_OCI_MANIFEST,
        images.MT_OCI_INDEX,
        images.MT_DOCKER_MANIFEST,
        images.MT_DOCKER_LIST,
    ]
)


@pytest.fixture(autouse=True)
def _need_skopeo():
    reason = client_skip_reason("skopeo")
    if reason:
        pytest.skip(reason)


def http(url, *, method="GET", headers=None):
    """(status, headers, body) of one request; HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.mark.parametrize(
    ("key", "all_platforms"),
    [("latest", False), ("oci", False), ("multi", True), ("multi-docker", True), ("big", False)],
)
def test_skopeo_copy_through_mirror_keeps_digests(key, all_platforms, seeded_upstream, mirror):
    """skopeo copies every manifest kind through the mirror with the upstream's digests."""
    _, seeded = seeded_upstream
    image = seeded[key]
    digest = skopeo_copy(f"{mirror.host_port}/{image.repo}:{image.tag}", all_platforms=all_platforms)
    assert digest == image.digest
    # every blob the image names is now in the mirror's store, verified (the last commits,
    # fsync and rename, may still be finishing after the client got its last byte)
    import time

    for blob in image.blobs:
        path = mirror.root / "blobs" / "sha256" / blob[7:9] / blob[7:]
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == blob[7:]


def test_manifest_head_get_range_and_listings(seeded_upstream, mirror):
    """HEAD and GET by tag and digest, blob Range, tags/list and _catalog against the real upstream."""
    _, seeded = seeded_upstream
    image = seeded["latest"]
    url = f"{mirror.url}/v2/{image.repo}"
    status, headers, body = http(f"{url}/manifests/{image.tag}", method="HEAD", headers={"Accept": ACCEPT_ALL})
    assert status == 200 and body == b""
    assert headers["Docker-Content-Digest"] == image.digest
    assert headers["Content-Type"] == image.media_type
    size = int(headers["Content-Length"])
    status, headers, body = http(f"{url}/manifests/{image.digest}", headers={"Accept": ACCEPT_ALL})
    assert status == 200 and len(body) == size
    assert "sha256:" + hashlib.sha256(body).hexdigest() == image.digest
    assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    layer = image.layers[0]
    status, headers, whole = http(f"{url}/blobs/{layer}")
    assert status == 200 and "sha256:" + hashlib.sha256(whole).hexdigest() == layer
    status, headers, part = http(f"{url}/blobs/{layer}", headers={"Range": "bytes=10-19"})
    assert status == 206 and part == whole[10:20]
    assert headers["Content-Range"] == f"bytes 10-19/{len(whole)}"
    status, headers, body = http(f"{url}/blobs/{layer}", method="HEAD")
    assert status == 200 and int(headers["Content-Length"]) == len(whole) and headers["Docker-Content-Digest"] == layer
    status, _, body = http(f"{url}/tags/list")
    assert json.loads(body) == {"name": image.repo, "tags": [image.tag]}
    status, headers, body = http(f"{mirror.url}/v2/_catalog?n=1")
    assert json.loads(body)["repositories"] == [f"docker.io/{image.repo}"]


def test_fan_in_one_upstream_get_per_blob(seeded_upstream, mirror):
    """20 concurrent cold requests for one multi-MiB blob: Distribution's access log shows one GET."""
    registry, seeded = seeded_upstream
    layer = seeded["big"].layers[-1]
    before = len(registry.access_log())
    url = f"{mirror.url}/v2/{seeded['big'].repo}/blobs/{layer}"

    def fetch(_):
        return hashlib.sha256(http(url)[2]).hexdigest()

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        digests = list(pool.map(fetch, range(20)))
    assert digests == [layer[7:]] * 20
    gets = [e for e in registry.access_log(since=before) if e.method == "GET" and layer in e.path]
    assert len(gets) == 1


def test_misses_of_the_real_registry_are_remembered(seeded_upstream, mirror):
    """Distribution's 404s: an unknown tag is asked for once in eight requests, in a known
    repository or not, within negative_ttl (default 30 s).  (Distribution 2.8 answers
    MANIFEST_UNKNOWN for an unknown repository too; a NAME_UNKNOWN, as other registries
    send, covers every tag: tests/integration/test_mirror_faults.py.)"""
    registry, seeded = seeded_upstream
    repo = seeded["big"].repo
    before = len(registry.access_log())
    for _ in range(8):
        status, _, body = http(f"{mirror.url}/v2/{repo}/manifests/nosuchtag")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    for tag in ("latest", "v1", "latest", "v1"):
        status, _, body = http(f"{mirror.url}/v2/nosuch/repository/manifests/{tag}")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    asked = [(e.method, e.path) for e in registry.access_log(since=before) if "/manifests/" in e.path]
    assert asked == [
        ("GET", f"/v2/{repo}/manifests/nosuchtag"),
        ("GET", "/v2/nosuch/repository/manifests/latest"),
        ("GET", "/v2/nosuch/repository/manifests/v1"),
    ]


def test_upstream_gone_and_mirror_restarted_still_serves(seeded_upstream, mirror_for):
    """After a restart with the upstream gone, everything cached pulls by tag and by digest."""
    _, _seeded = seeded_upstream
    with WorkDir("mirror-offline-upstream.") as w:
        upstream = DistributionRegistry(w / "registry")
        upstream.start()
        try:
            mine = images.seed_images(upstream, big_layer_sizes=None, only=["latest", "multi"])
            m = mirror_for([{"registry": "docker.io", "url": upstream.url, "tag_ttl": 0, "timeout": 2}])
            for key, all_platforms in (("latest", False), ("multi", True)):
                copied = skopeo_copy(f"{m.host_port}/{mine[key].repo}:{mine[key].tag}", all_platforms=all_platforms)
                assert copied == mine[key].digest
        finally:
            upstream.close()
        m.stop()
        m.start()
        for key, all_platforms in (("latest", False), ("multi", True)):
            image = mine[key]
            assert skopeo_copy(f"{m.host_port}/{image.repo}:{image.tag}", all_platforms=all_platforms) == image.digest
            assert skopeo_copy(f"{m.host_port}/{image.repo}@{image.digest}", all_platforms=all_platforms) == image.digest
        assert "serving cached" in m.log_text()


def test_upstream_with_basic_auth(mirror_for):
    """An upstream behind htpasswd Basic auth: the mirror sends its configured credentials."""
    with WorkDir("mirror-basic-upstream.") as w:
        upstream = DistributionRegistry(w / "registry", auth="htpasswd")
        upstream.start()
        try:
            mine = images.seed_images(upstream, big_layer_sizes=None, only=["latest"])
            user, password = upstream.creds
            m = mirror_for([{"registry": "docker.io", "url": upstream.url, "username": user, "password": password}])
            assert skopeo_copy(f"{m.host_port}/library/hello:latest") == mine["latest"].digest
            assert password not in m.log_text()
            anonymous = mirror_for([{"registry": "docker.io", "url": upstream.url}])
            status, _, body = http(f"{anonymous.url}/v2/library/hello/manifests/latest")
            assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
        finally:
            upstream.close()


def test_upstream_with_bearer_token_auth(mirror_for):
    """An upstream with `auth: token` (JWTs from a test issuer that Distribution verifies):
    the mirror gets a token with its credentials, retries, and reuses the token."""
    with WorkDir("mirror-token-upstream.") as w:
        upstream = DistributionRegistry(w / "registry", auth="token")
        upstream.start()
        try:
            mine = images.seed_images(upstream, big_layer_sizes=None, only=["latest", "multi"])
            user, password = upstream.creds
            issued_before = upstream.token_issuer.count()
            m = mirror_for([{"registry": "docker.io", "url": upstream.url, "username": user, "password": password}])
            assert skopeo_copy(f"{m.host_port}/library/hello:latest") == mine["latest"].digest
            assert skopeo_copy(f"{m.host_port}/library/hello:multi", all_platforms=True) == mine["multi"].digest
            # one token for library/hello's pull scope, reused for every manifest and blob
            assert upstream.token_issuer.count() - issued_before == 1
            assert password not in m.log_text()
        finally:
            upstream.close()


def test_access_record_survives_restart(seeded_upstream, mirror):
    """A read just before SIGTERM is flushed at shutdown: the access time survives the restart."""
    import os
    import time

    _, seeded = seeded_upstream
    image = seeded["latest"]
    layer = image.layers[0]
    http(f"{mirror.url}/v2/{image.repo}/blobs/{layer}")
    path = mirror.root / "blobs" / "sha256" / layer[7:9] / layer[7:]
    time.sleep(1.5)  # past one flush interval (1 s in these tests)
    os.utime(path, (1_000_000, 1_000_000))
    started = time.time()
    status, _, _ = http(f"{mirror.url}/v2/{image.repo}/blobs/{layer}")
    assert status == 200
    mirror.stop()  # SIGTERM: the shutdown flush writes the pending access
    assert path.stat().st_mtime >= started - 1
    mirror.start()
    status, _, _ = http(f"{mirror.url}/v2/{image.repo}/blobs/{layer}")
    assert status == 200


def test_metrics_endpoint_of_the_real_service(seeded_upstream, workdir):
    """`metrics.listen` serves Prometheus text, /healthz and /readyz on its own port."""
    from tests.integration.mirror_proc import MirrorProcess
    from tests.integration.upstream_registry import free_port

    registry, seeded = seeded_upstream
    port = free_port()
    d = workdir / "metrics"
    d.mkdir()
    with MirrorProcess(d, [{"registry": "docker.io", "url": registry.url}],
                       metrics={"listen": f"tcp:{port}:interface=127.0.0.1"}) as m:
        image = seeded["latest"]
        assert skopeo_copy(f"{m.host_port}/{image.repo}:{image.tag}") == image.digest
        status, headers, body = http(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        text = body.decode()
        assert 'mirror_upstream_fetches_total{kind="blob",outcome="ok",upstream="docker.io"}' in text
        assert 'mirror_http_requests_total{method="GET",route="manifest",status="200"}' in text
        assert http(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert http(f"http://127.0.0.1:{port}/readyz")[0] == 200
        assert http(f"{m.url}/healthz")[0] == 200


@pytest.fixture
def twin_upstream():
    """A Distribution holding the same image as library/hello and library/twin."""
    with WorkDir("mirror-isolation-upstream.") as w:
        upstream = DistributionRegistry(w / "registry")
        upstream.start()
        try:
            hello = images.seed_images(upstream, big_layer_sizes=None, only=["latest"])["latest"]
            twin = images.seed_images(upstream, big_layer_sizes=None, only=["latest"], hello_repo="library/twin")["latest"]
            assert twin.layers == hello.layers and twin.repo == "library/twin"
            yield upstream, hello, twin
        finally:
            upstream.close()


def test_a_stored_blob_is_served_only_through_repositories_the_upstream_says_hold_it(twin_upstream, mirror_for):
    """A digest is not a key, against a real Distribution: a layer pulled through
    library/hello is refused through library/nothing (Distribution has no such blob there;
    GET and HEAD both 404 BLOB_UNKNOWN, although the mirror stores it) and served through
    library/twin, which holds it upstream, after one upstream HEAD and no second GET;
    skopeo then pulls library/twin through the mirror."""
    upstream, hello, twin = twin_upstream
    m = mirror_for([{"registry": "docker.io", "url": upstream.url}])
    assert skopeo_copy(f"{m.host_port}/{hello.repo}:{hello.tag}") == hello.digest
    layer = hello.layers[0]
    before = len(upstream.access_log())
    for method in ("GET", "HEAD"):
        status, _, body = http(f"{m.url}/v2/library/nothing/blobs/{layer}", method=method)
        assert status == 404, (method, body)
    assert json.loads(http(f"{m.url}/v2/library/nothing/blobs/{layer}")[2])["errors"][0]["code"] == "BLOB_UNKNOWN"
    status, _, body = http(f"{m.url}/v2/library/twin/blobs/{layer}")
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer
    asked = [(e.method, e.path) for e in upstream.access_log(since=before) if layer in e.path]
    assert ("HEAD", f"/v2/library/twin/blobs/{layer}") in asked
    assert not [p for method, p in asked if method == "GET" and "/library/twin/" in p]
    assert skopeo_copy(f"{m.host_port}/library/twin:{twin.tag}") == twin.digest


def test_links_written_by_the_service_go_with_blobs_a_gc_process_evicts(twin_upstream, mirror_for):
    """The real sharing: twistd writes a repository's fetched links as it pulls; `mirror gc`,
    another process on the same store, evicts the content by age and removes the links of
    what it deleted; the service then fetches afresh for that repository (a new upstream GET)
    and links again."""
    upstream, hello, _twin = twin_upstream
    m = mirror_for([{"registry": "docker.io", "url": upstream.url}])
    assert skopeo_copy(f"{m.host_port}/{hello.repo}:{hello.tag}") == hello.digest
    links = m.root / "repositories" / "docker.io" / "library" / "hello" / "_fetched" / "sha256"
    layer = hello.layers[0]
    assert (links / layer[7:]).is_file()
    time.sleep(2.5)  # the service flushes its access record every second; then all is over max_age
    conf = m.workdir / "gc.yaml"
    conf.write_text(json.dumps({"listen": "tcp:0", "storage": {"root": str(m.root)},
                                "upstreams": [{"registry": "docker.io", "url": upstream.url}],
                                "gc": {"grace": 0, "max_age": 1}}))
    out = subprocess.run([sys.executable, "-m", "mirror.tools.cli", "gc", "--config", str(conf)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not list((m.root / "blobs").rglob(layer[7:]))
    assert not (links / layer[7:]).exists()
    before = len(upstream.access_log())
    assert skopeo_copy(f"{m.host_port}/{hello.repo}:{hello.tag}") == hello.digest
    assert [e for e in upstream.access_log(since=before) if e.method == "GET" and e.path.endswith(layer)]
    assert (links / layer[7:]).is_file()
