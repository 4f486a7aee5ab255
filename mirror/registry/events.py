"""What the registry reports as it works: one log event and one metric per occurrence.

Log events carry ``event_kind`` (``cache``, ``upstream_fetch``, ``stale_tag``,
``digest_mismatch``) and structured fields, so tests and ``mirror warm`` observe them;
metrics are counted in :class:`~mirror.metrics.Metrics` with bounded labels.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mirror.core.oci import Digest
from mirror.core.routing import Route
from mirror.metrics import Metrics

__all__ = ["Events"]


class Events:
    """Logs and counts cache lookups, upstream fetches and stale answers."""

    _log = Logger()

    def __init__(self, metrics: Metrics, clock: IReactorTime) -> None:
        self.metrics = metrics
        self._clock = clock

    def cache(self, kind: str, route: Route, reference: str, result: str) -> None:
        """A lookup of a manifest or blob: ``hit``, ``miss``, ``join`` or ``revalidate``."""
        self.metrics.cache_lookup(kind, result)
        self._log.info(
            "cache {result}: {kind} {repository}@{reference}",
            result=result,
            kind=kind,
            repository=route.key,
            reference=reference,
            event_kind="cache",
        )

    def fetched(self, kind: str, route: Route, reference: str, size: int, started: float, outcome: str) -> None:
        """An upstream fetch ended: ``stored``, ``digest mismatch``, an error code, or ``failed: ...``."""
        assert route.upstream is not None
        self.metrics.fetched(route.upstream.registry, kind, outcome, size)
        self._log.info(
            "upstream fetch: {upstream} {kind} {repository}@{digest}: {outcome}, {bytes} bytes in {seconds:.3f} s",
            upstream=route.upstream.registry,
            kind=kind,
            repository=route.remote_name,
            digest=reference,
            bytes=size,
            seconds=self._clock.seconds() - started,
            outcome=outcome,
            event_kind="upstream_fetch",
        )

    def resumed(self, route: Route, reference: str, offset: int, why: str) -> None:
        """A blob body broke mid-way (``why``); the upstream is asked for it from ``offset``."""
        assert route.upstream is not None
        self.metrics.upstream_resumed(route.upstream.registry)
        self._log.info(
            "upstream fetch: {upstream} blob {repository}@{digest} broke at byte {offset} ({why}); resuming from there",
            upstream=route.upstream.registry,
            repository=route.remote_name,
            digest=reference,
            offset=offset,
            why=why,
            event_kind="upstream_resume",
        )

    def followed(self, route: Route, reference: str, peer: str, size: int, started: float, outcome: str) -> None:
        """A blob fill followed from another node (which fetched it from the upstream) ended."""
        self.metrics.followed(outcome)
        self._log.info(
            "fill followed from node {peer}: {repository}@{digest}: {outcome}, {bytes} bytes in {seconds:.3f} s",
            peer=peer,
            repository=route.key,
            digest=reference,
            bytes=size,
            seconds=self._clock.seconds() - started,
            outcome=outcome,
            event_kind="cluster_follow",
        )

    def stale_tag(self, route: Route, tag: str, digest: Digest, reason: str) -> None:
        """A cached tag was served unchecked because the upstream could not answer."""
        assert route.upstream is not None
        self.metrics.stale_tag(route.upstream.registry)
        self._log.warn(
            "serving cached {repository}:{tag} ({digest}) unchecked: {reason}",
            repository=route.key,
            tag=tag,
            digest=str(digest),
            reason=reason,
            event_kind="stale_tag",
        )

    def digest_mismatch(self, route: Route, digest: Digest, actual: Digest, size: int) -> None:
        """An upstream sent a blob whose bytes do not match its digest (nothing was cached)."""
        assert route.upstream is not None
        self._log.error(
            "digest mismatch: upstream {upstream} sent {repository}@{digest} as {actual} ({bytes} bytes); not cached",
            upstream=route.upstream.registry,
            repository=route.remote_name,
            digest=str(digest),
            actual=str(actual),
            bytes=size,
            event_kind="digest_mismatch",
        )
