"""Shared fixtures: an in-process mirror on the real reactor, in front of a fake upstream."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from twisted.internet.threads import deferToThread

from mirror.config import MirrorConfig, StorageConfig, UpstreamConfig
from mirror.hosted import HostedRegistry
from mirror.service import MirrorService
from mirror.site import build_site
from mirror.tap import build_auth, build_service
from tests.fake_upstream import FakeRegistry


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

    service: MirrorService
    url: str
    root: Path
    port: object
    pool: HTTPConnectionPool
    hosted: HostedRegistry

    async def settled(self) -> None:
        """Wait until every fill is committed: a client gets its last byte once the digest
        verified, before the blob is fsynced and renamed into the store."""
        from twisted.internet.task import deferLater

        for _ in range(1000):
            if not self.service.fills_in_flight:
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("fills still in flight after 10 s")

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
        **upstream_kw,
    ) -> RunningMirror:
        """``url`` None: no upstream (with ``hosted=("*",)``, a pure private registry)."""
        root = tmp_path / f"store{len(started)}"
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
        service = build_service(config, reactor, pool)
        hosted_registry = HostedRegistry(service, deferToThread)
        port = reactor.listenTCP(0, build_site(service, hosted_registry, build_auth(config)), interface="127.0.0.1")
        m = RunningMirror(service, f"http://127.0.0.1:{port.getHost().port}", root, port, pool, hosted_registry)
        started.append(m)
        return m

    yield make
    for m in started:
        pytest_twisted.blockon(m.port.stopListening())
        pytest_twisted.blockon(m.pool.closeCachedConnections())
