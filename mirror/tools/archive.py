"""``mirror export`` and ``mirror import``: cached images as an OCI image-layout tar.

**Export** writes ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>`` for the images
named (or every tagged image in the store), each listed in ``index.json`` under its full
reference (``docker.io/library/hello:latest``), so ``skopeo copy
oci-archive:FILE:docker.io/library/hello:latest ...`` finds it.  Blobs stream from the
store into the tar (constant memory) and are hashed on the way: a store file that no
longer matches its digest stops the export.  The archive is written under a temporary
name and renamed when whole.

**Import** reads an archive in one pass.  Every blob is verified against its name as it
is written into the store with a :class:`~mirror.storage.base.BlobWriter` (committed only when
it matches: content-addressed, so a verified blob landing early is harmless and garbage
collection removes it if nothing ever refers to it).  Only after the whole archive was
read, every image in ``index.json`` was walked and every manifest, config and layer was
found verified with the right size, are manifests linked and tags set.  A corrupt,
truncated or tampered archive is refused with one line and leaves no repository, link
or tag behind.
"""

from __future__ import annotations

import os
import secrets
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, BinaryIO

import attrs

from twisted.internet.interfaces import IConsumer, IReactorTime
from zope.interface import implementer

from mirror.config import MirrorConfig
from mirror.core.errors import RegistryError
from mirror.core.imageref import ImageRefError, full_reference, parse_image_ref
from mirror.core.oci import Digest
from mirror.core.ocilayout import (
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
from mirror.core.routing import Route, Router
from mirror.registry.gc import holding_off_gc
from mirror.storage.base import DigestMismatch, Store
from mirror.storage.sending import ReadFailed
from mirror.tools.progress import format_bytes

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


async def _closure(store: Store, config: MirrorConfig, repo: str, digest: Digest) -> ImageClosure:
    media_type = await store.metadata.manifest_media_type(repo, digest)
    size = await store.blobs.stat(digest)
    if media_type is None or size is None:
        raise LayoutError(f"manifest {digest} is not in the store")

    async def read(d: Digest) -> bytes | None:
        return await store.blobs.read(d, config.max_manifest_size)

    return await image_closure(Descriptor(media_type, digest, size), read, store.blobs.stat, strict=False)


async def plan_export(store: Store, config: MirrorConfig, images: Sequence[str]) -> tuple[list[ExportEntry], list[str]]:
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

    router = Router(config.upstreams, config.hosted)
    for text in images:
        try:
            ref = parse_image_ref(text)
            r = router.route(ref.name, ref.ns)
        except ImageRefError as e:
            raise ArchiveError(str(e)) from None
        except RegistryError as e:
            raise ArchiveError(f"{text}: {e.message}") from None
        tag = None if ref.digest else (ref.tag or "latest")
        digest = ref.digest if ref.digest is not None else await store.metadata.get_tag(r.key, tag or "latest")
        name = full_reference(r.key, tag, ref.digest)
        if digest is None:
            raise ArchiveError(f"{text}: {name} is not in the store (warm it first)")
        try:
            add(name, await _closure(store, config, r.key, digest))
        except LayoutError as e:
            raise ArchiveError(f"{text}: {name} is not whole in the store: {e}") from None
    if not images:
        for repo in await store.metadata.repositories():
            for tag in await store.metadata.list_tags(repo) or []:
                name = full_reference(repo, tag)
                digest = await store.metadata.get_tag(repo, tag)
                try:
                    if digest is None:
                        raise LayoutError("its tag file is unreadable")
                    add(name, await _closure(store, config, repo, digest))
                except LayoutError as e:
                    warnings.append(f"{name}: left out, it is not whole in the store: {e}")
    return sorted(entries.values(), key=lambda e: e.name), warnings


@implementer(IConsumer)
class _VerifyingCopy:
    """Takes a blob from a responder into the archive file, hashing it on the way."""

    def __init__(self, out: BinaryIO, digest: Digest) -> None:
        self._out = out
        self._hash = digest.hasher()
        self.size = 0

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass  # a local file never pushes back: the producer runs to the end

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._hash.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _header(name: str, size: int = 0, directory: bool = False) -> bytes:
    """A tar member header (PAX), its data to follow padded to 512-byte blocks."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # the same images make the same archive
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _small_member(out: BinaryIO, name: str, data: bytes) -> None:
    out.write(_header(name, len(data)))
    out.write(data)
    out.write(_padding(len(data)))


async def export_archive(
    store: Store,
    entries: Sequence[ExportEntry],
    out: Path,
    *,
    now: Callable[[], float] = time.monotonic,
    report: Callable[[str], None] = lambda line: None,
) -> ExportResult:
    """Write ``entries`` to ``out`` as an OCI image-layout tar (atomically: temp + rename).

    Blobs stream from the store's responders into the file, hashed on the way.
    """
    started = now()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
    index = build_index([(e.closure.top, e.name) for e in entries])
    written: set[Digest] = set()
    total = 0
    try:
        with open(tmp, "wb") as f:
            _small_member(f, "oci-layout", LAYOUT_FILE)
            _small_member(f, "index.json", index)
            f.write(_header("blobs", directory=True))
            algorithms = sorted({d.algorithm for e in entries for d in e.closure.digests})
            for algorithm in algorithms:
                f.write(_header(f"blobs/{algorithm}", directory=True))
            for entry in entries:
                for digest in entry.closure.digests:
                    if digest not in written:
                        total += await _add_blob(f, store, digest)
                        written.add(digest)
                report(f"exported {entry.name} {entry.closure.top.digest}")
            f.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end of archive
            f.write(b"\0" * (-f.tell() % tarfile.RECORDSIZE))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(len(entries), len(written), total, now() - started)


async def _add_blob(out: BinaryIO, store: Store, digest: Digest) -> int:
    responder = await store.blobs.open(digest)
    if responder is None:
        raise ArchiveError(f"blob {digest} left the store during the export (garbage collection?); run it again")
    size = responder.size
    if size is None:
        responder.close()
        raise ArchiveError(f"blob {digest} is not whole in the store yet; run the export again")
    out.write(_header(blob_member(digest), size))
    copy = _VerifyingCopy(out, digest)
    try:
        await responder.send(copy)
    except ReadFailed as e:
        raise ArchiveError(f"blob {digest} could not be read whole from the store ({e}); export stopped") from None
    if copy.size != size or copy.hexdigest() != digest.encoded:
        raise ArchiveError(f"blob {digest} in the store does not match its digest (disk corruption?); export stopped")
    out.write(_padding(size))
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


async def import_archive(
    store: Store,
    config: MirrorConfig,
    path: Path,
    reactor: IReactorTime,
    *,
    report: Callable[[str], None] = lambda line: None,
) -> ImportResult:
    """Load an OCI image-layout tar (plain or compressed) into ``store``.

    ``reactor`` gives the time (and paces waits for a garbage collection in progress).

    Raises:
        ArchiveError: the archive is malformed, corrupt, truncated or incomplete, or an
            image in it is one this configuration does not serve; nothing was linked or
            tagged.
    """
    started = reactor.seconds()
    try:
        staged = await _stage(store, Path(path))
    except EOFError:
        raise ArchiveError("the archive ends early (truncated)") from None
    except tarfile.TarError as e:
        if "unexpected end" in str(e) or "truncated" in str(e):
            raise ArchiveError(f"the archive ends early (truncated: {e})") from None
        raise ArchiveError(f"not a readable tar archive ({e})") from None
    images, warnings = await _plan_import(store, config, staged)
    await _commit(store, images, reactor)
    for image in images:
        report(f"imported {image.name} {image.closure.top.digest}")
    return ImportResult(
        [(i.name, i.closure.top.digest) for i in images],
        len(staged.blobs),
        staged.written,
        staged.written_bytes,
        staged.present,
        warnings,
        reactor.seconds() - started,
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


async def _stage(store: Store, path: Path) -> _Staged:
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
            staged.blobs[digest] = await _stage_blob(store, staged, digest, src, member.size)
    return staged


async def _stage_blob(store: Store, staged: _Staged, digest: Digest, src: IO[bytes], size: int) -> int:
    """Verify one blob; write it to the store unless it is there already."""
    if await store.blobs.stat(digest) is not None:
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
    writer = store.blobs.writer()
    try:
        if digest.algorithm != "sha256":
            writer.hash_also(digest)
        while chunk := src.read(CHUNK):
            writer.write(chunk)
        if writer.size != size:
            raise ArchiveError(f"{blob_member(digest)}: the archive ends early (truncated)")
        await writer.commit(digest)
    except DigestMismatch:
        raise ArchiveError(
            f"{blob_member(digest)} does not match its digest: the archive is corrupt or was tampered with"
        ) from None
    finally:
        writer.abort()  # no-op after a commit
    staged.written += 1
    staged.written_bytes += size
    return size


async def _plan_import(store: Store, config: MirrorConfig, staged: _Staged) -> tuple[list[_Image], list[str]]:
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

    async def read(d: Digest) -> bytes | None:
        return await store.blobs.read(d, config.max_manifest_size) if d in staged.blobs else None

    async def staged_size(d: Digest) -> int | None:
        return staged.blobs.get(d)

    router = Router(config.upstreams, config.hosted)
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
            r = router.route(ref.name, ref.ns)
        except ImageRefError as e:
            raise ArchiveError(f"index.json manifests[{i}]: {e}") from None
        except RegistryError as e:
            raise ArchiveError(f"{name}: {e.message}") from None
        if ref.digest is not None and ref.digest != d.digest:
            raise ArchiveError(f"{name}: index.json lists it as {d.digest}")
        try:
            closure = await image_closure(d, read, staged_size, strict=True)
        except LayoutError as e:
            raise ArchiveError(f"{name}: {e}") from None
        tag = ref.tag if ref.tag is not None else (None if ref.digest is not None else "latest")
        if tag is not None:
            earlier = tags.setdefault((r.key, tag), d.digest)
            if earlier != d.digest:
                raise ArchiveError(f"{name}: index.json lists it twice, as {earlier} and {d.digest}")
        if closure.missing_children:
            present = len(closure.manifests) - 1
            warnings.append(
                f"{name}: {present} of {present + len(closure.missing_children)} platform manifests are in the archive"
            )
        images.append(_Image(full_reference(r.key, tag, None if tag else d.digest), r, tag, closure))
    return images, warnings


async def _commit(store: Store, images: Sequence[_Image], reactor: IReactorTime) -> None:
    """Link manifests (children first) and set tags, holding off garbage collection."""
    digests = {digest for image in images for digest in image.closure.digests}

    async def link() -> None:
        # As a push does: mark the blobs just used first, so that a concurrent GC keeps them.
        await store.access.record(dict.fromkeys(digests, reactor.seconds()))
        gone = [d for d in digests if await store.blobs.stat(d) is None]
        if gone:
            raise ArchiveError(f"{len(gone)} verified blobs left the store meanwhile (garbage collection?); run the import again")
        for image in images:
            repo = image.route.key
            for m in reversed(image.closure.manifests):
                await store.metadata.link_manifest(repo, m.digest, m.media_type)
            for b in image.closure.blobs:  # mirrored: as if fetched for the repository
                await store.metadata.link_blob(repo, b.digest, fetched=not image.route.hosted)
        for image in images:
            if image.tag is not None:
                await store.metadata.set_tag(image.route.key, image.tag, image.closure.top.digest)

    try:
        await holding_off_gc(store.gc_lock, reactor, link, patience=60.0)
    except RegistryError:
        raise ArchiveError("garbage collection is holding the store; nothing was linked or tagged, try again") from None
