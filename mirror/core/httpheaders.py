"""Pure parsing of the request headers the registry API depends on: Accept and Range.

Real clients send ``Accept`` as several header lines (docker in random order) or one
comma-joined line (containerd); :func:`parse_accept` takes every line and merges them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import attrs

from mirror.core.errors import RegistryError

__all__ = ["ByteRange", "accepts", "parse_accept", "parse_range"]


def parse_accept(lines: Iterable[bytes | str] | None) -> list[str]:
    """Media types named by all ``Accept`` lines, in order, without parameters or duplicates."""
    types: list[str] = []
    for line in lines or ():
        text = line.decode("latin-1") if isinstance(line, bytes) else line
        for item in text.split(","):
            media_type = item.split(";", 1)[0].strip().lower()
            if media_type and media_type not in types:
                types.append(media_type)
    return types


def accepts(accept: Sequence[str], media_type: str) -> bool:
    """Whether a client that sent ``accept`` takes ``media_type``.

    No ``Accept`` at all means anything goes, as do ``*/*`` and ``type/*``.
    """
    if not accept:
        return True
    major = media_type.split("/", 1)[0]
    return any(a in (media_type, "*/*", f"{major}/*") for a in accept)


@attrs.frozen
class ByteRange:
    """An inclusive byte range ``first..last`` of a resource of ``size`` bytes."""

    first: int
    last: int
    size: int

    @property
    def length(self) -> int:
        """Number of bytes in the range."""
        return self.last - self.first + 1

    def content_range(self) -> str:
        """The ``Content-Range`` value for a 206 answer."""
        return f"bytes {self.first}-{self.last}/{self.size}"


_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Parse a single-range ``Range`` header against a resource of ``size`` bytes.

    Returns ``None`` when there is no header, or when it is one we may ignore by RFC 9110
    (another unit, or several ranges: the whole resource is then served).

    Raises:
        RegistryError: ``RANGE_INVALID`` (416) for a syntactically broken or
            unsatisfiable range; the error carries ``Content-Range: bytes */size``.
    """
    if header is None:
        return None
    header = header.strip()
    if not header.startswith("bytes=") or "," in header:
        return None
    unsatisfiable = RegistryError(
        "RANGE_INVALID",
        f"range {header[:64]!r} not satisfiable for {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
    match = _RANGE_RE.fullmatch(header.replace(" ", ""))
    if match is None or match.groups() == ("", ""):
        raise unsatisfiable
    first_text, last_text = match.groups()
    if first_text == "":  # suffix range: the last N bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise unsatisfiable
        return ByteRange(max(0, size - suffix), size - 1, size)
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last < first or first >= size:
        raise unsatisfiable
    return ByteRange(first, min(last, size - 1), size)
