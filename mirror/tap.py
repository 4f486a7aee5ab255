"""The twistd application: ``twistd -n mirror --config conf/mirror.yaml``.

The only module that touches the outside world: it reads the config, takes the global
reactor, opens the store (:func:`mirror.storage.open_store`), builds the upstream
clients, the registry and the web site, and hands them down.  Everything below takes
what it needs as arguments.  With ``workers`` above 1 it hands over to the supervisor of
worker processes (:mod:`mirror.workers`), whose workers build what they serve with the
functions here.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from resource import RLIMIT_NOFILE, getrlimit
from types import FrameType
from typing import ClassVar, Protocol

import attrs

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorFromThreads,
    IReactorProcess,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger, LoggingFile
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from mirror import __version__
from mirror.config import ClusterConfig, ConfigError, LimitsConfig, MirrorConfig, UpstreamConfig, load_config
from mirror.metrics import Metrics
from mirror.registry.cluster import Cluster
from mirror.registry.registry import Registry
from mirror.storage import StoreLayoutError, default_spool, open_store
from mirror.storage.base import Store
from mirror.storage.fsleases import FsLeases
from mirror.upstream.client import Upstream
from mirror.upstream.redirects import RedirectAgent
from mirror.upstream.tls import upstream_agent
from mirror.web.auth import Authenticator
from mirror.web.health import HealthResource
from mirror.web.resource import RegistryResource
from mirror.web.site import DEFAULT_MAX_CONNECTIONS_CAP, METRICS_MAX_CONNECTIONS, LimitedSite, build_site, connection_budget

__all__ = [
    "Options",
    "Serving",
    "build_auth",
    "build_registry",
    "build_serving",
    "connection_limits",
    "machine_leases",
    "makeService",
    "open_configured_store",
    "parse_endpoints",
    "reload_config",
    "serving_services",
]

_log = Logger()


class Options(usage.Options):
    """Command-line options of the ``mirror`` twistd plugin."""

    optParameters: ClassVar[list[list[str]]] = [["config", "c", "conf/mirror.yaml", "Path to the YAML configuration file."]]


def _every(work: Callable[[], Awaitable[object]]) -> Callable[[], Deferred[object]]:
    """``work`` as a TimerService callable: a coroutine run as a Deferred (the timer
    waits for it before the next run).  A run that fails is logged and the next one runs
    as planned (a TimerService whose call fails stops for good)."""
    name = getattr(work, "__name__", type(work).__name__)

    async def run() -> object:
        try:
            return await work()
        except OSError as e:  # the store's disk or bucket, for now: the next run tries again
            _log.error("{work} failed (the next run tries again): {error}", work=name, error=str(e))
        except Exception:
            _log.failure("{work} failed (the next run tries again)", work=name)
        return None

    def tick() -> Deferred[object]:
        return Deferred.fromCoroutine(run())

    tick.__name__ = name  # what the timer runs, in logs and tests
    return tick


class _FlushAtStop(Service):
    """Flushes the access record once more when the service stops."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def stopService(self) -> Deferred[int]:  # twistd waits on the Deferred
        Service.stopService(self)
        return Deferred.fromCoroutine(self._registry.access.flush())


def open_configured_store(config: MirrorConfig, reactor: IReactorTime) -> Store:
    """The store ``config`` names.

    Raises:
        ConfigError: it cannot be opened (naming ``storage.root`` or ``storage.s3``).
    """
    try:
        return open_store(config.storage, deferToThread, reactor)
    except (OSError, StoreLayoutError) as e:
        raise ConfigError(f"{config.source}: {config.storage.where}: {getattr(e, 'strerror', None) or e}") from None


def machine_leases(config: MirrorConfig) -> FsLeases:
    """Leases that the processes of this machine share, and no other machine sees: files
    under the filesystem store's ``leases/``, or for an s3 store under the local spool
    directory (a lease in the bucket would send another node's processes to this
    machine's loopback).  Not the store's own ``leases``: a filesystem store has none, so
    that one process's GC runs as it always did (a GC run lease left by a killed
    ``mirror gc`` would hold off the next run for minutes)."""
    if config.storage.s3 is None:
        assert config.storage.root is not None
        return FsLeases(config.storage.root / "leases")
    return FsLeases((config.storage.spool or default_spool()) / "leases")


def build_registry(
    config: MirrorConfig,
    reactor: IReactorTime,
    pool: HTTPConnectionPool | None = None,
    *,
    resume_fills: bool = True,
    workers: ClusterConfig | None = None,
) -> Registry:
    """The registry for ``config`` on ``reactor`` (a real one).

    ``pool`` holds the upstream connections; the caller may pass one to close it later.
    Spool files a dead process left are removed before this returns (so before the
    service listens), except the fills it noted, which are resumed from their bytes on
    disk once the reactor runs; the fills of live processes sharing the store are kept
    (:mod:`mirror.storage.spool`).  ``resume_fills`` False (``mirror warm``, which exits
    when its own images are done) leaves the noted fills for the service to resume.
    ``workers`` makes this process one of a machine's worker processes
    (:mod:`mirror.workers`): they are a cluster of their own, on leases only this machine
    sees, in place of the config's ``cluster`` (which the config refuses with workers).

    Raises:
        ConfigError: the store cannot be opened (naming ``storage.root`` or ``storage.s3``).
    """
    store = open_configured_store(config, reactor)
    orphans = store.spool.take_orphans()  # fills a dead process left, to resume (locked: clean leaves them)
    cleaning = Deferred.fromCoroutine(store.spool.clean())  # (no waits in it: done on return)
    cleaning.addCallbacks(_report_cleaned, lambda f: _log.failure("could not clean the spool", f))
    if pool is None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 16
    agent = Agent(reactor, pool=pool)
    if workers is not None:
        cluster = Cluster(workers, machine_leases(config), HTTPClient(agent), reactor)
    else:
        cluster = Cluster(config.cluster, store.leases, HTTPClient(agent), reactor)

    def upstream(u: UpstreamConfig, metrics: Metrics) -> Upstream:
        try:
            own = upstream_agent(u, reactor, pool)  # its own TLS settings: its own agent
        except (OSError, ValueError) as e:  # the file changed since the config was read
            raise ConfigError(f"{config.source}: upstream {u.registry}: ca_file: {getattr(e, 'strerror', None) or e}") from None
        if not u.tls_verify:
            _log.warn(
                "upstream {registry} ({url}) has tls_verify: false: its TLS certificates and host names are NOT "
                "verified; anyone on the network path can impersonate it and read the credentials sent to it",
                registry=u.registry,
                url=u.url,
            )
        # blobs redirected to a CDN or a presigned URL: our RedirectAgent follows them
        return Upstream(u, HTTPClient(RedirectAgent(own if own is not None else agent)), reactor, metrics)

    registry = Registry(config, store, upstream, reactor, deferToThread, cluster)
    if not resume_fills:
        for orphan in orphans:
            orphan.release()
    elif orphans:
        _log.info("resuming {count} fills a previous run left unfinished", count=len(orphans))
        reactor.callLater(0, lambda: Deferred.fromCoroutine(registry.resume_fills(orphans)))
    return registry


def _report_cleaned(removed: int) -> None:
    if removed:
        _log.info("removed {count} unfinished spool files from a previous run", count=removed)


def build_auth(
    config: MirrorConfig, previous: Authenticator | None = None, token_key: bytes | None = None
) -> Authenticator | None:
    """The client authenticator for ``config`` (reads the htpasswd file), or None.  Without
    ``auth.key_file`` tokens are signed with a random key: on a reload ``previous``'s is
    kept (tokens stay valid), and worker processes pass ``token_key``, the one they all
    share (a token one worker issued is checked by whichever gets the next request)."""
    if config.auth is None:
        return None
    try:
        kept = previous.process_key if previous is not None else None
        return Authenticator(config.auth, process_key=kept or token_key)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config.source}: auth.htpasswd: {getattr(e, 'strerror', None) or e}") from None


def reload_config(
    registry: Registry,
    path: str,
    resource: RegistryResource | None = None,
    apply_limits: Callable[[LimitsConfig], None] | None = None,
    token_key: bytes | None = None,
) -> bool:
    """Re-read the config file and apply it; a bad file is refused and the old config kept.
    ``apply_limits`` takes the new ``limits`` (to the listeners' sites: for new connections);
    ``token_key`` is the workers' shared token key (:func:`build_auth`)."""
    try:
        new = load_config(path)
        auth = build_auth(new, resource.auth if resource is not None else None, token_key)
    except ConfigError as e:
        _log.error("config reload refused, keeping the running config: {error}", error="; ".join(e.problems))
        return False
    if resource is not None:
        resource.auth = auth
    if apply_limits is not None:
        apply_limits(new.limits)
    for key in registry.reconfigure(new):
        _log.warn("config reload: {key} changed; it takes effect only after a restart", key=key)
    _log.info("config reloaded from {path} (read_only={read_only})", path=path, read_only=new.read_only)
    return True


class _GcCounts(Protocol):
    def gc_run(self, freed: int, store_bytes: int, store_blobs: int) -> None: ...


class _PeriodicGc:
    """Runs ``mirror gc --json`` as a child process, never two at once.

    A child, not the service's own process: GC walks and parses the whole store, and in
    this process it would hold up the reactor (stalls of 60-90 ms per 100k blobs were
    measured when it ran in a thread); in its own process the reactor keeps answering.
    The store is safe for two processes (see :mod:`mirror.registry.gc`).

    Args:
        config: the running config (``gc.interval`` 0 after a reload: no more runs).
        flush: writes the access records of the processes serving, before each run.
        metrics: counts the runs.
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        config_path: str,
        config: Callable[[], MirrorConfig],
        flush: Callable[[], Awaitable[object]],
        metrics: _GcCounts,
    ) -> None:
        self._reactor = reactor
        self._config_path = config_path
        self._config = config
        self._flush = flush
        self._metrics = metrics
        self._running = False

    async def __call__(self) -> None:
        if self._running or not self._config().gc.interval:
            return
        self._running = True
        try:
            await self._flush()  # GC evicts by the access record: make it current
            result = await getProcessOutputAndValue(
                sys.executable,
                ["-m", "mirror.tools.cli", "gc", "--config", self._config_path, "--json"],
                env=os.environ,
                reactor=self._reactor,
            )
        except Exception:
            _log.failure("garbage collection could not run", Failure())
            return
        finally:
            self._running = False
        self._done(*result)

    def _done(self, out: bytes, err: bytes, code: int) -> None:
        try:
            numbers = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            _log.error("garbage collection failed (exit {code}): {err}", code=code, err=err.decode(errors="replace")[-2000:])
            return
        if "skipped" in numbers:
            _log.info("gc: skipped: {reason}", reason=numbers["skipped"], event_kind="gc")
            return
        self._metrics.gc_run(numbers["bytes_freed"], numbers["store_bytes"], numbers["store_blobs"])
        _log.info(
            "gc: {manifests_dropped} manifests dropped, {blobs_deleted} blobs deleted, {bytes_freed} bytes freed "
            "in {seconds} s; store now {store_bytes} bytes in {store_blobs} blobs",
            event_kind="gc",
            **numbers,
        )


class _ReloadOnHangup(Service):
    """SIGHUP runs ``reload`` (re-reads the config) on the reactor, dropping no connection."""

    def __init__(self, reactor: IReactorFromThreads, reload: Callable[[], object]) -> None:
        self._reactor = reactor
        self._reload = reload

    def startService(self) -> None:
        Service.startService(self)
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self._reload)


def _fail(problems: Sequence[str]) -> SystemExit:
    # One line per problem, each naming the file and key, then a clean exit: no traceback.
    # Once twistd has begun logging (the listeners open then), sys.stderr feeds the log:
    # the lines go to the log and to the real standard error.
    lines = [f"mirror: {problem}\n" for problem in problems]
    sys.stderr.writelines(lines)
    if isinstance(sys.stderr, LoggingFile) and sys.__stderr__ is not None:
        sys.__stderr__.writelines(lines)
        sys.__stderr__.flush()
    return SystemExit(2)


def connection_limits(limits: LimitsConfig, share: int = 1) -> LimitsConfig:
    """``limits`` with ``max_connections`` set: when the config leaves it out, as many as
    this process's open-file limit can hold (:func:`~mirror.web.site.connection_budget`,
    at most :data:`~mirror.web.site.DEFAULT_MAX_CONNECTIONS_CAP`).  A configured value
    above that is kept, with a warning.  ``share``: the number of worker processes
    serving the listeners, which each take their part of a configured value (rounded up)."""
    fd_limit = getrlimit(RLIMIT_NOFILE)[0]
    budget = connection_budget(fd_limit)
    if limits.max_connections is None:
        return attrs.evolve(limits, max_connections=min(budget, DEFAULT_MAX_CONNECTIONS_CAP))
    limit = math.ceil(limits.max_connections / share)
    limits = attrs.evolve(limits, max_connections=limit)
    if limit > budget:
        _log.warn(
            "limits.max_connections is {max_connections} but the open-file limit ({fd_limit}) holds about {budget} "
            "connections: raise it (ulimit -n, systemd LimitNOFILE=) or lower max_connections",
            max_connections=limit,
            fd_limit=fd_limit,
            budget=budget,
        )
    return limits


def _reason(error: BaseException) -> str:
    """Why an endpoint could not be built or opened, in a few words (no traceback)."""
    if isinstance(error, CannotListenError) and isinstance(error.socketError, BaseException):
        error = error.socketError
    if isinstance(error, OSError) and error.strerror:
        name = error.filename2 or error.filename
        return f"{error.strerror}: {os.fsdecode(name)}" if isinstance(name, str | bytes) else error.strerror
    if type(error).__module__.startswith("OpenSSL") and error.args and isinstance(error.args[0], list):
        # [(library, function, reason), ...]: a key or certificate OpenSSL could not use
        reasons = "; ".join(str(part[-1]) for part in error.args[0] if isinstance(part, tuple) and part)
        return f"not a usable key or certificate ({reasons or 'OpenSSL error'})"
    return str(error) or type(error).__name__


class _Listener(StreamServerEndpointService):
    """One ``listen`` or ``metrics.listen`` endpoint, opened in privilegedStartService:
    before the reactor runs (and before twistd drops privileges).

    An endpoint that cannot be opened ends the process with exit code 2 and one line
    naming the endpoint and its config key, rather than a logged traceback and a
    service listening on nothing.  The endpoints Twisted ships (tcp, ssl, unix, systemd)
    open at once; one that opens later (a plugin's) and fails stops the reactor, and
    the process exits 2 once it has shut down.
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, description: str, key: str, reactor: IReactorCore
    ) -> None:
        StreamServerEndpointService.__init__(self, endpoint, factory)
        self.description = description
        self.key = key
        self._reactor = reactor
        self._opening = False
        self._failed: str | None = None
        self.port: IListeningPort | None = None  # once open

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._opening = True
        listening: Deferred[IListeningPort | None] = self.endpoint.listen(self.factory)
        listening.addCallbacks(self._opened, self._cannot_listen)
        self._waitingForPort = listening  # stopService cancels or closes it
        self._opening = False
        if self._failed is not None:
            raise _fail([self._failed])

    def _opened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def _cannot_listen(self, failure: Failure) -> None:
        if failure.check(CancelledError):  # stopped before a late endpoint opened
            return
        assert failure.value is not None
        message = f"cannot listen on {self.description} ({self.key}): {_reason(failure.value)}"
        if self._opening:
            self._failed = message  # raised by privilegedStartService, outside this Deferred
            return
        _fail([message])
        self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 2)
        self._reactor.stop()


def parse_endpoints(
    descriptions: tuple[str, ...], key: str, reactor: IReactorCore
) -> list[tuple[IStreamServerEndpoint, str, str]]:
    """(endpoint, its string, its config key) per endpoint string of the config key
    ``key``; one that cannot be parsed (an unknown type, a missing key file) stops
    start-up with one line."""
    result = []
    for i, description in enumerate(descriptions):
        where = key if len(descriptions) == 1 else f"{key}[{i}]"
        try:
            endpoint = endpoints.serverFromString(reactor, description)
        except Exception as e:  # any endpoint parser's complaint: ValueError, OSError, OpenSSL's errors...
            raise _fail([f"cannot listen on {description} ({where}): {_reason(e)}"]) from None
        result.append((endpoint, description, where))
    return result


def _listeners(descriptions: tuple[str, ...], key: str, factory: IProtocolFactory, reactor: IReactorCore) -> list[_Listener]:
    """A :class:`_Listener` serving ``factory`` per endpoint string of the config key ``key``."""
    return [_Listener(endpoint, factory, d, where, reactor) for endpoint, d, where in parse_endpoints(descriptions, key, reactor)]


@attrs.define
class Serving:
    """What serves the registry in one process: its site (for the ``listen`` endpoints),
    the health site (``/healthz``, ``/readyz``, ``/metrics``), and applying new limits."""

    registry: Registry
    site: LimitedSite
    health: LimitedSite
    share: int = 1  # worker processes serving the listeners (each takes its part of the limits)
    token_key: bytes | None = None  # the client-token key the workers share (build_auth), kept on reloads

    @property
    def resource(self) -> RegistryResource:
        resource = self.site.resource
        assert isinstance(resource, RegistryResource)
        return resource

    def apply_limits(self, limits: LimitsConfig) -> None:
        """New ``limits`` for connections made from now on (at start, and on a reload)."""
        limits = connection_limits(limits, self.share)
        self.site.configure(limits)
        self.health.configure(attrs.evolve(limits, max_connections=METRICS_MAX_CONNECTIONS))

    def reload(self, path: str) -> bool:
        """Re-read the config at ``path`` and apply it (SIGHUP)."""
        return reload_config(self.registry, path, self.resource, self.apply_limits, self.token_key)


def build_serving(
    config: MirrorConfig, auth: Authenticator | None, registry: Registry, share: int = 1, token_key: bytes | None = None
) -> Serving:
    """The sites serving ``registry``, with ``config``'s limits applied."""
    site = build_site(registry, auth, deferToThread)
    health = LimitedSite(HealthResource(registry.metrics, registry.store.spool.check_writable), config.limits)
    serving = Serving(registry, site, health, share, token_key)
    serving.apply_limits(config.limits)
    return serving


def serving_services(
    serving: Serving, config: MirrorConfig, config_path: str, reactor: IReactorFromThreads, *, expire_uploads: bool = True
) -> list[IService]:
    """The services of a process serving the registry, apart from its listeners: writing
    the access record (periodically and at stop), expiring abandoned uploads (unless
    ``expire_uploads`` is False: another process sharing the store does it), and
    re-reading the config on SIGHUP."""
    registry = serving.registry
    services: list[IService] = [TimerService(config.storage.access_flush_interval, _every(registry.access.flush))]
    if expire_uploads:
        services.append(TimerService(min(600.0, config.upload_expiry / 4), _every(registry.expire_uploads)))
    services.append(_FlushAtStop(registry))
    services.append(_ReloadOnHangup(reactor, lambda: serving.reload(config_path)))
    return services


def makeService(options: Options) -> IService:
    """Build the service tree twistd runs: with ``workers`` above 1, a supervisor of worker
    processes (:mod:`mirror.workers`), else the service itself."""
    from twisted.internet import reactor

    try:
        config = load_config(options["config"])
        if config.workers > 1:
            from mirror.workers.supervisor import build_supervisor

            return build_supervisor(config, options["config"], reactor, options.parent)
        auth = build_auth(config)
        registry = build_registry(config, reactor)
    except ConfigError as e:
        raise _fail(e.problems) from None
    serving = build_serving(config, auth, registry)
    _log.info(
        "mirror {version}: store {store}; upstreams: {upstreams}; hosted: {hosted}; listening on {listen} "
        "(at most {connections} connections)",
        version=__version__,
        store=registry.store.description,
        upstreams=describe_upstreams(config),
        hosted=", ".join(config.hosted) or "none",
        listen=", ".join(config.listen),
        connections=serving.site.limits.max_connections,
    )
    top = MultiService()
    for listener in _listeners(config.listen, "listen", serving.site, reactor):
        top.addService(listener)
    for service in serving_services(serving, config, options["config"], IReactorFromThreads(reactor)):
        service.setServiceParent(top)
    for listener in _listeners(config.metrics_listen, "metrics.listen", serving.health, reactor):
        top.addService(listener)
    if config.gc.interval:
        gc = _PeriodicGc(reactor, options["config"], lambda: registry.config, registry.access.flush, registry.metrics)
        TimerService(config.gc.interval, _every(gc)).setServiceParent(top)
    return top


def describe_upstreams(config: MirrorConfig) -> str:
    """The configured upstreams for the start-up line."""
    parts = [f"{u.registry} ({'offline' if u.offline or config.offline else u.url})" for u in config.upstreams]
    return ", ".join(parts) or "none"
