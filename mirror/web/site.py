"""The HTTP site: the registry resource behind a channel that turns away TLS at once.

skopeo and podman probe an ``insecure`` mirror with a TLS ClientHello before falling
back to plain HTTP.  Twisted's HTTP parser waits for a complete request line, so the
probe would stall the client for its 10 s handshake timeout; :class:`RegistryChannel`
recognises a TLS record (first byte 0x16, a handshake) on a plain port and answers 400
and closes, which makes the client fall back to ``http://`` straight away.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from mirror.registry.registry import Registry
from mirror.web.auth import Authenticator
from mirror.web.resource import RegistryResource

__all__ = ["RegistryChannel", "build_site"]

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


def build_site(registry: Registry, auth: Authenticator | None, run_blocking: Callable[..., Deferred[Any]]) -> Site:
    """The HTTP site serving the registry API."""
    site = Site(RegistryResource(registry, auth, run_blocking))
    site.protocol = RegistryChannel  # type: ignore[assignment]  # a plain HTTP/1.1 channel, not the h2-negotiating default
    site.displayTracebacks = False
    return site
