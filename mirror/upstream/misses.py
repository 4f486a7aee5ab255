"""The negative cache: what an upstream said, moments ago, it does not have.

A client asking for a tag the upstream lacks (a typo, a tag not pushed yet, a CI job
retrying) would otherwise cost an upstream request — and on Docker Hub a unit of rate
limit — every time.  :class:`Misses` remembers an upstream's 404 for a manifest (by tag
or digest), or for a whole repository (``NAME_UNKNOWN``), for ``ttl`` seconds; the
upstream's next 2xx for that repository forgets it.  Time comes from the caller.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["Misses"]

#: Most misses remembered per upstream; the oldest go first.
LIMIT = 10_000


class Misses:
    """Remembered 404s of one upstream.

    Args:
        ttl: seconds a miss is remembered; 0 remembers none.
        limit: most entries kept.
    """

    def __init__(self, ttl: float, limit: int = LIMIT) -> None:
        self.ttl = ttl
        self._limit = limit
        # (repository, reference or None for the whole repository) -> until when
        self._until: OrderedDict[tuple[str, str | None], float] = OrderedDict()

    def remember(self, name: str, reference: str | None, now: float) -> None:
        """The upstream has no ``reference`` in ``name`` (``None``: no such repository)."""
        if self.ttl <= 0:
            return
        key = (name, reference)
        self._until.pop(key, None)
        self._until[key] = now + self.ttl
        while len(self._until) > self._limit:
            self._until.popitem(last=False)

    def missing(self, name: str, reference: str, now: float) -> bool:
        """Whether the upstream said, within the TTL, it has no ``reference`` in ``name``
        (or no repository ``name``)."""
        return self._live((name, None), now) or self._live((name, reference), now)

    def found(self, name: str, reference: str) -> None:
        """The upstream answered for ``reference`` in ``name``: the repository exists."""
        self._until.pop((name, reference), None)
        self._until.pop((name, None), None)

    def _live(self, key: tuple[str, str | None], now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if now >= until:
            del self._until[key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)
