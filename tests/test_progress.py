"""Unit tests of warm's progress output (mirror.tools.progress): formatting, plain lines for
logs, bars redrawn in place on a terminal."""

import io

from twisted.internet.task import Clock

from mirror.core.oci import Digest
from mirror.tools.progress import Progress, bar, format_bytes, format_rate, short_digest

D1 = Digest("sha256", "1" * 64)
D2 = Digest("sha256", "2" * 64)
MIB = 1024 * 1024


def test_format_bytes_and_rate():
    """Sizes in binary units; rates per second, with a dash before any time passed."""
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(12 * MIB) == "12.0 MiB"
    assert format_bytes(1.25 * 1024 * MIB) == "1.25 GiB"
    assert format_bytes(5 * 1024**5) == "5120.00 TiB"
    assert format_rate(3 * MIB, 2.0) == "1.5 MiB/s"
    assert format_rate(100, 0) == "- B/s"


def test_bar_and_short_digest():
    """A bar fills in proportion (dots when the total is unknown); digests shorten to 12 hex."""
    assert bar(0, 10, 10) == "[..........]"
    assert bar(5, 10, 10) == "[#####.....]"
    assert bar(20, 10, 10) == "[##########]"
    assert bar(5, None, 4) == "[....]"
    assert short_digest(D1) == "sha256:111111111111"


def test_plain_lines_per_blob_image_and_period():
    """Not a terminal: a line per fetched blob (bytes, time, rate), per image, and a
    total every interval while blobs are in flight; no escape codes."""
    clock, out = Clock(), io.StringIO()
    p = Progress(out, clock, tty=False, interval=10)
    p.start(2)
    p.blob_cached(MIB)
    p.blob_started("docker.io/library/a", D1, 4 * MIB)
    clock.advance(1)
    p.blob_progress(D1, 2 * MIB)
    clock.advance(9)
    assert "progress: 0/2 images, 2.0 MiB fetched, 204.8 KiB/s, 1 blob in flight" in out.getvalue()
    p.blob_finished(D1, 4 * MIB, ok=True)
    p.image_finished("ok      docker.io/library/a:latest")
    p.stop()
    lines = out.getvalue().splitlines()
    assert "fetched docker.io/library/a sha256:111111111111: 4.0 MiB in 10.0 s (409.6 KiB/s)" in lines
    assert lines[-1] == "ok      docker.io/library/a:latest"
    assert "\x1b" not in out.getvalue()
    assert (p.fetched, p.cached, p.images_done) == (4 * MIB, MIB, 1)


def test_failed_blob_counts_nothing():
    """A blob that fails adds nothing to the bytes fetched."""
    p = Progress(io.StringIO(), Clock(), tty=False)
    p.start(1)
    p.blob_started("r", D1, 100)
    p.blob_progress(D1, 50)
    p.blob_finished(D1, None, ok=False)
    assert (p.fetched, p.known, p.in_flight_bytes()) == (0, 0, 0)


def test_bars_on_a_terminal_are_redrawn_in_place():
    """A terminal gets a bar per blob in flight plus a total, erased and redrawn each tick;
    messages scroll above the block."""
    clock, out = Clock(), io.StringIO()
    p = Progress(out, clock, tty=True, interval=0.2)
    p.start(1)
    p.blob_started("docker.io/library/big", D1, 10 * MIB)
    p.blob_started("docker.io/library/big", D2, None)
    p.blob_progress(D1, 5 * MIB)
    p.blob_progress(D2, MIB)
    clock.advance(1)
    lines = p.bar_lines(200)
    assert lines[0].startswith("  docker.io/library/big sha256:111111111111 [##########..........] 5.0 MiB/10.0 MiB")
    assert lines[1].startswith("  docker.io/library/big sha256:222222222222 [....................] 1.0 MiB")
    assert lines[2].startswith("total [")
    assert "2 blobs in flight" in lines[2]
    clock.advance(0.2)
    p.message("ok      docker.io/library/big:latest")
    text = out.getvalue()
    assert "\x1b[3A\r\x1b[J" in text  # the block was erased before the message
    assert text.rindex("ok      docker.io/library/big:latest") < text.rindex("total [")
    p.stop()
    assert out.getvalue().endswith("\x1b[J")  # nothing left drawn
    assert all(len(line) <= 39 for line in p.bar_lines(40))
