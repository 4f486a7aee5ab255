"""Unit tests of routing names (and containerd's ns=) to upstreams."""

import pytest

from mirror.config import UpstreamConfig
from mirror.errors import RegistryError
from mirror.routing import route

HUB = UpstreamConfig(registry="docker.io", url="https://registry-1.docker.io")
GHCR = UpstreamConfig(registry="ghcr.io", url="https://ghcr.io")
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
    r = route(name, ns, UPSTREAMS)
    assert (r.upstream.registry, r.remote_name, r.repo_key) == (upstream, remote, key)


def test_ns_is_not_part_of_the_cache_key():
    """The same image with and without ns= has one cache key."""
    assert route("library/alpine", "docker.io", UPSTREAMS).repo_key == route("library/alpine", None, UPSTREAMS).repo_key


def test_unknown_ns_is_a_clear_error():
    """An ns= no upstream serves is NAME_UNKNOWN, naming the registry."""
    with pytest.raises(RegistryError) as info:
        route("org/app", "quay.io", UPSTREAMS)
    assert info.value.code == "NAME_UNKNOWN"
    assert "quay.io" in info.value.message


def test_no_upstreams():
    """With no upstreams a name cannot be mirrored."""
    with pytest.raises(RegistryError) as info:
        route("a/b", None, ())
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
    r = route(name, ns, UPSTREAMS, hosted)
    assert (("hosted" if r.hosted else r.upstream.registry), r.repo_key) == expected


def test_pure_private_registry_has_no_upstream():
    """hosted: ['*'] with no upstreams serves every name as hosted."""
    assert route("a/b", None, (), ("*",)).hosted
