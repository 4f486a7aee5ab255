"""The HTTP site: the registry resource behind a channel that turns away TLS at once.

skopeo and podman probe an ``insecure`` mirror with a TLS ClientHello before falling
back to plain HTTP.  Twisted's HTTP parser waits for a complete request line, so the
probe would stall the client for its 10 s handshake timeout; :class:`RegistryChannel`
recognises a TLS record (first byte 0x16, a handshake) on a plain port and answers 400
and closes, which makes the client fall back to ``http://`` straight away.

The access log is Twisted's combined format, with the values of query parameters that
carry a secret (:data:`mirror.web.auth.SECRET_PARAMETERS`) replaced: a client that puts
a password in a URL gets it refused, and it never reaches a log line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.http import HTTPChannel, Request, combinedLogFormatter
from twisted.web.server import Site

from mirror.registry.registry import Registry
from mirror.web.auth import SECRET_PARAMETERS, Authenticator, query_fields
from mirror.web.resource import RegistryResource

__all__ = ["RegistryChannel", "access_log_line", "build_site", "redacted_uri"]

_TLS_HANDSHAKE = 0x16
_REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 46\r\n"
    b"\r\n"
    b"This port speaks plain HTTP; TLS was offered.\n"
)


class RegistryChannel(HTTPChannel):
    """An HTTP/1.1 channel that refuses a TLS handshake on its first bytes."""

    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first and data:
            self._first = False
            if data[0] == _TLS_HANDSHAKE and self.transport is not None:
                self.transport.write(_REFUSAL)
                self.transport.loseConnection()
                return
        HTTPChannel.dataReceived(self, data)


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


def build_site(registry: Registry, auth: Authenticator | None, run_blocking: Callable[..., Deferred[Any]]) -> Site:
    """The HTTP site serving the registry API."""
    site = Site(RegistryResource(registry, auth, run_blocking), logFormatter=access_log_line)
    site.protocol = RegistryChannel  # type: ignore[assignment]  # a plain HTTP/1.1 channel, not the h2-negotiating default
    site.displayTracebacks = False
    return site
