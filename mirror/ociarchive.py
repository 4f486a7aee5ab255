"""``mirror export`` and ``mirror import``: cached images as an OCI image-layout tar.

**Export** writes ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>`` for the images
named (or every tagged image in the store), each listed in ``index.json`` under its full
reference (``docker.io/library/hello:latest``), so ``skopeo copy
oci-archive:FILE:docker.io/library/hello:latest ...`` finds it.  Blobs stream from the
store into the tar (constant memory) and are hashed on the way: a store file that no
longer matches its digest stops the export.  The archive is written under a temporary
name and renamed when whole.

**Import** reads an archive in one pass.  Every blob is verified against its name as it
is written into the store with a :class:`~mirror.store.BlobWriter` (committed only when
it matches: content-addressed, so a verified blob landing early is harmless and garbage
collection removes it if nothing ever refers to it).  Only after the whole archive was
read, every image in ``index.json`` was walked and every manifest, config and layer was
found verified with the right size, are manifests linked and tags set.  A corrupt,
truncated or tampered archive is refused with one line and leaves no repository, link
or tag behind.
"""

from __future__ import annotations

import io
import os
import secrets
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import attrs

from mirror.config import MirrorConfig
from mirror.errors import RegistryError
from mirror.fsstore import FilesystemStore
from mirror.imageref import ImageRefError, full_reference, parse_image_ref, route_image
from mirror.oci import Digest
from mirror.ocilayout import (
    LAYOUT_FILE,
    Descriptor,
    ImageClosure,
    LayoutError,
    blob_member,
    build_index,
    check_layout_file,
    image_closure,
    image_name,
    parse_blob_member,
    parse_index,
)
from mirror.progress import format_bytes
from mirror.routing import Route
from mirror.store import DigestMismatch

__all__ = ["ArchiveError", "ExportEntry", "export_archive", "import_archive", "plan_export"]

#: Bytes per read when copying a blob.
CHUNK = 1024 * 1024
#: Largest ``index.json`` / ``oci-layout`` read.
MAX_INDEX = 16 * 1024 * 1024
MAX_LAYOUT_FILE = 4096


class ArchiveError(Exception):
    """An export or import that cannot be done; ``str()`` is one line."""


# export ---------------------------------------------------------------------------------------
@attrs.frozen
class ExportEntry:
    """One image to export: its full reference and everything it consists of."""

    name: str
    closure: ImageClosure


@attrs.frozen
class ExportResult:
    images: int
    blobs: int
    bytes: int
    seconds: float


def _closure(store: FilesystemStore, config: MirrorConfig, repo: str, digest: Digest) -> ImageClosure:
    media_type = store.manifest_media_type(repo, digest)
    size = store.blob_size(digest)
    if media_type is None or size is None:
        raise LayoutError(f"manifest {digest} is not in the store")
    return image_closure(
        Descriptor(media_type, digest, size),
        lambda d: store.read_blob(d, config.max_manifest_size),
        store.blob_size,
        strict=False,
    )


def plan_export(store: FilesystemStore, config: MirrorConfig, images: Sequence[str]) -> tuple[list[ExportEntry], list[str]]:
    """The images to export — the named ones, else every tagged image — and warnings.

    Raises:
        ArchiveError: a named image is malformed, not cached, or not whole.
    """
    entries: dict[str, ExportEntry] = {}
    warnings: list[str] = []

    def add(name: str, closure: ImageClosure) -> None:
        if closure.missing_children:
            present = len(closure.manifests) - 1
            warnings.append(
                f"{name}: {present} of {present + len(closure.missing_children)} platform manifests are cached; "
                "the archive holds those"
            )
        entries[name] = ExportEntry(name, closure)

    for text in images:
        try:
            ref = parse_image_ref(text)
            r = route_image(ref, config.upstreams, config.hosted)
        except ImageRefError as e:
            raise ArchiveError(str(e)) from None
        except RegistryError as e:
            raise ArchiveError(f"{text}: {e.message}") from None
        tag = None if ref.digest else (ref.tag or "latest")
        digest = ref.digest or store.get_tag(r.repo_key, tag)  # type: ignore[arg-type]
        name = full_reference(r.repo_key, tag, ref.digest)
        if digest is None:
            raise ArchiveError(f"{text}: {name} is not in the store (warm it first)")
        try:
            add(name, _closure(store, config, r.repo_key, digest))
        except LayoutError as e:
            raise ArchiveError(f"{text}: {name} is not whole in the store: {e}") from None
    if not images:
        for repo in store.repositories():
            for tag in store.list_tags(repo) or []:
                name = full_reference(repo, tag)
                digest = store.get_tag(repo, tag)
                try:
                    if digest is None:
                        raise LayoutError("its tag file is unreadable")
                    add(name, _closure(store, config, repo, digest))
                except LayoutError as e:
                    warnings.append(f"{name}: left out, it is not whole in the store: {e}")
    return sorted(entries.values(), key=lambda e: e.name), warnings


class _Verifying:
    """A reader that hashes what it hands on (tarfile copies from it)."""

    def __init__(self, file: BinaryIO, digest: Digest) -> None:
        self._file = file
        self._hash = digest.hasher()

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(n)
        self._hash.update(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # the same images make the same archive
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    return info


def export_archive(
    store: FilesystemStore,
    entries: Sequence[ExportEntry],
    out: Path,
    *,
    now: Callable[[], float] = time.monotonic,
    report: Callable[[str], None] = lambda line: None,
) -> ExportResult:
    """Write ``entries`` to ``out`` as an OCI image-layout tar (atomically: temp + rename)."""
    started = now()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
    index = build_index([(e.closure.top, e.name) for e in entries])
    written: set[Digest] = set()
    total = 0
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tar:
                tar.addfile(_info("oci-layout", len(LAYOUT_FILE)), io.BytesIO(LAYOUT_FILE))
                tar.addfile(_info("index.json", len(index)), io.BytesIO(index))
                tar.addfile(_info("blobs", directory=True))
                algorithms = sorted({d.algorithm for e in entries for d in e.closure.digests})
                for algorithm in algorithms:
                    tar.addfile(_info(f"blobs/{algorithm}", directory=True))
                for entry in entries:
                    for digest in entry.closure.digests:
                        if digest not in written:
                            total += _add_blob(tar, store, digest)
                            written.add(digest)
                    report(f"exported {entry.name} {entry.closure.top.digest}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(len(entries), len(written), total, now() - started)


def _add_blob(tar: tarfile.TarFile, store: FilesystemStore, digest: Digest) -> int:
    file = store.open_blob(digest)
    if file is None:
        raise ArchiveError(f"blob {digest} left the store during the export (garbage collection?); run it again")
    with file:
        size = os.fstat(file.fileno()).st_size
        reader = _Verifying(file, digest)
        tar.addfile(_info(blob_member(digest), size), reader)  # type: ignore[arg-type]
        if reader.hexdigest() != digest.encoded:
            raise ArchiveError(f"blob {digest} in the store does not match its digest (disk corruption?); export stopped")
    return size


# import ---------------------------------------------------------------------------------------
@attrs.define
class _Staged:
    """What one pass over an archive found."""

    layout: bytes | None = None
    index: bytes | None = None
    blobs: dict[Digest, int] = attrs.Factory(dict)  # verified, now in the store: digest -> size
    written: int = 0
    written_bytes: int = 0
    present: int = 0  # verified, and the store had them already


@attrs.frozen
class _Image:
    name: str
    route: Route
    tag: str | None
    closure: ImageClosure


@attrs.frozen
class ImportResult:
    images: list[tuple[str, Digest]]
    blobs: int
    written: int
    written_bytes: int
    present: int
    warnings: list[str]
    seconds: float

    def summary(self, path: Path) -> str:
        return (
            f"imported {len(self.images)} images from {path}: {self.blobs} blobs verified, "
            f"{self.written} written ({format_bytes(self.written_bytes)}), {self.present} already in the store; "
            f"{self.seconds:.1f} s"
        )


def import_archive(
    store: FilesystemStore,
    config: MirrorConfig,
    path: Path,
    *,
    clock: Callable[[], float] = time.time,
    report: Callable[[str], None] = lambda line: None,
) -> ImportResult:
    """Load an OCI image-layout tar (plain or compressed) into ``store``.

    Raises:
        ArchiveError: the archive is malformed, corrupt, truncated or incomplete, or an
            image in it is one this configuration does not serve; nothing was linked or
            tagged.
    """
    started = clock()
    try:
        staged = _stage(store, Path(path))
    except EOFError:
        raise ArchiveError("the archive ends early (truncated)") from None
    except tarfile.TarError as e:
        if "unexpected end" in str(e) or "truncated" in str(e):
            raise ArchiveError(f"the archive ends early (truncated: {e})") from None
        raise ArchiveError(f"not a readable tar archive ({e})") from None
    images, warnings = _plan_import(store, config, staged)
    _commit(store, images, clock)
    for image in images:
        report(f"imported {image.name} {image.closure.top.digest}")
    return ImportResult(
        [(i.name, i.closure.top.digest) for i in images],
        len(staged.blobs),
        staged.written,
        staged.written_bytes,
        staged.present,
        warnings,
        clock() - started,
    )


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if not member.isfile():
        raise ArchiveError(f"{member.name} is not a regular file")
    if member.size > limit:
        raise ArchiveError(f"{member.name} is {member.size} bytes, more than the {limit} allowed")
    src = tar.extractfile(member)
    assert src is not None
    data = src.read(member.size)  # not read(limit): that would allocate the limit up front
    if len(data) != member.size:
        raise ArchiveError(f"{member.name}: the archive ends early (truncated)")
    return data


def _stage(store: FilesystemStore, path: Path) -> _Staged:
    staged = _Staged()
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            name = _member_name(member.name)
            if member.isdir():
                continue
            if name == "oci-layout":
                staged.layout = _read_small(tar, member, MAX_LAYOUT_FILE)
                continue
            if name == "index.json":
                staged.index = _read_small(tar, member, MAX_INDEX)
                continue
            try:
                digest = parse_blob_member(name)
            except LayoutError as e:
                raise ArchiveError(str(e)) from None
            if digest is None:
                continue  # not part of the OCI layout (docker save's manifest.json, ...)
            if not member.isfile():
                raise ArchiveError(f"{member.name} is not a regular file")
            src = tar.extractfile(member)
            assert src is not None
            staged.blobs[digest] = _stage_blob(store, staged, digest, src, member.size)
    return staged


def _stage_blob(store: FilesystemStore, staged: _Staged, digest: Digest, src: BinaryIO, size: int) -> int:
    """Verify one blob; write it to the store unless it is there already."""
    if store.blob_size(digest) is not None:
        hasher, n = digest.hasher(), 0
        while chunk := src.read(CHUNK):
            hasher.update(chunk)
            n += len(chunk)
        if n != size:
            raise ArchiveError(f"{blob_member(digest)}: the archive ends early (truncated)")
        if hasher.hexdigest() != digest.encoded:
            raise ArchiveError(f"{blob_member(digest)} does not match its digest: the archive is corrupt or was tampered with")
        staged.present += 1
        return n
    writer = store.new_writer()
    try:
        if digest.algorithm != "sha256":
            writer.hash_also(digest)
        while chunk := src.read(CHUNK):
            writer.write(chunk)
        if writer.size != size:
            raise ArchiveError(f"{blob_member(digest)}: the archive ends early (truncated)")
        writer.commit(digest)
    except DigestMismatch:
        raise ArchiveError(f"{blob_member(digest)} does not match its digest: the archive is corrupt or was tampered with") from None
    finally:
        writer.abort()  # no-op after a commit
    staged.written += 1
    staged.written_bytes += size
    return size


def _plan_import(store: FilesystemStore, config: MirrorConfig, staged: _Staged) -> tuple[list[_Image], list[str]]:
    """Check everything the archive's ``index.json`` names; nothing is written here."""
    if staged.layout is None:
        raise ArchiveError("not an OCI image layout: the archive has no oci-layout file")
    try:
        check_layout_file(staged.layout)
        if staged.index is None:
            raise LayoutError("the archive has no index.json")
        entries = parse_index(staged.index)
    except LayoutError as e:
        raise ArchiveError(str(e)) from None
    if not entries:
        raise ArchiveError("index.json lists no images")

    def read(d: Digest) -> bytes | None:
        return store.read_blob(d, config.max_manifest_size) if d in staged.blobs else None

    images: list[_Image] = []
    tags: dict[tuple[str, str], Digest] = {}
    warnings: list[str] = []
    for i, d in enumerate(entries):
        name = image_name(d)
        if name is None:
            raise ArchiveError(
                f"index.json manifests[{i}] ({d.digest}) carries no full image name "
                "(org.opencontainers.image.ref.name such as docker.io/library/hello:latest)"
            )
        try:
            ref = parse_image_ref(name)
            r = route_image(ref, config.upstreams, config.hosted)
        except ImageRefError as e:
            raise ArchiveError(f"index.json manifests[{i}]: {e}") from None
        except RegistryError as e:
            raise ArchiveError(f"{name}: {e.message}") from None
        if ref.digest is not None and ref.digest != d.digest:
            raise ArchiveError(f"{name}: index.json lists it as {d.digest}")
        try:
            closure = image_closure(d, read, staged.blobs.get, strict=True)
        except LayoutError as e:
            raise ArchiveError(f"{name}: {e}") from None
        tag = ref.tag if ref.tag is not None else (None if ref.digest is not None else "latest")
        if tag is not None:
            earlier = tags.setdefault((r.repo_key, tag), d.digest)
            if earlier != d.digest:
                raise ArchiveError(f"{name}: index.json lists it twice, as {earlier} and {d.digest}")
        if closure.missing_children:
            present = len(closure.manifests) - 1
            warnings.append(f"{name}: {present} of {present + len(closure.missing_children)} platform manifests are in the archive")
        images.append(_Image(full_reference(r.repo_key, tag, None if tag else d.digest), r, tag, closure))
    return images, warnings


def _commit(store: FilesystemStore, images: Sequence[_Image], clock: Callable[[], float]) -> None:
    """Link manifests (children first) and set tags, holding off garbage collection."""
    digests = {digest for image in images for digest in image.closure.digests}
    handle = None
    for _ in range(1200):
        handle = store.try_push_lock()
        if handle is not None:
            break
        time.sleep(0.05)
    if handle is None:
        raise ArchiveError("garbage collection is holding the store; nothing was linked or tagged, try again")
    try:
        # As a push does: refresh the blobs first, so that a concurrent GC keeps them.
        store.touch((d, clock()) for d in digests)
        gone = [d for d in digests if store.blob_size(d) is None]
        if gone:
            raise ArchiveError(f"{len(gone)} verified blobs left the store meanwhile (garbage collection?); run the import again")
        for image in images:
            repo = image.route.repo_key
            for m in reversed(image.closure.manifests):
                store.link_manifest(repo, m.digest, m.media_type)
            if image.route.hosted:
                for b in image.closure.blobs:
                    store.link_blob(repo, b.digest)
        for image in images:
            if image.tag is not None:
                store.set_tag(image.route.repo_key, image.tag, image.closure.top.digest)
    finally:
        store.release_lock(handle)
