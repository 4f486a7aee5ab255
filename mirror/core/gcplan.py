"""Pure garbage-collection planning: what to drop, given an inventory of the store.

:func:`plan` takes a snapshot of the store (:class:`Inventory`), the policy and the time,
and returns a :class:`Plan`; it does no I/O, so every rule here is tested directly.

Rules:

* **Mark.** Every manifest a repository keeps is a root; what it references (config,
  layers, child manifests, recursively) is marked, and so are the referrers of a kept
  manifest.
* **Untagged** (hosted repositories, with ``delete_untagged``): manifests no tag reaches
  (directly, as an index child, or as a referrer of a reached manifest) are dropped.
* **Age** (mirrored repositories): manifests not accessed for ``max_age`` are dropped.
* **Size** (mirrored repositories): above ``high_watermark * max_size``, the least
  recently accessed manifests are dropped until what remains is under
  ``low_watermark * max_size``.
* **Sweep.** Blobs nothing marks are deleted — unless accessed (or written) within
  ``grace`` seconds: a blob just uploaded, fetched or pushed is never swept.

Hosted content is never dropped by age or size, only by delete + GC.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import attrs

from mirror.core.oci import Digest

__all__ = ["GcPolicy", "Inventory", "Plan", "RepoInventory", "plan"]


@attrs.frozen
class GcPolicy:
    """What a collection may drop."""

    grace: float = 3600.0
    max_age: float | None = 7 * 24 * 3600.0
    max_size: int | None = None
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    delete_untagged: bool = False


@attrs.define
class RepoInventory:
    """One repository as found on disk."""

    hosted: bool
    manifests: dict[Digest, float] = attrs.field(factory=dict)  # digest -> when linked
    tags: dict[str, Digest] = attrs.field(factory=dict)
    blob_links: set[Digest] = attrs.field(factory=set)


@attrs.define
class Inventory:
    """A snapshot of the store: blobs with size and last access, repositories, and what
    each stored manifest references."""

    blobs: dict[Digest, tuple[int, float]] = attrs.field(factory=dict)  # digest -> (size, last access)
    repos: dict[str, RepoInventory] = attrs.field(factory=dict)
    references: dict[Digest, tuple[Digest, ...]] = attrs.field(factory=dict)  # config, layers, children
    subjects: dict[Digest, Digest] = attrs.field(factory=dict)  # manifest -> its subject


@attrs.frozen
class Plan:
    """What a collection removes, and why."""

    drop_tags: list[tuple[str, str]]
    drop_manifests: list[tuple[str, Digest, str]]  # (repo, digest, reason)
    delete_blobs: list[Digest]
    blob_repos: dict[Digest, tuple[str, ...]]  # who last held each deleted blob (for reports)
    bytes_before: int
    bytes_freed: int
    blobs_before: int = 0


def _closure(roots: Iterable[Digest], inv: Inventory) -> set[Digest]:
    """Everything reachable from ``roots`` through manifest references."""
    seen: set[Digest] = set()
    stack = list(roots)
    while stack:
        d = stack.pop()
        if d in seen:
            continue
        seen.add(d)
        stack.extend(inv.references.get(d, ()))
    return seen


def _with_referrers(reached: set[Digest], manifests: Iterable[Digest], inv: Inventory) -> set[Digest]:
    """Add, until nothing changes, the manifests whose subject is reached."""
    manifests = list(manifests)
    while True:
        extra = [m for m in manifests if m not in reached and inv.subjects.get(m) in reached]
        if not extra:
            return reached
        reached |= _closure(extra, inv)


def _last_access(inv: Inventory, digest: Digest) -> float:
    entry = inv.blobs.get(digest)
    return entry[1] if entry is not None else 0.0


def plan(inv: Inventory, policy: GcPolicy, now: float) -> Plan:
    """Decide what to drop.  See the module docstring for the rules."""
    young = now - policy.grace
    dropped: dict[str, dict[Digest, str]] = defaultdict(dict)

    for name, repo in inv.repos.items():
        if repo.hosted:
            if policy.delete_untagged:
                reached = _with_referrers(_closure(repo.tags.values(), inv), repo.manifests, inv)
                for d, linked_at in repo.manifests.items():
                    if d not in reached and linked_at < young:
                        dropped[name][d] = "untagged"
        elif policy.max_age is not None:
            for d in repo.manifests:
                if _last_access(inv, d) < now - policy.max_age:
                    dropped[name][d] = "not accessed for max_age"

    def kept() -> Iterable[tuple[str, Digest]]:
        for name, repo in inv.repos.items():
            for d in repo.manifests:
                if d not in dropped[name]:
                    yield name, d

    def marked() -> set[Digest]:
        roots = [d for _, d in kept()]
        return _with_referrers(_closure(roots, inv), (d for _, d in kept()), inv)

    bytes_before = sum(size for size, _ in inv.blobs.values())
    mark = marked()

    if policy.max_size is not None:
        _evict_for_size(inv, policy, young, dropped, mark)
        mark = marked()

    deleted = sorted((d for d, (_, last) in inv.blobs.items() if d not in mark and last < young), key=str)
    holders: dict[Digest, list[str]] = defaultdict(list)
    for name, repo in inv.repos.items():
        for d in repo.blob_links | set(repo.manifests):
            holders[d].append(name)
        for d in dropped[name]:
            for ref in inv.references.get(d, ()):
                holders[ref].append(name)
    drop_tags = [(name, tag) for name, repo in inv.repos.items() for tag, d in sorted(repo.tags.items()) if d in dropped[name]]
    return Plan(
        drop_tags=drop_tags,
        drop_manifests=[
            (name, d, why) for name in sorted(dropped) for d, why in sorted(dropped[name].items(), key=lambda x: str(x[0]))
        ],
        delete_blobs=deleted,
        blob_repos={d: tuple(sorted(set(holders.get(d, ())))) for d in deleted},
        bytes_before=bytes_before,
        bytes_freed=sum(inv.blobs[d][0] for d in deleted),
        blobs_before=len(inv.blobs),
    )


def _evict_for_size(
    inv: Inventory, policy: GcPolicy, young: float, dropped: dict[str, dict[Digest, str]], mark: set[Digest]
) -> None:
    """Drop least recently accessed mirrored manifests until under the low watermark."""
    assert policy.max_size is not None
    size_of: Callable[[Digest], int] = lambda d: inv.blobs.get(d, (0, 0.0))[0]  # noqa: E731
    # What stays if nothing more is evicted: marked blobs, plus young unmarked ones.
    remaining = sum(size for d, (size, last) in inv.blobs.items() if d in mark or last >= young)
    if remaining <= policy.high_watermark * policy.max_size:
        return
    target = policy.low_watermark * policy.max_size
    # How many kept manifests hold each blob; hosted ones pin their blobs for good.
    holders: dict[Digest, int] = defaultdict(int)
    pinned: set[Digest] = set()
    candidates: list[tuple[float, str, Digest]] = []
    for name, repo in inv.repos.items():
        for d in repo.manifests:
            if d in dropped[name]:
                continue
            own = (d, *inv.references.get(d, ()))
            if repo.hosted:
                pinned.update(_closure([d], inv))
            else:
                candidates.append((_last_access(inv, d), name, d))
            for ref in own:
                holders[ref] += 1
    candidates.sort(key=lambda c: (c[0], c[1], str(c[2])))
    for _, name, d in candidates:
        if remaining <= target:
            break
        dropped[name][d] = "least recently used over max_size"
        for ref in (d, *inv.references.get(d, ())):
            holders[ref] -= 1
            if holders[ref] == 0 and ref not in pinned and ref in inv.blobs and inv.blobs[ref][1] < young:
                remaining -= size_of(ref)
