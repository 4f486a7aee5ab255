"""The UNIX socket pair between the supervisor and one worker.

The supervisor hands a worker each connection it gives it by passing the connection's
file descriptor (``SCM_RIGHTS``) with a line naming the listener it came in on; a few
other words travel as lines too:

* supervisor to worker: ``c <listener>`` (a descriptor attached), ``flush`` (write the
  access record now: a GC run is about to start);
* worker to supervisor: ``ready <port>`` (serving; its internal listener's port),
  ``flushed``.

Descriptors arrive in the order they were sent, with or ahead of their line, so the
worker pairs each ``c`` line with the oldest descriptor it has not used.  The worker's
end is its descriptor :data:`CHANNEL_FD`; when the supervisor is gone (however it died)
the worker reads the end of the stream and exits.

The supervisor writes with ``sendmsg`` on its own, non-blocking socket at once (so it can
close its copy of a connection as soon as the call returns: the message holds the
connection until the worker takes it), and reads the worker's lines through Twisted.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IFileDescriptorReceiver, IProtocolFactory, IReactorSocket
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["CHANNEL_FD", "SECRET_ENV", "SupervisorEnd", "WorkerEnd", "adopt_connection", "open_worker_end"]

#: The worker's end of the socket pair, as the supervisor maps it in the child.
CHANNEL_FD = 3
#: The environment variable carrying the workers' cluster secret (never the command line).
SECRET_ENV = "MIRROR_WORKERS_SECRET"

_log = Logger()


class _Lines(LineReceiver):
    delimiter = b"\n"

    def __init__(self, on_line: Callable[[bytes], None], on_lost: Callable[[], None]) -> None:
        self._on_line = on_line
        self._on_lost = on_lost

    def lineReceived(self, line: bytes) -> None:
        self._on_line(line)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._on_lost()


class SupervisorEnd:
    """The supervisor's end of one worker's socket pair.

    Args:
        sock: the supervisor's socket of the pair.
        reactor: reads the worker's lines.
        on_ready: the worker is serving; its internal listener's port.
        on_flushed: the worker wrote its access record, as asked.
        on_lost: the worker's end is closed (it exited, or is exiting); not called after
            :meth:`close`.
    """

    def __init__(
        self,
        sock: socket.socket,
        reactor: IReactorSocket,
        on_ready: Callable[[int], None],
        on_flushed: Callable[[], None],
        on_lost: Callable[[], None],
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._on_ready = on_ready
        self._on_flushed = on_flushed
        self._on_lost = on_lost
        self.open = True
        self._reader = _Lines(self._line, self._lost)
        reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, _one(self._reader))

    def hand(self, listener: int, connection: socket.socket) -> None:
        """Give the worker ``connection`` (accepted on listener number ``listener``); the
        caller then closes its own copy.

        Raises:
            OSError: it could not be sent (the worker is gone, or not reading:
                ``BlockingIOError``); nothing was sent.
        """
        self._send(b"c %d\n" % listener, [connection.fileno()])

    def ask_flush(self) -> None:
        """Ask the worker to write its access record (it answers ``flushed``).

        Raises:
            OSError: the worker cannot be asked.
        """
        self._send(b"flush\n", [])

    def _send(self, line: bytes, fds: list[int]) -> None:
        if not self.open:
            raise BrokenPipeError("the worker's channel is closed")
        sent = socket.send_fds(self._sock, [line], fds) if fds else self._sock.send(line)
        if sent != len(line):  # (a line this short is sent whole or not at all; if not, the stream is lost)
            self.close()
            raise BrokenPipeError("a message to the worker went out in part")

    def _line(self, line: bytes) -> None:
        word, _, rest = line.partition(b" ")
        if word == b"ready" and rest.isdigit():
            self._on_ready(int(rest))
        elif word == b"flushed":
            self._on_flushed()
        else:
            _log.warn("unexpected message from a worker: {line!r}", line=line[:100])

    def _lost(self) -> None:
        if self.open:  # (not when the supervisor closed it: it knows)
            self._closed()
            self._on_lost()

    def _closed(self) -> None:
        if self.open:
            self.open = False
            self._sock.close()

    def close(self) -> None:
        """Close the supervisor's end (the worker reads the end of the stream)."""
        self._closed()
        transport = self._reader.transport
        if transport is not None:
            transport.loseConnection()


@implementer(IFileDescriptorReceiver)
class WorkerEnd(LineReceiver):
    """The worker's end: takes the connections handed to it and answers the supervisor.

    Args:
        adopt: serves a handed connection: ``(listener, descriptor)``; it closes the
            descriptor.
        flush: writes the access record.
        lost: the supervisor is gone.
    """

    delimiter = b"\n"

    def __init__(
        self, adopt: Callable[[int, int], None], flush: Callable[[], Awaitable[object]], lost: Callable[[], None]
    ) -> None:
        self._adopt = adopt
        self._flush = flush
        self._lost = lost
        self._fds: deque[int] = deque()

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self._fds.append(descriptor)

    def lineReceived(self, line: bytes) -> None:
        word, _, rest = line.partition(b" ")
        if word == b"c" and rest.isdigit() and self._fds:
            self._adopt(int(rest), self._fds.popleft())
        elif word == b"flush":
            flushing = Deferred.fromCoroutine(_awaited(self._flush()))
            flushing.addErrback(lambda f: _log.failure("could not write the access record", f))
            flushing.addBoth(lambda _: self.transport.write(b"flushed\n") if self.transport is not None else None)
        else:
            _log.warn("unexpected message from the supervisor: {line!r}", line=line[:100])

    def ready(self, port: int) -> None:
        """Tell the supervisor this worker serves, its internal listener on ``port``."""
        assert self.transport is not None
        self.transport.write(b"ready %d\n" % port)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        while self._fds:
            os.close(self._fds.popleft())
        self._lost()


def _one(protocol: Protocol) -> Any:
    """A factory of the one ``protocol`` (``adoptStreamConnection`` is annotated for
    ``ServerFactory`` subclasses alone)."""
    return Factory.forProtocol(lambda: protocol)


async def _awaited(work: Awaitable[object]) -> object:
    return await work


def open_worker_end(reactor: IReactorSocket, end: WorkerEnd, fd: int = CHANNEL_FD) -> None:
    """Read the supervisor's messages on descriptor ``fd`` with ``end``."""
    os.set_blocking(fd, False)
    try:
        reactor.adoptStreamConnection(fd, socket.AF_UNIX, _one(end))
    finally:
        os.close(fd)  # (the reactor has its own copy)


def adopt_connection(reactor: IReactorSocket, fd: int, factory: IProtocolFactory) -> None:
    """Serve the connected socket ``fd`` (handed over by the supervisor) with ``factory``,
    and close ``fd`` (the reactor has its own copy).  A connection the client has
    closed meanwhile is dropped quietly."""
    try:
        sock = socket.socket(fileno=fd)  # (finds the address family; closes fd when done)
    except OSError:
        os.close(fd)
        return
    with sock:
        sock.setblocking(False)
        try:
            reactor.adoptStreamConnection(sock.fileno(), sock.family, cast(Any, factory))  # (typed for ServerFactory only)
        except OSError as e:  # gone already (getpeername: not connected)
            _log.debug("a handed connection was closed before it was served: {error}", error=str(e))
