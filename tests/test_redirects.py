"""Unit tests of the upstream redirect agent (mirror.upstream.redirects) over a fake agent."""

from __future__ import annotations

import pytest

from twisted.internet.defer import Deferred, succeed
from twisted.web.http_headers import Headers

from mirror.upstream.redirects import MAX_REDIRECTS, RedirectAgent, RedirectRefused


class FakeResponse:
    """Just what the redirect agent looks at: code, headers, length, deliverBody."""

    def __init__(self, code: int, location: str | None = None) -> None:
        self.code = code
        self.headers = Headers({b"location": [location.encode()]} if location is not None else {})
        self.length = 0
        self.drained = False

    def deliverBody(self, protocol) -> None:
        self.drained = True


class FakeAgent:
    """Answers each URL from ``routes`` (a 200 otherwise); records (method, url, headers)."""

    def __init__(self, routes: dict[str, tuple[int, str | None]]) -> None:
        self.routes = routes
        self.sent: list[tuple[bytes, str, Headers | None]] = []
        self.responses: list[FakeResponse] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        url = uri.decode()
        self.sent.append((method, url, headers))
        response = FakeResponse(*self.routes.get(url, (200, None)))
        self.responses.append(response)
        return succeed(response)


def result(d: Deferred):
    outcome = []
    d.addBoth(outcome.append)
    assert outcome, "did not fire"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


TOKEN = Headers({b"Authorization": [b"Bearer secret"], b"Accept": [b"*/*"]})


def test_relative_locations_resolve_against_the_hop_that_sent_them():
    """Each Location is joined with the URL that answered it, not the first of the chain."""
    agent = FakeAgent(
        {
            "https://reg.test/v2/a/blobs/x": (307, "https://cdn.test/signed/x?sig=1"),
            "https://cdn.test/signed/x?sig=1": (302, "/data/x"),
            "https://cdn.test/data/x": (302, "other"),
        }
    )
    response = result(RedirectAgent(agent).request(b"GET", b"https://reg.test/v2/a/blobs/x", TOKEN))
    assert response.code == 200
    assert [url for _, url, _ in agent.sent][-1] == "https://cdn.test/data/other"
    assert all(r.drained for r in agent.responses[:-1]) and not agent.responses[-1].drained


def test_credentials_stay_with_their_origin():
    """Authorization goes along same-origin hops, is dropped at the first other origin, and is
    not sent again when the chain comes back; other headers travel on."""
    agent = FakeAgent(
        {
            "https://reg.test/v2/a/blobs/x": (307, "/storage/x"),
            "https://reg.test/storage/x": (307, "https://reg.test:8443/x"),
            "https://reg.test:8443/x": (307, "https://reg.test/back"),
        }
    )
    result(RedirectAgent(agent).request(b"GET", b"https://reg.test/v2/a/blobs/x", TOKEN))
    auth = [h.getRawHeaders(b"authorization") for _, _, h in agent.sent]
    assert auth == [[b"Bearer secret"], [b"Bearer secret"], None, None]
    assert all(h.getRawHeaders(b"accept") == [b"*/*"] for _, _, h in agent.sent)


def test_default_ports_are_the_same_origin():
    """https://host and https://host:443 are one origin: the credential is kept."""
    agent = FakeAgent({"https://reg.test/x": (302, "https://REG.test:443/y")})
    result(RedirectAgent(agent).request(b"GET", b"https://reg.test/x", TOKEN))
    assert agent.sent[1][2].getRawHeaders(b"authorization") == [b"Bearer secret"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_head_stays_head(status):
    """A HEAD is redirected as a HEAD (even on 303): no body is fetched by a size check."""
    agent = FakeAgent({"http://reg.test/x": (status, "http://cdn.test/x")})
    result(RedirectAgent(agent).request(b"HEAD", b"http://reg.test/x"))
    assert [(m, u) for m, u, _ in agent.sent] == [(b"HEAD", "http://reg.test/x"), (b"HEAD", "http://cdn.test/x")]


def test_other_methods_pass_through():
    """Only GET and HEAD are followed: a POST gets the redirect response itself."""
    agent = FakeAgent({"http://reg.test/x": (307, "http://cdn.test/x")})
    assert result(RedirectAgent(agent).request(b"POST", b"http://reg.test/x")).code == 307
    assert len(agent.sent) == 1


def test_chain_limit():
    """MAX_REDIRECTS hops are followed; one more is refused, naming the first URL."""
    routes = {f"http://cdn.test/{i}": (302, f"/{i + 1}") for i in range(MAX_REDIRECTS + 1)}
    result(
        RedirectAgent(FakeAgent({**routes, f"http://cdn.test/{MAX_REDIRECTS}": (200, None)})).request(
            b"GET", b"http://cdn.test/0"
        )
    )
    agent = FakeAgent(routes)
    with pytest.raises(RedirectRefused, match=f"more than {MAX_REDIRECTS} redirects from http://cdn.test/0"):
        result(RedirectAgent(agent).request(b"GET", b"http://cdn.test/0"))
    assert len(agent.sent) == MAX_REDIRECTS + 1


@pytest.mark.parametrize(
    ("location", "message"),
    [
        (None, "302 redirect without a Location from http://reg.test/x"),
        ("file:///etc/passwd", "302 redirect to a file: URL from http://reg.test/x: only http and https are followed"),
        ("javascript:alert(1)", "to a javascript: URL"),
        ("https:///nohost", "302 redirect to a URL without a host"),
        ("http://cdn.test:99999/x", "302 redirect to a malformed Location"),
        ("http://cdn.test/é", "302 redirect to a malformed Location"),
    ],
)
def test_refused_locations(location, message):
    """A redirect without a usable http(s) Location fails with a message saying why; the URL
    shown loses its query (a presigned URL's signature)."""
    agent = FakeAgent({"http://reg.test/x?X-Amz-Signature=secret": (302, location)})
    with pytest.raises(RedirectRefused, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        result(RedirectAgent(agent).request(b"GET", b"http://reg.test/x?X-Amz-Signature=secret"))
    assert "secret" not in str(e.value)
