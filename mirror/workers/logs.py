"""Workers' log lines in the supervisor's log, each tagged ``worker <i>``.

Where the supervisor logs to its standard output (``twistd -n`` without ``--logfile``:
how ``mirror serve``, ``make run``, systemd units and containers run it), the workers
inherit that standard output and write their lines to it themselves, in twistd's format
(time, ``[worker <i>]``, text): the supervisor does no work per line, and a request's
access-log line costs it nothing.  Anywhere else (a ``--logfile``, syslog, a daemon whose
standard output is ``/dev/null``) a worker's output is a pipe to the supervisor, which
logs each line it reads as its own event with the system ``worker <i>``, so the lines land
wherever the supervisor's log goes, rotated with it.  That costs the supervisor about
70 µs a line (mostly twistd's formatting of each event: a timestamp, the text), a fifth of
a core at 3,000 requests per second.  Writing the file from the workers instead is not
safe: twistd's log file is not opened for appending (its writes would overwrite theirs),
and it rotates by what the supervisor wrote.  A worker writes its piped lines in batches,
at most :data:`BATCH` seconds late (a warning or an error at once): a write per line woke
the supervisor once per request, which cost it a third of a core at 2,800 requests per
second.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import IO, Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, Logger, LogLevel, eventAsText, textFileLogObserver
from zope.interface import implementer, provider

__all__ = ["LineRelay", "logs_to_stdout", "worker_observer"]

_log = Logger()
#: The longest line relayed as it is; a longer one is cut there (a runaway write).
MAX_LINE = 64 * 1024
#: Seconds a worker holds its piped log lines before writing them, at most.
BATCH = 0.05
#: Bytes of piped log lines a worker writes at once, whatever their age.
BATCH_BYTES = 16 * 1024


def logs_to_stdout(twistd_options: Mapping[str, Any] | None) -> bool:
    """Whether twistd, run with these options, logs to its standard output."""
    if twistd_options is None:
        return False
    logfile = twistd_options.get("logfile")
    return bool(twistd_options.get("nodaemon")) and logfile in (None, "", "-") and not twistd_options.get("syslog")


def worker_observer(index: int, inherit: bool, out: IO[str] | None = None, clock: IReactorTime | None = None) -> ILogObserver:
    """Worker ``index``'s log observer, writing to ``out`` (its standard output): whole
    lines in twistd's format when ``inherit`` (its output is the supervisor's), else the
    bare text of each event, one line each (the supervisor adds the rest), in batches
    timed by ``clock`` (without one: each at once)."""
    out = out if out is not None else sys.stdout
    system = f"worker {index}"
    if inherit:
        lines = textFileLogObserver(out)

        @provider(ILogObserver)
        def tagged(event: dict[str, Any]) -> None:
            lines(dict(event, log_system=system))

        return cast(ILogObserver, tagged)

    return _Batched(out, clock)


@implementer(ILogObserver)
class _Batched:
    """Bare lines for the supervisor to log, written in batches (see the module docstring)."""

    def __init__(self, out: IO[str], clock: IReactorTime | None) -> None:
        self._out = out
        self._clock = clock
        self._lines: list[str] = []
        self._size = 0
        self._call: IDelayedCall | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        if not text:
            return
        line = text.replace("\n", "\n\t") + "\n"
        self._lines.append(line)
        self._size += len(line)
        urgent = event.get("log_level", LogLevel.info) >= LogLevel.warn
        if self._clock is None or urgent or self._size >= BATCH_BYTES:
            self.flush()
        elif self._call is None:
            self._call = self._clock.callLater(BATCH, self.flush)

    def flush(self) -> None:
        """Write what is held (also at exit)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            self._size = 0
            self._out.write(text)
            self._out.flush()


class LineRelay:
    """The supervisor's side of one worker's piped output: each line becomes a log event."""

    def __init__(self, index: int) -> None:
        self._system = f"worker {index}"
        self._partial = b""

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._emit(line)

    def close(self) -> None:
        """The worker's output ended: log what is left of a last line."""
        if self._partial:
            self._emit(self._partial)
            self._partial = b""

    def _emit(self, line: bytes) -> None:
        if line:
            _log.emit(LogLevel.info, "{line}", line=line.decode(errors="replace"), log_system=self._system)
