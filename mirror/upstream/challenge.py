"""Pure parts of authenticating to an upstream registry.

* :func:`parse_challenge` reads a ``WWW-Authenticate`` header (``Bearer realm=...,
  service=..., scope=...`` or ``Basic realm=...``), per RFC 7235 auth-params with quoted
  strings (a scope list contains commas inside quotes).
* :class:`TokenCache` keeps Bearer tokens per scope until shortly before they expire;
  time comes from the caller, so it needs no clock of its own.
"""

from __future__ import annotations

import re

import attrs

__all__ = ["Challenge", "TokenCache", "parse_challenge", "token_from_response"]

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)')

#: Docker's token spec: a token without ``expires_in`` lives 60 seconds.
DEFAULT_TOKEN_LIFETIME = 60.0
#: Stop using a token this many seconds before it expires.
EXPIRY_MARGIN = 10.0


@attrs.frozen
class Challenge:
    """One parsed authentication challenge."""

    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str] = attrs.field(factory=dict, hash=False)

    @property
    def realm(self) -> str | None:
        """The ``realm`` parameter (the token endpoint for Bearer)."""
        return self.params.get("realm")


def parse_challenge(header: str | None) -> Challenge | None:
    """Parse a ``WWW-Authenticate`` value; ``None`` if absent or unparseable."""
    if not header:
        return None
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    if not scheme or "=" in scheme:
        return None
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        match = _PARAM_RE.match(rest, pos)
        if match is None or match.end() == pos:
            return None
        key, quoted, bare = match.groups()
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[key.lower()] = value
        pos = match.end()
    return Challenge(scheme.lower(), params)


def token_from_response(doc: object) -> tuple[str, float] | None:
    """The token and its lifetime in seconds from a token endpoint's JSON answer.

    Docker's token spec allows ``token`` or ``access_token`` and an optional
    ``expires_in`` (seconds, default 60).
    """
    if not isinstance(doc, dict):
        return None
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        return None
    lifetime = doc.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return token, float(lifetime)


class TokenCache:
    """Bearer tokens by scope, each used until a margin before it expires."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, float]] = {}

    def get(self, scope: str, now: float) -> str | None:
        """A still-usable token for ``scope``, or ``None``."""
        entry = self._tokens.get(scope)
        if entry is None:
            return None
        token, use_until = entry
        if now >= use_until:
            del self._tokens[scope]
            return None
        return token

    def put(self, scope: str, token: str, lifetime: float, now: float) -> None:
        """Remember ``token`` for ``scope``; it is used until ``EXPIRY_MARGIN`` (at most
        half its lifetime) before it expires."""
        self._tokens[scope] = (token, now + lifetime - min(EXPIRY_MARGIN, lifetime / 2))

    def drop(self, scope: str) -> None:
        """Forget the token for ``scope`` (the upstream refused it)."""
        self._tokens.pop(scope, None)
