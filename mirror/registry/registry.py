"""The registry: the repository a request names, and what spans repositories.

:class:`Registry` is what the web layer and the command-line tools hold.  For a name
(and containerd's ``ns``) it asks the router (:class:`~mirror.core.routing.Router`)
where the repository lives and hands back a
:class:`~mirror.registry.hosted.HostedRepository` or a
:class:`~mirror.registry.mirrored.MirroredRepository` — the only place that tells the
two apart.  It also owns what repositories share (the store, the upstream clients,
known tags, fills under way, upload sessions, the access record, metrics), the catalog,
and applying a re-read configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mirror.config import MirrorConfig, UpstreamConfig
from mirror.core.errors import RegistryError
from mirror.core.oci import Digest
from mirror.core.routing import Router
from mirror.metrics import Metrics
from mirror.registry.access import AccessBatch
from mirror.registry.cluster import Cluster
from mirror.registry.events import Events
from mirror.registry.fills import UntilStored
from mirror.registry.hosted import HostedRepository
from mirror.registry.mirrored import MirroredRepository, MirrorState
from mirror.registry.repository import BlobBody, Context, LocalContent, Repository
from mirror.registry.uploads import UploadSessions
from mirror.storage.base import Store
from mirror.storage.spool import Orphan
from mirror.upstream.client import Upstream

__all__ = ["Registry"]

#: Repositories asked of the store at a time while access rules hide some of a catalog page.
_CATALOG_BATCH = 100

_log = Logger()


def _resume_failed(failure: Failure, orphan: Orphan) -> None:
    # (the fill's own failure is logged as an upstream fetch; this is for what came before it)
    _log.warn(
        "could not resume the fill of {digest} from {upstream}/{repository}: {error}",
        digest=orphan.note.digest,
        upstream=orphan.note.registry,
        repository=orphan.note.repository,
        error=failure.getErrorMessage(),
    )


def _effective(upstream: UpstreamConfig, config: MirrorConfig) -> UpstreamConfig:
    """An upstream's settings with the global ``offline`` switch applied."""
    return attrs.evolve(upstream, offline=True) if config.offline and not upstream.offline else upstream


class Registry:
    """Repositories by name, over one store and the configured upstreams.

    Args:
        config: the service configuration.
        store: where content lives.
        make_upstream: builds the client of one configured upstream, counting into the metrics given.
        clock: the reactor's time.
        run_blocking: runs a blocking callable in a thread; returns a Deferred.
        cluster: the other nodes on a shared store (default: none).
    """

    def __init__(
        self,
        config: MirrorConfig,
        store: Store,
        make_upstream: Callable[[UpstreamConfig, Metrics], Upstream],
        clock: IReactorTime,
        run_blocking: Callable[..., Deferred[Any]],
        cluster: Cluster | None = None,
    ) -> None:
        self.store = store
        self.cluster = cluster if cluster is not None else Cluster(None, None, None, clock)
        self.clock = clock
        self.metrics = Metrics()
        self.metrics.watch_ratelimits(lambda: [(u.name, u.ratelimit_remaining) for u in self._upstreams.values()])
        self.access = AccessBatch(store.access, clock.seconds)
        self.uploads = UploadSessions(store.uploads, clock)
        self._events = Events(self.metrics, clock)
        self._mirror = MirrorState(run_blocking=run_blocking, cluster=self.cluster)
        self._make_upstream = make_upstream
        self._upstreams: dict[str, Upstream] = {}
        self._apply(config)

    def _apply(self, config: MirrorConfig) -> None:
        upstreams = {}
        for u in config.upstreams:
            u = _effective(u, config)
            current = self._upstreams.get(u.registry)
            upstreams[u.registry] = (
                current if current is not None and current.config == u else self._make_upstream(u, self.metrics)
            )
        self._upstreams = upstreams
        self.config = config
        self.router = Router(config.upstreams, config.hosted)
        self._context = Context(
            config, self.store, LocalContent(self.store, self.access, config.max_manifest_size), self._events, self.clock
        )

    def reconfigure(self, new: MirrorConfig) -> list[str]:
        """Apply a re-read configuration while running (SIGHUP).

        Upstreams, TTLs, hosted patterns, read-only and delete take effect at once;
        upstream clients whose settings changed are rebuilt (dropping their cached
        tokens).  Returns the keys that only a restart applies.
        """
        fixed = ("listen", "storage", "cluster")
        needs_restart = [key for key in fixed if getattr(new, key) != getattr(self.config, key)]
        self._apply(attrs.evolve(new, **{key: getattr(self.config, key) for key in fixed}))
        self._mirror.tags.clear()  # TTLs may have changed: revalidate tags on their next use
        return needs_restart

    def repository(self, name: str, ns: str | None = None) -> Repository:
        """The repository a request names.

        Raises:
            RegistryError: ``NAME_INVALID`` or ``NAME_UNKNOWN`` (see the router).
        """
        route = self.router.route(name, ns)
        if route.upstream is None:
            return HostedRepository(name, route, self._context, self.uploads)
        return MirroredRepository(name, route, self._context, self._upstreams[route.upstream.registry], self._mirror)

    async def catalog(self) -> list[str]:
        """Every repository the store holds, in lexical order."""
        return (await self.catalog_page())[0]

    async def catalog_page(
        self, last: str | None = None, limit: int | None = None, visible: Callable[[str], bool] | None = None
    ) -> tuple[list[str], bool]:
        """A page of the catalog: the repositories the store holds whose names sort after
        ``last`` (all without) and that ``visible`` lets through (all without), at most
        ``limit`` (all without), in lexical order; and whether more follow.

        The store lists from where the page starts (a bisect in the filesystem store's
        index), a batch at a time while ``visible`` hides some, never the whole store.
        """
        if limit == 0:
            return [], False
        page: list[str] = []
        cursor = last
        while True:
            want = None if limit is None else limit + 1 - len(page)  # one more: does a next page exist?
            batch_size = None if want is None else max(want, _CATALOG_BATCH if visible is not None else want)
            batch = await self.store.metadata.repositories(after=cursor, limit=batch_size)
            page.extend(key for key in batch if visible is None or visible(key))
            if batch_size is None or len(batch) < batch_size or (limit is not None and len(page) > limit):
                break
            cursor = batch[-1]
        if limit is None or len(page) <= limit:
            return page, False
        return page[:limit], True

    async def expire_uploads(self) -> int:
        """Remove upload sessions idle for longer than ``upload_expiry``."""
        return await self.uploads.expire(self.config.upload_expiry)

    async def resume_fills(self, orphans: list[Orphan]) -> None:
        """Resume the fills a dead process left (taken from the spool at start), each from
        its bytes on disk; one whose upstream or repository is no longer configured, or
        that cannot go on, is removed."""
        for orphan in orphans:
            try:
                repository = self.repository(orphan.note.repository, ns=orphan.note.registry)
            except RegistryError:
                repository = None
            if not isinstance(repository, MirroredRepository):  # (ns= names the upstream, or fails)
                orphan.discard()
                continue
            resuming = Deferred.fromCoroutine(repository.resume_fill(orphan))
            resuming.addErrback(_resume_failed, orphan)

    async def peer_fill(self, digest: Digest) -> BlobBody | None:
        """What another node following this one's fill of ``digest`` gets: the fill as it
        grows, ending only once the blob is stored; or the stored blob; or ``None``."""
        fill = await self._mirror.fills.running(digest)
        if fill is not None:
            try:
                return BlobBody(fill.writer.follow(UntilStored(fill), fill.expected_size), fill.expected_size, digest, "join")
            except FileNotFoundError:  # committed or aborted just now
                pass
        return await self._context.local.blob(digest, "hit")

    @property
    def fills_in_flight(self) -> int:
        """Blob fills not yet committed to the store (their clients may be done already)."""
        return len(self._mirror.fills)
