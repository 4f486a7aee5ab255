"""Single-flight: concurrent calls for one key share one run of the work.

Each caller gets its own Deferred, so one caller cancelling (its client went away)
never cancels the shared work the others wait on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["Shared", "SingleFlight"]

T = TypeVar("T")


class Shared(Generic[T]):
    """One run of ``work`` whose result any number of callers wait for."""

    def __init__(self, work: Callable[[], Awaitable[T]]) -> None:
        self._waiters: list[Deferred[T]] = []
        self._result: list[T] = []  # the result once the work succeeded
        self._failure: Failure | None = None  # ...or why it failed
        Deferred.fromCoroutine(_as_coroutine(work)).addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, result: T) -> None:
        self._result.append(result)
        self._settle()

    def _failed(self, failure: Failure) -> None:
        self._failure = failure
        self._settle()

    def _settle(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._fire(waiter)

    def _fire(self, waiter: Deferred[T]) -> None:
        if waiter.called:  # a cancelled waiter has fired already
            return
        if self._failure is not None:
            waiter.errback(self._failure)
        else:
            waiter.callback(self._result[0])

    @property
    def _settled(self) -> bool:
        return bool(self._result) or self._failure is not None

    def peek(self) -> T | None:
        """The result, if the work has succeeded already."""
        return self._result[0] if self._result else None

    def wait(self) -> Deferred[T]:
        """A fresh Deferred for the result (cancelling it leaves the work running)."""
        waiter: Deferred[T] = Deferred()
        if self._settled:
            self._fire(waiter)
        else:
            self._waiters.append(waiter)
        return waiter


class SingleFlight(Generic[T]):
    """At most one run of ``work`` per key at a time; joiners share its result."""

    def __init__(self) -> None:
        self._running: dict[Hashable, Shared[T]] = {}

    def in_flight(self, key: Hashable) -> bool:
        """Whether work for ``key`` is running now."""
        return key in self._running

    def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> Deferred[T]:
        """Run ``work()`` unless it is already running for ``key``; either way, a fresh
        Deferred for its result."""
        shared = self._running.get(key)
        if shared is None:
            shared = self._running[key] = Shared(work)
            shared.wait().addBoth(self._done, key, shared)
        return shared.wait()

    def _done(self, _: object, key: Hashable, shared: Shared[T]) -> None:
        if self._running.get(key) is shared:
            del self._running[key]


async def _as_coroutine(work: Callable[[], Awaitable[T]]) -> T:
    return await work()
