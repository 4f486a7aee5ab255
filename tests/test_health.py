"""The metrics listener's /healthz, /readyz and /metrics, over in-memory HTTP."""

from __future__ import annotations

import pytest

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent

from mirror.metrics import Metrics
from mirror.web.health import HealthResource


def get(resource, path):
    agent = RequestTraversalAgent(resource)
    outcome = []
    HTTPClient(agent).get("http://metrics.test" + path).addCallback(
        lambda r: treq.content(r).addCallback(lambda body: outcome.append((r.code, body)))
    )
    for _ in range(10):
        agent.flush()
    assert outcome, "no answer"
    return outcome[0]


@pytest.mark.parametrize(
    ("problem", "status", "body"),
    [(None, 200, b"ready\n"), ("store not writable: x", 503, b"not ready: store not writable: x\n")],
)
def test_readyz_follows_the_readiness_check(problem, status, body):
    async def readiness():
        return problem

    resource = HealthResource(Metrics(), readiness)
    assert get(resource, "/readyz") == (status, body)
    assert get(resource, "/healthz") == (200, b"ok\n")
    code, text = get(resource, "/metrics")
    assert (code == 200 and b"mirror_http_requests_total" in text) or b"# HELP" in text


def test_a_failing_readiness_check_is_not_ready():
    async def readiness():
        raise OSError("disk gone")

    code, body = get(HealthResource(None, readiness), "/readyz")
    assert code == 503 and b"disk gone" in body
