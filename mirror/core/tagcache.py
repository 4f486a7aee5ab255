"""Tag freshness for mirrored repositories: when a cached tag may be served unchecked.

A tag of a mirrored repository is trusted for its upstream's ``tag_ttl`` after the
upstream last confirmed it; after that one ``HEAD`` revalidates it.  The store keeps when
each tag was last confirmed (by this process, an earlier one, or another node sharing the
store), so a tag loaded from the store is trusted for the rest of that TTL; a time in the
future (clocks that disagree) is not trusted.  When the upstream cannot answer, the
cached digest is served and trusted for another TTL, so that every request does not wait
on a dead upstream.

Pure: the caller passes the time.
"""

from __future__ import annotations

import enum

import attrs

from mirror.core.oci import Digest

__all__ = ["Freshness", "TagCache", "TagState"]


class Freshness(enum.Enum):
    """What a request for a tag must do."""

    FRESH = "fresh"  # serve the cached digest
    REVALIDATE = "revalidate"  # cached, but ask the upstream first
    UNKNOWN = "unknown"  # nothing cached: fetch


@attrs.frozen
class TagState:
    """What this process knows of one tag."""

    digest: Digest
    checked_at: float | None  # when the upstream last confirmed it (None: unknown)


class TagCache:
    """The known tags of mirrored repositories, by (repository key, tag)."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], TagState] = {}

    def get(self, key: str, tag: str) -> TagState | None:
        """What is known of ``key:tag`` in memory."""
        return self._states.get((key, tag))

    def freshness(self, state: TagState | None, now: float, ttl: float) -> Freshness:
        """Whether ``state`` may be served at ``now`` under ``ttl``."""
        if state is None:
            return Freshness.UNKNOWN
        if state.checked_at is None or not 0 <= now - state.checked_at < ttl:
            return Freshness.REVALIDATE
        return Freshness.FRESH

    def loaded(self, key: str, tag: str, digest: Digest, checked_at: float | None) -> TagState:
        """Remember a tag read from the store, confirmed at ``checked_at`` (by any process)."""
        state = self._states[(key, tag)] = TagState(digest, checked_at)
        return state

    def confirmed(self, key: str, tag: str, digest: Digest, now: float) -> bool:
        """The upstream says (or, when it is down, we decide) ``key:tag`` is ``digest``.

        Returns whether the digest changed from what was known (the store needs updating).
        """
        previous = self._states.get((key, tag))
        self._states[(key, tag)] = TagState(digest, now)
        return previous is None or previous.digest != digest

    def forget(self, key: str, tag: str) -> None:
        """The upstream no longer has ``key:tag``."""
        self._states.pop((key, tag), None)

    def clear(self) -> None:
        """Forget everything (TTLs may have changed: revalidate each tag on next use)."""
        self._states.clear()
