"""Unit tests of the HTTP site's connection limits: the header timeout, the refusals of
malformed framing, and the connection count (no sockets, no real time)."""

import json

import pytest

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from mirror.config import LimitsConfig
from mirror.web.site import LimitedSite, RegistryChannel, connection_budget

HEADER_TIMEOUT = 30
IDLE_TIMEOUT = 120
GET = b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n"


class Answer(Resource):
    """Answers every request with ``ok`` (and its body's length), except ``/slow``,
    which stays open until the test finishes it."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []
        self.pending = []

    def render(self, request):
        self.seen.append((request.method, request.path, request.content.read()))
        if request.path == b"/slow":
            self.pending.append(request)
            return NOT_DONE_YET
        return b"ok"


def make_site(**limits):
    """A LimitedSite over :class:`Answer` on a fake clock."""
    clock = MemoryReactorClock()
    answer = Answer()
    limits = LimitsConfig(**{"header_timeout": HEADER_TIMEOUT, "idle_timeout": IDLE_TIMEOUT, **limits})
    return LimitedSite(answer, limits, reactor=clock), answer, clock


_connected = []


@pytest.fixture(autouse=True)
def _lose_connections():
    """Each test's connections are lost at its end, as the reactor would lose them
    (which closes the temporary files of request bodies)."""
    yield
    while _connected:
        protocol, transport = _connected.pop()
        if not getattr(transport, "lost", False):
            protocol.connectionLost(Failure(ConnectionDone()))


def connect(site, transport=None):
    """A connection to ``site`` over a StringTransport: (protocol, transport)."""
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = transport or StringTransport()
    protocol.makeConnection(transport)
    _connected.append((protocol, transport))
    return protocol, transport


def lose(protocol, transport):
    """The connection closes (the client went away, or the server's close completed)."""
    transport.lost = True
    protocol.connectionLost(Failure(ConnectionDone()))


def trickle(channel, clock, data, interval=1.0):
    """Send ``data`` one byte every ``interval`` seconds (stopping if the server closes)."""
    for byte in data:
        if channel.transport.disconnecting:
            return
        channel.dataReceived(bytes([byte]))
        clock.advance(interval)


def test_a_request_is_answered_and_the_connection_kept():
    """The ordinary case: an HTTP/1.1 GET is answered and the connection stays open."""
    site, answer, _ = make_site()
    channel, transport = connect(site)
    channel.dataReceived(GET)
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert not transport.disconnecting
    assert answer.seen == [(b"GET", b"/v2/", b"")]


def test_headers_sent_byte_by_byte_are_cut_at_the_header_timeout():
    """A client trickling its headers one byte a second (which restarts Twisted's idle
    timeout every time) is answered 408 and closed header_timeout after its first byte."""
    site, answer, clock = make_site()
    channel, transport = connect(site)
    trickle(channel, clock, b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nX-Slow: " + b"a" * 100, interval=1.0)
    assert transport.disconnecting
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close\r\n" in transport.value()
    assert clock.seconds() == HEADER_TIMEOUT  # the 30th byte was the last one read
    assert answer.seen == []


def test_a_silent_connection_is_closed_at_the_header_timeout_without_an_answer():
    """A connection that sends nothing is closed after header_timeout, with no response."""
    site, _, clock = make_site()
    _, transport = connect(site)
    clock.advance(HEADER_TIMEOUT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting
    assert transport.value() == b""


def test_a_long_response_is_not_cut_and_the_idle_timeout_follows_it():
    """While a request is being answered neither timeout runs, however long it takes;
    afterwards the kept-alive connection is closed by the idle timeout alone."""
    site, answer, clock = make_site()
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: mirror\r\n\r\n")
    clock.advance(10 * IDLE_TIMEOUT)
    assert not transport.disconnecting
    (request,) = answer.pending
    request.write(b"late")
    request.finish()
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n") and transport.value().endswith(b"late\r\n0\r\n\r\n")
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting  # no header timer on an idle kept-alive connection
    clock.advance(1)
    assert transport.disconnecting
    assert b"408" not in transport.value()


def test_a_slow_upload_body_is_timed_by_the_idle_timeout_only():
    """The header timer stops at the end of the headers: a body whose bytes come further
    apart than nothing but idle_timeout is received whole, long after header_timeout;
    a body that stalls for idle_timeout is cut."""
    site, answer, clock = make_site()
    channel, transport = connect(site)
    channel.dataReceived(b"PUT /upload HTTP/1.1\r\nHost: mirror\r\nContent-Length: 5\r\n\r\n")
    trickle(channel, clock, b"hello", interval=IDLE_TIMEOUT - 1)
    assert answer.seen == [(b"PUT", b"/upload", b"hello")]
    assert not transport.disconnecting
    channel.dataReceived(b"PUT /upload HTTP/1.1\r\nHost: mirror\r\nContent-Length: 5\r\n\r\nhe")
    clock.advance(IDLE_TIMEOUT)
    assert transport.disconnecting
    assert len(answer.seen) == 1


def test_the_next_request_on_a_kept_connection_is_timed_from_its_first_byte():
    """After an answer the connection may idle; the next request's headers are then
    due header_timeout after its first byte."""
    site, _, clock = make_site()
    channel, transport = connect(site)
    channel.dataReceived(GET)
    clock.advance(IDLE_TIMEOUT - 10)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
    clock.advance(HEADER_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
    assert transport.value().count(b"HTTP/1.1 200 OK") == 1
    assert transport.value().endswith(b"Request headers not received in time.\n")


def test_a_pipelined_request_waits_untimed_while_the_one_before_it_is_answered():
    """Bytes of a second request that arrive while the first is being answered are not
    timed until the first is done; then its headers are due within header_timeout."""
    site, answer, clock = make_site()
    channel, transport = connect(site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: mirror\r\n\r\nGET /v2/ HTTP/1.1\r\n")
    clock.advance(5 * HEADER_TIMEOUT)
    assert not transport.disconnecting
    answer.pending[0].finish()
    clock.advance(HEADER_TIMEOUT - 1)
    assert not transport.disconnecting
    channel.dataReceived(b"Host: mirror\r\n\r\n")
    assert [path for _, path, _ in answer.seen] == [b"/slow", b"/v2/"]
    assert not transport.disconnecting


MALFORMED = {
    # added here: Twisted used to hold these open, serve them, or close without a word
    "bare LF line ends": (b"GET /v2/ HTTP/1.1\nHost: mirror\n\n", b"bare LF"),
    "a bare LF before the CRLF": (b"GET /v2/ HTTP/1.1\r\nHost: mirror\n\r\n", b"bare LF"),
    "HTTP/1.1 without Host": (b"GET /v2/ HTTP/1.1\r\n\r\n", b"exactly one Host"),
    "two Host headers": (b"GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"exactly one Host"),
    "Host missing, with a body": (b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"exactly one Host"),
    "Transfer-Encoding identity": (
        b"PUT /x HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc",
        b"must end in chunked",
    ),
    "a header line over max_header_size": (b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", b"too large"),
    # Twisted's own answers, kept: a bare 400 and a close
    "two Content-Lengths": (b"PUT /x HTTP/1.1\r\nHost: m\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", None),
    "Content-Length and chunked": (
        b"PUT /x HTTP/1.1\r\nHost: m\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        None,
    ),
    "a coding other than chunked": (b"PUT /x HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", None),
    "a malformed chunk": (b"PUT /x HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", None),
    "headers over max_header_size": (
        b"GET /v2/ HTTP/1.1\r\nHost: m\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 9000) for i in range(8)) + b"\r\n",
        None,
    ),
    "more than max_headers headers": (b"GET /v2/ HTTP/1.1\r\nHost: m\r\n" + b"X: a\r\n" * 100 + b"\r\n", None),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_framing_gets_a_prompt_400_and_a_close(name):
    """Each framing mistake is answered 400 at once (no time passes) and the connection
    closed; the resource never sees the request."""
    data, reason = MALFORMED[name]
    site, answer, _ = make_site()
    channel, transport = connect(site)
    channel.dataReceived(data)
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert transport.disconnecting
    if reason is not None:
        assert b"Connection: close\r\n" in transport.value() and reason in transport.value()
    assert answer.seen == []


def test_a_bare_lf_is_refused_when_it_arrives_alone():
    """Byte by byte, the bare LF is refused as soon as it arrives, not at the timeout."""
    site, _, _ = make_site()
    channel, transport = connect(site)
    for byte in b"GET /v2/ HTTP/1.1\n":
        channel.dataReceived(bytes([byte]))
    assert transport.disconnecting and b"bare LF" in transport.value()


def test_crlf_split_between_reads_is_not_a_bare_lf():
    """A CR at the end of one read and its LF at the start of the next make a line end."""
    site, answer, _ = make_site()
    channel, transport = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r")
    channel.dataReceived(b"\nHost: mirror\r")
    channel.dataReceived(b"\n\r")
    channel.dataReceived(b"\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(answer.seen) == 1


def test_http_1_0_without_host_is_served():
    """Host is required of HTTP/1.1 requests only."""
    site, answer, _ = make_site()
    channel, transport = connect(site)
    channel.dataReceived(b"GET /v2/ HTTP/1.0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.0 200 OK\r\n")
    assert len(answer.seen) == 1


def test_big_headers_within_the_limits_are_accepted():
    """A 40 KiB bearer token (over Twisted's 16 KiB default) and max_headers headers pass."""
    site, answer, _ = make_site()
    channel, transport = connect(site)
    token = b"t" * 40_000
    extra = b"".join(b"X-%d: a\r\n" % i for i in range(98))  # + Host + Authorization = 100
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer " + token + b"\r\n" + extra + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(answer.seen) == 1


def test_a_tls_handshake_on_the_plain_port_is_refused_at_once():
    """A TLS ClientHello (first byte 0x16) gets the plain-HTTP 400 and a close."""
    site, _, _ = make_site()
    channel, transport = connect(site)
    channel.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert transport.value().endswith(b"This port speaks plain HTTP; TLS was offered.\n")
    assert transport.disconnecting


def test_connections_beyond_max_connections_are_answered_503():
    """With max_connections open, a new connection gets a 503 with the OCI error body and
    is closed without its request being read; once one closes, connections are served."""
    site, answer, _ = make_site(max_connections=2)
    first, _ = connect(site)
    connect(site)
    assert site.connections == 2
    refused, transport = connect(site)
    assert not isinstance(refused, RegistryChannel)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" in head and b"Content-Type: application/json" in head
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert transport.disconnecting
    refused.dataReceived(GET)
    assert answer.seen == []
    assert site.connections == 2 and site.refused == 1

    lose(first, first.transport)
    assert site.connections == 1
    channel, transport = connect(site)
    channel.dataReceived(GET)
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")


@implementer(ITCPTransport)
class HalfClosingTransport(StringTransport):
    """A StringTransport that records a half-close and an abort, as TCP offers them."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True


def test_a_refused_tcp_connection_lingers_briefly_after_its_503():
    """On TCP a refusal shuts only the sending side and drops what the client sends (so
    its request meets an open socket, not a reset), and is cut 2 s later at most."""
    site, _, clock = make_site(max_connections=1)
    connect(site)
    refused, transport = connect(site, HalfClosingTransport())
    assert transport.value().startswith(b"HTTP/1.1 503 ")
    assert transport.write_closed and not transport.disconnecting
    refused.dataReceived(GET)
    clock.advance(1.9)
    assert not transport.aborted
    clock.advance(0.1)
    assert transport.aborted

    refused, transport = connect(site, HalfClosingTransport())
    lose(refused, transport)  # the client read it and closed
    assert [c for c in clock.getDelayedCalls() if c.func == transport.abortConnection] == []


def test_configure_applies_to_new_connections():
    """A reload's new limits apply to connections made afterwards."""
    site, _, clock = make_site()
    _, old = connect(site)
    site.configure(LimitsConfig(header_timeout=5, idle_timeout=IDLE_TIMEOUT))
    _, new = connect(site)
    clock.advance(5)
    assert new.disconnecting and not old.disconnecting


def test_connection_budget_follows_the_fd_limit():
    """Two descriptors a connection after a reserve; no limit is a very large budget."""
    assert connection_budget(1024) == 448
    assert connection_budget(65536) == 32704
    assert connection_budget(100) == 16
    assert connection_budget(-1) > 10**6
