"""Security regressions through the real service (issue 18, "a digest is not a key", and the
auth hardening that came with it).

Everything goes over real TCP: the mirror in-process on 127.0.0.1 (``make_mirror``) in front
of the fake upstream (which, like a real registry, serves a blob only through a repository
holding it), or the real ``twistd mirror`` child process (``start_mirror``) where its own
log file, the access log included, or a SIGHUP reload is what is checked.

Each test states the hole it keeps closed:

* a private hosted layer, or a hosted manifest asked as a blob, is not readable through a
  name that does not hold it — the answer is the one for a digest stored nowhere;
* a cross-repository mount needs a ``from`` the caller may pull that holds the digest;
* malformed and over-long Basic credentials are a clean 401; bcrypt's 72-byte limit is
  honoured as htpasswd hashes;
* an anonymous token is no login; credentials in the token endpoint's URL are refused and
  never logged; a crafted ``Host`` cannot inject challenge parameters;
* forged, unsigned, expired and future tokens, scope escalation and ``..`` names are refused;
* removing a user or narrowing a rule (SIGHUP) revokes tokens already issued;
* access rules and ``_catalog`` match the repository reached, whatever name reached it;
* no password, Basic credential or token ever reaches the log.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import time
from pathlib import Path

import bcrypt
import jwt
import pytest
import pytest_twisted
import yaml

import treq

from mirror.config import ACTIONS, AccessRule, AuthConfig
from mirror.web.auth import Authenticator
from tests.fake_upstream import digest_of
from tests.integration.test_auth import error, log_text  # noqa: F401  (log_text: a fixture)
from tests.integration.test_client_auth import PASSWORD as SECRET
from tests.integration.test_client_auth import USER, WRONG, assert_no_secret_in_log
from tests.integration.test_hosted import push_blob, push_image
from tests.integration.test_private_registry import RELOADED, api, error_of, reload, start_mirror  # noqa: F401
from tests.test_web_auth import PASSWORD, basic

pytestmark = pytest.mark.integration

ALL = frozenset(ACTIONS)
PULL = frozenset({"pull"})
NONE = frozenset()
#: A password longer than bcrypt reads (100 bytes); its user's hash is of the first 72 bytes.
LONG = "L" * 60 + secrets.token_hex(20)
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
#: One parameter of a challenge: name="quoted value" (RFC 9110 quoted-string).
PARAM = re.compile(r'([A-Za-z_]+)="((?:[^"\\]|\\.)*)"')


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """bcrypt entries as ``htpasswd -B`` writes them: of the password's first 72 bytes (bcrypt
    reads no more, and Python's bcrypt 5 refuses longer input)."""
    path.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode()[:72], bcrypt.gensalt(rounds=4)).decode()}\n"
                            for u, p in users.items()))
    return path


#: A user name one byte over the limit.
LONG_USER = "u" * 257


@pytest.fixture
def accounts(tmp_path) -> Path:
    """alice and bob (PASSWORD), ``longpw`` whose password is 100 bytes long, and two entries no
    login may use whatever the file says: a 257-byte user name and an empty one (PASSWORD):
    with them there, only the shape checks make those credentials fail."""
    users = {"alice": PASSWORD, "bob": PASSWORD, "longpw": LONG, LONG_USER: PASSWORD, "": PASSWORD}
    return write_htpasswd(tmp_path / "htpasswd", users)


def b64(raw: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class As:
    """A client of a mirror (in-process or a process: anything with ``url``) that sends
    ``headers`` with every request; what ``push_image`` takes."""

    def __init__(self, m, headers: dict[str, str] | None = None) -> None:
        self.url = m.url
        self.headers = headers or {}

    def get(self, path: str, **kw):
        headers = {**self.headers, **kw.pop("headers", {})}
        return treq.request(kw.pop("method", "GET"), self.url + path, headers=headers, persistent=False, **kw)


async def reply(r) -> tuple[int, dict[str, list[str]], bytes]:
    """Status, headers (without Date and Content-Length) and body, digests blanked: two answers
    that differ only in the digest they name compare equal."""
    body = DIGEST.sub("<digest>", (await r.content()).decode("latin-1")).encode("latin-1")
    headers = {k.decode().lower(): [DIGEST.sub("<digest>", v.decode("latin-1")) for v in vs]
               for k, vs in r.headers.getAllRawHeaders() if k.lower() not in (b"date", b"content-length")}
    return r.code, headers, body


def challenge(value: str) -> dict[str, str]:
    """The parameters of a ``WWW-Authenticate`` value, asserting that every one is quoted and
    nothing else is in it (an injected ``foo=bar`` or a stray quote fails)."""
    scheme, _, rest = value.partition(" ")
    assert scheme in ("Basic", "Bearer"), value
    params = PARAM.findall(rest)
    assert ",".join(f'{k}="{v}"' for k, v in params) == rest, f"unparsable or unquoted challenge: {value!r}"
    return dict(params)


async def token(m, scope: str | None = None, headers: dict[str, str] | None = None) -> str:
    """A token from ``m``'s endpoint (anonymous unless ``headers`` log in)."""
    query = "?service=mirror" + (f"&scope={scope}" if scope else "")
    r = await As(m, headers).get(f"/auth/token{query}")
    body = await r.content()
    assert r.code == 200, body
    return json.loads(body)["token"]


def granted(tok: str) -> list[dict]:
    return jwt.decode(tok, options={"verify_signature": False})["access"]


async def manifest_layer(m, repo: str, tag: str, headers: dict[str, str]) -> str:
    r = await As(m, headers).get(f"/v2/{repo}/manifests/{tag}")
    assert r.code == 200
    return json.loads(await r.content())["layers"][0]["digest"]


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text and "log_failure" not in text and "Unhandled" not in text, text[-3000:]


def upstream_with_images(fake, *names: str) -> None:
    for name in names:
        fake.add_image(name, "latest", os.urandom(300), json.dumps({"name": name}).encode())


# --------------------------------------------------------------------------
# 1. a digest is not a key
# --------------------------------------------------------------------------

PRIVATE_RULES = (
    AccessRule("team/*", anonymous=NONE, users=ALL),
    AccessRule("library/*", anonymous=PULL, users=PULL),
)


@pytest_twisted.ensureDeferred
async def test_private_layer_is_not_readable_through_another_name(fake_upstream, make_mirror, accounts):
    """Guards the issue-18 hole: a layer pushed to the private ``team/secret`` (users only) was
    served to anyone who knew its digest through any mirrored name (``library/*`` is
    anonymously pullable), because the store is content-addressed.  Anonymous GET and HEAD of
    the layer, and of the manifest's digest as a blob, through ``library/doesnotexist`` and
    ``docker.io/library/doesnotexist`` must be 404 ``BLOB_UNKNOWN``, identical (status, headers,
    body; digests blanked) to a digest stored nowhere; through the hosted ``team/other`` the
    manifest digest is no blob either."""
    m = make_mirror(fake_upstream.url, hosted=("team/*",), auth=AuthConfig(htpasswd=accounts, rules=PRIVATE_RULES))
    alice = basic("alice", PASSWORD)
    manifest, _ = await push_image(As(m, alice), "team/secret", "1")
    layer = await manifest_layer(m, "team/secret", "1", alice)
    r = await As(m, alice).get(f"/v2/team/secret/blobs/{layer}")
    assert r.code == 200 and digest_of(await r.content()) == layer
    r = await As(m).get(f"/v2/team/secret/blobs/{layer}")  # the owner's name is closed to anonymous
    assert r.code == 401
    await r.content()

    nowhere = digest_of(os.urandom(64))
    for name in ("library/doesnotexist", "docker.io/library/doesnotexist"):
        for method in ("GET", "HEAD"):
            absent = await reply(await As(m).get(f"/v2/{name}/blobs/{nowhere}", method=method))
            assert absent[0] == 404
            if method == "GET":
                assert json.loads(absent[2])["errors"][0]["code"] == "BLOB_UNKNOWN"
            for digest in (layer, manifest):
                answer = await reply(await As(m).get(f"/v2/{name}/blobs/{digest}", method=method))
                assert answer == absent, (name, method, digest)
    # a hosted manifest asked as a blob through another hosted name, by a user: unknown
    r = await As(m, alice).get(f"/v2/team/other/blobs/{manifest}")
    assert r.code == 404 and (await error(r))["code"] == "BLOB_UNKNOWN"
    r = await As(m, alice).get(f"/v2/team/other/blobs/{layer}", method="HEAD")
    assert r.code == 404
    await r.content()


MOUNT_RULES = (
    AccessRule("team/*", anonymous=NONE, users=ALL),
    AccessRule("dropbox/*", anonymous=NONE, users=frozenset({"push"})),  # write-only: users may not pull
    AccessRule("library/*", anonymous=PULL, users=PULL),
)


@pytest_twisted.ensureDeferred
async def test_mount_needs_a_pullable_source_that_holds_the_blob(fake_upstream, make_mirror, accounts):
    """Guards mount as a read primitive: ``POST .../blobs/uploads/?mount=<digest>&from=<repo>``
    used to link any stored digest into the caller's repository.  From ``library/hello``
    (mirrored, readable, does not hold the digest), from the write-only ``dropbox/in`` (holds
    it, alice may not pull it) and with no ``from`` at all, the answer is 202 with an upload
    session and ``team/b`` still does not serve the layer; from ``team/secret`` (holds it,
    alice may pull it) it is 201 and the layer is served through ``team/b``."""
    upstream_with_images(fake_upstream, "library/hello")
    m = make_mirror(fake_upstream.url, hosted=("team/*", "dropbox/*"), auth=AuthConfig(htpasswd=accounts, rules=MOUNT_RULES))
    alice = As(m, basic("alice", PASSWORD))
    await push_image(alice, "team/secret", "1")
    layer = await manifest_layer(m, "team/secret", "1", alice.headers)
    dropped = await push_blob(alice, "dropbox/in", os.urandom(500))
    r = await alice.get(f"/v2/dropbox/in/blobs/{dropped}")
    assert r.code == 403  # really not pullable by alice
    await r.content()

    for digest, query in (
        (layer, "&from=library/hello"),
        (layer, "&from=docker.io/library/hello"),
        (layer, ""),
        (dropped, "&from=dropbox/in"),
    ):
        r = await alice.get(f"/v2/team/b/blobs/uploads/?mount={digest}{query}", method="POST")
        assert r.code == 202, (query, await r.content())
        assert r.headers.getRawHeaders("location")[0].startswith("/v2/team/b/blobs/uploads/")
        await r.content()
        r = await alice.get(f"/v2/team/b/blobs/{digest}")
        assert r.code == 404 and (await error(r))["code"] == "BLOB_UNKNOWN", query
    assert fake_upstream.count("HEAD", f"/v2/library/hello/blobs/{layer}") >= 1  # its upstream was asked, and said no

    r = await alice.get(f"/v2/team/b/blobs/uploads/?mount={layer}&from=team/secret", method="POST")
    assert r.code == 201
    assert r.headers.getRawHeaders("location") == [f"/v2/team/b/blobs/{layer}"]
    await r.content()
    r = await alice.get(f"/v2/team/b/blobs/{layer}")
    assert r.code == 200 and digest_of(await r.content()) == layer


# --------------------------------------------------------------------------
# 2. credentials
# --------------------------------------------------------------------------

OPEN_LIBRARY = (AccessRule("library/*", anonymous=PULL, users=PULL), AccessRule("*", anonymous=NONE, users=ALL))

MALFORMED = {
    "user over 256 bytes": b64(f"{LONG_USER}:{PASSWORD}".encode()),
    "password over 1024 bytes": b64(b"alice:" + b"p" * 1025),
    "long password over 1024 bytes": b64(b"longpw:" + (LONG + "x" * 1000).encode()),
    "empty user, a password": b64(b":" + PASSWORD.encode()),
    "user, empty password": b64(b"alice:"),
    "not UTF-8": b64(b"\xff\xfealice:" + PASSWORD.encode()),
    "not base64": {"Authorization": "Basic !!not*base64!!"},
    "base64 with junk": {"Authorization": "Basic " + base64.b64encode(b"alice:x").decode() + "$"},
    "no colon": b64(b"alice" + PASSWORD.encode()),
    "huge": {"Authorization": "Basic " + "QUFB" * 4000},
}


@pytest_twisted.ensureDeferred
async def test_malformed_basic_credentials_are_a_clean_401(fake_upstream, make_mirror, accounts, log_text):  # noqa: F811
    """Guards the Basic parser: credentials that cannot be right used to pass as anonymous (not
    base64, not UTF-8, no colon, an empty user) or be taken at face value (a 257-byte user
    name that is in the file logged in; so would a password over 1024 bytes whose first 72
    match, as bcrypt reads no more).  They must be 401 ``UNAUTHORIZED``
    with the Basic challenge and a JSON body — even on ``library/hello``, which anonymous
    clients may pull — and nothing is logged as a failure.  ``Basic Og==`` (what skopeo sends
    with no credentials) stays anonymous: the same pull is 200."""
    upstream_with_images(fake_upstream, "library/hello")
    m = make_mirror(fake_upstream.url, auth=AuthConfig(htpasswd=accounts, rules=OPEN_LIBRARY))
    for path in ("/v2/", "/v2/library/hello/manifests/latest"):
        for what, headers in MALFORMED.items():
            r = await As(m, headers).get(path)
            assert r.code == 401, (what, path)
            assert r.headers.getRawHeaders("www-authenticate") == ['Basic realm="mirror"'], what
            assert r.headers.getRawHeaders("content-type") == ["application/json"]
            assert (await error(r))["code"] == "UNAUTHORIZED", what
    r = await As(m, {"Authorization": "Basic Og=="}).get("/v2/library/hello/manifests/latest")
    assert r.code == 200
    await r.content()
    r = await As(m, {"Authorization": "Basic Og=="}).get("/v2/")  # anonymous: no login
    assert r.code == 401
    await r.content()
    assert_no_traceback(log_text())
    assert PASSWORD not in log_text()


@pytest_twisted.ensureDeferred
async def test_malformed_credentials_at_the_token_endpoint_are_a_clean_401(make_mirror, accounts, log_text):  # noqa: F811
    """The same malformed Basic credentials at ``GET``/``POST /auth/token``, and malformed
    password-grant forms (empty user, over-long password), are 401 with a Bearer challenge,
    never a token and never a traceback."""
    m = make_mirror(None, hosted=("*",), auth=AuthConfig(htpasswd=accounts, token=True, rules=OPEN_LIBRARY))
    for what, headers in MALFORMED.items():
        for method in ("GET", "POST"):
            r = await As(m, headers).get("/auth/token?service=mirror&scope=repository:team/x:pull", method=method)
            assert r.code == 401, (what, method)
            assert challenge(r.headers.getRawHeaders("www-authenticate")[0])["realm"] == f"{m.url}/auth/token"
            assert (await error(r))["code"] == "UNAUTHORIZED"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for username, password in (("", PASSWORD), ("alice", ""), ("alice", "p" * 1025), ("longpw", LONG + "x" * 1000),
                               (LONG_USER, PASSWORD)):
        body = f"grant_type=password&username={username}&password={password.replace(' ', '+')}&service=mirror"
        r = await As(m, form).get("/auth/token", method="POST", data=body.encode())
        assert r.code == 401, (username[:10], len(password))
        assert (await error(r))["code"] == "UNAUTHORIZED"
    assert_no_traceback(log_text())


@pytest_twisted.ensureDeferred
async def test_password_longer_than_72_bytes_logs_in_as_htpasswd_hashed_it(make_mirror, accounts):
    """Guards against a lock-out and a crash: Python's bcrypt 5 raises on more than 72 bytes,
    and htpasswd hashes only the first 72.  The user whose hash was made from the first 72
    bytes of a 100-byte password logs in with the whole password — Basic, ``GET /auth/token``
    with Basic, and the POST password grant — while 71 of those bytes are refused."""
    basic_mode = make_mirror(None, hosted=("*",), auth=AuthConfig(htpasswd=accounts, rules=OPEN_LIBRARY))
    r = await As(basic_mode, basic("longpw", LONG)).get("/v2/")
    assert r.code == 200
    await r.content()
    r = await As(basic_mode, basic("longpw", LONG[:71])).get("/v2/")
    assert r.code == 401
    await r.content()

    token_mode = make_mirror(None, hosted=("*",), auth=AuthConfig(htpasswd=accounts, token=True, rules=OPEN_LIBRARY))
    tok = await token(token_mode, "repository:team/x:pull,push", basic("longpw", LONG))
    assert jwt.decode(tok, options={"verify_signature": False})["sub"] == "longpw"
    assert granted(tok) == [{"type": "repository", "name": "team/x", "actions": ["pull", "push"]}]
    r = await As(token_mode, bearer(tok)).get("/v2/team/x/blobs/uploads/", method="POST")
    assert r.code == 202
    await r.content()
    r = await As(token_mode, {"Content-Type": "application/x-www-form-urlencoded"}).get(
        "/auth/token", method="POST", data=f"grant_type=password&username=longpw&password={LONG}&service=mirror".encode())
    assert r.code == 200 and "access_token" in json.loads(await r.content())
    r = await As(token_mode, basic("longpw", LONG[:71])).get("/auth/token?service=mirror")
    assert r.code == 401
    await r.content()


@pytest_twisted.ensureDeferred
async def test_anonymous_token_is_no_login(make_mirror, accounts):
    """Guards ``GET /v2/`` and ``_catalog`` (login required): a token fetched without
    credentials (``sub`` empty) used to count as a logged-in client, so anyone could list
    every repository.  With it both are 401; alice's token opens both."""
    m = make_mirror(None, hosted=("*",), auth=AuthConfig(htpasswd=accounts, token=True, rules=OPEN_LIBRARY))
    anonymous = await token(m, "registry:catalog:*")
    assert jwt.decode(anonymous, options={"verify_signature": False})["sub"] == ""
    alice = await token(m, "registry:catalog:*", basic("alice", PASSWORD))
    for path in ("/v2/", "/v2/_catalog"):
        r = await As(m, bearer(anonymous)).get(path)
        assert r.code == 401, path
        assert (await error(r))["code"] == "UNAUTHORIZED"
        r = await As(m, bearer(alice)).get(path)
        assert r.code == 200, path
        await r.content()


def test_credentials_in_the_token_url_are_refused_and_never_logged(start_mirror, workdir):  # noqa: F811
    """Guards the access log: ``/auth/token?...&password=`` (and ``refresh_token``,
    ``access_token``, ``client_secret``; GET and POST) was accepted, and the URL, secret
    included, went to the log.  In the real ``twistd mirror`` each is 400, also as a POST
    whose form body is right; the form body and the Basic header still work; the process
    log never holds the secret, and its access lines show ``=REDACTED``."""
    htpasswd = write_htpasswd(workdir / "htpasswd", {USER: SECRET})
    m = start_mirror([], hosted=["*"], auth={"htpasswd": str(htpasswd), "token": True})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    good_form = f"grant_type=password&username={USER}&password={SECRET}&service=mirror".encode()
    scope = "service=mirror&scope=repository:team/x:pull"
    for method, query, data in (
        ("GET", f"{scope}&username={USER}&password={SECRET}", None),
        ("GET", f"password={SECRET}&{scope}", None),
        ("GET", f"{scope}&pass%77ord={SECRET}", None),
        ("GET", f"{scope}&PassWord={SECRET}", None),
        ("GET", f"{scope}&refresh_token={SECRET}", None),
        ("GET", f"{scope}&access_token={SECRET}", None),
        ("GET", f"{scope}&client_secret={SECRET}", None),
        ("POST", f"password={SECRET}", good_form),
        ("POST", f"{scope}&refresh_token={SECRET}", good_form),
    ):
        status, _, body = api(m, method, f"/auth/token?{query}", headers=form if data else None, data=data)
        assert status == 400, (method, query.replace(SECRET, "<secret>"), body)
        code, message = error_of(body)
        assert code == "UNSUPPORTED" and "URL" in message and SECRET not in message
    status, _, body = api(m, "GET", f"/auth/token?{scope}&password={SECRET}",
                          headers={"Authorization": "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()})
    assert status == 400  # refused even when the header would log in
    status, _, body = api(m, "POST", f"/auth/token?{scope}", headers=form, data=good_form)
    assert status == 200 and json.loads(body)["token"]
    status, _, body = api(m, "GET", f"/auth/token?{scope}",
                          headers={"Authorization": "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()})
    assert status == 200
    m.stop()
    log = m.log_text()
    assert SECRET not in log
    assert "password=REDACTED" in log and "client_secret=REDACTED" in log  # the access lines were written
    assert_no_secret_in_log(m)


# --------------------------------------------------------------------------
# 3. challenges
# --------------------------------------------------------------------------

CRAFTED_HOSTS = ('evil",foo="bar', 'evil" foo="bar', "evil,foo=bar", "a b", "evil.example/x", "evil\\")


@pytest_twisted.ensureDeferred
async def test_crafted_host_cannot_inject_challenge_parameters(make_mirror, accounts):
    """Guards the Bearer challenge: its realm was built from the raw ``Host`` header, so
    ``Host: evil",foo="bar`` added a parameter (or pointed clients at another realm).  A
    Host that is not a plain host[:port] is 400 wherever a challenge would be sent (and at
    the token endpoint on a failed login), with no ``WWW-Authenticate``; a plain one
    (name:port or [IPv6]:port) gives ``http://<Host>/auth/token``; every value is quoted."""
    m = make_mirror(None, hosted=("*",), auth=AuthConfig(htpasswd=accounts, token=True, rules=OPEN_LIBRARY))
    for host in CRAFTED_HOSTS:
        for path, headers in (
            ("/v2/", {}),
            ("/v2/team/x/blobs/uploads/", {}),
            ("/auth/token?service=mirror", basic("alice", "wrong")),
        ):
            method = "POST" if "uploads" in path else "GET"
            r = await As(m, {**headers, "Host": host}).get(path, method=method)
            raw = await r.content()
            assert r.code == 400, (host, path, r.code, raw)
            assert r.headers.getRawHeaders("www-authenticate") is None
            assert b"foo" not in raw
    for host in ("registry.example:5000", "[::1]:5000", "localhost"):
        r = await As(m, {"Host": host}).get("/v2/team/x/blobs/uploads/", method="POST")
        assert r.code == 401
        params = challenge(r.headers.getRawHeaders("www-authenticate")[0])
        assert params == {"realm": f"http://{host}/auth/token", "service": "mirror", "scope": "repository:team/x:pull,push"}
        await r.content()


@pytest_twisted.ensureDeferred
async def test_configured_realm_is_used_verbatim(make_mirror, accounts):
    """With ``auth.realm`` set, the challenge's realm is exactly that URL, whatever ``Host``
    the client sends (a crafted one included: nothing from it reaches the header)."""
    realm = "https://auth.example.com:8443/v2/token"
    m = make_mirror(None, hosted=("*",), auth=AuthConfig(htpasswd=accounts, token=True, rules=OPEN_LIBRARY, realm=realm))
    for host in ('evil",foo="bar', "registry.example:5000", None):
        r = await As(m, {"Host": host} if host is not None else {}).get("/v2/team/x/tags/list")
        assert r.code == 401
        assert challenge(r.headers.getRawHeaders("www-authenticate")[0]) == {
            "realm": realm, "service": "mirror", "scope": "repository:team/x:pull"}
        await r.content()


# --------------------------------------------------------------------------
# 4. tokens
# --------------------------------------------------------------------------

TOKEN_RULES = (
    AccessRule("library/*", anonymous=PULL, users=PULL),
    AccessRule("team/*", anonymous=NONE, users=ALL),
)


def mint(key: bytes | None, algorithm: str = "HS256", **changes) -> str:
    """A token as the mirror issues them (alice, push on team/a), with ``changes``."""
    now = int(time.time())
    claims = {
        "iss": "mirror", "sub": "alice", "aud": "mirror", "iat": now, "nbf": now - 5, "exp": now + 300,
        "jti": secrets.token_hex(12),
        "access": [{"type": "repository", "name": "team/a", "actions": ["pull", "push"]}],
        **changes,
    }
    return jwt.encode(claims, key, algorithm=algorithm)


@pytest.fixture
def token_mirror(fake_upstream, make_mirror, accounts, tmp_path):
    """A token-mode mirror whose signing key (``auth.key_file``) the test knows."""
    key = secrets.token_bytes(64)  # long enough for HS512 too (the "wrong algorithm" case)
    (tmp_path / "key").write_bytes(key)
    auth = AuthConfig(htpasswd=accounts, token=True, rules=TOKEN_RULES, key_file=tmp_path / "key")
    return make_mirror(fake_upstream.url, hosted=("team/*",), auth=auth), key


@pytest_twisted.ensureDeferred
async def test_forged_unsigned_expired_and_future_tokens_are_refused(token_mirror):
    """Guards token validation: a token signed with another key, an ``alg: none`` token, an
    expired one, one issued more than 5 s in the future, one for another audience or
    issuer, and one for a user not in htpasswd are each 401 ``invalid_token`` — while the
    same claims correctly signed (``iat`` 3 s ahead: within the clock skew) push."""
    m, key = token_mirror
    now = int(time.time())
    push = "/v2/team/a/blobs/uploads/"
    for good in (mint(key), mint(key, iat=now + 3)):
        r = await As(m, bearer(good)).get(push, method="POST")
        assert r.code == 202
        await r.content()
    bad = {
        "other key": mint(secrets.token_bytes(64)),
        "alg none": mint(None, "none"),
        "alg none, signature kept": mint(None, "none") + mint(key).rsplit(".", 1)[1],
        "HS512 with the key": mint(key, "HS512"),
        "expired": mint(key, iat=now - 400, nbf=now - 405, exp=now - 60),
        "issued 60 s ahead": mint(key, iat=now + 60),
        "not yet valid": mint(key, iat=now, nbf=now + 120, exp=now + 400),
        "other audience": mint(key, aud="elsewhere"),
        "other issuer": mint(key, iss="elsewhere"),
        "unknown user": mint(key, sub="mallory"),
        "no exp": jwt.encode({"iss": "mirror", "sub": "alice", "aud": "mirror", "iat": now, "access": []}, key, "HS256"),
        "garbage": "not.a.token",
    }
    for what, tok in bad.items():
        r = await As(m, bearer(tok)).get(push, method="POST")
        assert r.code == 401, what
        params = challenge(r.headers.getRawHeaders("www-authenticate")[0])
        assert params.get("error") == "invalid_token", what
        assert (await error(r))["code"] == "UNAUTHORIZED"


@pytest_twisted.ensureDeferred
async def test_tokens_grant_no_more_than_they_name_and_the_rules_allow(token_mirror):
    """Guards scope escalation: alice's token for ``team/a`` does not push (or pull) ``team/b``
    (401 ``insufficient_scope``); an anonymous token asking push on ``library/x`` is granted
    pull only, and asking for ``team/a`` nothing; a correctly signed token naming push for an
    anonymous subject is refused, because the rules are applied again on every use."""
    m, key = token_mirror
    alice = await token(m, "repository:team/a:pull,push", basic("alice", PASSWORD))
    r = await As(m, bearer(alice)).get("/v2/team/a/blobs/uploads/", method="POST")
    assert r.code == 202
    await r.content()
    for method, path in (("POST", "/v2/team/b/blobs/uploads/"), ("GET", "/v2/team/b/tags/list")):
        r = await As(m, bearer(alice)).get(path, method=method)
        assert r.code == 401, path
        assert challenge(r.headers.getRawHeaders("www-authenticate")[0])["error"] == "insufficient_scope"
        await r.content()

    anonymous = await token(m, "repository:library/x:pull,push,delete")
    assert granted(anonymous) == [{"type": "repository", "name": "library/x", "actions": ["pull"]}]
    anonymous = await token(m, "repository:team/a:*")
    assert granted(anonymous) == [{"type": "repository", "name": "team/a", "actions": []}]
    r = await As(m, bearer(anonymous)).get("/v2/team/a/blobs/uploads/", method="POST")
    assert r.code == 401
    await r.content()
    r = await As(m, bearer(mint(key, sub=""))).get("/v2/team/a/blobs/uploads/", method="POST")
    assert r.code == 401  # signed by the mirror's key, but anonymous may not push team/*
    await r.content()


TRAVERSALS = [
    ("GET", "/v2/../x/manifests/latest"),
    ("GET", "/v2/a/../../b/manifests/x"),
    ("GET", "/v2/%2e%2e/x/manifests/latest"),
    ("GET", "/v2/library/%2e%2e/team/secret/manifests/1"),
    ("GET", "/v2/library/../team/secret/manifests/1"),
    ("GET", "/v2/library/..%2fteam%2fsecret/manifests/1"),
    ("GET", "/v2/library/hello/manifests/..%2f..%2fx"),
    ("GET", "/v2/library/hello/manifests/.."),
    ("GET", "/v2/library/hello/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd"),
    ("GET", "/v2/library/./hello/tags/list"),
    ("GET", "/v2/docker.io/../team/secret/tags/list"),
    ("HEAD", "/v2/team/../../etc/blobs/sha256:" + "0" * 64),
    ("POST", "/v2/team/../../x/blobs/uploads/"),
    ("PUT", "/v2/team/a/../../b/manifests/x"),
    ("DELETE", "/v2/team/%2e%2e/secret/manifests/1"),
]


@pytest_twisted.ensureDeferred
async def test_traversal_names_are_refused(token_mirror, fake_upstream):
    """Guards path handling: ``..``, ``.`` and ``%2e%2e`` in a repository name, reference or
    digest are 4xx with a registry error body (never 200, never 500) — anonymously and as
    alice — and never reach the upstream; ``library/../team/secret`` does not read the
    private ``team/secret`` under the anonymous ``library/*`` rule."""
    upstream_with_images(fake_upstream, "library/hello")
    m, _ = token_mirror
    await push_image(As(m, basic("alice", PASSWORD)), "team/secret", "1")
    for headers in ({}, basic("alice", PASSWORD)):
        for method, path in TRAVERSALS:
            r = await As(m, headers).get(path, method=method, data=b"{}" if method == "PUT" else None)
            raw = await r.content()
            assert 400 <= r.code < 500, (method, path, r.code, raw)
            if method != "HEAD" and raw:
                assert json.loads(raw)["errors"][0]["code"] not in ("UNKNOWN", None), (path, raw)
    assert not [p for (_, p) in fake_upstream.requests if ".." in p or "%2e" in p.lower() or "/./" in p]


# --------------------------------------------------------------------------
# 5. revocation (the real process, SIGHUP)
# --------------------------------------------------------------------------

def test_removed_user_and_narrowed_rule_revoke_tokens_on_sighup(start_mirror, workdir):  # noqa: F811
    """Guards revocation: tokens used to be checked against their own claims only, so a user
    removed from htpasswd (or a rule narrowed) kept their access until the token expired.
    In the real ``twistd mirror`` with ``auth.key_file`` (a shared key, which survives the
    reload): after alice is removed from htpasswd and SIGHUP, her token is 401
    ``invalid_token`` and she gets no new one, while bob's token (same key) still pushes;
    after ``team/*`` is narrowed to pull for users and SIGHUP, bob's token no longer pushes
    (401 ``insufficient_scope``) but still pulls.  No secret reaches the log."""
    bob_pw = f"Bob-{secrets.token_hex(12)}"
    htpasswd = write_htpasswd(workdir / "htpasswd", {USER: SECRET, "bob": bob_pw})
    (workdir / "key").write_bytes(secrets.token_bytes(32))
    auth = {"htpasswd": str(htpasswd), "token": True, "key_file": str(workdir / "key"),
            "access": [{"repository": "team/*", "users": ["pull", "push"]}]}
    m = start_mirror([], hosted=["team/*"], auth=auth)
    config = yaml.safe_load(m.config_path.read_text())

    def get_token(user: str, password: str) -> tuple[int, str]:
        creds = base64.b64encode(f"{user}:{password}".encode()).decode()
        status, _, body = api(m, "GET", "/auth/token?service=mirror&scope=repository:team/app:pull,push",
                              headers={"Authorization": f"Basic {creds}"})
        return status, json.loads(body).get("token", "") if status == 200 else ""

    def push(tok: str, data: bytes) -> tuple[int, dict[str, str]]:
        status, headers, _ = api(m, "POST", f"/v2/team/app/blobs/uploads/?digest={digest_of(data)}",
                                 headers=bearer(tok), data=data)
        return status, headers

    _, alice = get_token(USER, SECRET)
    _, bob = get_token("bob", bob_pw)
    assert push(alice, b"alice-1")[0] == 201 and push(bob, b"bob-1")[0] == 201

    write_htpasswd(htpasswd, {"bob": bob_pw})
    assert reload(m, yaml.safe_dump(config)) == RELOADED
    status, headers = push(alice, b"alice-2")
    assert status == 401 and challenge(headers["www-authenticate"])["error"] == "invalid_token"
    status, _, body = api(m, "GET", f"/v2/team/app/blobs/{digest_of(b'alice-1')}", headers=bearer(alice))
    assert status == 401 and error_of(body)[0] == "UNAUTHORIZED"
    assert get_token(USER, SECRET)[0] == 401
    assert push(bob, b"bob-2")[0] == 201  # the key survived the reload

    narrowed = {**config, "auth": {**auth, "access": [{"repository": "team/*", "users": ["pull"]}]}}
    assert reload(m, yaml.safe_dump(narrowed)) == RELOADED
    status, headers = push(bob, b"bob-3")
    assert status == 401 and challenge(headers["www-authenticate"])["error"] == "insufficient_scope"
    status, _, body = api(m, "GET", f"/v2/team/app/blobs/{digest_of(b'bob-2')}", headers=bearer(bob))
    assert status == 200 and body == b"bob-2"
    m.stop()
    assert_no_secret_in_log(m)
    log = m.log_text()
    assert bob_pw not in log and alice not in log and bob not in log


# --------------------------------------------------------------------------
# 6. rules match the repository, not the name
# --------------------------------------------------------------------------

CANONICAL_SHAPES = {
    # the shape that was a bypass: the upstream name matched first, the docker.io/... name fell to "*"
    "upstream-name rule": (
        (AccessRule("secret/*", anonymous=NONE, users=PULL), AccessRule("*", anonymous=PULL, users=PULL)),
        "secret/app",
        ["secret/app", "docker.io/secret/app", "secret/app?ns=docker.io", "docker.io/secret/app?ns=docker.io"],
    ),
    # and the reverse: a rule on the store key, requests by the short names fell to "*"
    "store-key rule": (
        (AccessRule("docker.io/library/secret*", anonymous=NONE, users=PULL), AccessRule("*", anonymous=PULL, users=PULL)),
        "library/secretapp",
        ["secretapp", "library/secretapp", "docker.io/library/secretapp", "library/secretapp?ns=docker.io",
         "secretapp?ns=docker.io"],
    ),
}


@pytest.mark.parametrize("mode", ["basic", "token"])
@pytest.mark.parametrize("shape", list(CANONICAL_SHAPES))
@pytest_twisted.ensureDeferred
async def test_rules_match_the_repository_whatever_name_reaches_it(fake_upstream, make_mirror, accounts, shape, mode):
    """Guards rule matching: rules were matched against the name in the request, so one
    repository reached as ``secret/app``, ``docker.io/secret/app`` or ``secret/app?ns=docker.io``
    got different answers and a users-only rule was bypassed by the other spelling.  Every
    spelling is refused anonymously (401; in token mode the anonymous token is granted
    nothing) without asking the upstream, and served to alice; ``library/hello`` under the
    ``*`` rule stays anonymously pullable."""
    rules, remote, spellings = CANONICAL_SHAPES[shape]
    upstream_with_images(fake_upstream, remote, "library/hello")
    m = make_mirror(fake_upstream.url, auth=AuthConfig(htpasswd=accounts, token=mode == "token", rules=rules))

    async def as_anonymous(name: str, actions: list[str]) -> dict[str, str]:
        """No credentials; in token mode an anonymous token, checked to grant ``actions``."""
        if mode == "basic":
            return {}
        tok = await token(m, f"repository:{name.partition('?')[0]}:pull")
        assert granted(tok)[0]["actions"] == actions, name
        return bearer(tok)

    async def as_alice(name: str) -> dict[str, str]:
        if mode == "basic":
            return basic("alice", PASSWORD)
        return bearer(await token(m, f"repository:{name.partition('?')[0]}:pull", basic("alice", PASSWORD)))

    for spelling in spellings:
        name, _, query = spelling.partition("?")
        headers = await as_anonymous(spelling, [])
        for what in ("manifests/latest", "tags/list"):
            r = await As(m, headers).get(f"/v2/{name}/{what}" + (f"?{query}" if query else ""))
            assert r.code == 401, (spelling, what)
            assert (await error(r))["code"] == "UNAUTHORIZED"
    assert fake_upstream.count("GET", remote) == fake_upstream.count("HEAD", remote) == 0
    for spelling in spellings:
        name, _, query = spelling.partition("?")
        r = await As(m, await as_alice(spelling)).get(f"/v2/{name}/manifests/latest" + (f"?{query}" if query else ""))
        assert r.code == 200, spelling
        await r.content()
    for name in ("hello", "library/hello", "docker.io/library/hello"):
        r = await As(m, await as_anonymous(name, ["pull"])).get(f"/v2/{name}/manifests/latest")
        assert r.code == 200, name
        await r.content()


@pytest_twisted.ensureDeferred
async def test_catalog_lists_what_the_rules_let_the_user_pull(fake_upstream, make_mirror, accounts):
    """Guards ``_catalog`` filtering: it matched rules against the store keys only, so a
    ``library/*`` rule hid every mirrored ``docker.io/library/...`` entry from users who
    may pull them.  alice sees the mirrored keys pulled under ``library/*`` and the hosted
    ``pub/app``, not ``team/secret`` (``team/*`` is write-only for users); after the rules
    are narrowed to ``pub/*`` (as a SIGHUP does), the mirrored entries disappear too.
    Anonymous clients may not list at all."""
    upstream_with_images(fake_upstream, "library/hello", "library/world")
    rules = (
        AccessRule("library/*", anonymous=PULL, users=PULL),
        AccessRule("team/*", anonymous=NONE, users=frozenset({"push"})),
        AccessRule("pub/*", anonymous=NONE, users=ALL),
    )
    m = make_mirror(fake_upstream.url, hosted=("team/*", "pub/*"), auth=AuthConfig(htpasswd=accounts, rules=rules))
    alice = As(m, basic("alice", PASSWORD))
    for path in ("/v2/hello/manifests/latest", "/v2/library/world/manifests/latest?ns=docker.io"):
        r = await As(m).get(path)
        assert r.code == 200, path
        await r.content()
    await push_image(alice, "team/secret", "1")
    await push_image(alice, "pub/app", "1")
    assert sorted(await m.registry.catalog()) == ["docker.io/library/hello", "docker.io/library/world", "pub/app", "team/secret"]

    async def listed(client) -> list[str]:
        r = await client.get("/v2/_catalog")
        assert r.code == 200
        return json.loads(await r.content())["repositories"]

    assert await listed(alice) == ["docker.io/library/hello", "docker.io/library/world", "pub/app"]
    r = await alice.get("/v2/_catalog?n=1")
    assert r.code == 200 and json.loads(await r.content())["repositories"] == ["docker.io/library/hello"]
    r = await As(m).get("/v2/_catalog")
    assert r.code == 401
    await r.content()
    resource = m.port.factory.resource
    resource.auth = Authenticator(AuthConfig(htpasswd=accounts, rules=(AccessRule("pub/*", anonymous=NONE, users=ALL),)))
    assert await listed(alice) == ["pub/app"]


# --------------------------------------------------------------------------
# 7. secrets in the log, a whole session
# --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_no_secret_reaches_the_log(start_mirror, workdir):  # noqa: F811
    """Guards the log as a whole: after a session against the real ``twistd mirror`` in token
    mode — Basic logins, wrong and malformed credentials, tokens by GET and by POST, a push
    and pulls with tokens, credentials in URLs (refused), a token in a ``/v2/`` query — the
    log file (access lines included) holds neither the password, the wrong one, their Basic
    base64, nor any token, and no traceback."""
    htpasswd = write_htpasswd(workdir / "htpasswd", {USER: SECRET})
    auth = {"htpasswd": str(htpasswd), "token": True,
            "access": [{"repository": "public/*", "anonymous": ["pull"]}, {"repository": "*"}]}
    m = start_mirror([], hosted=["*"], auth=auth)
    alice_basic = basic(USER, SECRET)
    tokens: list[str] = []
    plain = As(m)
    for headers, want in ((alice_basic, 200), (basic(USER, WRONG), 401), (basic("nobody", SECRET), 401),
                          (b64(f"{USER}:{SECRET}".encode() + b"x" * 1100), 401), (b64(b"\xff" + SECRET.encode()), 401)):
        r = await As(m, headers).get("/v2/")
        assert r.code == want
        await r.content()
    tokens.append(await token(m, "repository:private/app:pull,push", alice_basic))
    r = await As(m, {"Content-Type": "application/x-www-form-urlencoded"}).get(
        "/auth/token", method="POST",
        data=f"grant_type=password&username={USER}&password={SECRET}&scope=repository:public/app:pull,push".encode())
    assert r.code == 200
    tokens.append(json.loads(await r.content())["access_token"])
    r = await As(m, {"Content-Type": "application/x-www-form-urlencoded"}).get(
        "/auth/token", method="POST", data=f"grant_type=password&username={USER}&password={WRONG}".encode())
    assert r.code == 401
    await r.content()
    digest, body = await push_image(As(m, bearer(tokens[0])), "private/app", "1")
    await push_image(As(m, bearer(tokens[1])), "public/app", "1")
    r = await As(m, bearer(tokens[0])).get(f"/v2/private/app/manifests/{digest}")
    assert r.code == 200 and await r.content() == body
    tokens.append(await token(m, "repository:public/app:pull"))
    r = await As(m, bearer(tokens[-1])).get("/v2/public/app/manifests/1")
    assert r.code == 200
    await r.content()
    for query in (f"password={SECRET}", f"access_token={tokens[0]}", f"refresh_token={tokens[1]}"):
        r = await plain.get(f"/auth/token?service=mirror&{query}")
        assert r.code == 400
        await r.content()
    r = await As(m, bearer(tokens[0])).get(f"/v2/private/app/tags/list?access_token={tokens[0]}")
    assert r.code == 200
    await r.content()
    m.stop()
    assert_no_secret_in_log(m)
    log = m.log_text()
    assert "/v2/private/app/tags/list?access_token=REDACTED" in log  # the access log is in this file
    for tok in tokens:
        assert tok not in log and tok.rsplit(".", 1)[1] not in log
    assert_no_traceback(log)
