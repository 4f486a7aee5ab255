"""TLS towards an upstream: which certificates its HTTPS connections trust.

By default an upstream is checked as any web client checks a server: the platform's
trust store, and the host name.  Two settings of one upstream change that for it alone,
for every HTTPS connection made on its behalf: to the upstream itself, to a token realm
on another host, to the CDN or object store its blob GETs redirect to.

``ca_file``
    A PEM bundle of one or more CA certificates: exactly these are trusted, the platform's
    store is not (host names are checked as usual).  An upstream whose blobs redirect to a
    public object store needs the public roots in the bundle as well (append the system's
    bundle to the private CA).

``tls_verify: false``
    No certificate and no host name is checked.  Content is still checked against its
    digests, but anyone on the path can impersonate the upstream and read the credentials
    sent to it; the service logs a warning at start.

:func:`upstream_agent` builds the agent of such an upstream.  It uses its own partition
of the connection pool: the pool keys connections by scheme, host and port only, and a
connection opened without verification, or trusting a private CA, must never be handed
to an upstream that verifies differently.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from service_identity import VerificationError

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS, trustRootFromCertificates
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import Agent, HostnameCachingHTTPSPolicy, HTTPConnectionPool
from twisted.web.iweb import IAgent, IPolicyForHTTPS
from zope.interface import implementer

if TYPE_CHECKING:
    from mirror.config import UpstreamConfig

__all__ = ["UpstreamTLSPolicy", "describe_tls_failure", "read_ca_bundle", "upstream_agent"]

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)


def read_ca_bundle(path: Path) -> tuple[Certificate, ...]:
    """The certificates of the PEM file at ``path`` (other PEM blocks are ignored).

    Raises:
        OSError: the file cannot be read.
        ValueError: it holds no certificate, or a malformed one (the message says which).
    """
    blocks = _PEM_CERTIFICATE.findall(path.read_bytes())
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    certificates = []
    for number, block in enumerate(blocks, start=1):
        try:
            certificates.append(Certificate.loadPEM(block))
        except Exception:  # pyOpenSSL's Error, or a ValueError from the PEM decoder
            raise ValueError(f"{path}: certificate {number} of {len(blocks)} is malformed") from None
    return tuple(certificates)


def describe_tls_failure(error: BaseException) -> str | None:
    """A few words on the TLS handshake failure in ``error`` (or among the failures Twisted's
    HTTP client wraps in it), or None when it is not one."""
    pending = [error]
    while pending:
        e = pending.pop(0)
        if isinstance(e, VerificationError):
            return "TLS handshake failed: the certificate is not for this host name"
        if isinstance(e, SSL.Error):
            details = e.args[0] if e.args and isinstance(e.args[0], list) else []
            reasons = [r[2] for r in details if isinstance(r, tuple) and len(r) == 3 and r[2]]
            return f"TLS handshake failed: {'; '.join(reasons) or e}"
        pending += [r.value for r in getattr(e, "reasons", ()) if isinstance(r, Failure) and r.value is not None]
    return None


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS that checks nothing about the server, and still names it (SNI) when it is a DNS name."""

    def __init__(self, options: CertificateOptions, hostname: bytes) -> None:
        self._options = options
        self._server_name = None if _is_ip_address(hostname) else hostname

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def _is_ip_address(hostname: bytes) -> bool:
    try:
        ipaddress.ip_address(hostname.strip(b"[]").decode("ascii"))
    except ValueError:
        return False
    return True


@implementer(IPolicyForHTTPS)
class UpstreamTLSPolicy:
    """The TLS policy of one upstream (see the module doc).

    Args:
        ca: the only certificates trusted (empty: the platform's trust store).
        verify: False checks no certificate and no name at all.
    """

    def __init__(self, ca: Sequence[Certificate] = (), *, verify: bool = True) -> None:
        if ca and not verify:
            raise ValueError("a CA bundle and no verification exclude each other")
        self._trust = trustRootFromCertificates(ca) if ca else None
        self._unverified = CertificateOptions() if not verify else None  # verifies nothing by default

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """The connection creator for ``hostname``."""
        if self._unverified is not None:
            return _Unverified(self._unverified, hostname)
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)


class _PoolPartition:
    """One agent's view of a shared connection pool: the connections it opens go back to
    the pool (which keeps its settings and closes them all at shutdown), under keys no
    other agent asks for."""

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[HTTP11ClientProtocol]:
        return self._pool.getConnection((self, key), endpoint)

    def __getattr__(self, name: str) -> Any:  # the agent also reads the pool's settings (persistent)
        return getattr(self._pool, name)


def upstream_agent(config: UpstreamConfig, reactor: IReactorTime, pool: HTTPConnectionPool) -> IAgent | None:
    """The agent for an upstream with its own TLS settings, on its own partition of ``pool``;
    None when it has none (the shared agent serves it).

    Raises:
        OSError, ValueError: its ``ca_file`` cannot be read or holds no certificate.
    """
    if config.ca_file is None and config.tls_verify:
        return None
    ca = read_ca_bundle(config.ca_file) if config.ca_file is not None else ()
    policy = UpstreamTLSPolicy(ca, verify=config.tls_verify)
    agent: IAgent = Agent(reactor, contextFactory=HostnameCachingHTTPSPolicy(policy), pool=_PoolPartition(pool))
    return agent
