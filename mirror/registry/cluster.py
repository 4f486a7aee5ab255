"""Several nodes on one shared store: which node fetches a blob, and following it from another.

A node about to fetch a blob from an upstream first takes the blob's fill lease in the
store (``fills/<alg>/<hex>``, :class:`~mirror.storage.base.LeaseStore`), naming itself by
``cluster.advertise``, and renews it while the fill runs.  A node that finds the lease
held by another follows that node's fill instead of asking the upstream again:
``GET <advertise>/_cluster/fills/<digest>`` streams the fill as it grows (or the stored
blob), and its bytes go through the follower's own :class:`~mirror.registry.fills.BlobFill`,
so the follower verifies the digest itself and its clients get bytes at once.  The
stream ends only once the filling node has stored the blob, so the follower's commit
finds it stored and uploads nothing.  If the filling node cannot be reached (it died;
its lease has not expired yet), the follower fetches from the upstream itself: a second
fetch, never a wait on a dead node, and the store's create-only writes keep one copy.

A cached tag past its TTL is revalidated the same way, by one node for all: the node
that takes the tag's lease (``tags/<hash of repository and tag>``) asks the upstream and
records the answer in the store; a node that finds the lease held serves the digest it
has cached, as it would have a moment before, and the next request reads the new record.

Node-to-node requests carry an HMAC-SHA256 of method, path and time under
``cluster.secret`` (:meth:`Cluster.sign`), valid for a minute: the endpoint serves by
digest alone, which only another node may do (a client reaches a blob only through a
repository that holds it).  Without a ``cluster`` section (or on a store that cannot be
shared) every node fills for itself and the endpoint answers 404.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from mirror.config import ClusterConfig
from mirror.core.oci import Digest
from mirror.responses import Discard
from mirror.storage.base import LeaseStore
from mirror.storage.leases import Renewal

__all__ = ["AUTH_HEADER", "Cluster", "fill_path"]

#: The header a node signs its requests to another with.
AUTH_HEADER = "Mirror-Cluster-Auth"
#: Seconds a node's revalidation of a tag holds off the others' (a dead node's, at most).
TAG_LEASE = 10.0
#: Seconds a signed request stays valid (node clocks may differ by a little).
MAX_AGE = 60.0
#: The header's form: a Unix time and the HMAC-SHA256 in hex (nothing else is parsed).
_AUTH_RE = re.compile(r"([0-9]{1,12}):([0-9a-f]{64})")

_log = Logger()


def fill_path(digest: Digest) -> str:
    """The path another node follows a fill of ``digest`` at."""
    return f"/_cluster/fills/{digest}"


class Cluster:
    """This node's view of the others (see the module docstring).

    Args:
        config: the ``cluster`` section, or ``None`` (a lone node).
        leases: the shared store's leases, or ``None`` (a store nodes cannot share).
        http: for requests to other nodes.
        clock: the reactor's time (lease renewals, timeouts).
    """

    def __init__(
        self, config: ClusterConfig | None, leases: LeaseStore | None, http: HTTPClient | None, clock: IReactorTime
    ) -> None:
        self.config = config if leases is not None else None
        self._leases = leases
        self._http = http
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self.config is not None

    # fill leases -----------------------------------------------------------------------------
    async def claim(self, digest: Digest) -> str | None:
        """Who fetches ``digest``: ``None`` for this node (it now holds the lease, if there
        is a cluster), else the URL of the node that does."""
        if self.config is None or self._leases is None:
            return None
        try:
            holder = await self._leases.acquire(_lease_name(digest), self.config.advertise, self.config.fill_lease)
        except OSError as e:  # the store cannot say: fetch without the lease (a possible second fetch)
            _log.warn("fill lease of {digest} unavailable: {error}", digest=str(digest), error=str(e))
            return None
        return holder

    def keep(self, digest: Digest, done: Deferred[None]) -> None:
        """Renew this node's lease on ``digest`` until ``done`` fires, then release it."""
        if self.config is None or self._leases is None:
            return
        renewal = Renewal(self._leases, _lease_name(digest), self.config.advertise, self.config.fill_lease, self._clock)

        async def let_go() -> None:
            await renewal.stop()
            await self.release(digest)

        def finished(result: object) -> object:
            Deferred.fromCoroutine(let_go())
            return result

        done.addBoth(finished)

    # tag revalidations -----------------------------------------------------------------------
    async def claim_tag(self, key: str, tag: str) -> bool:
        """Whether this node is to ask the upstream about ``key:tag`` now: ``True`` when it
        took the tag's revalidation lease (until :meth:`release_tag`, or :data:`TAG_LEASE`
        seconds), or there is no cluster; ``False`` while another node sharing the store
        asks (its answer will be in the store's tag record)."""
        if self.config is None or self._leases is None:
            return True
        try:
            holder = await self._leases.acquire(_tag_lease_name(key, tag), self.config.advertise, TAG_LEASE)
        except (OSError, ValueError) as e:  # the store cannot say: ask (a possible second request)
            _log.warn("revalidation lease of {key}:{tag} unavailable: {error}", key=key, tag=tag, error=str(e))
            return True
        return holder is None

    async def release_tag(self, key: str, tag: str) -> None:
        """This node is done asking about ``key:tag``."""
        if self.config is None or self._leases is None:
            return
        try:
            await self._leases.release(_tag_lease_name(key, tag), self.config.advertise)
        except (OSError, ValueError) as e:  # it expires on its own
            _log.warn("could not release the revalidation lease of {key}:{tag}: {error}", key=key, tag=tag, error=str(e))

    async def release(self, digest: Digest) -> None:
        """Give up this node's lease on ``digest`` (its fill ended, or never started)."""
        if self.config is None or self._leases is None:
            return
        try:
            await self._leases.release(_lease_name(digest), self.config.advertise)
        except OSError as e:  # it expires on its own
            _log.warn("could not release the fill lease of {digest}: {error}", digest=str(digest), error=str(e))

    # node-to-node requests -------------------------------------------------------------------
    def sign(self, method: str, path: str, now: float | None = None) -> str:
        """The :data:`AUTH_HEADER` value for a request to another node."""
        assert self.config is not None, "no cluster configured"
        stamp = str(int(time.time() if now is None else now))
        return f"{stamp}:{self._mac(method, path, stamp)}"

    def verify(self, method: str, path: str, header: str | None, now: float | None = None) -> bool:
        """Whether ``header`` signs this request with the cluster's secret, recently."""
        match = _AUTH_RE.fullmatch(header or "")
        if self.config is None or match is None:
            return False
        stamp, mac = match.groups()
        if abs((time.time() if now is None else now) - int(stamp)) > MAX_AGE:
            return False
        return hmac.compare_digest(mac.encode(), self._mac(method, path, stamp).encode())

    def _mac(self, method: str, path: str, stamp: str) -> str:
        assert self.config is not None
        message = f"{method}\n{path}\n{stamp}".encode()
        return hmac.new(self.config.secret.encode(), message, hashlib.sha256).hexdigest()

    async def follow(self, peer: str, digest: Digest, timeout: float) -> IResponse | None:
        """The response streaming ``peer``'s fill of ``digest`` (body unread), or ``None``
        when the peer cannot be reached or has no such fill (fetch it yourself then)."""
        assert self._http is not None
        path = fill_path(digest)
        headers = Headers({AUTH_HEADER: [self.sign("GET", path)]})
        sending = self._http.request("GET", peer + path, headers=headers, unbuffered=True)
        timer = self._clock.callLater(timeout, sending.cancel)
        try:
            response: IResponse = await sending
        except CancelledError:
            _log.warn(
                "node {peer} did not answer for {digest} within {timeout} s", peer=peer, digest=str(digest), timeout=timeout
            )
            return None
        except Exception as e:
            _log.warn(
                "node {peer} unreachable for {digest}: {error}", peer=peer, digest=str(digest), error=str(e) or type(e).__name__
            )
            return None
        finally:
            if timer.active():
                timer.cancel()
        if response.code != 200:
            response.deliverBody(Discard())
            _log.info("node {peer} has no fill of {digest} ({code})", peer=peer, digest=str(digest), code=response.code)
            return None
        return response


def _lease_name(digest: Digest) -> str:
    return f"fills/{digest.algorithm}/{digest.encoded}"


def _tag_lease_name(key: str, tag: str) -> str:
    # (a repository key has slashes and a tag may have dots: a hash names them in any store)
    return "tags/" + hashlib.sha256(f"{key}:{tag}".encode()).hexdigest()[:40]
