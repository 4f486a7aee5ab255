"""The four real clients pull docker.io images through the mirror by their OWN mirror setting.

* skopeo and podman: a ``registries.conf`` mirror entry for docker.io;
* containerd: ``ctr images pull --hosts-dir`` with a ``hosts.toml`` mirror (sends ``?ns=``);
* dockerd: ``registry-mirrors`` in its daemon.json (resolves tags with HEAD).

The image is named ``docker.io/library/hello`` as users name it; the clients' fallback to
the real Docker Hub goes to a closed local port, so a pull only succeeds through the mirror.
"""

from __future__ import annotations

import pytest

from tests.integration.clients import ctr_pull, docker_pull, podman_pull, skip_reason, skopeo_copy

pytestmark = [pytest.mark.integration, pytest.mark.clients]


def _need(client: str) -> None:
    reason = skip_reason(client)
    if reason:
        pytest.skip(reason)


def pull_by(client: str, mirror, image: str, all_platforms: bool) -> str:
    if client == "skopeo":
        return skopeo_copy(image, registries_conf_mirror=mirror.host_port, all_platforms=all_platforms)
    if client == "podman":
        return podman_pull(mirror.host_port, image)
    if client == "containerd":
        return ctr_pull(mirror.host_port, image, all_platforms=all_platforms)
    return docker_pull(mirror.host_port, image)


@pytest.mark.parametrize("client", ["skopeo", "podman", "containerd", "docker"])
@pytest.mark.parametrize("key", ["latest", "multi"])
def test_client_pulls_docker_io_through_mirror(client, key, seeded_upstream, mirror):
    """Each client pulls docker.io/library/hello (schema2 and an OCI index) with the upstream's digest."""
    _need("ctr" if client == "containerd" else client)
    _, seeded = seeded_upstream
    image = seeded[key]
    # skopeo's single-platform copy of an index reports the instance; ask for the whole index
    all_platforms = client == "skopeo" and key == "multi"
    digest = pull_by(client, mirror, f"docker.io/{image.repo}:{image.tag}", all_platforms)
    assert digest == image.digest
    log = mirror.log_text()
    assert "upstream fetch" in log or "cache hit" in log
    if client == "containerd":
        assert "ns=docker.io" in log  # containerd's ns= reached the mirror and was routed


@pytest.mark.parametrize("client", ["skopeo", "containerd", "docker"])
def test_client_pulls_big_random_image(client, seeded_upstream, mirror):
    """A multi-layer image of multi-MiB random layers arrives intact through each daemon/client."""
    _need("ctr" if client == "containerd" else client)
    _, seeded = seeded_upstream
    image = seeded["big"]
    assert pull_by(client, mirror, f"docker.io/{image.repo}:{image.tag}", False) == image.digest
