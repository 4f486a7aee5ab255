"""Unit tests of the pure OCI image-layout logic (mirror.ocilayout): descriptors, what a
manifest points at, walking an image, and index.json."""

from __future__ import annotations

import json

import pytest

from mirror.oci import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, Digest
from mirror.ocilayout import (
    CONTAINERD_NAME,
    REF_NAME,
    Descriptor,
    LayoutError,
    blob_member,
    build_index,
    check_layout_file,
    descriptor,
    image_closure,
    image_name,
    manifest_content,
    manifest_media_type,
    parse_blob_member,
    parse_index,
)

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class Blobs:
    """An in-memory content store for image_closure's two callables."""

    def __init__(self):
        self.data: dict[Digest, bytes] = {}

    def add(self, data: bytes) -> Digest:
        d = Digest.of(data)
        self.data[d] = data
        return d

    def desc(self, data: bytes, media_type: str, **extra) -> Descriptor:
        return Descriptor(media_type, self.add(data), len(data), extra)

    def image(self, layers: list[bytes], media_type=OCI_MANIFEST, **extra) -> Descriptor:
        config = self.desc(b'{"os":"linux"}', "application/vnd.oci.image.config.v1+json")
        doc = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.to_json(),
            "layers": [self.desc(layer, LAYER).to_json() for layer in layers],
        }
        return self.desc(json.dumps(doc).encode(), media_type, **extra)

    def index(self, children: list[Descriptor], media_type=OCI_INDEX) -> Descriptor:
        doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": [c.to_json() for c in children]}
        return self.desc(json.dumps(doc).encode(), media_type)

    def read(self, d: Digest) -> bytes | None:
        return self.data.get(d)

    def size(self, d: Digest) -> int | None:
        return len(self.data[d]) if d in self.data else None

    def walk(self, top: Descriptor, *, strict: bool):
        return image_closure(top, self.read, self.size, strict=strict)


def test_descriptor_checks_and_round_trips():
    """A descriptor keeps its other fields (platform, annotations) and merges annotations."""
    obj = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "a" * 64, "size": 3,
           "platform": {"os": "linux", "architecture": "amd64"}, "annotations": {"x": "1"}}
    d = descriptor(obj, "here")
    assert d.to_json() == obj
    assert d.to_json({REF_NAME: "n"})["annotations"] == {"x": "1", REF_NAME: "n"}
    for bad, why in [
        ([], "not a descriptor object"),
        ({"digest": obj["digest"], "size": 1}, "without a mediaType"),
        ({"mediaType": "m", "size": 1}, "without a digest"),
        ({"mediaType": "m", "digest": "sha256:zz", "size": 1}, "invalid sha256 digest"),
        ({"mediaType": "m", "digest": obj["digest"], "size": -1}, "without a valid size"),
        ({"mediaType": "m", "digest": obj["digest"], "size": True}, "without a valid size"),
    ]:
        with pytest.raises(LayoutError) as info:
            descriptor(bad, "manifests[3]")
        assert str(info.value).startswith("manifests[3]: ") and why in str(info.value)


def test_manifest_content_lists_config_layers_and_children():
    """An image lists its config and layers (foreign layers left out); an index its children."""
    blobs = Blobs()
    foreign = {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": "sha256:" + "f" * 64,
               "size": 9, "urls": ["https://example.com/layer"]}
    top = blobs.image([b"one", b"two"])
    doc = json.loads(blobs.data[top.digest])
    doc["layers"].append(foreign)
    doc["layers"].append(doc["layers"][0])  # a repeated layer is listed once
    content = manifest_content(json.dumps(doc).encode(), OCI_MANIFEST)
    assert [b.size for b in content.blobs] == [len(b'{"os":"linux"}'), 3, 3]
    index = blobs.index([top])
    content = manifest_content(blobs.data[index.digest], None)
    assert content.media_type == OCI_INDEX and [c.digest for c in content.children] == [top.digest]


def test_manifest_media_type_agreement():
    """The descriptor's type wins when the manifest agrees; a disagreement is an error;
    without either, the shape decides."""
    assert manifest_media_type({"mediaType": DOCKER_MANIFEST}, DOCKER_MANIFEST) == DOCKER_MANIFEST
    assert manifest_media_type({}, DOCKER_MANIFEST_LIST) == DOCKER_MANIFEST_LIST
    assert manifest_media_type({"mediaType": OCI_INDEX}) == OCI_INDEX
    assert manifest_media_type({"manifests": []}) == OCI_INDEX
    assert manifest_media_type({"config": {}}) == OCI_MANIFEST
    # index.json lists Docker manifests under their OCI counterparts; the document says what it is
    assert manifest_media_type({"mediaType": DOCKER_MANIFEST}, OCI_MANIFEST) == DOCKER_MANIFEST
    assert manifest_media_type({"mediaType": DOCKER_MANIFEST_LIST}, OCI_INDEX) == DOCKER_MANIFEST_LIST
    with pytest.raises(LayoutError, match="the descriptor says .* but the manifest says"):
        manifest_media_type({"mediaType": OCI_INDEX}, OCI_MANIFEST)
    with pytest.raises(LayoutError, match="the descriptor says .* but the manifest says"):
        manifest_media_type({"mediaType": DOCKER_MANIFEST_LIST}, OCI_MANIFEST)
    with pytest.raises(LayoutError, match="the descriptor says .* but the manifest says"):
        manifest_media_type({"mediaType": OCI_MANIFEST}, DOCKER_MANIFEST)
    with pytest.raises(LayoutError, match="not a manifest of a known type"):
        manifest_media_type({"foo": 1})
    with pytest.raises(LayoutError, match="cannot go into an OCI layout"):
        manifest_content(json.dumps({"schemaVersion": 1, "fsLayers": []}).encode())


def test_closure_of_an_image_and_an_index():
    """The walk lists every manifest (top first) and every blob once."""
    blobs = Blobs()
    amd64 = blobs.image([b"shared", b"amd64"], platform={"os": "linux", "architecture": "amd64"})
    arm64 = blobs.image([b"shared", b"arm64"], platform={"os": "linux", "architecture": "arm64"})
    index = blobs.index([amd64, arm64])
    closure = blobs.walk(index, strict=True)
    assert [m.digest for m in closure.manifests] == [index.digest, amd64.digest, arm64.digest]
    assert len(closure.blobs) == 4  # one config (same bytes), shared, amd64, arm64
    assert closure.missing_children == ()
    assert list(closure.digests) == [m.digest for m in closure.manifests] + [b.digest for b in closure.blobs]


def test_absent_children_are_left_out_but_not_all_of_them():
    """An index whose other platforms were never fetched keeps the present ones; with none
    present it is an error."""
    blobs = Blobs()
    amd64, arm64 = blobs.image([b"a"]), blobs.image([b"b"])
    index = blobs.index([amd64, arm64])
    del blobs.data[arm64.digest]
    for strict in (True, False):
        closure = blobs.walk(index, strict=strict)
        assert [m.digest for m in closure.manifests] == [index.digest, amd64.digest]
        assert closure.missing_children == (arm64,)
    del blobs.data[amd64.digest]
    with pytest.raises(LayoutError, match="none of the 2 manifests of index"):
        blobs.walk(index, strict=False)


def test_incomplete_child_left_out_on_export_refused_on_import():
    """A child manifest whose layer is missing: left out when not strict (export), an
    error when strict (import)."""
    blobs = Blobs()
    amd64, arm64 = blobs.image([b"a"]), blobs.image([b"b"])
    index = blobs.index([amd64, arm64])
    del blobs.data[Digest.of(b"b")]
    assert blobs.walk(index, strict=False).missing_children == (arm64,)
    with pytest.raises(LayoutError, match=f"blob {Digest.of(b'b')} of manifest {arm64.digest} is missing"):
        blobs.walk(index, strict=True)


def test_closure_errors():
    """Missing top manifest, missing blob, wrong blob size, wrong manifest size or bytes."""
    blobs = Blobs()
    top = blobs.image([b"layer"])
    with pytest.raises(LayoutError, match="manifest sha256:.* is missing"):
        Blobs().walk(top, strict=True)
    blobs.data[Digest.of(b"layer")] = b"layer!"  # the size is what the store says
    with pytest.raises(LayoutError, match="is 6 bytes, its descriptor says 5"):
        blobs.walk(top, strict=True)
    with pytest.raises(LayoutError, match="its size or digest does not match its descriptor"):
        blobs.walk(Descriptor(top.media_type, top.digest, top.size + 1), strict=True)
    with pytest.raises(LayoutError, match="the descriptor says"):
        blobs.walk(Descriptor(OCI_INDEX, top.digest, top.size), strict=True)


def test_index_json_round_trip_and_names():
    """index.json lists each top descriptor under its full reference; names come from
    containerd's annotation, else ref.name when it is a full reference (not a bare tag)."""
    blobs = Blobs()
    a, b = blobs.image([b"a"]), blobs.image([b"b"], platform={"os": "linux", "architecture": "amd64"})
    c = blobs.image([b"c"], media_type=DOCKER_MANIFEST)
    data = build_index([(a, "docker.io/library/a:1"), (b, "ghcr.io/org/b@" + str(b.digest)), (c, "c:1")])
    entries = parse_index(data)
    assert [e.media_type for e in entries] == [OCI_MANIFEST, OCI_MANIFEST, OCI_MANIFEST]  # c: its OCI counterpart
    assert entries[0].annotations == {REF_NAME: "docker.io/library/a:1", CONTAINERD_NAME: "docker.io/library/a:1"}
    assert blobs.walk(entries[2], strict=True).manifests[0].media_type == DOCKER_MANIFEST  # restored from the manifest
    entries = entries[:2]
    assert [e.digest for e in entries] == [a.digest, b.digest]
    assert [image_name(e) for e in entries] == ["docker.io/library/a:1", f"ghcr.io/org/b@{b.digest}"]
    assert entries[1].extra["platform"] == {"os": "linux", "architecture": "amd64"}
    assert json.loads(data)["mediaType"] == OCI_INDEX
    assert image_name(Descriptor(OCI_MANIFEST, a.digest, 1, {"annotations": {REF_NAME: "latest"}})) is None
    assert image_name(Descriptor(OCI_MANIFEST, a.digest, 1, {"annotations": {REF_NAME: "hello:1"}})) == "hello:1"
    both = {"annotations": {REF_NAME: "3.19", CONTAINERD_NAME: "docker.io/library/alpine:3.19"}}
    assert image_name(Descriptor(OCI_MANIFEST, a.digest, 1, both)) == "docker.io/library/alpine:3.19"
    assert image_name(Descriptor(OCI_MANIFEST, a.digest, 1)) is None
    for bad in [b"not json", b"[]", b'{"schemaVersion": 1, "manifests": []}', b'{"schemaVersion": 2}']:
        with pytest.raises(LayoutError):
            parse_index(bad)


def test_layout_file_and_blob_members():
    """oci-layout must say version 1.x; blob member names map to digests and back."""
    check_layout_file(b'{"imageLayoutVersion": "1.0.0"}')
    for bad in [b"", b"{}", b'{"imageLayoutVersion": "2.0.0"}', b"[1]"]:
        with pytest.raises(LayoutError):
            check_layout_file(bad)
    d = Digest.of(b"x")
    assert blob_member(d) == f"blobs/sha256/{d.encoded}"
    assert parse_blob_member(blob_member(d)) == d
    assert parse_blob_member("index.json") is None
    assert parse_blob_member("blobs/sha256/x/y") is None
    with pytest.raises(LayoutError, match="blobs/sha256/abc: invalid sha256 digest"):
        parse_blob_member("blobs/sha256/abc")
    with pytest.raises(LayoutError, match="unsupported digest algorithm"):
        parse_blob_member("blobs/md5/" + "a" * 32)
