"""Unit tests of the one router: names (and containerd's ns=) to upstreams or hosted, and
stored keys back to the same answer."""

import pytest

from mirror.config import UpstreamConfig
from mirror.core.errors import RegistryError
from mirror.core.routing import Router

HUB = UpstreamConfig(registry="docker.io", url="https://registry-1.docker.io")
GHCR = UpstreamConfig(registry="ghcr.io", url="https://ghcr.io")
LOCAL = UpstreamConfig(registry="localhost:5000", url="http://127.0.0.1:5000")
UPSTREAMS = (HUB, GHCR)


@pytest.mark.parametrize(
    ("name", "ns", "upstream", "remote", "key"),
    [
        ("library/alpine", None, "docker.io", "library/alpine", "docker.io/library/alpine"),
        ("alpine", None, "docker.io", "library/alpine", "docker.io/library/alpine"),
        ("docker.io/alpine", None, "docker.io", "library/alpine", "docker.io/library/alpine"),
        ("docker.io/library/alpine", None, "docker.io", "library/alpine", "docker.io/library/alpine"),
        ("ghcr.io/org/app", None, "ghcr.io", "org/app", "ghcr.io/org/app"),
        ("org/app", "ghcr.io", "ghcr.io", "org/app", "ghcr.io/org/app"),
        ("library/alpine", "docker.io", "docker.io", "library/alpine", "docker.io/library/alpine"),
        ("ghcr.io/org/app", "ghcr.io", "ghcr.io", "org/app", "ghcr.io/org/app"),
        ("quay.io/x/y", None, "docker.io", "quay.io/x/y", "docker.io/quay.io/x/y"),
    ],
)
def test_routes(name, ns, upstream, remote, key):
    """ns= first, then a registry prefix, then the first upstream; Hub names get library/."""
    r = Router(UPSTREAMS).route(name, ns)
    assert (r.upstream.registry, r.remote_name, r.key) == (upstream, remote, key)


def test_ns_is_not_part_of_the_cache_key():
    """The same image with and without ns= has one cache key."""
    assert Router(UPSTREAMS).route("library/alpine", "docker.io").key == Router(UPSTREAMS).route("library/alpine", None).key


def test_unknown_ns_is_a_clear_error():
    """An ns= no upstream serves is NAME_UNKNOWN, naming the registry."""
    with pytest.raises(RegistryError) as info:
        Router(UPSTREAMS).route("org/app", "quay.io")
    assert info.value.code == "NAME_UNKNOWN"
    assert "quay.io" in info.value.message


def test_no_upstreams():
    """With no upstreams a name cannot be mirrored."""
    with pytest.raises(RegistryError) as info:
        Router(()).route("a/b", None)
    assert info.value.code == "NAME_UNKNOWN"


@pytest.mark.parametrize(
    ("name", "ns", "hosted", "expected"),
    [
        ("myorg/app", None, ("myorg/*",), ("hosted", "myorg/app")),
        ("myorg/team/app", None, ("myorg/*",), ("hosted", "myorg/team/app")),
        ("library/alpine", None, ("myorg/*",), ("docker.io", "docker.io/library/alpine")),
        ("anything/at/all", None, ("*",), ("hosted", "anything/at/all")),
        # a registry prefix or a known ns always means the upstream, even with "*"
        ("docker.io/library/alpine", None, ("*",), ("docker.io", "docker.io/library/alpine")),
        ("library/alpine", "docker.io", ("*",), ("docker.io", "docker.io/library/alpine")),
        # an unknown ns on a hosted name: hosted
        ("myorg/app", "mirror.example:5000", ("myorg/*",), ("hosted", "myorg/app")),
    ],
)
def test_hosted_routes(name, ns, hosted, expected):
    """Hosted patterns come after ns= and registry prefixes, before the default upstream."""
    r = Router(UPSTREAMS, hosted).route(name, ns)
    assert (("hosted" if r.hosted else r.upstream.registry), r.key) == expected


def test_pure_private_registry_has_no_upstream():
    """hosted: ['*'] with no upstreams serves every name as hosted."""
    assert Router((), ("*",)).route("a/b", None).hosted


NAMES = ["alpine", "library/alpine", "docker.io/alpine", "docker.io/library/alpine", "ghcr.io/org/app", "org/app",
         "myorg/app", "myorg/team/app", "docker.io", "quay.io/x/y", "a/b/c"]
NSES = [None, "docker.io", "ghcr.io", "mirror.example:5000", "localhost:5000"]
HOSTED = [(), ("myorg/*",), ("*",)]


@pytest.mark.parametrize("hosted", HOSTED)
@pytest.mark.parametrize("upstreams", [UPSTREAMS, (GHCR,), (LOCAL, HUB), ()])
def test_a_stored_key_routes_as_the_request_that_stored_it(upstreams, hosted):
    """For every request the router accepts, its stored key routes back to the same key, the
    same upstream and the same hosted-or-not: GC, export and import see a repository the
    way the request that filled it did."""
    router = Router(upstreams, hosted)
    checked = 0
    for name in NAMES:
        for ns in NSES:
            try:
                r = router.route(name, ns)
            except RegistryError:
                continue
            again = router.route_stored(r.key)
            assert again == r.__class__(r.upstream, r.remote_name, r.key), (name, ns)
            checked += 1
    assert checked or not (upstreams or hosted)


def test_content_pulled_through_a_prefix_is_mirrored_even_when_everything_is_hosted():
    """hosted: ["*"] with an upstream: /v2/docker.io/library/alpine/... is mirrored, and so is
    its stored key (GC evicts it by age and size)."""
    router = Router((HUB,), ("*",))
    r = router.route("docker.io/library/alpine")
    assert not r.hosted and r.key == "docker.io/library/alpine"
    stored = router.route_stored("docker.io/library/alpine")
    assert stored is not None and not stored.hosted
    assert router.route_stored("myorg/app").hosted


def test_a_registry_with_a_port_routes_its_stored_keys_too():
    """localhost:5000/app is no valid repository name, but it is a valid stored key: the
    content of an upstream reached as ns=localhost:5000 (GC must see it as mirrored)."""
    router = Router((LOCAL, HUB))
    r = router.route("app", "localhost:5000")
    assert r.key == "localhost:5000/app"
    assert router.route_stored(r.key) == r


def test_a_key_the_configuration_no_longer_routes_there_is_unrouted():
    """An upstream or pattern removed from the config: its stored keys route nowhere (GC keeps
    them as it keeps hosted content)."""
    assert Router((HUB,)).route_stored("ghcr.io/org/app") is None  # would be docker.io/ghcr.io/org/app
    assert Router((HUB,)).route_stored("myorg/app") is None  # would be docker.io/myorg/app
    assert Router(()).route_stored("myorg/app") is None
