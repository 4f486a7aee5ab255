"""Pure OCI grammar: digests, repository names, tags, references, manifest media types.

Manifests themselves are parsed in :mod:`mirror.core.manifest`.

Everything here is a pure function of its input.  The regular expressions are the
OCI Distribution Specification's ("Pulling manifests" / "Workflow categories") and
the image-spec's digest grammar; a name, tag or digest that passes these checks can be
used as a path component without further escaping (no ``..``, no ``/`` in a
component, no upper case).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Protocol

import attrs

from mirror.core.errors import RegistryError

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_MEDIA_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Digest",
    "Hasher",
    "Reference",
    "is_index",
    "parse_digest",
    "parse_reference",
    "validate_name",
    "validate_tag",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

#: Every manifest type we fetch, store and serve verbatim, in preference order.
MANIFEST_MEDIA_TYPES: tuple[str, ...] = (
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1_SIGNED,
    DOCKER_SCHEMA1,
)
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

#: Distribution's limit on a whole repository name.
NAME_MAX_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")


class Hasher(Protocol):
    """A running hash (what :mod:`hashlib` constructors return)."""

    @property
    def name(self) -> str: ...

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


#: Algorithms we can verify, with the exact shape of their encoded part.
_ALGORITHMS: dict[str, tuple[Callable[..., Hasher], re.Pattern[str]]] = {
    "sha256": (hashlib.sha256, re.compile(r"[a-f0-9]{64}")),
    "sha512": (hashlib.sha512, re.compile(r"[a-f0-9]{128}")),
}


@attrs.frozen
class Digest:
    """A validated content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    encoded: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"

    def hasher(self) -> Hasher:
        """A fresh hash object of this digest's algorithm."""
        return _ALGORITHMS[self.algorithm][0]()

    def matches(self, data: bytes) -> bool:
        """True when ``data`` hashes to this digest."""
        h = self.hasher()
        h.update(data)
        return h.hexdigest() == self.encoded

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(algorithm, _ALGORITHMS[algorithm][0](data).hexdigest())


def parse_digest(text: str) -> Digest:
    """Parse and check a digest string.

    Raises:
        RegistryError: ``DIGEST_INVALID`` for a malformed digest or an algorithm we
            cannot verify (the registry could never check such content).
    """
    match = _DIGEST_RE.fullmatch(text)
    if match is None:
        raise RegistryError("DIGEST_INVALID", f"invalid digest {text[:150]!r}")
    algorithm, encoded = match.groups()
    known = _ALGORITHMS.get(algorithm)
    if known is None:
        raise RegistryError("DIGEST_INVALID", f"unsupported digest algorithm {algorithm[:32]!r}")
    if known[1].fullmatch(encoded) is None:
        raise RegistryError("DIGEST_INVALID", f"invalid {algorithm} digest {text[:150]!r}")
    return Digest(algorithm, encoded)


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise ``NAME_INVALID``."""
    if len(name) > NAME_MAX_LENGTH:
        raise RegistryError("NAME_INVALID", f"repository name longer than {NAME_MAX_LENGTH} characters")
    if _NAME_RE.fullmatch(name) is None:
        raise RegistryError("NAME_INVALID", f"invalid repository name {name[:150]!r}")
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it matches the spec's tag grammar, else raise ``TAG_INVALID``."""
    if _TAG_RE.fullmatch(tag) is None:
        raise RegistryError("TAG_INVALID", f"invalid tag {tag[:150]!r}")
    return tag


@attrs.frozen
class Reference:
    """A manifest reference: exactly one of a tag or a digest."""

    tag: str | None = None
    digest: Digest | None = None

    def __str__(self) -> str:
        return self.tag if self.tag is not None else str(self.digest)


def parse_reference(text: str) -> Reference:
    """A manifest reference from the URL: a digest when it has a ``:``, else a tag."""
    if ":" in text:
        return Reference(digest=parse_digest(text))
    return Reference(tag=validate_tag(text))


def is_index(media_type: str) -> bool:
    """True for an OCI index or a Docker manifest list."""
    return media_type in INDEX_MEDIA_TYPES
