"""Unit tests of the pure GC planner: marking, sweeping, untagged, age and size eviction."""

from mirror.core.gcplan import GcPolicy, Inventory, RepoInventory, plan
from mirror.core.oci import Digest

NOW = 1_000_000.0
HOUR = 3600.0


def d(name: str) -> Digest:
    return Digest.of(name.encode())


def inventory(**repos):
    inv = Inventory()
    for name, repo in repos.items():
        inv.repos[name.replace("__", "/")] = repo
    return inv


def add_image(inv, repo, manifest, blobs, *, size=100, accessed=NOW - 10 * 24 * HOUR, linked=NOW - 10 * 24 * HOUR, tag=None):
    m = d(manifest)
    inv.references[m] = tuple(d(b) for b in blobs)
    inv.blobs[m] = (10, accessed)
    for b in blobs:
        inv.blobs.setdefault(d(b), (size, accessed))
    inv.repos[repo].manifests[m] = linked
    if tag:
        inv.repos[repo].tags[tag] = m
    return m


def test_sweep_removes_exactly_unreferenced_old_blobs():
    """Unreferenced blobs older than grace go; referenced and young ones stay."""
    inv = inventory(app=RepoInventory(hosted=True))
    add_image(inv, "app", "m1", ["cfg", "l1"], tag="v1")
    inv.blobs[d("orphan-old")] = (5, NOW - 2 * HOUR)
    inv.blobs[d("orphan-young")] = (5, NOW - 60)
    p = plan(inv, GcPolicy(grace=HOUR, max_age=None), NOW)
    assert p.delete_blobs == [d("orphan-old")]
    assert p.bytes_freed == 5 and p.drop_manifests == []


def test_untagged_hosted_manifests_dropped_only_when_asked():
    """--delete-untagged drops manifests no tag reaches; children and referrers of kept ones stay."""
    inv = inventory(app=RepoInventory(hosted=True))
    child = add_image(inv, "app", "child", ["c-cfg", "c-layer"])
    index = d("index")
    inv.references[index] = (child,)
    inv.blobs[index] = (10, NOW - 10 * HOUR)
    inv.repos["app"].manifests[index] = NOW - 10 * HOUR
    inv.repos["app"].tags["multi"] = index
    sig = add_image(inv, "app", "sig", ["sig-cfg"])
    inv.subjects[sig] = child
    old = add_image(inv, "app", "old", ["old-cfg", "old-layer"])
    fresh = add_image(inv, "app", "fresh", ["fresh-cfg"], linked=NOW - 60, accessed=NOW - 60)
    assert plan(inv, GcPolicy(grace=HOUR), NOW).drop_manifests == []
    p = plan(inv, GcPolicy(grace=HOUR, delete_untagged=True), NOW)
    assert p.drop_manifests == [("app", old, "untagged")]
    assert set(p.delete_blobs) == {old, d("old-cfg"), d("old-layer")}
    assert fresh not in p.delete_blobs  # pushed within grace: not yet "untagged"


def test_age_evicts_mirrored_but_never_hosted():
    """Mirrored manifests not accessed for max_age go with their blobs; hosted ones stay."""
    inv = inventory(**{
        "docker.io__library__old": RepoInventory(hosted=False),
        "docker.io__library__new": RepoInventory(hosted=False),
        "mine": RepoInventory(hosted=True),
    })
    stale = add_image(inv, "docker.io/library/old", "stale", ["s1", "shared"], tag="latest")
    add_image(inv, "docker.io/library/new", "recent", ["r1", "shared"], accessed=NOW - HOUR * 2, tag="latest")
    add_image(inv, "mine", "hosted", ["h1"], tag="v1")  # accessed 10 days ago, hosted
    p = plan(inv, GcPolicy(grace=HOUR, max_age=7 * 24 * HOUR), NOW)
    assert p.drop_manifests == [("docker.io/library/old", stale, "not accessed for max_age")]
    assert p.drop_tags == [("docker.io/library/old", "latest")]
    assert set(p.delete_blobs) == {stale, d("s1")}  # "shared" is still used by the recent image


def test_size_eviction_takes_least_recently_used_first_and_stops_at_low_watermark():
    """Above the high mark, evict LRU mirrored images until under the low mark, no further."""
    inv = inventory(**{f"docker.io__r{i}": RepoInventory(hosted=False) for i in range(5)}, mine=RepoInventory(hosted=True))
    images = []
    for i in range(5):  # r0 is the least recently accessed
        images.append(add_image(inv, f"docker.io/r{i}", f"m{i}", [f"layer{i}"], size=1000, accessed=NOW - (10 - i) * HOUR))
    add_image(inv, "mine", "hosted", ["big-hosted"], size=1000, accessed=NOW - 100 * HOUR)
    # 6 images of ~1010 bytes: ~6060. max 6000: high 5400 exceeded; low 4000 -> evict 3 mirrored.
    p = plan(inv, GcPolicy(grace=HOUR, max_age=None, max_size=6000, high_watermark=0.9, low_watermark=2 / 3), NOW)
    assert {m for _, m, _ in p.drop_manifests} == set(images[:3])
    assert d("big-hosted") not in p.delete_blobs
    # under the high mark nothing is evicted
    p = plan(inv, GcPolicy(grace=HOUR, max_age=None, max_size=10_000), NOW)
    assert p.drop_manifests == []


def test_young_content_is_not_evicted_for_size():
    """Blobs inside the grace period are not counted as freeable, and not deleted."""
    inv = inventory(**{"docker.io__a": RepoInventory(hosted=False)})
    m = add_image(inv, "docker.io/a", "m", ["l"], size=10_000, accessed=NOW - 5)
    p = plan(inv, GcPolicy(grace=HOUR, max_age=None, max_size=1000), NOW)
    assert d("l") not in p.delete_blobs and m not in p.delete_blobs
