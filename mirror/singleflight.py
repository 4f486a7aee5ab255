"""Single-flight: concurrent calls for one key share one run of the work.

Each caller gets its own Deferred, so one caller cancelling (its client went away)
never cancels the shared work the others wait on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["SingleFlight"]

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """At most one run of ``work`` per key at a time; joiners share its result."""

    def __init__(self) -> None:
        self._waiters: dict[Hashable, list[Deferred[T]]] = {}

    def in_flight(self, key: Hashable) -> bool:
        """Whether work for ``key`` is running now."""
        return key in self._waiters

    def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> Deferred[T]:
        """Run ``work()`` unless it is already running for ``key``; either way, a fresh
        Deferred for its result (cancelling it leaves the shared work running)."""
        mine: Deferred[T] = Deferred()
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._waiters[key] = [mine]

        def settle(result: T | Failure) -> None:
            for waiter in self._waiters.pop(key):
                if not waiter.called:  # a cancelled waiter has already fired
                    if isinstance(result, Failure):
                        waiter.errback(result)
                    else:
                        waiter.callback(result)

        shared = Deferred.fromCoroutine(_as_coroutine(work))
        shared.addBoth(settle)
        return mine


async def _as_coroutine(work: Callable[[], Awaitable[T]]) -> T:
    return await work()
