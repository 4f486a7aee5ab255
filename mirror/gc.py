"""Garbage collection and eviction, online: inventory the store, plan, then delete.

:func:`collect` is what both ``mirror gc`` and the service's periodic run call (the
service runs it in a thread, so the reactor keeps answering).  It never needs the
registry to stop or go read-only:

* uploads and upstream fills live in ``uploads/`` and ``spool/`` until committed, and
  GC only ever deletes from ``blobs/``;
* a blob accessed or written within ``gc.grace`` is never deleted (commits, pulls and
  pushes all refresh the blob's mtime);
* blobs are deleted in batches holding the store's GC lock, and each is re-checked under
  the lock; a manifest push touches the blobs it references holding the shared side of
  that lock, so a push that raced the mark is seen and its blobs are kept.

A crash (even ``kill -9``) at any point leaves a consistent store: tags go before the
manifest links they point to, links before the blobs they reference, so what remains
always has its blobs, and the next run finishes the job.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import attrs
from twisted.logger import Logger

from mirror.config import MirrorConfig
from mirror.errors import RegistryError
from mirror.gcplan import GcPolicy, Inventory, Plan, RepoInventory, plan
from mirror.oci import Digest, manifest_references, parse_manifest
from mirror.routing import is_hosted

__all__ = ["GcReport", "collect", "format_report", "inventory", "policy_of", "summary"]

_log = Logger()

#: Blobs deleted per hold of the GC lock.
BATCH = 256


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


def _hosted_repo(config: MirrorConfig) -> Callable[[str], bool]:
    """Whether a stored repository is hosted: anything not under an upstream's registry.

    A repository that matches neither (its pattern was removed from the config) counts
    as hosted, so it is never evicted by age or size.
    """
    registries = tuple(f"{u.registry}/" for u in config.upstreams)
    return lambda repo: not repo.startswith(registries) or is_hosted(repo, config.hosted)


def inventory(store, config: MirrorConfig) -> Inventory:  # noqa: ANN001 - a Store
    """Walk the store (blocking: run it in a thread)."""
    hosted = _hosted_repo(config)
    inv = Inventory()
    for digest, size, last in store.scan_blobs():
        inv.blobs[digest] = (size, last)
    for repo in store.repositories():
        manifests, tags, links = store.scan_repository(repo)
        inv.repos[repo] = RepoInventory(hosted=hosted(repo), manifests=manifests, tags=tags, blob_links=links)
        for d in manifests:
            if d in inv.references or d not in inv.blobs:
                continue
            data = store.read_blob(d, config.max_manifest_size)
            if data is None:
                continue
            refs, subject = [], None
            try:
                for role, target in manifest_references(parse_manifest(data)):
                    if role == "subject":
                        subject = target
                    else:
                        refs.append(target)
            except RegistryError:
                pass  # not a manifest we can read: it keeps nothing alive
            inv.references[d] = tuple(refs)
            if subject is not None:
                inv.subjects[d] = subject
    return inv


def collect(
    store,  # noqa: ANN001 - a Store
    config: MirrorConfig,
    *,
    now: Callable[[], float] = time.time,
    dry_run: bool = False,
    delete_untagged: bool | None = None,
) -> GcReport:
    """One mark-and-sweep run (blocking: run it in a thread)."""
    started = now()
    policy = policy_of(config, delete_untagged)
    inv = inventory(store, config)
    the_plan = plan(inv, policy, started)
    deleted = freed = 0
    if not dry_run:
        for repo, tag in the_plan.drop_tags:
            store.delete_tag(repo, tag)
        for repo, digest, _ in the_plan.drop_manifests:
            store.unlink_manifest(repo, digest)
        idle_before = started - policy.grace
        blobs = the_plan.delete_blobs
        for i in range(0, len(blobs), BATCH):
            with store.gc_lock():
                for digest in blobs[i : i + BATCH]:
                    size = store.delete_blob_if_idle(digest, idle_before)
                    if size is not None:
                        deleted += 1
                        freed += size
        for digest in blobs:
            for repo in the_plan.blob_repos.get(digest, ()):
                if store.blob_size(digest) is None:
                    store.unlink_blob(repo, digest)
    report = GcReport(the_plan, dry_run, now() - started, deleted, freed, inv.blobs)
    _log.info(
        "gc{dry}: {manifests} manifests dropped, {blobs} blobs deleted, {bytes} bytes freed "
        "of {before} in {seconds:.2f} s",
        dry=" (dry run)" if dry_run else "",
        manifests=len(the_plan.drop_manifests),
        blobs=len(blobs_of(report)),
        bytes=report.bytes_freed if not dry_run else the_plan.bytes_freed,
        before=the_plan.bytes_before,
        seconds=report.seconds,
        event_kind="gc",
    )
    return report


def blobs_of(report: GcReport) -> list[Digest]:
    """The blobs a run deleted (planned, for a dry run)."""
    return report.plan.delete_blobs


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
