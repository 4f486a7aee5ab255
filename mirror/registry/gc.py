"""Garbage collection and eviction, online: inventory the store, plan, then delete.

:func:`collect` is what ``mirror gc`` runs; the service runs ``mirror gc --json`` as a
child process every ``gc.interval`` (:mod:`mirror.tap`), so a run never holds up the
service's event loop.  It never needs the registry to stop or go read-only:

* uploads and upstream fills are outside the blob store until committed, and GC only
  ever deletes committed blobs;
* a blob read or written within ``gc.grace`` is never deleted (commits, pulls and pushes
  all count: :meth:`~mirror.storage.base.BlobStore.delete_if_idle` checks again);
* blobs are deleted in batches holding the store's GC lock exclusively, each re-checked
  under the lock; writers that make existing blobs referenced again (a manifest push, a
  mount, an import) record them as just used holding the lock shared
  (:func:`holding_off_gc`), so a push that raced the mark is seen and its blobs are kept.

Which repositories are mirrored (evictable by age and size) is the router's answer for
each stored key (:meth:`~mirror.core.routing.Router.route_stored`), the same answer the
request that stored it got; a key this configuration no longer routes, and a repository
holding pushed blobs, are kept as hosted ones are.  What each manifest references comes
from the one manifest parser (every digest in it, if the parser cannot read it).

A crash (even ``kill -9``) at any point leaves a consistent store: tags go before the
manifest links they point to, links before the blobs they reference, so what remains
always has its blobs, and the next run finishes the job.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import attrs

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mirror.config import MirrorConfig
from mirror.core.errors import RegistryError
from mirror.core.gcplan import GcPolicy, Inventory, Plan, RepoInventory, plan
from mirror.core.manifest import parse_manifest
from mirror.core.oci import Digest, parse_digest
from mirror.core.routing import Router
from mirror.storage.base import GcLock, Store
from mirror.storage.leases import Renewal

__all__ = ["GcBusy", "GcReport", "collect", "format_report", "holding_off_gc", "inventory", "policy_of", "summary"]

T = TypeVar("T")
_log = Logger()

#: Blobs deleted per hold of the GC lock.
BATCH = 256


async def holding_off_gc(lock: GcLock, clock: IReactorTime, work: Callable[[], Awaitable[T]], *, patience: float = 10.0) -> T:
    """Run ``work`` holding the shared side of the store's GC lock.

    Work that makes existing blobs referenced (a mount, a manifest push, an import)
    records them as just used under this lock first, so a concurrent GC either deleted
    them already (and the work sees them missing) or sees them as just used and keeps them.

    Raises:
        RegistryError: ``UNAVAILABLE`` when GC holds the store for more than ``patience``
            seconds (a request should not hang; ``mirror import`` waits longer).
    """
    deadline = clock.seconds() + patience  # time, not tries: a try costs requests on object storage
    while True:
        handle = await lock.try_shared()
        if handle is not None:
            try:
                return await work()
            finally:
                await lock.release(handle)
        if clock.seconds() >= deadline:
            raise RegistryError("UNAVAILABLE", "garbage collection is holding the store; retry shortly")
        await deferLater(clock, 0.01, lambda: None)


@attrs.frozen
class GcReport:
    """What a run did (or, dry, would do)."""

    plan: Plan
    dry_run: bool
    seconds: float
    blobs_deleted: int
    bytes_freed: int
    sizes: dict[Digest, tuple[int, float]] = attrs.field(factory=dict, repr=False)  # the inventory's blobs


def summary(report: GcReport) -> dict[str, object]:
    """The numbers of a run, for logs, metrics and ``mirror gc --json``."""
    freed = report.plan.bytes_freed if report.dry_run else report.bytes_freed
    deleted = len(report.plan.delete_blobs) if report.dry_run else report.blobs_deleted
    return {
        "dry_run": report.dry_run,
        "manifests_dropped": len(report.plan.drop_manifests),
        "blobs_deleted": deleted,
        "bytes_freed": freed,
        "store_bytes": report.plan.bytes_before - freed,
        "store_blobs": report.plan.blobs_before - deleted,
        "seconds": round(report.seconds, 3),
    }


def policy_of(config: MirrorConfig, delete_untagged: bool | None = None) -> GcPolicy:
    """The GC policy a configuration asks for."""
    gc = config.gc
    return GcPolicy(
        grace=gc.grace,
        max_age=gc.max_age or None,
        max_size=gc.max_size or None,
        high_watermark=gc.high_watermark,
        low_watermark=gc.low_watermark,
        delete_untagged=gc.delete_untagged if delete_untagged is None else delete_untagged,
    )


async def inventory(store: Store, router: Router, max_manifest_size: int) -> Inventory:
    """A snapshot of the store for :func:`mirror.core.gcplan.plan`."""
    inv = Inventory()
    accessed = await store.access.snapshot()
    for blob in await store.blobs.scan():
        inv.blobs[blob.digest] = (blob.size, max(blob.modified, accessed.get(blob.digest, 0.0)))
    for key in await store.metadata.repositories():
        record = await store.metadata.scan_repository(key)
        route = router.route_stored(key)
        inv.repos[key] = RepoInventory(
            # Pushed content (pushed links: only hosted repositories write them) is never
            # evicted, even when the configuration now routes its name to an upstream.
            hosted=route is None or route.hosted or bool(record.blob_links),
            manifests=record.manifests,
            tags=record.tags,
            blob_links=record.blob_links | record.fetched_links,
        )
        for d in record.manifests:
            if d in inv.references or d not in inv.blobs:
                continue
            data = await store.blobs.read(d, max_manifest_size)
            if data is None:
                continue
            try:
                manifest = parse_manifest(data)
            except RegistryError:
                # Not a manifest the parser reads (a previous release may have stored it):
                # GC must not lose what it might reference, so every digest in it counts.
                inv.references[d] = tuple(_digests_anywhere(data))
                continue
            inv.references[d] = tuple(manifest.references())
            if manifest.subject is not None:
                inv.subjects[d] = manifest.subject.digest
    return inv


def _digests_anywhere(data: bytes) -> Iterator[Digest]:
    """Every ``digest`` or ``blobSum`` value in a JSON document that parses as a digest."""
    try:
        stack: list[object] = [json.loads(data)]
    except (ValueError, UnicodeDecodeError):
        return
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("digest", "blobSum") and isinstance(value, str):
                    try:
                        yield parse_digest(value)
                    except RegistryError:
                        pass
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


class GcBusy(Exception):
    """Another node sharing the store is collecting garbage; ``str()`` names it."""


#: Seconds a GC run's lease lasts unless its process renews it (every third of it).
RUN_LEASE = 120.0


async def collect(
    store: Store,
    config: MirrorConfig,
    *,
    now: Callable[[], float] = time.time,
    dry_run: bool = False,
    delete_untagged: bool | None = None,
    clock: IReactorTime | None = None,
) -> GcReport:
    """One mark-and-sweep run per ``config``'s GC settings.

    On a store several nodes share, one run at a time: a run takes the store's ``gc``
    lease (renewed on ``clock`` while it runs), and raises :class:`GcBusy` when another
    node's run holds it.  A dry run needs no lease.
    """
    if store.leases is None or dry_run:
        return await _collect(store, config, now, dry_run, delete_untagged)
    if clock is None:
        from twisted.internet import reactor as clock
    assert clock is not None
    holder = f"{socket.gethostname()}:{os.getpid()}"
    other = await store.leases.acquire("gc-run", holder, RUN_LEASE)
    if other is not None:
        raise GcBusy(f"garbage collection is running on {other}")
    renewal = Renewal(store.leases, "gc-run", holder, RUN_LEASE, clock)
    try:
        return await _collect(store, config, now, dry_run, delete_untagged)
    finally:
        await renewal.stop()
        await store.leases.release("gc-run", holder)


async def _collect(
    store: Store, config: MirrorConfig, now: Callable[[], float], dry_run: bool, delete_untagged: bool | None
) -> GcReport:
    started = now()
    policy = policy_of(config, delete_untagged)
    inv = await inventory(store, Router(config.upstreams, config.hosted), config.max_manifest_size)
    the_plan = plan(inv, policy, started)
    deleted = freed = 0
    if not dry_run:
        for repo, tag in the_plan.drop_tags:
            await store.metadata.delete_tag(repo, tag)
        for repo, digest, _ in the_plan.drop_manifests:
            await store.metadata.unlink_manifest(repo, digest)
        idle_before = started - policy.grace
        blobs = the_plan.delete_blobs
        for i in range(0, len(blobs), BATCH):
            async with store.gc_lock.exclusive():
                for digest in blobs[i : i + BATCH]:
                    size = await store.blobs.delete_if_idle(digest, idle_before)
                    if size is not None:
                        deleted += 1
                        freed += size
        for digest in blobs:
            for repo in the_plan.blob_repos.get(digest, ()):
                if await store.blobs.stat(digest) is None:
                    await store.metadata.unlink_blob(repo, digest)
    report = GcReport(the_plan, dry_run, now() - started, deleted, freed, inv.blobs)
    _log.info(
        "gc{dry}: {manifests} manifests dropped, {blobs} blobs deleted, {bytes} bytes freed of {before} in {seconds:.2f} s",
        dry=" (dry run)" if dry_run else "",
        manifests=len(the_plan.drop_manifests),
        blobs=len(the_plan.delete_blobs) if dry_run else deleted,
        bytes=freed if not dry_run else the_plan.bytes_freed,
        before=the_plan.bytes_before,
        seconds=report.seconds,
        event_kind="gc",
    )
    return report


def format_report(report: GcReport) -> str:
    """Per repository: manifests dropped, blobs and bytes that go; then totals."""
    per_repo: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for repo, _, _ in report.plan.drop_manifests:
        per_repo[repo][0] += 1
    for digest in report.plan.delete_blobs:
        holders = report.plan.blob_repos.get(digest) or ("(unreferenced)",)
        for repo in holders:
            per_repo[repo][1] += 1
            per_repo[repo][2] += report.sizes.get(digest, (0, 0.0))[0] // len(holders)
    verb = "would delete" if report.dry_run else "deleted"
    lines = [f"{repo}: {m} manifests, {b} blobs, {n} bytes" for repo, (m, b, n) in sorted(per_repo.items())]
    total = report.plan.bytes_freed if report.dry_run else report.bytes_freed
    count = len(report.plan.delete_blobs) if report.dry_run else report.blobs_deleted
    lines.append(
        f"{verb} {len(report.plan.drop_manifests)} manifests and {count} blobs, {total} bytes "
        f"(store had {report.plan.bytes_before} bytes) in {report.seconds:.2f} s"
    )
    if report.dry_run:
        lines.append("dry run: nothing was deleted")
    return "\n".join(lines)
