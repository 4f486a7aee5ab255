"""Pure OCI image-layout logic: descriptors, what an image consists of, ``index.json``.

An OCI image layout (image-spec ``image-layout.md``) is ``oci-layout``, ``index.json``
and ``blobs/<alg>/<encoded>``.  ``index.json`` lists the top-level manifests; each
carries its name in the annotation ``org.opencontainers.image.ref.name`` — here the full
reference (``docker.io/library/hello:latest``), which is what skopeo's
``oci-archive:FILE:REF`` looks up — and in containerd's ``io.containerd.image.name``.

skopeo (containers/image) only takes OCI media types from ``index.json``, so a Docker
schema 2 manifest or manifest list is listed under its OCI counterpart (the image-spec's
compatibility matrix pairs them).  The manifest's bytes, and so its digest, are the
mirror's; and its own ``mediaType`` field still says what it is, which is what
:func:`manifest_media_type` returns for such a pair: an import restores the Docker type.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from mirror.errors import RegistryError
from mirror.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    is_index,
    parse_digest,
    parse_manifest,
)

__all__ = [
    "CONTAINERD_NAME",
    "LAYOUT_FILE",
    "REF_NAME",
    "Descriptor",
    "ImageClosure",
    "LayoutError",
    "ManifestContent",
    "blob_member",
    "build_index",
    "check_layout_file",
    "descriptor",
    "image_closure",
    "image_name",
    "index_media_type",
    "manifest_content",
    "manifest_media_type",
    "parse_blob_member",
    "parse_index",
]

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'

_BLOB_MEMBER_RE = re.compile(r"blobs/([^/]+)/([^/]+)")


class LayoutError(ValueError):
    """A layout or image that is malformed or incomplete; ``str()`` is one line."""


@attrs.frozen
class Descriptor:
    """An OCI content descriptor (the fields this module uses, plus the rest verbatim)."""

    media_type: str
    digest: Digest
    size: int
    extra: Mapping[str, Any] = attrs.field(factory=dict, eq=False)  # platform, annotations, ...

    @property
    def annotations(self) -> Mapping[str, str]:
        value = self.extra.get("annotations")
        return value if isinstance(value, Mapping) else {}

    def to_json(self, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        doc.update((k, v) for k, v in self.extra.items() if k not in doc and k != "annotations")
        merged = {**self.annotations, **(annotations or {})}
        if merged:
            doc["annotations"] = merged
        return doc


def descriptor(obj: object, where: str) -> Descriptor:
    """Check and convert a descriptor's JSON; ``where`` names it in errors."""
    if not isinstance(obj, dict):
        raise LayoutError(f"{where}: not a descriptor object")
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise LayoutError(f"{where}: descriptor without a mediaType")
    if not isinstance(digest, str):
        raise LayoutError(f"{where}: descriptor without a digest")
    try:
        parsed = parse_digest(digest)
    except RegistryError as e:
        raise LayoutError(f"{where}: {e.message}") from None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise LayoutError(f"{where}: descriptor of {digest} without a valid size")
    extra = {k: v for k, v in obj.items() if k not in ("mediaType", "digest", "size")}
    return Descriptor(media_type, parsed, size, extra)


def _non_distributable(d: Descriptor) -> bool:
    """Foreign / non-distributable layers live at their ``urls``, never in a registry."""
    return "foreign" in d.media_type or "nondistributable" in d.media_type


@attrs.frozen
class ManifestContent:
    """What one manifest points at."""

    media_type: str
    children: tuple[Descriptor, ...] = ()  # an index's manifests
    blobs: tuple[Descriptor, ...] = ()  # an image's config and (distributable) layers


#: Docker manifest types and the OCI types ``index.json`` lists them under.
_OCI_COUNTERPART = {DOCKER_MANIFEST: OCI_MANIFEST, DOCKER_MANIFEST_LIST: OCI_INDEX}


def index_media_type(media_type: str) -> str:
    """The media type ``index.json`` lists a manifest under (see the module docstring)."""
    return _OCI_COUNTERPART.get(media_type, media_type)


def manifest_media_type(doc: Mapping[str, object], declared: str | None = None) -> str:
    """A manifest's media type: ``declared`` (from a descriptor or Content-Type) when it
    names a manifest type, else the document's ``mediaType``, else inferred (OCI).  A
    Docker document declared as its OCI counterpart is of its own (Docker) type.

    Raises:
        LayoutError: when ``declared`` and the document's field disagree otherwise, or
            neither says and the shape is not a manifest's.
    """
    field = doc.get("mediaType")
    if declared is not None and isinstance(field, str) and field != declared:
        if _OCI_COUNTERPART.get(field) == declared:
            return field
        raise LayoutError(f"the descriptor says {declared} but the manifest says {field}")
    if declared in MANIFEST_MEDIA_TYPES:
        return declared
    if isinstance(field, str) and field in MANIFEST_MEDIA_TYPES:
        return field
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc:
        return OCI_MANIFEST
    raise LayoutError(f"not a manifest of a known type ({declared or field or 'no mediaType'})")


def manifest_content(data: bytes, declared: str | None = None) -> ManifestContent:
    """Parse a manifest and list what it points at (schema 1 has no descriptors: refused)."""
    try:
        doc = parse_manifest(data)
    except RegistryError as e:
        raise LayoutError(e.message) from None
    if "fsLayers" in doc or declared in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
        raise LayoutError("Docker schema 1 manifests cannot go into an OCI layout")
    media_type = manifest_media_type(doc, declared)
    if is_index(media_type):
        items = doc.get("manifests")
        if not isinstance(items, list):
            raise LayoutError("an index without a manifests list")
        return ManifestContent(media_type, children=tuple(descriptor(m, f"manifests[{i}]") for i, m in enumerate(items)))
    config = doc.get("config")
    layers = doc.get("layers", [])
    if not isinstance(layers, list):
        raise LayoutError("layers is not a list")
    blobs = [descriptor(config, "config")] if config is not None else []
    blobs += [d for i, layer in enumerate(layers) if not _non_distributable(d := descriptor(layer, f"layers[{i}]"))]
    return ManifestContent(media_type, blobs=tuple(dict.fromkeys(blobs)))


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


def image_closure(
    top: Descriptor,
    read_manifest: Callable[[Digest], bytes | None],
    blob_size: Callable[[Digest], int | None],
    *,
    strict: bool,
) -> ImageClosure:
    """Walk an image from ``top``, checking every digest and size.

    ``read_manifest`` returns a manifest's bytes (``None`` if absent); ``blob_size`` a
    blob's size (``None`` if absent).  An index's absent children are left out.  With
    ``strict`` (import) a present child must be whole; without (export), a child whose
    blobs are not all present is left out as well: a store may hold a child manifest
    whose layers were never all fetched.

    Raises:
        LayoutError: the top manifest or a blob of a kept manifest is absent, a size or
            digest does not match, or no child of an index is present.
    """
    manifests: list[Descriptor] = []
    blobs: dict[Digest, Descriptor] = {}
    missing: list[Descriptor] = []

    def read(d: Descriptor) -> ManifestContent | None:
        data = read_manifest(d.digest)
        if data is None:
            return None
        if len(data) != d.size or not d.digest.matches(data):
            raise LayoutError(f"manifest {d.digest}: its size or digest does not match its descriptor")
        try:
            return manifest_content(data, d.media_type)
        except LayoutError as e:
            raise LayoutError(f"manifest {d.digest}: {e}") from None

    def image_blobs(d: Descriptor, content: ManifestContent) -> list[Descriptor]:
        for b in content.blobs:
            size = blob_size(b.digest)
            if size is None:
                raise LayoutError(f"blob {b.digest} of manifest {d.digest} is missing")
            if size != b.size:
                raise LayoutError(f"blob {b.digest} of manifest {d.digest} is {size} bytes, its descriptor says {b.size}")
        return list(content.blobs)

    def walk(d: Descriptor, content: ManifestContent, depth: int) -> None:
        manifests.append(attrs.evolve(d, media_type=content.media_type))
        if not is_index(content.media_type):
            for b in image_blobs(d, content):
                blobs.setdefault(b.digest, b)
            return
        if depth > 4:
            raise LayoutError(f"index {d.digest} nests indexes too deep")
        kept = 0
        for child in content.children:
            child_content = read(child)
            if child_content is None:
                missing.append(child)
                continue
            if not strict:
                try:
                    # a child whose blobs are not all present is left out, like an absent one
                    for sub in _leaves(child, child_content, read):
                        image_blobs(*sub)
                except LayoutError:
                    missing.append(child)
                    continue
            walk(child, child_content, depth + 1)
            kept += 1
        if not kept:
            raise LayoutError(f"none of the {len(content.children)} manifests of index {d.digest} is present")

    content = read(top)
    if content is None:
        raise LayoutError(f"manifest {top.digest} is missing")
    walk(top, content, 0)
    return ImageClosure(attrs.evolve(top, media_type=content.media_type), tuple(manifests), tuple(blobs.values()), tuple(missing))


def _leaves(
    d: Descriptor, content: ManifestContent, read: Callable[[Descriptor], ManifestContent | None]
) -> Iterator[tuple[Descriptor, ManifestContent]]:
    """The image manifests under ``d`` (itself, or a nested index's present children)."""
    if not is_index(content.media_type):
        yield d, content
        return
    for child in content.children:
        sub = read(child)
        if sub is not None:
            yield from _leaves(child, sub, read)


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
    """The descriptors ``index.json`` lists (with their annotations)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise LayoutError(f"index.json is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2 or not isinstance(doc.get("manifests"), list):
        raise LayoutError("index.json is not an OCI image index (schemaVersion 2 with a manifests list)")
    return [descriptor(m, f"index.json manifests[{i}]") for i, m in enumerate(doc["manifests"])]


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
