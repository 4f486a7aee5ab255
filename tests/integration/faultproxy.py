"""A fault-injecting HTTP/1.1 reverse proxy, run as its own process, for the integration tests.

It sits between the mirror and the real upstream (CNCF Distribution) and breaks some of
the requests it forwards, the way networks, load balancers and registries break them:

==================  =========================================================================
``reset_before``    the request is read, then the connection is reset (RST, ``SO_LINGER`` 0)
                    before any byte of a response
``close_before``    the request is read, then the connection is closed cleanly (FIN) unanswered
``stall_before``    no answer for ``stall`` seconds, then a clean close
``status_500``      a 500 with an OCI error body, made up by the proxy (upstream not asked)
``status_502``      likewise 502
``status_503``      likewise 503
``status_429``      likewise 429, with ``Retry-After: 1``
``truncate``        the upstream's headers (its ``Content-Length``), then the body up to a
                    random byte, then a clean close
``reset_mid``       likewise, then a reset (RST) once those bytes have left the socket
``corrupt``         the whole body, same length, with one byte inverted (``^ 0xff``)
``slow_body``       the whole body, trickled at ``slow_rate`` bytes a second
``stall_mid``       the body up to a random byte, a pause of ``stall`` seconds, then the rest
==================  =========================================================================

The first seven ("before" kinds) answer without asking the upstream; the last five (body
kinds) apply to a 200 or 206 with a known, non-empty length (a ``HEAD``, an error status or a
chunked body passes through untouched, and the record says which fault was ``skipped``).
A random cut falls between 10 % and 90 % of the body.

**Which requests.**  A request is faulted at random with probability ``rate`` (a seeded
RNG; one fault per faulted request, its kind drawn from ``kinds``) when its target matches
the ``match`` regex, by default ``^/v2/.+/(blobs|manifests)/``: blob and manifest requests,
never the ``/v2/`` ping or a token request.  Body kinds are never drawn for a ``HEAD``.  A
*forced* fault (``POST /_fault/next``) applies to the next request its own regex matches,
whatever the rate and the filter; it may fix the cut (``at``, in bytes of the body), the
stall (``seconds``) or the trickle (``rate``).

**Connections.**  Clients get HTTP/1.1 keep-alive: a connection stays open after a
response that ends cleanly (the proxy's made-up statuses included) unless the client sent
``Connection: close``; it is closed after any fault that breaks the response, and after a
close-delimited upstream body.  Upstream, each request has its own connection (sent
``Connection: close``).  Every end-to-end header passes through unchanged both ways
(``Authorization``, ``Range``, ``Accept``, ``Location``, ``Content-Range``, ... and ``Host``,
so the upstream's absolute URLs name the proxy); hop-by-hop ones are dropped.  Bodies stream
in 64 KiB pieces with the client's back-pressure (a chunked body is re-chunked); nothing is
buffered whole.

**Control API** (on the proxy's own port; never forwarded nor faulted):

* ``POST /_fault/next`` ``{"kind": K, "match": REGEX, "method": M, "at": N, "seconds": S,
  "rate": R, "count": C}`` queues a forced fault (all but ``kind`` optional; ``match``
  defaults to any target, ``count`` to 1);
* ``GET /_fault/log``: every request so far, as a JSON list of records (below);
* ``GET``/``POST /_fault/config``: read or change ``rate``, ``kinds``, ``match``,
  ``seed``, ``stall``, ``slow_rate``;
* ``POST /_fault/clear``: forget the records and the queued forced faults.

Each record: ``id``, ``method``, ``path`` (the request target, query included), ``range``
(the request's ``Range`` header or null), ``status`` (null when no response was sent),
``length`` (the body length the response declared; 0 for a ``HEAD``), ``bytes`` (body bytes handed to the
socket), ``fault`` (the kind applied, or null), ``forced``, ``at`` (the byte a mid-body
fault struck), ``skipped`` (a fault chosen but not applicable), ``error`` (what broke, if
anything unplanned), ``done``, ``duration``.  A record exists, with its fault, from the
moment the request has been read, so a client that saw the symptom finds it in the log.
Finished records are also appended, one JSON object a line, to ``--log-file``.

Run it with ``python -m tests.integration.faultproxy --upstream URL ...`` (``--help``); the
tests start it through :class:`FaultProxy` (the ``fault_proxy`` fixture), which waits for it
and stops it by PID.  The server half is standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import termios
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEFORE_KINDS = ("reset_before", "close_before", "stall_before", "status_500", "status_502", "status_503", "status_429")
"""Faults that answer (or not) without asking the upstream."""
BODY_KINDS = ("truncate", "reset_mid", "corrupt", "slow_body", "stall_mid")
"""Faults that change a forwarded body."""
KINDS = BEFORE_KINDS + BODY_KINDS
TRANSIENT_KINDS = (
    "reset_before", "close_before", "stall_before", "status_500", "status_502", "status_503", "status_429", "truncate",
    "reset_mid",
)
"""What a retrying client should get over: the network's and the registry's passing failures
(not ``corrupt``, which is a wrong body)."""
DEFAULT_MATCH = r"^/v2/.+/(blobs|manifests)/"

CHUNK = 64 * 1024
HEAD_LIMIT = 64 * 1024
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
_STATUS_FAULTS = {
    "status_500": (500, "Internal Server Error", "UNKNOWN"),
    "status_502": (502, "Bad Gateway", "UNAVAILABLE"),
    "status_503": (503, "Service Unavailable", "UNAVAILABLE"),
    "status_429": (429, "Too Many Requests", "TOOMANYREQUESTS"),
}

Headers = list[tuple[str, str]]


# --------------------------------------------------------------------------
# the server (its own process; standard library only)
# --------------------------------------------------------------------------

class BrokenBody(Exception):
    """A message body ended before its framing said it would."""


class _Ended(Exception):
    """The exchange is over and the client connection must not be reused."""


@dataclass
class Forced:
    """A fault queued through the control API for the next matching request."""

    kind: str
    match: re.Pattern[str]
    method: str | None = None
    at: int | None = None
    seconds: float | None = None
    rate: float | None = None
    count: int = 1

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.kind in BODY_KINDS and method == "HEAD":
            return False
        return self.match.search(target) is not None


@dataclass
class Fault:
    """The fault a request gets."""

    kind: str
    forced: bool = False
    at: int | None = None
    seconds: float | None = None
    rate: float | None = None


def _header(headers: Headers, name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _parse_head(raw: bytes) -> tuple[str, Headers]:
    lines = raw.decode("latin-1").split("\r\n")
    headers: Headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"bad header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _end_to_end(headers: Headers) -> Headers:
    """Headers without the hop-by-hop ones (and those the Connection header names)."""
    named = {t.strip().lower() for k, v in headers if k.lower() == "connection" for t in v.split(",")}
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def _head_bytes(first: str, headers: Headers) -> bytes:
    return ("\r\n".join([first, *(f"{k}: {v}" for k, v in headers)]) + "\r\n\r\n").encode("latin-1")


def _rst(writer: asyncio.StreamWriter) -> None:
    """Reset the connection: SO_LINGER 0, then close (the kernel sends RST, not FIN)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _flushed(writer: asyncio.StreamWriter, timeout: float = 2.0) -> None:
    """Wait until what was written has left asyncio's buffer and the socket's send queue
    (the peer's kernel holds it), so that a reset right after does not discard it."""
    deadline = time.monotonic() + timeout
    sock = writer.get_extra_info("socket")
    while time.monotonic() < deadline and not writer.transport.is_closing():
        pending = writer.transport.get_write_buffer_size()
        if not pending and sock is not None:
            try:
                pending = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pending = 0
        if not pending:
            return
        await asyncio.sleep(0.005)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """One message head, or None at a clean end of the connection."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise ConnectionError("connection closed inside a message head") from None
        return None


async def _body(reader: asyncio.StreamReader, framing: str, length: int | None) -> AsyncIterator[bytes]:
    """A message body's bytes, decoded from its framing ("none", "length", "chunked", "eof")."""
    try:
        if framing == "length":
            remaining = length or 0
            while remaining:
                data = await reader.read(min(CHUNK, remaining))
                if not data:
                    raise BrokenBody(f"closed after {(length or 0) - remaining} of {length} bytes")
                remaining -= len(data)
                yield data
        elif framing == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers are dropped
                    return
                while size:
                    data = await reader.read(min(CHUNK, size))
                    if not data:
                        raise BrokenBody("closed inside a chunk")
                    size -= len(data)
                    yield data
                await reader.readexactly(2)
        elif framing == "eof":
            while data := await reader.read(CHUNK):
                yield data
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise BrokenBody(str(e) or type(e).__name__) from None


def _framing(headers: Headers, *, no_body: bool, request: bool) -> tuple[str, int | None]:
    if no_body:
        return "none", None
    te = _header(headers, "Transfer-Encoding")
    if te is not None and "chunked" in te.lower():
        return "chunked", None
    cl = _header(headers, "Content-Length")
    if cl is not None:
        n = int(cl)
        return ("length", n) if n else ("none", 0)
    return ("none", None) if request else ("eof", None)


class Proxy:
    """The proxy's state: configuration, the RNG, queued faults and the records."""

    def __init__(self, upstream: str, *, rate: float, seed: int, kinds: Sequence[str], match: str,
                 stall: float, slow_rate: int, log_file: Path | None) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.rate = rate
        self.kinds = _check_kinds(kinds)
        self.match = re.compile(match)
        self.stall = stall
        self.slow_rate = slow_rate
        self.rng = random.Random(seed)
        self.seed = seed
        self.forced: list[Forced] = []
        self.records: list[dict[str, Any]] = []
        self.log_file = log_file
        self._next_id = 0

    # -- choosing -------------------------------------------------------------------
    def pick(self, method: str, target: str) -> Fault | None:
        for f in self.forced:
            if f.matches(method, target):
                f.count -= 1
                if f.count <= 0:
                    self.forced.remove(f)
                return Fault(f.kind, True, f.at, f.seconds, f.rate)
        if not self.rate or not self.match.search(target):
            return None
        if self.rng.random() >= self.rate:
            return None
        kinds = [k for k in self.kinds if method != "HEAD" or k not in BODY_KINDS]
        return Fault(self.rng.choice(kinds)) if kinds else None

    def config(self) -> dict[str, Any]:
        return {"rate": self.rate, "kinds": list(self.kinds), "match": self.match.pattern, "seed": self.seed,
                "stall": self.stall, "slow_rate": self.slow_rate,
                "upstream": f"http://{self.upstream_host}:{self.upstream_port}"}

    def configure(self, changes: dict[str, Any]) -> None:
        unknown = set(changes) - {"rate", "kinds", "match", "seed", "stall", "slow_rate"}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        if "kinds" in changes:
            self.kinds = _check_kinds(changes["kinds"])
        if "match" in changes:
            self.match = re.compile(changes["match"])
        if "seed" in changes:
            self.seed = int(changes["seed"])
            self.rng = random.Random(self.seed)
        for key, cast in (("rate", float), ("stall", float), ("slow_rate", int)):
            if key in changes:
                setattr(self, key, cast(changes[key]))

    def record(self, method: str, target: str, headers: Headers, fault: Fault | None) -> dict[str, Any]:
        self._next_id += 1
        rec: dict[str, Any] = {
            "id": self._next_id, "method": method, "path": target, "range": _header(headers, "Range"),
            "status": None, "length": None, "bytes": 0, "fault": fault.kind if fault else None,
            "forced": bool(fault and fault.forced), "at": None, "skipped": None, "error": None,
            "done": False, "duration": None, "_start": time.monotonic(),
        }
        self.records.append(rec)
        return rec

    def finish(self, rec: dict[str, Any]) -> None:
        if rec["done"]:
            return
        rec["done"] = True
        rec["duration"] = round(time.monotonic() - rec.pop("_start"), 4)
        if self.log_file is not None:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    # -- serving --------------------------------------------------------------------
    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    break
                if not await self._exchange(head, reader, writer):
                    break
        except (_Ended, BrokenBody, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a broken or garbled exchange: the connection ends
        except asyncio.CancelledError:
            pass  # shutting down; let asyncio.run finish (3.11's stream callback chokes on a cancelled task)
        finally:
            if not writer.transport.is_closing():
                writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its response; True if the client connection may carry another."""
        first, headers = _parse_head(head)
        method, target, version = first.split(" ", 2)
        framing, length = _framing(headers, no_body=False, request=True)
        client_keeps = version == "HTTP/1.1" and (_header(headers, "Connection") or "").lower() != "close"
        if target.startswith("/_fault/"):
            body = b"".join([chunk async for chunk in _body(reader, framing, length)])
            await self._control(method, target, body, writer)
            return client_keeps
        fault = self.pick(method, target)
        rec = self.record(method, target, headers, fault)
        try:
            if fault is not None and fault.kind in BEFORE_KINDS:
                return await self._fault_before(fault, method, reader, writer, rec, framing, length) and client_keeps
            return await self._forward(method, target, headers, reader, writer, rec, fault, framing, length) and client_keeps
        except ConnectionError as e:
            rec["error"] = rec["error"] or f"client: {e or type(e).__name__}"
            raise _Ended from None
        finally:
            self.finish(rec)

    async def _fault_before(self, fault: Fault, method: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            rec: dict[str, Any], framing: str, length: int | None) -> bool:
        kind = fault.kind
        if kind == "reset_before":
            _rst(writer)
            raise _Ended
        if kind == "close_before":
            raise _Ended
        if kind == "stall_before":
            await asyncio.sleep(fault.seconds if fault.seconds is not None else self.stall)
            raise _Ended
        async for _ in _body(reader, framing, length):
            pass  # the request body is read and dropped, so the connection stays in step
        code, reason, error = _STATUS_FAULTS[kind]
        body = json.dumps({"errors": [{"code": error, "message": f"fault proxy: {kind}", "detail": None}]}).encode()
        out: Headers = [("Content-Type", "application/json; charset=utf-8"), ("Content-Length", str(len(body))),
                        ("Docker-Distribution-Api-Version", "registry/2.0")]
        if code == 429:
            out.append(("Retry-After", "1"))
        rec["status"], rec["length"] = code, len(body)
        writer.write(_head_bytes(f"HTTP/1.1 {code} {reason}", out))
        if method != "HEAD":
            writer.write(body)
            rec["bytes"] = len(body)
        await writer.drain()
        return True

    async def _forward(self, method: str, target: str, headers: Headers, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, rec: dict[str, Any], fault: Fault | None,
                       framing: str, length: int | None) -> bool:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port, limit=HEAD_LIMIT)
        except OSError as e:
            rec["error"] = f"upstream: {e}"
            body = f"fault proxy: upstream unreachable: {e}\n".encode()
            rec["status"], rec["length"] = 502, len(body)
            writer.write(_head_bytes("HTTP/1.1 502 Bad Gateway", [("Content-Length", str(len(body)))]) + body)
            await writer.drain()
            return True
        try:
            return await self._relay(method, target, headers, reader, writer, up_reader, up_writer, rec, fault,
                                     framing, length)
        finally:
            up_writer.transport.abort()

    async def _relay(self, method: str, target: str, headers: Headers, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter,
                     rec: dict[str, Any], fault: Fault | None, framing: str, length: int | None) -> bool:
        out = _end_to_end(headers)
        if framing == "chunked":
            out.append(("Transfer-Encoding", "chunked"))
        out.append(("Connection", "close"))
        try:
            up_writer.write(_head_bytes(f"{method} {target} HTTP/1.1", out))
            async for data in _body(reader, framing, length):  # a client that breaks here ends it all
                up_writer.write(b"%x\r\n%s\r\n" % (len(data), data) if framing == "chunked" else data)
                await up_writer.drain()
            if framing == "chunked":
                up_writer.write(b"0\r\n\r\n")
            await up_writer.drain()
            while True:  # interim (1xx) responses are passed on as they come
                head = await _read_head(up_reader)
                if head is None:
                    raise BrokenBody("closed before answering")
                status_line, up_headers = _parse_head(head)
                code = int(status_line.split(" ", 2)[1])
                if code >= 200 or code == 101:
                    break
                writer.write(head)
                await writer.drain()
        except (BrokenBody, ConnectionError, asyncio.IncompleteReadError, ValueError) as e:
            rec["error"] = f"upstream: {e}"
            _rst(writer)
            raise _Ended from None

        no_body = method == "HEAD" or code in (204, 304)
        body_framing, body_length = _framing(up_headers, no_body=no_body, request=False)
        rec["status"], rec["length"] = code, body_length if not no_body else 0
        resp = _end_to_end(up_headers)
        if body_framing == "chunked":
            resp.append(("Transfer-Encoding", "chunked"))
        keep = body_framing != "eof"
        if not keep:
            resp.append(("Connection", "close"))
        writer.write(_head_bytes(f"HTTP/1.1 {status_line.split(' ', 1)[1]}", resp))

        if fault is not None and not (code in (200, 206) and body_framing == "length" and (body_length or 0) >= 2):
            rec["skipped"], rec["fault"] = fault.kind, None  # not a body this fault can break
            fault = None
        cut = flip = None
        if fault is not None:
            assert body_length is not None
            if fault.kind in ("truncate", "reset_mid", "stall_mid"):
                cut = fault.at if fault.at is not None else int(body_length * self.rng.uniform(0.1, 0.9))
                cut = max(1, min(body_length - 1, cut))
                rec["at"] = cut
            elif fault.kind == "corrupt":
                flip = fault.at if fault.at is not None else self.rng.randrange(body_length)
                flip = max(0, min(body_length - 1, flip))
                rec["at"] = flip
        trickle = 0
        if fault is not None and fault.kind == "slow_body":
            trickle = int(fault.rate if fault.rate is not None else self.slow_rate)

        sent = 0
        started = time.monotonic()
        try:
            async for data in _body(up_reader, body_framing, body_length):
                if flip is not None and sent <= flip < sent + len(data):
                    i = flip - sent
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
                if cut is not None and sent + len(data) >= cut:
                    assert fault is not None
                    before, data = data[:cut - sent], data[cut - sent:]
                    sent = await self._send(writer, before, sent, rec, body_framing)
                    await writer.drain()
                    if fault.kind == "truncate":
                        raise _Ended  # the connection closes cleanly (FIN) after these bytes
                    if fault.kind == "reset_mid":
                        await _flushed(writer)
                        _rst(writer)
                        raise _Ended
                    await asyncio.sleep(fault.seconds if fault.seconds is not None else self.stall)  # stall_mid
                    cut = None
                if trickle:  # paced so that sent / trickle never gets ahead of the clock
                    step = max(1, trickle // 20)
                    for i in range(0, len(data), step):
                        sent = await self._send(writer, data[i:i + step], sent, rec, body_framing)
                        await writer.drain()
                        await asyncio.sleep(max(0.0, started + sent / trickle - time.monotonic()))
                else:
                    sent = await self._send(writer, data, sent, rec, body_framing)
                    await writer.drain()
        except BrokenBody as e:
            rec["error"] = f"upstream: {e}"
            _rst(writer)
            raise _Ended from None
        if body_framing == "chunked":
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return keep

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, data: bytes, sent: int, rec: dict[str, Any], framing: str) -> int:
        if not data:
            return sent
        if writer.transport.is_closing():
            raise ConnectionResetError("client went away")
        writer.write(b"%x\r\n%s\r\n" % (len(data), data) if framing == "chunked" else data)
        sent += len(data)
        rec["bytes"] = sent
        return sent

    # -- control --------------------------------------------------------------------
    async def _control(self, method: str, target: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        path = target.split("?", 1)[0]
        status, answer = 200, None
        try:
            doc = json.loads(body) if body.strip() else {}
            if method == "POST" and path == "/_fault/next":
                self.forced.append(Forced(
                    kind=_check_kinds([doc["kind"]])[0], match=re.compile(doc.get("match") or ""),
                    method=doc.get("method"), at=doc.get("at"), seconds=doc.get("seconds"), rate=doc.get("rate"),
                    count=int(doc.get("count", 1)),
                ))
                answer = {"queued": len(self.forced)}
            elif method == "GET" and path == "/_fault/log":
                answer = [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.records]
            elif method == "GET" and path == "/_fault/config":
                answer = self.config()
            elif method == "POST" and path == "/_fault/config":
                self.configure(doc)
                answer = self.config()
            elif method == "POST" and path == "/_fault/clear":
                self.records.clear()
                self.forced.clear()
                answer = {}
            else:
                status, answer = 404, {"error": f"no control endpoint {method} {path}"}
        except (ValueError, KeyError, TypeError, re.error) as e:
            status, answer = 400, {"error": str(e)}
        data = json.dumps(answer).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
        writer.write(_head_bytes(f"HTTP/1.1 {status} {reason}", [("Content-Type", "application/json"),
                                                                 ("Content-Length", str(len(data)))]) + data)
        await writer.drain()


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    out = tuple(kinds)
    unknown = [k for k in out if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}")
    return out


async def _serve(args: argparse.Namespace) -> None:
    proxy = Proxy(args.upstream, rate=args.rate, seed=args.seed, kinds=args.kinds.split(",") if args.kinds else KINDS,
                  match=args.match, stall=args.stall, slow_rate=args.slow_rate,
                  log_file=Path(args.log_file) if args.log_file else None)
    server = await asyncio.start_server(proxy.serve_connection, args.host, args.port, limit=HEAD_LIMIT)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready_file:
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.ready_file)
    print(f"fault proxy on {args.host}:{port} -> {args.upstream}, {json.dumps(proxy.config())}", flush=True)
    await stop.wait()
    server.close()  # not wait_closed(): it would wait for idle keep-alive clients; asyncio.run cancels them


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.faultproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT of the registry behind the proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (written to --ready-file)")
    parser.add_argument("--rate", type=float, default=0.0, help="probability that a matching request is faulted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="", help=f"comma-separated kinds to draw from (default all: {','.join(KINDS)})")
    parser.add_argument("--match", default=DEFAULT_MATCH, help="regex over the request target for random faults")
    parser.add_argument("--stall", type=float, default=2.0, help="seconds of stall_before and stall_mid")
    parser.add_argument("--slow-rate", type=int, default=256 * 1024, help="bytes a second of slow_body")
    parser.add_argument("--log-file", help="append finished records here, one JSON object a line")
    parser.add_argument("--ready-file", help="write the listening port here once listening")
    asyncio.run(_serve(parser.parse_args(argv)))


# --------------------------------------------------------------------------
# the test side: start, drive and stop the proxy process
# --------------------------------------------------------------------------

class FaultProxy:
    """The fault proxy as a child process (see the module docstring); the ``fault_proxy``
    fixture makes them and stops them at teardown.

    Args:
        upstream_url: ``http://HOST:PORT`` of the registry to forward to.
        workdir: where its ready file, output and JSON-lines log go.
        rate, seed, kinds, match, stall, slow_rate: as the command-line options.
    """

    def __init__(self, upstream_url: str, workdir: Path, *, rate: float = 0.0, seed: int = 0,
                 kinds: Iterable[str] = KINDS, match: str = DEFAULT_MATCH, stall: float = 2.0,
                 slow_rate: int = 256 * 1024) -> None:
        self.upstream_url = upstream_url
        self.workdir = Path(workdir)
        self.kinds = _check_kinds(kinds)
        self.argv = [
            sys.executable, "-m", "tests.integration.faultproxy", "--upstream", upstream_url,
            "--rate", str(rate), "--seed", str(seed), "--kinds", ",".join(self.kinds), "--match", match,
            "--stall", str(stall), "--slow-rate", str(slow_rate),
            "--log-file", str(self.workdir / "faultproxy.jsonl"), "--ready-file", str(self.workdir / "faultproxy.port"),
        ]
        self.port: int | None = None
        self._proc: Any = None

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: give it to the mirror as its upstream."""
        return f"http://{self.host_port}"

    @property
    def log_path(self) -> Path:
        """The JSON-lines file of finished records."""
        return self.workdir / "faultproxy.jsonl"

    def start(self, timeout: float = 15.0) -> FaultProxy:
        from tests.integration.proc_util import HarnessError, ManagedProcess, wait_until

        ready = self.workdir / "faultproxy.port"
        ready.unlink(missing_ok=True)
        repo = Path(__file__).resolve().parents[2]
        self._proc = ManagedProcess(self.argv, stdout=self.workdir / "faultproxy.out", cwd=repo)
        if not wait_until(lambda: ready.exists() or not self._proc.alive(), timeout, 0.02) or not ready.exists():
            tail = self._proc.log_tail()
            self.stop()
            raise HarnessError("fault proxy did not start", tail)
        self.port = int(ready.read_text())
        return self

    def stop(self) -> None:
        """Stop the process by its PID (TERM, then KILL); safe to call twice."""
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def _call(self, method: str, path: str, doc: object = None) -> Any:
        from tests.integration.proc_util import HarnessError
        from tests.integration.upstream_registry import http_request

        data = json.dumps(doc).encode() if doc is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        status, _, body = http_request(f"{self.url}{path}", method=method, headers=headers, data=data)
        if status != 200:
            raise HarnessError(f"fault proxy {method} {path}: {status} {body[:300]!r}")
        return json.loads(body)

    def force(self, kind: str, match: str = "", *, method: str | None = None, at: int | None = None,
              seconds: float | None = None, rate: float | None = None, count: int = 1) -> None:
        """Give the next ``count`` requests whose target ``match`` (a regex, searched) finds
        the fault ``kind``; ``at``/``seconds``/``rate`` fix its cut, stall or trickle."""
        self._call("POST", "/_fault/next", {"kind": kind, "match": match, "method": method, "at": at,
                                            "seconds": seconds, "rate": rate, "count": count})

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change ``rate``, ``kinds``, ``match``, ``seed``, ``stall`` or ``slow_rate`` while running."""
        return dict(self._call("POST", "/_fault/config", changes))

    def config(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_fault/config"))

    def log(self) -> list[dict[str, Any]]:
        """Every request so far (in-flight ones with ``done`` false), oldest first."""
        return list(self._call("GET", "/_fault/log"))

    def clear(self) -> None:
        """Forget the records and any queued forced faults."""
        self._call("POST", "/_fault/clear", {})

    def faults(self) -> Counter[str]:
        """How many requests got each fault kind so far."""
        return Counter(r["fault"] for r in self.log() if r["fault"])

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# a raw client that reports exactly what came over the wire
# --------------------------------------------------------------------------

@dataclass
class Exchange:
    """What one raw HTTP/1.1 request got (see :func:`fetch`)."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    end: str
    """``complete`` (the whole declared body), ``eof`` (closed early, cleanly), ``reset``
    (ECONNRESET) or ``timeout``."""
    elapsed: float
    max_gap: float
    """The longest wait between two reads of the body, in seconds."""

    @property
    def complete(self) -> bool:
        return self.end == "complete"

    def verifies(self, digest: str) -> bool:
        """Whole, and its body hashes to ``digest`` (``sha256:...``)."""
        return self.complete and "sha256:" + hashlib.sha256(self.body).hexdigest() == digest


def fetch(url: str, *, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 30.0) -> Exchange:
    """One request on a fresh connection, read as a socket sees it: no retries, no
    exceptions for a broken response (:attr:`Exchange.end` says how it ended)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    start = time.monotonic()
    buf = b""
    status: int | None = None
    hdrs: dict[str, str] = {}
    body_start: int | None = None
    length: int | None = None
    last = start
    max_gap = 0.0
    end = "eof"
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        while True:
            try:
                data = sock.recv(CHUNK)
            except ConnectionResetError:
                end = "reset"
                break
            except TimeoutError:
                end = "timeout"
                break
            now = time.monotonic()
            if body_start is not None:
                max_gap = max(max_gap, now - last)
            last = now
            if not data:
                break
            buf += data
            if body_start is None and b"\r\n\r\n" in buf:
                head, _, _ = buf.partition(b"\r\n\r\n")
                body_start = len(head) + 4
                first, header_list = _parse_head(head + b"\r\n\r\n")
                status = int(first.split(" ", 2)[1])
                hdrs = {k.lower(): v for k, v in header_list}
                no_body = method == "HEAD" or status in (204, 304)
                length = 0 if no_body else int(hdrs["content-length"]) if "content-length" in hdrs else None
            if body_start is not None and length is not None and len(buf) - body_start >= length:
                end = "complete"
                break
    body = buf[body_start:] if body_start is not None else b""
    if length is not None and end == "complete":
        body = body[:length]
    return Exchange(status, hdrs, body, end, time.monotonic() - start, max_gap)


if __name__ == "__main__":
    main()
