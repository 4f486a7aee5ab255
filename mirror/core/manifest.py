"""The one manifest parser: bytes and a declared type in, a :class:`Manifest` or the spec's error out.

Every caller goes through :func:`parse_manifest`: pull-through answers, pushes, OCI
layout archives (export and import), garbage-collection marking and ``mirror warm``.  So
what a manifest's media type is, what it references and which of its layers live
outside registries is decided here, once.

**Media type.**  ``declared`` is what the bytes came with: a ``Content-Type`` (push,
upstream answer), a descriptor's ``mediaType`` (``index.json``) or the type recorded
in the store.  When it names a manifest type it is the type, and the document's own
``mediaType`` field, if present, must agree; otherwise the field decides; otherwise the
shape does (``manifests`` → OCI index, ``config``/``layers`` → OCI image manifest,
``fsLayers`` → Docker schema 1).  One exception, outside pushes: a Docker document
declared as its OCI counterpart (``index.json`` lists Docker manifests that way, see
:mod:`mirror.core.ocilayout`) is of its own Docker type.

**Pushes** (``push=True``) are held to the image-spec: ``schemaVersion`` 2, an image
manifest has a ``config``, every descriptor has a ``mediaType`` and a ``size``, the
``Content-Type`` agrees with the field exactly, and Docker schema 1 is refused.
Manifests from upstreams and from the store are parsed leniently (a descriptor needs
only a digest; a missing or malformed ``size``, ``mediaType`` or ``subject`` is read as
absent; schema 1 is read), because the mirror serves them byte for byte and GC must
never lose what a stored manifest references.

**Non-distributable layers** ("foreign" layers: an OCI ``nondistributable`` layer type
or Docker's ``foreign`` type, with ``urls``) are fetched by clients from their URLs; a
registry need not hold them.  A layer of such a type without ``urls`` is an ordinary
layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from mirror.core.errors import RegistryError
from mirror.core.oci import (
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
)

__all__ = [
    "OCI_COUNTERPART",
    "Descriptor",
    "Manifest",
    "is_foreign_layer_type",
    "parse_descriptor",
    "parse_manifest",
]

SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

#: Docker manifest types and the OCI types they correspond to (image-spec compatibility).
OCI_COUNTERPART: Mapping[str, str] = {DOCKER_MANIFEST: OCI_MANIFEST, DOCKER_MANIFEST_LIST: OCI_INDEX}

_OCI_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable."
_DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign."


def is_foreign_layer_type(media_type: str) -> bool:
    """Whether a layer media type is a non-distributable (foreign) one."""
    return media_type.startswith((_OCI_NONDISTRIBUTABLE, _DOCKER_FOREIGN))


@attrs.frozen
class Descriptor:
    """An OCI content descriptor: the fields the registry uses, and the rest verbatim."""

    media_type: str
    digest: Digest
    size: int | None  # None only in leniently parsed manifests
    extra: Mapping[str, Any] = attrs.field(factory=dict, eq=False)  # platform, annotations, urls, ...

    @property
    def annotations(self) -> Mapping[str, str]:
        """The descriptor's annotations (empty if none)."""
        value = self.extra.get("annotations")
        return value if isinstance(value, Mapping) else {}

    @property
    def platform(self) -> object:
        """The descriptor's ``platform`` object, if any (an index's children)."""
        return self.extra.get("platform")

    @property
    def foreign(self) -> bool:
        """A non-distributable layer with ``urls``: clients fetch it from there."""
        urls = self.extra.get("urls")
        return is_foreign_layer_type(self.media_type) and isinstance(urls, list) and bool(urls)

    def to_json(self, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The descriptor as JSON, with ``annotations`` merged into its own."""
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest)}
        if self.size is not None:
            doc["size"] = self.size
        doc.update((k, v) for k, v in self.extra.items() if k not in doc and k != "annotations")
        merged = {**self.annotations, **(annotations or {})}
        if merged:
            doc["annotations"] = merged
        return doc


def _invalid(message: str) -> RegistryError:
    return RegistryError("MANIFEST_INVALID", message)


def parse_descriptor(obj: object, where: str, *, strict: bool = True) -> Descriptor:
    """Check and convert a descriptor's JSON; ``where`` names it in errors.

    ``strict`` requires a string ``mediaType`` and an integer ``size`` (the image-spec's
    REQUIRED fields); otherwise only the digest is required, and a malformed ``size`` or
    ``mediaType`` is read as absent.

    Raises:
        RegistryError: ``MANIFEST_INVALID`` naming ``where``.
    """
    if not isinstance(obj, dict):
        raise _invalid(f"{where}: not a descriptor object")
    media_type, digest_text, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(digest_text, str):
        raise _invalid(f"{where}: descriptor without a digest")
    try:
        digest = parse_digest(digest_text)
    except RegistryError as e:
        raise _invalid(f"{where}: {e.message}") from None
    if media_type is not None and not isinstance(media_type, str):
        if strict:
            raise _invalid(f"{where}: mediaType is not a string")
        media_type = None
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        if strict:
            raise _invalid(f"{where}: descriptor of {digest_text} has an invalid size")
        size = None
    if strict and not media_type:
        raise _invalid(f"{where}: descriptor without a mediaType")
    if strict and size is None:
        raise _invalid(f"{where}: descriptor of {digest_text} without a size")
    extra = {k: v for k, v in obj.items() if k not in ("mediaType", "digest", "size")}
    return Descriptor(media_type or "", digest, size, extra)


@attrs.frozen
class Manifest:
    """A parsed manifest: its type and everything it points at."""

    media_type: str
    config: Descriptor | None = None  # an image manifest's config
    layers: tuple[Descriptor, ...] = ()  # an image manifest's layers (schema 1: its fsLayers)
    children: tuple[Descriptor, ...] = ()  # an index's manifests
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: Mapping[str, Any] = attrs.field(factory=dict, eq=False)

    @property
    def is_index(self) -> bool:
        """An OCI index or a Docker manifest list."""
        return is_index(self.media_type)

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """What a registry must hold for this image: config and distributable layers, each once."""
        wanted: dict[Digest, Descriptor] = {}
        for d in (self.config, *self.layers):
            if d is not None and not d.foreign:
                wanted.setdefault(d.digest, d)
        return tuple(wanted.values())

    def references(self) -> Iterator[Digest]:
        """Every digest this manifest keeps alive: config, all layers, children (not the subject)."""
        if self.config is not None:
            yield self.config.digest
        for d in (*self.layers, *self.children):
            yield d.digest

    def referrer_descriptor(self, digest: Digest, size: int) -> dict[str, Any]:
        """This manifest's entry in its subject's referrers list (OCI 1.1)."""
        descriptor: dict[str, Any] = {"mediaType": self.media_type, "digest": str(digest), "size": size}
        artifact_type = self.artifact_type
        if artifact_type is None and self.config is not None:
            artifact_type = self.config.media_type or None
        if artifact_type is not None:
            descriptor["artifactType"] = artifact_type
        if self.annotations:
            descriptor["annotations"] = dict(self.annotations)
        return descriptor


def _media_type(doc: Mapping[str, object], declared: str | None, push: bool) -> str:
    field = doc.get("mediaType")
    if field is not None and not isinstance(field, str):
        raise _invalid("mediaType is not a string")
    declared = (declared or "").split(";", 1)[0].strip().lower() or None
    if declared not in MANIFEST_MEDIA_TYPES:
        declared = None
    if declared is not None and field is not None and field != declared:
        if not push and OCI_COUNTERPART.get(field) == declared:
            return field
        raise _invalid(f"declared as {declared} but the manifest's mediaType is {field}")
    if declared is not None:
        return declared
    if field in MANIFEST_MEDIA_TYPES:
        assert field is not None
        return field
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc or "layers" in doc:
        return OCI_MANIFEST
    if "fsLayers" in doc:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in doc else DOCKER_SCHEMA1
    raise _invalid(f"not a manifest of a known type ({field or 'no mediaType, no Content-Type naming one'})")


def _descriptors(doc: Mapping[str, object], key: str, strict: bool) -> tuple[Descriptor, ...]:
    items = doc.get(key, [])
    if not isinstance(items, list):
        raise _invalid(f"{key} is not a list")
    return tuple(parse_descriptor(item, f"{key}[{i}]", strict=strict) for i, item in enumerate(items))


def _schema1_layers(doc: Mapping[str, object]) -> tuple[Descriptor, ...]:
    layers = doc.get("fsLayers", [])
    if not isinstance(layers, list):
        raise _invalid("fsLayers is not a list")
    found = []
    for i, layer in enumerate(layers):
        blob_sum = layer.get("blobSum") if isinstance(layer, dict) else None
        if not isinstance(blob_sum, str):
            raise _invalid(f"fsLayers[{i}] has no blobSum")
        try:
            found.append(Descriptor("", parse_digest(blob_sum), None))
        except RegistryError as e:
            raise _invalid(f"fsLayers[{i}]: {e.message}") from None
    return tuple(found)


def _subject(obj: object, push: bool) -> Descriptor | None:
    if obj is None:
        return None
    try:
        return parse_descriptor(obj, "subject", strict=push)
    except RegistryError:
        if push:
            raise
        return None  # a stored or upstream manifest's broken subject: it refers to nothing


def parse_manifest(data: bytes, declared: str | None = None, *, push: bool = False, what: str = "manifest") -> Manifest:
    """Parse a manifest (see the module docstring for the rules).

    Args:
        data: the manifest's bytes.
        declared: the media type it came with (``Content-Type``, a descriptor's, or the
            store's), if any; parameters such as ``; charset=`` are ignored.
        push: hold it to what a registry accepts from a client.
        what: what the bytes are, in error messages (``index.json`` for a layout's).

    Raises:
        RegistryError: ``MANIFEST_INVALID`` saying what is wrong.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise _invalid(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise _invalid(f"{what} is not a JSON object")
    media_type = _media_type(doc, declared, push)
    if media_type in SCHEMA1_TYPES:
        if push:
            raise _invalid("Docker schema 1 manifests are not accepted; push schema 2 or OCI")
        return Manifest(media_type, layers=_schema1_layers(doc))
    if push and doc.get("schemaVersion") != 2:
        raise _invalid("schemaVersion must be 2")
    subject = _subject(doc.get("subject"), push)
    artifact_type = doc.get("artifactType")
    annotations = doc.get("annotations")
    common: dict[str, Any] = {
        "subject": subject,
        "artifact_type": artifact_type if isinstance(artifact_type, str) else None,
        "annotations": annotations if isinstance(annotations, dict) else {},
    }
    if is_index(media_type):
        if not isinstance(doc.get("manifests"), list):
            raise _invalid("an index needs a manifests list")
        return Manifest(media_type, children=_descriptors(doc, "manifests", push), **common)
    config = doc.get("config")
    if config is None and push:
        raise _invalid("an image manifest needs a config descriptor")
    return Manifest(
        media_type,
        config=parse_descriptor(config, "config", strict=push) if config is not None else None,
        layers=_descriptors(doc, "layers", push),
        **common,
    )
