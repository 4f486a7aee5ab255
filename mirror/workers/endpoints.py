"""A ``listen`` endpoint split between the supervisor and the workers.

The supervisor accepts; a worker speaks the protocol.  For every endpoint but ``ssl:``
that is simple: the supervisor listens on the endpoint itself and the worker serves the
sockets it is handed with the site.  An ``ssl:`` endpoint is accepted as plain TCP (same
port, interface and backlog) and the worker does the TLS, wrapping the site as Twisted's
``listenSSL`` does (:class:`~twisted.protocols.tls.TLSMemoryBIOFactory`), so a TLS
connection is served alike with one process or several.
"""

from __future__ import annotations

from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTCP,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory

__all__ = ["TLS", "split_tls", "worker_factory"]

#: What a TLS endpoint's connections are wrapped in.
TLS = IOpenSSLServerConnectionCreator | IOpenSSLContextFactory


def split_tls(endpoint: IStreamServerEndpoint, reactor: IReactorTCP) -> tuple[IStreamServerEndpoint, TLS | None]:
    """What the supervisor listens on for ``endpoint``, and the TLS settings (an OpenSSL
    context factory) a worker wraps its connections in, or ``None`` for none.

    Twisted keeps an ``ssl:`` endpoint's parts in private attributes: this function is
    the only reader of them (tests/test_workers.py checks it on a parsed endpoint).
    """
    if isinstance(endpoint, SSL4ServerEndpoint):
        plain = TCP4ServerEndpoint(reactor, endpoint._port, endpoint._backlog, endpoint._interface)
        tls: TLS = endpoint._sslContextFactory
        return plain, tls
    return endpoint, None


def worker_factory(site: IProtocolFactory, tls: TLS | None) -> IProtocolFactory:
    """The factory a worker serves one listener's connections with."""
    if tls is None:
        return site
    return TLSMemoryBIOFactory(tls, False, site)
