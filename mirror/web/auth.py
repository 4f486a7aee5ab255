"""Client authentication and authorization for the registry API.

Two ways to log in, both with users from an htpasswd file (bcrypt):

* **Basic**: every request carries ``Authorization: Basic``; a request that needs a
  user gets ``401`` with ``WWW-Authenticate: Basic realm="mirror"``.
* **Token** (the Docker token flow, what Docker Hub does): a request that needs more
  than it carries gets ``401`` with ``WWW-Authenticate: Bearer realm=".../auth/token",
  service=..., scope="repository:<name>:<actions>"``; the client fetches a signed,
  short-lived token from that realm (with its credentials, or anonymously) and retries.

Access rules map repository-name patterns to what anonymous and authenticated clients
may do (``pull``, ``push``, ``delete``); the first matching rule decides.  A wrong
password and an unknown user get the same answer after the same bcrypt work, so the
answer never tells whether a user exists.  Nothing here logs a credential.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import attrs
import bcrypt
import jwt

from twisted.internet.defer import Deferred

from mirror.config import ACTIONS, AuthConfig
from mirror.core.errors import RegistryError

__all__ = ["Authenticator", "Principal", "parse_scope", "requirements"]


@attrs.frozen
class Principal:
    """Who is asking: a user name, or ``None`` for anonymous.  A token carries its grants."""

    user: str | None
    grants: frozenset[tuple[str, str]] | None = None  # (repository, action) from a token

    @property
    def anonymous(self) -> bool:
        return self.user is None


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
    """

    def __init__(self, config: AuthConfig, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self._now = now
        self._users = load_htpasswd(config.htpasswd)
        # Checked for unknown users, at the cost the real entries use, so that a wrong user
        # name takes as long as a wrong password.
        rounds = max((int(h.split(b"$")[2]) for h in self._users.values()), default=10)
        self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=rounds))
        self._key = config.key_file.read_bytes() if config.key_file is not None else secrets.token_bytes(32)
        self._verified: dict[bytes, str] = {}  # sha256(user:password) -> user, for Basic on every request

    # credentials --------------------------------------------------------------------------
    def verify_password(self, user: str, password: str) -> bool:
        """bcrypt check (blocking, ~0.1 s: run it in a thread); unknown users cost the same."""
        hashed = self._users.get(user)
        ok = bcrypt.checkpw(password.encode(), hashed if hashed is not None else self._dummy)
        return ok and hashed is not None

    def basic_credentials(self, header: str | None) -> tuple[str, str] | None:
        """(user, password) from an ``Authorization: Basic`` header."""
        if not header or not header.lower().startswith("basic "):
            return None
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        # containers/image sends "Basic Og==" (an empty user and password) when it has no
        # credentials: that is an anonymous client, not a failed login.
        return (user, password) if sep and user else None

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
        realm: str,
        required: Sequence[tuple[str, str]],
        run_blocking: Callable[..., Deferred[bool]],
    ) -> Principal:
        """Who is calling (from its ``Authorization`` header), checked against what the
        request needs (see :func:`requirements`).

        Raises:
            RegistryError: ``UNAUTHORIZED`` (401, with the challenge) when more than the
                caller showed is needed; ``DENIED`` (403) for a user the rules refuse.
        """
        principal = Principal(None)
        if header and header[:7].lower() == "bearer " and self.config.token:
            principal = self.principal_from_token(header[7:].strip())
        elif (creds := self.basic_credentials(header)) is not None:
            if not await self.check_password(*creds, run_blocking):
                raise RegistryError(
                    "UNAUTHORIZED", "authentication failed", headers={"WWW-Authenticate": self.challenge(None, realm=realm)}
                )
            principal = Principal(creds[0])
        for repository, action in required:
            if action == "login":
                if principal.anonymous and principal.grants is None:
                    raise RegistryError(
                        "UNAUTHORIZED", "authentication required", headers={"WWW-Authenticate": self.challenge(None, realm=realm)}
                    )
                continue
            if self.permitted(principal, repository, action):
                continue
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
    def permitted(self, principal: Principal, repository: str, action: str) -> bool:
        """Whether ``principal`` may do ``action`` in ``repository``."""
        if principal.grants is not None:
            return (repository, action) in principal.grants
        return action in self.rule_actions(principal.user, repository)

    def rule_actions(self, user: str | None, repository: str) -> frozenset[str]:
        """The actions the first matching rule gives anonymous (``None``) or a user."""
        for rule in self.config.rules:
            if fnmatchcase(repository, rule.pattern):
                return rule.anonymous if user is None else rule.users | rule.anonymous
        return frozenset()

    # tokens -------------------------------------------------------------------------------
    def issue_token(self, user: str | None, scopes: Iterable[str]) -> dict[str, object]:
        """A signed token granting what the rules allow of what ``scopes`` ask for."""
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            name, wanted = parsed
            allowed = self.rule_actions(user, name)
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

    def principal_from_token(self, token: str) -> Principal:
        """The principal a Bearer token stands for; ``UNAUTHORIZED`` if forged or expired."""
        try:
            claims = self._decode(token)
        except jwt.PyJWTError:
            raise RegistryError(
                "UNAUTHORIZED", "invalid or expired token", headers={"WWW-Authenticate": self.challenge(None, "invalid_token")}
            ) from None
        grants = set()
        access = claims.get("access")
        for entry in access if isinstance(access, list) else []:
            if isinstance(entry, dict) and entry.get("type") == "repository":
                actions = entry.get("actions")
                for action in actions if isinstance(actions, list) else []:
                    grants.add((str(entry.get("name")), str(action)))
        sub = claims.get("sub")
        return Principal(sub if isinstance(sub, str) and sub else None, frozenset(grants))

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
        if not isinstance(claims.get("exp"), int) or now > claims["exp"] or now < int(claims.get("nbf", 0)) - 5:
            raise jwt.ExpiredSignatureError("token expired or not yet valid")
        return claims

    # challenges ---------------------------------------------------------------------------
    def challenge(self, scope: str | None, error: str | None = None, realm: str = "") -> str:
        """The ``WWW-Authenticate`` value for a 401."""
        if not self.config.token:
            return 'Basic realm="mirror"'
        parts = [f'realm="{realm}"', f'service="{self.config.service}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)


def requirements(handler: str, params: dict[str, str], args: Callable[[str], str | None]) -> Sequence[tuple[str, str]]:
    """What a request needs: (repository, action) pairs; empty for open endpoints.

    ``("", "login")`` means any authenticated client (``GET /v2/``, ``_catalog``).
    """
    name = params.get("name", "")
    if handler in ("token", "healthz", "readyz"):
        return ()
    if handler in ("base", "catalog"):
        return (("", "login"),)
    if handler in ("manifest", "blob", "tags", "referrers"):
        return ((name, "pull"),)
    if handler in ("delete_manifest", "delete_blob"):
        return ((name, "delete"),)
    return ((name, "push"),)  # put_manifest, start_upload, upload_*
