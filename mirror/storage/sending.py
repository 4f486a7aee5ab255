"""Responders: content that can stream itself to one client, with backpressure.

A :class:`Responder` is what a store hands out for a blob (and what a blob fill hands
out to each client following it): it knows its size, and :meth:`Responder.send` pushes
``[first, end)`` to an :class:`~twisted.internet.interfaces.IConsumer` — a web request —
as a push producer, so a slow client slows the reading and memory stays constant.

:class:`FileResponder` sends a local file: a stored blob, or the spool file of a fill
still under way, following it as it grows (its :class:`Source` says how far it may read
and whether that is all).  Given a plain TCP socket it sends by ``sendfile(2)``: the
kernel copies from the page cache, nothing passes through Python.  A backend without
local files (object storage) provides its own responder with the same interface.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import BinaryIO, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "CachedSource",
    "ClientGone",
    "FileResponder",
    "FileSender",
    "ReadFailed",
    "Responder",
    "SocketWriter",
    "Source",
    "sendfile_transport",
]

#: Bytes read from disk per write to a client.
CHUNK = 256 * 1024
#: Bytes per sendfile(2) call.
SENDFILE_CHUNK = 16 * 1024 * 1024


class ClientGone(Exception):
    """The consumer stopped the producer: the client disconnected."""


class ReadFailed(Exception):
    """The content will never be whole: a fill failed, or a file is shorter than it should be."""


class Source(Protocol):
    """What a sender follows: how far it may read, and whether that is all."""

    def readable_end(self) -> int:
        """Bytes from the start that may be sent now."""

    @property
    def verified(self) -> bool:
        """Every byte is readable and its digest verified: ``readable_end()`` is the size."""

    @property
    def stored(self) -> bool:
        """Verified and committed to the store."""

    @property
    def failure(self) -> Failure | None:
        """Why the content will never be whole, if so."""

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when more is readable, or on verification, storage or failure."""

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback``."""


class CachedSource:
    """Stored content: all of it readable, nothing to wait for."""

    failure = None
    verified = True
    stored = True

    def __init__(self, size: int) -> None:
        self.size = size

    def readable_end(self) -> int:
        return self.size

    def subscribe(self, callback: Callable[[], None]) -> None:
        pass

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        pass


class SocketWriter(Protocol):
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
        return transport
    return None


class Responder(Protocol):
    """A blob (or a fill under way) ready to stream to one client."""

    @property
    def size(self) -> int | None:
        """The full size; ``None`` while a fill of unknown length is under way."""

    @property
    def source(self) -> Source:
        """What the content is waiting for (a fill), or a :class:`CachedSource`."""

    @property
    def sent(self) -> int:
        """Bytes sent so far outside ``consumer.write`` (by sendfile), for the byte counts."""

    def send(
        self, consumer: IConsumer, first: int = 0, end: int | None = None, socket: SocketWriter | None = None
    ) -> Deferred[None]:
        """Stream ``[first, end)`` (``end`` None: to the end) to ``consumer``, as a push
        producer registered with it.

        Fires when the last byte has gone.  Fails with :class:`ClientGone` when the consumer
        stops the producer, with the source's failure when a fill fails (its digest did not
        verify, its upstream went away), or with :class:`ReadFailed` when a file is shorter
        than it should be.  Closes the responder either way.
        """

    def close(self) -> None:
        """Release what the responder holds (it was not sent)."""


class FileResponder:
    """A responder over a local file, following ``source`` (see the module docstring)."""

    def __init__(self, file: BinaryIO, source: Source, size: int | None) -> None:
        self._file = file
        self._sender: FileSender | None = None
        self.source = source
        self.size = size

    @property
    def sent(self) -> int:
        return self._sender.sent if self._sender is not None else 0

    def send(
        self, consumer: IConsumer, first: int = 0, end: int | None = None, socket: SocketWriter | None = None
    ) -> Deferred[None]:
        self._sender = FileSender(self._file, self.source, consumer, first, end, socket)
        return self._sender.start()

    def close(self) -> None:
        self._file.close()


@implementer(IPushProducer)
class FileSender:
    """Sends ``[first, end)`` of a file to a consumer, following a :class:`Source`.

    ``end`` is ``None`` to send up to the source's final size.  ``done`` fires when the
    last byte has been written, and fails when the source fails or the consumer stops
    the producer (client gone).  The file is closed either way.

    Given ``socket`` (a plain TCP transport, see :func:`sendfile_transport`), bytes go by
    ``sendfile(2)``.  The sender then waits for the transport's own buffer (the response
    headers) to drain first, and when the socket is full asks the transport to say when
    it is writable again (marking its producer paused, so Twisted's ``doWrite`` resumes
    the HTTP channel, which resumes us).  ``sent`` counts those bytes.  A file without a
    descriptor (an in-memory one) is read with ``seek`` and ``read``.
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
        try:
            self._fd: int | None = file.fileno()
        except (OSError, io.UnsupportedOperation):
            self._fd = None
            socket = None
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
                if self._source.verified and (self._end is None or self._pos >= self._end):
                    self._finish(None)
                elif self._source.failure is not None:
                    self._finish(self._source.failure)
                return
        finally:
            self._pumping = False

    def _read(self, count: int) -> bytes:
        if self._fd is not None:
            return os.pread(self._fd, count, self._pos)
        self._file.seek(self._pos)
        return self._file.read(count)

    def _send(self, count: int) -> bool:
        """Send up to ``count`` bytes at the current position; False to stop pumping."""
        if self._socket is None or self._fd is None:
            data = self._read(min(CHUNK, count))
            if not data:
                self._finish(Failure(ReadFailed("file shorter than expected")))
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
            self._finish(Failure(ReadFailed("file shorter than expected")))
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
