"""Unit tests of image-reference parsing (mirror.core.imageref): Docker's grammar, and where the
mirror keeps each reference."""

import pytest

from mirror.config import UpstreamConfig
from mirror.core.errors import RegistryError
from mirror.core.imageref import ImageRefError, full_reference, parse_image_ref
from mirror.core.oci import Digest
from mirror.core.routing import Router

SHA = "sha256:" + "ab" * 32
HUB = UpstreamConfig(registry="docker.io", url="http://127.0.0.1:9")
GHCR = UpstreamConfig(registry="ghcr.io", url="http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("text", "registry", "name", "reference"),
    [
        ("alpine", None, "alpine", "latest"),
        ("alpine:3.19", None, "alpine", "3.19"),
        ("library/alpine:3.19", None, "library/alpine", "3.19"),
        ("docker.io/library/alpine@" + SHA, "docker.io", "library/alpine", SHA),
        ("docker.io/alpine", "docker.io", "alpine", "latest"),
        ("index.docker.io/library/alpine", "docker.io", "library/alpine", "latest"),
        ("ghcr.io/org/app:tag", "ghcr.io", "org/app", "tag"),
        ("GHCR.io/org/app:v1.2_rc-3", "ghcr.io", "org/app", "v1.2_rc-3"),
        ("localhost/app", "localhost", "app", "latest"),
        ("registry.local:5000/team/app:1", "registry.local:5000", "team/app", "1"),
        ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest"),
        ("alpine:3.19@" + SHA, None, "alpine", SHA),  # the digest decides, as for docker pull
        ("  alpine:3.19\n", None, "alpine", "3.19"),
    ],
)
def test_references_parse_into_name_ns_and_reference(text, registry, name, reference):
    """Each reference form gives the registry (the mirror's ?ns=), the name and the reference."""
    ref = parse_image_ref(text)
    assert (ref.registry, ref.ns, ref.name, ref.reference) == (registry, registry, name, reference)
    assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Library/Alpine", "lower case"),
        ("alpine:", "not a valid tag"),
        ("alpine:-x", "not a valid tag"),
        ("alpine@sha256:123", "invalid sha256 digest"),
        ("alpine@md5:" + "a" * 32, "unsupported digest algorithm"),
        ("docker.io/", "names no repository"),
        ("a b", "white space"),
        ("foo..bar/app", "not a registry host"),
        ("alpine/../etc", "not a valid repository name"),
        ("-alpine", "not a valid repository name"),
    ],
)
def test_malformed_references_name_themselves_and_the_problem(text, why):
    """A malformed reference is an ImageRefError quoting it and saying what is wrong."""
    with pytest.raises(ImageRefError) as info:
        parse_image_ref(text)
    assert f"invalid image reference {text!r}" in str(info.value)
    assert why in str(info.value)


def test_an_image_reference_routes_to_where_the_mirror_keeps_it():
    """No registry: the first upstream (library/ on Docker Hub) or a hosted pattern; a
    registry: that upstream, or NAME_UNKNOWN when none is configured."""
    upstreams = (HUB, GHCR)
    assert route_ref(parse_image_ref("alpine"), upstreams, ()).key == "docker.io/library/alpine"
    assert route_ref(parse_image_ref("docker.io/alpine"), upstreams, ()).key == "docker.io/library/alpine"
    assert route_ref(parse_image_ref("ghcr.io/org/app:1"), upstreams, ()).key == "ghcr.io/org/app"
    r = route_ref(parse_image_ref("myorg/app:1"), upstreams, ("myorg/*",))
    assert r.hosted and r.key == "myorg/app"
    with pytest.raises(RegistryError) as info:
        route_ref(parse_image_ref("quay.io/org/app"), upstreams, ())
    assert info.value.code == "NAME_UNKNOWN" and "quay.io" in info.value.message


def test_full_reference():
    """A stored image's full reference: repository key plus :tag or @digest."""
    digest = Digest("sha256", "ab" * 32)
    assert full_reference("docker.io/library/hello", "latest") == "docker.io/library/hello:latest"
    assert full_reference("docker.io/library/hello", None, digest) == f"docker.io/library/hello@{SHA}"
    with pytest.raises(ValueError):
        full_reference("docker.io/library/hello")


def route_ref(ref, upstreams, hosted):
    """Where the mirror keeps an image reference: the router, asked as containerd asks."""
    return Router(upstreams, hosted).route(ref.name, ref.ns)
