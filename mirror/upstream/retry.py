"""When to try an upstream request again: bounded exponential backoff with jitter.

Pure decisions, no clock and no randomness of their own (the caller passes both in):
:class:`Backoff` says how long to wait before the next attempt, or that the budget is
spent; :func:`retry_after` reads a ``Retry-After`` header (seconds or an HTTP date).
"""

from __future__ import annotations

from collections.abc import Callable
from email.utils import parsedate_to_datetime

import attrs

__all__ = ["Backoff", "retry_after"]


@attrs.frozen
class Backoff:
    """Waits of ``base * 2**attempt`` seconds (at most ``cap``), half of each wait random
    ("equal jitter": clients that failed together do not retry together), each begun
    within ``deadline`` seconds of the first attempt (an attempt has its own timeout).  An
    upstream's ``Retry-After`` lengthens the wait (it never shortens it: ``Retry-After: 0``
    must not make a tight loop); one that reaches past the deadline ends the retries at
    once."""

    deadline: float
    base: float = 0.25
    cap: float = 8.0

    def delay(self, attempt: int, elapsed: float, random: Callable[[], float], after: float | None = None) -> float | None:
        """Seconds to wait before retrying after failed attempt number ``attempt`` (0 for
        the first), ``elapsed`` seconds after the first began; ``None``: give up.

        Args:
            random: a number in [0, 1) (``random.random``; tests pass a fixed one).
            after: the upstream's ``Retry-After``, in seconds, if it sent one.
        """
        step = min(self.cap, self.base * 2**attempt)
        wait: float = step / 2 + random() * step / 2
        if after is not None:
            wait = max(wait, after)
        if elapsed + wait > self.deadline:
            return None
        return wait


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from ``now`` (Unix time) that a ``Retry-After`` value asks to wait, or
    ``None`` when absent or unreadable (RFC 9110: delay-seconds or an HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
