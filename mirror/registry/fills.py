"""Blob fills: one upstream download per blob, verified on its way into the store.

:class:`BlobFill` is the protocol that receives one upstream blob body, read from the
socket 1 MiB at a time.  It hands the chunks, batch by batch, to a thread that writes
them to a :class:`~mirror.storage.base.BlobWriter` spool and hashes them (both release
the GIL, so this runs beside the reactor on another core): a batch is what arrived in
one turn of the reactor (or 1 MiB), so a TLS body's 16 KiB records do not each cost a
hand-off.  It pauses the upstream socket if the disk falls 8 MiB behind; when the body
ends it verifies the digest and commits.  It never
waits for clients: a slow or departed client cannot stall or cancel a fill.  It is the
:class:`~mirror.storage.sending.Source` its followers' responders follow, and it holds
back the last byte until the digest has verified, so a client never receives a
complete-looking body whose bytes turn out wrong.  A body that breaks mid-way (a reset,
a close, a stall) is resumed: ``resume(offset)`` asks the upstream for the bytes from
there on and they continue the same file and the same digest computation, so clients
already streaming never notice.  Only when that fails too does the fill fail, and its
followers' responses are cut off, never completed as if whole.

:class:`Fills` is the one place that answers "is this blob already being fetched?":
every request for a digest either starts its fill or joins the one under way (from the
moment the upstream request is sent until the blob is committed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from mirror.core.oci import Digest
from mirror.registry.singleflight import Shared
from mirror.responses import Discard, read_in_large_chunks, stop_body
from mirror.storage.base import BlobWriter, DigestMismatch
from mirror.storage.sending import Responder

__all__ = ["BlobFill", "FillFailed", "Fills", "Resume", "UntilStored"]

#: Asks the upstream for a blob from an offset on (and says why: how the body broke): the
#: response and how many of its first bytes come before the offset (to skip).
Resume = Callable[[int, str], Coroutine[Any, Any, tuple[IResponse, int]]]

#: Bytes received that go to the writer thread at once; less waits for the end of the
#: reactor's turn (a TLS upstream's body arrives 16 KiB record by record: one hand-off
#: per record would cost more than the hashing), except the first bytes of a body.
BATCH = 1024 * 1024
#: A fill holding more than this in memory, waiting for the disk, pauses the upstream...
QUEUE_HIGH = 8 * 1024 * 1024
#: ...and resumes it below this.
QUEUE_LOW = 2 * 1024 * 1024
#: A resumed body that breaks again before this many bytes made no progress...
RESUME_PROGRESS = 64 * 1024
#: ...and after this many such resumes in a row the fill fails.
FRUITLESS_RESUMES = 3


class FillFailed(Exception):
    """An upstream blob fill did not complete with verified bytes."""


class BlobFill(Protocol):
    """Receives an upstream blob body into a spool, then verifies and commits it.

    Args:
        writer: where the bytes go.
        digest: what they must hash to.
        expected_size: the upstream's ``Content-Length``, if it sent one.
        clock: for the idle timeout.
        idle_timeout: seconds without a byte before the fill is abandoned.
        run_blocking: runs batches of writes off the reactor thread; returns a Deferred.
        tail_timeout: the idle timeout instead, once all but the last byte of a known size
            arrived (a node being followed holds the last byte back until it stored the blob).
        resume: asks for the rest of a body that broke (see :data:`Resume`); without it a
            broken body fails the fill.
        received: bytes of the blob the writer holds already (a fill resumed after a
            restart: the body starts there).
        skip: bytes at the start of the body from before ``received``.
    """

    _log = Logger()

    def __init__(
        self,
        writer: BlobWriter,
        digest: Digest,
        expected_size: int | None,
        clock: IReactorTime,
        idle_timeout: float,
        run_blocking: Callable[..., Deferred[Any]],
        *,
        tail_timeout: float | None = None,
        resume: Resume | None = None,
        received: int = 0,
        skip: int = 0,
    ) -> None:
        self.writer = writer
        self._resume = resume
        self._resuming = False  # between a break and the resumed body's first byte
        self._resumed_at = received  # bytes received when the body last (re)started
        self._fruitless = 0  # resumes in a row that broke again without progress
        self._skip = skip  # bytes of a resumed body from before the offset asked for
        self._stalled = False  # the idle timeout stopped the body: resume it
        self._tail_timeout = tail_timeout
        self.digest = digest
        self.expected_size = expected_size
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._run_blocking = run_blocking
        self._idle: IDelayedCall | None = None
        self._listeners: list[Callable[[], None]] = []
        self._problem: str | None = None
        self._received = received  # bytes from the upstream (and, resumed after a restart, on disk)
        self._queue: list[bytes] = []  # received, not yet handed to the writer thread
        self._pending = 0  # ...its bytes
        self._queued = 0  # bytes received and not yet on disk
        self._writing = False
        self._turn_end: IDelayedCall | None = None  # hands the queue over once the reactor's turn ends
        self._upstream_paused = False
        self._lost: Failure | None = None  # how the body ended, once it has
        self._completed = False
        self.verified = False  # every byte received and the digest verified
        self.stored = False  # ...and committed to the store
        self.failure: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def follower(self) -> Responder:
        """A responder for one more client, following the spool as it grows."""
        return self.writer.follow(self, self.expected_size)

    # Source -------------------------------------------------------------------------------
    def readable_end(self) -> int:
        size = self.writer.size
        if self.verified or self.expected_size is None:
            return size
        return min(size, self.expected_size - 1)

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            callback()

    # IProtocol ----------------------------------------------------------------------------
    def connectionMade(self) -> None:
        read_in_large_chunks(self.transport)
        self._reset_idle()

    def dataReceived(self, data: bytes) -> None:
        if self._problem is not None:
            return
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
            self._reset_idle()
            if not data:
                return
        if self.expected_size is not None and self._received + len(data) > self.expected_size:
            self._give_up(f"upstream sent more than its Content-Length of {self.expected_size}")
            return
        self._received += len(data)
        self._queue.append(data)
        self._pending += len(data)
        self._queued += len(data)
        self._reset_idle()
        if self._queued > QUEUE_HIGH and not self._upstream_paused and self.transport is not None:
            self._upstream_paused = True  # the disk is behind: let TCP hold the rest
            IPushProducer(self.transport).pauseProducing()
        if self._pending >= BATCH or self.writer.size == 0:
            self._flush()
        elif self._turn_end is None:
            self._turn_end = self._clock.callLater(0, self._flush_at_turn_end)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self._problem is None and self._resume is not None and self._broke(reason):
            self._resume_after(reason)
            return
        self._lost = reason
        self._flush()

    # resuming a body that broke -----------------------------------------------------------
    def _broke(self, reason: Failure) -> bool:
        """Whether the body ended before its end (so the rest is worth asking for)."""
        if self._stalled:
            return True
        if reason.check(ResponseDone):  # (a 206 may end short of what was asked)
            return self.expected_size is not None and self._received < self.expected_size
        # A body of unknown length read until the connection closed ends like this: its
        # end, as far as anyone can tell; the digest decides.
        return not (self.expected_size is None and reason.check(PotentialDataLoss))

    def _resume_after(self, reason: Failure) -> None:
        assert self._resume is not None
        why = "it stalled" if self._stalled else reason.getErrorMessage()
        progress = self._received - self._resumed_at
        self._fruitless = 0 if progress >= RESUME_PROGRESS else self._fruitless + 1
        if self._fruitless > FRUITLESS_RESUMES:
            self._problem = f"upstream body kept breaking at byte {self._received} ({why})"
            self._lost = reason
            self._flush()
            return
        self._resuming, self._stalled, self._upstream_paused = True, False, False
        self._tail_timeout = None  # (a followed node's held-back last byte: the upstream holds none back)
        self.transport = None  # (the old body's: nothing to pause or stop any more)
        d: Deferred[tuple[IResponse, int]] = Deferred.fromCoroutine(self._resume(self._received, why))
        d.addCallbacks(self._resumed, self._resume_failed, errbackArgs=(reason, why))
        d.addErrback(self._broken_resume)

    def _broken_resume(self, failure: Failure) -> None:
        # A bug in the lines above, not an upstream's doing: the fill fails rather than hang.
        self._log.failure("resuming the fill of {digest} failed", failure, digest=str(self.digest))
        if not self.done.called:
            self.writer.abort()
            self._fail(failure)

    def _resumed(self, result: tuple[IResponse, int]) -> None:
        response, skip = result
        self._resuming = False
        if self._problem is not None:  # abandoned meanwhile
            response.deliverBody(Discard())
            self._lost = Failure(FillFailed(self._problem))
            self._flush()
            return
        self._resumed_at, self._skip = self._received, skip
        response.deliverBody(self)  # (makeConnection again, with the new body's transport)

    def _resume_failed(self, failure: Failure, reason: Failure, why: str) -> None:
        self._resuming = False
        if self._problem is None:
            self._problem = (
                f"upstream body broke at byte {self._received} ({why}) and could not be resumed: {failure.getErrorMessage()}"
            )
        self._lost = reason
        self._flush()

    # writing: the disk write and the hash run in a thread, batch after batch --------------
    def _flush_at_turn_end(self) -> None:
        self._turn_end = None
        self._flush()

    def _flush(self) -> None:
        if self._writing or self._completed:
            return
        if self._queue and self._problem is None:
            batch, count, self._queue, self._pending = self._queue, self._pending, [], 0
            self._writing = True
            d = self._run_blocking(self.writer.write, *batch)
            d.addCallbacks(self._wrote, self._write_failed, callbackArgs=(count,))
        elif self._lost is not None:
            self._complete(self._lost)

    def _wrote(self, _: object, count: int) -> None:
        self._writing = False
        self._queued -= count
        if self._upstream_paused and self._queued < QUEUE_LOW and self._lost is None and self.transport is not None:
            self._upstream_paused = False
            IPushProducer(self.transport).resumeProducing()
        if self._lost is None and not self._resuming:
            self._reset_idle()
        self._notify()
        self._flush()

    def _write_failed(self, failure: Failure) -> None:
        self._writing = False
        self._queue, self._pending, self._queued = [], 0, 0
        error = failure.value
        self._give_up(f"cannot write to the store: {getattr(error, 'strerror', None) or error}")
        self._flush()

    def _complete(self, reason: Failure) -> None:
        self._completed = True
        if self._turn_end is not None and self._turn_end.active():
            self._turn_end.cancel()
        ended = reason.check(ResponseDone) or (self.expected_size is None and reason.check(PotentialDataLoss))
        if self._problem is None and not ended:
            self._problem = f"upstream body ended early: {reason.getErrorMessage()}"
        if self._problem is None and self.expected_size is not None and self.writer.size != self.expected_size:
            self._problem = f"upstream sent {self.writer.size} of {self.expected_size} bytes"
        actual = self.writer.actual_digest(self.digest.algorithm)
        if self._problem is None and actual != self.digest:
            # (the writer checks again in commit; this early check lets followers finish)
            self._problem = f"bytes do not match {self.digest}"
            self.writer.abort()
            self._fail(Failure(DigestMismatch(self.digest, actual, self.writer.size)))
            return
        if self._problem is not None:
            self.writer.abort()
            self._fail(Failure(FillFailed(self._problem)))
            return
        # Verified: clients get their last byte now; making it durable goes on meanwhile,
        # and only the store waits for it.
        self.verified = True
        self._notify()
        d = Deferred.fromCoroutine(self.writer.commit(self.digest))
        d.addCallbacks(self._committed, self._commit_failed)

    # outcomes -----------------------------------------------------------------------------
    def _committed(self, _: object) -> None:
        self.stored = True
        self._notify()
        self.done.callback(None)

    def _commit_failed(self, failure: Failure) -> None:
        self.writer.abort()
        self._fail(failure)

    def _fail(self, failure: Failure) -> None:
        self.failure = failure
        self._notify()
        self.done.errback(failure)

    def abandon(self, problem: str) -> None:
        """Stop receiving: the fill fails with ``problem`` and stores nothing."""
        self._give_up(problem)

    def _give_up(self, problem: str) -> None:
        self._problem = problem
        stop_body(self)

    def _reset_idle(self) -> None:
        timeout = self._idle_timeout
        if self._tail_timeout is not None and self.expected_size is not None and self._received >= self.expected_size - 1:
            timeout = self._tail_timeout
        if self._idle is not None and self._idle.active():
            self._idle.reset(timeout)
        else:
            self._idle = self._clock.callLater(timeout, self._stall, timeout)

    def _stall(self, timeout: float) -> None:
        if self._resume is None:
            self._give_up(f"upstream sent nothing for {timeout:g} s")
        else:
            self._stalled = True  # connectionLost resumes
            stop_body(self)


class UntilStored:
    """A fill as a :class:`~mirror.storage.sending.Source` that is complete only once the
    blob is stored (not merely verified): what another node following the fill reads, so
    that when its copy ends the blob is in the shared store already."""

    def __init__(self, fill: BlobFill) -> None:
        self._fill = fill

    def readable_end(self) -> int:
        end = self._fill.readable_end()
        size = self._fill.expected_size
        if not self._fill.stored and size is not None:
            end = min(end, size - 1)  # the last byte, which ends the follower's response, waits
        return end

    @property
    def verified(self) -> bool:
        return self._fill.stored

    @property
    def stored(self) -> bool:
        return self._fill.stored

    @property
    def failure(self) -> Failure | None:
        return self._fill.failure

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._fill.subscribe(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        self._fill.unsubscribe(callback)


class Fills:
    """Blob fills by digest, from the moment one starts until it is stored or fails."""

    def __init__(self) -> None:
        # digest -> (the repository whose request started the fill, the fill's start)
        self._fills: dict[Digest, tuple[str, Shared[BlobFill | None]]] = {}

    def __len__(self) -> int:
        """Fills under way (their clients may be done already)."""
        return len(self._fills)

    async def running(self, digest: Digest) -> BlobFill | None:
        """The fill of ``digest`` under way (waiting for one that is starting: its upstream
        request is out), unless it failed; else ``None``."""
        entry = self._fills.get(digest)
        if entry is None:
            return None
        try:
            fill = await entry[1].wait()
        except CancelledError:
            raise
        except Exception:
            return None
        return fill if fill is not None and fill.failure is None else None

    def expected_size(self, digest: Digest) -> int | None:
        """The upstream's ``Content-Length`` of a fill of ``digest`` under way, if known."""
        entry = self._fills.get(digest)
        fill = entry[1].peek() if entry is not None else None
        return fill.expected_size if fill is not None else None

    async def join_or_start(
        self, digest: Digest, start: Callable[[], Awaitable[BlobFill | None]], owner: str
    ) -> tuple[BlobFill | None, bool]:
        """The fill of ``digest``: the one under way, or a new one from ``start()``.

        Returns the fill (``None`` when ``start`` found the blob already stored) and
        whether this call started it.  ``start`` runs shielded from the caller: a caller
        that goes away does not cancel it for the others.  A start that fails fails for
        the requests of its ``owner`` (the repository asking); a request for another
        repository starts again, for its own (the failure was about that repository).
        """
        while (entry := self._fills.get(digest)) is not None:
            started_by, shared = entry
            if started_by == owner:
                return await shared.wait(), False
            try:
                return await shared.wait(), False
            except CancelledError:
                raise
            except Exception:
                self._drop(digest, shared)  # (if no one did yet) and start afresh
        shared = Shared(start)
        self._fills[digest] = (owner, shared)
        shared.wait().addBoth(self._started, digest, shared)
        return await shared.wait(), True

    def _started(self, result: BlobFill | Failure | None, digest: Digest, shared: Shared[BlobFill | None]) -> None:
        if isinstance(result, BlobFill):
            result.done.addBoth(lambda _: self._drop(digest, shared))
        else:
            self._drop(digest, shared)

    def _drop(self, digest: Digest, shared: Shared[BlobFill | None]) -> None:
        entry = self._fills.get(digest)
        if entry is not None and entry[1] is shared:
            del self._fills[digest]
