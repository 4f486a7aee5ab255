"""Reading HTTP response bodies from treq: whole but capped, or not at all.

Shared by the clients of other servers: the upstream registry (:mod:`mirror.upstream`)
and object storage (:mod:`mirror.storage.s3`).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse

__all__ = ["LARGE_READ", "Discard", "drain", "read_capped", "read_in_large_chunks", "stop_body"]


#: Bytes per read of the socket under a large body (Twisted reads 64 KiB at a time).
LARGE_READ = 1024 * 1024


def read_in_large_chunks(transport: object, size: int = LARGE_READ) -> bool:
    """Have the TCP socket under a response body's ``transport`` read ``size`` bytes per
    call rather than Twisted's 64 KiB, so that a blob's bytes cross into Python in a
    sixteenth of the calls (each of which runs the HTTP parser and the body's protocol).

    ``transport`` is the one a body protocol is given: a proxy of the HTTP connection's,
    which is the socket or a TLS layer over it (TLS hands its records on one by one
    whatever the read size).  Returns whether a socket was found.  The connection keeps
    the size when it goes back to its pool: it only ever reads what has arrived.
    """
    from twisted.internet import tcp

    for _ in range(4):  # proxy, TLS layer, socket
        if isinstance(transport, tcp.Connection):
            transport.bufferSize = size
            return True
        # (TransportProxyProducer keeps what it proxies in _producer; a TLS layer's is .transport)
        transport = getattr(transport, "_producer", None) or getattr(transport, "transport", None)
        if transport is None:
            break
    return False


def stop_body(protocol: Protocol) -> None:
    """Stop the response body ``protocol`` is receiving (its transport is the body's producer)."""
    if protocol.transport is not None:
        IPushProducer(protocol.transport).stopProducing()


class _CappedBody(Protocol):
    def __init__(self, limit: int, clock: IReactorTime, idle: float) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()
        self._problem: Exception | None = None
        self._timer = clock.callLater(idle, self._stop, TimeoutError(f"no body byte for {idle:g} s"))
        self._idle = idle

    def dataReceived(self, data: bytes) -> None:
        if self._problem is not None:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._stop(ValueError(f"body larger than {self.limit} bytes"))
            return
        self.chunks.append(data)
        if self._timer.active():
            self._timer.reset(self._idle)

    def _stop(self, problem: Exception) -> None:
        self._problem = problem
        stop_body(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self._problem is not None:
            self.done.errback(self._problem)
        elif reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_capped(response: IResponse, limit: int, clock: IReactorTime, idle: float) -> Deferred[bytes]:
    """Read a whole body of at most ``limit`` bytes, failing after ``idle`` quiet seconds.

    An over-long ``Content-Length`` fails before reading (Synapse's early reject).
    """
    if response.length is not None and isinstance(response.length, int) and response.length > limit:
        response.deliverBody(Discard())
        return Deferred.fromCoroutine(_raise(ValueError(f"body of {response.length} bytes is over {limit}")))
    protocol = _CappedBody(limit, clock, idle)
    response.deliverBody(protocol)
    return protocol.done


async def _raise(error: Exception) -> bytes:
    raise error


class Discard(Protocol):
    """Reads nothing: stops the body at once (the connection is not reused)."""

    def makeConnection(self, transport: IPushProducer) -> None:
        Protocol.makeConnection(self, transport)
        transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


#: Bodies up to this size are read and dropped rather than cut off (see :func:`drain`).
DRAIN_LIMIT = 64 * 1024


class _Drain(Protocol):
    """Reads a small body to its end and drops it."""

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


def drain(response: IResponse) -> None:
    """Be done with a response whose body is of no interest: a small one (an error
    document, an empty body) is read to its end, so that a persistent connection goes back
    to its pool; anything else is cut off (:class:`Discard`)."""
    small = isinstance(response.length, int) and response.length <= DRAIN_LIMIT
    response.deliverBody(_Drain() if small else Discard())
