"""The whole mirror without sockets or real time, for unit tests.

:class:`InMemoryMirror` wires the real :class:`~mirror.registry.registry.Registry` and
:class:`~mirror.web.resource.RegistryResource` to a store (memory or files), a
:class:`~twisted.internet.task.Clock`, and an upstream reached through treq's in-memory
agent (``iosim`` underneath): a test double of a registry as a Twisted resource (see
tests/fake_upstream.py), or an agent whose every connection is refused.  Requests go
through the same in-memory HTTP, so the web edge's parsing and error rendering are
exercised too.  Blocking work (fill writes, commits) runs at once.
"""

from __future__ import annotations

from typing import Any

import attrs

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from twisted.web.resource import Resource
from zope.interface import implementer

from mirror.config import MirrorConfig
from mirror.registry.cluster import Cluster
from mirror.registry.registry import Registry
from mirror.storage.base import Store
from mirror.tap import build_auth
from mirror.upstream.client import Upstream
from mirror.web.resource import RegistryResource


def run_blocking_now(f, *args, **kw) -> Deferred:
    """Stands in for deferToThread: runs at once."""
    return maybeDeferred(f, *args, **kw)


@implementer(IBodyProducer)
class _BodyNow:
    """A request body written at once (treq's default producer waits for the global
    reactor's cooperator, which unit tests never run)."""

    def __init__(self, body: bytes | str) -> None:
        self.body = body.encode() if isinstance(body, str) else body
        self.length = len(self.body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IAgent)
class RefusingAgent:
    """An upstream that is not there: every connection is refused."""

    def __init__(self) -> None:
        self.requests = 0

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.requests += 1
        return fail(ConnectionRefusedError("nothing listens there"))


@attrs.frozen
class Answer:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def error_code(self) -> str | None:
        import json

        try:
            return json.loads(self.body)["errors"][0]["code"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None


class InMemoryMirror:
    """A registry and its web edge over in-memory HTTP (see the module docstring)."""

    def __init__(
        self,
        config: MirrorConfig,
        store: Store,
        *,
        upstream: Resource | None = None,
        clock: Clock | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.clock = clock or Clock()
        # Time moves only when a test advances it: an upstream failure is final here, not
        # retried after a backoff no one would wait out (tests/test_upstream_retry.py
        # drives retries with the clock).
        config = attrs.evolve(config, upstreams=tuple(attrs.evolve(u, retry_deadline=0) for u in config.upstreams))
        self.upstream_agent: Any = RequestTraversalAgent(upstream) if upstream is not None else RefusingAgent()
        http = HTTPClient(self.upstream_agent)
        self.registry = Registry(
            config, store, lambda u, metrics: Upstream(u, http, self.clock, metrics), self.clock, run_blocking_now, cluster
        )
        self.resource = RegistryResource(self.registry, build_auth(config), run_blocking_now)
        self._agent = RequestTraversalAgent(self.resource)
        self._client = HTTPClient(self._agent, data_to_body_producer=_BodyNow)

    def pump(self) -> None:
        """Move every byte in flight, both ways, between client, mirror and upstream."""
        for _ in range(50):
            if isinstance(self.upstream_agent, RequestTraversalAgent):
                self.upstream_agent.flush()
            self._agent.flush()

    def wait(self, d: Deferred) -> Any:
        """Pump until ``d`` has fired; its result."""
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        for _ in range(100):
            if outcome:
                break
            self.pump()
        assert outcome, "no answer (a request is stuck waiting for something)"
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    def request(self, method: str, path: str, **kw: Any) -> Answer:
        """One request to the mirror; the whole answer."""
        response = self.wait(self._client.request(method, "http://mirror.test" + path, **kw))
        body = self.wait(treq.content(response))
        return Answer(response.code, response.headers, body)

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw)
