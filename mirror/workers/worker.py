"""One worker process: ``python -m mirror.workers.worker --config FILE --index I ...``.

The supervisor (:mod:`.supervisor`) starts it with its end of a socket pair as
descriptor 3 and the workers' cluster secret in the environment.  It reads the config
itself, builds the registry and site exactly as a single process does
(:func:`mirror.tap.build_registry`, :func:`~mirror.tap.build_serving`,
:func:`~mirror.tap.serving_services`: access record, SIGHUP reload; upload expiry in
worker 0 only, since one process sweeping the store's uploads is enough), listens on
127.0.0.1 on a port of its own for ``/_cluster/fills/...`` (other workers following its
fills), ``/metrics``, ``/healthz`` and ``/readyz``, then tells the supervisor it is ready
and serves the connections it is handed.  It never opens the ``listen`` endpoints itself.

It exits on SIGTERM (writing its access record first, as a single process does), and
when its supervisor is gone: the socket pair reads end-of-stream, and the kernel sends it
SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``).  SIGINT is left to the
supervisor (a Ctrl-C in a terminal reaches every process of the group): it stops the
workers in order.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import hmac
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, cast

import attrs

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory, IReactorSocket
from twisted.logger import Logger, globalLogBeginner
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from mirror.config import ClusterConfig, ConfigError, MirrorConfig, load_config
from mirror.tap import Serving, build_auth, build_registry, build_serving, serving_services
from mirror.web.health import HealthResource
from mirror.web.site import LimitedSite
from mirror.workers.endpoints import split_tls, worker_factory
from mirror.workers.handoff import SECRET_ENV, WorkerEnd, adopt_connection, open_worker_end
from mirror.workers.logs import worker_observer

__all__ = ["main"]

#: Connections the internal listener takes: other workers following fills, and scrapes.
INTERNAL_MAX_CONNECTIONS = 256
#: prctl(2): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1

_log = Logger()


class _Started(Service):
    """Starts a factory that no port of this process starts: the site serving handed
    connections (its access log and its log's clock start with it)."""

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory

    def startService(self) -> None:
        Service.startService(self)
        self._factory.doStart()

    def stopService(self) -> None:
        Service.stopService(self)
        self._factory.doStop()


class _Internal(Resource):
    """The internal listener's resource: ``/_cluster/...`` is the registry's (the follow
    endpoint, which checks the cluster's signature), the rest the health resource's."""

    isLeaf = True

    def __init__(self, registry: IResource, health: IResource) -> None:
        Resource.__init__(self)
        self._registry = registry
        self._health = health

    def render(self, request: Request) -> Any:
        target = self._registry if (request.path or b"").startswith(b"/_cluster/") else self._health
        return target.render(request)


def listener_factories(listen: Sequence[str], site: IProtocolFactory, reactor: Any) -> list[IProtocolFactory]:
    """The factory serving the connections of each ``listen`` endpoint, in order: the
    site, wrapped in TLS for an ``ssl:`` endpoint (only those are parsed here: the
    supervisor opened them all, and one such as ``systemd:`` means something only there)."""
    factories = []
    for description in listen:
        tls = None
        if description.split(":", 1)[0].strip().lower() == "ssl":
            _, tls = split_tls(serverFromString(reactor, description), reactor)
        factories.append(worker_factory(site, tls))
    return factories


@attrs.define
class Worker:
    """A running worker: what it serves, and its end of the socket pair."""

    index: int
    serving: Serving
    factories: list[IProtocolFactory]
    port: int
    services: MultiService
    reactor: Any
    end: WorkerEnd | None = None

    def adopt(self, listener: int, fd: int) -> None:
        if not 0 <= listener < len(self.factories):
            os.close(fd)
            _log.warn("a connection for listener {listener}, which this worker does not have", listener=listener)
            return
        adopt_connection(self.reactor, fd, self.factories[listener])

    def supervisor_gone(self) -> None:
        if self.reactor.running:
            _log.info("the supervisor is gone: stopping")
            self.reactor.stop()


def shared_token_key(secret: str) -> bytes:
    """The key the workers sign client tokens with when ``auth.key_file`` names none: the
    same in every worker (derived from their shared secret, for this use only), new at
    each start of the supervisor, as a single process's random key is."""
    return hmac.new(secret.encode(), b"mirror client tokens", hashlib.sha256).digest()


def build_worker(config: MirrorConfig, config_path: str, index: int, secret: str, reactor: Any) -> Worker:
    """Everything a worker serves, listening on its internal port (not yet started).

    Raises:
        ConfigError: as a single process's start-up would (auth file, store).
    """
    token_key = shared_token_key(secret)
    auth = build_auth(config, token_key=token_key)
    internal = LimitedSite(Resource(), attrs.evolve(config.limits, max_connections=INTERNAL_MAX_CONNECTIONS))
    port = reactor.listenTCP(0, internal, interface="127.0.0.1").getHost().port
    workers = ClusterConfig(advertise=f"http://127.0.0.1:{port}", secret=secret)
    registry = build_registry(config, reactor, workers=workers)
    serving = build_serving(config, auth, registry, share=config.workers, token_key=token_key)
    internal.resource = _Internal(serving.resource, HealthResource(registry.metrics, registry.store.spool.check_writable))
    services = MultiService()
    services.addService(_Started(serving.site))
    for service in serving_services(serving, config, config_path, reactor, expire_uploads=index == 0):
        service.setServiceParent(services)
    return Worker(index, serving, listener_factories(config.listen, serving.site, reactor), port, services, reactor)


def _die_with_parent(supervisor: int) -> None:
    """Have the kernel send SIGTERM when the supervisor dies (Linux); exit now if it has
    died already."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the socket pair's end still stops it
        pass
    if os.getppid() != supervisor:
        sys.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker until it is stopped; its exit status."""
    parser = argparse.ArgumentParser(prog="python -m mirror.workers.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--supervisor", type=int, required=True, help="the supervisor's PID")
    parser.add_argument("--inherit-log", action="store_true", help="standard output is the supervisor's log")
    args = parser.parse_args(argv)
    # A SIGHUP before the reload service is up (a reload just after a start or a restart)
    # must not end the worker as the default action would: it reads the config anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    secret = os.environ.pop(SECRET_ENV, "")
    _die_with_parent(args.supervisor)
    from twisted.internet import reactor

    observer = worker_observer(args.index, args.inherit_log, clock=reactor)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        return _serve(args, secret, reactor)
    finally:
        flush = getattr(observer, "flush", None)
        if flush is not None:
            flush()  # (the last lines)


def _serve(args: argparse.Namespace, secret: str, reactor: Any) -> int:

    try:
        if len(secret) < 16:
            raise ConfigError(f"worker {args.index}: no secret in ${SECRET_ENV}: start workers with workers: N in the config")
        worker = build_worker(load_config(args.config), args.config, args.index, secret, reactor)
    except ConfigError as e:
        for problem in e.problems:
            print(f"mirror: {problem}", file=sys.stderr, flush=True)
        return 2
    end = WorkerEnd(worker.adopt, worker.serving.registry.access.flush, worker.supervisor_gone)
    worker.end = end

    def start() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (the supervisor stops the workers)
        worker.services.startService()
        open_worker_end(cast(IReactorSocket, reactor), end)
        end.ready(worker.port)
        _log.info(
            "worker {index} (pid {pid}) serving; internal listener 127.0.0.1:{port}",
            index=args.index,
            pid=os.getpid(),
            port=worker.port,
        )

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", worker.services.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
