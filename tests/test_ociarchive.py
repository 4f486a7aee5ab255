"""`mirror export` / `mirror import` on real stores: the archive's layout, a round trip,
partial indexes, hosted repositories, constant memory, and refusing corrupt, truncated
or tampered archives without linking or tagging anything."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from twisted.internet.task import Clock

from mirror.config import MirrorConfig, StorageConfig, UpstreamConfig
from mirror.core.oci import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Digest
from mirror.core.ocilayout import REF_NAME
from mirror.storage.fs import open_filesystem_store
from mirror.tools import archive
from mirror.tools.archive import ArchiveError
from tests.storeutil import Sync, blob_path, run_now

HUB = UpstreamConfig(registry="docker.io", url="http://127.0.0.1:9")
GHCR = UpstreamConfig(registry="ghcr.io", url="http://127.0.0.1:9")
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class FilesystemStore:
    """A filesystem store with the calls these tests make, run at once (see tests/storeutil.py)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.store = open_filesystem_store(self.root)
        self._sync = Sync(self.store)

    def __getattr__(self, name):
        for part in ("blobs", "metadata"):
            target = getattr(self._sync, part)
            if hasattr(target._target, name):
                return getattr(target, name)
        raise AttributeError(name)

    def blob_path(self, digest: Digest) -> Path:
        return blob_path(self.root, digest)


def plan_export(store, config, images):
    return run_now(archive.plan_export(store.store, config, images))


def export_archive(store, entries, out, **kw):
    return run_now(archive.export_archive(store.store, entries, out, **kw))


def import_archive(store, config, path, **kw):
    return run_now(archive.import_archive(store.store, config, path, Clock(), **kw))


def config_for(root: Path, **kw) -> MirrorConfig:
    return MirrorConfig(listen=(), storage=StorageConfig(root=root), upstreams=kw.pop("upstreams", (HUB, GHCR)), **kw)


def put(store: FilesystemStore, data: bytes) -> dict:
    d = Digest.of(data)
    store.put(d, data)
    return {"digest": str(d), "size": len(data)}


def put_image(store, repo, tag, layers, *, arch="amd64", media_type=OCI_MANIFEST, link=True) -> dict:
    """An image stored as the service stores a fetched one; returns its descriptor."""
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", **put(store, json.dumps({"architecture": arch}).encode())}
    doc = {"schemaVersion": 2, "mediaType": media_type, "config": config,
           "layers": [{"mediaType": LAYER, **put(store, layer)} for layer in layers]}
    desc = {"mediaType": media_type, **put(store, json.dumps(doc).encode()), "platform": {"os": "linux", "architecture": arch}}
    if link:
        store.link_manifest(repo, Digest(*desc["digest"].split(":")), media_type)
    if tag:
        store.set_tag(repo, tag, Digest(*desc["digest"].split(":")))
    return desc


def put_index(store, repo, tag, arches, *, present=None) -> tuple[dict, dict]:
    """A multi-platform image; only the ``present`` arches' children are stored."""
    children = {arch: put_image(store, repo, None, [os.urandom(2000)], arch=arch) for arch in arches}
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(children.values())}
    desc = {"mediaType": OCI_INDEX, **put(store, json.dumps(doc).encode())}
    digest = Digest(*desc["digest"].split(":"))
    store.link_manifest(repo, digest, OCI_INDEX)
    store.set_tag(repo, tag, digest)
    for arch in set(arches) - set(present or arches):
        os.unlink(store.blob_path(Digest(*children[arch]["digest"].split(":"))))
    return desc, children


def export(store, config, out, images=()):
    entries, warnings = plan_export(store, config, list(images))
    export_archive(store, entries, out)
    return entries, warnings


def snapshot(store: FilesystemStore) -> dict:
    """Repositories with their tags and manifest links (what import may write)."""
    result = {}
    for repo in store.repositories():
        record = store.scan_repository(repo)
        result[repo] = (
            {t: str(d) for t, d in record.tags.items()},
            {str(d): store.manifest_media_type(repo, d) for d in record.manifests},
            sorted(map(str, record.blob_links)),
        )
    return result


@pytest.fixture
def target(tmp_path):
    root = tmp_path / "target"
    return FilesystemStore(root), config_for(root)


def test_archive_is_an_oci_layout_with_full_reference_names(source, tmp_path):
    """oci-layout, index.json with one entry per tag named by its full reference, and
    every blob under blobs/sha256 hashing to its name; the same store exports the same bytes."""
    store, config = source
    out = tmp_path / "out.tar"
    entries, warnings = export(store, config, out)
    assert warnings == []
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert names[:4] == ["oci-layout", "index.json", "blobs", "blobs/sha256"]
        assert all(name.startswith("blobs/sha256/") for name in names[4:])
        assert json.load(tar.extractfile("oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        index = json.load(tar.extractfile("index.json"))
        for member in tar.getmembers():
            if member.name.startswith("blobs/sha256/"):
                assert hashlib.sha256(tar.extractfile(member).read()).hexdigest() == member.name.rsplit("/", 1)[1]
    refs = [m["annotations"][REF_NAME] for m in index["manifests"]]
    assert refs == [
        "docker.io/library/hello:latest", "docker.io/library/hello:multi", "docker.io/library/hello:oci", "ghcr.io/org/app:v1",
    ]
    # skopeo reads only OCI types from index.json: schema 2 is listed as its OCI counterpart
    assert [m["mediaType"] for m in index["manifests"]] == [OCI_MANIFEST, OCI_INDEX, OCI_MANIFEST, OCI_MANIFEST]
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "docker.io/library/hello:latest"
    blob_names = [n for n in names if n.startswith("blobs/sha256/")]
    assert len(blob_names) == len(set(blob_names)) == len({d for e in entries for d in e.closure.digests})
    again = tmp_path / "again.tar"
    export(store, config, again)
    assert again.read_bytes() == out.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.tar", "out.tar", "source"]


def test_round_trip_into_an_empty_store(source, target, tmp_path):
    """Import recreates every repository, tag and manifest link (same media types) and the
    blobs; importing again finds everything present and changes nothing."""
    store, config = source
    export(store, config, tmp_path / "out.tar")
    dest, dest_config = target
    lines = []
    result = import_archive(dest, dest_config, tmp_path / "out.tar", report=lines.append)
    assert snapshot(dest) == snapshot(store)  # the same media types too: schema 2 stays schema 2
    latest = store.get_tag("docker.io/library/hello", "latest")
    assert dest.manifest_media_type("docker.io/library/hello", latest) == DOCKER_MANIFEST
    assert {str(b.digest) for b in dest.scan()} == {str(b.digest) for b in store.scan()}
    assert result.written == result.blobs and result.present == 0
    assert [name for name, _ in result.images] == [
        "docker.io/library/hello:latest", "docker.io/library/hello:multi", "docker.io/library/hello:oci", "ghcr.io/org/app:v1"]
    assert lines[0].startswith("imported docker.io/library/hello:latest sha256:")
    assert os.listdir(dest.root / "spool") == []
    again = import_archive(dest, dest_config, tmp_path / "out.tar")
    assert (again.written, again.present) == (0, again.blobs)
    assert snapshot(dest) == snapshot(store)
    assert f"{again.blobs} blobs verified, 0 written (0 B), {again.blobs} already in the store" in again.summary(Path("x"))


def test_named_images_by_tag_and_digest(source, tmp_path, target):
    """Named images are routed as the mirror routes them; a digest keeps no tag."""
    store, config = source
    digest = store.get_tag("ghcr.io/org/app", "v1")
    entries, _ = export(store, config, tmp_path / "out.tar", ["hello", f"ghcr.io/org/app@{digest}"])
    assert [e.name for e in entries] == ["docker.io/library/hello:latest", f"ghcr.io/org/app@{digest}"]
    dest, dest_config = target
    import_archive(dest, dest_config, tmp_path / "out.tar")
    assert dest.list_tags("docker.io/library/hello") == ["latest"]
    assert dest.list_tags("ghcr.io/org/app") == [] and dest.manifest_media_type("ghcr.io/org/app", digest) == OCI_MANIFEST


def test_named_image_not_cached_writes_nothing(source, tmp_path):
    """A named image the store lacks, a malformed name, an unserved registry: an error, no archive."""
    store, config = source
    for image, message in [
        ("alpine:3.19", "alpine:3.19: docker.io/library/alpine:3.19 is not in the store (warm it first)"),
        ("Bad/Name", "invalid image reference 'Bad/Name'"),
        ("quay.io/x/y", "quay.io/x/y: this registry serves no upstream for registry 'quay.io'"),
    ]:
        with pytest.raises(ArchiveError) as info:
            plan_export(store, config, ["hello", image])
        assert message in str(info.value)


def test_partial_index_is_exported_with_the_cached_platforms(tmp_path, target):
    """Only amd64 of a two-platform image is cached: the archive holds the index and amd64
    (the layout spec allows absent blobs), with a warning; import links what is there."""
    store = FilesystemStore(tmp_path / "source")
    _desc, children = put_index(store, "docker.io/library/multi", "latest", ["amd64", "arm64"], present=["amd64"])
    config = config_for(tmp_path / "source")
    _entries, warnings = export(store, config, tmp_path / "out.tar")
    assert warnings == ["docker.io/library/multi:latest: 1 of 2 platform manifests are cached; the archive holds those"]
    dest, dest_config = target
    result = import_archive(dest, dest_config, tmp_path / "out.tar")
    assert result.warnings == ["docker.io/library/multi:latest: 1 of 2 platform manifests are in the archive"]
    repo = "docker.io/library/multi"
    assert dest.manifest_media_type(repo, Digest(*children["amd64"]["digest"].split(":"))) == OCI_MANIFEST
    assert dest.manifest_media_type(repo, Digest(*children["arm64"]["digest"].split(":"))) is None


def test_incomplete_images_are_left_out_of_a_full_export(tmp_path):
    """Exporting everything skips an image whose layer was evicted, saying so; naming it fails."""
    store = FilesystemStore(tmp_path / "source")
    put_image(store, "docker.io/library/ok", "1", [b"fine"])
    put_image(store, "docker.io/library/gone", "1", [b"evicted"])
    os.unlink(store.blob_path(Digest.of(b"evicted")))
    config = config_for(tmp_path / "source")
    entries, warnings = plan_export(store, config, [])
    assert [e.name for e in entries] == ["docker.io/library/ok:1"]
    assert len(warnings) == 1 and warnings[0].startswith("docker.io/library/gone:1: left out, it is not whole in the store: blob")
    with pytest.raises(ArchiveError, match=r"library/gone:1: docker\.io/library/gone:1 is not whole in the store"):
        plan_export(store, config, ["library/gone:1"])


def test_a_corrupt_store_blob_stops_the_export(source, tmp_path):
    """Bytes are hashed on their way into the archive: a store file gone bad stops the
    export and no archive (or partial file) is left."""
    store, config = source
    entries, _ = plan_export(store, config, [])
    victim = entries[0].closure.blobs[-1].digest
    path = store.blob_path(victim)
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=f"blob {victim} in the store does not match its digest"):
        export_archive(store, entries, tmp_path / "out.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_hosted_images_keep_their_blob_links(tmp_path):
    """A hosted repository's image imports with its blob links (hosted blobs are served per
    repository), under the name the importing config hosts."""
    src = FilesystemStore(tmp_path / "source")
    put_image(src, "myorg/app", "1", [b"private"])
    config = config_for(tmp_path / "source", hosted=("myorg/*",))
    entries, _ = export(src, config, tmp_path / "out.tar")
    assert [e.name for e in entries] == ["myorg/app:1"]
    dest = FilesystemStore(tmp_path / "target")
    import_archive(dest, config_for(tmp_path / "target", hosted=("myorg/*",)), tmp_path / "out.tar")
    assert dest.list_tags("myorg/app") == ["1"]
    assert dest.has_blob_link("myorg/app", Digest.of(b"private"))


def test_gzip_compressed_archives_import(source, target, tmp_path):
    """A gzipped archive (.tar.gz) imports the same."""
    store, config = source
    export(store, config, tmp_path / "out.tar")
    (tmp_path / "out.tar.gz").write_bytes(gzip.compress((tmp_path / "out.tar").read_bytes()))
    dest, dest_config = target
    import_archive(dest, dest_config, tmp_path / "out.tar.gz")
    assert snapshot(dest) == snapshot(store)


# refused archives -----------------------------------------------------------------------------
def blob_offsets(archive: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(archive) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def rewrite(archive: Path, out: Path, change) -> None:
    """Copy an archive, passing each member's (info, bytes) through ``change`` (None drops it)."""
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else b""
            changed = change(member, data)
            if changed is not None:
                member.size = len(changed)
                dst.addfile(member, io.BytesIO(changed))


def flip_byte_in_largest_blob(archive: Path) -> None:
    offsets = blob_offsets(archive)
    name = max((n for n in offsets if n.startswith("blobs/")), key=lambda n: offsets[n][1])
    with open(archive, "r+b") as f:
        f.seek(offsets[name][0] + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))


def truncate_mid_blob(archive: Path) -> None:
    offsets = blob_offsets(archive)
    name = max((n for n in offsets if n.startswith("blobs/")), key=lambda n: offsets[n][1])
    os.truncate(archive, offsets[name][0] + offsets[name][1] // 2)


def truncate_after_index(archive: Path) -> None:
    offsets = blob_offsets(archive)
    start, size = offsets["index.json"]
    os.truncate(archive, start + ((size + 511) // 512) * 512)


def wrong_digest_in_index(archive: Path) -> None:
    """Point the first entry at a digest whose blob is not in the archive (same length, in place)."""
    start, size = blob_offsets(archive)["index.json"]
    data = archive.read_bytes()
    index = data[start : start + size]
    first = json.loads(index)["manifests"][0]["digest"]
    forged = index.replace(first.encode(), ("sha256:" + hashlib.sha256(b"forged").hexdigest()).encode(), 1)
    archive.write_bytes(data[:start] + forged + data[start + size :])


def swap_digest_in_index(archive: Path) -> None:
    """Point the first entry at another image's manifest (whose size differs)."""
    start, size = blob_offsets(archive)["index.json"]
    data = archive.read_bytes()
    index = data[start : start + size]
    manifests = json.loads(index)["manifests"]
    forged = index.replace(manifests[0]["digest"].encode(), manifests[-1]["digest"].encode(), 1)
    archive.write_bytes(data[:start] + forged + data[start + size :])


def rename_blob(archive: Path) -> None:
    """A blob stored under another (valid) digest's name."""
    tmp = archive.with_suffix(".tmp")
    swapped = []

    def change(member, data):
        if member.name.startswith("blobs/") and not swapped and len(data) > 1000:
            swapped.append(member.name)
            member.name = "blobs/sha256/" + hashlib.sha256(b"other").hexdigest()
        return data

    rewrite(archive, tmp, change)
    tmp.replace(archive)


def drop(member_name):
    def mutate(archive: Path) -> None:
        tmp = archive.with_suffix(".tmp")
        rewrite(archive, tmp, lambda m, data: None if m.name == member_name else data)
        tmp.replace(archive)

    return mutate


def replace_member(member_name, content):
    def mutate(archive: Path) -> None:
        tmp = archive.with_suffix(".tmp")
        rewrite(archive, tmp, lambda m, data: content if m.name == member_name else data)
        tmp.replace(archive)

    return mutate


def bare_tag_names(archive: Path) -> None:
    start, size = blob_offsets(archive)["index.json"]
    index = json.loads(archive.read_bytes()[start : start + size])
    for m in index["manifests"]:
        m["annotations"] = {REF_NAME: "latest"}  # as `skopeo copy ... oci-archive:F:latest` writes
    replace_member("index.json", json.dumps(index).encode())(archive)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (flip_byte_in_largest_blob, "does not match its digest: the archive is corrupt or was tampered with"),
        (truncate_mid_blob, "truncated"),
        (truncate_after_index, "is missing"),
        (
            wrong_digest_in_index,
            "docker.io/library/hello:latest: manifest sha256:" + hashlib.sha256(b"forged").hexdigest() + " is missing",
        ),
        (swap_digest_in_index, "its size or digest does not match its descriptor"),
        (rename_blob, "does not match its digest"),
        (drop("oci-layout"), "not an OCI image layout: the archive has no oci-layout file"),
        (drop("index.json"), "the archive has no index.json"),
        (replace_member("oci-layout", b'{"imageLayoutVersion": "9"}'), "oci-layout is not an OCI image layout version 1 file"),
        (replace_member("index.json", b"{]"), "index.json is not valid JSON"),
        (replace_member("index.json", b'{"schemaVersion":2,"manifests":[]}'), "index.json lists no images"),
        (bare_tag_names, "carries no full image name"),
        (lambda a: a.write_bytes(os.urandom(4096)), "not a readable tar archive"),
        (lambda a: a.write_bytes(b""), "not a readable tar archive"),
    ],
    ids=["flipped-byte", "truncated-mid-blob", "truncated-after-index", "wrong-digest-in-index", "swapped-digest-in-index",
         "blob-under-wrong-name", "no-oci-layout", "no-index", "bad-oci-layout", "bad-index-json", "empty-index", "bare-tags",
         "not-a-tar", "empty-file"],
)
def test_bad_archives_are_refused_and_nothing_is_linked(mutate, message, source, target, tmp_path):
    """A tampered, truncated or malformed archive is refused with one line; the target store
    gains no repository, tag or manifest link (verified blobs may have landed: harmless)."""
    store, config = source
    archive = tmp_path / "out.tar"
    export(store, config, archive)
    mutate(archive)
    dest, dest_config = target
    with pytest.raises(ArchiveError) as info:
        import_archive(dest, dest_config, archive)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert list(dest.repositories()) == []
    assert os.listdir(dest.root / "repositories") == []
    assert os.listdir(dest.root / "spool") == []


def test_an_archive_for_an_unserved_registry_is_refused(source, tmp_path):
    """Importing ghcr.io images into a mirror with no ghcr.io upstream: refused, nothing linked."""
    store, config = source
    export(store, config, tmp_path / "out.tar")
    dest = FilesystemStore(tmp_path / "target")
    with pytest.raises(ArchiveError, match=r"ghcr\.io/org/app:v1: this registry serves no upstream for registry 'ghcr\.io'"):
        import_archive(dest, config_for(tmp_path / "target", upstreams=(HUB,)), tmp_path / "out.tar")
    assert list(dest.repositories()) == []


def test_big_blobs_stream_in_constant_memory(tmp_path):
    """A 64 MiB layer goes through export and import with Python allocations far below its size."""
    store = FilesystemStore(tmp_path / "source")
    layer = tmp_path / "layer"
    hasher = hashlib.sha256()
    with open(layer, "wb") as f:
        for _ in range(64):
            chunk = os.urandom(1 << 20)
            hasher.update(chunk)
            f.write(chunk)
    digest = Digest("sha256", hasher.hexdigest())
    os.makedirs(store.blob_path(digest).parent, exist_ok=True)
    os.replace(layer, store.blob_path(digest))
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", **put(store, b"{}")}
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
           "layers": [{"mediaType": LAYER, "digest": str(digest), "size": 64 << 20}]}
    manifest = put(store, json.dumps(doc).encode())
    store.link_manifest("docker.io/library/big", Digest(*manifest["digest"].split(":")), OCI_MANIFEST)
    store.set_tag("docker.io/library/big", "latest", Digest(*manifest["digest"].split(":")))
    source_config = config_for(tmp_path / "source")
    dest = FilesystemStore(tmp_path / "target")
    tracemalloc.start()
    try:
        export(store, source_config, tmp_path / "out.tar")
        _, export_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        import_archive(dest, config_for(tmp_path / "target"), tmp_path / "out.tar")
        _, import_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert export_peak < 8 << 20 and import_peak < 8 << 20, (export_peak, import_peak)
    assert dest.stat(digest) == 64 << 20


# the commands ---------------------------------------------------------------------------------
