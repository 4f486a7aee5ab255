"""Pure parts of the S3 client and the cluster's request signing (no sockets, no real time)."""

from __future__ import annotations

import os

from mirror.config import ClusterConfig, S3Config
from mirror.registry.cluster import Cluster
from mirror.storage.s3.client import FileSlice, S3Client, _timestamp, parse_error

CONFIG = S3Config(endpoint="http://127.0.0.1:9006", bucket="mirror", access_key="AKID", secret_key="s3cret", prefix="p/")


def test_urls_quote_keys_and_put_the_prefix_inside_the_bucket():
    client = S3Client(CONFIG, http=None, clock=None)  # type: ignore[arg-type]
    assert client.url("repositories/a/_tags/v1.0+x") == "http://127.0.0.1:9006/mirror/p/repositories/a/_tags/v1.0%2Bx"
    assert client.url(None, {"prefix": "p/blobs/", "list-type": "2"}) == (
        "http://127.0.0.1:9006/mirror/?list-type=2&prefix=p%2Fblobs%2F"
    )


def test_signatures_cover_the_payload_or_say_it_is_unsigned():
    """Small bodies are signed with their hash; a streamed body is UNSIGNED-PAYLOAD; the
    secret never appears in a header."""
    client = S3Client(CONFIG, http=None, clock=None)  # type: ignore[arg-type]
    url = client.url("blobs/sha256/ab")
    signed = client.sign("PUT", url, {"If-None-Match": "*"}, None, b"data")
    assert signed["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKID/")
    assert "if-none-match" in signed["Authorization"]
    assert signed["X-Amz-Content-SHA256"] == "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7"
    streamed = client.sign("PUT", url, {}, "UNSIGNED-PAYLOAD", b"")
    assert streamed["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    assert not any("s3cret" in v for v in (*signed.values(), *streamed.values()))


def test_error_documents_and_times():
    body = b'<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>'
    assert parse_error(body) == ("SlowDown", "Reduce your rate")
    assert parse_error(b"<CompleteMultipartUploadResult/>") == ("", "")  # a 200 that is not an error
    assert _timestamp("2026-11-30T02:21:19Z") == _timestamp("Mon, 30 Nov 2026 02:21:19 GMT") == 1796005279.0
    assert _timestamp("2026-11-30T02:21:19.000Z") == 1796005279.0


def test_a_file_slice_reads_only_its_bytes_and_can_be_read_again(tmp_path):
    path = tmp_path / "spool"
    path.write_bytes(bytes(range(256)) * 4)
    piece = FileSlice(str(path), 10, 100)
    for _ in range(2):  # a retry reads it again from its start
        reader = piece.reader()
        assert reader.seek(0, 2) == 100 and reader.seek(0) == 0
        assert reader.read() == (bytes(range(256)) * 4)[10:110]
        reader.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = FileSlice(fd, 0, 3).reader()
        assert reader.read() == bytes([0, 1, 2])
        reader.close()
        assert os.read(fd, 1) == b"\x00"  # the caller's descriptor stays open
    finally:
        os.close(fd)


def test_cluster_signatures_bind_method_path_time_and_secret():
    cluster = Cluster(ClusterConfig("http://10.0.0.5:5000", "a-secret-of-16-chars"), leases=object(), http=None, clock=None)  # type: ignore[arg-type]
    path = "/_cluster/fills/sha256:" + "a" * 64
    header = cluster.sign("GET", path, now=1000.0)
    assert cluster.verify("GET", path, header, now=1030.0)
    assert not cluster.verify("GET", path, header, now=1100.0)  # older than a minute
    assert not cluster.verify("HEAD", path, header, now=1000.0)
    assert not cluster.verify("GET", path.replace("a", "b"), header, now=1000.0)
    other = Cluster(ClusterConfig("http://10.0.0.6:5000", "another-secret-16"), leases=object(), http=None, clock=None)  # type: ignore[arg-type]
    assert not other.verify("GET", path, header, now=1000.0)
    for bad in (None, "", "garbage", "x:y", f"{header}0", "²:" + "a" * 64, "1" * 5000 + ":" + "a" * 64, header + "é"):
        assert not cluster.verify("GET", path, bad, now=1000.0)
    lone = Cluster(None, None, None, None)  # type: ignore[arg-type]
    assert not lone.enabled and not lone.verify("GET", path, header, now=1000.0)


def test_an_upload_reports_each_piece_of_its_body_so_its_timeout_counts_from_the_last():
    """_Progress tells its callback of every piece the body producer writes (the request's
    timeout is reset on each, so a large body on a slow link is not cut off while it moves)."""
    import io

    from twisted.internet.task import Cooperator
    from twisted.web.client import FileBodyProducer

    from mirror.storage.s3.client import _Progress
    from tests.test_store_contract import Collect

    steps = []
    producer = FileBodyProducer(io.BytesIO(b"x" * 300), cooperator=Cooperator(scheduler=steps.append), readSize=100)
    moved = []
    body = _Progress(producer, lambda: moved.append(1))
    assert body.length == 300
    out = Collect()
    done = body.startProducing(out)
    while steps:
        steps.pop(0)()
    assert bytes(out.data) == b"x" * 300 and len(moved) == 3 and done.called
