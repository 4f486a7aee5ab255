"""Client authentication and authorization for the registry API.

Two ways to log in, both with users from an htpasswd file (bcrypt):

* **Basic**: every request carries ``Authorization: Basic``; a request that needs a
  user gets ``401`` with ``WWW-Authenticate: Basic realm="mirror"``.
* **Token** (the Docker token flow, what Docker Hub does): a request that needs more
  than it carries gets ``401`` with ``WWW-Authenticate: Bearer realm=".../auth/token",
  service=..., scope="repository:<name>:<actions>"``; the client fetches a signed,
  short-lived token from that realm (with its credentials, or anonymously) and retries.

Access rules map repository-name patterns to what anonymous and authenticated clients
may do (``pull``, ``push``, ``delete``); the first matching rule decides.  A rule is
matched against the names of the repository a request reaches, not the name it was
asked by (:meth:`mirror.core.routing.Router.rule_names`): ``alpine``, ``library/alpine``
and ``docker.io/library/alpine`` are one repository and get one answer, the one
``_catalog`` filtering gives.  A wrong password and an unknown user get the same answer
after the same bcrypt work, so the answer never tells whether a user exists.  Nothing
here logs a credential.

A token is checked again on every use: it grants what it names *and* what the rules
give its user now, and only while that user is in the htpasswd file — so removing a
user or narrowing a rule (SIGHUP) takes effect at once, without waiting for tokens to
expire.  A changed password does not revoke tokens already issued (they expire after
``token_lifetime``, 300 s by default).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TypeGuard
from urllib.parse import unquote_plus

import attrs
import bcrypt
import jwt

from twisted.internet.defer import Deferred

from mirror.config import ACTIONS, AuthConfig
from mirror.core.errors import RegistryError

__all__ = [
    "SECRET_PARAMETERS",
    "Authenticator",
    "Need",
    "Principal",
    "carries_secret",
    "parse_scope",
    "query_fields",
    "quoted",
    "requirements",
    "valid_host",
]

#: Longest user name and password taken (bytes); longer credentials are refused (401).
MAX_USER = 256
MAX_PASSWORD = 1024
#: bcrypt reads only this many bytes of a password; htpasswd truncates to it when hashing.
BCRYPT_MAX = 72
#: Query parameters that carry a secret: the token endpoint refuses them, logs never show them.
SECRET_PARAMETERS = frozenset({"password", "refresh_token", "access_token", "client_secret"})
#: Clock difference tolerated between nodes that share a token key (seconds).
CLOCK_SKEW = 5

_HOST = re.compile(r"(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


@attrs.frozen
class Principal:
    """Who is asking: a user name, or ``None`` for anonymous.  A token carries its grants."""

    user: str | None
    grants: frozenset[tuple[str, str]] | None = None  # (repository, action) from a token

    @property
    def anonymous(self) -> bool:
        return self.user is None


@attrs.frozen
class Need:
    """What a request needs: ``action`` (``pull``, ``push``, ``delete``) on a repository,
    or ``login`` (any authenticated user)."""

    action: str
    name: str = ""  # the repository as the request named it (a token's scope names it so)
    rule_names: tuple[str, ...] = ()  # the names rules match (Router.rule_names)


def query_fields(query: bytes) -> list[tuple[bytes, str]]:
    """A URL query's fields, each with its name as a parameter name compares (decoded,
    lower case); ``&`` and ``;`` both separate, as some servers and proxies take them."""
    return [(field, unquote_plus(field.partition(b"=")[0].decode("latin-1")).lower()) for field in re.split(rb"[&;]", query)]


def carries_secret(query: bytes) -> bool:
    """Whether a URL query names a parameter that carries a secret (a password, a token)."""
    return any(name in SECRET_PARAMETERS for _, name in query_fields(query))


def quoted(value: str) -> str:
    """``value`` as an HTTP quoted-string (RFC 9110 5.6.4)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def valid_host(host: str) -> bool:
    """Whether ``host`` is a plain ``Host`` header value: a name or address, and a port."""
    return len(host) <= 261 and _HOST.fullmatch(host) is not None


def parse_scope(scope: str) -> tuple[str, list[str]] | None:
    """``repository:<name>:<a,b>`` → (name, actions); None for other scope types."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if kind != "repository" or not name:
        return None
    return name, [a for a in actions.split(",") if a]


def load_htpasswd(path: Path) -> dict[str, bytes]:
    """user → bcrypt hash; other hash kinds are refused (only bcrypt is safe enough)."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            raise ValueError(f"{path}: line {number}: not a user:bcrypt-hash entry")
        users[user] = hashed.encode()
    return users


class Authenticator:
    """Checks credentials and tokens, applies the access rules, issues tokens.

    Args:
        config: the auth settings.
        now: the clock (seconds since the epoch).
        process_key: the token key to keep when ``config`` names no ``key_file`` (a
            reload keeps the process's random key, so tokens issued before it still work).
    """

    def __init__(self, config: AuthConfig, now: Callable[[], float] = time.time, process_key: bytes | None = None) -> None:
        self.config = config
        self._now = now
        self._users = load_htpasswd(config.htpasswd)
        # Checked for unknown users, at the cost the real entries use, so that a wrong user
        # name takes as long as a wrong password.
        rounds = max((int(h.split(b"$")[2]) for h in self._users.values()), default=10)
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=rounds))
        #: the random per-process token key, when no ``key_file`` is configured
        self.process_key: bytes | None = None
        if config.key_file is not None:
            self._key = config.key_file.read_bytes()
        else:
            self._key = self.process_key = process_key or secrets.token_bytes(32)
        self._verified: dict[bytes, str] = {}  # sha256(user:password) -> user, for Basic on every request

    # credentials --------------------------------------------------------------------------
    def verify_password(self, user: str, password: str) -> bool:
        """bcrypt check (blocking, ~0.1 s: run it in a thread); unknown users cost the same."""
        hashed = self._users.get(user)
        secret = password.encode()[:BCRYPT_MAX]  # as htpasswd hashed it (bcrypt reads no more)
        ok = bcrypt.checkpw(secret, hashed if hashed is not None else self._dummy)
        return ok and hashed is not None

    def basic_credentials(self, header: str | None, realm: Callable[[], str] | None = None) -> tuple[str, str] | None:
        """(user, password) from an ``Authorization: Basic`` header; ``None`` for none.

        Raises:
            RegistryError: ``UNAUTHORIZED`` for credentials that cannot be right: not
                base64, not UTF-8, no ``:``, no user, or over-long.
        """
        if not header or not header.lower().startswith("basic "):
            return None
        encoded = header[6:].strip()
        try:
            if len(encoded) > 2 * (MAX_USER + MAX_PASSWORD):
                raise ValueError("too long")
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise self.refused("malformed Basic credentials", realm) from None
        # containers/image sends "Basic Og==" (an empty user and password) when it has no
        # credentials: that is an anonymous client, not a failed login.
        if not user and not password:
            return None
        if not sep:
            raise self.refused("malformed Basic credentials", realm)
        self.check_shape(user, password, realm)
        return user, password

    def check_shape(self, user: str | None, password: str | None, realm: Callable[[], str] | None = None) -> None:
        """Refuse (401) credentials no user can have: an empty or over-long user or password."""
        if not user or not password or len(user.encode()) > MAX_USER or len(password.encode()) > MAX_PASSWORD:
            raise self.refused("authentication failed", realm)

    def refused(self, message: str, realm: Callable[[], str] | None = None) -> RegistryError:
        """``UNAUTHORIZED`` with the challenge (``realm``: the token endpoint's URL)."""
        return RegistryError("UNAUTHORIZED", message, headers={"WWW-Authenticate": self.challenge(None, realm=realm)})

    def cached_basic(self, user: str, password: str) -> bool:
        """Whether this exact pair verified before (Basic sends it with every request)."""
        return self._verified.get(hashlib.sha256(f"{user}:{password}".encode()).digest()) == user

    def remember_basic(self, user: str, password: str) -> None:
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[hashlib.sha256(f"{user}:{password}".encode()).digest()] = user

    async def check_password(self, user: str, password: str, run_blocking: Callable[..., Deferred[bool]]) -> bool:
        """Whether the pair is valid: remembered, or bcrypt-checked in a thread."""
        if self.cached_basic(user, password):
            return True
        if not await run_blocking(self.verify_password, user, password):
            return False
        self.remember_basic(user, password)
        return True

    async def authorize(
        self,
        header: str | None,
        realm: Callable[[], str],
        needs: Sequence[Need],
        run_blocking: Callable[..., Deferred[bool]],
    ) -> Principal:
        """Who is calling (from its ``Authorization`` header), checked against what the
        request needs (see :func:`requirements`).

        ``realm`` gives the token endpoint's URL, asked for only when a challenge is sent.

        Raises:
            RegistryError: ``UNAUTHORIZED`` (401, with the challenge) when more than the
                caller showed is needed; ``DENIED`` (403) for a user the rules refuse.
        """
        principal = Principal(None)
        if header and header[:7].lower() == "bearer " and self.config.token:
            principal = self.principal_from_token(header[7:].strip(), realm)
        elif (creds := self.basic_credentials(header, realm)) is not None:
            if not await self.check_password(*creds, run_blocking):
                raise self.refused("authentication failed", realm)
            principal = Principal(creds[0])
        for need in needs:
            if need.action == "login":
                if principal.anonymous:  # an anonymous token is no login either
                    raise self.refused("authentication required", realm)
                continue
            if self.permitted(principal, need):
                continue
            action, repository = need.action, need.name
            scope = f"repository:{repository}:{'pull,push' if action == 'push' else action}"
            if principal.anonymous or principal.grants is not None:
                raise RegistryError(
                    "UNAUTHORIZED",
                    f"authentication required to {action} {repository}",
                    detail=[{"Type": "repository", "Name": repository, "Action": action}],
                    headers={
                        "WWW-Authenticate": self.challenge(
                            scope, "insufficient_scope" if principal.grants is not None else None, realm=realm
                        )
                    },
                )
            raise RegistryError("DENIED", f"{principal.user} may not {action} {repository}")
        return principal

    # rules --------------------------------------------------------------------------------
    def permitted(self, principal: Principal, need: Need) -> bool:
        """Whether ``principal`` may do what ``need`` asks: the rules allow it for its user
        now, and a token also names it."""
        if need.action not in self.rule_actions(principal.user, need.rule_names):
            return False
        return principal.grants is None or (need.name, need.action) in principal.grants

    def rule_actions(self, user: str | None, names: Sequence[str]) -> frozenset[str]:
        """The actions the first rule matching one of a repository's ``names``
        (:meth:`~mirror.core.routing.Router.rule_names`) gives anonymous (``None``) or a user."""
        for rule in self.config.rules:
            if any(fnmatchcase(name, rule.pattern) for name in names):
                return rule.anonymous if user is None else rule.users | rule.anonymous
        return frozenset()

    # tokens -------------------------------------------------------------------------------
    def issue_token(
        self, user: str | None, scopes: Iterable[str], rule_names: Callable[[str], Sequence[tuple[str, ...]]]
    ) -> dict[str, object]:
        """A signed token granting what the rules allow of what ``scopes`` ask for.

        ``rule_names`` gives, for a name in a scope, the rule names of every repository a
        request by that name may reach (with or without containerd's ``ns``): a scope names
        no ``ns``, and each use is checked against its own repository again.
        """
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            name, wanted = parsed
            allowed = frozenset().union(*(self.rule_actions(user, names) for names in rule_names(name)))
            if "*" in wanted:
                wanted = list(ACTIONS)
            granted = sorted(a for a in set(wanted) if a in allowed)
            access.append({"type": "repository", "name": name, "actions": granted})
        now = int(self._now())
        lifetime = int(self.config.token_lifetime)
        claims = {
            "iss": self.config.issuer,
            "sub": user or "",
            "aud": self.config.service,
            "iat": now,
            "nbf": now - 5,
            "exp": now + lifetime,
            "jti": secrets.token_hex(12),
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm="HS256")
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return {"token": token, "access_token": token, "expires_in": lifetime, "issued_at": issued}

    def principal_from_token(self, token: str, realm: Callable[[], str] | None = None) -> Principal:
        """The principal a Bearer token stands for.

        Raises:
            RegistryError: ``UNAUTHORIZED`` (``invalid_token``) if it is forged, expired,
                issued in the future, or its user is no longer in the htpasswd file.
        """
        try:
            claims = self._decode(token)
        except jwt.PyJWTError:
            claims = None
        sub = claims.get("sub") if claims is not None else None
        if claims is None or not isinstance(sub, str) or (sub and sub not in self._users):
            raise RegistryError(
                "UNAUTHORIZED",
                "invalid or expired token",
                headers={"WWW-Authenticate": self.challenge(None, "invalid_token", realm=realm)},
            )
        grants = set()
        access = claims.get("access")
        for entry in access if isinstance(access, list) else []:
            if isinstance(entry, dict) and entry.get("type") == "repository":
                actions = entry.get("actions")
                for action in actions if isinstance(actions, list) else []:
                    grants.add((str(entry.get("name")), str(action)))
        return Principal(sub or None, frozenset(grants))

    def _decode(self, token: str) -> dict[str, object]:
        # Signature, audience and issuer by PyJWT; time by our own clock (tests move it).
        claims = jwt.decode(
            token,
            self._key,
            algorithms=["HS256"],
            audience=self.config.service,
            issuer=self.config.issuer,
            options={"require": ["exp", "iat", "aud", "iss"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
        now = self._now()
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf", 0)
        if not (_is_int(exp) and _is_int(iat) and _is_int(nbf)):
            raise jwt.InvalidTokenError("exp, iat and nbf must be integers")
        if now > exp or now < nbf - CLOCK_SKEW or iat > now + CLOCK_SKEW:
            raise jwt.ExpiredSignatureError("token expired, not yet valid, or issued in the future")
        return claims

    # challenges ---------------------------------------------------------------------------
    def challenge(self, scope: str | None, error: str | None = None, realm: Callable[[], str] | None = None) -> str:
        """The ``WWW-Authenticate`` value for a 401 (every value quoted)."""
        if not self.config.token:
            return 'Basic realm="mirror"'
        url = self.config.realm or (realm() if realm is not None else "/auth/token")
        parts = [f"realm={quoted(url)}", f"service={quoted(self.config.service)}"]
        if scope:
            parts.append(f"scope={quoted(scope)}")
        if error:
            parts.append(f"error={quoted(error)}")
        return "Bearer " + ",".join(parts)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def requirements(handler: str, params: dict[str, str], args: Callable[[str], str | None]) -> Sequence[tuple[str, str]]:
    """What a request needs: (repository, action) pairs; empty for open endpoints.

    ``("", "login")`` means any authenticated client (``GET /v2/``, ``_catalog``).
    """
    name = params.get("name", "")
    if handler in ("token", "healthz", "readyz", "cluster_fill"):  # (a node's request carries its own signature)
        return ()
    if handler in ("base", "catalog"):
        return (("", "login"),)
    if handler in ("manifest", "blob", "tags", "referrers"):
        return ((name, "pull"),)
    if handler in ("delete_manifest", "delete_blob"):
        return ((name, "delete"),)
    return ((name, "push"),)  # put_manifest, start_upload, upload_*
