"""The supervisor: what ``twistd mirror`` runs when the config says ``workers: N`` (N > 1).

It opens every ``listen`` endpoint itself, before twistd drops privileges and with the
single process's fail-fast behaviour (:class:`mirror.tap._Listener`), and hands each
connection to a worker (:mod:`.dispatch`).  The workers are the pool's
(:class:`~mirror.workers.pool.WorkerPool`: started, restarted, stopped before twistd
exits).

Besides: the periodic GC runs here (a child process, as with one process), after every
worker has written its access record; ``metrics.listen`` serves the supervisor's health
and every worker's metrics (:mod:`.health`); SIGHUP re-reads the config, refuses a bad one
as a single process does, and forwards SIGHUP to every worker, which each reload it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

import treq
from treq.client import HTTPClient
from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from mirror import __version__
from mirror.config import ConfigError, LimitsConfig, MirrorConfig, parse_config
from mirror.tap import (
    _every,
    _Listener,
    _listeners,
    _PeriodicGc,
    _ReloadOnHangup,
    build_auth,
    describe_upstreams,
    open_configured_store,
    parse_endpoints,
)
from mirror.web.site import METRICS_MAX_CONNECTIONS, LimitedSite
from mirror.workers.dispatch import HandoffFactory
from mirror.workers.endpoints import split_tls
from mirror.workers.health import SupervisorHealth
from mirror.workers.logs import logs_to_stdout
from mirror.workers.metrics import SupervisorMetrics
from mirror.workers.pool import WorkerPool, worker_argv, worker_env

__all__ = ["build_supervisor", "reload_supervisor"]

#: Seconds a worker has to answer a scrape or a readiness check.
ASK_TIMEOUT = 5.0

_log = Logger()


class _Fetcher:
    """Asks a worker's internal listener, with a timeout."""

    def __init__(self, reactor: Any) -> None:
        # (a connection per question: a restarted worker may listen on a port number a
        # connection kept from its predecessor still names)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self._http = HTTPClient(Agent(reactor, pool=pool))
        self._reactor = reactor

    async def __call__(self, port: int, path: str) -> tuple[int, bytes]:
        asking = Deferred.fromCoroutine(self._get(port, path))
        asking.addTimeout(ASK_TIMEOUT, self._reactor)
        return await asking

    async def _get(self, port: int, path: str) -> tuple[int, bytes]:
        response = await self._http.get(f"http://127.0.0.1:{port}{path}")
        body = await treq.content(response)
        return int(response.code), body


@attrs.define
class _Running:
    config: MirrorConfig


class ConfigCopy(Service):
    """The config text the supervisor validated, in a file of its own (in a private
    directory, removed at stop) that the workers and GC read: a worker restarted later, or
    a GC run, gets the config the supervisor runs, not the file as it is now (edited and not
    yet reloaded, or broken).  Rewritten, whole, on each accepted reload."""

    def __init__(self, original: str) -> None:
        _sweep_copies()
        self.directory = Path(tempfile.mkdtemp(prefix=f"{_COPY_PREFIX}{os.getpid()}-"))  # (mode 0700)
        self.path = self.directory / Path(original).name

    def write(self, text: str) -> None:
        staged = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(staged, self.path)

    def stopService(self) -> None:
        Service.stopService(self)
        shutil.rmtree(self.directory, ignore_errors=True)


_COPY_PREFIX = "mirror-workers-"


def _sweep_copies() -> None:
    """Remove the config copies of supervisors that died without stopping (SIGKILL): the
    directories of this user named for a process that no longer exists."""
    for entry in Path(tempfile.gettempdir()).glob(f"{_COPY_PREFIX}*-*"):
        pid = entry.name[len(_COPY_PREFIX) :].partition("-")[0]
        try:
            if not pid.isdigit() or entry.stat().st_uid != os.getuid() or Path(f"/proc/{pid}").exists():
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _read_config(path: str) -> tuple[str, MirrorConfig]:
    """The text of the config file at ``path`` and what it says (ConfigError if bad)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return text, parse_config(text, path)


def build_supervisor(config: MirrorConfig, config_path: str, reactor: Any, twistd_options: Mapping[str, Any] | None) -> IService:
    """The supervisor's service tree for ``config`` (``config.workers`` > 1).

    Raises:
        ConfigError: as a single process's start-up would (auth file, store).
    """
    path = os.path.abspath(config_path)
    text, config = _read_config(path)  # (what the workers get is what was checked)
    build_auth(config)  # (refuse an unreadable htpasswd now, not in every worker)
    copy = ConfigCopy(path)
    copy.write(text)
    store = open_configured_store(config, reactor)
    running = _Running(config)
    inherit = logs_to_stdout(twistd_options)
    metrics = SupervisorMetrics(config.workers, lambda: pool.ready_count)
    pool = WorkerPool(
        config.workers,
        reactor,
        worker_argv(str(copy.path), inherit),
        worker_env(secrets.token_hex(32)),
        metrics,
        inherit_logs=inherit,
    )
    top = MultiService()
    top.addService(copy)  # (first in: stopped last, once the workers are gone)
    top.addService(pool)
    for i, (endpoint, description, where) in enumerate(parse_endpoints(config.listen, "listen", reactor)):
        plain, _ = split_tls(endpoint, reactor)
        listener = _Listener(plain, HandoffFactory(pool.dispatcher, i), description, where, reactor)
        pool.listeners.append(listener)
        top.addService(listener)
    health = LimitedSite(SupervisorHealth(pool.internal_ports, metrics, _Fetcher(reactor)), _metrics_limits(config))
    for listener in _listeners(config.metrics_listen, "metrics.listen", health, reactor):
        top.addService(listener)
    if config.gc.interval:
        gc = _PeriodicGc(reactor, str(copy.path), lambda: running.config, pool.flush_all, metrics)
        TimerService(config.gc.interval, _every(gc)).setServiceParent(top)

    def reload() -> bool:
        return reload_supervisor(running, path, pool, health, copy)

    top.addService(_ReloadOnHangup(reactor, reload))
    _log.info(
        "mirror {version}: store {store}; upstreams: {upstreams}; hosted: {hosted}; listening on {listen} "
        "with {workers} worker processes",
        version=__version__,
        store=store.description,
        upstreams=describe_upstreams(config),
        hosted=", ".join(config.hosted) or "none",
        listen=", ".join(config.listen),
        workers=config.workers,
    )
    return top


def _metrics_limits(config: MirrorConfig) -> LimitsConfig:
    """The metrics listener's limits: the config's, with a connection budget of its own."""
    return attrs.evolve(config.limits, max_connections=METRICS_MAX_CONNECTIONS)


def reload_supervisor(running: _Running, path: str, pool: WorkerPool, health: LimitedSite, copy: ConfigCopy) -> bool:
    """SIGHUP: re-read the config; if it is good, take its limits for the metrics listener,
    give it to the workers (``copy``) and have every worker reload it (a bad one is refused,
    as a single process does, and the workers keep theirs)."""
    try:
        text, new = _read_config(path)
        build_auth(new)
    except ConfigError as e:
        _log.error("config reload refused, keeping the running config: {error}", error="; ".join(e.problems))
        return False
    old = running.config
    for key, name in (("workers", "workers"), ("metrics_listen", "metrics.listen")):
        if getattr(new, key) != getattr(old, key):
            _log.warn("config reload: {key} changed; it takes effect only after a restart", key=name)
    running.config = attrs.evolve(new, workers=old.workers, metrics_listen=old.metrics_listen)
    health.configure(_metrics_limits(new))
    copy.write(text)
    sent = pool.reload_all()
    _log.info("config reloaded from {path}; passed on to {sent} workers (and to any starting once ready)", path=path, sent=sent)
    return True
