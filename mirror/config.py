"""Configuration: YAML in, frozen attrs objects out, checked at load.

Only this module (and ``tap.py``, which calls it) sees YAML.  Loading reads the whole
file and finds every problem: each unknown key, wrong type, missing value and failed
check across keys is one line naming the file and the key path
(``conf/mirror.yaml: upstreams[0].tag_ttl: expected a number >= 0``), and
:class:`ConfigError` carries them all (``mirror check-config`` prints them).  A value
with a problem is set aside, and nothing that depends on it is checked, so that one
mistake gives one line (see :class:`_Reader`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import attrs
import yaml

from mirror.upstream.tls import read_ca_bundle

__all__ = [
    "ACTIONS",
    "MAX_WORKERS",
    "AccessRule",
    "AuthConfig",
    "ClusterConfig",
    "ConfigError",
    "GcConfig",
    "LimitsConfig",
    "MirrorConfig",
    "S3Config",
    "StorageConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]

T = TypeVar("T")

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_RE = re.compile(r"(?:(?!\.+/)[A-Za-z0-9._-]+/)+")  # no "." or ".." segment
_PATTERN_RE = re.compile(r"[a-z0-9*][a-z0-9._*/-]*")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b|)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1}
#: The most worker processes a config may ask for (``workers``).
MAX_WORKERS = 64
for _i, _p in enumerate("kmgt", start=1):
    _UNITS.update({_p: 1024**_i, f"{_p}ib": 1024**_i, f"{_p}b": 1000**_i, f"{_p}i": 1024**_i})


class ConfigError(Exception):
    """Problems with a configuration, each one line naming the file and the key.

    ``problems`` holds every line.  ``str()`` stays one line, for callers that print or log
    one message: the first problem, then ``(and N more problems)`` when there are others.
    """

    def __init__(self, problem: str, *more: str) -> None:
        super().__init__(problem, *more)
        self.problems: tuple[str, ...] = (problem, *more)

    def __str__(self) -> str:
        first, *others = self.problems
        if not others:
            return first
        return f"{first} (and {len(others)} more problem{'s' if len(others) > 1 else ''})"


#: What access rules grant.
ACTIONS = ("pull", "push", "delete")


@attrs.frozen
class AccessRule:
    """What anonymous and authenticated clients may do in repositories matching ``pattern``."""

    pattern: str
    anonymous: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset(ACTIONS)


@attrs.frozen
class AuthConfig:
    """The ``auth`` section: client authentication and access rules (see :mod:`mirror.web.auth`)."""

    htpasswd: Path
    token: bool = False  # the Docker token flow instead of Basic
    issuer: str = "mirror"
    service: str = "mirror"
    token_lifetime: float = 300.0
    key_file: Path | None = None  # HMAC key shared by several nodes; random per process if absent
    rules: tuple[AccessRule, ...] = (AccessRule("*"),)
    realm: str | None = None  # the token endpoint's URL in challenges; None: from the request's Host


@attrs.frozen
class UpstreamConfig:
    """One upstream registry the mirror stands in for."""

    registry: str  # the registry host clients name, e.g. "docker.io"
    url: str  # where to reach it, e.g. "https://registry-1.docker.io"
    username: str | None = attrs.field(default=None, repr=False)
    password: str | None = attrs.field(default=None, repr=False)
    tag_ttl: float = 300.0  # seconds a tag's digest is trusted before a revalidating HEAD
    timeout: float = 30.0  # seconds to wait for response headers, and at most between body bytes
    offline: bool = False  # never contact this upstream: serve what is cached, refuse misses
    retry_deadline: float = 15.0  # seconds within which a failed request is tried again; 0: never
    negative_ttl: float = 30.0  # seconds a 404 for a manifest or repository is remembered; 0: never
    ca_file: Path | None = None  # PEM bundle of the CAs trusted for this upstream, instead of the platform's
    tls_verify: bool = True  # False: no certificate or host name check (mirror.upstream.tls)


@attrs.frozen
class S3Config:
    """The ``storage.s3`` section: an S3-compatible bucket holds the store."""

    endpoint: str  # http(s)://host[:port], path-style requests
    bucket: str
    access_key: str = attrs.field(repr=False)
    secret_key: str = attrs.field(repr=False)
    region: str = "us-east-1"
    prefix: str = ""  # key prefix inside the bucket ("" or ending in "/")
    timeout: float = 30.0  # seconds to wait for response headers, and at most between body bytes
    redirect: bool = False  # answer a stored blob's GET with 307 to a presigned URL of its object
    redirect_expiry: int = 600  # seconds a presigned URL stays valid


@attrs.frozen
class StorageConfig:
    """Where and how content is stored: a directory (``root``) or a bucket (``s3``)."""

    root: Path | None = None
    s3: S3Config | None = None
    spool: Path | None = None  # local scratch for an s3 store's writes; None: under the temp dir
    access_flush_interval: float = 60.0  # seconds between writes of the access record

    @property
    def where(self) -> str:
        """The config key that says where the store is, for error messages."""
        return "storage.s3" if self.s3 is not None else "storage.root"

    @property
    def location(self) -> str:
        """Where the store is, for people: the directory, or the bucket's URL and prefix."""
        if self.s3 is not None:
            return f"{self.s3.endpoint}/{self.s3.bucket}/{self.s3.prefix}"
        return str(self.root)


@attrs.frozen
class ClusterConfig:
    """The ``cluster`` section: this node among several on one shared (s3) store."""

    advertise: str  # the URL other nodes reach this one at (its registry listener)
    secret: str = attrs.field(repr=False)  # the same on every node: signs node-to-node requests
    fill_lease: float = 30.0  # seconds a blob fill's lease lasts unless its node renews it


@attrs.frozen
class GcConfig:
    """Garbage collection and eviction of mirrored content."""

    interval: float = 3600.0  # seconds between runs inside the service; 0: never
    grace: float = 3600.0  # a blob accessed or written this recently is never deleted
    max_age: float = 7 * 24 * 3600.0  # evict mirrored content not accessed for longer; 0: never
    max_size: int = 0  # bytes; above high_watermark * max_size evict LRU mirrored content; 0: no limit
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    delete_untagged: bool = False  # periodic runs also drop untagged hosted manifests


@attrs.frozen
class LimitsConfig:
    """The ``limits`` section: what one client connection may hold (see :mod:`mirror.web.site`)."""

    header_timeout: float = 30.0  # seconds from a request's first byte (a new connection's start) to its last header
    idle_timeout: float = 120.0  # seconds a connection may wait for its next request, or stall in a request body
    max_header_size: int = 64 * 1024  # bytes of request line and headers
    max_headers: int = 100  # header lines in one request
    max_connections: int | None = None  # open connections to the registry listeners; None: from the fd limit


@attrs.frozen
class MirrorConfig:
    """The whole service configuration."""

    listen: tuple[str, ...]
    storage: StorageConfig
    upstreams: tuple[UpstreamConfig, ...] = ()
    hosted: tuple[str, ...] = ()  # repository-name patterns that accept pushes ("myorg/*", "*")
    read_only: bool = False  # refuse pushes and deletes (pulls and mirroring go on)
    delete: bool = True  # allow DELETE of manifests, tags and blobs in hosted repositories
    upload_expiry: float = 24 * 3600.0  # seconds an idle upload session is kept
    offline: bool = False  # no upstream is ever contacted (per upstream: upstreams[].offline)
    gc: GcConfig = GcConfig()
    metrics_listen: tuple[str, ...] = ()  # endpoints serving /metrics, /healthz, /readyz
    limits: LimitsConfig = LimitsConfig()  # timeouts and sizes of client connections
    auth: AuthConfig | None = None  # client authentication; None: open registry
    cluster: ClusterConfig | None = None  # several nodes on one s3 store
    workers: int = 1  # processes serving the listeners (mirror.workers); 1: this process alone
    max_manifest_size: int = 4 * 1024 * 1024
    source: str = "<config>"


class _Problems:
    """The problems found in one file so far, each a line ``FILE: key.path: message``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, key_path: str, message: str) -> None:
        self.lines.append(f"{self.source}: {key_path}: {message}")


class _Invalid(Exception):
    """Abandons the check of one value; its problem is already recorded."""


class _Reader:
    """Takes typed values out of one YAML mapping, recording every problem with its key path.

    A checker (``check(key_path, value) -> T``) records a problem and raises :class:`_Invalid`
    to give up on its value (``raise self.error(...)``); a section's checker may also record
    several problems and go on.  Either way, a value whose check recorded any problem is
    never used: :meth:`optional` gives None instead and marks the key bad, and a check across
    keys runs only when :meth:`valid` says its keys are good, so that one mistake is one line.
    An object built from a bad value's placeholder is thrown away by its parent, and
    :func:`parse_config` raises when any problem was recorded.
    """

    def __init__(self, problems: _Problems, path: str, value: object) -> None:
        self.problems = problems
        self.path = path
        self.seen: set[str] = set()
        self.bad: set[str] = set()
        if not isinstance(value, Mapping):
            raise self.error(path or "(top level)", "expected a mapping")
        self.data: Mapping[str, object] = value

    def problem(self, key_path: str, message: str) -> None:
        """Record a problem and go on."""
        self.problems.add(key_path, message)

    def error(self, key_path: str, message: str) -> _Invalid:
        """Record a problem; raise the result to give up on the value being checked."""
        self.problem(key_path, message)
        return _Invalid()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def attempt(self, key_path: str, value: object, check: Callable[[str, object], T]) -> T | None:
        """``check(key_path, value)``, or None when it recorded a problem."""
        before = len(self.problems.lines)
        try:
            result = check(key_path, value)
        except _Invalid:
            return None
        return result if len(self.problems.lines) == before else None

    def optional(self, key: str, check: Callable[[str, object], T]) -> T | None:
        """The checked value of ``key``, or ``None`` when it is absent (or null) or bad."""
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            return None
        value = self.attempt(self.key_path(key), self.data[key], check)
        if value is None:
            self.bad.add(key)
        return value

    def take(self, key: str, check: Callable[[str, object], T], default: T) -> T:
        """The checked value of ``key``, or ``default`` when it is absent (or bad)."""
        value = self.optional(key, check)
        return default if value is None else value

    def need(self, key: str, check: Callable[[str, object], T]) -> T | None:
        """The checked value of ``key``, which must be present; None when it is missing or bad."""
        value = self.optional(key, check)
        if value is None and key not in self.bad:
            self.bad.add(key)
            self.problem(self.key_path(key), "missing value")
        return value

    def valid(self, *keys: str) -> bool:
        """Whether none of ``keys`` had a problem (an absent optional key is fine)."""
        return self.bad.isdisjoint(keys)

    def finish(self) -> None:
        """Record every key that was not read as unknown."""
        for key in self.data:
            if key not in self.seen:
                self.problem(self.key_path(str(key)), "unknown key")

    def each(self, key_path: str, items: list[object], check: Callable[[str, object], T]) -> tuple[T, ...]:
        """``check`` applied to every item of a list (each bad item recorded); the good items."""
        checked = (self.attempt(f"{key_path}[{i}]", item, check) for i, item in enumerate(items))
        return tuple(value for value in checked if value is not None)

    # value checkers -------------------------------------------------------------------

    def string(self, key_path: str, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key_path, "expected a non-empty string")
        return value

    def number(self, key_path: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.error(key_path, "expected a number >= 0")
        return float(value)

    def positive(self, key_path: str, value: object) -> float:
        number = self.number(key_path, value)
        if number <= 0:
            raise self.error(key_path, "expected a number > 0")
        return number

    def origin(self, key_path: str, value: object, *, what: str) -> str:
        """An ``http(s)://host[:port]`` URL without a path (a trailing ``/`` is dropped)."""
        text = self.string(key_path, value).rstrip("/")
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise self.error(key_path, f"expected {what}")
        return text

    def boolean(self, key_path: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.error(key_path, "expected true or false")
        return value

    def patterns(self, key_path: str, value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.error(key_path, "expected a list of repository-name patterns")
        return self.each(key_path, value, self.pattern)

    def pattern(self, key_path: str, value: object) -> str:
        text = self.string(key_path, value)
        if _PATTERN_RE.fullmatch(text) is None:
            raise self.error(key_path, f"{text!r} is not a repository-name pattern (lower case, / and *)")
        return text

    def size(self, key_path: str, value: object) -> int:
        if isinstance(value, str):
            match = _SIZE_RE.fullmatch(value.strip())
            if match is None:
                raise self.error(key_path, "expected a size such as 50GiB, 500MB or a number of bytes")
            number, unit = match.groups()
            value = int(float(number) * _UNITS[unit.lower()])
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.error(key_path, "expected a positive size in bytes (or with a unit: 50GiB)")
        return value

    def fraction(self, key_path: str, value: object) -> float:
        number = self.number(key_path, value)
        if not 0 < number <= 1:
            raise self.error(key_path, "expected a fraction between 0 and 1")
        return number


def parse_config(text: str, source: str = "<config>") -> MirrorConfig:
    """Parse and validate configuration text.

    Args:
        text: YAML text.
        source: the file name used in error messages.

    Raises:
        ConfigError: naming the file and key of every problem, one line each.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(parse)"
        raise ConfigError(f"{source}: {where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    found = _Problems(source)
    try:
        top = _Reader(found, "", data if data is not None else {})
    except _Invalid:
        raise ConfigError(*found.lines) from None

    def listen(key_path: str, value: object) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise top.error(key_path, "expected an endpoint string or a list of them")
        return top.each(key_path, items, top.string)

    def secret(r: _Reader, key: str, environment: str) -> str | None:
        """A credential from the config, else from ``<key>_file``, else from the environment;
        None when there is none or it has a problem (recorded)."""
        value = r.optional(key, r.string)

        def from_file(key_path: str, path_value: object) -> str:
            path = r.string(key_path, path_value)
            if value is not None:
                raise r.error(key_path, f"give {key} or {key}_file, not both")
            try:
                content = Path(path).read_text().strip()
            except OSError as e:
                raise r.error(key_path, f"cannot read {path}: {e.strerror}") from None
            if not content:
                raise r.error(key_path, f"{path} is empty")
            return content

        read = r.optional(f"{key}_file", from_file)
        if not r.valid(key, f"{key}_file"):
            return None
        value = value or read or os.environ.get(environment) or None
        if value is None:
            r.problem(r.key_path(key), f"missing value (or {key}_file, or ${environment})")
        return value

    def s3(key_path: str, value: object) -> S3Config:
        r = _Reader(found, key_path, value)

        def bucket_name(key_path: str, value: object) -> str:
            bucket = r.string(key_path, value)
            if _BUCKET_RE.fullmatch(bucket) is None:
                raise r.error(key_path, f"{bucket!r} is not a bucket name (3-63 of a-z 0-9 . -)")
            return bucket

        def key_prefix(key_path: str, value: object) -> str:
            prefix = value if isinstance(value, str) else r.string(key_path, value)
            if prefix and (_PREFIX_RE.fullmatch(prefix) is None):
                raise r.error(key_path, f"{prefix!r}: expected path segments of a-z A-Z 0-9 . _ - ending in /")
            return prefix

        cfg = S3Config(
            endpoint=r.need("endpoint", partial(r.origin, what="an http:// or https:// URL without a path")) or "",
            bucket=r.need("bucket", bucket_name) or "",
            access_key=secret(r, "access_key", "AWS_ACCESS_KEY_ID") or "",
            secret_key=secret(r, "secret_key", "AWS_SECRET_ACCESS_KEY") or "",
            region=r.take("region", r.string, "us-east-1"),
            prefix=r.take("prefix", key_prefix, ""),
            timeout=r.take("timeout", r.positive, 30.0),
            redirect=r.take("redirect", r.boolean, False),
            redirect_expiry=int(r.take("redirect_expiry", r.positive, 600.0)),
        )
        r.finish()
        if r.valid("redirect_expiry") and not 1 <= cfg.redirect_expiry <= 7 * 24 * 3600:
            raise r.error(f"{key_path}.redirect_expiry", "expected seconds between 1 and 604800 (S3's limit)")
        return cfg

    def storage(key_path: str, value: object) -> StorageConfig:
        r = _Reader(found, key_path, value)
        root = r.optional("root", r.string)
        bucket = r.optional("s3", s3)
        spool = r.optional("spool", r.string)
        interval = r.take("access_flush_interval", r.positive, 60.0)
        r.finish()
        if r.valid("root", "s3") and (root is None) == (bucket is None):
            raise r.error(key_path, "expected either root (a directory) or s3 (a bucket)")
        if r.valid("s3") and spool is not None and bucket is None:
            raise r.error(f"{key_path}.spool", "applies to an s3 store (a filesystem store spools under its root)")
        return StorageConfig(
            root=Path(root) if root is not None else None,
            s3=bucket,
            spool=Path(spool) if spool is not None else None,
            access_flush_interval=interval,
        )

    def upstream_url(key_path: str, value: object) -> str:
        url = top.string(key_path, value)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise top.error(key_path, "expected an http:// or https:// URL")
        return url.rstrip("/")

    def registry_host(key_path: str, value: object) -> str:
        registry = top.string(key_path, value)
        if "/" in registry or registry != registry.strip().lower():
            raise top.error(key_path, "expected a lower-case registry host such as docker.io")
        return registry

    def upstream(key_path: str, value: object) -> UpstreamConfig:
        r = _Reader(found, key_path, value)
        cfg = UpstreamConfig(
            registry=r.need("registry", registry_host) or "",
            url=r.need("url", upstream_url) or "",
            username=r.optional("username", r.string),
            password=r.optional("password", r.string),
            tag_ttl=r.take("tag_ttl", r.number, 300.0),
            timeout=r.take("timeout", r.positive, 30.0),
            offline=r.take("offline", r.boolean, False),
            retry_deadline=r.take("retry_deadline", r.number, 15.0),
            negative_ttl=r.take("negative_ttl", r.number, 30.0),
            ca_file=Path(ca_file) if (ca_file := r.optional("ca_file", r.string)) is not None else None,
            tls_verify=r.take("tls_verify", r.boolean, True),
        )
        r.finish()
        if r.valid("username", "password") and (cfg.username is None) != (cfg.password is None):
            raise r.error(key_path, "username and password go together")
        if r.valid("url", "ca_file", "tls_verify"):
            upstream_tls(key_path, cfg, urlsplit(cfg.url).scheme, r)
        return cfg

    def upstream_tls(key_path: str, cfg: UpstreamConfig, scheme: str, r: _Reader) -> None:
        """``ca_file`` and ``tls_verify: false`` apply to an https upstream, one at a time; the
        bundle must be readable and hold certificates."""
        for key, set_ in (("ca_file", cfg.ca_file is not None), ("tls_verify", not cfg.tls_verify)):
            if set_ and scheme != "https":
                raise r.error(f"{key_path}.{key}", "applies to an https:// url only")
        if cfg.ca_file is None:
            return
        if not cfg.tls_verify:
            raise r.error(f"{key_path}.ca_file", "give ca_file or tls_verify: false, not both")
        try:
            read_ca_bundle(cfg.ca_file)
        except OSError as e:
            raise r.error(f"{key_path}.ca_file", f"cannot read {cfg.ca_file}: {e.strerror}") from None
        except ValueError as e:
            raise r.error(f"{key_path}.ca_file", str(e)) from None

    def metrics(key_path: str, value: object) -> tuple[str, ...]:
        r = _Reader(found, key_path, value)
        endpoints = r.need("listen", listen)
        r.finish()
        return endpoints or ()

    def limits(key_path: str, value: object) -> LimitsConfig:
        r = _Reader(found, key_path, value)
        d = LimitsConfig()

        def whole(p: str, v: object) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise r.error(p, "expected a whole number > 0")
            return v

        def header_size(p: str, v: object) -> int:
            size = r.size(p, v)
            if size < 1024:
                raise r.error(p, "expected at least 1KiB (a request line and a few headers)")
            return size

        cfg = LimitsConfig(
            header_timeout=r.take("header_timeout", r.positive, d.header_timeout),
            idle_timeout=r.take("idle_timeout", r.positive, d.idle_timeout),
            max_header_size=r.take("max_header_size", header_size, d.max_header_size),
            max_headers=r.take("max_headers", whole, d.max_headers),
            max_connections=r.optional("max_connections", whole),
        )
        r.finish()
        return cfg

    def actions(key_path: str, value: object) -> frozenset[str]:
        if not isinstance(value, list) or not all(v in ACTIONS for v in value):
            raise top.error(key_path, f"expected a list of actions from {', '.join(ACTIONS)}")
        return frozenset(value)

    def rule(key_path: str, value: object) -> AccessRule:
        r = _Reader(found, key_path, value)
        pattern = r.need("repository", r.string)
        result = AccessRule(
            pattern=pattern or "*",
            anonymous=r.take("anonymous", actions, frozenset()),
            users=r.take("users", actions, frozenset(ACTIONS)),
        )
        r.finish()
        return result

    def rules(key_path: str, value: object) -> tuple[AccessRule, ...]:
        if not isinstance(value, list):
            raise top.error(key_path, "expected a list of rules")
        return top.each(key_path, value, rule)

    def realm_url(key_path: str, value: object) -> str:
        realm = top.string(key_path, value)
        if (
            not realm.startswith(("http://", "https://"))
            or any(c in realm for c in '"\\')
            or not realm.isprintable()
            or " " in realm
        ):
            raise top.error(key_path, f"expected an http:// or https:// URL, got {realm[:100]!r}")
        return realm

    def auth(key_path: str, value: object) -> AuthConfig:
        r = _Reader(found, key_path, value)
        htpasswd = r.need("htpasswd", r.string)
        token = r.take("token", r.boolean, False)
        access: tuple[AccessRule, ...] = r.take("access", rules, (AccessRule("*"),))
        key_file = r.optional("key_file", r.string)
        realm = r.optional("realm", realm_url)
        cfg = AuthConfig(
            htpasswd=Path(htpasswd or ""),
            token=bool(token),
            issuer=r.take("issuer", r.string, "mirror"),
            service=r.take("service", r.string, "mirror"),
            token_lifetime=r.take("token_lifetime", r.positive, 300.0),
            key_file=Path(key_file) if key_file else None,
            realm=realm,
            rules=access,
        )
        r.finish()
        return cfg

    def cluster(key_path: str, value: object) -> ClusterConfig:
        r = _Reader(found, key_path, value)
        advertise = r.need("advertise", partial(r.origin, what="the http:// or https:// URL other nodes reach this one at")) or ""
        shared = secret(r, "secret", "MIRROR_CLUSTER_SECRET")
        if shared is not None and len(shared) < 16:
            r.problem(f"{key_path}.secret", "expected at least 16 characters (it signs node-to-node requests)")
        cfg = ClusterConfig(
            advertise=advertise,
            secret=shared or "",
            fill_lease=r.take("fill_lease", r.positive, 30.0),
        )
        r.finish()
        return cfg

    def gc(key_path: str, value: object) -> GcConfig:
        r = _Reader(found, key_path, value)
        d = GcConfig()
        cfg = GcConfig(
            interval=r.take("interval", r.number, d.interval),
            grace=r.take("grace", r.number, d.grace),
            max_age=r.take("max_age", r.number, d.max_age),
            max_size=r.take("max_size", lambda p, v: 0 if v == 0 else r.size(p, v), d.max_size),
            high_watermark=r.take("high_watermark", r.fraction, d.high_watermark),
            low_watermark=r.take("low_watermark", r.fraction, d.low_watermark),
            delete_untagged=r.take("delete_untagged", r.boolean, d.delete_untagged),
        )
        r.finish()
        if r.valid("low_watermark", "high_watermark") and cfg.low_watermark >= cfg.high_watermark:
            raise r.error(f"{key_path}.low_watermark", "must be below high_watermark")
        return cfg

    def upstreams(key_path: str, value: object) -> tuple[UpstreamConfig, ...]:
        if not isinstance(value, list):
            raise top.error(key_path, "expected a list")
        result: list[UpstreamConfig] = []
        seen: set[str] = set()
        for i, item in enumerate(value):
            u = top.attempt(f"{key_path}[{i}]", item, upstream)
            if u is None:
                continue
            if u.registry in seen:
                top.problem(f"{key_path}[{i}].registry", f"{u.registry!r} is listed twice")
            seen.add(u.registry)
            result.append(u)
        return tuple(result)

    def workers(key_path: str, value: object) -> int:
        if value == "auto":
            return min(len(os.sched_getaffinity(0)), MAX_WORKERS)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
            raise top.error(key_path, f"expected a whole number from 1 to {MAX_WORKERS}, or auto (one per core)")
        return value

    cfg = MirrorConfig(
        listen=top.need("listen", listen) or (),
        storage=top.need("storage", storage) or StorageConfig(),
        upstreams=top.take("upstreams", upstreams, ()),
        hosted=top.take("hosted", top.patterns, ()),
        read_only=top.take("read_only", top.boolean, False),
        delete=top.take("delete", top.boolean, True),
        offline=top.take("offline", top.boolean, False),
        upload_expiry=top.take("upload_expiry", top.positive, 24 * 3600.0),
        gc=top.take("gc", gc, GcConfig()),
        metrics_listen=top.take("metrics", metrics, ()),
        limits=top.take("limits", limits, LimitsConfig()),
        auth=top.optional("auth", auth),
        cluster=top.optional("cluster", cluster),
        workers=top.take("workers", workers, 1),
        max_manifest_size=top.take("max_manifest_size", top.size, 4 * 1024 * 1024),
        source=source,
    )
    top.finish()
    if top.valid("storage", "cluster") and cfg.cluster is not None and cfg.storage.s3 is None:
        top.problem("cluster", "needs a store the nodes share (storage.s3)")
    if top.valid("workers", "cluster") and cfg.cluster is not None and cfg.workers > 1:
        top.problem("workers", "a cluster node runs one process (workers: 1): other nodes would have to reach each worker")
    if found.lines:
        raise ConfigError(*found.lines)
    return cfg


def load_config(path: str | Path) -> MirrorConfig:
    """Read and validate the configuration file at ``path``."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_config(text, str(path))
