"""``/healthz``, ``/readyz`` and ``/metrics`` of the supervisor (on ``metrics.listen``).

``/healthz`` answers while the supervisor is alive.  ``/readyz`` is 200 only when every
worker is up and its own ``/readyz`` is 200 (its store takes new content), else 503
naming each worker that is not and why.  ``/metrics`` is the supervisor's metrics then
every worker's, labelled ``worker="<i>"`` (:mod:`.metrics`); a worker that is not up or
does not answer in time is left out (``mirror_workers_up`` says how many are in).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import cast

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mirror.workers.metrics import SupervisorMetrics, combine

__all__ = ["Fetch", "SupervisorHealth"]

#: ``fetch(port, path)``: a worker's internal listener's answer, (status, body).
Fetch = Callable[[int, str], Awaitable[tuple[int, bytes]]]


class SupervisorHealth(Resource):
    """See the module docstring.

    Args:
        workers: each worker's index and internal port, ``None`` while it is not up.
        metrics: the supervisor's own.
        fetch: asks a worker's internal listener (with a timeout).
    """

    isLeaf = True

    def __init__(self, workers: Callable[[], Sequence[tuple[int, int | None]]], metrics: SupervisorMetrics, fetch: Fetch) -> None:
        Resource.__init__(self)
        self._workers = workers
        self._metrics = metrics
        self._fetch = fetch

    def render_GET(self, request: Request) -> bytes | int:
        path = (request.path or b"").rstrip(b"/")
        request.setHeader(b"Cache-Control", b"no-store")
        if path == b"/healthz":
            request.setHeader(b"Content-Type", b"text/plain")
            return b"ok\n"
        if path in (b"/readyz", b"/metrics"):
            gone: list[Failure] = []  # (the client hung up before the workers answered)
            request.notifyFinish().addErrback(gone.append)
            work = self._ready(request, gone) if path == b"/readyz" else self._scrape(request, gone)
            Deferred.fromCoroutine(work).addErrback(self._failed, request, gone)
            return NOT_DONE_YET
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain")
        return b"not found\n"

    async def _ask_all(self, path: str) -> dict[int, tuple[int, bytes] | str]:
        """Each worker's answer to ``path``, or why there is none."""
        answers: dict[int, tuple[int, bytes] | str] = {}
        asking: list[tuple[int, Deferred[tuple[int, bytes]]]] = []
        for index, port in self._workers():
            if port is None:
                answers[index] = "not running"
            else:
                asking.append((index, Deferred.fromCoroutine(_awaited(self._fetch(port, path)))))
        results = await DeferredList([d for _, d in asking], consumeErrors=True)
        for (index, _), (ok, result) in zip(asking, results, strict=True):
            if ok:
                answers[index] = result
            else:
                failure = cast(Failure, result)
                answers[index] = f"no answer ({failure.getErrorMessage() or 'failed'})"
        return answers

    async def _ready(self, request: Request, gone: list[Failure]) -> None:
        problems = []
        for index, answer in sorted((await self._ask_all("/readyz")).items()):
            if isinstance(answer, str):
                problems.append(f"worker {index}: {answer}")
            elif answer[0] != 200:
                problems.append(f"worker {index}: {answer[1].decode(errors='replace').strip().removeprefix('not ready: ')}")
        if gone:  # no one to answer (a write or a finish would raise)
            return
        request.setHeader(b"Content-Type", b"text/plain")
        if problems:
            request.setResponseCode(503)
            request.write(f"not ready: {'; '.join(problems)}\n".encode())
        else:
            request.write(b"ready\n")
        request.finish()

    async def _scrape(self, request: Request, gone: list[Failure]) -> None:
        texts = {}
        for index, answer in (await self._ask_all("/metrics")).items():
            if not isinstance(answer, str) and answer[0] == 200:
                texts[index] = answer[1].decode(errors="replace")
        body = combine(self._metrics.registry, texts)
        if gone:
            return
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: Request, gone: list[Failure]) -> None:
        if gone:
            return
        request.setResponseCode(503)
        request.setHeader(b"Content-Type", b"text/plain")
        request.write(f"unavailable: {failure.getErrorMessage()}\n".encode())
        request.finish()


async def _awaited(work: Awaitable[tuple[int, bytes]]) -> tuple[int, bytes]:
    return await work
