"""IoThreads (mirror/storage/iothreads.py): short blocking calls in threads of their own.

Real threads and a fake reactor: ``callFromThread`` queues the delivery, and the test
delivers it on its own thread, as the reactor would on its.  Waits are bounded by events
(a failure, not a hang, if a thread never answers).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from twisted.internet.defer import Deferred

from mirror.storage.iothreads import IoThreads

WAIT = 10.0  # seconds: the bound on a thread's answer, never reached when things work


class FakeReactor:
    def __init__(self) -> None:
        self.delivered: list[tuple[Callable[..., Any], tuple[object, ...]]] = []
        self.arrived = threading.Semaphore(0)
        self.triggers: list[tuple[str, str, Callable[..., Any]]] = []

    def callFromThread(self, f: Callable[..., Any], *args: object) -> None:
        self.delivered.append((f, args))
        self.arrived.release()

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[..., Any], *args: object) -> None:
        self.triggers.append((phase, event, f))

    def deliver(self, count: int = 1) -> None:
        """Run the next ``count`` results on this thread, waiting for them to arrive."""
        for _ in range(count):
            assert self.arrived.acquire(timeout=WAIT), "no result arrived"
            f, args = self.delivered.pop(0)
            f(*args)


def outcome(d: Deferred[Any]) -> list[Any]:
    found: list[Any] = []
    d.addBoth(found.append)
    return found


def test_calls_run_in_other_threads_and_answer_through_the_reactor():
    reactor = FakeReactor()
    threads = IoThreads(reactor, threads=2)
    here = threading.get_ident()
    d = threads(lambda a, b: (a + b, threading.get_ident()), 2, 3)
    got = outcome(d)
    assert got == []  # nothing is delivered but by the reactor
    reactor.deliver()
    ((total, where),) = got
    assert total == 5 and where != here
    threads.stop()


def test_an_exception_is_the_deferred_s_failure():
    reactor = FakeReactor()
    threads = IoThreads(reactor)

    def fail() -> None:
        raise FileNotFoundError(2, "gone", "/x")

    got = outcome(threads(fail))
    reactor.deliver()
    assert got[0].check(FileNotFoundError) and got[0].value.filename == "/x"
    threads.stop()


def test_two_threads_run_two_calls_at_once():
    """A call blocked (an fsync on a slow disk) does not hold up the next one."""
    reactor = FakeReactor()
    threads = IoThreads(reactor, threads=2)
    release = threading.Event()
    first = outcome(threads(lambda: release.wait(WAIT)))
    second = outcome(threads(lambda: "second"))
    reactor.deliver()  # the second finishes while the first still waits
    assert second == ["second"] and first == []
    release.set()
    reactor.deliver()
    assert first == [True]
    threads.stop()


def test_stop_after_shutdown_finishes_what_was_queued_and_ends_the_threads():
    reactor = FakeReactor()
    threads = IoThreads(reactor, threads=2)
    assert [(phase, event) for phase, event, _ in reactor.triggers] == [("after", "shutdown")]
    got = [outcome(threads(lambda i=i: i)) for i in range(5)]
    workers = threads._threads
    assert len(workers) == 2 and all(t.is_alive() for t in workers)
    reactor.triggers[0][2]()  # the reactor has shut down
    reactor.deliver(5)
    assert got == [[0], [1], [2], [3], [4]]
    assert not any(t.is_alive() for t in workers)
    with pytest.raises(RuntimeError, match="stopped"):
        threads(lambda: None)


def test_one_set_of_threads_per_reactor():
    one, other = FakeReactor(), FakeReactor()
    assert IoThreads.of(one) is IoThreads.of(one)
    assert IoThreads.of(other) is not IoThreads.of(one)
