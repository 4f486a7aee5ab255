"""The twistd application: ``twistd -n mirror --config conf/mirror.yaml``.

The only module that touches the outside world: it reads the config, picks the global
reactor, builds the store, upstream clients, service and web site, and hands them
down.  Everything below takes what it needs as arguments.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from mirror.config import ConfigError, MirrorConfig, load_config
from mirror.fsstore import FilesystemStore
from mirror.auth import Authenticator
from mirror.hosted import HostedRegistry
from mirror.resource import RegistryResource
from mirror.metrics import HealthResource, ready
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


def build_service(
    config: MirrorConfig, reactor: object, pool: HTTPConnectionPool | None = None, *, clean_spool: bool = True
) -> MirrorService:
    """The mirror service for ``config`` on ``reactor`` (a real one).

    ``pool`` holds the upstream connections; the caller may pass one to close it later.
    ``clean_spool`` removes spool files a previous process left (idle for 10 minutes, so
    that a ``mirror warm`` sharing the store keeps its fills); ``mirror warm`` itself
    passes False.
    """
    store = FilesystemStore(config.storage.root)
    removed = store.clean_spool(idle_for=600) if clean_spool else 0
    if removed:
        _log.info("removed {count} unfinished spool files from a previous run", count=removed)
    if pool is None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 16
    http = HTTPClient(Agent(reactor, pool=pool))
    return MirrorService(
        config, store, lambda u: Upstream(u, http, reactor), reactor, deferToThread  # type: ignore[arg-type]
    )


def build_auth(config: MirrorConfig) -> Authenticator | None:
    """The client authenticator for ``config`` (reads the htpasswd file), or None."""
    if config.auth is None:
        return None
    try:
        return Authenticator(config.auth)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config.source}: auth.htpasswd: {getattr(e, 'strerror', None) or e}") from None


def reload_config(service: MirrorService, path: str, resource: RegistryResource | None = None) -> bool:
    """Re-read the config file and apply it; a bad file is refused and the old config kept."""
    try:
        new = load_config(path)
        auth = build_auth(new)
    except ConfigError as e:
        _log.error("config reload refused, keeping the running config: {error}", error=str(e))
        return False
    if resource is not None:
        resource.auth = auth
    for key in service.reconfigure(new):
        _log.warn("config reload: {key} changed; it takes effect only after a restart", key=key)
    _log.info("config reloaded from {path} (read_only={read_only})", path=path, read_only=new.read_only)
    return True


class _PeriodicGc:
    """Runs ``mirror gc --json`` as a child process, never two at once.

    A child, not a thread: GC walks and parses the whole store, and in a thread it would
    share the interpreter lock with the reactor (stalls of 60-90 ms per 100k blobs were
    measured); in its own process the reactor keeps answering.  The store is safe for
    two processes (see :mod:`mirror.gc`).
    """

    def __init__(self, reactor: object, service: MirrorService, config_path: str) -> None:
        self._reactor = reactor
        self._service = service
        self._config_path = config_path
        self._running = False

    def __call__(self) -> Deferred[None] | None:
        if self._running or not self._service.config.gc.interval:
            return None
        self._running = True
        self._service.access.flush()  # GC evicts by the access record: make it current
        d = getProcessOutputAndValue(
            sys.executable,
            ["-m", "mirror.cli", "gc", "--config", self._config_path, "--json"],
            env=os.environ,
            reactor=self._reactor,
        )
        return d.addBoth(self._done)

    def _done(self, result: object) -> None:
        self._running = False
        if isinstance(result, Failure):
            _log.failure("garbage collection could not run", result)
            return
        out, err, code = result  # type: ignore[misc]
        try:
            numbers = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            _log.error("garbage collection failed (exit {code}): {err}", code=code, err=err.decode(errors="replace")[-2000:])
            return
        self._service.metrics.gc_run(numbers["bytes_freed"], numbers["store_bytes"], numbers["store_blobs"])
        _log.info(
            "gc: {manifests_dropped} manifests dropped, {blobs_deleted} blobs deleted, {bytes_freed} bytes freed "
            "in {seconds} s; store now {store_bytes} bytes in {store_blobs} blobs",
            event_kind="gc",
            **numbers,
        )


class _ReloadOnHangup(Service):
    """SIGHUP re-reads the config without dropping connections."""

    def __init__(self, reactor: object, service: MirrorService, path: str, resource: RegistryResource) -> None:
        self._reactor = reactor
        self._service = service
        self._path = path
        self._resource = resource

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(reload_config, self._service, self._path, self._resource)  # type: ignore[attr-defined]


def makeService(options: Options) -> IService:
    """Build the service tree twistd runs."""
    from twisted.internet import reactor

    try:
        config = load_config(options["config"])
    except ConfigError as e:
        # One line naming the file and key, then a clean exit: no traceback.
        sys.stderr.write(f"mirror: {e}\n")
        raise SystemExit(2) from None
    try:
        auth = build_auth(config)
    except ConfigError as e:
        sys.stderr.write(f"mirror: {e}\n")
        raise SystemExit(2) from None
    service = build_service(config, reactor)
    hosted = HostedRegistry(service, deferToThread)
    site = build_site(service, hosted, auth)
    top = MultiService()
    for description in config.listen:
        endpoint = endpoints.serverFromString(reactor, description)
        StreamServerEndpointService(endpoint, site).setServiceParent(top)
    TimerService(config.storage.access_flush_interval, service.access.flush).setServiceParent(top)
    TimerService(min(600.0, config.upload_expiry / 4), hosted.expire_uploads).setServiceParent(top)
    if config.metrics_listen:
        health = Site(HealthResource(service.metrics, lambda: ready(service.config.storage.root)))
        for description in config.metrics_listen:
            StreamServerEndpointService(endpoints.serverFromString(reactor, description), health).setServiceParent(top)
    if config.gc.interval:
        gc_timer = TimerService(config.gc.interval, _PeriodicGc(reactor, service, options["config"]))
        gc_timer.setServiceParent(top)
    _AccessFlush(service).setServiceParent(top)
    _ReloadOnHangup(reactor, service, options["config"], site.resource).setServiceParent(top)
    return top
