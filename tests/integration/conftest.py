"""Fixtures for the integration tests.

* A real upstream (CNCF Distribution), seeded with skopeo, and the real ``twistd mirror``
  in front of it; everything listens on 127.0.0.1 and is stopped by PID at teardown,
  also when a test fails.
* A real S3 server (SeaweedFS, ``seaweed``) for the object-storage backend.
* The mirror in-process on the real reactor (``make_mirror``), in front of a fake
  upstream (``fake_upstream``) that misbehaves on purpose, both on 127.0.0.1.
* A fault-injecting proxy process (``fault_proxy``) in front of a real upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted

import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from mirror.config import MirrorConfig, StorageConfig, UpstreamConfig
from mirror.registry.registry import Registry
from mirror.tap import build_auth, build_registry
from mirror.web.site import build_site
from tests.fake_upstream import FakeRegistry
from tests.integration import images
from tests.integration.faultproxy import KINDS, FaultProxy
from tests.integration.mirror_proc import MirrorProcess
from tests.integration.proc_util import WorkDir
from tests.integration.seaweed import SeaweedS3
from tests.integration.seaweed import skip_reason as seaweed_skip_reason
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


@pytest.fixture(scope="session")
def seaweed():
    """A real S3 server (SeaweedFS) for the session; tests use fresh key prefixes in it."""
    reason = seaweed_skip_reason()
    if reason:
        pytest.skip(reason)
    with WorkDir("mirror-s3.") as w:
        server = SeaweedS3(Path(w))
        server.start()
        try:
            yield server
        finally:
            server.stop()


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
def fault_proxy(workdir):
    """Start fault proxies (tests/integration/faultproxy.py), each its own process;
    ``fault_proxy(upstream_url, rate=0.1, seed=1, kinds=[...])`` returns a started
    :class:`FaultProxy` (``.url``, ``.force()``, ``.log()``, ``.faults()``, ``.stop()``).
    All are stopped by PID at teardown."""
    started: list[FaultProxy] = []

    def start(upstream_url: str, *, rate: float = 0.0, seed: int = 0, kinds=KINDS, **kw) -> FaultProxy:
        d = workdir / f"faultproxy{len(started)}"
        d.mkdir()
        proxy = FaultProxy(upstream_url, d, rate=rate, seed=seed, kinds=kinds, **kw)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def mirror(seeded_upstream, mirror_for):
    """A mirror whose first upstream (docker.io) is the seeded Distribution."""
    registry, _ = seeded_upstream
    return mirror_for([{"registry": "docker.io", "url": registry.url, "tag_ttl": 300}])


@pytest.fixture
def fake_upstream():
    """A FakeRegistry listening on 127.0.0.1; ``.url`` is its base URL."""
    registry = FakeRegistry()
    port = reactor.listenTCP(0, Site(registry), interface="127.0.0.1")
    registry.url = f"http://127.0.0.1:{port.getHost().port}"
    yield registry
    registry.close_stalled()
    pytest_twisted.blockon(port.stopListening())


@attrs.define
class RunningMirror:
    """A mirror served in-process on 127.0.0.1."""

    registry: Registry
    url: str
    root: Path
    port: Any
    pool: HTTPConnectionPool

    @property
    def store(self):
        return self.registry.store

    async def settled(self) -> None:
        """Wait until every fill is committed: a client gets its last byte once the digest
        verified, before the blob is fsynced and renamed into the store."""
        for _ in range(1000):
            if not self.registry.fills_in_flight:
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("fills still in flight after 10 s")

    def reconfigure(self, **changes) -> MirrorConfig:
        """Apply a changed config, as SIGHUP does; returns it."""
        config = attrs.evolve(self.registry.config, **changes)
        self.registry.reconfigure(config)
        return config

    def get(self, path: str, **kw):
        """A treq request against the mirror, on a fresh connection."""
        return treq.request(kw.pop("method", "GET"), self.url + path, persistent=False, **kw)


@pytest.fixture
def make_mirror(tmp_path):
    """Start a mirror in front of upstream URL(s); everything is stopped at teardown."""
    started: list[RunningMirror] = []

    def make(
        url: str | None,
        *,
        registry: str = "docker.io",
        extra=(),
        hosted=(),
        read_only=False,
        delete=True,
        auth=None,
        root: Path | None = None,
        **upstream_kw,
    ) -> RunningMirror:
        """``url`` None: no upstream (with ``hosted=("*",)``, a pure private registry)."""
        root = root or tmp_path / f"store{len(started)}"
        upstreams = (UpstreamConfig(registry=registry, url=url, **upstream_kw),) if url else ()
        config = MirrorConfig(
            listen=(),
            storage=StorageConfig(root=root),
            upstreams=(*upstreams, *extra),
            hosted=tuple(hosted),
            read_only=read_only,
            delete=delete,
            auth=auth,
        )
        pool = HTTPConnectionPool(reactor, persistent=True)
        reg = build_registry(config, reactor, pool)
        port = reactor.listenTCP(0, build_site(reg, build_auth(config), deferToThread), interface="127.0.0.1")
        m = RunningMirror(reg, f"http://127.0.0.1:{port.getHost().port}", root, port, pool)
        started.append(m)
        return m

    yield make
    for m in started:
        pytest_twisted.blockon(m.port.stopListening())
        pytest_twisted.blockon(m.pool.closeCachedConnections())
