"""Which worker gets a connection: each in turn, of those that are ready.

The supervisor's listeners accept with Twisted's own ports (the endpoints of ``listen``,
opened as a single process opens them); :class:`HandoffFactory` takes each accepted
socket out of Twisted's hands at once, before anything is read from it, and gives it to
the :class:`Dispatcher`, which passes it to the next worker that is ready (round-robin)
and closes the supervisor's copy.  A worker that cannot take it (it just died; it is not
reading) is skipped for the next.  While no worker is ready (at start, or if every worker
died), or none can take more (each one's socket pair is full), the listeners stop
accepting, so new clients wait in the kernel's backlog, and the few connections accepted
meanwhile wait here: until a worker is ready, or :data:`RETRY` seconds on.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort, IReactorTime, ISystemHandle, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

__all__ = ["Dispatcher", "HandoffFactory", "Target"]

#: Connections held while no worker is ready, at most (beyond: closed at once).
MAX_PENDING = 1024
#: Seconds before connections that no ready worker could take are offered again.
RETRY = 0.01

_log = Logger()


class Target(TypingProtocol):
    """A worker as the dispatcher sees it."""

    @property
    def index(self) -> int: ...

    @property
    def ready(self) -> bool:
        """Serving, and reachable: it may be handed connections."""

    def hand(self, listener: int, connection: socket.socket) -> None:
        """Pass ``connection`` to the worker; raises OSError when it cannot."""


class Dispatcher:
    """Round-robin over the ready ``targets`` (see the module docstring)."""

    def __init__(self, targets: Sequence[Target], clock: IReactorTime) -> None:
        self._targets = targets
        self._clock = clock
        self._retry: IDelayedCall | None = None
        self._next = 0
        self._pending: deque[tuple[int, socket.socket]] = deque()
        self._ports: list[IListeningPort] = []
        self._paused = False
        self._closed = False
        self.handed = 0

    def add_port(self, port: IListeningPort) -> None:
        """A listener to pause while no worker is ready."""
        self._ports.append(port)
        self._pause_or_resume()

    def give(self, listener: int, connection: socket.socket) -> None:
        """Hand ``connection`` (accepted on listener number ``listener``) to the next ready
        worker; held until one is ready if none is."""
        if self._pending or not self._hand(listener, connection):
            if len(self._pending) >= MAX_PENDING:
                connection.close()
                return
            self._pending.append((listener, connection))
            self._pause_or_resume()
            if self._retry is None and any(t.ready for t in self._targets):  # (they are full: try again soon)
                self._retry = self._clock.callLater(RETRY, self._again)

    def _again(self) -> None:
        self._retry = None
        if not self._closed:
            self.changed()
            if self._pending and any(t.ready for t in self._targets):
                self._retry = self._clock.callLater(RETRY, self._again)

    def _hand(self, listener: int, connection: socket.socket) -> bool:
        count = len(self._targets)
        for step in range(count):
            position = (self._next + step) % count
            target = self._targets[position]
            if not target.ready:
                continue
            try:
                target.hand(listener, connection)
            except BlockingIOError:  # (it is not reading as fast as connections come: the next)
                continue
            except OSError as e:
                _log.info("worker {index} could not take a connection: {error}", index=target.index, error=str(e))
                continue
            self._next = (position + 1) % count
            self.handed += 1
            connection.close()  # the worker has its own copy now
            return True
        return False

    def changed(self) -> None:
        """A worker became ready or stopped being ready: hand what waits, pause or resume."""
        while self._pending:
            listener, connection = self._pending[0]
            if not self._hand(listener, connection):
                break
            self._pending.popleft()
        self._pause_or_resume()

    def _pause_or_resume(self) -> None:
        paused = bool(self._pending) or not any(t.ready for t in self._targets)
        if paused == self._paused or self._closed:  # (closed: the listeners are closing too)
            return
        self._paused = paused
        for port in self._ports:
            if isinstance(port, FileDescriptor):  # (the ports Twisted's endpoints open are)
                reading = cast(Any, port)  # (FileDescriptor is not annotated)
                reading.stopReading() if paused else reading.startReading()
        if paused and not self._closed:
            _log.info("no worker ready: the listeners wait")

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Close the connections still waiting (at stop)."""
        self._closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        while self._pending:
            self._pending.popleft()[1].close()


class _Accepted(Protocol):
    """An accepted connection, at once taken out of Twisted's hands for the dispatcher."""

    def __init__(self, dispatcher: Dispatcher, listener: int) -> None:
        self._dispatcher = dispatcher
        self._listener = listener

    def makeConnection(self, transport: ITransport) -> None:
        # The port made a transport that reads the socket; stop it before it reads
        # anything, and let the transport go without closing (or shutting down) the
        # socket: the dispatcher owns it now.
        handle = ISystemHandle(transport).getHandle()
        if isinstance(transport, FileDescriptor):
            descriptor = cast(Any, transport)  # (FileDescriptor is not annotated)
            descriptor.stopReading()
            descriptor.stopWriting()
        if not isinstance(handle, socket.socket):
            _log.error("listener {listener} gave no socket to hand to a worker; closed", listener=self._listener)
            transport.loseConnection()
            return
        self._dispatcher.give(self._listener, handle)


class HandoffFactory(Factory):
    """The factory of listener number ``listener``: its connections go to the dispatcher."""

    noisy = False

    def __init__(self, dispatcher: Dispatcher, listener: int) -> None:
        self._dispatcher = dispatcher
        self._listener = listener

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _Accepted(self._dispatcher, self._listener)
