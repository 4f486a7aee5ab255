"""Pure OCI image-layout logic: descriptors, what an image consists of, ``index.json``.

An OCI image layout (image-spec ``image-layout.md``) is ``oci-layout``, ``index.json``
and ``blobs/<alg>/<encoded>``.  ``index.json`` lists the top-level manifests; each
carries its name in the annotation ``org.opencontainers.image.ref.name`` — here the full
reference (``docker.io/library/hello:latest``), which is what skopeo's
``oci-archive:FILE:REF`` looks up — and in containerd's ``io.containerd.image.name``.

skopeo (containers/image) only takes OCI media types from ``index.json``, so a Docker
schema 2 manifest or manifest list is listed under its OCI counterpart (the image-spec's
compatibility matrix pairs them).  The manifest's bytes, and so its digest, are the
mirror's; and its own ``mediaType`` field still says what it is, which is what the
manifest parser (:func:`mirror.core.manifest.parse_manifest`) returns for such a pair:
an import restores the Docker type.

:func:`image_closure` walks an image from its top descriptor through an index's
children to every config and layer, reading manifests and sizes through callables, so
the same walk checks the store on export and the staged archive on import.  The spec
allows a layout to lack some blobs; the one case that arises here is an index whose
other platforms were never fetched: such children are left out (listed in
``missing_children``), every other gap is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence

import attrs

from mirror.core.errors import RegistryError
from mirror.core.manifest import OCI_COUNTERPART, SCHEMA1_TYPES, Descriptor, Manifest, parse_descriptor, parse_manifest
from mirror.core.oci import OCI_INDEX, Digest, parse_digest

__all__ = [
    "CONTAINERD_NAME",
    "LAYOUT_FILE",
    "REF_NAME",
    "Descriptor",
    "ImageClosure",
    "LayoutError",
    "blob_member",
    "build_index",
    "check_layout_file",
    "descriptor",
    "image_closure",
    "image_name",
    "index_media_type",
    "layout_manifest",
    "parse_blob_member",
    "parse_index",
]

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'

_BLOB_MEMBER_RE = re.compile(r"blobs/([^/]+)/([^/]+)")


class LayoutError(ValueError):
    """A layout or image that is malformed or incomplete; ``str()`` is one line."""


def descriptor(obj: object, where: str) -> Descriptor:
    """Check and convert a descriptor's JSON (all of its required fields); ``where`` names it."""
    try:
        return parse_descriptor(obj, where)
    except RegistryError as e:
        raise LayoutError(e.message) from None


def index_media_type(media_type: str) -> str:
    """The media type ``index.json`` lists a manifest under (see the module docstring)."""
    return OCI_COUNTERPART.get(media_type, media_type)


def layout_manifest(data: bytes, declared: str | None = None) -> Manifest:
    """Parse a manifest that goes into (or comes from) a layout; schema 1 has no
    descriptors and cannot."""
    try:
        manifest = parse_manifest(data, declared)
    except RegistryError as e:
        raise LayoutError(e.message) from None
    if manifest.media_type in SCHEMA1_TYPES:
        raise LayoutError("Docker schema 1 manifests cannot go into an OCI layout")
    return manifest


@attrs.frozen
class ImageClosure:
    """Everything one image (a tag) consists of that is present."""

    top: Descriptor
    manifests: tuple[Descriptor, ...]  # the top first, then the children present (media types set)
    blobs: tuple[Descriptor, ...]  # configs and layers, each once
    missing_children: tuple[Descriptor, ...] = ()  # an index's children that are not present

    @property
    def digests(self) -> Iterator[Digest]:
        """Every digest of the image: manifests, then blobs."""
        for d in (*self.manifests, *self.blobs):
            yield d.digest


async def image_closure(
    top: Descriptor,
    read_manifest: Callable[[Digest], Awaitable[bytes | None]],
    blob_size: Callable[[Digest], Awaitable[int | None]],
    *,
    strict: bool,
) -> ImageClosure:
    """Walk an image from ``top``, checking every digest and size.

    ``read_manifest`` returns a manifest's bytes (``None`` if absent); ``blob_size`` a
    blob's size (``None`` if absent); both are awaited, so the walk itself does no I/O.
    An index's absent children are left out.  With ``strict`` (import) a present child
    must be whole; without (export), a child whose blobs are not all present is left out
    as well: a store may hold a child manifest whose layers were never all fetched.

    Raises:
        LayoutError: the top manifest or a blob of a kept manifest is absent, a size or
            digest does not match, or no child of an index is present.
    """
    manifests: list[Descriptor] = []
    blobs: dict[Digest, Descriptor] = {}
    missing: list[Descriptor] = []

    async def read(d: Descriptor) -> Manifest | None:
        data = await read_manifest(d.digest)
        if data is None:
            return None
        if len(data) != d.size or not d.digest.matches(data):
            raise LayoutError(f"manifest {d.digest}: its size or digest does not match its descriptor")
        try:
            return layout_manifest(data, d.media_type)
        except LayoutError as e:
            raise LayoutError(f"manifest {d.digest}: {e}") from None

    async def image_blobs(d: Descriptor, content: Manifest) -> list[Descriptor]:
        for b in content.blobs:
            size = await blob_size(b.digest)
            if size is None:
                raise LayoutError(f"blob {b.digest} of manifest {d.digest} is missing")
            if size != b.size:
                raise LayoutError(f"blob {b.digest} of manifest {d.digest} is {size} bytes, its descriptor says {b.size}")
        return list(content.blobs)

    async def walk(d: Descriptor, content: Manifest, depth: int) -> None:
        manifests.append(attrs.evolve(d, media_type=content.media_type))
        if not content.is_index:
            for b in await image_blobs(d, content):
                blobs.setdefault(b.digest, b)
            return
        if depth > 4:
            raise LayoutError(f"index {d.digest} nests indexes too deep")
        kept = 0
        for child in content.children:
            child_content = await read(child)
            if child_content is None:
                missing.append(child)
                continue
            if not strict:
                try:
                    # a child whose blobs are not all present is left out, like an absent one
                    for sub in await _leaves(child, child_content, read):
                        await image_blobs(*sub)
                except LayoutError:
                    missing.append(child)
                    continue
            await walk(child, child_content, depth + 1)
            kept += 1
        if not kept:
            raise LayoutError(f"none of the {len(content.children)} manifests of index {d.digest} is present")

    content = await read(top)
    if content is None:
        raise LayoutError(f"manifest {top.digest} is missing")
    await walk(top, content, 0)
    return ImageClosure(attrs.evolve(top, media_type=content.media_type), tuple(manifests), tuple(blobs.values()), tuple(missing))


async def _leaves(
    d: Descriptor, content: Manifest, read: Callable[[Descriptor], Awaitable[Manifest | None]]
) -> list[tuple[Descriptor, Manifest]]:
    """The image manifests under ``d`` (itself, or a nested index's present children)."""
    if not content.is_index:
        return [(d, content)]
    found = []
    for child in content.children:
        sub = await read(child)
        if sub is not None:
            found += await _leaves(child, sub, read)
    return found


# index.json ---------------------------------------------------------------------------------
def build_index(entries: Sequence[tuple[Descriptor, str]]) -> bytes:
    """``index.json`` listing each top descriptor under its full reference name (Docker
    types under their OCI counterparts)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            attrs.evolve(d, media_type=index_media_type(d.media_type)).to_json({REF_NAME: name, CONTAINERD_NAME: name})
            for d, name in entries
        ],
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def parse_index(data: bytes) -> list[Descriptor]:
    """The descriptors ``index.json`` lists (with their annotations).

    ``index.json`` is an OCI image index, held to what a registry accepts from a push
    (schemaVersion 2, complete descriptors): the manifest parser decides.
    """
    try:
        return list(parse_manifest(data, OCI_INDEX, push=True, what="index.json").children)
    except RegistryError as e:
        raise LayoutError(e.message if e.message.startswith("index.json") else f"index.json: {e.message}") from None


def image_name(d: Descriptor) -> str | None:
    """The full image reference an ``index.json`` entry is for, or None when it has none.

    containerd's ``io.containerd.image.name`` first, then ``ref.name`` when it is a full
    reference (``hello:latest``, ``docker.io/library/hello:latest``) — a bare tag
    (``latest``, as ``skopeo copy ... oci-archive:F:latest`` writes) names no repository.
    """
    for key in (CONTAINERD_NAME, REF_NAME):
        value = d.annotations.get(key)
        if isinstance(value, str) and (key == CONTAINERD_NAME or any(c in value for c in "/:@")):
            return value
    return None


def check_layout_file(data: bytes) -> None:
    """Check ``oci-layout``: ``{"imageLayoutVersion": "1.x"}``."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        doc = None
    version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise LayoutError("oci-layout is not an OCI image layout version 1 file")


def blob_member(digest: Digest) -> str:
    """The archive member name of a blob: ``blobs/sha256/<hex>``."""
    return f"blobs/{digest.algorithm}/{digest.encoded}"


def parse_blob_member(name: str) -> Digest | None:
    """The digest a ``blobs/<alg>/<encoded>`` member holds; None for other members.

    Raises:
        LayoutError: for a malformed or unverifiable blob name.
    """
    match = _BLOB_MEMBER_RE.fullmatch(name)
    if match is None:
        return None
    try:
        return parse_digest(f"{match.group(1)}:{match.group(2)}")
    except RegistryError as e:
        raise LayoutError(f"{name}: {e.message}") from None
