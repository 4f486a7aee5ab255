"""Following an upstream's redirects: blob GETs sent on to a CDN or a presigned URL.

Docker Hub answers a blob GET with a 307 to its CDN; registries on object storage
redirect to a presigned URL of the object.  Twisted's ``RedirectAgent`` (which treq puts
around every request) follows such redirects and drops ``Authorization`` when one goes
to another origin, but it resolves a relative ``Location`` against the *first* URL of the
chain rather than the URL that sent it, so a CDN redirecting within itself sends the
request back to the registry.  :class:`RedirectAgent` here follows GET and HEAD redirects
hop by hop:

* 301, 302, 303, 307 and 308, keeping the method (GET stays GET, HEAD stays HEAD);
* each ``Location`` resolved against the URL that answered with it;
* only to ``http`` and ``https`` URLs; anything else (``file:``, ``ftp:``, ``data:``) is
  refused;
* at most :data:`MAX_REDIRECTS` hops (the limit of Go's HTTP client, which docker and
  containerd use), then refused;
* credentials (``Authorization``, cookies) are dropped at the first hop to another origin
  (scheme, host and port) and never sent again along that chain: a presigned URL rejects
  a second credential, and the upstream's token must not leak to whoever serves its blobs;
* each redirect's own body is drained, so its connection goes back to the pool.

Refusals raise :class:`RedirectRefused`; URLs in its message lose their query, which in a
presigned URL is a credential.  Other methods pass through unredirected.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from mirror.responses import drain

__all__ = ["MAX_REDIRECTS", "REDIRECT_STATUSES", "RedirectAgent", "RedirectRefused"]

#: Redirects followed in one request before it fails.
MAX_REDIRECTS = 10

#: Statuses whose ``Location`` is followed (for GET and HEAD).
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

#: Headers that stay with the origin they were meant for (Twisted's list).
SENSITIVE_HEADERS = (b"authorization", b"proxy-authorization", b"cookie", b"cookie2", b"www-authenticate")


class RedirectRefused(Exception):
    """A redirect the agent would not follow (its message says why)."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or ""), parts.port or {"http": 80, "https": 443}.get(scheme)


def _shown(url: str) -> str:
    """``url`` for messages and logs: without its query (a presigned URL's signature) and
    without user information."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl()


def _without_credentials(headers: Headers) -> Headers:
    return Headers({name: values for name, values in headers.getAllRawHeaders() if name.lower() not in SENSITIVE_HEADERS})


@implementer(IAgent)
class RedirectAgent:
    """Wraps an agent to follow the redirects of GET and HEAD requests (see the module doc).

    Args:
        agent: the agent each hop is sent with.
        limit: redirects followed at most.
    """

    def __init__(self, agent: IAgent, limit: int = MAX_REDIRECTS) -> None:
        self._agent = agent
        self._limit = limit

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if method not in (b"GET", b"HEAD"):
            return self._agent.request(method, uri, headers, bodyProducer)
        return Deferred.fromCoroutine(self._follow(method, uri.decode("ascii"), headers))

    async def _follow(self, method: bytes, url: str, headers: Headers | None) -> IResponse:
        first, hops = url, 0
        while True:
            response: IResponse = await self._agent.request(method, url.encode("ascii"), headers)
            if response.code not in REDIRECT_STATUSES:
                return response
            drain(response)
            if hops == self._limit:
                raise RedirectRefused(f"more than {self._limit} redirects from {_shown(first)}")
            hops += 1
            target = _target(response, url)
            if headers is not None and _origin(target) != _origin(url):
                headers = _without_credentials(headers)
            url = target


def _target(response: IResponse, url: str) -> str:
    """Where a redirect from ``url`` goes: an absolute http(s) URL, or RedirectRefused."""
    locations: list[bytes] | None = response.headers.getRawHeaders(b"location")
    if not locations:
        raise RedirectRefused(f"{response.code} redirect without a Location from {_shown(url)}")
    try:
        target = urljoin(url, locations[0].decode("ascii").strip())
        parts = urlsplit(target)
        _ = parts.port  # a malformed port raises ValueError
    except (UnicodeDecodeError, ValueError):
        raise RedirectRefused(f"{response.code} redirect to a malformed Location from {_shown(url)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise RedirectRefused(f"{response.code} redirect to a {scheme}: URL from {_shown(url)}: only http and https are followed")
    if not parts.hostname:
        raise RedirectRefused(f"{response.code} redirect to a URL without a host from {_shown(url)}")
    return target
