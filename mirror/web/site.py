"""The HTTP site: the registry resource behind a channel that bounds what a connection may hold.

:class:`RegistryChannel` is Twisted's HTTP/1.1 channel with the limits of
:class:`~mirror.config.LimitsConfig` and a few refusals Twisted does not make itself.
What Twisted's ``HTTPChannel`` already does, and is relied on here: an idle timeout
(``Site.timeOut``, set to ``idle_timeout``) restarted by every byte received and paused
while a request is being answered, so it closes keep-alive connections left idle and
request bodies that stall, but never a long response; ``totalHeadersSize`` and
``maxHeaders`` (set from ``max_header_size`` and ``max_headers``); and a 400 and a close
for duplicate or conflicting ``Content-Length``, ``Content-Length`` with
``Transfer-Encoding``, codings other than ``chunked``, malformed chunks, and invalid
header names or values.  Added here:

* **A header timeout.**  Each request must deliver its request line and headers within
  ``header_timeout`` of its first byte (of the connection's start, for the first one),
  however slowly the bytes trickle in: the timer is not restarted by data, unlike the
  idle timeout, and stops at the end of the headers, so a long upload body is timed by
  the idle timeout alone.  A connection that sent part of a request gets a 408; a silent
  one is closed.
* **A prompt 400 and a close** for framing Twisted lets through: a bare LF as a line end
  (Twisted's parser only splits at CRLF, so such a request used to be held open with no
  answer), an HTTP/1.1 request without exactly one ``Host`` (RFC 9112 §3.2), a request
  ``Transfer-Encoding: identity`` (RFC 9112 §6.3: the last coding must be ``chunked``),
  and a header line longer than ``max_header_size`` (Twisted closed it without a word).
* **A TLS handshake on a plain port** is answered 400 at once: skopeo and podman probe
  an ``insecure`` mirror with a TLS ClientHello before falling back to plain HTTP, and
  would otherwise wait out their 10 s handshake timeout.

:class:`LimitedSite` counts its open connections: beyond ``max_connections`` a new one
is answered a canned 503 (OCI ``UNAVAILABLE``) and closed, without reading its request.
Answering, rather than no longer accepting, tells clients at once (a paused listener
leaves them in the kernel's backlog until they time out, and health checks with them);
its cost is one descriptor per refused connection for at most :data:`_LINGER` seconds.

The access log is Twisted's combined format, with the values of query parameters that
carry a secret (:data:`mirror.web.auth.SECRET_PARAMETERS`) replaced: a client that puts
a password in a URL gets it refused, and it never reaches a log line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request, combinedLogFormatter
from twisted.web.resource import IResource
from twisted.web.server import Site

from mirror.config import LimitsConfig
from mirror.core.errors import RegistryError, error_body
from mirror.registry.registry import Registry
from mirror.web.auth import SECRET_PARAMETERS, Authenticator, query_fields
from mirror.web.resource import RegistryResource

__all__ = [
    "LimitedSite",
    "RegistryChannel",
    "access_log_line",
    "build_site",
    "connection_budget",
    "redacted_uri",
]

_TLS_HANDSHAKE = 0x16
_BARE_LF = re.compile(rb"(?<!\r)\n")

#: Descriptors kept aside from client connections: listeners, logs, the store's files and
#: the metrics listener's connections (at most :data:`METRICS_MAX_CONNECTIONS`).
_RESERVED_FDS = 128
#: The largest ``max_connections`` derived from the fd limit: past it, memory (up to
#: ``max_header_size`` buffered per connection) and one reactor thread are the limits.
DEFAULT_MAX_CONNECTIONS_CAP = 10_000
#: Connections the metrics listener takes, apart from the registry's.
METRICS_MAX_CONNECTIONS = 64
#: Seconds a refused connection is read (and dropped) after its 503, before it is cut.
_LINGER = 2.0


def _canned(status: bytes, body: bytes, content_type: bytes = b"text/plain") -> bytes:
    """A whole response that closes the connection."""
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        content_type,
        len(body),
        body,
    )


_TLS_REFUSAL = _canned(b"400 Bad Request", b"This port speaks plain HTTP; TLS was offered.\n")
_BARE_LF_REFUSAL = _canned(b"400 Bad Request", b"Bad request: header lines end in CRLF, not a bare LF.\n")
_HOST_REFUSAL = _canned(b"400 Bad Request", b"Bad request: an HTTP/1.1 request needs exactly one Host header.\n")
_CODING_REFUSAL = _canned(b"400 Bad Request", b"Bad request: Transfer-Encoding must end in chunked.\n")
_TOO_LARGE_REFUSAL = _canned(b"400 Bad Request", b"Bad request: request header too large.\n")
_TIMEOUT_REFUSAL = _canned(b"408 Request Timeout", b"Request headers not received in time.\n")
_UNAVAILABLE = _canned(
    b"503 Service Unavailable",
    error_body(RegistryError("UNAVAILABLE", "too many open connections; retry shortly")),
    b"application/json",
)


def connection_budget(fd_limit: int) -> int:
    """How many client connections a process allowed ``fd_limit`` open files can hold
    without running out: two descriptors each (its socket, and a blob file or an
    upstream socket it may be using) after :data:`_RESERVED_FDS`.  A negative
    ``fd_limit`` (``RLIM_INFINITY``) is no limit."""
    if fd_limit < 0:
        return 1 << 30
    return max(16, (fd_limit - _RESERVED_FDS) // 2)


class RegistryChannel(HTTPChannel):
    """An HTTP/1.1 channel with a header timeout and the refusals described above.

    ``header_timeout`` and the limits Twisted reads (``totalHeadersSize``, ``maxHeaders``,
    ``MAX_LENGTH``) are set by :meth:`LimitedSite.buildProtocol`, which counts it.  It
    reads three private attributes of Twisted's parser (``_version``, ``_handlingRequest``
    and LineReceiver's ``_buffer``); tests/test_site.py exercises each use.
    """

    header_timeout: float | None = None  # None: no header timer
    clock: IReactorTime | None = None  # runs the header timer
    counted_by: LimitedSite | None = None
    _first = True
    _refused = False  # an answer that closes the connection went out: ignore the rest
    _request_begun = False  # bytes of the request whose headers are awaited have arrived
    _header_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        HTTPChannel.connectionMade(self)
        if self.counted_by is not None:
            self.counted_by.connections += 1
        self._start_header_clock()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_header_clock()
        if self.counted_by is not None:
            self.counted_by.connections -= 1
            self.counted_by = None
        HTTPChannel.connectionLost(self, reason)

    def dataReceived(self, data: bytes) -> None:
        if self._refused or not data:
            return
        if self._first:
            self._first = False
            if data[0] == _TLS_HANDSHAKE:
                self._refuse(_TLS_REFUSAL)
                return
        if self._awaiting_headers():
            self._request_begun = True
            self._start_header_clock()  # a keep-alive connection's next request begins
        HTTPChannel.dataReceived(self, data)
        # Twisted splits lines at CRLF only: a bare LF would leave the request waiting for
        # a line end that never comes.  What is left unparsed is part of one line.
        if not self._refused and self._awaiting_headers() and _BARE_LF.search(self._buffer):
            self._refuse(_BARE_LF_REFUSAL)

    def lineReceived(self, line: bytes) -> None:
        if b"\n" in line:  # "Host: x\n\r\n": a bare LF inside a CRLF-terminated line
            self._refuse(_BARE_LF_REFUSAL)
            return
        HTTPChannel.lineReceived(self, line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(_TOO_LARGE_REFUSAL)

    def headerReceived(self, line: bytes) -> bool:
        name, _, value = line.partition(b":")
        if name.lower() == b"transfer-encoding" and value.strip(b" \t").lower() == b"identity":
            self._refuse(_CODING_REFUSAL)  # Twisted lets it through and uses Content-Length
            return False
        ok: bool = HTTPChannel.headerReceived(self, line)
        return ok

    def allHeadersReceived(self) -> None:
        self._stop_header_clock()
        self._request_begun = False
        request = self.requests[-1]
        if self._version == b"HTTP/1.1" and len(request.requestHeaders.getRawHeaders(b"host") or ()) != 1:
            self._refuse(_HOST_REFUSAL)
            return
        HTTPChannel.allHeadersReceived(self)

    def allContentReceived(self) -> None:
        if self._refused:  # refused at the end of its headers: the resource never sees it
            return
        HTTPChannel.allContentReceived(self)

    def _awaiting_headers(self) -> bool:
        # In line mode and not answering a request: a request line or headers are due.
        return bool(self.line_mode) and not self._handlingRequest

    def _refuse(self, response: bytes) -> None:
        self._refused = True
        if self.transport is not None:
            self.transport.write(response)
            HTTPChannel.loseConnection(self)

    def _start_header_clock(self) -> None:
        if self.header_timeout is not None and self.clock is not None and self._header_call is None:
            self._header_call = self.clock.callLater(self.header_timeout, self._header_timed_out)

    def _stop_header_clock(self) -> None:
        if self._header_call is not None:
            if self._header_call.active():
                self._header_call.cancel()
            self._header_call = None

    def _header_timed_out(self) -> None:
        self._header_call = None
        if self._request_begun and not self._refused and self.transport is not None:
            self.transport.write(_TIMEOUT_REFUSAL)
        self._refused = True
        HTTPChannel.timeoutConnection(self)  # closes, and aborts after abortTimeout if the peer does not read


class _Unavailable(Protocol):
    """A connection beyond ``max_connections``: a 503 at once, then closed.

    On plain TCP only the sending side is shut after the answer, and whatever the client
    sends is read and dropped: a request arriving at a closed socket would draw a reset,
    which can make the client lose the 503 it has not read.  Either way the connection
    is cut :data:`_LINGER` seconds on if the client has not closed it (or, on TLS, not
    finished its handshake).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(_UNAVAILABLE)
        tcp = ITCPTransport(transport, None)
        if tcp is not None and not ISSLTransport.providedBy(transport):
            tcp.loseWriteConnection()
        else:  # TLS (its close_notify is the half-close), or a transport without one
            transport.loseConnection()
        self._linger = self._clock.callLater(_LINGER, getattr(transport, "abortConnection", transport.loseConnection))

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None


class LimitedSite(Site):
    """A site of :class:`RegistryChannel` connections bounded by a :class:`LimitsConfig`.

    ``limits.max_connections`` None is no limit (in-process tests); the service passes
    one derived from its fd limit (:func:`connection_budget`) when the config has none.
    :meth:`configure` changes the limits for connections made from then on.
    """

    _log = Logger()

    def __init__(self, resource: IResource, limits: LimitsConfig, **kwargs: Any) -> None:
        Site.__init__(self, resource, **kwargs)
        self.protocol = RegistryChannel  # type: ignore[assignment]  # a plain HTTP/1.1 channel, not the h2-negotiating default
        self.connections = 0
        self.refused = 0
        self._reported = 0
        self._next_report = 0.0
        self.limits = limits
        self.configure(limits)

    def configure(self, limits: LimitsConfig) -> None:
        """Apply ``limits`` to the connections made from now on."""
        self.limits = limits
        self.timeOut = limits.idle_timeout

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:  # type: ignore[override]  # or a refusal
        limit = self.limits.max_connections
        if limit is not None and self.connections >= limit:
            self._refusing(limit)
            return _Unavailable(self.reactor)
        channel = Site.buildProtocol(self, addr)
        assert isinstance(channel, RegistryChannel)
        channel.header_timeout = self.limits.header_timeout
        channel.clock = self.reactor
        channel.totalHeadersSize = self.limits.max_header_size
        channel.MAX_LENGTH = self.limits.max_header_size  # one line may take all of it
        channel.maxHeaders = self.limits.max_headers
        channel.counted_by = self
        return channel

    def _refusing(self, limit: int) -> None:
        self.refused += 1
        now = self.reactor.seconds()
        if now >= self._next_report:  # a line a minute at most, whatever the flood
            self._log.warn(
                "{count} connections answered 503: {open} open, max_connections is {limit}",
                count=self.refused - self._reported,
                open=self.connections,
                limit=limit,
            )
            self._reported = self.refused
            self._next_report = now + 60


def redacted_uri(uri: bytes) -> bytes:
    """``uri`` with the values of secret query parameters replaced by ``REDACTED``."""
    path, sep, query = uri.partition(b"?")
    if not sep:
        return uri
    fields = []
    for field, name in query_fields(query):
        key, eq, _ = field.partition(b"=")
        fields.append(key + b"=REDACTED" if name in SECRET_PARAMETERS and eq else field)
    return path + b"?" + b"&".join(fields)


class _RedactedRequest:
    """A request as the access log sees it: its URI redacted."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self.uri = redacted_uri(request.uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def access_log_line(timestamp: str, request: Request) -> str:
    """Twisted's combined log line for ``request``, secrets in its query redacted."""
    redacting = b"?" in (request.uri or b"")  # most requests have no query: no wrapper for them
    line: str = combinedLogFormatter(timestamp, _RedactedRequest(request) if redacting else request)
    return line


def build_site(
    registry: Registry,
    auth: Authenticator | None,
    run_blocking: Callable[..., Deferred[Any]],
    limits: LimitsConfig | None = None,
) -> LimitedSite:
    """The HTTP site serving the registry API, its connections bounded by ``limits``
    (default: the config defaults, with no connection limit)."""
    limits = limits if limits is not None else LimitsConfig()
    site = LimitedSite(RegistryResource(registry, auth, run_blocking), limits, logFormatter=access_log_line)
    site.displayTracebacks = False
    return site
