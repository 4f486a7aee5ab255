"""Pure platform selection: which child manifests of an index an image needs.

``--platform`` is ``all`` (every child, attestations included) or a comma-separated list
of ``os/arch[/variant]``.  A platform without a variant matches every variant of its
os/arch (``linux/arm`` takes ``linux/arm/v6`` and ``linux/arm/v7``); with one, only that
variant (``linux/arm64`` and ``linux/arm64/v8`` are the same, as containerd treats them).
A child without a platform (or Docker's ``unknown/unknown`` attestation manifests) is
taken only with ``all``.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import attrs

__all__ = [
    "ALL",
    "Platform",
    "PlatformChoice",
    "PlatformError",
    "host_platform",
    "parse_platforms",
    "platform_of",
    "select_children",
]

ALL = "all"

T = TypeVar("T")

#: ``uname -m`` → (GOARCH, variant), as containerd normalises them.
_MACHINES: Mapping[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
}


class PlatformError(ValueError):
    """A malformed ``--platform``, or an index with no child for the wanted platforms."""


@attrs.frozen
class Platform:
    """``os/architecture[/variant]``."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, other: Platform) -> bool:
        """Whether a child of platform ``other`` serves this (wanted) platform."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return self.variant is None or _variant(self) == _variant(other)


def _variant(p: Platform) -> str | None:
    # arm64 without a variant is v8 (containerd's normalisation)
    if p.architecture == "arm64" and p.variant is None:
        return "v8"
    return p.variant


@attrs.frozen
class PlatformChoice:
    """The wanted platforms; ``platforms`` is None for every child."""

    platforms: tuple[Platform, ...] | None

    def __str__(self) -> str:
        return ALL if self.platforms is None else ",".join(map(str, self.platforms))


def parse_platforms(text: str) -> PlatformChoice:
    """Parse ``all`` or ``os/arch[/variant],...``.

    Raises:
        PlatformError: naming the malformed entry.
    """
    if text.strip().lower() == ALL:
        return PlatformChoice(None)
    wanted = []
    for item in text.split(","):
        parts = item.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(p and p.replace("_", "").replace("-", "").isalnum() for p in parts):
            raise PlatformError(f"invalid platform {item.strip()[:100]!r}: expected os/arch[/variant] (e.g. linux/amd64) or all")
        wanted.append(Platform(*parts))
    return PlatformChoice(tuple(dict.fromkeys(wanted)))


def host_platform(machine: str | None = None) -> Platform:
    """``linux/<arch>`` of this machine (images for other systems run in a Linux VM)."""
    machine = (machine or _platform.machine()).lower()
    arch, variant = _MACHINES.get(machine, (machine, None))
    return Platform("linux", arch, variant)


def platform_of(p: object) -> Platform | None:
    """A descriptor's ``platform`` object as a :class:`Platform` (None if absent or malformed)."""
    if not isinstance(p, Mapping):
        return None
    os_name, arch, variant = p.get("os"), p.get("architecture"), p.get("variant")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        return None
    return Platform(os_name.lower(), arch.lower(), variant.lower() if isinstance(variant, str) and variant else None)


def _json_platform(descriptor: object) -> object:
    return descriptor.get("platform") if isinstance(descriptor, Mapping) else None


def select_children(children: Sequence[T], choice: PlatformChoice, platform: Callable[[T], object] = _json_platform) -> list[T]:
    """The children of an index that ``choice`` wants, in the index's order.

    ``children`` are descriptors (JSON objects by default; ``platform`` extracts the
    ``platform`` object of another kind).

    Raises:
        PlatformError: when a wanted platform has no child, naming the ones there are.
    """
    if choice.platforms is None:
        return list(children)
    platforms = [platform_of(platform(d)) for d in children]
    wanted: set[int] = set()
    for want in choice.platforms:
        found = {i for i, p in enumerate(platforms) if p is not None and want.matches(p)}
        if not found:
            have = sorted({str(p) for p in platforms if p is not None and p.os != "unknown"})
            raise PlatformError(f"the index has no manifest for {want} (it has {', '.join(have) or 'no platforms'})")
        wanted |= found
    return [d for i, d in enumerate(children) if i in wanted]
