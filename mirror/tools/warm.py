"""``mirror warm``: pre-fetch images into the cache through the service's own fetch path.

Each image is resolved through the registry's own repositories
(:meth:`~mirror.registry.repository.Repository.get_manifest`: the index, then the child
manifests of the wanted platforms) and every config and layer is fetched with
:meth:`~mirror.registry.repository.Repository.get_blob`, so what lands in the store was
verified exactly as for a client's pull: hashed as it arrives, fsynced, renamed into place.  A blob already in the
store is a cache hit and is not downloaded again, so a run that was interrupted resumes
where it stopped.

``jobs`` images are warmed at a time; a blob shared by several images is fetched once.
The registry is the running service's (:func:`mirror.tap.build_registry`), so warming
the store of a running service does not disturb it: spool names are unique, commits are
atomic renames, and the start-up clean-up removes only spool files no live process holds
(:mod:`mirror.storage.spool`).  Fills a dead service left to resume are left to the
service (warm exits when its own images are done).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TextIO

import attrs

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from mirror.config import ConfigError, MirrorConfig
from mirror.core.errors import RegistryError
from mirror.core.imageref import ImageRef, ImageRefError, full_reference, parse_image_ref
from mirror.core.manifest import Descriptor
from mirror.core.oci import MANIFEST_MEDIA_TYPES, Digest, parse_reference
from mirror.core.ocilayout import LayoutError, layout_manifest
from mirror.core.platforms import PlatformChoice, PlatformError, platform_of, select_children
from mirror.registry.fills import BlobFill
from mirror.registry.registry import Registry
from mirror.registry.repository import Repository, StoredManifest
from mirror.registry.singleflight import SingleFlight
from mirror.storage.sending import Source
from mirror.tap import build_registry
from mirror.tools.progress import Progress, format_bytes, format_rate

__all__ = ["ImageResult", "WarmReport", "Warmer", "read_image_list", "run_warm"]

#: Every manifest type: warm takes whatever the upstream serves for a reference.
ACCEPT = list(MANIFEST_MEDIA_TYPES)


def read_image_list(lines: Iterable[str]) -> list[str]:
    """Image references from a list file: one per line; blank lines and ``#`` comments skipped."""
    images = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if text:
            images.append(text)
    return images


@attrs.define
class ImageResult:
    """How warming one image went."""

    image: str  # as the user wrote it
    reference: str | None = None  # the full reference in the store: docker.io/library/alpine:3.19
    digest: Digest | None = None  # of the top manifest
    platforms: list[str] = attrs.Factory(list)  # of the children taken, for an index
    manifests: int = 0
    blobs: int = 0
    fetched: int = 0  # blobs of this image that this run downloaded
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def line(self) -> str:
        """The line printed when the image is done."""
        if self.error is not None:
            return f"FAILED  {self.image}: {self.error}"
        where = f" ({', '.join(self.platforms)})" if self.platforms else ""
        return (
            f"ok      {self.reference} {self.digest}{where}: {self.blobs} blobs, "
            f"{self.fetched} fetched, {self.blobs - self.fetched} already cached"
        )


@attrs.define
class WarmReport:
    """What a run did."""

    images: list[ImageResult]
    blobs_fetched: int = 0
    bytes_fetched: int = 0
    blobs_cached: int = 0
    bytes_cached: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list[ImageResult]:
        return [i for i in self.images if not i.ok]

    def summary(self) -> str:
        """One line: images, manifests, blobs and bytes fetched vs already cached, time."""
        manifests = sum(i.manifests for i in self.images)
        ok = len(self.images) - len(self.failed)
        text = (
            f"summary: {len(self.images)} images ({ok} ok, {len(self.failed)} failed), {manifests} manifests; "
            f"blobs: {self.blobs_fetched} fetched ({format_bytes(self.bytes_fetched)}), "
            f"{self.blobs_cached} already cached ({format_bytes(self.bytes_cached)}); "
            f"{self.seconds:.1f} s, {format_rate(self.bytes_fetched, self.seconds)}"
        )
        if not self.blobs_fetched and not self.failed:
            text += "; everything was already cached"
        return text


def _follow(source: Source, on_bytes: Callable[[int], None]) -> Deferred[None]:
    """Fires when ``source`` is whole and verified, fails with its failure; reports bytes."""
    d: Deferred[None] = Deferred()

    def check() -> None:
        if d.called:
            return
        on_bytes(source.readable_end())
        if source.failure is not None:
            source.unsubscribe(check)
            d.errback(source.failure)
        elif source.stored:
            source.unsubscribe(check)
            d.callback(None)

    source.subscribe(check)
    check()
    return d


class _ImageFailed(Exception):
    """Warming one image failed; the message says why."""


class Warmer:
    """Warms images through a :class:`~mirror.registry.registry.Registry`.

    Args:
        registry: the registry whose store is filled.
        platforms: which children of an index to take.
        jobs: images warmed at a time.
        progress: where progress goes (None: nowhere).
    """

    def __init__(self, registry: Registry, *, platforms: PlatformChoice, jobs: int = 4, progress: Progress | None = None) -> None:
        if jobs < 1:
            raise ValueError("jobs must be at least 1")
        self._registry = registry
        self._clock: IReactorTime = registry.clock
        self._platforms = platforms
        self._jobs = jobs
        self._progress = progress
        self._flights: SingleFlight[None] = SingleFlight()
        self._outcome: dict[Digest, str] = {}  # "fetched" or "cached", once done in this run
        self._fills: set[BlobFill] = set()  # fills this run follows (to stop on interrupt)
        self._interrupted = False
        self.report = WarmReport([])

    async def run(self, images: Sequence[str]) -> WarmReport:
        """Warm ``images`` (references as users write them), ``jobs`` at a time."""
        started = self._clock.seconds()
        unique = list(dict.fromkeys(images))
        self.report = WarmReport([ImageResult(text) for text in unique])
        if self._progress is not None:
            self._progress.start(len(unique))
        semaphore = DeferredSemaphore(self._jobs)

        def warm_one(result: ImageResult) -> Deferred[None]:
            return semaphore.run(lambda: Deferred.fromCoroutine(self._image(result)))

        try:
            await gatherResults([warm_one(result) for result in self.report.images])
        finally:
            if self._progress is not None:
                self._progress.stop()
        self.report.seconds = self._clock.seconds() - started
        return self.report

    async def interrupt(self, timeout: float = 5.0) -> None:
        """Stop the downloads under way, so that their spool files are removed."""
        self._interrupted = True
        for fill in list(self._fills):
            fill.abandon("mirror warm was interrupted")
        deadline = self._clock.seconds() + timeout
        while self._fills and self._clock.seconds() < deadline:
            await deferLater(self._clock, 0.05, lambda: None)

    # one image ----------------------------------------------------------------------------
    async def _image(self, result: ImageResult) -> None:
        try:
            ref = parse_image_ref(result.image)
            await self._warm(ref, result)
        except (ImageRefError, _ImageFailed) as e:
            result.error = str(e)
        except RegistryError as e:
            result.error = e.message
        except (LayoutError, PlatformError) as e:
            result.error = f"{result.reference or result.image}: {e}"
        except Exception as e:  # one image's surprise must not stop the others
            result.error = f"{type(e).__name__}: {e}"
        if self._progress is not None and not self._interrupted:
            self._progress.image_finished(result.line())

    async def _warm(self, ref: ImageRef, result: ImageResult) -> None:
        repo = self._registry.repository(ref.name, ref.ns)
        result.reference = full_reference(repo.key, None if ref.digest else (ref.tag or "latest"), ref.digest)
        top = await repo.get_manifest(parse_reference(ref.reference), ACCEPT)
        result.digest = top.digest
        leaves = await self._leaves(repo, top, result, 0)
        blobs: dict[Digest, Descriptor] = {}
        for content in leaves:
            for b in content:
                blobs.setdefault(b.digest, b)
        result.blobs = len(blobs)
        for b in blobs.values():
            await self._flights.run(b.digest, partial(self._blob, repo, b))
            if self._outcome.get(b.digest) == "fetched":
                result.fetched += 1

    async def _leaves(
        self, repo: Repository, manifest: StoredManifest, result: ImageResult, depth: int
    ) -> list[tuple[Descriptor, ...]]:
        """The blob lists of the image manifests under ``manifest`` (the wanted platforms)."""
        result.manifests += 1
        content = layout_manifest(manifest.data, manifest.media_type)
        if not content.is_index:
            return [content.blobs]
        if depth > 4:
            raise LayoutError(f"index {manifest.digest} nests indexes too deep")
        children = select_children(content.children, self._platforms, lambda d: d.platform)
        leaves = []
        for child in children:
            if depth == 0 and (p := platform_of(child.platform)) is not None:
                result.platforms.append(str(p))
            m = await repo.get_manifest(parse_reference(str(child.digest)), ACCEPT)
            leaves += await self._leaves(repo, m, result, depth + 1)
        return leaves

    # one blob -----------------------------------------------------------------------------
    async def _blob(self, repo: Repository, d: Descriptor) -> None:
        if d.digest in self._outcome:
            return  # done earlier in this run, for another image
        body = await repo.get_blob(d.digest)
        try:
            if body.cache == "hit":
                self._check_size(d, body.size)
                self._done(d.digest, "cached", body.size or 0)
                if self._progress is not None:
                    self._progress.blob_cached(body.size or 0)
                return
            progress = self._progress
            if progress is not None:
                progress.blob_started(repo.key, d.digest, body.size if body.size is not None else d.size)
            source = body.responder.source
            fill = source if isinstance(source, BlobFill) else None
            if fill is not None:
                self._fills.add(fill)
            try:
                await _follow(source, lambda n: progress.blob_progress(d.digest, n) if progress else None)
            except Exception as e:
                if progress is not None:
                    progress.blob_finished(d.digest, None, ok=False)
                raise _ImageFailed(f"fetching blob {d.digest} failed: {e}") from None
            finally:
                if fill is not None:
                    self._fills.discard(fill)
            size = source.readable_end()
            if progress is not None:
                progress.blob_finished(d.digest, size, ok=True)
            self._check_size(d, size)
            self._done(d.digest, "fetched", size)
        finally:
            body.responder.close()

    @staticmethod
    def _check_size(d: Descriptor, size: int | None) -> None:
        if size is not None and size != d.size:
            raise _ImageFailed(f"blob {d.digest} is {size} bytes but its manifest says {d.size}")

    def _done(self, digest: Digest, outcome: str, size: int) -> None:
        self._outcome[digest] = outcome
        if outcome == "fetched":
            self.report.blobs_fetched += 1
            self.report.bytes_fetched += size
        else:
            self.report.blobs_cached += 1
            self.report.bytes_cached += size


# the command ----------------------------------------------------------------------------------
@implementer(ILogObserver)
class _WarningsToProgress:
    """Shows the registry's warnings that matter to whoever runs warm."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def __call__(self, event: LogEvent) -> None:
        if event.get("event_kind") == "stale_tag":
            self._progress.message(
                f"warning: {event.get('repository')}:{event.get('tag')}: upstream unreachable, "
                f"kept the cached {event.get('digest')} unchecked ({event.get('reason')})"
            )
        elif event.get("event_kind") == "digest_mismatch":
            self._progress.message(
                f"error: upstream sent {event.get('repository')}@{event.get('digest')} with wrong bytes; not cached"
            )


def run_warm(
    config: MirrorConfig,
    images: Sequence[str],
    *,
    platforms: PlatformChoice,
    jobs: int = 4,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run a warm on the global reactor; returns the exit code (0, 1 failures, 130 interrupted)."""
    from twisted.internet import reactor

    outcome: list[object] = []
    interrupted: list[bool] = []
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max(16, jobs)
    try:
        registry = build_registry(config, reactor, pool, resume_fills=False)
    except ConfigError as e:
        print(f"mirror warm: {e}", file=err)
        return 2
    progress = Progress(out, reactor, tty=out.isatty())
    warmer = Warmer(registry, platforms=platforms, jobs=jobs, progress=progress)
    observer = _WarningsToProgress(progress)

    async def main() -> WarmReport:
        try:
            return await warmer.run(images)
        finally:
            await pool.closeCachedConnections()

    def start() -> None:
        def done(result: object) -> None:
            outcome.append(result)
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass  # already stopping (interrupted)

        Deferred.fromCoroutine(main()).addBoth(done)

    async def before_shutdown() -> None:
        if not outcome:
            interrupted.append(True)
            progress.stop()
            await warmer.interrupt()
        await registry.access.flush()  # warming counts as a pull for LRU eviction

    unique = len(dict.fromkeys(images))
    print(
        f"warming {unique} image{'s' if unique != 1 else ''} into {config.storage.location} "
        f"(platforms: {platforms}), {min(jobs, unique)} at a time",
        file=out,
    )
    globalLogPublisher.addObserver(observer)
    try:
        reactor.callWhenRunning(start)
        reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(before_shutdown()))
        reactor.run()
    finally:
        globalLogPublisher.removeObserver(observer)
    if interrupted or not outcome:
        print("mirror warm: interrupted; what was verified is kept, run it again to resume", file=err)
        return 130
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, WarmReport)
    print(result.summary(), file=out)
    out.flush()  # before stderr, so that a shared log keeps the order
    for failed in result.failed:
        print(f"mirror warm: failed: {failed.image}: {failed.error}", file=err)
    return 1 if result.failed else 0
