"""Unit tests of configuration loading: defaults, and one clear line per mistake."""

import json
from pathlib import Path

import pytest

from mirror.config import ConfigError, load_config, parse_config

S3 = "{endpoint: 'http://127.0.0.1:9006', bucket: mirror, access_key: KEY, secret_key: SECRET}"

GOOD = """
listen: "tcp:5000:interface=127.0.0.1"
storage: {root: var/store}
upstreams:
  - registry: docker.io
    url: https://registry-1.docker.io/
    tag_ttl: 60
  - {registry: ghcr.io, url: "https://ghcr.io", username: u, password: p}
"""


def test_good_config_parses_with_defaults():
    """A valid file gives frozen objects with defaults filled in and URLs normalised."""
    cfg = parse_config(GOOD, "m.yaml")
    assert cfg.listen == ("tcp:5000:interface=127.0.0.1",)
    assert cfg.storage.root == Path("var/store")
    assert cfg.upstreams[0].url == "https://registry-1.docker.io"
    assert cfg.upstreams[0].tag_ttl == 60
    assert cfg.upstreams[1].tag_ttl == 300
    assert cfg.max_manifest_size == 4 * 1024 * 1024


def test_limits_section():
    """`limits` defaults to bounded connections; sizes take units; max_connections is
    left to the fd limit unless given."""
    from mirror.config import LimitsConfig

    cfg = parse_config(GOOD)
    assert cfg.limits == LimitsConfig(
        header_timeout=30.0, idle_timeout=120.0, max_header_size=65536, max_headers=100, max_connections=None
    )
    cfg = parse_config(
        GOOD + "limits: {header_timeout: 5, idle_timeout: 75, max_header_size: 32KiB, max_headers: 50, max_connections: 900}"
    )
    assert cfg.limits == LimitsConfig(5.0, 75.0, 32768, 50, 900)


def test_credentials_never_in_repr():
    """Upstream passwords stay out of reprs (and so out of logs)."""
    cfg = parse_config(GOOD)
    assert "'p'" not in repr(cfg) and "password" not in repr(cfg)


def test_s3_storage(tmp_path, monkeypatch):
    """An s3 store: keys with defaults, credentials from the file, a secret file or the
    environment, and never in a repr."""
    cfg = parse_config(f"listen: x\nstorage: {{s3: {S3}, spool: /var/spool/m}}")
    assert cfg.storage.root is None and cfg.storage.spool == Path("/var/spool/m")
    s3 = cfg.storage.s3
    assert (s3.endpoint, s3.bucket, s3.region, s3.prefix) == ("http://127.0.0.1:9006", "mirror", "us-east-1", "")
    assert "SECRET" not in repr(cfg) and "KEY" not in repr(cfg)
    assert (s3.redirect, s3.redirect_expiry) == (False, 600)
    redirecting = parse_config(f"listen: x\nstorage: {{s3: {S3[:-1]}, redirect: true, redirect_expiry: 60}}}}")
    assert (redirecting.storage.s3.redirect, redirecting.storage.s3.redirect_expiry) == (True, 60)
    with pytest.raises(ConfigError, match=r"storage.s3.redirect_expiry: expected seconds between 1 and 604800"):
        parse_config(f"listen: x\nstorage: {{s3: {S3[:-1]}, redirect_expiry: 999999999}}}}")
    assert cfg.storage.where == "storage.s3" and cfg.storage.location == "http://127.0.0.1:9006/mirror/"
    (tmp_path / "secret").write_text("from-file\n")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    secret = tmp_path / "secret"
    text = f"listen: x\nstorage: {{s3: {{endpoint: 'https://s3.x', bucket: b.c-d, prefix: a/b/, secret_key_file: {secret}}}}}"
    s3 = parse_config(text).storage.s3
    assert (s3.access_key, s3.secret_key, s3.prefix) == ("from-env", "from-file", "a/b/")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(ConfigError, match=r"storage.s3.access_key: missing value"):
        parse_config(text)


def test_cluster_section():
    """A cluster node: advertise URL and a secret of 16 characters or more, on an s3 store only."""
    base = f"listen: x\nstorage: {{s3: {S3}}}\n"
    cfg = parse_config(base + "cluster: {advertise: 'http://10.0.0.5:5000/', secret: 0123456789abcdef}")
    assert cfg.cluster.advertise == "http://10.0.0.5:5000" and cfg.cluster.fill_lease == 30
    assert "0123456789abcdef" not in repr(cfg)
    for text, expected in (
        ("cluster: {advertise: 'http://h:1', secret: short}", "m.yaml: cluster.secret: expected at least 16 characters"),
        ("cluster: {advertise: 'h:1', secret: 0123456789abcdef}", "m.yaml: cluster.advertise: expected the http://"),
        ("cluster: {advertise: 'http://h:1'}", "m.yaml: cluster.secret: missing value (or secret_file, or $MIRROR_CLUSTER"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(base + text, "m.yaml")
        assert str(info.value).startswith(expected)
    with pytest.raises(ConfigError, match=r"m.yaml: cluster: needs a store the nodes share \(storage.s3\)"):
        parse_config("listen: x\nstorage: {root: x}\ncluster: {advertise: 'http://h:1', secret: 0123456789abcdef}", "m.yaml")


def test_workers(monkeypatch):
    """workers: a whole number (default 1), or auto: one per core this process may run on;
    a cluster node runs one process."""
    base = "listen: x\nstorage: {root: x}\n"
    assert parse_config(base).workers == 1
    assert parse_config(base + "workers: 4").workers == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert parse_config(base + "workers: auto").workers == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(500)))
    assert parse_config(base + "workers: auto").workers == 64
    for wrong in ("0", "65", "2.5", "true", "many", "'2'"):
        with pytest.raises(ConfigError) as info:
            parse_config(base + f"workers: {wrong}", "m.yaml")
        assert str(info.value) == "m.yaml: workers: expected a whole number from 1 to 64, or auto (one per core)"
    cluster = f"listen: x\nstorage: {{s3: {S3}}}\ncluster: {{advertise: 'http://h:1', secret: 0123456789abcdef}}\n"
    assert parse_config(cluster + "workers: 1").workers == 1
    with pytest.raises(ConfigError, match=r"^m.yaml: workers: a cluster node runs one process \(workers: 1\)"):
        parse_config(cluster + "workers: 2", "m.yaml")


def test_sample_config_is_valid():
    """The shipped conf/mirror.yaml loads."""
    cfg = load_config(Path(__file__).parent.parent / "conf" / "mirror.yaml")
    assert cfg.upstreams[0].registry == "docker.io"
    assert cfg.upstreams[0].url == "https://registry-1.docker.io"


@pytest.mark.parametrize("name", ["private.yaml", "offline.yaml"])
def test_other_shipped_configs_are_valid(name):
    """Every config the README tells users to run loads."""
    load_config(Path(__file__).parent.parent / "conf" / name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("storage: {root: x}", "m.yaml: listen: missing value"),
        ("listen: x", "m.yaml: storage: missing value"),
        ("listen: x\nstorage: {root: x}\nbogus: 1", "m.yaml: bogus: unknown key"),
        ("listen: x\nstorage: {root: x, rot: 1}", "m.yaml: storage.rot: unknown key"),
        ("listen: 5", "m.yaml: listen: expected an endpoint string or a list of them"),
        ("listen: x\nstorage: {}", "m.yaml: storage: expected either root (a directory) or s3 (a bucket)"),
        (f"listen: x\nstorage: {{root: x, s3: {S3}}}", "m.yaml: storage: expected either root (a directory) or s3"),
        ("listen: x\nstorage: {root: x, spool: y}", "m.yaml: storage.spool: applies to an s3 store"),
        (
            "listen: x\nstorage: {s3: {endpoint: 'http://h:1/path', bucket: mirror, access_key: a, secret_key: s}}",
            "m.yaml: storage.s3.endpoint: expected an http:// or https:// URL without a path",
        ),
        (
            "listen: x\nstorage: {s3: {endpoint: 'http://h:1', bucket: My_Bucket, access_key: a, secret_key: s}}",
            "m.yaml: storage.s3.bucket: 'My_Bucket' is not a bucket name",
        ),
        (
            "listen: x\nstorage: {s3: {endpoint: 'http://h:1', bucket: mirror, access_key: a, secret_key: s, prefix: 'a/../'}}",
            "m.yaml: storage.s3.prefix: 'a/../'",
        ),
        (
            "listen: x\nstorage: {s3: {endpoint: 'http://h:1', bucket: mirror, access_key: a}}",
            "m.yaml: storage.s3.secret_key: missing value (or secret_key_file, or $AWS_SECRET_ACCESS_KEY)",
        ),
        (
            "listen: x\nstorage: {s3: {endpoint: 'http://h:1', bucket: b12, access_key: a, secret_key: s, secret_key_file: f}}",
            "m.yaml: storage.s3.secret_key_file: give secret_key or secret_key_file, not both",
        ),
        ("listen: x\nstorage: {root: x}\nupstreams: {}", "m.yaml: upstreams: expected a list"),
        (
            "listen: x\nstorage: {root: x}\nupstreams: [{registry: a.io, url: 'ftp://x'}]",
            "m.yaml: upstreams[0].url: expected an http:// or https:// URL",
        ),
        (
            "listen: x\nstorage: {root: x}\nupstreams: [{registry: a.io, url: 'http://x', tag_ttl: soon}]",
            "m.yaml: upstreams[0].tag_ttl: expected a number >= 0",
        ),
        (
            "listen: x\nstorage: {root: x}\nupstreams: [{registry: a.io, url: 'http://x', username: u}]",
            "m.yaml: upstreams[0]: username and password go together",
        ),
        (
            "listen: x\nstorage: {root: x}\nupstreams: [{registry: a.io, url: 'http://x'}, {registry: a.io, url: 'http://y'}]",
            "m.yaml: upstreams[1].registry: 'a.io' is listed twice",
        ),
        ("listen: x\nstorage: {root: x}\nupstreams: [{url: 'http://x'}]", "m.yaml: upstreams[0].registry: missing value"),
        (
            "listen: x\nstorage: {root: x}\nupstreams: [{registry: a.io, url: 'http://x', timeout: 0}]",
            "m.yaml: upstreams[0].timeout: expected a number > 0",
        ),
        (
            "listen: x\nstorage: {root: x, access_flush_interval: 0}",
            "m.yaml: storage.access_flush_interval: expected a number > 0",
        ),
        (
            "listen: x\nstorage: {root: x}\nauth: {htpasswd: h, realm: 'http://x/\"y'}",
            "m.yaml: auth.realm: expected an http:// or https:// URL",
        ),
        ("listen: x\nstorage: {root: x}\nauth: {htpasswd: h, realm: '/auth/token'}", "m.yaml: auth.realm: expected an http"),
        ("listen: x\nstorage: {root: x}\nlimits: {header_timeout: 0}", "m.yaml: limits.header_timeout: expected a number > 0"),
        ("listen: x\nstorage: {root: x}\nlimits: {max_headers: 2.5}", "m.yaml: limits.max_headers: expected a whole number > 0"),
        ("listen: x\nstorage: {root: x}\nlimits: {max_connections: 0}", "m.yaml: limits.max_connections: expected a whole"),
        ("listen: x\nstorage: {root: x}\nlimits: {max_header_size: 100}", "m.yaml: limits.max_header_size: expected at least"),
        ("listen: x\nstorage: {root: x}\nlimits: {keepalive: 5}", "m.yaml: limits.keepalive: unknown key"),
        ("listen: [", "m.yaml: line 1: invalid YAML"),
        ("- a\n- b", "m.yaml: (top level): expected a mapping"),
    ],
)
def test_errors_name_file_and_key(text, expected):
    """Each mistake stops loading with one line that names the file and the key."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "m.yaml")
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    """An unreadable file is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_config_error_is_one_line_with_every_problem_kept():
    """A ConfigError keeps every problem; its str() is the first one and how many more."""
    one = ConfigError("m.yaml: listen: missing value")
    assert one.problems == ("m.yaml: listen: missing value",) and str(one) == "m.yaml: listen: missing value"
    three = ConfigError("m.yaml: a: x", "m.yaml: b: y", "m.yaml: c: z")
    assert three.problems == ("m.yaml: a: x", "m.yaml: b: y", "m.yaml: c: z")
    assert str(three) == "m.yaml: a: x (and 2 more problems)"
    assert str(ConfigError("m.yaml: a: x", "m.yaml: b: y")) == "m.yaml: a: x (and 1 more problem)"


EVERYTHING_WRONG = """
listen: [tcp:5000, 5]
storage:
  s3:
    endpoint: 'http://h:1/path'
    bucket: My_Bucket
    access_key: a
    secret_key: s
    secret_key_file: /nonexistent/secret
    prefix: 'a/../'
    redirect_expiry: 999999999
    colour: blue
  access_flush_interval: 0
upstreams:
  - {registry: docker.io, url: 'ftp://x', tag_ttl: soon}
  - {registry: ghcr.io, url: 'https://ghcr.io', username: u}
  - {registry: quay.io, url: 'https://quay.io'}
  - {registry: quay.io, url: 'https://quay.example'}
  - {url: 'https://x'}
hosted: ['ok/*', 'Bad']
read_only: yes-please
gc: {interval: -1, low_watermark: 0.9, high_watermark: 0.5}
metrics: {}
auth:
  token: maybe
  access: [{repository: x, anonymous: [fly]}, {users: [pull]}]
  realm: /auth
cluster: {advertise: 'h:1', secret: short}
max_manifest_size: huge
bogus: 1
"""

EVERYTHING_WRONG_PROBLEMS = [
    "m.yaml: listen[1]: expected a non-empty string",
    "m.yaml: storage.s3.endpoint: expected an http:// or https:// URL without a path",
    "m.yaml: storage.s3.bucket: 'My_Bucket' is not a bucket name (3-63 of a-z 0-9 . -)",
    "m.yaml: storage.s3.secret_key_file: give secret_key or secret_key_file, not both",
    "m.yaml: storage.s3.prefix: 'a/../': expected path segments of a-z A-Z 0-9 . _ - ending in /",
    "m.yaml: storage.s3.colour: unknown key",
    "m.yaml: storage.s3.redirect_expiry: expected seconds between 1 and 604800 (S3's limit)",
    "m.yaml: storage.access_flush_interval: expected a number > 0",
    "m.yaml: upstreams[0].url: expected an http:// or https:// URL",
    "m.yaml: upstreams[0].tag_ttl: expected a number >= 0",
    "m.yaml: upstreams[1]: username and password go together",
    "m.yaml: upstreams[3].registry: 'quay.io' is listed twice",
    "m.yaml: upstreams[4].registry: missing value",
    "m.yaml: hosted[1]: 'Bad' is not a repository-name pattern (lower case, / and *)",
    "m.yaml: read_only: expected true or false",
    "m.yaml: gc.interval: expected a number >= 0",
    "m.yaml: gc.low_watermark: must be below high_watermark",
    "m.yaml: metrics.listen: missing value",
    "m.yaml: auth.htpasswd: missing value",
    "m.yaml: auth.token: expected true or false",
    "m.yaml: auth.access[0].anonymous: expected a list of actions from pull, push, delete",
    "m.yaml: auth.access[1].repository: missing value",
    "m.yaml: auth.realm: expected an http:// or https:// URL, got '/auth'",
    "m.yaml: cluster.advertise: expected the http:// or https:// URL other nodes reach this one at",
    "m.yaml: cluster.secret: expected at least 16 characters (it signs node-to-node requests)",
    "m.yaml: max_manifest_size: expected a size such as 50GiB, 500MB or a number of bytes",
    "m.yaml: bogus: unknown key",
]


def test_every_problem_in_the_file_is_listed():
    """A file wrong in every section gives every problem, one line each, and nothing more:
    no follow-on lines (storage is broken, so `cluster needs storage.s3` is not said)."""
    with pytest.raises(ConfigError) as info:
        parse_config(EVERYTHING_WRONG, "m.yaml")
    problems = info.value.problems
    assert sorted(problems) == sorted(EVERYTHING_WRONG_PROBLEMS)
    assert all("\n" not in p for p in problems)
    assert str(info.value) == f"{problems[0]} (and {len(problems) - 1} more problems)"


def test_checks_across_keys_in_different_sections_are_all_reported():
    """Each check across keys (credentials in pairs, unique registries, watermarks, a
    cluster on a shared store) is reported, not only the first."""
    text = """
listen: x
storage: {root: x}
upstreams:
  - {registry: a.io, url: 'http://x', password: p}
  - {registry: b.io, url: 'http://x'}
  - {registry: b.io, url: 'http://y'}
gc: {low_watermark: 0.9, high_watermark: 0.5}
cluster: {advertise: 'http://h:1', secret: 0123456789abcdef}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "m.yaml")
    assert info.value.problems == (
        "m.yaml: upstreams[0]: username and password go together",
        "m.yaml: upstreams[2].registry: 'b.io' is listed twice",
        "m.yaml: gc.low_watermark: must be below high_watermark",
        "m.yaml: cluster: needs a store the nodes share (storage.s3)",
    )


FS = "listen: x\nstorage: {root: x}\n"
ON_S3 = f"listen: x\nstorage: {{s3: {S3}}}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a bad username is not also "without a password"
        (FS + "upstreams: [{registry: a.io, url: 'http://x', username: 5, password: p}]", ["upstreams[0].username: expected a"]),
        # a bad low_watermark is not compared with high_watermark through its default
        (FS + "gc: {low_watermark: 2, high_watermark: 0.5}", ["gc.low_watermark: expected a fraction"]),
        # a bad s3 section is not also "neither root nor s3", nor is the spool out of place
        (
            "listen: x\nstorage: {s3: {bucket: b12, access_key: a, secret_key: s}, spool: y}",
            ["storage.s3.endpoint: missing value"],
        ),
        ("listen: x\nstorage: {root: 5}", ["storage.root: expected a non-empty string"]),
        # a missing store is not also "cluster needs storage.s3"
        ("listen: x\ncluster: {advertise: 'http://h:1', secret: 0123456789abcdef}", ["storage: missing value"]),
        # a bad secret is neither missing nor short
        (ON_S3 + "cluster: {advertise: 'http://h:1', secret: 5}", ["cluster.secret: expected a non-empty string"]),
        (
            ON_S3 + "cluster: {advertise: 'http://h:1', secret: x, secret_file: /nonexistent}",
            ["cluster.secret_file: give secret or secret_file, not both"],
        ),
        # every bad item of a list is reported
        ("listen: [5, x, '']\nstorage: {root: x}", ["listen[0]: expected a non-empty", "listen[2]: expected a non-empty"]),
        (
            FS + "upstreams: [5, {registry: a.io, url: 'http://x'}, []]",
            ["upstreams[0]: expected a mapping", "upstreams[2]: expected a mapping"],
        ),
        (FS + "auth: {htpasswd: h, access: 5}", ["auth.access: expected a list of rules"]),
    ],
)
def test_one_mistake_is_one_line(text, expected, monkeypatch):
    """A value with a problem is set aside: what depends on it is not checked, so that one
    mistake gives one line (and independent mistakes one line each)."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "m.yaml")
    problems = info.value.problems
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(f"m.yaml: {start}"), problems


FULL = {
    "listen": ["tcp:5000"],
    "storage": {"s3": {"endpoint": "http://h:1", "bucket": "mirror", "access_key": "a", "secret_key": "s"}, "spool": "/s"},
    "upstreams": [{"registry": "a.io", "url": "http://x", "username": "u", "password": "p", "tag_ttl": 1}],
    "hosted": ["myorg/*"],
    "gc": {"max_size": "1GiB", "high_watermark": 0.9, "low_watermark": 0.8},
    "metrics": {"listen": "tcp:9000"},
    "auth": {"htpasswd": "h", "access": [{"repository": "*", "anonymous": ["pull"]}], "realm": "http://r/token"},
    "cluster": {"advertise": "http://h:1", "secret": "0123456789abcdef"},
    "workers": 1,
}


def _paths(value, path=()):
    """Every key path and list index in a parsed YAML value."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield (*path, key)
        yield from _paths(item, (*path, key))


def _replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(copy[path[0]], path[1:], new)
    return copy


def test_any_wrong_value_anywhere_is_a_config_error_never_a_crash(monkeypatch):
    """Every key of a full config given every wrong kind of value (so that sections and
    the checks across them meet values left out by earlier problems) gives a ConfigError
    of one-line problems, never another exception."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("MIRROR_CLUSTER_SECRET", raising=False)
    parse_config(json.dumps(FULL), "m.yaml")  # JSON is YAML
    for path in _paths(FULL):
        for wrong in (None, 0, -1, True, "", "x", [], [1], {}, {"k": 1}):
            try:
                parse_config(json.dumps(_replaced(FULL, path, wrong)), "m.yaml")
            except ConfigError as e:
                assert all(p.startswith("m.yaml: ") and "\n" not in p for p in e.problems), (path, wrong, e.problems)
