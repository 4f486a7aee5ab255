"""The client side: talking to one upstream registry with treq.

:class:`Upstream` knows the upstream's URL and credentials and speaks the registry API:
manifest GET/HEAD, blob GET (unbuffered: the body streams into a
:class:`~mirror.registry.fills.BlobFill`; :meth:`Upstream.resume_blob` asks for the rest of
one whose body broke) and blob HEAD.  Authentication follows the upstream's
``WWW-Authenticate`` challenge: anonymous first, then the Docker token flow (token from
the realm, with credentials when configured, cached per scope until it expires) or
Basic; after a 401 it retries once.  Statuses become :class:`~mirror.core.errors.RegistryError`
subclasses: :class:`UpstreamUnavailable` for "down, slow, 5xx or 429" (the caller may
serve stale content), :class:`UpstreamRefused` for a definite answer (404, 401, ...).

Every request is a GET or a HEAD, so a transient failure (no connection, a reset, a
timeout, 500/502/503/504, 429) is tried again with backoff (:mod:`mirror.upstream.retry`)
within the upstream's ``retry_deadline``, honouring ``Retry-After``; only then does the
caller see :class:`UpstreamUnavailable`.  Nothing has reached a client by then: a manifest
is read whole before it is served, and a blob body that breaks later is resumed, not
retried (:class:`~mirror.registry.fills.BlobFill`).  A 404 for a manifest, or for the
whole repository, is remembered for ``negative_ttl`` seconds (:mod:`mirror.upstream.misses`).
"""

from __future__ import annotations

import base64
import json
import random as _random
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar
from urllib.parse import urlencode

import attrs

from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from mirror.config import UpstreamConfig
from mirror.core.errors import RegistryError
from mirror.core.oci import OCI_INDEX
from mirror.metrics import Metrics
from mirror.responses import Discard, drain, read_capped
from mirror.upstream.challenge import Challenge, TokenCache, parse_challenge, token_from_response
from mirror.upstream.misses import Misses
from mirror.upstream.redirects import RedirectRefused
from mirror.upstream.retry import Backoff, retry_after
from mirror.upstream.tls import describe_tls_failure

__all__ = ["ManifestResponse", "Upstream", "UpstreamRefused", "UpstreamUnavailable"]

T = TypeVar("T")

#: Largest error or token body we read from an upstream.
SMALL_BODY = 64 * 1024
#: Statuses worth asking again for: the upstream (or a proxy before it) failed for now.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


class UpstreamUnavailable(RegistryError):
    """The upstream could not answer (down, timed out, 5xx, 429): stale content may serve.

    ``reason`` is a short label for metrics (``timeout``, ``connection``, ``body``, a
    status); ``transient`` whether asking again may help; ``wait`` the upstream's
    ``Retry-After`` in seconds, if it sent one.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        reason: str = "error",
        transient: bool = True,
        wait: float | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(code, message, status=status, headers=headers)
        self.reason = reason
        self.transient = transient
        self.wait = wait


class UpstreamRefused(RegistryError):
    """The upstream gave a definite negative answer (404, 401/403, other 4xx)."""


@attrs.frozen
class ManifestResponse:
    """A manifest as the upstream sent it."""

    data: bytes
    content_type: str | None
    digest_header: str | None


def _what(name: str, reference: str) -> str:
    return f"{name}@{reference}" if ":" in reference else f"{name}:{reference}"


def _range_start(content_range: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes START-END/TOTAL``, if it reads."""
    unit, _, rest = (content_range or "").strip().partition(" ")
    start = rest.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    value = values[0]
    return value.decode("latin-1") if isinstance(value, bytes) else value


class Upstream:
    """One upstream registry, reached with a treq client.

    Args:
        config: the upstream's settings.
        http: a treq client (tests pass one over an in-memory agent).
        clock: the reactor's time, for timeouts, backoff and token expiry.
        metrics: where retries and give-ups are counted (default: a private set).
        random: numbers in [0, 1) for backoff jitter (tests pass a fixed one).
    """

    _log = Logger()

    def __init__(
        self,
        config: UpstreamConfig,
        http: HTTPClient,
        clock: IReactorTime,
        metrics: Metrics | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.config = config
        self._http = http
        self._clock = clock
        self._metrics = metrics if metrics is not None else Metrics()
        self._random = random
        self._backoff = Backoff(config.retry_deadline)
        self._tokens = TokenCache()
        self.misses = Misses(config.negative_ttl)
        self._bearer: Challenge | None = None  # the realm/service learned from a challenge
        self._basic = False  # the upstream asked for Basic
        self.requests = 0  # requests sent (tests and metrics count them)
        self.ratelimit_remaining: str | None = None  # Docker Hub's last ratelimit-remaining

    @property
    def name(self) -> str:
        """The registry this upstream stands for."""
        return self.config.registry

    # the registry API ---------------------------------------------------------------------
    async def get_manifest(
        self, name: str, reference: str, accept: list[str], max_size: int, *, patience: float | None = None
    ) -> ManifestResponse:
        """GET a manifest (capped at ``max_size``); ``patience``: seconds of retries instead
        of the upstream's ``retry_deadline`` (a caller with a cached copy to fall back on)."""
        self._refuse_if_offline("MANIFEST_UNKNOWN", name, reference)
        self._refuse_if_missing(name, reference)

        async def attempt() -> ManifestResponse:
            response = await self._request(b"GET", name, f"manifests/{reference}", {"Accept": ", ".join(accept)})
            await self._check_manifest(response, name, reference)
            try:
                data = await read_capped(response, max_size, self._clock, self.config.timeout)
            except ValueError as e:
                raise UpstreamRefused(
                    "MANIFEST_INVALID", f"upstream {self.name} manifest {name}:{reference}: {e}", status=502
                ) from None
            except Exception as e:
                raise self._unavailable(f"reading manifest {name}:{reference}", e, "body") from None
            return ManifestResponse(data, _header(response, "Content-Type"), _header(response, "Docker-Content-Digest"))

        return await self._retrying(f"GET manifest {name}:{reference}", attempt, patience)

    async def head_manifest(self, name: str, reference: str, accept: list[str], *, patience: float | None = None) -> str | None:
        """HEAD a manifest; the ``Docker-Content-Digest`` the upstream gives, if any
        (``patience`` as for :meth:`get_manifest`)."""
        self._refuse_if_offline("MANIFEST_UNKNOWN", name, reference)
        self._refuse_if_missing(name, reference)

        async def attempt() -> str | None:
            response = await self._request(b"HEAD", name, f"manifests/{reference}", {"Accept": ", ".join(accept)})
            await self._check_manifest(response, name, reference)
            return _header(response, "Docker-Content-Digest")

        return await self._retrying(f"HEAD manifest {name}:{reference}", attempt, patience)

    async def get_blob(self, name: str, digest: str) -> IResponse:
        """GET a blob; the 200 response with its body not yet read."""
        self._refuse_if_offline("BLOB_UNKNOWN", name, digest)

        async def attempt() -> IResponse:
            response = await self._request(b"GET", name, f"blobs/{digest}", {})
            self._check(response, name, "BLOB_UNKNOWN", digest)
            return response

        return await self._retrying(f"GET blob {name}@{digest}", attempt)

    async def resume_blob(self, name: str, digest: str, offset: int) -> tuple[IResponse, int]:
        """GET a blob from byte ``offset`` on (a fill whose body broke there).

        Returns the response, its body not yet read, and how many of its first bytes come
        before ``offset`` (an upstream that ignores ``Range`` answers 200 with the whole
        blob: the caller skips ``offset`` bytes).

        Raises:
            UpstreamRefused: the upstream answered the range with other bytes than asked.
        """

        self._refuse_if_offline("BLOB_UNKNOWN", name, digest)

        async def attempt() -> tuple[IResponse, int]:
            response = await self._request(b"GET", name, f"blobs/{digest}", {"Range": f"bytes={offset}-"})
            self._check(response, name, "BLOB_UNKNOWN", digest)
            if response.code != 206:
                return response, offset
            start = _range_start(_header(response, "Content-Range"))
            if start is None or start > offset:
                drain(response)
                raise UpstreamRefused(
                    "UNKNOWN",
                    f"upstream {self.name} answered a request for {name}@{digest} from byte {offset} "
                    f"with Content-Range {_header(response, 'Content-Range')!r}",
                    status=502,
                )
            return response, offset - start

        return await self._retrying(f"GET blob {name}@{digest} from byte {offset}", attempt)

    async def head_blob(self, name: str, digest: str, *, patience: float | None = None) -> int | None:
        """HEAD a blob; its size if the upstream says (``patience`` as for :meth:`get_manifest`)."""
        self._refuse_if_offline("BLOB_UNKNOWN", name, digest)

        async def attempt() -> int | None:
            response = await self._request(b"HEAD", name, f"blobs/{digest}", {})
            self._check(response, name, "BLOB_UNKNOWN", digest)
            length = _header(response, "Content-Length")
            return int(length) if length and length.isdigit() else None

        return await self._retrying(f"HEAD blob {name}@{digest}", attempt, patience)

    async def referrers(self, name: str, digest: str, artifact_type: str | None) -> list[dict[str, object]]:
        """The upstream's referrers of ``digest`` (OCI 1.1), as descriptors.

        An upstream without the API (404) raises ``UpstreamRefused``.
        """
        self._refuse_if_offline("MANIFEST_UNKNOWN", name, digest)
        tail = f"referrers/{digest}" + (f"?{urlencode({'artifactType': artifact_type})}" if artifact_type else "")

        async def attempt() -> object:
            response = await self._request(b"GET", name, tail, {"Accept": OCI_INDEX})
            if response.code == 404:
                response.deliverBody(Discard())
                raise UpstreamRefused(
                    "UNSUPPORTED", f"upstream {self.name} does not serve referrers of {name}@{digest}", status=404
                )
            self._check(response, name, "MANIFEST_UNKNOWN", digest)
            try:
                return json.loads(await read_capped(response, 4 * 1024 * 1024, self._clock, self.config.timeout))
            except Exception as e:
                raise self._unavailable(f"reading referrers of {name}@{digest}", e, "body") from None

        doc = await self._retrying(f"GET referrers of {name}@{digest}", attempt)
        manifests = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
            raise UpstreamRefused("UNKNOWN", f"upstream {self.name} sent a malformed referrers index", status=502)
        return manifests

    # plumbing -----------------------------------------------------------------------------
    async def _retrying(self, doing: str, attempt: Callable[[], Awaitable[T]], patience: float | None = None) -> T:
        """``attempt()``, again after each transient failure, with backoff, until it
        succeeds or the upstream's ``retry_deadline`` (or ``patience``, if shorter) would
        pass; then its last error."""
        backoff = self._backoff
        if patience is not None and patience < backoff.deadline:
            backoff = attrs.evolve(backoff, deadline=patience)
        started = self._clock.seconds()
        failures = 0
        while True:
            try:
                return await attempt()
            except UpstreamUnavailable as e:
                if not e.transient:
                    raise
                wait = backoff.delay(failures, self._clock.seconds() - started, self._random, e.wait)
                if wait is None:
                    self._metrics.upstream_gave_up(self.name, e.reason)
                    self._log.warn(
                        "upstream {upstream}: {doing} failed after {attempts} attempt(s) in {seconds:.1f} s: {error}",
                        upstream=self.name,
                        doing=doing,
                        attempts=failures + 1,
                        seconds=self._clock.seconds() - started,
                        error=e.message,
                        event_kind="upstream_give_up",
                    )
                    raise
                failures += 1
                self._metrics.upstream_retried(self.name, e.reason)
                self._log.info(
                    "upstream {upstream}: {doing} failed ({error}); attempt {attempt} in {wait:.2f} s",
                    upstream=self.name,
                    doing=doing,
                    error=e.message,
                    attempt=failures + 1,
                    wait=wait,
                    event_kind="upstream_retry",
                )
                await deferLater(self._clock, wait)

    def _refuse_if_offline(self, unknown_code: str, name: str, reference: str) -> None:
        """Offline: a miss fails at once, loudly, naming what was missing."""
        if self.config.offline:
            what = f"{self.name}/{name}{'@' if ':' in reference else ':'}{reference}"
            raise UpstreamUnavailable(
                unknown_code, f"mirror is offline (offline: true) and {what} is not cached", status=404, transient=False
            )

    def _refuse_if_missing(self, name: str, reference: str) -> None:
        """A manifest the upstream said it lacks, moments ago, is not asked for again."""
        if self.misses.missing(name, reference, self._clock.seconds()):
            raise UpstreamRefused(
                "MANIFEST_UNKNOWN",
                f"upstream {self.name} has no {_what(name, reference)} "
                f"(its answer of the last {self.misses.ttl:g} s, negative_ttl)",
            )

    async def _check_manifest(self, response: IResponse, name: str, reference: str) -> None:
        """:meth:`_check` for a manifest, remembering a 404 (and a 2xx forgetting one)."""
        if response.code == 404:
            code = await self._error_code(response)
            self.misses.remember(name, None if code == "NAME_UNKNOWN" else reference, self._clock.seconds())
            raise UpstreamRefused("MANIFEST_UNKNOWN", f"upstream {self.name} has no {_what(name, reference)}")
        self._check(response, name, "MANIFEST_UNKNOWN", reference)
        self.misses.found(name, reference)

    async def _error_code(self, response: IResponse) -> str | None:
        """The first error code of an error response's JSON body, if it has one."""
        try:
            doc = json.loads(await read_capped(response, SMALL_BODY, self._clock, self.config.timeout))
            code = doc["errors"][0]["code"]
        except Exception:  # no body (HEAD), not JSON, not the spec's shape: no code
            return None
        return code if isinstance(code, str) else None

    def _check(self, response: IResponse, name: str, unknown_code: str, ref: str) -> None:
        code = response.code
        if 200 <= code < 300:
            return
        drain(response)
        what = _what(name, ref)
        if code == 404:
            raise UpstreamRefused(unknown_code, f"upstream {self.name} has no {what}")
        if code in (401, 403):
            raise UpstreamRefused("DENIED", f"upstream {self.name} refused access to {what} ({code})")
        if code == 429 or code >= 500:
            raise self._failed(response, what)
        raise UpstreamRefused("UNKNOWN", f"upstream {self.name} answered {code} for {what}", status=502)

    def _failed(self, response: IResponse, what: str) -> UpstreamUnavailable:
        """The error for a 429 or 5xx answer about ``what``: transient for 429 and
        500/502/503/504, waiting at least the upstream's ``Retry-After`` if it sent one."""
        code = response.code
        header = _header(response, "Retry-After")
        headers = {"Retry-After": header} if header else {}
        wait = retry_after(header, self._clock.seconds())
        if code == 429:
            message = f"upstream {self.name} is rate limiting ({what})"
            return UpstreamUnavailable("TOOMANYREQUESTS", message, headers=headers, reason="429", wait=wait)
        return UpstreamUnavailable(
            "UNAVAILABLE",
            f"upstream {self.name} failed with {code} ({what})",
            headers=headers,
            reason=str(code) if code in TRANSIENT_STATUSES else "5xx",
            transient=code in TRANSIENT_STATUSES,
            wait=wait,
        )

    def _unavailable(self, doing: str, error: BaseException, reason: str = "connection") -> UpstreamUnavailable:
        tls = describe_tls_failure(error)
        message = tls or str(error) or type(error).__name__
        # A certificate the upstream's settings do not trust stays untrusted, and a refused
        # redirect stays refused: neither is worth asking again.
        lasting = "tls" if tls else ("redirect" if isinstance(error, RedirectRefused) else None)
        return UpstreamUnavailable(
            "UNAVAILABLE",
            f"upstream {self.name} unreachable while {doing}: {message}",
            reason=lasting or reason,
            transient=lasting is None,
        )

    def _url(self, name: str, tail: str) -> str:
        return f"{self.config.url}/v2/{name}/{tail}"

    async def _send(self, method: bytes, url: str, headers: Mapping[str, str]) -> IResponse:
        """One request; the body is left unread (callers read it with a cap, or stream it)."""
        self.requests += 1
        sending = self._http.request(
            method.decode(), url, headers=Headers({k: [v] for k, v in headers.items()}), unbuffered=True, allow_redirects=False
        )
        timed_out: list[bool] = []

        def time_out() -> None:
            timed_out.append(True)
            sending.cancel()

        timer = self._clock.callLater(self.config.timeout, time_out)  # headers within the timeout
        try:
            response = await sending
        except Exception as e:
            if timed_out:
                timeout = TimeoutError(f"no answer within {self.config.timeout:g} s")
                raise self._unavailable(f"{method.decode()} {url}", timeout, "timeout") from None
            raise self._unavailable(f"{method.decode()} {url}", e) from None
        finally:
            if timer.active():
                timer.cancel()
        remaining = _header(response, "RateLimit-Remaining")
        if remaining is not None:
            self.ratelimit_remaining = remaining
        return response

    async def _request(self, method: bytes, name: str, tail: str, headers: Mapping[str, str]) -> IResponse:
        scope = f"repository:{name}:pull"
        url = self._url(name, tail)
        response = await self._send(method, url, {**headers, **await self._auth(scope)})
        if response.code != 401:
            return response
        challenge = parse_challenge(_header(response, "WWW-Authenticate"))
        self._tokens.drop(scope)
        if challenge is not None and challenge.scheme == "bearer" and challenge.realm:
            self._bearer = challenge
        elif challenge is not None and challenge.scheme == "basic" and self.config.username is not None:
            self._basic = True
        else:
            return response  # nothing more we can do: _check reports the 401
        drain(response)
        return await self._send(method, url, {**headers, **await self._auth(scope)})

    def _basic_header(self) -> str:
        raw = f"{self.config.username}:{self.config.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def _auth(self, scope: str) -> dict[str, str]:
        if self._bearer is not None:
            token = self._tokens.get(scope, self._clock.seconds())
            if token is None:
                token = await self._fetch_token(self._bearer, scope)
            return {"Authorization": f"Bearer {token}"}
        if self._basic:
            return {"Authorization": self._basic_header()}
        return {}

    async def _fetch_token(self, challenge: Challenge, scope: str) -> str:
        query = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        realm = challenge.realm or ""
        url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}"
        headers = {"Authorization": self._basic_header()} if self.config.username is not None else {}
        response = await self._send(b"GET", url, headers)
        if response.code != 200:
            drain(response)
            if response.code in (401, 403):
                raise UpstreamRefused("DENIED", f"upstream {self.name} token service refused {scope} ({response.code})")
            if response.code == 429 or response.code >= 500:
                raise self._failed(response, f"a token for {scope}")
            raise UpstreamUnavailable(
                "UNAVAILABLE", f"upstream {self.name} token service answered {response.code}", transient=False
            )
        try:
            body = await read_capped(response, SMALL_BODY, self._clock, self.config.timeout)
            parsed = token_from_response(json.loads(body))
        except Exception as e:
            raise self._unavailable("reading a token", e, "body") from None
        if parsed is None:
            raise UpstreamUnavailable("UNAVAILABLE", f"upstream {self.name} token service sent no token", transient=False)
        token, lifetime = parsed
        self._tokens.put(scope, token, lifetime, self._clock.seconds())
        self._log.debug("token for {scope} from {upstream}, {lifetime:g} s", scope=scope, upstream=self.name, lifetime=lifetime)
        return token
