"""``/healthz``, ``/readyz`` and ``/metrics`` on the metrics listener.

``/healthz`` answers while the process is alive; ``/readyz`` is 200 while the store can
take new content (and the config is loaded), 503 otherwise; ``/metrics`` is the
Prometheus exposition of :class:`~mirror.metrics.Metrics`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirror.metrics import Metrics

__all__ = ["HealthResource"]


class HealthResource(Resource):
    """The health and metrics endpoints (see the module docstring).

    Args:
        metrics: what ``/metrics`` serves (None: no ``/metrics``).
        readiness: ``None`` when ready, else why not.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics | None, readiness: Callable[[], Awaitable[str | None]]) -> None:
        Resource.__init__(self)
        self._metrics = metrics
        self._readiness = readiness

    def render_GET(self, request: Request) -> bytes | int:
        path = (request.path or b"").rstrip(b"/")
        request.setHeader(b"Cache-Control", b"no-store")
        if path == b"/healthz":
            request.setHeader(b"Content-Type", b"text/plain")
            return b"ok\n"
        if path == b"/readyz":
            Deferred.fromCoroutine(self._ready(request)).addErrback(self._failed, request)
            return NOT_DONE_YET
        if path == b"/metrics" and self._metrics is not None:
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
            return self._metrics.exposition()
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain")
        return b"not found\n"

    async def _ready(self, request: Request) -> None:
        problem = await self._readiness()
        request.setHeader(b"Content-Type", b"text/plain")
        if problem is not None:
            request.setResponseCode(503)
            request.write(f"not ready: {problem}\n".encode())
        else:
            request.write(b"ready\n")
        request.finish()

    def _failed(self, failure: Failure, request: Request) -> None:
        request.setResponseCode(503)
        request.write(f"not ready: {failure.getErrorMessage()}\n".encode())
        request.finish()
