"""How long to wait before restarting a worker that died: a pure decision, no clock."""

from __future__ import annotations

import attrs

__all__ = ["RestartDelay"]


@attrs.define
class RestartDelay:
    """Half a second after a death, doubling (up to ``most``) while the worker keeps dying
    within ``stable`` seconds of its start; a worker that stayed up that long starts the
    count afresh.  A worker that cannot start (a config it refuses, a store it cannot
    open) is so retried at most every ``most`` seconds, and one that crashed once after
    serving for a while is back at once."""

    first: float = 0.5
    most: float = 30.0
    stable: float = 60.0
    _next: float = attrs.field(init=False, default=0.0)

    def __attrs_post_init__(self) -> None:
        self._next = self.first

    def after_death(self, uptime: float) -> float:
        """Seconds to wait before the next start of a worker that died ``uptime`` seconds
        after it started."""
        if uptime >= self.stable:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.most)
        return delay
