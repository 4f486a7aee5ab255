"""The worker processes: started, restarted when they die, stopped with the supervisor.

:class:`WorkerPool` starts each worker (:mod:`.worker`) with its end of a socket pair as
descriptor 3 (:mod:`.handoff`) and a secret in its environment, tracks which workers are
ready (the dispatcher hands connections to those alone: :mod:`.dispatch`), restarts one
that dies (logged with its exit code or signal, counted in
``mirror_worker_restarts_total``, after a delay that grows while it keeps dying:
:mod:`.backoff`), asks every worker to write its access record before a GC run, passes
signals on, and on stop sends each SIGTERM and waits for it (SIGKILL after
:data:`STOP_TIMEOUT` seconds).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import mirror
from mirror.tap import _Listener
from mirror.workers.backoff import RestartDelay
from mirror.workers.dispatch import Dispatcher
from mirror.workers.handoff import CHANNEL_FD, SECRET_ENV, SupervisorEnd
from mirror.workers.logs import LineRelay
from mirror.workers.metrics import SupervisorMetrics

__all__ = ["FLUSH_TIMEOUT", "STOP_TIMEOUT", "WorkerPool", "worker_argv", "worker_env"]

#: Seconds a worker has to exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 10.0
#: Seconds the workers have to write their access records before a GC run.
FLUSH_TIMEOUT = 30.0

_log = Logger()


@attrs.define(eq=False)
class _Slot:
    """One worker: its process while it runs, and what the pool knows of it."""

    index: int
    delay: RestartDelay = attrs.Factory(RestartDelay)
    process: IProcessTransport | None = None
    end: SupervisorEnd | None = None
    port: int | None = None  # its internal listener's, once it said it is ready
    started: float = 0.0
    pid: int | None = None  # of its process, the last one started
    restart: IDelayedCall | None = None
    ended: Deferred[None] | None = None  # fires when the process has exited
    flushing: list[Deferred[None]] = attrs.Factory(list)
    reload_pending: bool = False  # a SIGHUP waits for it to be ready (it handles none before)

    @property
    def ready(self) -> bool:
        return self.port is not None and self.end is not None and self.end.open

    def hand(self, listener: int, connection: socket.socket) -> None:
        if self.end is None:
            raise BrokenPipeError("worker not running")
        self.end.hand(listener, connection)

    def not_serving(self) -> None:
        """The worker can take nothing more (its channel closed, or it exited)."""
        self.port = None
        if self.end is not None:
            self.end.close()
            self.end = None
        while self.flushing:  # (its access record is as written as it will be)
            self.flushing.pop().callback(None)


class _WorkerProcess(ProcessProtocol):
    def __init__(self, pool: WorkerPool, slot: _Slot, relay: LineRelay | None) -> None:
        self._pool = pool
        self._slot = slot
        self._relay = relay

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if self._relay is not None:
            self._relay.feed(data)

    def processEnded(self, reason: Failure) -> None:
        if self._relay is not None:
            self._relay.close()
        self._pool._ended(self._slot, reason)


def _describe_exit(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with code 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"was killed by signal {value.signal}"
        return f"exited with code {value.exitCode}"
    return f"ended: {reason.getErrorMessage()}"


class WorkerPool(Service):
    """The worker processes (see the module docstring).

    Args:
        count: how many.
        reactor: spawns them and runs their timers.
        argv: a worker's command line, by index (without the interpreter).
        env: their environment (with the secret).
        metrics: counts restarts.
        inherit_logs: workers write to the supervisor's standard output themselves
            (else their output is piped here and logged line by line: :mod:`.logs`).
        executable: the Python interpreter.
        pair: makes a worker's socket pair (``(ours, theirs)``).
        open_end: opens the supervisor's end of it (tests pass fakes of both).
    """

    def __init__(
        self,
        count: int,
        reactor: Any,
        argv: Callable[[int], list[str]],
        env: Mapping[str, str],
        metrics: SupervisorMetrics | None = None,
        *,
        inherit_logs: bool = False,
        executable: str = sys.executable,
        pair: Callable[[], tuple[socket.socket, socket.socket]] = socket.socketpair,
        open_end: Callable[..., SupervisorEnd] = SupervisorEnd,
    ) -> None:
        self.slots = [_Slot(i) for i in range(count)]
        self.dispatcher = Dispatcher(self.slots, reactor)
        self._reactor = reactor
        self._argv = argv
        self._env = dict(env)
        self._metrics = metrics
        self._inherit_logs = inherit_logs
        self._executable = executable
        self._pair = pair
        self._open_end = open_end
        self._stopping = False
        self.listeners: list[_Listener] = []

    # starting ---------------------------------------------------------------------------------
    def startService(self) -> None:
        Service.startService(self)
        for listener in self.listeners:
            if listener.port is not None:
                self.dispatcher.add_port(listener.port)
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        slot.restart = None
        slot.reload_pending = False  # (a new process reads the config as it is now)
        out: int | str = 1 if self._inherit_logs else "r"
        err: int | str = 2 if self._inherit_logs else "r"
        relay = None if self._inherit_logs else LineRelay(slot.index)
        ours = theirs = None
        null = -1
        try:
            ours, theirs = self._pair()  # (AF_UNIX, SOCK_STREAM)
            null = os.open(os.devnull, os.O_RDONLY)
            slot.process = self._reactor.spawnProcess(
                _WorkerProcess(self, slot, relay),
                self._executable,
                [self._executable, *self._argv(slot.index)],
                env=self._env,
                childFDs={0: null, 1: out, 2: err, CHANNEL_FD: theirs.fileno()},
            )
        except OSError as e:  # (no process, or no descriptors for one: try again later)
            if ours is not None:
                ours.close()
            delay = slot.delay.after_death(0.0)
            _log.error(
                "worker {index} could not be started: {error}; trying again in {delay:g} s",
                index=slot.index,
                error=str(e),
                delay=delay,
            )
            self._schedule_restart(slot, delay)
            return
        finally:
            if null >= 0:
                os.close(null)
            if theirs is not None:
                theirs.close()
        assert ours is not None
        slot.started = self._reactor.seconds()
        slot.pid = slot.process.pid if slot.process is not None else None
        slot.ended = Deferred()
        slot.end = self._open_end(
            ours,
            self._reactor,
            on_ready=lambda port: self._ready(slot, port),
            on_flushed=lambda: self._flushed(slot),
            on_lost=lambda: self._lost(slot),
        )
        _log.info("worker {index} started (pid {pid})", index=slot.index, pid=slot.pid)

    def _ready(self, slot: _Slot, port: int) -> None:
        slot.port = port
        _log.info("worker {index} (pid {pid}) ready", index=slot.index, pid=slot.pid)
        if slot.reload_pending and slot.process is not None:
            slot.reload_pending = False
            self._signal(slot, "HUP")
        self.dispatcher.changed()

    def _lost(self, slot: _Slot) -> None:
        slot.not_serving()
        self.dispatcher.changed()

    # dying -------------------------------------------------------------------------------------
    def _ended(self, slot: _Slot, reason: Failure) -> None:
        pid = slot.pid
        slot.process = None
        slot.not_serving()
        self.dispatcher.changed()
        ended, slot.ended = slot.ended, None
        if self._stopping:
            _log.info("worker {index} (pid {pid}) {how}", index=slot.index, pid=pid, how=_describe_exit(reason))
        else:
            uptime = self._reactor.seconds() - slot.started
            delay = slot.delay.after_death(uptime)
            _log.error(
                "worker {index} (pid {pid}) {how} after {uptime:.1f} s; restarting it in {delay:g} s",
                index=slot.index,
                pid=pid,
                how=_describe_exit(reason),
                uptime=uptime,
                delay=delay,
            )
            self._schedule_restart(slot, delay)
        if ended is not None:
            ended.callback(None)

    def _schedule_restart(self, slot: _Slot, delay: float) -> None:
        def restart() -> None:
            if self._metrics is not None:
                self._metrics.restarted(slot.index)
            self._spawn(slot)

        if not self._stopping:
            slot.restart = self._reactor.callLater(delay, restart)

    # what the supervisor asks of them ---------------------------------------------------------
    @property
    def ready_count(self) -> int:
        return sum(slot.ready for slot in self.slots)

    def internal_ports(self) -> list[tuple[int, int | None]]:
        """Each worker's index and internal port (``None`` while it is not ready)."""
        return [(slot.index, slot.port if slot.ready else None) for slot in self.slots]

    def pids(self) -> list[int | None]:
        return [slot.pid for slot in self.slots]

    def reload_all(self) -> int:
        """Have every worker re-read the config (SIGHUP); how many were asked now.  One that
        is still starting gets its SIGHUP once it is ready: until its reload handler is set,
        a SIGHUP would end it (the default action), and what it read may be the old file."""
        sent = 0
        for slot in self.slots:
            if slot.process is None:
                continue
            if not slot.ready:
                slot.reload_pending = True
                continue
            sent += self._signal(slot, "HUP")
        return sent

    def _signal(self, slot: _Slot, name: str) -> int:
        try:
            assert slot.process is not None
            slot.process.signalProcess(name)
            return 1
        except (OSError, ProcessExitedAlready):  # exited meanwhile (its end is on its way)
            return 0

    def signal_all(self, name: str) -> int:
        """Send signal ``name`` ("HUP", "TERM", "KILL") to every running worker; how many."""
        sent = 0
        for slot in self.slots:
            if slot.process is not None:
                try:
                    slot.process.signalProcess(name)
                    sent += 1
                except (OSError, ProcessExitedAlready):  # exited meanwhile (its end is on its way)
                    pass
        return sent

    async def flush_all(self) -> None:
        """Have every ready worker write its access record; returns once all have (or
        :data:`FLUSH_TIMEOUT` seconds passed, or they exited)."""
        waiting: list[Deferred[None]] = []
        for slot in self.slots:
            if not slot.ready or slot.end is None:
                continue
            try:
                slot.end.ask_flush()
            except OSError:
                continue
            done: Deferred[None] = Deferred()
            slot.flushing.append(done)
            waiting.append(done)
        await _within(self._reactor, waiting, FLUSH_TIMEOUT)

    def _flushed(self, slot: _Slot) -> None:
        if slot.flushing:
            slot.flushing.pop(0).callback(None)

    # stopping ----------------------------------------------------------------------------------
    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._stopping = True
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        self.dispatcher.close()  # (and it pauses the listeners quietly from now on)
        return Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        ended = [slot.ended for slot in self.slots if slot.ended is not None]
        if not ended:
            return
        self.signal_all("TERM")
        await _within(self._reactor, ended, STOP_TIMEOUT)
        left = [slot for slot in self.slots if slot.ended is not None]
        if left:
            _log.warn(
                "workers {which} did not stop within {timeout} s of SIGTERM: killing them",
                which=", ".join(str(slot.index) for slot in left),
                timeout=STOP_TIMEOUT,
            )
            waits = [slot.ended for slot in left if slot.ended is not None]
            self.signal_all("KILL")
            await _within(self._reactor, waits, STOP_TIMEOUT)


async def _within(reactor: Any, waits: list[Deferred[None]], timeout: float) -> None:
    """Returns once every one of ``waits`` has fired, or ``timeout`` seconds on
    (whichever is first), leaving them as they are (not cancelled)."""
    done: Deferred[None] = Deferred()
    left = len(waits)

    def fired(result: object) -> object:
        nonlocal left
        left -= 1
        if left == 0 and not done.called:
            done.callback(None)
        return result

    if not waits:
        return
    for wait in waits:
        wait.addBoth(fired)
    timer = reactor.callLater(timeout, lambda: None if done.called else done.callback(None))
    await done
    if timer.active():
        timer.cancel()


def worker_argv(config_path: str, inherit_logs: bool) -> Callable[[int], list[str]]:
    """A worker's command line (after the interpreter), by index.  The supervisor's PID is
    read when the worker starts: twistd builds the service before it forks to become a
    daemon, so the PID at that moment is not the supervisor's."""

    def argv(index: int) -> list[str]:
        supervisor = str(os.getpid())
        args = ["-m", "mirror.workers.worker", "--config", config_path, "--index", str(index), "--supervisor", supervisor]
        return [*args, "--inherit-log"] if inherit_logs else args

    return argv


def worker_env(secret: str) -> dict[str, str]:
    """The workers' environment: the supervisor's, the secret, and this copy of ``mirror``
    first on the path (so that they run the code the supervisor runs)."""
    env = dict(os.environ)
    env[SECRET_ENV] = secret
    here = str(Path(mirror.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    return env
