"""Client authentication without the network: scopes, access rules, htpasswd, Basic."""

from __future__ import annotations

import base64

import bcrypt
import jwt
import pytest

from mirror.config import AccessRule, AuthConfig, UpstreamConfig
from mirror.core.errors import RegistryError
from mirror.core.routing import Router
from mirror.web.auth import Authenticator, Need, carries_secret, parse_scope, quoted, valid_host

PASSWORD = "correct horse battery"

RULES = (
    AccessRule("public/*", anonymous=frozenset({"pull"}), users=frozenset({"pull", "push", "delete"})),
    AccessRule("readonly/*", anonymous=frozenset(), users=frozenset({"pull"})),
    AccessRule("*", anonymous=frozenset(), users=frozenset({"pull", "push", "delete"})),
)


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_scope_parsing_and_rule_order(htpasswd):
    """Scopes parse to (name, actions); the first matching rule decides; '*' asks for all."""
    assert parse_scope("repository:a/b:pull,push") == ("a/b", ["pull", "push"])
    assert parse_scope("repository:localhost:5000/x:pull") == ("localhost:5000/x", ["pull"])
    assert parse_scope("registry:catalog:*") is None
    auth = Authenticator(AuthConfig(htpasswd=htpasswd, token=True, rules=RULES))
    assert auth.rule_actions(None, ("public/x",)) == {"pull"}
    assert auth.rule_actions("bob", ("readonly/x",)) == {"pull"}
    assert auth.rule_actions("bob", ("anything",)) == {"pull", "push", "delete"}
    token = auth.issue_token("bob", ["repository:readonly/x:*"], lambda name: [(name,)])
    assert jwt.decode(token["token"], options={"verify_signature": False})["access"][0]["actions"] == ["pull"]


def test_htpasswd_must_be_bcrypt(tmp_path):
    """An htpasswd entry that is not bcrypt (crypt, MD5, SHA1) is refused at load."""
    path = tmp_path / "h"
    path.write_text("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    with pytest.raises(ValueError, match="not a user:bcrypt-hash entry"):
        Authenticator(AuthConfig(htpasswd=path))


def test_empty_basic_credentials_are_anonymous(htpasswd):
    """containers/image sends 'Basic Og==' (empty user and password) when it has none: that
    is an anonymous client, not a failed login."""
    auth = Authenticator(AuthConfig(htpasswd=htpasswd, rules=RULES))
    assert auth.basic_credentials("Basic Og==") is None
    assert auth.basic_credentials("Basic " + base64.b64encode(b"alice:pw").decode()) == ("alice", "pw")


def run(auth, header, needs, realm=lambda: "http://mirror.test/auth/token"):
    """auth.authorize, synchronously (bcrypt inline)."""
    from twisted.internet.defer import Deferred, maybeDeferred

    from tests.storeutil import run_now

    d = Deferred.fromCoroutine(auth.authorize(header, realm, needs, lambda f, *a: maybeDeferred(f, *a)))
    return run_now(d)


LOGIN = (Need("login"),)


def refused(auth, header, needs=LOGIN) -> RegistryError:
    with pytest.raises(RegistryError) as info:
        run(auth, header, needs)
    return info.value


def long_password_htpasswd(tmp_path, password: str):
    """An htpasswd entry made as htpasswd -B makes it: bcrypt of the password's first 72 bytes."""
    path = tmp_path / "long"
    hashed = bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"carol:{hashed}\n")
    return path


def test_a_password_longer_than_bcrypt_reads_logs_in(tmp_path):
    """bcrypt reads 72 bytes; htpasswd hashed that many: a 100-byte password logs in, and
    differs from a wrong one only in its first 72 bytes (bcrypt's limit, not ours)."""
    password = "é" * 50  # 100 bytes
    auth = Authenticator(AuthConfig(htpasswd=long_password_htpasswd(tmp_path, password)))
    assert run(auth, basic("carol", password)["Authorization"], [Need("login")]).user == "carol"
    assert refused(auth, basic("carol", "x" + password[1:])["Authorization"]).code == "UNAUTHORIZED"


@pytest.mark.parametrize(
    "header",
    [
        "Basic " + base64.b64encode(b"alice:" + b"p" * 1025).decode(),  # over-long password
        "Basic " + base64.b64encode(b"a" * 257 + b":pw").decode(),  # over-long user
        "Basic " + base64.b64encode(b":pw").decode(),  # no user
        "Basic " + base64.b64encode(b"alice:").decode(),  # no password
        "Basic " + base64.b64encode(b"alice").decode(),  # no colon
        "Basic " + base64.b64encode(b"\xffalice:\xfe").decode(),  # not UTF-8
        "Basic not*base64",
        "Basic " + "A" * 100_000,
    ],
)
def test_malformed_or_impossible_credentials_are_a_clean_401(htpasswd, header):
    auth = Authenticator(AuthConfig(htpasswd=htpasswd, rules=RULES))
    error = refused(auth, header)
    assert error.code == "UNAUTHORIZED" and error.headers["WWW-Authenticate"] == 'Basic realm="mirror"'


def tokens(htpasswd, now, **config):
    return Authenticator(AuthConfig(htpasswd=htpasswd, token=True, rules=RULES, **config), now=lambda: now[0])


def test_an_anonymous_token_is_not_a_login(htpasswd):
    now = [1_000_000.0]
    auth = tokens(htpasswd, now)
    anonymous = auth.issue_token(None, ["repository:public/x:pull"], lambda n: [(n,)])["token"]
    assert refused(auth, f"Bearer {anonymous}").code == "UNAUTHORIZED"
    assert run(auth, f"Bearer {anonymous}", [Need("pull", "public/x", ("public/x",))]).user is None
    alice = auth.issue_token("alice", [], lambda n: [(n,)])["token"]
    assert run(auth, f"Bearer {alice}", [Need("login")]).user == "alice"


def test_a_token_issued_in_the_future_is_refused(htpasswd):
    """iat an hour ahead: refused; 4 s ahead (clocks of nodes sharing a key): taken."""
    now = [1_000_000.0]
    auth = tokens(htpasswd, now)
    for ahead, taken in ((3600, False), (4, True)):
        now[0] += ahead
        token = auth.issue_token("alice", [], lambda n: [(n,)])["token"]
        now[0] -= ahead
        if taken:
            assert run(auth, f"Bearer {token}", [Need("login")]).user == "alice"
        else:
            assert 'error="invalid_token"' in refused(auth, f"Bearer {token}").headers["WWW-Authenticate"]


def test_tokens_never_grant_more_than_the_current_rules_and_users(htpasswd, tmp_path):
    """A token is checked against the rules and the htpasswd file in force when it is used:
    after a reload that narrows a rule or removes its user, it no longer works."""
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    now = [1_000_000.0]
    before = tokens(htpasswd, now, key_file=key)
    token = before.issue_token("alice", ["repository:public/x:pull,push"], lambda n: [(n,)])["token"]
    push = [Need("push", "public/x", ("public/x",))]
    assert run(before, f"Bearer {token}", push).user == "alice"
    narrowed = (AccessRule("public/*", anonymous=frozenset({"pull"}), users=frozenset({"pull"})),)
    after = Authenticator(AuthConfig(htpasswd=htpasswd, token=True, rules=narrowed, key_file=key), now=lambda: now[0])
    assert refused(after, f"Bearer {token}", push).code == "UNAUTHORIZED"
    only_bob = tmp_path / "only-bob"
    only_bob.write_text("\n".join(line for line in htpasswd.read_text().splitlines() if line.startswith("bob:")) + "\n")
    removed = Authenticator(AuthConfig(htpasswd=only_bob, token=True, rules=RULES, key_file=key), now=lambda: now[0])
    error = refused(removed, f"Bearer {token}", push)
    assert 'error="invalid_token"' in error.headers["WWW-Authenticate"]


def test_challenges_quote_their_values_and_take_the_configured_realm(htpasswd):
    auth = tokens(htpasswd, [0.0])
    challenge = auth.challenge('repository:a"b:pull', realm=lambda: 'http://x/"y')
    assert challenge == 'Bearer realm="http://x/\\"y",service="mirror",scope="repository:a\\"b:pull"'
    configured = tokens(htpasswd, [0.0], realm="https://registry.example/auth/token")
    assert configured.challenge(None, realm=lambda: "http://ignored/").startswith('Bearer realm="https://registry.example/auth/token"')
    assert quoted('a\\"') == '"a\\\\\\""'
    for host in ("localhost", "localhost:5000", "registry.example.com", "10.0.0.5:443", "[::1]:5000", "mirror_1"):
        assert valid_host(host), host
    for host in ('evil",x="y', "a b", "a/b", "", "a:b:c", "[::1", "x" * 300):
        assert not valid_host(host), host


def test_rules_match_the_repository_not_the_name_it_was_asked_by(htpasswd):
    """secret, library/secret, docker.io/library/secret and secret?ns=docker.io are one
    repository: one answer.  A rule matches its key or its upstream name; ghcr.io's
    library/secret is another repository."""
    rules = (
        AccessRule("docker.io/library/secret", anonymous=frozenset(), users=frozenset({"pull"})),
        AccessRule("*", anonymous=frozenset({"pull"})),
    )
    auth = Authenticator(AuthConfig(htpasswd=htpasswd, rules=rules))
    router = Router((UpstreamConfig(registry="docker.io", url="http://hub"), UpstreamConfig(registry="ghcr.io", url="http://gh")))
    for name, ns in (("secret", None), ("library/secret", None), ("docker.io/library/secret", None), ("secret", "docker.io")):
        names = router.rule_names(router.route(name, ns))
        assert auth.rule_actions(None, names) == frozenset(), (name, ns)
        assert auth.rule_actions("alice", names) == {"pull"}
    assert auth.rule_actions(None, router.rule_names(router.route("library/secret", "ghcr.io"))) == {"pull"}
    by_upstream_name = Authenticator(AuthConfig(htpasswd=htpasswd, rules=(AccessRule("library/*"),)))
    assert by_upstream_name.rule_actions("alice", router.rule_names(router.route("alpine"))) == {"pull", "push", "delete"}
    assert by_upstream_name.rule_actions("alice", router.rule_names(router.route("other/x"))) == frozenset()
    # A rule for a hosted namespace never covers a mirrored repository of the same name:
    # the upstream name counts only where a request for it alone would go.
    hosted = Router(router.upstreams, ("acme/*",))
    assert hosted.rule_names(hosted.route("docker.io/acme/private")) == ("docker.io/acme/private",)
    assert hosted.rule_names(hosted.route("ghcr.io/acme/private")) == ("ghcr.io/acme/private",)
    assert hosted.rule_names(hosted.route("acme/app")) == ("acme/app",)
    assert hosted.rule_names(hosted.route("library/alpine", "docker.io")) == ("docker.io/library/alpine", "library/alpine")
    assert [r.key for r in router.candidates("library/secret")] == ["docker.io/library/secret", "ghcr.io/library/secret"]


def test_the_access_log_never_shows_a_secret_query_value():
    from twisted.web.test.requesthelper import DummyRequest

    from mirror.web.site import access_log_line, redacted_uri

    assert redacted_uri(b"/auth/token?account=a&password=hunter2&scope=x") == b"/auth/token?account=a&password=REDACTED&scope=x"
    assert redacted_uri(b"/t?Pass%77ord=s&refresh_token=r&x") == b"/t?Pass%77ord=REDACTED&refresh_token=REDACTED&x"
    assert redacted_uri(b"/v2/") == b"/v2/"
    assert redacted_uri(b"/auth/token?x=1;password=hunter2") == b"/auth/token?x=1&password=REDACTED"
    assert carries_secret(b"x=1;PassWord=s") and carries_secret(b"access_token=t") and not carries_secret(b"account=a&scope=s")
    request = DummyRequest([b"auth", b"token"])
    request.uri = b"/auth/token?password=hunter2"
    request.method, request.clientproto, request.code, request.sentLength = b"POST", b"HTTP/1.1", 400, 0
    line = access_log_line("[30/Nov/2026:00:00:00 +0000]", request)
    assert "hunter2" not in line and '"POST /auth/token?password=REDACTED HTTP/1.1" 400' in line


def test_a_reload_keeps_the_random_token_key(htpasswd, tmp_path):
    """Without key_file the token key is random per process; a reload (a new Authenticator)
    keeps it, so the tokens clients hold still work.  With key_file, the file decides."""
    from mirror.config import MirrorConfig, StorageConfig
    from mirror.tap import build_auth

    config = MirrorConfig(listen=(), storage=StorageConfig(root=tmp_path), auth=AuthConfig(htpasswd=htpasswd, token=True))
    first = build_auth(config)
    token = first.issue_token("alice", [], lambda n: [(n,)])["token"]
    assert build_auth(config, first).principal_from_token(token).user == "alice"
    with pytest.raises(RegistryError):
        build_auth(config).principal_from_token(token)  # another process


def test_the_token_endpoint_takes_credentials_from_the_form_body_only_as_utf8(htpasswd):
    """POST /auth/token: a password grant in the form body logs in; a body that is not
    UTF-8 is a 401 (credentials that cannot be right), a password in the URL a 400."""
    from mirror.config import MirrorConfig, StorageConfig
    from mirror.storage.memory import open_memory_store
    from tests.inmemory import InMemoryMirror

    config = MirrorConfig(
        listen=(), storage=StorageConfig(root="unused"), hosted=("*",), auth=AuthConfig(htpasswd=htpasswd, token=True)
    )
    m = InMemoryMirror(config, open_memory_store(lambda: 0.0))
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    good = f"grant_type=password&username=alice&password={PASSWORD.replace(' ', '+')}".encode()
    assert m.request("POST", "/auth/token", data=good, headers=form).code == 200
    a = m.request("POST", "/auth/token", data=b"grant_type=password&username=alice&password=\xff\xfe", headers=form)
    assert a.code == 401 and a.error_code == "UNAUTHORIZED"
    a = m.request("POST", "/auth/token", data=b"grant_type=password&username=alice&password=%ff", headers=form)
    assert a.code == 401
    a = m.request("POST", "/auth/token?x=1;password=p", data=good, headers=form)
    assert a.code == 400 and a.error_code == "UNSUPPORTED"


def test_header_values_that_are_not_utf8_are_refused_cleanly(htpasswd):
    """An Authorization header whose bytes are not UTF-8 (HTTP allows any octets) is a 401
    with a challenge, not a 500: headers are read as bytes."""
    from twisted.web.http_headers import Headers

    from mirror.config import MirrorConfig, StorageConfig
    from mirror.storage.memory import open_memory_store
    from tests.inmemory import InMemoryMirror

    config = MirrorConfig(listen=(), storage=StorageConfig(root="unused"), hosted=("*",), auth=AuthConfig(htpasswd=htpasswd))
    m = InMemoryMirror(config, open_memory_store(lambda: 0.0))
    for value in (b"Basic \xff\xfe", b"Bearer \xb2"):
        a = m.request("GET", "/v2/", headers=Headers({b"Authorization": [value]}))
        assert a.code == 401 and a.header("WWW-Authenticate"), (value, a.code)
