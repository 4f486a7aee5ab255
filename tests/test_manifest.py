"""The one manifest parser (mirror.core.manifest): media type, what a manifest references,
foreign layers, and the stricter rules for pushes.

Every caller (pull-through, push, archives, GC, warm) goes through it, so the edge cases
the callers used to decide differently are pinned down here once.
"""

from __future__ import annotations

import json

import pytest

from mirror.core.errors import RegistryError
from mirror.core.manifest import Descriptor, parse_descriptor, parse_manifest
from mirror.core.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
)

CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "1" * 64, "size": 2}
LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "2" * 64, "size": 3}
FOREIGN = {
    "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "digest": "sha256:" + "f" * 64,
    "size": 9,
    "urls": ["https://example.com/layer"],
}
CHILD = {
    "mediaType": OCI_MANIFEST,
    "digest": "sha256:" + "3" * 64,
    "size": 4,
    "platform": {"os": "linux", "architecture": "amd64"},
}
SUBJECT = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "4" * 64, "size": 5}


def doc(**fields) -> bytes:
    return json.dumps({"schemaVersion": 2, **fields}).encode()


def invalid(data: bytes, declared: str | None = None, *, push: bool = False) -> str:
    with pytest.raises(RegistryError) as info:
        parse_manifest(data, declared, push=push)
    assert info.value.code == "MANIFEST_INVALID"
    return info.value.message


def test_image_manifest_references_config_layers_and_keeps_the_subject_apart():
    """Config, layers and an index's children are references; the subject is not (it is
    kept alive only by what refers to it)."""
    m = parse_manifest(doc(mediaType=OCI_MANIFEST, config=CONFIG, layers=[LAYER, FOREIGN], subject=SUBJECT))
    assert m.media_type == OCI_MANIFEST and not m.is_index
    assert [str(d) for d in m.references()] == [CONFIG["digest"], LAYER["digest"], FOREIGN["digest"]]
    assert m.subject is not None and str(m.subject.digest) == SUBJECT["digest"]
    index = parse_manifest(doc(mediaType=OCI_INDEX, manifests=[CHILD]))
    assert index.is_index and [str(d) for d in index.references()] == [CHILD["digest"]]
    assert index.children[0].platform == {"os": "linux", "architecture": "amd64"}


def test_blobs_a_registry_must_hold_leave_out_foreign_layers_and_repeats():
    """A foreign layer with urls lives at its urls; one without urls is ordinary; a repeated
    layer is listed once."""
    no_urls = {**FOREIGN, "urls": [], "digest": "sha256:" + "e" * 64}
    m = parse_manifest(doc(config=CONFIG, layers=[LAYER, FOREIGN, no_urls, LAYER]))
    assert [str(b.digest) for b in m.blobs] == [CONFIG["digest"], LAYER["digest"], no_urls["digest"]]
    oci_nondistributable = {**FOREIGN, "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"}
    assert parse_descriptor(oci_nondistributable, "x").foreign


@pytest.mark.parametrize("push", [False, True])
def test_declared_type_wins_when_the_document_agrees_or_says_nothing(push):
    assert parse_manifest(doc(mediaType=DOCKER_MANIFEST, config=CONFIG), DOCKER_MANIFEST, push=push).media_type == DOCKER_MANIFEST
    assert parse_manifest(doc(config=CONFIG), f"{DOCKER_MANIFEST}; charset=utf-8", push=push).media_type == DOCKER_MANIFEST
    assert parse_manifest(doc(manifests=[CHILD]), DOCKER_MANIFEST_LIST, push=push).media_type == DOCKER_MANIFEST_LIST


@pytest.mark.parametrize("push", [False, True])
def test_without_a_declared_type_the_field_then_the_shape_decides(push):
    """A Content-Type that names no manifest type (application/json, none) is ignored."""
    assert parse_manifest(doc(mediaType=OCI_INDEX, manifests=[]), "application/json", push=push).media_type == OCI_INDEX
    assert parse_manifest(doc(manifests=[]), None, push=push).media_type == OCI_INDEX
    assert parse_manifest(doc(config=CONFIG, layers=[]), None, push=push).media_type == OCI_MANIFEST


@pytest.mark.parametrize("push", [False, True])
def test_a_declared_type_that_contradicts_the_document_is_invalid(push):
    """Every caller refuses it: pushes, upstream answers and archive entries alike."""
    assert "mediaType is" in invalid(doc(mediaType=DOCKER_MANIFEST, manifests=[]), OCI_INDEX, push=push)
    assert "mediaType is" in invalid(doc(mediaType=OCI_MANIFEST, config=CONFIG), DOCKER_MANIFEST, push=push)
    assert "mediaType is" in invalid(doc(mediaType=DOCKER_MANIFEST_LIST, manifests=[]), OCI_MANIFEST, push=push)


def test_a_docker_document_declared_as_its_oci_counterpart_is_docker_outside_pushes():
    """index.json lists Docker manifests under their OCI counterparts: the document says what
    it is.  A push declaring the counterpart is refused (the spec: Content-Type = mediaType)."""
    data = doc(mediaType=DOCKER_MANIFEST, config=CONFIG)
    assert parse_manifest(data, OCI_MANIFEST).media_type == DOCKER_MANIFEST
    assert parse_manifest(doc(mediaType=DOCKER_MANIFEST_LIST, manifests=[]), OCI_INDEX).media_type == DOCKER_MANIFEST_LIST
    invalid(data, OCI_MANIFEST, push=True)


def test_layers_without_a_config():
    """Read leniently (an upstream's, or the store's: GC must still see the layers); refused
    on push, where the image-spec's required config is enforced."""
    data = doc(layers=[LAYER])
    m = parse_manifest(data)
    assert m.media_type == OCI_MANIFEST and m.config is None and [str(d) for d in m.references()] == [LAYER["digest"]]
    assert "needs a config" in invalid(data, OCI_MANIFEST, push=True)


def test_push_requires_the_image_spec_fields():
    """schemaVersion 2, and descriptors with mediaType and size; lenient reads take them without."""
    assert "schemaVersion" in invalid(json.dumps({"config": CONFIG}).encode(), OCI_MANIFEST, push=True)
    sizeless = {"mediaType": LAYER["mediaType"], "digest": LAYER["digest"]}
    assert "without a size" in invalid(doc(config=CONFIG, layers=[sizeless]), OCI_MANIFEST, push=True)
    typeless = {"digest": LAYER["digest"], "size": 3}
    assert "without a mediaType" in invalid(doc(config=CONFIG, layers=[typeless]), OCI_MANIFEST, push=True)
    assert parse_manifest(doc(config=CONFIG, layers=[sizeless, typeless])).layers[0].size is None


def test_schema1_is_read_but_never_pushed():
    """A schema 1 manifest's layers are its fsLayers (so GC keeps them); a push is refused."""
    data = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": [{"blobSum": LAYER["digest"]}], "signatures": []}).encode()
    m = parse_manifest(data)
    assert m.media_type == DOCKER_SCHEMA1_SIGNED and [str(d) for d in m.references()] == [LAYER["digest"]]
    assert parse_manifest(data, DOCKER_SCHEMA1).media_type == DOCKER_SCHEMA1
    assert "schema 1" in invalid(data, DOCKER_SCHEMA1_SIGNED, push=True)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"{nope", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"foo": 1}', "not a manifest of a known type"),
        (doc(mediaType=7, config=CONFIG), "mediaType is not a string"),
        (doc(mediaType=OCI_INDEX, manifests={}), "manifests list"),
        (doc(config=CONFIG, layers={}), "layers is not a list"),
        (doc(config=CONFIG, layers=[{"size": 1}]), "layers[0]: descriptor without a digest"),
        (doc(config={"digest": "sha256:short"}), "config: invalid sha256 digest"),
    ],
)
def test_malformed_manifests_say_what_is_wrong(data, why):
    assert why in invalid(data)


def test_a_push_says_which_descriptor_field_is_wrong():
    assert "invalid size" in invalid(doc(config={**CONFIG, "size": -1}), OCI_MANIFEST, push=True)
    assert "mediaType is not a string" in invalid(doc(config={**CONFIG, "mediaType": 7}), OCI_MANIFEST, push=True)
    bad_subject = {"digest": "sha256:" + "4" * 64}
    assert "subject" in invalid(doc(config=CONFIG, layers=[], subject=bad_subject), OCI_MANIFEST, push=True)


def test_stored_and_upstream_manifests_keep_every_digest_despite_malformed_fields():
    """What the previous release stored must keep its blobs alive: a string size, a
    non-string mediaType or a broken subject are read as absent, the digests all count."""
    odd_layer = {**LAYER, "size": "12"}
    odd_config = {**CONFIG, "mediaType": 7}
    m = parse_manifest(doc(config=odd_config, layers=[odd_layer], subject={"size": 1}))
    assert [str(d) for d in m.references()] == [CONFIG["digest"], LAYER["digest"]]
    assert m.layers[0].size is None and m.config.media_type == "" and m.subject is None


def test_referrer_descriptor_takes_artifact_type_then_config_type():
    """The referrers API lists artifactType, else the config's media type, and annotations."""
    digest = Digest.of(b"m")
    m = parse_manifest(doc(mediaType=OCI_MANIFEST, config=CONFIG, layers=[], artifactType="x/sbom", annotations={"a": "b"}))
    assert m.referrer_descriptor(digest, 10) == {
        "mediaType": OCI_MANIFEST, "digest": str(digest), "size": 10, "artifactType": "x/sbom", "annotations": {"a": "b"},
    }
    m = parse_manifest(doc(mediaType=OCI_MANIFEST, config=CONFIG, layers=[]))
    assert m.referrer_descriptor(digest, 10)["artifactType"] == CONFIG["mediaType"]


def test_descriptor_to_json_round_trips_and_merges_annotations():
    d = parse_descriptor({**CHILD, "annotations": {"a": "1"}}, "x")
    assert isinstance(d, Descriptor)
    assert d.to_json({"b": "2"}) == {**CHILD, "annotations": {"a": "1", "b": "2"}}
