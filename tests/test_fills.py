"""Tests of BlobFill (upstream body -> verified store), the responders that follow it
(spool -> client), and Fills (one fill per digest).

The upstream transport is a StringTransport, time is a task.Clock, and the client is a
consumer that records writes and can be paused, as a full socket would.
"""

import pytest

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from mirror.core.oci import Digest
from mirror.registry.fills import FRUITLESS_RESUMES, QUEUE_HIGH, BlobFill
from mirror.storage.fs import open_filesystem_store
from mirror.storage.sending import ClientGone
from tests.storeutil import Sync

DATA = bytes(range(256)) * 4096  # 1 MiB


class Later:
    """Stands in for deferToThread, holding each call until the test runs it (a slow disk)."""

    def __init__(self):
        self.pending = []

    def __call__(self, f, *args):
        d = Deferred()
        self.pending.append((d, f, args))
        return d

    def step(self):
        """Run the oldest held call."""
        d, f, args = self.pending.pop(0)
        d.callback(f(*args))

    def run_all(self):
        while self.pending:
            self.step()


def run_now(f, *args):
    """Stands in for deferToThread: runs at once, failures as a failed Deferred."""
    return maybeDeferred(f, *args)


@implementer(IConsumer)
class Consumer:
    """A client socket: records bytes, can be paused like a full send buffer."""

    def __init__(self):
        self.data = bytearray()
        self.producer = None

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.data += data


@pytest.fixture
def root(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def store(root):
    return Sync(open_filesystem_store(root))


def make_fill(store, data=DATA, digest=None, size="auto", clock=None, resume=None):
    digest = digest or Digest.of(data)
    fill = BlobFill(
        store.blobs.writer(), digest, len(data) if size == "auto" else size, clock or Clock(), 30, run_now, resume=resume
    )
    transport = StringTransport()
    fill.makeConnection(transport)
    return fill, transport


def outcome(d):
    results = []
    d.addBoth(results.append)
    return results[0] if results else None


def test_fill_commits_and_follower_gets_every_byte(store):
    """A follower receives the bytes as they arrive, and the last one only after commit."""
    clock = Clock()
    fill, _ = make_fill(store, clock=clock)
    client = Consumer()
    sent = fill.follower().send(client)
    fill.dataReceived(DATA[:1000])  # the first bytes go to the disk at once...
    assert bytes(client.data) == DATA[:1000]
    fill.dataReceived(DATA[1000:])
    assert len(client.data) == 1000  # ...then a batch waits for the reactor's turn to end
    clock.advance(0)
    assert len(client.data) == len(DATA) - 1  # last byte held until verified
    assert outcome(sent) is None and not sent.called
    fill.connectionLost(Failure(ResponseDone()))
    assert fill.stored
    assert bytes(client.data) == DATA
    assert sent.called
    assert store.blobs.stat(Digest.of(DATA)) == len(DATA)


def test_digest_mismatch_stores_nothing_and_fails_follower(store, root):
    """Bytes that do not hash to the digest are never stored, and the client never gets all of them."""
    wanted = Digest.of(b"something else")
    fill, _ = make_fill(store, digest=wanted)
    client = Consumer()
    sent = fill.follower().send(client)
    fill.dataReceived(DATA)
    fill.connectionLost(Failure(ResponseDone()))
    assert isinstance(outcome(sent), Failure)
    assert len(client.data) < len(DATA)
    assert store.blobs.stat(wanted) is None and store.blobs.stat(Digest.of(DATA)) is None
    assert list((root / "spool").iterdir()) == []
    assert isinstance(outcome(fill.done), Failure)


def test_body_cut_short_fails(store):
    """An upstream connection dropped mid-body is a failure, not a short blob."""
    fill, _ = make_fill(store)
    fill.dataReceived(DATA[:100])
    fill.connectionLost(Failure(PotentialDataLoss()))
    assert isinstance(outcome(fill.done), Failure)
    assert store.blobs.stat(Digest.of(DATA)) is None


def test_more_than_content_length_aborts(store):
    """An upstream sending past its Content-Length is cut off and the fill fails."""
    fill, transport = make_fill(store, size=10)
    fill.dataReceived(DATA[:11])
    assert transport.producerState == "stopped"
    fill.connectionLost(Failure(ResponseDone()))
    assert "more than its Content-Length" in outcome(fill.done).getErrorMessage()


def test_unknown_length_commits_on_end(store):
    """Without Content-Length, everything is readable as it comes; commit decides at the end."""
    fill, _ = make_fill(store, size=None)
    fill.dataReceived(DATA)
    assert fill.readable_end() == len(DATA)
    fill.connectionLost(Failure(ResponseDone()))
    assert fill.stored and store.blobs.stat(Digest.of(DATA)) == len(DATA)


def test_idle_upstream_times_out(store):
    """An upstream that stops sending is abandoned after the idle timeout."""
    clock = Clock()
    fill, transport = make_fill(store, clock=clock)
    fill.dataReceived(DATA[:10])
    clock.advance(29)
    assert transport.producerState == "producing"
    fill.dataReceived(DATA[10:20])  # activity resets the timer
    clock.advance(0)  # (the reactor's turn ends: the batch is written)
    clock.advance(29)
    assert transport.producerState == "producing"
    clock.advance(2)
    assert transport.producerState == "stopped"
    fill.connectionLost(Failure(ResponseDone()))
    assert "sent nothing for 30 s" in outcome(fill.done).getErrorMessage()


def test_paused_client_gets_nothing_until_resumed(store):
    """Backpressure: a paused sender writes nothing; resuming sends the rest."""
    fill, _ = make_fill(store)
    client = Consumer()
    fill.follower().send(client)
    sender = client.producer  # the follower registered itself with the client
    sender.pauseProducing()
    fill.dataReceived(DATA)
    fill.connectionLost(Failure(ResponseDone()))
    assert len(client.data) == 0
    sender.resumeProducing()
    assert bytes(client.data) == DATA


def test_client_leaving_does_not_stop_the_fill(store):
    """A client that disconnects mid-stream leaves the fill running; the blob still lands."""
    fill, transport = make_fill(store)
    client = Consumer()
    done = fill.follower().send(client)
    sender = client.producer
    fill.dataReceived(DATA[:500])
    sender.stopProducing()
    result = outcome(done)
    assert isinstance(result, Failure) and result.check(ClientGone)
    assert transport.producerState == "producing"
    fill.dataReceived(DATA[500:])
    fill.connectionLost(Failure(ResponseDone()))
    assert store.blobs.stat(Digest.of(DATA)) == len(DATA)


def test_cached_range(store):
    """A cached blob's byte range is sent exactly."""
    d = Digest.of(DATA)
    store.blobs.put(d, DATA)
    client = Consumer()
    done = store.blobs.open(d).send(client, 1000, 300_000)
    assert done.called
    assert bytes(client.data) == DATA[1000:300_000]


def test_slow_disk_pauses_the_upstream_and_resumes_it(store):
    """When the writer thread falls more than QUEUE_HIGH behind, the upstream socket is
    paused (TCP holds the rest); it resumes once the backlog drops under QUEUE_LOW."""
    run_later = Later()

    data = b"x" * (QUEUE_HIGH + 1024 * 1024)
    fill = BlobFill(store.blobs.writer(), Digest.of(data), len(data), Clock(), 30, run_later)
    transport = StringTransport()
    fill.makeConnection(transport)
    for i in range(0, len(data), 65536):
        fill.dataReceived(data[i : i + 65536])
    assert transport.producerState == "paused"
    run_later.run_all()
    assert transport.producerState == "producing"
    fill.connectionLost(Failure(ResponseDone()))
    run_later.run_all()
    assert fill.stored and store.blobs.stat(Digest.of(data)) == len(data)


def test_clients_finish_when_verified_before_the_commit(root):
    """The last byte goes out once the digest verified; fsync and rename (commit) run after,
    and only the store waits for them."""
    run_later = Later()

    store = Sync(open_filesystem_store(root, run_later))

    fill = BlobFill(store.blobs.writer(), Digest.of(DATA), len(DATA), Clock(), 30, run_later)
    fill.makeConnection(StringTransport())
    client = Consumer()
    sent = fill.follower().send(client)
    fill.dataReceived(DATA)
    run_later.step()  # the write
    fill.connectionLost(Failure(ResponseDone()))
    assert bytes(client.data) == DATA and sent.called  # whole and verified: done
    assert fill.verified and not fill.stored
    assert store.blobs.stat(Digest.of(DATA)) is None  # not in the store yet
    run_later.step()  # the commit
    assert fill.stored and store.blobs.stat(Digest.of(DATA)) == len(DATA)


def test_a_node_following_this_fill_gets_the_last_byte_only_once_stored(root):
    """What another node reads (UntilStored) ends only when the blob is in the store: the
    last byte waits for the commit, not just the verification, so the follower's own commit
    finds the blob stored and uploads nothing."""
    from mirror.registry.fills import UntilStored

    run_later = Later()

    store = Sync(open_filesystem_store(root, run_later))
    fill = BlobFill(store.blobs.writer(), Digest.of(DATA), len(DATA), Clock(), 30, run_later)
    fill.makeConnection(StringTransport())
    peer = Consumer()
    sent = fill.writer.follow(UntilStored(fill), len(DATA)).send(peer)
    fill.dataReceived(DATA)
    run_later.step()  # the write
    fill.connectionLost(Failure(ResponseDone()))
    assert fill.verified and not fill.stored
    assert len(peer.data) == len(DATA) - 1 and not sent.called
    run_later.step()  # the commit
    assert fill.stored and bytes(peer.data) == DATA and sent.called


def test_a_follower_waits_longer_for_the_held_back_last_byte(store):
    """With a tail timeout, a fill that has all but the last byte waits that long (the
    followed node is uploading), while a stall before that is still the idle timeout."""
    clock = Clock()
    fill = BlobFill(store.blobs.writer(), Digest.of(DATA), len(DATA), clock, 30, run_now, tail_timeout=600)
    transport = StringTransport()
    fill.makeConnection(transport)
    fill.dataReceived(DATA[:-1])
    clock.advance(590)
    assert transport.producerState == "producing"
    fill.dataReceived(DATA[-1:])
    fill.connectionLost(Failure(ResponseDone()))
    assert fill.stored
    stalled = BlobFill(store.blobs.writer(), Digest.of(DATA), len(DATA), clock, 30, run_now, tail_timeout=600)
    stalled_transport = StringTransport()
    stalled.makeConnection(stalled_transport)
    stalled.dataReceived(DATA[:100])
    clock.advance(31)
    assert stalled_transport.producerState == "stopped"


# resuming a body that broke ------------------------------------------------------------------
class Body:
    """The upstream's answer to a resume request; the test feeds its body."""

    def __init__(self):
        self.transport = StringTransport()
        self.protocol = None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class Resumer:
    """Stands in for the upstream's Range request: records what was asked, answers with a
    Body (whose first ``skip`` bytes come before the offset), or fails, or waits on ``hold``."""

    def __init__(self, skip=0, fail=None):
        self.asked, self.bodies = [], []
        self.skip, self.fail, self.hold = skip, fail, None

    async def __call__(self, offset, why):
        self.asked.append(offset)
        if self.hold is not None:
            await self.hold
        if self.fail is not None:
            raise self.fail
        body = Body()
        self.bodies.append(body)
        return body, self.skip


def broken():
    return Failure(ResponseFailed([Failure(ConnectionLost())]))


def test_a_broken_body_is_resumed_and_the_client_gets_every_byte(store):
    resumer = Resumer()
    fill, _ = make_fill(store, resume=resumer)
    client = Consumer()
    sent = fill.follower().send(client)
    fill.dataReceived(DATA[:1000])
    fill.connectionLost(broken())
    assert resumer.asked == [1000] and not fill.done.called
    body = resumer.bodies[0].protocol
    body.dataReceived(DATA[1000:])
    body.connectionLost(Failure(ResponseDone()))
    assert fill.stored and bytes(client.data) == DATA and sent.called
    assert store.blobs.stat(Digest.of(DATA)) == len(DATA)


def test_a_resume_answered_whole_skips_the_bytes_before_the_offset(store):
    resumer = Resumer(skip=1000)  # an upstream that ignores Range: 200, from byte 0
    fill, _ = make_fill(store, resume=resumer)
    fill.dataReceived(DATA[:1000])
    fill.connectionLost(broken())
    body = resumer.bodies[0].protocol
    body.dataReceived(DATA[:700])  # all before the offset
    body.dataReceived(DATA[700:])
    body.connectionLost(Failure(ResponseDone()))
    assert fill.stored and store.blobs.stat(Digest.of(DATA)) == len(DATA)


def test_a_stalled_body_and_a_short_one_are_resumed_too(store):
    clock = Clock()
    resumer = Resumer()
    fill, transport = make_fill(store, clock=clock, resume=resumer)
    fill.dataReceived(DATA[:1000])
    clock.advance(31)  # the idle timeout stops the stalled body...
    assert transport.producerState == "stopped"
    fill.connectionLost(broken())  # ...which ends as an aborted body does
    assert resumer.asked == [1000]
    body = resumer.bodies[0].protocol
    body.dataReceived(DATA[1000:200_000])
    body.connectionLost(Failure(ResponseDone()))  # a 206 shorter than asked
    assert resumer.asked == [1000, 200_000]
    body = resumer.bodies[1].protocol
    body.dataReceived(DATA[200_000:])
    body.connectionLost(Failure(ResponseDone()))
    assert fill.stored


def test_a_body_that_keeps_breaking_without_progress_fails_and_cuts_the_client_off(store):
    resumer = Resumer()
    fill, _ = make_fill(store, resume=resumer)
    client = Consumer()
    sent = fill.follower().send(client)
    fill.dataReceived(DATA[:100_000])
    fill.connectionLost(broken())
    for body in iter(lambda: resumer.bodies[-1] if not fill.done.called else None, None):
        body.protocol.dataReceived(DATA[len(client.data) : len(client.data) + 10])
        body.protocol.connectionLost(broken())
    assert len(resumer.asked) == 1 + FRUITLESS_RESUMES
    assert "kept breaking" in outcome(fill.done).getErrorMessage()
    assert isinstance(outcome(sent), Failure) and len(client.data) < len(DATA)
    assert store.blobs.stat(Digest.of(DATA)) is None


def test_a_resume_the_upstream_refuses_fails_the_fill(store, root):
    resumer = Resumer(fail=RuntimeError("416 Range Not Satisfiable"))
    fill, _ = make_fill(store, resume=resumer)
    fill.dataReceived(DATA[:1000])
    fill.connectionLost(broken())
    message = outcome(fill.done).getErrorMessage()
    assert "broke at byte 1000" in message and "416" in message
    assert list((root / "spool").iterdir()) == []


def test_a_fill_abandoned_while_resuming_takes_no_more_bytes(store):
    resumer = Resumer()
    resumer.hold = Deferred()
    fill, _ = make_fill(store, resume=resumer)
    fill.dataReceived(DATA[:1000])
    fill.connectionLost(broken())
    fill.abandon("the store is full")
    resumer.hold.callback(None)
    assert resumer.bodies[0].transport.producerState == "stopped"  # the new body is not read
    assert "the store is full" in outcome(fill.done).getErrorMessage()


def test_a_body_of_unknown_length_read_to_its_close_is_not_resumed(store):
    """Read-until-close is how such a body ends: the digest decides, no Range request."""
    resumer = Resumer()
    fill, _ = make_fill(store, size=None, resume=resumer)
    fill.dataReceived(DATA)
    fill.connectionLost(Failure(PotentialDataLoss()))
    assert fill.stored and resumer.asked == []


def test_small_chunks_go_to_the_writer_once_per_reactor_turn(store):
    """A TLS upstream hands its body on record by record (16 KiB): the chunks of one
    reactor turn go to the writer thread together, not one hand-off each; the first
    bytes go at once (time to first byte), and a full batch goes without waiting."""
    from mirror.registry.fills import BATCH

    data = DATA * 3
    clock = Clock()
    later = Later()
    fill = BlobFill(store.blobs.writer(), Digest.of(data), len(data), clock, 30, later)
    fill.makeConnection(StringTransport())
    record = 16 * 1024
    fill.dataReceived(data[:record])
    assert len(later.pending) == 1  # the first bytes: at once
    later.run_all()
    for offset in range(record, 8 * record, record):
        fill.dataReceived(data[offset : offset + record])
    assert later.pending == []  # the rest of the turn waits...
    clock.advance(0)
    assert len(later.pending) == 1 and len(later.pending[0][2]) == 7  # ...and goes as one batch
    later.run_all()
    assert fill.writer.size == 8 * record
    step = BATCH // 4
    for offset in range(8 * record, 8 * record + BATCH, step):  # a batch's worth in one turn
        fill.dataReceived(data[offset : offset + step])
    assert len(later.pending) == 1  # goes without waiting for the turn to end
    later.run_all()
    fill.dataReceived(data[8 * record + BATCH :])
    fill.connectionLost(Failure(ResponseDone()))
    later.run_all()
    clock.advance(0)
    assert fill.stored and store.blobs.stat(Digest.of(data)) == len(data)
    assert clock.getDelayedCalls() == []


def test_the_socket_under_a_body_is_read_in_large_chunks():
    """The body's transport proxies the connection's (a TLS layer, then the socket): the
    socket's read size is raised; anything without a socket under it is left alone."""
    from twisted.internet import tcp
    from twisted.web._newclient import TransportProxyProducer

    from mirror.responses import LARGE_READ, read_in_large_chunks

    socket = tcp.Connection.__new__(tcp.Connection)  # (no real socket: only its read size matters)
    assert socket.bufferSize == 64 * 1024

    class TLSLayer:
        transport = socket

    assert read_in_large_chunks(TransportProxyProducer(TLSLayer()))
    assert socket.bufferSize == LARGE_READ
    assert not read_in_large_chunks(TransportProxyProducer(StringTransport()))
    assert not read_in_large_chunks(None)
