"""Streaming a stored object to a client: the object store's :class:`~mirror.storage.sending.Responder`.

:class:`ObjectResponder` holds the response of a GET whose body is still unread (Twisted
pauses the connection until someone reads it), so that opening a blob costs one round
trip and its size is known before the client's response headers go.  Sending a range
other than the whole object drops that response and asks again with a ``Range`` header.

Backpressure: the responder is the consumer's push producer, and pausing it pauses the
object store's connection, so a slow client slows the download and memory stays
constant.  A body that ends short, or stalls for the store's timeout, fails the send
with :class:`~mirror.storage.sending.ReadFailed`: the client's connection is then cut, so
it never takes a short blob for a whole one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse
from zope.interface import implementer

from mirror.responses import Discard, stop_body
from mirror.storage.sending import CachedSource, ClientGone, ReadFailed, SocketWriter

__all__ = ["ObjectResponder"]

Reopen = Callable[[int, int], Awaitable[IResponse | None]]


class ObjectResponder:
    """A stored object ready to stream to one client (see the module docstring).

    ``reopen(first, end)`` asks the store again for a range of the same object.
    """

    def __init__(self, response: IResponse, size: int, reopen: Reopen, clock: IReactorTime, idle: float) -> None:
        self._response: IResponse | None = response
        self._reopen = reopen
        self._clock = clock
        self._idle = idle
        self._pump: _Pump | None = None
        self.size = size
        self.source = CachedSource(size)

    @property
    def sent(self) -> int:
        return 0  # every byte goes through consumer.write

    def send(
        self, consumer: IConsumer, first: int = 0, end: int | None = None, socket: SocketWriter | None = None
    ) -> Deferred[None]:
        end = self.size if end is None else end
        return Deferred.fromCoroutine(self._send(consumer, first, end))

    async def _send(self, consumer: IConsumer, first: int, end: int) -> None:
        response, self._response = self._response, None
        if response is not None and (first, end) != (0, self.size):
            response.deliverBody(Discard())
            response = None
        if response is None:
            if first >= end:
                return
            response = await self._reopen(first, end)
            if response is None:
                raise ReadFailed("the object is gone")
        self._pump = _Pump(consumer, end - first, self._clock, self._idle)
        response.deliverBody(self._pump)
        await self._pump.done

    def close(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.deliverBody(Discard())


@implementer(IPushProducer)
class _Pump(Protocol):
    """Passes an object's body to the consumer, as its push producer."""

    def __init__(self, consumer: IConsumer, expected: int, clock: IReactorTime, idle: float) -> None:
        self._consumer = consumer
        self._expected = expected
        self._received = 0
        self._clock = clock
        self._idle = idle
        self._problem: Failure | None = None
        self._timer: IDelayedCall | None = None
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self._consumer.registerProducer(self, True)
        self._timer = self._clock.callLater(self._idle, self._stalled)

    def _stalled(self) -> None:
        self._stop(Failure(ReadFailed(f"the object store sent nothing for {self._idle:g} s")))

    def _stop(self, problem: Failure) -> None:
        if self._problem is None:
            self._problem = problem
        stop_body(self)

    def dataReceived(self, data: bytes) -> None:
        if self._problem is not None:
            return
        self._received += len(data)
        if self._received > self._expected:
            self._stop(Failure(ReadFailed("the object store sent more than the object's size")))
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle)
        self._consumer.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._problem is not None:
            self.done.errback(self._problem)
        elif not reason.check(ResponseDone):
            self.done.errback(Failure(ReadFailed(f"the object store's connection failed: {reason.getErrorMessage()}")))
        elif self._received != self._expected:
            self.done.errback(Failure(ReadFailed(f"the object store sent {self._received} of {self._expected} bytes")))
        else:
            self.done.callback(None)

    # IPushProducer (the client's side) -------------------------------------------------------
    def pauseProducing(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()  # a slow client is not a stalled store
        if self.transport is not None:
            IPushProducer(self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        if self._problem is None and (self._timer is None or not self._timer.active()):
            self._timer = self._clock.callLater(self._idle, self._stalled)
        if self.transport is not None:
            IPushProducer(self.transport).resumeProducing()

    def stopProducing(self) -> None:
        self._stop(Failure(ClientGone()))
