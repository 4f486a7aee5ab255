"""Fixtures for the integration tests: a real upstream (CNCF Distribution), seeded with
skopeo, and the real ``twistd mirror`` in front of it.  Everything listens on 127.0.0.1
and is stopped by PID at teardown, also when a test fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration import images
from tests.integration.mirror_proc import MirrorProcess
from tests.integration.proc_util import WorkDir
from tests.integration.upstream_registry import DistributionRegistry, skip_reason

pytestmark = pytest.mark.integration


def _need_registry() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def seeded_upstream():
    """A Distribution registry holding the standard images; yields (registry, images)."""
    _need_registry()
    with WorkDir("mirror-upstream.") as w:
        registry = DistributionRegistry(w / "registry")
        registry.start()
        try:
            yield registry, images.seed_images(registry)
        finally:
            registry.close()


@pytest.fixture
def workdir():
    with WorkDir("mirror-it.") as w:
        yield Path(w)


@pytest.fixture
def mirror_for(workdir):
    """Start ``twistd mirror`` with the given upstream list; stopped at teardown."""
    started: list[MirrorProcess] = []

    def start(upstreams: list[dict[str, object]], name: str = "mirror") -> MirrorProcess:
        d = workdir / f"{name}{len(started)}"
        d.mkdir()
        m = MirrorProcess(d, upstreams)
        started.append(m)
        return m.start()

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def mirror(seeded_upstream, mirror_for):
    """A mirror whose first upstream (docker.io) is the seeded Distribution."""
    registry, _ = seeded_upstream
    return mirror_for([{"registry": "docker.io", "url": registry.url, "tag_ttl": 300}])
