"""Streaming blobs with constant memory.

* :class:`BlobFill` is the protocol that receives one upstream blob body.  It hands the
  chunks, batch by batch, to a thread that writes them to a
  :class:`~mirror.store.BlobWriter` spool file and hashes them (both release the GIL, so
  this runs beside the reactor on another core), pausing the upstream socket if the disk
  falls 8 MiB behind; when the body ends it commits — verified, fsynced, renamed — also
  off the reactor thread.  It never waits for clients: a slow or departed client cannot
  stall or cancel a fill.
* :class:`FileSender` is the push producer that sends a file to one client: a cached
  blob, or the spool file of a fill still under way (following it as it grows).  Every
  client of a miss, the first included, follows the spool, so N concurrent requests
  cause one upstream download and N readers of the page cache.

A fill holds back its last byte until the digest has verified: a client never receives a
complete-looking body whose bytes turn out wrong.  When a fill fails, its followers'
connections are aborted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO, Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from zope.interface import implementer

from mirror.oci import Digest
from mirror.store import BlobWriter, DigestMismatch

__all__ = ["BlobFill", "CachedSource", "ClientGone", "FileSender", "FillFailed", "Source", "sendfile_transport"]

#: Bytes read from disk per write to a client.
CHUNK = 256 * 1024
#: Bytes per sendfile(2) call.
SENDFILE_CHUNK = 16 * 1024 * 1024


#: A fill holding more than this in memory, waiting for the disk, pauses the upstream...
QUEUE_HIGH = 8 * 1024 * 1024
#: ...and resumes it below this.
QUEUE_LOW = 2 * 1024 * 1024


def _write_all(writer: BlobWriter, chunks: list[bytes]) -> None:
    """Write and hash a batch of chunks (in a thread: os.write and hashlib release the GIL)."""
    for chunk in chunks:
        writer.write(chunk)


class FillFailed(Exception):
    """An upstream blob fill did not complete with verified bytes."""


class ClientGone(Exception):
    """The consumer stopped the producer: the client disconnected."""


class Source(TypingProtocol):
    """What a :class:`FileSender` follows: how far it may read, and whether that is all."""

    def readable_end(self) -> int:
        """Bytes from the start that may be sent now."""

    @property
    def whole(self) -> bool:
        """Every byte is readable and verified: ``readable_end()`` is the final size."""

    @property
    def finished(self) -> bool:
        """Whole, verified and stored (committed to the store)."""

    @property
    def failure(self) -> Failure | None:
        """Why the content will never be whole, if so."""

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when more is readable, or on finish or failure."""

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback``."""


class CachedSource:
    """A stored blob: all of it readable, nothing to wait for."""

    failure = None
    whole = True
    finished = True

    def __init__(self, size: int) -> None:
        self.size = size

    def readable_end(self) -> int:
        return self.size

    def subscribe(self, callback: Callable[[], None]) -> None:
        pass

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        pass


class BlobFill(Protocol):
    """Receives an upstream blob body into a spool file, then verifies and commits it.

    Args:
        writer: where the bytes go.
        digest: what they must hash to.
        expected_size: the upstream's ``Content-Length``, if it sent one.
        clock: for the idle timeout.
        idle_timeout: seconds without a byte before the fill is abandoned.
        run_blocking: runs ``writer.commit`` off the reactor thread and returns a Deferred.
    """

    _log = Logger()

    def __init__(
        self,
        writer: BlobWriter,
        digest: Digest,
        expected_size: int | None,
        clock: IReactorTime,
        idle_timeout: float,
        run_blocking: Callable[..., Deferred[None]],
    ) -> None:
        self.writer = writer
        self.digest = digest
        self.expected_size = expected_size
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._run_blocking = run_blocking
        self._idle: IDelayedCall | None = None
        self._listeners: list[Callable[[], None]] = []
        self._problem: str | None = None
        self._received = 0  # bytes from the upstream
        self._queue: list[bytes] = []  # received, not yet handed to the writer thread
        self._queued = 0  # bytes received and not yet on disk
        self._writing = False
        self._upstream_paused = False
        self._lost: Failure | None = None  # how the body ended, once it has
        self._completed = False
        self.whole = False  # every byte received and the digest verified
        self.finished = False  # ...and committed to the store
        self.failure: Failure | None = None
        self.done: Deferred[None] = Deferred()

    # Source -------------------------------------------------------------------------------
    def readable_end(self) -> int:
        size = self.writer.size
        if self.whole or self.expected_size is None:
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
        self._reset_idle()

    def dataReceived(self, data: bytes) -> None:
        if self._problem is not None:
            return
        if self.expected_size is not None and self._received + len(data) > self.expected_size:
            self._give_up(f"upstream sent more than its Content-Length of {self.expected_size}")
            return
        self._received += len(data)
        self._queue.append(data)
        self._queued += len(data)
        self._reset_idle()
        if self._queued > QUEUE_HIGH and not self._upstream_paused and self.transport is not None:
            self._upstream_paused = True  # the disk is behind: let TCP hold the rest
            self.transport.pauseProducing()
        self._flush()

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self._lost = reason
        self._flush()

    # writing: the disk write and the hash run in a thread, batch after batch --------------
    def _flush(self) -> None:
        if self._writing or self._completed:
            return
        if self._queue and self._problem is None:
            batch, self._queue = self._queue, []
            self._writing = True
            d = self._run_blocking(_write_all, self.writer, batch)
            d.addCallbacks(self._wrote, self._write_failed, callbackArgs=(sum(map(len, batch)),))
        elif self._lost is not None:
            self._complete(self._lost)

    def _wrote(self, _: object, count: int) -> None:
        self._writing = False
        self._queued -= count
        if self._upstream_paused and self._queued < QUEUE_LOW and self._lost is None and self.transport is not None:
            self._upstream_paused = False
            self.transport.resumeProducing()
        if self._lost is None:
            self._reset_idle()
        self._notify()
        self._flush()

    def _write_failed(self, failure: Failure) -> None:
        self._writing = False
        self._queue, self._queued = [], 0
        error = failure.value
        self._give_up(f"cannot write to the store: {getattr(error, 'strerror', None) or error}")
        self._flush()

    def _complete(self, reason: Failure) -> None:
        self._completed = True
        if self._problem is None and not reason.check(ResponseDone):
            self._problem = f"upstream body ended early: {reason.getErrorMessage()}"
        if self._problem is None and self.expected_size is not None and self.writer.size != self.expected_size:
            self._problem = f"upstream sent {self.writer.size} of {self.expected_size} bytes"
        if self._problem is None and self.writer.actual_digest(self.digest.algorithm) != self.digest:
            # (the writer checks again in commit; this early check lets followers finish)
            self._problem = f"bytes do not match {self.digest}"
            mismatch = DigestMismatch(self.digest, self.writer.actual_digest(self.digest.algorithm), self.writer.size)
            self.writer.abort()
            self._fail(Failure(mismatch))
            return
        if self._problem is not None:
            self.writer.abort()
            self._fail(Failure(FillFailed(self._problem)))
            return
        # Verified: clients get their last byte now; making it durable (fsync, rename)
        # goes on in a thread, and only the store waits for it.
        self.whole = True
        self._notify()
        d = self._run_blocking(self.writer.commit, self.digest)
        d.addCallbacks(self._committed, self._commit_failed)

    # outcomes -----------------------------------------------------------------------------
    def _committed(self, _: object) -> None:
        self.finished = True
        self._notify()
        self.done.callback(None)

    def _commit_failed(self, failure: Failure) -> None:
        self.writer.abort()
        self._fail(failure)

    def _fail(self, failure: Failure) -> None:
        self.failure = failure
        self._notify()
        self.done.errback(failure)

    def _give_up(self, problem: str) -> None:
        self._problem = problem
        if self.transport is not None:
            self.transport.stopProducing()

    def _reset_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        else:
            self._idle = self._clock.callLater(
                self._idle_timeout, self._give_up, f"upstream sent nothing for {self._idle_timeout:g} s"
            )


@implementer(IPushProducer)
class FileSender:
    """Sends ``[first, end)`` of a file to a consumer, following a :class:`Source`.

    ``end`` is ``None`` to send up to the source's final size.  ``done`` fires when the
    last byte has been written, and fails when the source fails or the consumer stops
    the producer (client gone).  The file is closed either way.

    Given ``socket`` (a plain TCP transport, see :func:`sendfile_transport`), bytes go by
    ``sendfile(2)``: the kernel copies them from the page cache, nothing passes through
    Python.  The sender then waits for the transport's own buffer (the response headers)
    to drain first, and when the socket is full asks the transport to say when it is
    writable again (marking its producer paused, so Twisted's ``doWrite`` resumes the
    HTTP channel, which resumes us).  ``sent`` counts those bytes.
    """

    def __init__(
        self,
        file: BinaryIO,
        source: Source,
        consumer: IConsumer,
        first: int = 0,
        end: int | None = None,
        socket: SocketWriter | None = None,
    ) -> None:
        self._file = file
        self._fd = file.fileno()
        self._source = source
        self._consumer = consumer
        self._pos = first
        self._end = end
        self._socket = socket
        self._paused = False
        self._pumping = False
        self._closed = False
        self.sent = 0
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        """Register with the consumer and begin; returns ``done``."""
        self._source.subscribe(self._pump)
        self._consumer.registerProducer(self, True)
        self._pump()
        return self.done

    def _pump(self) -> None:
        if self._pumping or self._closed:
            return
        self._pumping = True
        try:
            while not self._paused and not self._closed:
                limit = self._source.readable_end()
                if self._end is not None:
                    limit = min(limit, self._end)
                if self._pos < limit:
                    if not self._send(limit - self._pos):
                        return
                    continue
                if self._source.whole and (self._end is None or self._pos >= self._end):
                    self._finish(None)
                elif self._source.failure is not None:
                    self._finish(self._source.failure)
                return
        finally:
            self._pumping = False

    def _send(self, count: int) -> bool:
        """Send up to ``count`` bytes at the current position; False to stop pumping."""
        if self._socket is None:
            data = os.pread(self._fd, min(CHUNK, count), self._pos)
            if not data:
                self._finish(Failure(FillFailed("file shorter than expected")))
                return False
            self._pos += len(data)
            self._consumer.write(data)
            return True
        t = self._socket
        if len(t.dataBuffer) - t.offset > 0 or t._tempDataLen > 0:
            self._wait_writable()
            return False
        try:
            n = os.sendfile(t.fileno(), self._fd, self._pos, min(SENDFILE_CHUNK, count))
        except BlockingIOError:
            self._wait_writable()
            return False
        except OSError:
            self._finish(Failure(ClientGone()))
            return False
        if n == 0:
            self._finish(Failure(FillFailed("file shorter than expected")))
            return False
        self._pos += n
        self.sent += n
        return True

    def _wait_writable(self) -> None:
        assert self._socket is not None
        self._socket.producerPaused = True
        self._socket.startWriting()

    def _finish(self, failure: Failure | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._source.unsubscribe(self._pump)
        self._file.close()
        if failure is None:
            self.done.callback(None)
        else:
            self.done.errback(failure)

    # IPushProducer ------------------------------------------------------------------------
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._finish(Failure(ClientGone()))


class SocketWriter(TypingProtocol):
    """What :class:`FileSender` needs of a plain TCP transport for sendfile (``twisted.internet.tcp``)."""

    producerPaused: bool
    dataBuffer: bytes
    offset: int
    _tempDataLen: int

    def fileno(self) -> int: ...

    def startWriting(self) -> None: ...


def sendfile_transport(transport: object) -> SocketWriter | None:
    """``transport`` if blobs can go to it by ``sendfile(2)``: a plain TCP socket (not
    TLS, whose bytes must pass through the TLS layer), else ``None``."""
    from twisted.internet import tcp

    if isinstance(transport, tcp.Connection) and hasattr(os, "sendfile"):
        return transport  # type: ignore[return-value]
    return None
