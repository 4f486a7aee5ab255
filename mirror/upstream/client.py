"""The client side: talking to one upstream registry with treq.

:class:`Upstream` knows the upstream's URL and credentials and speaks the registry API:
manifest GET/HEAD, blob GET (unbuffered: the body streams into a
:class:`~mirror.registry.fills.BlobFill`) and blob HEAD.  Authentication follows the upstream's
``WWW-Authenticate`` challenge: anonymous first, then the Docker token flow (token from
the realm, with credentials when configured, cached per scope until it expires) or
Basic; after a 401 it retries once.  Statuses become :class:`~mirror.core.errors.RegistryError`
subclasses: :class:`UpstreamUnavailable` for "down, slow, 5xx or 429" (the caller may
serve stale content), :class:`UpstreamRefused` for a definite answer (404, 401, ...).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from urllib.parse import urlencode

import attrs

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from mirror.config import UpstreamConfig
from mirror.core.errors import RegistryError
from mirror.core.oci import OCI_INDEX
from mirror.responses import Discard, read_capped
from mirror.upstream.challenge import Challenge, TokenCache, parse_challenge, token_from_response
from mirror.upstream.tls import describe_tls_failure

__all__ = ["ManifestResponse", "Upstream", "UpstreamRefused", "UpstreamUnavailable"]

#: Largest error or token body we read from an upstream.
SMALL_BODY = 64 * 1024


class UpstreamUnavailable(RegistryError):
    """The upstream could not answer (down, timed out, 5xx, 429): stale content may serve."""


class UpstreamRefused(RegistryError):
    """The upstream gave a definite negative answer (404, 401/403, other 4xx)."""


@attrs.frozen
class ManifestResponse:
    """A manifest as the upstream sent it."""

    data: bytes
    content_type: str | None
    digest_header: str | None


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
        clock: the reactor's time, for timeouts and token expiry.
    """

    _log = Logger()

    def __init__(self, config: UpstreamConfig, http: HTTPClient, clock: IReactorTime) -> None:
        self.config = config
        self._http = http
        self._clock = clock
        self._tokens = TokenCache()
        self._bearer: Challenge | None = None  # the realm/service learned from a challenge
        self._basic = False  # the upstream asked for Basic
        self.requests = 0  # requests sent (tests and metrics count them)
        self.ratelimit_remaining: str | None = None  # Docker Hub's last ratelimit-remaining

    @property
    def name(self) -> str:
        """The registry this upstream stands for."""
        return self.config.registry

    # the registry API ---------------------------------------------------------------------
    async def get_manifest(self, name: str, reference: str, accept: list[str], max_size: int) -> ManifestResponse:
        """GET a manifest (capped at ``max_size``)."""
        self._refuse_if_offline("MANIFEST_UNKNOWN", name, reference)
        response = await self._request(b"GET", name, f"manifests/{reference}", {"Accept": ", ".join(accept)})
        self._check(response, name, "MANIFEST_UNKNOWN", reference)
        try:
            data = await read_capped(response, max_size, self._clock, self.config.timeout)
        except ValueError as e:
            raise UpstreamRefused(
                "MANIFEST_INVALID", f"upstream {self.name} manifest {name}:{reference}: {e}", status=502
            ) from None
        except Exception as e:
            raise self._unavailable(f"reading manifest {name}:{reference}", e) from None
        return ManifestResponse(data, _header(response, "Content-Type"), _header(response, "Docker-Content-Digest"))

    async def head_manifest(self, name: str, reference: str, accept: list[str]) -> str | None:
        """HEAD a manifest; the ``Docker-Content-Digest`` the upstream gives, if any."""
        self._refuse_if_offline("MANIFEST_UNKNOWN", name, reference)
        response = await self._request(b"HEAD", name, f"manifests/{reference}", {"Accept": ", ".join(accept)})
        self._check(response, name, "MANIFEST_UNKNOWN", reference)
        return _header(response, "Docker-Content-Digest")

    async def get_blob(self, name: str, digest: str) -> IResponse:
        """GET a blob; the 200 response with its body not yet read."""
        self._refuse_if_offline("BLOB_UNKNOWN", name, digest)
        response = await self._request(b"GET", name, f"blobs/{digest}", {})
        self._check(response, name, "BLOB_UNKNOWN", digest)
        return response

    async def head_blob(self, name: str, digest: str) -> int | None:
        """HEAD a blob; its size if the upstream says."""
        self._refuse_if_offline("BLOB_UNKNOWN", name, digest)
        response = await self._request(b"HEAD", name, f"blobs/{digest}", {})
        self._check(response, name, "BLOB_UNKNOWN", digest)
        length = _header(response, "Content-Length")
        return int(length) if length and length.isdigit() else None

    async def referrers(self, name: str, digest: str, artifact_type: str | None) -> list[dict[str, object]]:
        """The upstream's referrers of ``digest`` (OCI 1.1), as descriptors.

        An upstream without the API (404) raises ``UpstreamRefused``.
        """
        self._refuse_if_offline("MANIFEST_UNKNOWN", name, digest)
        tail = f"referrers/{digest}" + (f"?{urlencode({'artifactType': artifact_type})}" if artifact_type else "")
        response = await self._request(b"GET", name, tail, {"Accept": OCI_INDEX})
        if response.code == 404:
            response.deliverBody(Discard())
            raise UpstreamRefused("UNSUPPORTED", f"upstream {self.name} does not serve referrers of {name}@{digest}", status=404)
        self._check(response, name, "MANIFEST_UNKNOWN", digest)
        try:
            doc = json.loads(await read_capped(response, 4 * 1024 * 1024, self._clock, self.config.timeout))
        except Exception as e:
            raise self._unavailable(f"reading referrers of {name}@{digest}", e) from None
        manifests = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
            raise UpstreamRefused("UNKNOWN", f"upstream {self.name} sent a malformed referrers index", status=502)
        return manifests

    # plumbing -----------------------------------------------------------------------------
    def _refuse_if_offline(self, unknown_code: str, name: str, reference: str) -> None:
        """Offline: a miss fails at once, loudly, naming what was missing."""
        if self.config.offline:
            what = f"{self.name}/{name}{'@' if ':' in reference else ':'}{reference}"
            raise UpstreamUnavailable(unknown_code, f"mirror is offline (offline: true) and {what} is not cached", status=404)

    def _check(self, response: IResponse, name: str, unknown_code: str, ref: str) -> None:
        code = response.code
        if 200 <= code < 300:
            return
        response.deliverBody(Discard())
        what = f"{name}:{ref}" if ":" not in ref else f"{name}@{ref}"
        retry_after = _header(response, "Retry-After")
        headers = {"Retry-After": retry_after} if retry_after else {}
        if code == 404:
            raise UpstreamRefused(unknown_code, f"upstream {self.name} has no {what}")
        if code in (401, 403):
            raise UpstreamRefused("DENIED", f"upstream {self.name} refused access to {what} ({code})")
        if code == 429:
            raise UpstreamUnavailable("TOOMANYREQUESTS", f"upstream {self.name} is rate limiting ({what})", headers=headers)
        if code >= 500:
            raise UpstreamUnavailable("UNAVAILABLE", f"upstream {self.name} failed with {code} ({what})", headers=headers)
        raise UpstreamRefused("UNKNOWN", f"upstream {self.name} answered {code} for {what}", status=502)

    def _unavailable(self, doing: str, error: BaseException) -> UpstreamUnavailable:
        message = describe_tls_failure(error) or str(error) or type(error).__name__
        return UpstreamUnavailable("UNAVAILABLE", f"upstream {self.name} unreachable while {doing}: {message}")

    def _url(self, name: str, tail: str) -> str:
        return f"{self.config.url}/v2/{name}/{tail}"

    async def _send(self, method: bytes, url: str, headers: Mapping[str, str]) -> IResponse:
        """One request; the body is left unread (callers read it with a cap, or stream it)."""
        self.requests += 1
        sending = self._http.request(method.decode(), url, headers=Headers({k: [v] for k, v in headers.items()}), unbuffered=True)
        timer = self._clock.callLater(self.config.timeout, sending.cancel)  # headers within the timeout
        try:
            response = await sending
        except CancelledError:
            raise self._unavailable(
                f"{method.decode()} {url}", TimeoutError(f"no answer within {self.config.timeout:g} s")
            ) from None
        except Exception as e:
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
        response.deliverBody(Discard())
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
            response.deliverBody(Discard())
            if response.code in (401, 403):
                raise UpstreamRefused("DENIED", f"upstream {self.name} token service refused {scope} ({response.code})")
            raise UpstreamUnavailable("UNAVAILABLE", f"upstream {self.name} token service answered {response.code}")
        try:
            body = await read_capped(response, SMALL_BODY, self._clock, self.config.timeout)
            parsed = token_from_response(json.loads(body))
        except Exception as e:
            raise self._unavailable("reading a token", e) from None
        if parsed is None:
            raise UpstreamUnavailable("UNAVAILABLE", f"upstream {self.name} token service sent no token")
        token, lifetime = parsed
        self._tokens.put(scope, token, lifetime, self._clock.seconds())
        self._log.debug("token for {scope} from {upstream}, {lifetime:g} s", scope=scope, upstream=self.name, lifetime=lifetime)
        return token
