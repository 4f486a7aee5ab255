"""Talking to an S3-compatible object store: signed requests with treq, on the reactor.

:class:`S3Client` speaks the few operations the store needs (HEAD, GET with ranges,
PUT, create-only PUT, DELETE, ListObjectsV2, multipart upload) against one bucket, with
path-style URLs (``endpoint/bucket/key``), which every S3-compatible server accepts.
Requests are signed with botocore's SigV4 signer (we never hand-write SigV4); a body
we stream from a file is sent ``UNSIGNED-PAYLOAD`` with a known ``Content-Length`` (S3
refuses chunked uploads), small bodies are signed with their hash.

Failures raise :class:`S3Error`, an :class:`OSError`, so that code written for a
filesystem store (best-effort link writes that log an ``OSError``) treats a bucket that
cannot be written the same way.  Idempotent requests are retried a few times on a
connection failure or a 500/503 (S3's "slow down").

:func:`ensure_bucket` runs before the reactor serves anything: it blocks, so that a
store whose bucket cannot be reached or created fails start-up with one clear error.
"""

from __future__ import annotations

import email.utils
import io
import os
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import attrs
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IProducer, IReactorTime
from twisted.internet.task import deferLater
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from mirror.config import S3Config
from mirror.responses import drain, read_capped

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["FileSlice", "ObjectInfo", "S3Client", "S3Error", "ensure_bucket"]

#: Largest response body read whole (error documents, listings, small objects).
SMALL_BODY = 16 * 1024 * 1024
#: Blobs up to this size go in one PUT; larger ones by multipart upload in parts of this size.
PART_SIZE = 64 * 1024 * 1024
#: Attempts of an idempotent request (connection failure, 500, 503).
ATTEMPTS = 4

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


class S3Error(OSError):
    """The object store refused or failed a request; ``str()`` says which and why."""

    def __init__(self, what: str, status: int | None, code: str, message: str = "") -> None:
        super().__init__(f"{what}: {status or 'no answer'} {code}{': ' + message if message else ''}")
        self.status = status
        self.code = code


@attrs.frozen
class ObjectInfo:
    """An object as a listing or a HEAD describes it."""

    key: str  # relative to the store's prefix
    size: int
    modified: float  # seconds since the epoch (the server's clock)


@attrs.frozen
class FileSlice:
    """``length`` bytes of a file from ``offset``: a request body sent from disk.  ``file``
    is a path or an open descriptor (which stays the caller's to close)."""

    file: str | int
    offset: int
    length: int

    def reader(self) -> _SliceReader:
        """A fresh reader over the slice (a body producer closes the one it was given)."""
        return _SliceReader(self)


class _SliceReader(io.RawIOBase):
    """Reads a :class:`FileSlice`; a body producer learns its length by seeking to the end."""

    def __init__(self, piece: FileSlice) -> None:
        self._fd = os.open(piece.file, os.O_RDONLY) if isinstance(piece.file, str) else os.dup(piece.file)
        self._offset = piece.offset
        self._length = piece.length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, target: WriteableBuffer) -> int:
        view = memoryview(target).cast("B")
        want = min(len(view), self._length - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._offset + self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@implementer(IBodyProducer)
class _Progress:
    """A body producer that calls ``moved`` each time a piece of the body is written."""

    def __init__(self, inner: FileBodyProducer, moved: Callable[[], object]) -> None:
        self._inner = inner
        self._moved = moved
        self.length = inner.length

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        done: Deferred[None] = self._inner.startProducing(_Counting(consumer, self._moved))
        return done

    def pauseProducing(self) -> None:
        self._inner.pauseProducing()

    def resumeProducing(self) -> None:
        self._inner.resumeProducing()

    def stopProducing(self) -> None:
        self._inner.stopProducing()


@implementer(IConsumer)
class _Counting:
    """A consumer passing writes on, telling ``moved`` of each."""

    def __init__(self, consumer: IConsumer, moved: Callable[[], object]) -> None:
        self._consumer = consumer
        self._moved = moved

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        self._moved()
        self._consumer.write(data)


class _Signer(S3SigV4Auth):
    """botocore's S3 signer, told the payload hash instead of reading a streamed body."""

    def payload(self, request: AWSRequest) -> str:
        given = request.context.get("payload_hash")
        return str(given) if given else str(super().payload(request))


def _timestamp(text: str) -> float:
    """A listing's ISO 8601 time or a header's RFC 1123 time, as epoch seconds."""
    if "," in text:
        return email.utils.parsedate_to_datetime(text).timestamp()
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _strip(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _strip(child.tag) == name]


def _text(element: ET.Element, name: str) -> str:
    for child in element:
        if _strip(child.tag) == name:
            return child.text or ""
    return ""


def parse_error(body: bytes) -> tuple[str, str]:
    """The ``Code`` and ``Message`` of an S3 error document (empty when it is not one)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", body[:200].decode("utf-8", "replace")
    if _strip(root.tag) != "Error":
        return "", ""
    return _text(root, "Code"), _text(root, "Message")


class _Bucket:
    """The bucket's URLs and request signatures (botocore's SigV4)."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._credentials = Credentials(config.access_key, config.secret_key)
        self._base = f"{config.endpoint}/{config.bucket}/"

    def url(self, key: str | None, query: Mapping[str, str] | None = None) -> str:
        """The URL of ``key`` (relative to the configured prefix; ``None``: the bucket), with ``query``."""
        url = self._base + ("" if key is None else quote(self.config.prefix + key, safe="/~"))
        if query:
            url += "?" + "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
        return url

    def sign(self, method: str, url: str, headers: Mapping[str, str], payload_hash: str | None, body: bytes) -> dict[str, str]:
        """``headers`` with the signature headers added; the payload is ``body``, or
        ``payload_hash`` when given (``UNSIGNED-PAYLOAD`` for a streamed body)."""
        request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
        if payload_hash is not None:
            request.context["payload_hash"] = payload_hash
        _Signer(self._credentials, "s3", self.config.region).add_auth(request)
        return {str(name): str(value) for name, value in request.headers.items()}

    def presigned_url(self, key: str, expires: int) -> str:
        """A URL that lets its holder GET ``key`` for ``expires`` seconds (a query-string
        signature: no credentials travel with it)."""
        request = AWSRequest(method="GET", url=self.url(key))
        S3SigV4QueryAuth(self._credentials, "s3", self.config.region, expires=expires).add_auth(request)
        return str(request.url)


class S3Client(_Bucket):
    """Signed requests to one bucket (see the module docstring)."""

    def __init__(self, config: S3Config, http: HTTPClient, clock: IReactorTime) -> None:
        super().__init__(config)
        self._http = http
        self._clock = clock

    # requests --------------------------------------------------------------------------------
    async def request(
        self,
        method: str,
        key: str | None,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | FileSlice = b"",
        expect: Sequence[int] = (200,),
    ) -> IResponse:
        """Send one request; the response (its body unread) when its status is expected.

        ``bytes`` bodies are signed and retried; a :class:`FileSlice` is sent unsigned
        and retried from its start.  Raises :class:`S3Error` otherwise.
        """
        url = self.url(key, query)
        what = f"{method} {self.config.prefix}{key or ''}"
        for attempt in range(ATTEMPTS):
            if isinstance(body, FileSlice):
                signed = self.sign(method, url, headers or {}, UNSIGNED_PAYLOAD, b"")
                data: Any = FileBodyProducer(body.reader(), readSize=256 * 1024)
            else:
                signed = self.sign(method, url, headers or {}, None, body)
                data = body if body or method in ("PUT", "POST") else None
            try:
                response = await self._send(method, url, signed, data)
            except (ConnectionError, TimeoutError, OSError) as e:
                if attempt + 1 < ATTEMPTS:
                    await deferLater(self._clock, 0.1 * 4**attempt, lambda: None)
                    continue
                raise S3Error(what, None, type(e).__name__, str(e)) from None
            if response.code in expect:
                return response
            if response.code in (500, 502, 503, 504) and attempt + 1 < ATTEMPTS:
                drain(response)
                await deferLater(self._clock, 0.1 * 4**attempt, lambda: None)
                continue
            try:
                text = await read_capped(response, 64 * 1024, self._clock, self.config.timeout)
            except Exception:
                text = b""
            code, message = parse_error(text)
            raise S3Error(what, response.code, code or "Error", message)
        raise AssertionError("unreachable")

    async def _send(self, method: str, url: str, headers: Mapping[str, str], data: Any) -> IResponse:
        """The response's headers, within the timeout of the last byte of the body sent (a
        large body on a slow link takes as long as it takes, as long as it moves)."""
        raw = Headers({name: [value] for name, value in headers.items()})
        timer: IDelayedCall | None = None
        if isinstance(data, FileBodyProducer):
            data = _Progress(data, lambda: timer.reset(self.config.timeout) if timer and timer.active() else None)
        sending = self._http.request(method, url, headers=raw, data=data, unbuffered=True)
        timer = self._clock.callLater(self.config.timeout, sending.cancel)
        try:
            response: IResponse = await sending
        except CancelledError:
            raise TimeoutError(f"no answer within {self.config.timeout:g} s") from None
        except Exception as e:  # connection refused, reset, DNS: Twisted's many failure types
            raise ConnectionError(str(e) or type(e).__name__) from None
        finally:
            if timer.active():
                timer.cancel()
        return response

    async def read_body(self, response: IResponse, limit: int = SMALL_BODY) -> bytes:
        try:
            return await read_capped(response, limit, self._clock, self.config.timeout)
        except (ValueError, TimeoutError) as e:
            raise S3Error("reading a body", response.code, type(e).__name__, str(e)) from None
        except Exception as e:
            raise S3Error("reading a body", response.code, "ConnectionLost", str(e)) from None

    # operations ------------------------------------------------------------------------------
    async def head(self, key: str) -> ObjectInfo | None:
        response = await self.request("HEAD", key, expect=(200, 404))
        drain(response)
        if response.code == 404:
            return None
        length = int(response.headers.getRawHeaders("content-length", ["0"])[0])  # HEAD: no body, so not .length
        modified = response.headers.getRawHeaders("last-modified", [""])[0]
        return ObjectInfo(key, length, _timestamp(modified) if modified else 0.0)

    async def get(self, key: str, first: int = 0, end: int | None = None) -> IResponse | None:
        """The response streaming ``key`` (bytes ``[first, end)``), its body unread; ``None`` if absent."""
        headers = {}
        if first or end is not None:
            headers["Range"] = f"bytes={first}-{'' if end is None else end - 1}"
        response = await self.request("GET", key, headers=headers, expect=(200, 206, 404))
        if response.code == 404:
            drain(response)
            return None
        return response

    async def read(self, key: str, limit: int = SMALL_BODY) -> bytes | None:
        """A small object's bytes; ``None`` if absent.  Raises :class:`S3Error` if over ``limit``."""
        response = await self.get(key)
        return None if response is None else await self.read_body(response, limit)

    async def read_with_time(self, key: str, limit: int = SMALL_BODY) -> tuple[bytes, float] | None:
        """A small object's bytes and when it was written (``Last-Modified``); ``None`` if absent."""
        response = await self.get(key)
        if response is None:
            return None
        modified = response.headers.getRawHeaders("last-modified", [""])[0]
        return await self.read_body(response, limit), _timestamp(modified) if modified else 0.0

    async def put(self, key: str, body: bytes | FileSlice, *, create_only: bool = False) -> bool:
        """Store ``body`` at ``key``.  With ``create_only``, an existing object is kept
        and False returned (``If-None-Match: *``); else True."""
        headers = {"If-None-Match": "*"} if create_only else {}
        response = await self.request("PUT", key, headers=headers, body=body, expect=(200, 412))
        drain(response)
        return bool(response.code == 200)

    async def delete(self, key: str) -> None:
        response = await self.request("DELETE", key, expect=(200, 204, 404))
        drain(response)

    async def list(self, prefix: str, *, delimiter: str | None = None) -> tuple[list[ObjectInfo], list[str]]:
        """Every object under ``prefix`` (and with ``delimiter``, the sub-prefixes), keys
        relative to the store's prefix, in key order."""
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        query = {"list-type": "2", "prefix": self.config.prefix + prefix, "max-keys": "1000"}
        if delimiter:
            query["delimiter"] = delimiter
        skip = len(self.config.prefix)
        while True:
            response = await self.request("GET", None, query=query)
            root = ET.fromstring(await self.read_body(response))
            for item in _children(root, "Contents"):
                objects.append(
                    ObjectInfo(_text(item, "Key")[skip:], int(_text(item, "Size") or 0), _timestamp(_text(item, "LastModified")))
                )
            for item in _children(root, "CommonPrefixes"):
                prefixes.append(_text(item, "Prefix")[skip:])
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return objects, prefixes
            query["continuation-token"] = token

    async def upload_file(self, key: str, path: str, size: int, *, create_only: bool) -> bool:
        """Upload ``size`` bytes of the file at ``path`` to ``key``: one PUT, or a multipart
        upload in :data:`PART_SIZE` parts (aborted if anything fails).  Returns False when
        ``create_only`` and the object exists already."""
        if size <= PART_SIZE:
            return await self.put(key, FileSlice(path, 0, size), create_only=create_only)
        response = await self.request("POST", key, query={"uploads": ""})
        upload_id = _text(ET.fromstring(await self.read_body(response)), "UploadId")
        if not upload_id:
            raise S3Error(f"POST {key}?uploads", response.code, "NoUploadId")
        try:
            etags = []
            for number, offset in enumerate(range(0, size, PART_SIZE), start=1):
                body = FileSlice(path, offset, min(PART_SIZE, size - offset))
                part = await self.request("PUT", key, query={"partNumber": str(number), "uploadId": upload_id}, body=body)
                drain(part)
                etags.append(part.headers.getRawHeaders("etag", [""])[0])
            document = "<CompleteMultipartUpload>" + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>" for n, etag in enumerate(etags, start=1)
            )
            document += "</CompleteMultipartUpload>"
            headers = {"If-None-Match": "*"} if create_only else {}
            response = await self.request(
                "POST", key, query={"uploadId": upload_id}, headers=headers, body=document.encode(), expect=(200, 412)
            )
            text = await self.read_body(response)
            if response.code == 412:
                await self._abort(key, upload_id)
                return False
            code, message = parse_error(text)  # a 200 can carry an error document
            if code:
                raise S3Error(f"POST {key}?uploadId", response.code, code, message)
            return True
        except BaseException:
            await self._abort(key, upload_id)
            raise

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            response = await self.request("DELETE", key, query={"uploadId": upload_id}, expect=(200, 204, 404))
            drain(response)
        except S3Error:
            pass  # the bucket's lifecycle rule (or a later abort) cleans it up


def ensure_bucket(config: S3Config) -> None:
    """Check the bucket can be reached, creating it if missing (blocking: call at start).

    Raises:
        S3Error: it cannot be reached, or is missing and cannot be created.
    """
    bucket = _Bucket(config)
    url = f"{config.endpoint}/{config.bucket}"

    def send(method: str, body: bytes = b"") -> int:
        request = urllib.request.Request(url, data=body or None, method=method)
        for name, value in bucket.sign(method, url, {}, None, body).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=config.timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            if e.code in (200, 404):
                return e.code
            code, message = parse_error(e.read())
            raise S3Error(f"{method} bucket {config.bucket}", e.code, code or e.reason, message) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise S3Error(f"{method} {url}", None, type(reason).__name__, str(reason)) from None

    if send("HEAD") == 200:
        return
    body = b""
    if config.region != "us-east-1":
        body = (
            '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<LocationConstraint>{config.region}</LocationConstraint></CreateBucketConfiguration>"
        ).encode()
    send("PUT", body)
