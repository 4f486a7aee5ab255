"""The private half of the registry: real clients push to the real ``twistd mirror``.

Every test starts its own ``twistd mirror`` on 127.0.0.1 with ``hosted`` set: ``["*"]``
makes it a plain private registry (no upstreams), ``["myorg/*"]`` next to a docker.io
upstream makes it both a private registry and a mirror. Clients push and pull the
registry itself (``127.0.0.1:PORT/repo:tag``, plain HTTP) and the test checks that what
comes back is what went in, digest for digest:

* skopeo: OCI layout → registry → another OCI layout, one platform and ``--all``;
* docker: ``docker push`` / ``docker pull`` through a private dockerd;
* podman: ``podman push`` / ``podman pull``;
* a mixed config refusing pushes to mirrored names (``DENIED``) while still mirroring;
* ``read_only`` switched on and off with SIGHUP, and a broken config refused on SIGHUP.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration import images
from tests.integration.clients import (
    PodmanSession,
    docker_push,
    docker_repo_digest,
    private_docker,
    skopeo_copy,
)
from tests.integration.clients import (
    skip_reason as client_skip_reason,
)
from tests.integration.mirror_proc import MirrorProcess
from tests.integration.proc_util import wait_until
from tests.integration.upstream_registry import RegistryClient, http_request

pytestmark = pytest.mark.integration

ACCEPT_ALL = ", ".join([images.MT_OCI_MANIFEST, images.MT_OCI_INDEX, images.MT_DOCKER_MANIFEST, images.MT_DOCKER_LIST])


def _need(client: str) -> None:
    reason = client_skip_reason(client)
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _need_skopeo() -> None:
    _need("skopeo")  # every test pushes or seeds with skopeo


@pytest.fixture
def start_mirror(workdir: Path) -> Iterator[Callable[..., MirrorProcess]]:
    """Start ``twistd mirror`` with the given upstreams and extra top-level config keys."""
    started: list[MirrorProcess] = []

    def start(upstreams: list[dict[str, object]], **extra: object) -> MirrorProcess:
        d = workdir / f"registry{len(started)}"
        d.mkdir()
        m = MirrorProcess(d, upstreams, **extra)
        started.append(m)
        return m.start()

    yield start
    for m in started:
        m.stop()
    for m in started:  # nothing went wrong inside the registry that the clients did not notice
        problems = [line for line in m.log_text().splitlines() if "Traceback" in line or "Unhandled" in line]
        assert not problems, f"{m.log}:\n" + "\n".join(problems[:10])


@pytest.fixture
def private_registry(start_mirror) -> MirrorProcess:
    """A pure private registry: no upstreams, every repository name hosted."""
    return start_mirror([], hosted=["*"])


@pytest.fixture
def layout(workdir: Path) -> images.OciLayout:
    """The standard OCI layout: ``latest`` (host platform) and ``multi`` (amd64+arm64 index),
    plus ``big``: two 1 MiB random layers (big enough for chunked uploads, still fast)."""
    return images.build_standard_layout(workdir / "src-layout", big_layer_sizes=(1 << 20, 1 << 20))


def api(m: MirrorProcess, method: str, path: str, *, headers: dict[str, str] | None = None,
        data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request to the registry (no proxies); (status, lower-case headers, body)."""
    return http_request(f"{m.url}{path}", method=method, headers=headers, data=data, timeout=30)


def error_of(body: bytes) -> tuple[str, str]:
    """(code, message) of the first error in a registry error body."""
    err = json.loads(body)["errors"][0]
    return err["code"], err.get("message", "")


def served_digest(m: MirrorProcess, repo: str, tag: str) -> str:
    """The digest the registry serves for ``repo:tag`` (sha256 of the GET body, full Accept list),
    checked against its ``Docker-Content-Digest``."""
    resp = RegistryClient(m.url).get_manifest(repo, tag)
    assert resp.status == 200, (repo, tag, resp.status, resp.body[:300])
    digest = images.sha256_digest(resp.body)
    assert resp.digest == digest
    return digest


def assert_same_layout_content(src: Path, src_ref: str, dst: Path, dst_ref: str) -> None:
    """Both layouts name the same digest and hold the same blobs, byte for byte."""
    assert images.layout_ref_digest(dst, dst_ref) == images.layout_ref_digest(src, src_ref)
    mine, theirs = images.layout_closure(src, src_ref), images.layout_closure(dst, dst_ref)
    assert sorted(theirs) == sorted(mine)
    for digest, path in mine.items():
        assert filecmp.cmp(path, theirs[digest], shallow=False), digest


def start_push(m: MirrorProcess, repo: str) -> tuple[int, str, str]:
    """``POST /v2/<repo>/blobs/uploads/``: (status, error code, error message); code '' on success."""
    status, _, body = api(m, "POST", f"/v2/{repo}/blobs/uploads/")
    if 200 <= status < 300:
        return status, "", ""
    return (status, *error_of(body))


# --------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------

@pytest.mark.clients
@pytest.mark.parametrize(
    ("ref", "all_platforms"),
    [("latest", False), ("multi", True), ("big", False)],
    ids=["single-platform", "multi-platform-all", "two-1MiB-layers"],
)
def test_skopeo_push_and_pull_round_trip_is_byte_identical(ref, all_platforms, private_registry, layout, workdir):
    """skopeo pushes an OCI layout reference into the registry and copies it back out into a
    fresh OCI layout: the tag's digest, every manifest and every blob are byte-identical, and
    the registry serves the layout's own digest for the tag and by digest."""
    m = private_registry
    repo, tag = f"mirrortest/skopeo-{ref}", "v1"
    want = images.layout_ref_digest(layout.path, ref)

    pushed = images.push_layout(layout.path, ref, m.host_port, repo, tag, all_platforms=all_platforms)
    assert pushed == want
    assert served_digest(m, repo, tag) == want

    out = workdir / "pulled"
    pulled = images.pull_to_layout(m.host_port, repo, tag, out, "copy", all_platforms=all_platforms)
    assert pulled == want
    assert_same_layout_content(layout.path, ref, out, "copy")

    # by digest too, into another layout
    out2 = workdir / "pulled-by-digest"
    assert images.pull_to_layout(m.host_port, repo, want, out2, "copy", all_platforms=all_platforms) == want
    assert_same_layout_content(layout.path, ref, out2, "copy")

    status, _, body = api(m, "GET", f"/v2/{repo}/tags/list")
    assert status == 200 and json.loads(body) == {"name": repo, "tags": [tag]}


# --------------------------------------------------------------------------
# docker
# --------------------------------------------------------------------------

@pytest.mark.clients
def test_docker_push_and_pull_round_trip(private_registry, layout, workdir):
    """A private dockerd pulls a seeded image from the registry, pushes it under a new name,
    forgets it, and pulls it back: the RepoDigest is the digest the registry serves for the tag,
    and the image (config digest = image ID) is the one that was pushed."""
    _need("docker")
    m = private_registry
    seed_digest = images.push(layout.path, "latest", m.host_port, "mirrortest/seed", "1", fmt="v2s2")
    seed_ref = f"{m.host_port}/mirrortest/seed:1"
    target = f"{m.host_port}/mirrortest/pushed:1"

    with private_docker(workdir, m.host_port) as docker:
        docker.docker("pull", "-q", seed_ref, timeout=120)
        assert docker_repo_digest(docker, seed_ref) == seed_digest
        image_id = docker.docker("image", "inspect", "--format", "{{.Id}}", seed_ref).strip()

        docker.docker("tag", seed_ref, target)
        pushed = docker_push(docker, target)
        served = served_digest(m, "mirrortest/pushed", "1")
        assert pushed == served
        # docker knew the layer was already in mirrortest/seed: it asked for a cross-repo mount
        mount = r'"POST /v2/mirrortest/pushed/blobs/uploads/\?from=mirrortest%2Fseed&mount=sha256%3A[0-9a-f]{64} HTTP/1.1" 201'
        assert re.search(mount, m.log_text()), "no successful cross-repository mount in the log"

        docker.docker("image", "rm", seed_ref, target)
        assert docker.docker("image", "ls", "-q").split() == []

        docker.docker("pull", "-q", target, timeout=120)
        assert docker_repo_digest(docker, target) == served
        assert docker.docker("image", "inspect", "--format", "{{.Id}}", target).strip() == image_id

    # every blob of the pushed manifest is downloadable and intact (docker may have recompressed)
    client = RegistryClient(m.url)
    manifest = json.loads(client.get_manifest("mirrortest/pushed", "1").body)
    for d in [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]:
        blob = client.get_blob("mirrortest/pushed", d)
        assert blob.status == 200 and images.sha256_digest(blob.body) == d


# --------------------------------------------------------------------------
# podman
# --------------------------------------------------------------------------

@pytest.mark.clients
def test_podman_push_and_pull_round_trip(private_registry, layout):
    """podman loads an image from an OCI layout, pushes it to the registry (``--tls-verify=false``),
    removes every local image and pulls it back: the pushed digest, the digest the registry
    serves for the tag and the pulled image's digest agree, and the image ID is unchanged."""
    _need("podman")
    m = private_registry
    target = f"{m.host_port}/mirrortest/podman:1"
    with PodmanSession(m.host_port.rsplit(":", 1)[0]) as podman:
        image_id = podman.pull_layout(layout.path, "latest")
        podman.podman("tag", image_id, target, timeout=30)
        pushed = podman.push(target)
        served = served_digest(m, "mirrortest/podman", "1")
        assert pushed == served

        podman.podman("rmi", "--all", "--force", timeout=60)
        assert podman.image_ids() == []

        assert podman.pull(target) == served
        assert podman.image_ids() == [image_id]


# --------------------------------------------------------------------------
# hosted next to an upstream
# --------------------------------------------------------------------------

def test_mixed_hosted_and_mirrored_names(seeded_upstream, start_mirror, layout, workdir):
    """``hosted: ["myorg/*"]`` plus a docker.io upstream: ``myorg/app`` takes pushes and pulls
    back, a push to ``library/hello`` (a mirrored name) is refused with DENIED naming the hosted
    rule, and ``library/hello`` is still mirrored from the upstream."""
    registry, seeded = seeded_upstream
    m = start_mirror([{"registry": "docker.io", "url": registry.url}], hosted=["myorg/*"])

    # a hosted name takes a push and gives it back unchanged
    want = images.layout_ref_digest(layout.path, "latest")
    assert images.push_layout(layout.path, "latest", m.host_port, "myorg/app", "1") == want
    assert images.pull_to_layout(m.host_port, "myorg/app", "1", workdir / "app", "app") == want
    assert_same_layout_content(layout.path, "latest", workdir / "app", "app")

    # a mirrored name refuses pushes, with the rule in the message
    for name in ("library/hello", "docker.io/library/hello", "other/app"):
        status, code, message = start_push(m, name)
        assert (status, code) == (403, "DENIED"), (name, status, code, message)
        assert "myorg/*" in message, message
    status, _, body = api(m, "PUT", "/v2/library/hello/manifests/pushed",
                          headers={"Content-Type": images.MT_OCI_MANIFEST},
                          data=(layout.path / "blobs" / "sha256" / want[7:]).read_bytes())
    assert status == 403 and error_of(body)[0] == "DENIED"
    refused = images.skopeo_copy_refs(f"oci:{layout.path}:latest", f"docker://{m.host_port}/library/hello:pushed",
                                      extra=["--preserve-digests"], check=False)
    assert not refused.ok and "denied" in refused.output.lower(), refused.output
    status, _, _ = api(m, "DELETE", f"/v2/library/hello/manifests/{seeded['latest'].digest}")
    assert status == 403

    # ...and still mirrors: the upstream's image, unchanged upstream
    image = seeded["latest"]
    assert skopeo_copy(f"{m.host_port}/{image.repo}:{image.tag}") == image.digest
    assert "pushed" not in registry.client().tags(image.repo)
    status, _, body = api(m, "GET", "/v2/_catalog")
    repos = json.loads(body)["repositories"]
    assert "myorg/app" in repos and f"docker.io/{image.repo}" in repos


# --------------------------------------------------------------------------
# read_only and SIGHUP
# --------------------------------------------------------------------------

RELOADED = "config reloaded"
REFUSED = "config reload refused"


def reload(m: MirrorProcess, text: str) -> str:
    """Write ``text`` as the config file, SIGHUP the twistd process, and wait for its verdict in
    the log; returns ``RELOADED`` or ``REFUSED``."""
    assert m.proc is not None
    before = {k: m.log_text().count(k) for k in (RELOADED, REFUSED)}
    m.config_path.write_text(text)
    os.kill(m.proc.pid, signal.SIGHUP)
    verdict: list[str] = []

    def answered() -> bool:
        log = m.log_text()
        verdict[:] = [k for k in (RELOADED, REFUSED) if log.count(k) > before[k]]
        return bool(verdict)

    assert wait_until(answered, 10), f"no reload verdict in the log:\n{m.log_tail()}"
    assert m.proc.alive()
    return verdict[0]


def test_read_only_switched_by_sighup(private_registry, layout, workdir):
    """SIGHUP with ``read_only: true`` refuses pushes and deletes (405 UNSUPPORTED) while pulls
    go on; a broken config on SIGHUP is refused (logged) and the old config keeps running;
    ``read_only: false`` on SIGHUP takes pushes again."""
    m = private_registry
    config = yaml.safe_load(m.config_path.read_text())
    want = images.push_layout(layout.path, "latest", m.host_port, "mirrortest/ro", "1")

    def push_refused_as_read_only() -> None:
        status, code, message = start_push(m, "mirrortest/ro")
        assert (status, code) == (405, "UNSUPPORTED"), (status, code, message)
        status, _, body = api(m, "DELETE", f"/v2/mirrortest/ro/manifests/{want}")
        assert status == 405 and error_of(body)[0] == "UNSUPPORTED"
        res = images.skopeo_copy_refs(f"oci:{layout.path}:latest", f"docker://{m.host_port}/mirrortest/ro:2",
                                      extra=["--preserve-digests"], check=False)
        assert not res.ok, res.output

    def pulls_work(tag: str = "1") -> None:
        assert served_digest(m, "mirrortest/ro", tag) == want
        out = workdir / f"pull-{len(list(workdir.glob('pull-*')))}"
        assert images.pull_to_layout(m.host_port, "mirrortest/ro", tag, out, "x") == want

    # 1. read-only on
    assert reload(m, yaml.safe_dump({**config, "read_only": True})) == RELOADED
    assert "read_only=True" in m.log_text()
    push_refused_as_read_only()
    pulls_work()

    # 2. broken configs are refused; the running config (read-only) stays
    for broken in (yaml.safe_dump({**config, "read_only": "sometimes"}),
                   yaml.safe_dump({**config, "no_such_key": 1}),
                   "listen: [unclosed\n"):
        assert reload(m, broken) == REFUSED, broken
        status, _, body = api(m, "GET", "/v2/")
        assert status == 200
        push_refused_as_read_only()
        pulls_work()
    assert "keeping the running config" in m.log_text()

    # 3. read-only off again: pushes and deletes work
    assert reload(m, yaml.safe_dump({**config, "read_only": False})) == RELOADED
    assert images.push_layout(layout.path, "latest", m.host_port, "mirrortest/ro", "2") == want
    pulls_work("2")
    status, _, body = api(m, "GET", "/v2/mirrortest/ro/tags/list")
    assert json.loads(body) == {"name": "mirrortest/ro", "tags": ["1", "2"]}
    status, _, _ = api(m, "DELETE", f"/v2/mirrortest/ro/manifests/{want}")
    assert status == 202
