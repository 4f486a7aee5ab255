"""A few threads for the store's small blocking file work: lighter than the reactor's pool.

The filesystem store writes tags, links and manifests, appends to its repository index
and takes the GC lock in threads, so that their fsyncs never stall the reactor.  Under a
push load that is thousands of calls a second, each a few syscalls long.  Twisted's pool
(``deferToThread``) hands every call through a coordinator and a worker team guarded by
Python-level locks and conditions: per call, dozens of points where the interpreter lock
changes hands, and ten threads contending for it with the reactor.  Measured with
``bench/registry_bench.py`` (see docs/benchmarks.md), the reactor thread then spent about
40 % of its time waiting for the interpreter lock.  Here a call is one put on a C queue
(:class:`queue.SimpleQueue`) and its result one ``callFromThread``, on two threads.

Calls wait behind each other, so only short ones belong here (milliseconds: a small file
and its fsync); blob data, commits of large blobs and walks of the whole store stay on
the reactor's pool.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["IoThreads"]

_OF_REACTOR: dict[int, IoThreads] = {}  # by id(reactor): see IoThreads.of


class _Reactor(Protocol):
    def callFromThread(self, callable: Callable[..., Any], *args: object) -> None: ...

    def addSystemEventTrigger(self, phase: str, eventType: str, callable: Callable[..., Any], *args: object) -> Any: ...


class IoThreads:
    """``run_blocking`` for short file work: ``IoThreads(reactor)(f, *args)`` runs ``f`` in
    one of ``threads`` threads and fires the Deferred with its result on the reactor.

    The threads start with the first call and stop after the reactor shuts down; they are
    daemon threads, so a call stuck on a dead disk does not keep the process alive.
    """

    def __init__(self, reactor: _Reactor, threads: int = 2, name: str = "mirror-io") -> None:
        self._reactor = reactor
        self._count = threads
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[object, ...], Deferred[Any]] | None]
        self._calls = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        reactor.addSystemEventTrigger("after", "shutdown", self.stop)

    @classmethod
    def of(cls, reactor: _Reactor) -> IoThreads:
        """The one set of these threads for ``reactor`` (made on first use): every store a
        process opens on one reactor shares them."""
        threads = _OF_REACTOR.get(id(reactor))
        if threads is None or threads._reactor is not reactor:
            threads = _OF_REACTOR[id(reactor)] = cls(reactor)
        return threads

    def __call__(self, f: Callable[..., Any], *args: object) -> Deferred[Any]:
        if self._stopped:
            raise RuntimeError(f"{self._name}: stopped")
        if not self._threads:
            for i in range(self._count):
                thread = threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        d: Deferred[Any] = Deferred()
        self._calls.put((f, args, d))
        return d

    def _work(self) -> None:
        deliver = self._reactor.callFromThread
        while (call := self._calls.get()) is not None:
            f, args, d = call
            try:
                result = f(*args)
            except BaseException:
                deliver(d.errback, Failure())
            else:
                deliver(d.callback, result)

    def stop(self, timeout: float = 5.0) -> None:
        """Let the threads finish the calls queued so far, then end (waiting at most
        ``timeout`` seconds for each)."""
        if self._stopped:
            return
        self._stopped = True
        for _ in self._threads:
            self._calls.put(None)
        for thread in self._threads:
            thread.join(timeout)
