"""Pure parsing of image references the way users write them.

``alpine``, ``library/alpine:3.19``, ``docker.io/library/alpine@sha256:...``,
``ghcr.io/org/app:tag``, ``registry.local:5000/team/app``: Docker's grammar.  The first
path component is a registry host when it contains a ``.`` or a ``:`` or is
``localhost``; the rest is the repository; then an optional ``:tag`` and an optional
``@digest`` (with both, the digest decides, as for ``docker pull``).

The mirror is then asked for the image the way containerd asks a mirror: the repository
as the name and the registry as ``?ns=``.  So ``ghcr.io/org/app`` goes to the ``ghcr.io``
upstream (or fails clearly when none is configured), and a reference without a registry
goes where the mirror sends any such name: a hosted repository, else the first upstream
(``library/`` added on Docker Hub): ``Router.route(ref.name, ref.ns)``
(:mod:`mirror.core.routing`) is that routing.
"""

from __future__ import annotations

import re

import attrs

from mirror.core.errors import RegistryError
from mirror.core.oci import Digest, parse_digest, validate_name, validate_tag

__all__ = ["ImageRef", "ImageRefError", "full_reference", "parse_image_ref"]

# A host name or IPv4 address, optionally with a port ([IPv6] too).
_HOST_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:]+\])(?::[0-9]+)?")

#: Docker's legacy name for Docker Hub, normalised as docker does.
_ALIASES = {"index.docker.io": "docker.io"}


class ImageRefError(ValueError):
    """A malformed image reference; ``str()`` names it and says what is wrong."""


@attrs.frozen
class ImageRef:
    """A parsed image reference."""

    text: str  # as the user wrote it
    registry: str | None  # the registry host, when the reference names one
    name: str  # the repository as the mirror is asked for it (``alpine``, ``library/alpine``)
    tag: str | None = None
    digest: Digest | None = None

    @property
    def ns(self) -> str | None:
        """The ``?ns=`` the mirror is asked with (the registry, if named)."""
        return self.registry

    @property
    def reference(self) -> str:
        """The manifest reference to ask for: the digest, else the tag, else ``latest``."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or "latest"

    def __str__(self) -> str:
        return self.text


def parse_image_ref(text: str) -> ImageRef:
    """Parse ``[registry/]repository[:tag][@digest]``.

    Raises:
        ImageRefError: naming the reference and what is wrong with it.
    """

    def bad(why: str) -> ImageRefError:
        return ImageRefError(f"invalid image reference {text[:200]!r}: {why}")

    stripped = text.strip()
    if not stripped:
        raise bad("it is empty")
    if any(c.isspace() for c in stripped):
        raise bad("it contains white space")
    name_tag, at, digest_text = stripped.partition("@")
    digest = None
    if at:
        try:
            digest = parse_digest(digest_text)
        except RegistryError as e:
            raise bad(e.message) from None
    name, tag = name_tag, None
    colon = name_tag.rfind(":")
    if colon > name_tag.rfind("/"):
        name, tag = name_tag[:colon], name_tag[colon + 1 :]
        try:
            validate_tag(tag)
        except RegistryError:
            raise bad(f"{tag[:150]!r} is not a valid tag") from None
    registry = None
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry = first.lower()
        if _HOST_RE.fullmatch(registry) is None:
            raise bad(f"{first[:100]!r} is not a registry host")
        registry = _ALIASES.get(registry, registry)
        name = rest
    if not name:
        raise bad("it names no repository")
    try:
        validate_name(name)
    except RegistryError:
        why = "repository names are lower case" if name != name.lower() else f"{name[:150]!r} is not a valid repository name"
        raise bad(why) from None
    return ImageRef(text=text, registry=registry, name=name, tag=tag, digest=digest)


def full_reference(repo_key: str, tag: str | None = None, digest: Digest | None = None) -> str:
    """The full reference of a stored image: ``docker.io/library/hello:latest`` (a tag) or
    ``docker.io/library/hello@sha256:...`` (a digest)."""
    if tag is not None:
        return f"{repo_key}:{tag}"
    if digest is None:
        raise ValueError("a full reference needs a tag or a digest")
    return f"{repo_key}@{digest}"
