"""The twistd application: ``twistd -n mirror --config conf/mirror.yaml``.

The only module that touches the outside world: it reads the config, picks the global
reactor, builds the store, upstream clients, service and web site, and hands them
down.  Everything below takes what it needs as arguments.
"""

from __future__ import annotations

import sys

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool

from mirror.config import ConfigError, MirrorConfig, load_config
from mirror.fsstore import FilesystemStore
from mirror.service import MirrorService
from mirror.site import build_site
from mirror.upstream import Upstream

__all__ = ["Options", "build_service", "makeService"]

_log = Logger()


class Options(usage.Options):
    """Command-line options of the ``mirror`` twistd plugin."""

    optParameters = [["config", "c", "conf/mirror.yaml", "Path to the YAML configuration file."]]


class _AccessFlush(Service):
    """Flushes the access record once more when the service stops."""

    def __init__(self, service: MirrorService) -> None:
        self._service = service

    def stopService(self) -> None:
        super().stopService()
        self._service.access.flush()


def build_service(config: MirrorConfig, reactor: object, pool: HTTPConnectionPool | None = None) -> MirrorService:
    """The mirror service for ``config`` on ``reactor`` (a real one).

    ``pool`` holds the upstream connections; the caller may pass one to close it later.
    """
    store = FilesystemStore(config.storage.root)
    removed = store.clean_spool()
    if removed:
        _log.info("removed {count} unfinished spool files from a previous run", count=removed)
    if pool is None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 16
    http = HTTPClient(Agent(reactor, pool=pool))
    upstreams = [Upstream(u, http, reactor) for u in config.upstreams]  # type: ignore[arg-type]
    return MirrorService(config, store, upstreams, reactor, deferToThread)  # type: ignore[arg-type]


def makeService(options: Options) -> IService:
    """Build the service tree twistd runs."""
    from twisted.internet import reactor

    try:
        config = load_config(options["config"])
    except ConfigError as e:
        # One line naming the file and key, then a clean exit: no traceback.
        sys.stderr.write(f"mirror: {e}\n")
        raise SystemExit(2) from None
    service = build_service(config, reactor)
    site = build_site(service)
    top = MultiService()
    for description in config.listen:
        endpoint = endpoints.serverFromString(reactor, description)
        StreamServerEndpointService(endpoint, site).setServiceParent(top)
    TimerService(config.storage.access_flush_interval, service.access.flush).setServiceParent(top)
    _AccessFlush(service).setServiceParent(top)
    return top
