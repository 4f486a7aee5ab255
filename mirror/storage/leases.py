"""Keeping a lease (:class:`~mirror.storage.base.LeaseStore`) while its work runs."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mirror.storage.base import LeaseStore

__all__ = ["Renewal"]

_log = Logger()


class Renewal:
    """Renews ``holder``'s lease ``name`` every third of ``ttl`` until :meth:`stop`."""

    def __init__(self, leases: LeaseStore, name: str, holder: str, ttl: float, clock: IReactorTime) -> None:
        self._leases = leases
        self._name = name
        self._holder = holder
        self._ttl = ttl
        self._clock = clock
        self._call = clock.callLater(ttl / 3, self._renew)
        self._renewing: Deferred[None] | None = None

    def _renew(self) -> None:
        d = Deferred.fromCoroutine(self._leases.renew(self._name, self._holder, self._ttl))
        d.addErrback(lambda f: _log.failure("could not renew the lease {name}", f, name=self._name))
        self._renewing = d
        self._call = self._clock.callLater(self._ttl / 3, self._renew)

    async def stop(self) -> None:
        """No more renewals; returns once one under way has landed (so that a release
        after it cannot be undone by it)."""
        if self._call.active():
            self._call.cancel()
        if self._renewing is not None and not self._renewing.called:
            await self._renewing
