"""Unit tests of the pure OCI image-layout logic (mirror.core.ocilayout): descriptors, what a
manifest points at, walking an image, and index.json."""

from __future__ import annotations

import json

import pytest

from mirror.core.manifest import Descriptor
from mirror.core.oci import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, Digest
from mirror.core.ocilayout import (
    CONTAINERD_NAME,
    REF_NAME,
    LayoutError,
    blob_member,
    build_index,
    check_layout_file,
    descriptor,
    image_closure,
    image_name,
    layout_manifest,
    parse_blob_member,
    parse_index,
)
from tests.storeutil import run_now

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

    async def read(self, d: Digest) -> bytes | None:
        return self.data.get(d)

    async def size(self, d: Digest) -> int | None:
        return len(self.data[d]) if d in self.data else None

    def walk(self, top: Descriptor, *, strict: bool):
        return run_now(image_closure(top, self.read, self.size, strict=strict))


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
        ({"mediaType": "m", "digest": obj["digest"], "size": -1}, "invalid size"),
        ({"mediaType": "m", "digest": obj["digest"], "size": True}, "invalid size"),
        ({"mediaType": "m", "digest": obj["digest"]}, "without a size"),
    ]:
        with pytest.raises(LayoutError) as info:
            descriptor(bad, "manifests[3]")
        assert str(info.value).startswith("manifests[3]: ") and why in str(info.value)


def test_layout_manifests_go_through_the_one_parser():
    """What a layout manifest points at is the manifest parser's answer (tested in
    test_manifest.py); a layout adds one rule: schema 1 cannot go in, and errors are
    LayoutErrors."""
    blobs = Blobs()
    top = blobs.image([b"one", b"two"])
    content = layout_manifest(blobs.data[top.digest], OCI_MANIFEST)
    assert [b.size for b in content.blobs] == [len(b'{"os":"linux"}'), 3, 3]
    # index.json lists Docker manifests under their OCI counterparts; the document says what it is
    docker = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": []}).encode()
    assert layout_manifest(docker, OCI_INDEX).media_type == DOCKER_MANIFEST_LIST
    with pytest.raises(LayoutError, match="mediaType is"):
        layout_manifest(json.dumps({"mediaType": OCI_INDEX, "manifests": []}).encode(), OCI_MANIFEST)
    with pytest.raises(LayoutError, match="cannot go into an OCI layout"):
        layout_manifest(json.dumps({"schemaVersion": 1, "fsLayers": []}).encode())


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
    with pytest.raises(LayoutError, match=r"manifest sha256:.* is missing"):
        Blobs().walk(top, strict=True)
    blobs.data[Digest.of(b"layer")] = b"layer!"  # the size is what the store says
    with pytest.raises(LayoutError, match="is 6 bytes, its descriptor says 5"):
        blobs.walk(top, strict=True)
    with pytest.raises(LayoutError, match="its size or digest does not match its descriptor"):
        blobs.walk(Descriptor(top.media_type, top.digest, top.size + 1), strict=True)
    with pytest.raises(LayoutError, match=r"declared as .* but the manifest.s mediaType is"):
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
