"""Unit tests of the worker processes' parts (mirror.workers): dispatch, restarts, the
channel's worker end, metrics, health, logs, and the supervisor's pool with fake
processes on a fake reactor (no real sockets, no real time)."""

from __future__ import annotations

import json
import os

import pytest

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, serverFromString
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import ISystemHandle
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from mirror.config import LimitsConfig, parse_config
from mirror.tap import Options, _PeriodicGc, _ReloadOnHangup, connection_limits, makeService
from mirror.workers.backoff import RestartDelay
from mirror.workers.dispatch import MAX_PENDING, Dispatcher, HandoffFactory
from mirror.workers.endpoints import split_tls, worker_factory
from mirror.workers.handoff import WorkerEnd
from mirror.workers.health import SupervisorHealth
from mirror.workers.logs import LineRelay, logs_to_stdout, worker_observer
from mirror.workers.metrics import SupervisorMetrics, combine
from mirror.workers.pool import FLUSH_TIMEOUT, STOP_TIMEOUT, WorkerPool, worker_argv
from mirror.workers.supervisor import ConfigCopy, reload_supervisor
from tests.storeutil import run_now


@pytest.fixture
def logged():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def texts(events):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


# dispatch -----------------------------------------------------------------------------------
class Conn:
    """A connection as the dispatcher holds it."""

    def __init__(self, name):
        self.name = name
        self.closed = False

    def fileno(self):
        return 99

    def close(self):
        self.closed = True


class Worker:
    def __init__(self, index, ready=True):
        self.index = index
        self.ready = ready
        self.got = []
        self.refuse = None

    def hand(self, listener, connection):
        if self.refuse is not None:
            raise self.refuse
        self.got.append((listener, connection.name))


class Port(FileDescriptor):
    """A listening port as far as pausing goes."""

    def __init__(self):
        FileDescriptor.__init__(self, MemoryReactorClock())
        self.reading = True

    def startReading(self):
        self.reading = True

    def stopReading(self):
        self.reading = False


def test_connections_go_round_robin_over_the_ready_workers():
    workers = [Worker(0), Worker(1), Worker(2, ready=False), Worker(3)]
    d = Dispatcher(workers, Clock())
    conns = [Conn(f"c{i}") for i in range(6)]
    for i, c in enumerate(conns):
        d.give(i % 2, c)
    assert [w.got for w in workers] == [[(0, "c0"), (1, "c3")], [(1, "c1"), (0, "c4")], [], [(0, "c2"), (1, "c5")]]
    assert all(c.closed for c in conns)  # (the supervisor's copies: the workers have theirs)
    assert d.handed == 6


def test_a_worker_that_cannot_take_a_connection_is_skipped_for_the_next():
    workers = [Worker(0), Worker(1)]
    workers[0].refuse = BlockingIOError(11, "Resource temporarily unavailable")
    d = Dispatcher(workers, Clock())
    d.give(0, Conn("a"))
    d.give(0, Conn("b"))
    assert workers[1].got == [(0, "a"), (0, "b")]


def test_when_every_worker_is_full_connections_wait_and_are_offered_again():
    """A worker that is not reading fills its socket pair; with all of them full the
    connections wait (the listeners pause) and are offered again shortly, in order."""
    workers = [Worker(0), Worker(1)]
    full = BlockingIOError(11, "Resource temporarily unavailable")
    workers[0].refuse = workers[1].refuse = full
    clock = Clock()
    d = Dispatcher(workers, clock)
    port = Port()
    d.add_port(port)
    d.give(0, Conn("a"))
    d.give(1, Conn("b"))
    assert d.paused and not port.reading
    clock.advance(0.01)
    assert d.paused  # still full: again later
    workers[1].refuse = None
    clock.advance(0.01)
    assert workers[1].got == [(0, "a"), (1, "b")] and not d.paused and port.reading
    assert not clock.getDelayedCalls()


def test_with_no_worker_ready_the_listeners_pause_and_connections_wait_until_one_is():
    workers = [Worker(0, ready=False), Worker(1, ready=False)]
    d = Dispatcher(workers, Clock())
    port = Port()
    d.add_port(port)
    assert d.paused and not port.reading
    held = Conn("early")
    d.give(0, held)
    assert not held.closed
    workers[1].ready = True
    d.changed()
    assert workers[1].got == [(0, "early")] and held.closed
    assert not d.paused and port.reading
    workers[1].ready = False
    d.changed()
    assert d.paused and not port.reading


def test_waiting_connections_are_bounded_and_closed_at_stop():
    d = Dispatcher([Worker(0, ready=False)], Clock())
    conns = [Conn(i) for i in range(MAX_PENDING + 3)]
    for c in conns:
        d.give(0, c)
    assert [c.closed for c in conns[-3:]] == [True] * 3 and not conns[0].closed
    d.close()
    assert all(c.closed for c in conns)


def test_the_handoff_factory_takes_the_socket_from_the_transport_without_reading_or_closing_it():
    """An accepted connection's transport stops reading at once and is let go without a
    close or shutdown: the socket goes to the dispatcher as it is."""

    @implementer(ISystemHandle)
    class Transport(StringTransport, FileDescriptor):
        def __init__(self, handle):
            StringTransport.__init__(self)
            FileDescriptor.__init__(self, MemoryReactorClock())
            self.handle = handle
            self.reading = True

        def getHandle(self):
            return self.handle

        def stopReading(self):
            self.reading = False

    import socket

    class Sock(socket.socket):  # (never opened: a socket object without a descriptor)
        def __init__(self):
            self.closed_by_us = False

        def close(self):
            self.closed_by_us = True

    given = []

    class Catch:
        def give(self, listener, connection):
            given.append((listener, connection))

    factory = HandoffFactory(Catch(), 2)
    protocol = factory.buildProtocol(None)
    sock = Sock()
    transport = Transport(sock)
    protocol.makeConnection(transport)
    assert given == [(2, sock)]
    assert not transport.reading and not transport.disconnecting and not sock.closed_by_us


# restarts -----------------------------------------------------------------------------------
def test_restart_delay_doubles_while_a_worker_keeps_dying_and_starts_over_once_it_stayed_up():
    delay = RestartDelay()
    assert [delay.after_death(1.0) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert delay.after_death(120.0) == 0.5
    assert delay.after_death(3.0) == 1


# the channel's worker end ---------------------------------------------------------------------
def test_the_worker_end_pairs_each_line_with_the_oldest_descriptor_and_answers_a_flush():
    adopted, flushed, lost = [], [], []
    flushing = Deferred()

    def flush():
        flushed.append(1)
        return flushing

    end = WorkerEnd(lambda listener, fd: adopted.append((listener, fd)), flush, lambda: lost.append(1))
    transport = StringTransport()
    end.makeConnection(transport)
    end.fileDescriptorReceived(7)
    end.fileDescriptorReceived(8)
    end.dataReceived(b"c 1\nc 0")
    assert adopted == [(1, 7)]
    end.dataReceived(b"\nflush\n")
    assert adopted == [(1, 7), (0, 8)] and flushed == [1]
    assert transport.value() == b""  # not before the access record is written
    flushing.callback(None)
    assert transport.value() == b"flushed\n"
    end.ready(4321)
    assert transport.value() == b"flushed\nready 4321\n"
    end.connectionLost(Failure(Exception("gone")))
    assert lost == [1]


# metrics --------------------------------------------------------------------------------------
WORKER_TEXT = """# HELP mirror_http_requests_total Requests answered
# TYPE mirror_http_requests_total counter
mirror_http_requests_total{method="GET",route="manifest",status="200"} %d.0
# HELP mirror_gc_runs_total Garbage collection runs
# TYPE mirror_gc_runs_total counter
mirror_gc_runs_total 0.0
# HELP mirror_gc_runs_created Garbage collection runs
# TYPE mirror_gc_runs_created gauge
mirror_gc_runs_created 1.7e9
"""


def families(body: bytes):
    from prometheus_client.parser import text_string_to_metric_families

    names = [line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)), "a family appears twice"
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def test_metrics_are_the_supervisor_s_then_each_worker_s_labelled_by_worker():
    metrics = SupervisorMetrics(2, lambda: 1)
    metrics.restarted(1)
    metrics.gc_run(10, 100, 3)
    body = combine(metrics.registry, {0: WORKER_TEXT % 5, 1: WORKER_TEXT % 7, 2: "garbage{"})
    found = families(body)
    samples = {(s.labels.get("worker"), s.value) for s in found["mirror_http_requests"].samples}
    assert samples == {("0", 5.0), ("1", 7.0)}
    # the GC's families are the supervisor's alone (workers never run it)
    assert [(s.name, s.labels, s.value) for s in found["mirror_gc_runs"].samples if s.name.endswith("_total")] == [
        ("mirror_gc_runs_total", {}, 1.0)
    ]
    assert all("worker" not in s.labels for s in found["mirror_gc_runs_created"].samples)
    assert [(s.labels, s.value) for s in found["mirror_worker_restarts"].samples if s.name.endswith("_total")] == [
        ({"worker": "1"}, 1.0)
    ]
    assert found["mirror_workers_up"].samples[0].value == 1.0
    assert found["mirror_workers"].samples[0].value == 2.0


# the supervisor's health resource ------------------------------------------------------------
def render(resource, path):
    request = DummyRequest([path.lstrip("/")])
    request.path = path.encode()
    result = resource.render_GET(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    assert request.finished, "the resource did not answer at once"
    return request.responseCode or 200, b"".join(request.written).decode()


def health(workers, answers):
    async def fetch(port, path):
        answer = answers[(port, path)]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return SupervisorHealth(lambda: workers, SupervisorMetrics(len(workers), lambda: 0), fetch)


def test_readyz_is_200_only_when_every_worker_is_up_and_ready():
    ready = {(10, "/readyz"): (200, b"ready\n"), (11, "/readyz"): (200, b"ready\n")}
    assert render(health([(0, 10), (1, 11)], ready), "/readyz") == (200, "ready\n")
    code, body = render(health([(0, 10), (1, None)], ready), "/readyz")
    assert (code, body) == (503, "not ready: worker 1: not running\n")
    full = {(10, "/readyz"): (503, b"not ready: store full\n"), (11, "/readyz"): OSError("connection refused")}
    code, body = render(health([(0, 10), (1, 11)], full), "/readyz")
    assert code == 503 and body == "not ready: worker 0: store full; worker 1: no answer (connection refused)\n"
    assert render(health([], {}), "/healthz") == (200, "ok\n")


def test_the_supervisor_s_metrics_include_the_workers_that_answer():
    answers = {(10, "/metrics"): (200, (WORKER_TEXT % 3).encode()), (11, "/metrics"): OSError("timeout")}
    code, body = render(health([(0, 10), (1, 11), (2, None)], answers), "/metrics")
    assert code == 200
    samples = families(body.encode())["mirror_http_requests"].samples
    assert [(s.labels["worker"], s.value) for s in samples] == [("0", 3.0)]


# logs -----------------------------------------------------------------------------------------
def test_workers_inherit_standard_output_only_where_twistd_logs_to_it():
    assert logs_to_stdout({"nodaemon": 1, "logfile": None, "syslog": 0})
    assert logs_to_stdout({"nodaemon": True, "logfile": "-"})
    assert not logs_to_stdout({"nodaemon": 1, "logfile": "/var/log/mirror.log"})
    assert not logs_to_stdout({"nodaemon": 0, "logfile": None})
    assert not logs_to_stdout({"nodaemon": 1, "logfile": None, "syslog": 1})
    assert not logs_to_stdout(None)


def test_a_worker_writes_whole_tagged_lines_or_bare_text_for_the_supervisor_to_log():
    import io

    from twisted.logger import Logger

    out = io.StringIO()
    log = Logger(observer=worker_observer(3, inherit=True, out=out))
    log.info("served {n}", n=5)
    assert out.getvalue().endswith(" [worker 3] served 5\n") and out.getvalue()[:4].isdigit()
    bare = io.StringIO()
    log = Logger(observer=worker_observer(3, inherit=False, out=bare))
    log.info("two\nlines {x}", x="{not a field}")
    assert bare.getvalue() == "two\n\tlines {not a field}\n"


def test_piped_lines_are_written_in_batches_and_a_warning_at_once():
    """Each write wakes the supervisor: access-log lines go out together, at most 50 ms
    late (or at 16 KiB); a warning takes what is held with it at once."""
    import io

    from twisted.logger import Logger

    out = io.StringIO()
    clock = Clock()
    observer = worker_observer(1, inherit=False, out=out, clock=clock)
    log = Logger(observer=observer)
    log.info("GET 1")
    log.info("GET 2")
    assert out.getvalue() == ""
    clock.advance(0.05)
    assert out.getvalue() == "GET 1\nGET 2\n"
    log.info("GET 3")
    log.warn("trouble")
    assert out.getvalue().endswith("GET 3\ntrouble\n") and not clock.getDelayedCalls()
    log.info("x" * 17000)
    assert out.getvalue().endswith("x\n") and not clock.getDelayedCalls()
    log.info("last")
    observer.flush()  # (at exit)
    assert out.getvalue().endswith("last\n") and not clock.getDelayedCalls()


def test_the_relay_logs_each_line_of_a_worker_as_its_own_event(logged):
    relay = LineRelay(2)
    relay.feed(b"first line\nsec")
    relay.feed(b"ond line {braces}\n\nthird")
    relay.close()
    mine = [e for e in logged if e.get("log_system") == "worker 2"]
    assert texts(mine) == ["first line", "second line {braces}", "third"]


# the pool of worker processes ----------------------------------------------------------------
class Process:
    def __init__(self, protocol, pid):
        self.protocol = protocol
        self.pid = pid
        self.signals = []
        self.exited = False

    def signalProcess(self, name):
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def end(self, *, code=0, signal=None):
        self.exited = True
        value = ProcessDone(0) if code == 0 and signal is None else ProcessTerminated(code, signal)
        self.protocol.processEnded(Failure(value))


class Reactor(MemoryReactorClock):
    def __init__(self):
        super().__init__()
        self.processes = []

    failing = 0  # spawns that fail (fork: EAGAIN) before they work again

    def spawnProcess(self, protocol, executable, args, env=None, path=None, uid=None, gid=None, usePTY=0, childFDs=None):
        if self.failing:
            self.failing -= 1
            raise OSError(11, "Resource temporarily unavailable")
        process = Process(protocol, 1000 + len(self.processes))
        self.processes.append((process, args, env, childFDs))
        protocol.makeConnection(process)
        return process


class Sock:
    def __init__(self, fd):
        self.fd = fd
        self.closed = False

    def fileno(self):
        return self.fd

    def close(self):
        self.closed = True


class End:
    """The supervisor's end of a channel, without a socket."""

    def __init__(self, sock, reactor, on_ready, on_flushed, on_lost):
        self.sock = sock
        self.on_ready, self.on_flushed, self.on_lost = on_ready, on_flushed, on_lost
        self.open = True
        self.handed = []
        self.flushes = 0

    def hand(self, listener, connection):
        if not self.open:
            raise BrokenPipeError()
        self.handed.append((listener, connection.name))

    def ask_flush(self):
        self.flushes += 1

    def close(self):
        self.open = False


def make_pool(count=2, **kw):
    reactor = Reactor()
    ends = []

    def open_end(*args, **kwargs):
        end = End(*args, **kwargs)
        ends.append(end)
        return end

    pairs = iter(range(100, 1000, 2))

    def pair():
        n = next(pairs)
        return Sock(n), Sock(n + 1)

    metrics = SupervisorMetrics(count, lambda: pool.ready_count)
    pool = WorkerPool(
        count, reactor, worker_argv("/etc/m.yaml", False), {"S": "x"}, metrics, pair=pair, open_end=open_end, **kw
    )
    return pool, reactor, ends, metrics


def test_the_pool_starts_each_worker_with_its_channel_as_descriptor_3():
    pool, reactor, ends, _ = make_pool()
    pool.startService()
    assert len(reactor.processes) == 2
    _process, args, env, fds = reactor.processes[1]
    supervisor = str(os.getpid())  # (read at the spawn: twistd forks after building the service)
    assert args[1:] == ["-m", "mirror.workers.worker", "--config", "/etc/m.yaml", "--index", "1", "--supervisor", supervisor]
    assert env == {"S": "x"}
    assert fds[3] == 103 and fds[1] == fds[2] == "r"  # (their output is piped to the relay)
    assert ends[1].sock.fd == 102
    assert pool.ready_count == 0 and pool.internal_ports() == [(0, None), (1, None)]
    ends[0].on_ready(5000)
    assert pool.ready_count == 1 and pool.internal_ports() == [(0, 5000), (1, None)]


def test_connections_go_only_to_ready_workers_and_never_to_a_dead_one(logged):
    pool, reactor, ends, _ = make_pool()
    pool.startService()
    ends[0].on_ready(5000)
    ends[1].on_ready(5001)
    for name in "abcd":
        pool.dispatcher.give(0, Conn(name))
    assert ends[0].handed == [(0, "a"), (0, "c")] and ends[1].handed == [(0, "b"), (0, "d")]
    reactor.processes[0][0].end(signal=9)
    for name in "ef":
        pool.dispatcher.give(0, Conn(name))
    assert ends[1].handed[-2:] == [(0, "e"), (0, "f")] and len(ends[0].handed) == 2
    assert any("worker 0 (pid 1000) was killed by signal 9" in t for t in texts(logged))


def test_a_worker_that_dies_is_restarted_after_a_growing_delay_and_counted(logged):
    pool, reactor, _ends, metrics = make_pool(count=1)
    pool.startService()
    reactor.advance(100)
    reactor.processes[-1][0].end(code=3)  # after 100 s up: at once (half a second)
    assert len(reactor.processes) == 1
    reactor.advance(0.5)
    assert len(reactor.processes) == 2
    reactor.processes[-1][0].end(code=3)  # dies at once: 1 s, then 2 s
    reactor.advance(0.99)
    assert len(reactor.processes) == 2
    reactor.advance(0.01)
    assert len(reactor.processes) == 3
    reactor.processes[-1][0].end(signal=11)
    reactor.advance(1.99)
    assert len(reactor.processes) == 3
    reactor.advance(0.01)
    assert len(reactor.processes) == 4
    assert metrics.restarts.labels("0")._value.get() == 3
    lines = texts(logged)
    assert any("worker 0 (pid 1000) exited with code 3 after 100.0 s; restarting it in 0.5 s" in t for t in lines)
    assert any("worker 0 (pid 1002) was killed by signal 11" in t and "in 2 s" in t for t in lines)


def test_a_worker_that_cannot_be_spawned_is_tried_again_later(logged):
    pool, reactor, ends, _ = make_pool(count=1)
    reactor.failing = 2
    pool.startService()
    assert reactor.processes == [] and len(ends) == 0
    reactor.advance(0.5)
    assert reactor.processes == []
    reactor.advance(1)
    assert len(reactor.processes) == 1 and len(ends) == 1
    assert sum("worker 0 could not be started" in t for t in texts(logged)) == 2


def test_stopping_terms_every_worker_and_waits_then_kills_one_that_stays():
    pool, reactor, _ends, _ = make_pool()
    pool.startService()
    reactor.processes[1][0].end(code=1)  # dead, its restart pending: never started now
    stopped = []
    pool.stopService().addBoth(stopped.append)
    first = reactor.processes[0][0]
    assert first.signals == ["TERM"] and not stopped
    reactor.advance(STOP_TIMEOUT)
    assert first.signals == ["TERM", "KILL"] and not stopped
    first.end(signal=9)
    assert stopped == [None]
    reactor.advance(60)
    assert len(reactor.processes) == 2  # no restart after the stop


def test_stopping_returns_once_every_worker_exited():
    pool, reactor, _ends, _ = make_pool()
    pool.startService()
    stopped = []
    pool.stopService().addBoth(stopped.append)
    for process, *_ in reactor.processes:
        assert process.signals == ["TERM"]
        process.end()
    assert stopped == [None]


def test_a_gc_waits_for_every_ready_worker_to_write_its_access_record():
    pool, reactor, ends, _ = make_pool(count=3)
    pool.startService()
    ends[0].on_ready(1)
    ends[1].on_ready(2)
    done = []
    Deferred.fromCoroutine(pool.flush_all()).addBoth(done.append)
    assert [e.flushes for e in ends] == [1, 1, 0]
    ends[0].on_flushed()
    assert not done
    ends[1].on_flushed()
    assert done == [None]
    done.clear()
    Deferred.fromCoroutine(pool.flush_all()).addBoth(done.append)
    ends[0].on_flushed()
    reactor.advance(FLUSH_TIMEOUT)  # worker 1 never answers: GC goes on all the same
    assert done == [None]


def test_sighup_reaches_every_worker_once_the_new_config_is_valid(tmp_path, logged):
    from mirror.workers.supervisor import _Running

    pool, reactor, _ends, _ = make_pool()
    pool.startService()
    path = tmp_path / "m.yaml"
    good = f"listen: tcp:0\nstorage: {{root: '{tmp_path}/s'}}\nworkers: 2\n"
    running = _Running(parse_config(good))

    class Site:
        limits = None

        def configure(self, limits):
            self.limits = limits

    site = Site()
    copy = ConfigCopy(str(path))
    copy.write(good)
    newer = good.replace("workers: 2", "workers: 3\nread_only: true")
    path.write_text(newer)
    _ends[0].on_ready(5001)  # worker 1 is still starting: it gets its SIGHUP once ready
    assert reload_supervisor(running, str(path), pool, site, copy)
    assert [p.signals for p, *_ in reactor.processes] == [["HUP"], []]
    _ends[1].on_ready(5002)
    assert [p.signals for p, *_ in reactor.processes] == [["HUP"], ["HUP"]]
    assert running.config.read_only and running.config.workers == 2 and site.limits.max_connections == 64
    assert any("workers changed; it takes effect only after a restart" in t for t in texts(logged))
    assert copy.path.read_text() == newer  # what the workers (and a worker restarted later) read
    path.write_text("listen: tcp:0\nstorage: {rot: x}\n")
    assert not reload_supervisor(running, str(path), pool, site, copy)
    assert [p.signals for p, *_ in reactor.processes] == [["HUP"], ["HUP"]]
    assert running.config.read_only
    assert copy.path.read_text() == newer  # a refused file never reaches the workers
    assert oct(copy.directory.stat().st_mode & 0o777) == "0o700" and oct(copy.path.stat().st_mode & 0o777) == "0o600"
    copy.startService()
    copy.stopService()
    assert not copy.directory.exists()


# the supervisor's service tree, and the workers' share of limits -----------------------------
def test_with_workers_twistd_runs_a_supervisor_without_the_registry_s_timers(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        "listen: ['tcp:0:interface=127.0.0.1', 'tcp:0:interface=127.0.0.1']\n"
        "metrics: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        f"storage: {{root: '{tmp_path}/store'}}\nhosted: ['*']\nworkers: 2\n"
    )
    options = Options()
    options.parseOptions(["--config", str(path)])
    services = list(makeService(options))
    pools = [s for s in services if isinstance(s, WorkerPool)]
    assert len(pools) == 1 and len(pools[0].slots) == 2
    listeners = [s for s in services if isinstance(s, StreamServerEndpointService)]
    assert [type(s.factory).__name__ for s in listeners] == ["HandoffFactory", "HandoffFactory", "LimitedSite"]
    timers = [s.call[0] for s in services if isinstance(s, TimerService)]
    assert [t.__name__ for t in timers] == ["_PeriodicGc"]  # (no access-record or upload timers: the workers run those)
    assert any(isinstance(s, _ReloadOnHangup) for s in services)
    assert (tmp_path / "store" / "blobs").is_dir()  # opened once here: a store it cannot use stops start-up
    copies = [s for s in services if isinstance(s, ConfigCopy)]
    assert len(copies) == 1 and copies[0].path.read_text() == path.read_text()  # what the workers will read
    copies[0].stopService()  # (never started here: remove its directory as a stop would)
    assert not copies[0].directory.exists()


def test_each_worker_takes_its_share_of_max_connections(monkeypatch):
    import mirror.tap

    monkeypatch.setattr(mirror.tap, "getrlimit", lambda which: (1 << 20, 1 << 20))
    assert connection_limits(LimitsConfig(max_connections=1000), share=3).max_connections == 334
    assert connection_limits(LimitsConfig(max_connections=1000), share=1).max_connections == 1000
    assert connection_limits(LimitsConfig(), share=3).max_connections == 10_000  # (the default is per process)


def test_the_workers_leases_are_files_only_this_machine_sees(tmp_path):
    from mirror.storage.fsleases import FsLeases
    from mirror.tap import machine_leases

    on_disk = machine_leases(parse_config(f"listen: x\nstorage: {{root: '{tmp_path}/store'}}\n"))
    assert isinstance(on_disk, FsLeases) and on_disk.directory == tmp_path / "store" / "leases"
    s3 = "{endpoint: 'http://127.0.0.1:9', bucket: mirror, access_key: a, secret_key: s}"
    in_bucket = machine_leases(parse_config(f"listen: x\nstorage: {{s3: {s3}, spool: '{tmp_path}/spool'}}\n"))
    assert isinstance(in_bucket, FsLeases) and in_bucket.directory == tmp_path / "spool" / "leases"


# TLS listeners ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")  # (Twisted's calls into pyOpenSSL)
def test_an_ssl_endpoint_is_accepted_as_plain_tcp_and_its_tls_done_by_the_worker(tmp_path):
    from tests.integration.test_tls import make_ca_and_server_cert

    tls = make_ca_and_server_cert(tmp_path / "tls")
    reactor = MemoryReactorClock()
    endpoint = serverFromString(reactor, f"ssl:5443:interface=127.0.0.1:privateKey={tls.key}:certKey={tls.cert}:backlog=7")
    assert isinstance(endpoint, SSL4ServerEndpoint)
    plain, context = split_tls(endpoint, reactor)
    assert isinstance(plain, TCP4ServerEndpoint)
    run_now(plain.listen(object()))
    (port, _factory, backlog, interface) = reactor.tcpServers[0]
    assert (port, backlog, interface) == (5443, 7, "127.0.0.1")
    site = Factory.forProtocol(Protocol)
    wrapped = worker_factory(site, context)
    assert isinstance(wrapped, TLSMemoryBIOFactory) and wrapped.wrappedFactory is site
    transport = StringTransport()
    wrapped.buildProtocol(None).makeConnection(transport)
    assert transport.value() == b""  # the server side: it waits for the client's hello (a client would send one)
    tcp = serverFromString(reactor, "tcp:80")
    assert split_tls(tcp, reactor) == (tcp, None) and worker_factory(site, None) is site


def test_periodic_gc_reads_the_running_config_and_counts_into_the_given_metrics():
    """(The supervisor's GC timer: the same _PeriodicGc as one process's, told how to flush.)"""
    calls = []

    class Counts:
        def gc_run(self, *numbers):
            calls.append(numbers)

    config = parse_config("listen: x\nstorage: {root: x}\ngc: {interval: 0}\n")

    async def flush():
        calls.append("flushed")

    gc = _PeriodicGc(MemoryReactorClock(), "m.yaml", lambda: config, flush, Counts())
    run_now(gc())
    assert calls == []  # interval 0 after a reload: no run
    gc._done(json.dumps({"bytes_freed": 1, "store_bytes": 2, "store_blobs": 3}).encode(), b"", 0)
    assert calls == [(1, 2, 3)]


def test_the_workers_shared_token_key_survives_reloads_that_turn_auth_on(htpasswd, tmp_path):
    """A worker started without auth (or with auth.key_file) that a reload turns to
    tokens signed with no key_file signs them with the workers' shared key, not a key of
    its own (tokens would then be good on one worker only)."""
    from mirror.tap import build_auth
    from mirror.workers.worker import shared_token_key

    key = shared_token_key("s" * 32)
    assert key == shared_token_key("s" * 32) != shared_token_key("t" * 32)
    with_file = tmp_path / "token.key"
    with_file.write_bytes(b"k" * 32)
    base = f"listen: tcp:0\nstorage: {{root: '{tmp_path}/s'}}\nworkers: 2\n"
    no_file = parse_config(base + f"auth: {{htpasswd: '{htpasswd}', token: true}}\n")
    keyed = parse_config(base + f"auth: {{htpasswd: '{htpasswd}', token: true, key_file: '{with_file}'}}\n")
    for previous in (None, build_auth(keyed, token_key=key)):
        assert build_auth(no_file, previous, token_key=key).process_key == key
    assert build_auth(no_file).process_key not in (None, key)  # (one process: a random key, as before)


def test_a_scraper_that_hangs_up_mid_scrape_is_not_answered(logged):
    """The workers' answers come after the scraper went: nothing is written, nothing
    raises (Twisted's finish after a lost connection would)."""
    pending: Deferred = Deferred()

    async def fetch(port, path):
        return await pending

    resource = SupervisorHealth(lambda: [(0, 10)], SupervisorMetrics(1, lambda: 0), fetch)
    for path in ("/metrics", "/readyz"):
        pending = Deferred()
        request = DummyRequest([path.lstrip("/")])
        request.path = path.encode()
        resource.render_GET(request)
        request.processingFailed(Failure(ConnectionDone("the scraper hung up")))  # (its connection lost)
        request.written.clear()
        pending.callback((200, b"ready\n"))
        assert not request.finished and request.written == []
    assert not [t for t in texts(logged) if "Unhandled" in t or "Traceback" in t]
