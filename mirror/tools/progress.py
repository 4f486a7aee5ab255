"""Progress of a warm run: per blob and overall, bytes and rates.

On a terminal it is a block of bars redrawn in place (one per blob being fetched, then
the total), with finished images scrolling above it; otherwise plain lines (CI logs): one
per fetched blob and per image, and every ``interval`` seconds a total.  The formatting
functions are pure; :class:`Progress` holds the counts and writes.
"""

from __future__ import annotations

import shutil
from typing import TextIO

import attrs

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from mirror.core.oci import Digest

__all__ = ["Progress", "bar", "format_bytes", "format_rate", "short_digest"]

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """``0 B``, ``999 B``, ``1.5 KiB``, ``12.0 MiB``, ``1.25 GiB``."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in _UNITS:
        n /= 1024
        if n < 1024 or unit == _UNITS[-1]:
            return f"{n:.2f} {unit}" if unit in ("GiB", "TiB") else f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def format_rate(n: float, seconds: float) -> str:
    """Bytes per second, as ``3.2 MiB/s`` (``-`` before any time has passed)."""
    if seconds <= 0:
        return "- B/s"
    return f"{format_bytes(n / seconds)}/s"


def bar(done: float, total: float | None, width: int = 20) -> str:
    """``[#######.............]``; all dots when the total is unknown."""
    filled = 0 if not total else min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def short_digest(digest: Digest) -> str:
    """``sha256:0123456789ab`` (12 hex digits, as docker shows them)."""
    return f"{digest.algorithm}:{digest.encoded[:12]}"


@attrs.define
class _Blob:
    image: str
    digest: Digest
    size: int | None
    started: float
    done: int = 0


class Progress:
    """Counts of a warm run, written as bars (``tty``) or plain lines to ``out``.

    Args:
        out: where to write.
        clock: the reactor's time and scheduler.
        tty: draw bars in place (a terminal) rather than plain lines.
        interval: seconds between redraws (bars) or total lines (plain).
    """

    def __init__(self, out: TextIO, clock: IReactorTime, *, tty: bool, interval: float | None = None) -> None:
        self._out = out
        self._clock = clock
        self.tty = tty
        self._interval = interval if interval is not None else (0.2 if tty else 10.0)
        self._blobs: dict[Digest, _Blob] = {}
        self._drawn = 0
        self._started = clock.seconds()
        self._timer: LoopingCall | None = None
        self.images_total = 0
        self.images_done = 0
        self.fetched = 0  # bytes of blobs fetched (finished)
        self.cached = 0  # bytes of blobs found cached
        self.known = 0  # bytes of every blob seen so far

    # the run ------------------------------------------------------------------------------
    def start(self, images: int) -> None:
        self.images_total = images
        self._started = self._clock.seconds()
        self._timer = LoopingCall(self._tick)
        self._timer.clock = self._clock
        self._timer.start(self._interval, now=False)

    def stop(self) -> None:
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None
        self._clear()
        self._out.flush()

    def message(self, text: str) -> None:
        """A line that stays (above the bars)."""
        self._clear()
        self._out.write(text + "\n")
        self._draw()

    # blobs --------------------------------------------------------------------------------
    def blob_cached(self, size: int) -> None:
        self.known += size
        self.cached += size

    def blob_started(self, image: str, digest: Digest, size: int | None) -> None:
        self.known += size or 0
        self._blobs[digest] = _Blob(image, digest, size, self._clock.seconds())

    def blob_progress(self, digest: Digest, done: int) -> None:
        blob = self._blobs.get(digest)
        if blob is not None:
            blob.done = done

    def blob_finished(self, digest: Digest, size: int | None, ok: bool) -> None:
        blob = self._blobs.pop(digest, None)
        if blob is None:
            return
        if not ok:
            self.known -= blob.size or 0
            return
        size = size if size is not None else blob.done
        self.fetched += size
        if blob.size is None:
            self.known += size
        if not self.tty:
            seconds = self._clock.seconds() - blob.started
            self.message(
                f"fetched {blob.image} {short_digest(digest)}: {format_bytes(size)} in {seconds:.1f} s "
                f"({format_rate(size, seconds)})"
            )

    def image_finished(self, line: str) -> None:
        self.images_done += 1
        self.message(line)

    # rendering ----------------------------------------------------------------------------
    def in_flight_bytes(self) -> int:
        return sum(b.done for b in self._blobs.values())

    def total_line(self) -> str:
        """The overall line: images, bytes fetched and the rate since the start."""
        now = self._clock.seconds()
        fetched = self.fetched + self.in_flight_bytes()
        text = (
            f"{self.images_done}/{self.images_total} images, {format_bytes(fetched)} fetched, "
            f"{format_rate(fetched, now - self._started)}"
        )
        if self._blobs:
            text += f", {len(self._blobs)} blob{'s' if len(self._blobs) != 1 else ''} in flight"
        return text

    def bar_lines(self, width: int) -> list[str]:
        """The block drawn on a terminal: a bar per blob in flight, then the total."""
        now = self._clock.seconds()
        lines = []
        for b in self._blobs.values():
            size = f"{format_bytes(b.done)}/{format_bytes(b.size)}" if b.size is not None else format_bytes(b.done)
            lines.append(
                f"  {b.image} {short_digest(b.digest)} {bar(b.done, b.size)} {size} {format_rate(b.done, now - b.started)}"
            )
        done = self.cached + self.fetched + self.in_flight_bytes()
        lines.append(f"total {bar(done, self.known)} {self.total_line()}")
        return [line[: max(width - 1, 20)] for line in lines]

    def _tick(self) -> None:
        if self.tty:
            self._clear()
            self._draw()
        elif self._blobs:
            self.message(f"progress: {self.total_line()}")

    def _draw(self) -> None:
        if not self.tty or self._timer is None:
            self._out.flush()
            return
        lines = self.bar_lines(shutil.get_terminal_size((100, 24)).columns)
        self._out.write("".join(line + "\n" for line in lines))
        self._out.flush()
        self._drawn = len(lines)

    def _clear(self) -> None:
        if self._drawn:
            # up to the first line of the block, then erase to the end of the screen
            self._out.write(f"\x1b[{self._drawn}A\r\x1b[J")
            self._drawn = 0
