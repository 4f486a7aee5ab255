"""The offline CI cache, end to end, with the real commands and real clients.

``mirror warm`` fills the store of a running ``twistd mirror`` from a real Distribution
registry (one upstream GET per blob, a second run fetches nothing); ``mirror export``
writes it as an OCI archive that skopeo reads; ``mirror import`` loads it into an empty
store; a mirror with ``offline: true`` whose upstream is a closed port then serves every
tag to skopeo (by tag and by digest) and to containerd and podman through their own
mirror settings.  A tampered archive is refused and leaves that store empty.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import images
from tests.integration.clients import ctr_pull, podman_pull, skip_reason, skopeo_copy, verify_dir_copy
from tests.integration.mirror_proc import MirrorProcess
from tests.integration.upstream_registry import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

#: key of the seeded image -> (what warm is told, whether the tag is an index)
IMAGES = {
    "latest": ("library/hello:latest", False),
    "oci": ("docker.io/library/hello:oci", False),
    "multi": ("hello:multi", True),
    "multi-docker": ("library/hello:multi-docker", True),
    "big": ("docker.io/library/big", False),
}


@pytest.fixture(autouse=True)
def _need_skopeo():
    reason = skip_reason("skopeo")
    if reason:
        pytest.skip(reason)


def mirror_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The ``mirror`` command, as users run it."""
    return subprocess.run([sys.executable, "-m", "mirror.tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def new_mirror(workdir: Path, name: str, upstreams: list[dict[str, object]], **extra: object) -> MirrorProcess:
    d = workdir / name
    d.mkdir()
    return MirrorProcess(d, upstreams, **extra)


def test_warm_export_import_and_serve_offline(seeded_upstream, workdir):
    """warm (while the service runs) -> export -> skopeo reads the archive -> import into an
    empty store -> an offline mirror serves every tag to skopeo, containerd and podman."""
    registry, seeded = seeded_upstream
    online = new_mirror(workdir, "online", [{"registry": "docker.io", "url": registry.url}]).start()
    try:
        listing = workdir / "images.txt"
        listing.write_text("# the CI's images\n" + "\n".join(text for text, _ in IMAGES.values()) + "\n")
        mark = registry.mark()
        warm = mirror_cli("warm", "--config", str(online.config_path), "-f", str(listing), "--platform", "all", "-j", "3")
        assert warm.returncode == 0, warm.stdout + warm.stderr
        every_blob = {b for image in seeded.values() for b in image.blobs}
        assert "summary: 5 images (5 ok, 0 failed)" in warm.stdout
        assert f"blobs: {len(every_blob)} fetched" in warm.stdout
        gets = [e.path for e in registry.requests("GET", "/blobs/", since=mark)]
        assert sorted(gets) == sorted(set(gets)) and {p.rsplit("/", 1)[1] for p in gets} == every_blob

        # the running service serves what warm fetched, from its cache
        mark = registry.mark()
        image = seeded["big"]
        assert skopeo_copy(f"{online.host_port}/{image.repo}:{image.tag}") == image.digest
        assert registry.requests("GET", "/blobs/", since=mark) == []

        again = mirror_cli("warm", "--config", str(online.config_path), "-f", str(listing), "--platform", "all")
        assert again.returncode == 0, again.stderr
        assert f"blobs: 0 fetched (0 B), {len(every_blob)} already cached" in again.stdout

        archive = workdir / "ci-cache.tar"
        export = mirror_cli("export", "--config", str(online.config_path), "--out", str(archive))
        assert export.returncode == 0, export.stderr
    finally:
        online.stop()

    # skopeo reads the archive by the full reference
    out = workdir / "from-archive"
    res = images.skopeo_copy_refs(f"oci-archive:{archive}:docker.io/library/hello:latest", f"dir:{out}")
    assert res.digest == seeded["latest"].digest
    verify_dir_copy(out, res.digest)
    res = images.skopeo_copy_refs(f"oci-archive:{archive}:docker.io/library/hello:multi", f"dir:{workdir / 'multi'}",
                                  extra=["--all"])
    assert res.digest == seeded["multi"].digest

    # a tampered copy is refused and leaves the offline store empty
    offline = new_mirror(workdir, "offline", [{"registry": "docker.io", "url": f"http://127.0.0.1:{free_port()}", "timeout": 2}],
                         offline=True)
    tampered = workdir / "tampered.tar"
    data = bytearray(archive.read_bytes())
    data[-20 * 1024] ^= 0x01  # inside the last blob (a multi-MiB random layer of library/big)
    tampered.write_bytes(bytes(data))
    refused = mirror_cli("import", str(tampered), "--config", str(offline.config_path))
    assert refused.returncode == 1 and "refused" in refused.stderr and "Traceback" not in refused.stderr
    assert not list((offline.root / "repositories").iterdir())

    loaded = mirror_cli("import", str(archive), "--config", str(offline.config_path))
    assert loaded.returncode == 0, loaded.stderr
    assert "imported 5 images" in loaded.stdout
    with offline:
        for key, (_, is_index) in IMAGES.items():
            image = seeded[key]
            assert skopeo_copy(f"{offline.host_port}/{image.repo}:{image.tag}", all_platforms=is_index) == image.digest
            assert skopeo_copy(f"{offline.host_port}/{image.repo}@{image.digest}", all_platforms=is_index) == image.digest
        # daemon clients, through their own mirror settings (names say docker.io)
        if not skip_reason("ctr"):
            for key in ("latest", "multi", "big"):
                image = seeded[key]
                assert ctr_pull(offline.host_port, f"docker.io/{image.repo}:{image.tag}") == image.digest
        if not skip_reason("podman"):
            image = seeded["multi-docker"]
            # podman reports the tag's digest (the list)
            assert podman_pull(offline.host_port, f"docker.io/{image.repo}:{image.tag}") == image.digest
        # nothing else is there, and the mirror says so without trying the upstream
        missing = subprocess.run(["curl", "-s", f"{offline.url}/v2/library/alpine/manifests/latest"], capture_output=True,
                                 text=True, timeout=30)
        assert "offline" in missing.stdout and "MANIFEST_UNKNOWN" in missing.stdout
