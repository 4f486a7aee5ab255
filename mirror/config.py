"""Configuration: YAML in, frozen attrs objects out, checked at load.

Only this module (and ``tap.py``, which calls it) sees YAML.  Any unknown key, wrong
type or missing value raises :class:`ConfigError` whose one-line message names the
file and the key path (``conf/mirror.yaml: upstreams[0].tag_ttl: expected a number``).
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
    "AccessRule",
    "AuthConfig",
    "ClusterConfig",
    "ConfigError",
    "GcConfig",
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
for _i, _p in enumerate("kmgt", start=1):
    _UNITS.update({_p: 1024**_i, f"{_p}ib": 1024**_i, f"{_p}b": 1000**_i, f"{_p}i": 1024**_i})


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming the file and the key."""


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
    auth: AuthConfig | None = None  # client authentication; None: open registry
    cluster: ClusterConfig | None = None  # several nodes on one s3 store
    max_manifest_size: int = 4 * 1024 * 1024
    source: str = "<config>"


class _Reader:
    """Takes typed values out of one YAML mapping, remembering the key path for errors."""

    def __init__(self, source: str, path: str, value: object) -> None:
        self.source = source
        self.path = path
        if not isinstance(value, Mapping):
            raise self.error(path or "(top level)", "expected a mapping")
        self.data: Mapping[str, object] = value
        self.seen: set[str] = set()

    def error(self, key_path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key_path}: {message}")

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def optional(self, key: str, check: Callable[[str, object], T]) -> T | None:
        """The checked value of ``key``, or ``None`` when it is absent (or null)."""
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            return None
        return check(self.key_path(key), self.data[key])

    def take(self, key: str, check: Callable[[str, object], T], default: T) -> T:
        """The checked value of ``key``, or ``default`` when it is absent."""
        value = self.optional(key, check)
        return default if value is None else value

    def need(self, key: str, check: Callable[[str, object], T]) -> T:
        """The checked value of ``key``, which must be present."""
        value = self.optional(key, check)
        if value is None:
            raise self.error(self.key_path(key), "missing value")
        return value

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                raise self.error(self.key_path(str(key)), "unknown key")

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
        result = []
        for i, item in enumerate(value):
            text = self.string(f"{key_path}[{i}]", item)
            if _PATTERN_RE.fullmatch(text) is None:
                raise self.error(f"{key_path}[{i}]", f"{text!r} is not a repository-name pattern (lower case, / and *)")
            result.append(text)
        return tuple(result)

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
        ConfigError: naming the file and key of the first problem.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(parse)"
        raise ConfigError(f"{source}: {where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    top = _Reader(source, "", data if data is not None else {})

    def listen(key_path: str, value: object) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise top.error(key_path, "expected an endpoint string or a list of them")
        return tuple(top.string(f"{key_path}[{i}]", v) for i, v in enumerate(items))

    def secret(r: _Reader, key: str, environment: str) -> str:
        """A credential from the config, else from ``<key>_file``, else from the environment."""
        value = r.optional(key, r.string)
        path = r.optional(f"{key}_file", r.string)
        if value is not None and path is not None:
            raise r.error(r.key_path(f"{key}_file"), f"give {key} or {key}_file, not both")
        if path is not None:
            try:
                value = Path(path).read_text().strip()
            except OSError as e:
                raise r.error(r.key_path(f"{key}_file"), f"cannot read {path}: {e.strerror}") from None
            if not value:
                raise r.error(r.key_path(f"{key}_file"), f"{path} is empty")
        value = value or os.environ.get(environment) or None
        if value is None:
            raise r.error(r.key_path(key), f"missing value (or {key}_file, or ${environment})")
        return value

    def s3(key_path: str, value: object) -> S3Config:
        r = _Reader(source, key_path, value)
        endpoint = r.need("endpoint", partial(r.origin, what="an http:// or https:// URL without a path")) or ""
        bucket = r.need("bucket", r.string) or ""
        if _BUCKET_RE.fullmatch(bucket) is None:
            raise r.error(f"{key_path}.bucket", f"{bucket!r} is not a bucket name (3-63 of a-z 0-9 . -)")
        prefix = r.take("prefix", lambda p, v: v if isinstance(v, str) else r.string(p, v), "")
        if prefix and (_PREFIX_RE.fullmatch(prefix) is None):
            raise r.error(f"{key_path}.prefix", f"{prefix!r}: expected path segments of a-z A-Z 0-9 . _ - ending in /")
        cfg = S3Config(
            endpoint=endpoint,
            bucket=bucket,
            access_key=secret(r, "access_key", "AWS_ACCESS_KEY_ID"),
            secret_key=secret(r, "secret_key", "AWS_SECRET_ACCESS_KEY"),
            region=r.take("region", r.string, "us-east-1"),
            prefix=prefix,
            timeout=r.take("timeout", r.positive, 30.0),
            redirect=r.take("redirect", r.boolean, False),
            redirect_expiry=int(r.take("redirect_expiry", r.positive, 600.0)),
        )
        r.finish()
        if not 1 <= cfg.redirect_expiry <= 7 * 24 * 3600:
            raise r.error(f"{key_path}.redirect_expiry", "expected seconds between 1 and 604800 (S3's limit)")
        return cfg

    def storage(key_path: str, value: object) -> StorageConfig:
        r = _Reader(source, key_path, value)
        root = r.optional("root", r.string)
        bucket = r.optional("s3", s3)
        spool = r.optional("spool", r.string)
        interval = r.take("access_flush_interval", r.positive, 60.0)
        r.finish()
        if (root is None) == (bucket is None):
            raise r.error(key_path, "expected either root (a directory) or s3 (a bucket)")
        if spool is not None and bucket is None:
            raise r.error(f"{key_path}.spool", "applies to an s3 store (a filesystem store spools under its root)")
        return StorageConfig(
            root=Path(root) if root is not None else None,
            s3=bucket,
            spool=Path(spool) if spool is not None else None,
            access_flush_interval=interval,
        )

    def upstream(key_path: str, value: object) -> UpstreamConfig:
        r = _Reader(source, key_path, value)
        registry = r.need("registry", r.string)
        url = r.need("url", r.string)
        assert registry is not None and url is not None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise r.error(f"{key_path}.url", "expected an http:// or https:// URL")
        if "/" in registry or registry != registry.strip().lower():
            raise r.error(f"{key_path}.registry", "expected a lower-case registry host such as docker.io")
        cfg = UpstreamConfig(
            registry=registry,
            url=url.rstrip("/"),
            username=r.optional("username", r.string),
            password=r.optional("password", r.string),
            tag_ttl=r.take("tag_ttl", r.number, 300.0),
            timeout=r.take("timeout", r.positive, 30.0),
            offline=r.take("offline", r.boolean, False),
            ca_file=Path(ca_file) if (ca_file := r.optional("ca_file", r.string)) is not None else None,
            tls_verify=r.take("tls_verify", r.boolean, True),
        )
        r.finish()
        if (cfg.username is None) != (cfg.password is None):
            raise r.error(key_path, "username and password go together")
        upstream_tls(key_path, cfg, parts.scheme, r)
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
        r = _Reader(source, key_path, value)
        endpoints = r.need("listen", listen)
        r.finish()
        return endpoints or ()

    def actions(key_path: str, value: object) -> frozenset[str]:
        if not isinstance(value, list) or not all(v in ACTIONS for v in value):
            raise top.error(key_path, f"expected a list of actions from {', '.join(ACTIONS)}")
        return frozenset(value)

    def rule(key_path: str, value: object) -> AccessRule:
        r = _Reader(source, key_path, value)
        pattern = r.need("repository", r.string)
        result = AccessRule(
            pattern=pattern or "*",
            anonymous=r.take("anonymous", actions, frozenset()),
            users=r.take("users", actions, frozenset(ACTIONS)),
        )
        r.finish()
        return result

    def auth(key_path: str, value: object) -> AuthConfig:
        r = _Reader(source, key_path, value)
        htpasswd = r.need("htpasswd", r.string)
        token = r.take("token", r.boolean, False)
        rules_value = r.optional("access", lambda p, v: v)
        if rules_value is not None and not isinstance(rules_value, list):
            raise r.error(f"{key_path}.access", "expected a list of rules")
        key_file = r.optional("key_file", r.string)
        realm = r.optional("realm", r.string)
        if realm is not None and (
            not realm.startswith(("http://", "https://"))
            or any(c in realm for c in '"\\')
            or not realm.isprintable()
            or " " in realm
        ):
            raise r.error(f"{key_path}.realm", f"expected an http:// or https:// URL, got {realm[:100]!r}")
        cfg = AuthConfig(
            htpasswd=Path(htpasswd or ""),
            token=bool(token),
            issuer=r.take("issuer", r.string, "mirror"),
            service=r.take("service", r.string, "mirror"),
            token_lifetime=r.take("token_lifetime", r.positive, 300.0),
            key_file=Path(key_file) if key_file else None,
            realm=realm,
            rules=tuple(rule(f"{key_path}.access[{i}]", v) for i, v in enumerate(rules_value))
            if rules_value is not None
            else (AccessRule("*"),),
        )
        r.finish()
        return cfg

    def cluster(key_path: str, value: object) -> ClusterConfig:
        r = _Reader(source, key_path, value)
        advertise = r.need("advertise", partial(r.origin, what="the http:// or https:// URL other nodes reach this one at")) or ""
        cfg = ClusterConfig(
            advertise=advertise,
            secret=secret(r, "secret", "MIRROR_CLUSTER_SECRET"),
            fill_lease=r.take("fill_lease", r.positive, 30.0),
        )
        r.finish()
        if len(cfg.secret) < 16:
            raise r.error(f"{key_path}.secret", "expected at least 16 characters (it signs node-to-node requests)")
        return cfg

    def gc(key_path: str, value: object) -> GcConfig:
        r = _Reader(source, key_path, value)
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
        if cfg.low_watermark >= cfg.high_watermark:
            raise r.error(f"{key_path}.low_watermark", "must be below high_watermark")
        return cfg

    def upstreams(key_path: str, value: object) -> tuple[UpstreamConfig, ...]:
        if not isinstance(value, list):
            raise top.error(key_path, "expected a list")
        result = tuple(upstream(f"{key_path}[{i}]", v) for i, v in enumerate(value))
        seen: set[str] = set()
        for i, u in enumerate(result):
            if u.registry in seen:
                raise top.error(f"{key_path}[{i}].registry", f"{u.registry!r} is listed twice")
            seen.add(u.registry)
        return result

    cfg = MirrorConfig(
        listen=top.need("listen", listen),
        storage=top.need("storage", storage),
        upstreams=top.take("upstreams", upstreams, ()),
        hosted=top.take("hosted", top.patterns, ()),
        read_only=top.take("read_only", top.boolean, False),
        delete=top.take("delete", top.boolean, True),
        offline=top.take("offline", top.boolean, False),
        upload_expiry=top.take("upload_expiry", top.positive, 24 * 3600.0),
        gc=top.take("gc", gc, GcConfig()),
        metrics_listen=top.take("metrics", metrics, ()),
        auth=top.optional("auth", auth),
        cluster=top.optional("cluster", cluster),
        max_manifest_size=top.take("max_manifest_size", top.size, 4 * 1024 * 1024),
        source=source,
    )
    top.finish()
    if cfg.cluster is not None and cfg.storage.s3 is None:
        raise top.error("cluster", "needs a store the nodes share (storage.s3)")
    return cfg


def load_config(path: str | Path) -> MirrorConfig:
    """Read and validate the configuration file at ``path``."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_config(text, str(path))
