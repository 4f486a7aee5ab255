"""Client auth in-process over HTTP: Basic and the Docker token flow, access rules, and
what a wrong password, an unknown user, an expired or a forged token get."""

from __future__ import annotations

import json

import jwt
import pytest
import pytest_twisted

from twisted.logger import globalLogPublisher

from mirror.config import AuthConfig
from tests.integration.test_hosted import push_image
from tests.test_web_auth import PASSWORD, RULES, basic


async def error(r):
    return json.loads(await r.content())["errors"][0]


@pytest.fixture
def log_text():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: "\n".join(repr(e) for e in events)
    globalLogPublisher.removeObserver(events.append)


@pytest_twisted.ensureDeferred
async def test_basic_auth_rules(make_mirror, htpasswd, log_text):
    """Basic: /v2/ needs a user; anonymous may pull public/*, users may push; a user without
    push rights gets 403; wrong password and unknown user get the same 401."""
    m = make_mirror(None, hosted=("*",), auth=AuthConfig(htpasswd=htpasswd, rules=RULES))
    r = await m.get("/v2/")
    assert r.code == 401 and r.headers.getRawHeaders("www-authenticate") == ['Basic realm="mirror"']
    await r.content()
    r = await m.get("/v2/", headers=basic("alice", PASSWORD))
    assert r.code == 200
    await r.content()
    # push needs a user
    r = await m.get("/v2/public/app/blobs/uploads/", method="POST")
    assert r.code == 401 and (await error(r))["code"] == "UNAUTHORIZED"
    class Authed:
        url = m.url

        def get(self, path, **kw):
            kw.setdefault("headers", {}).update(basic("alice", PASSWORD))
            return m.get(path, **kw)

    _digest, body = await push_image(Authed(), "public/app", "v1")
    # anonymous pull of public/*, but not of private names
    r = await m.get("/v2/public/app/manifests/v1")
    assert r.code == 200 and await r.content() == body
    r = await m.get("/v2/private/app/manifests/v1")
    assert r.code == 401
    await r.content()
    # a user without push rights
    r = await m.get("/v2/readonly/app/blobs/uploads/", method="POST", headers=basic("bob", PASSWORD))
    assert r.code == 403 and (await error(r))["code"] == "DENIED"
    # wrong password and unknown user: identical answers
    answers = []
    for user, password in (("alice", "wrong"), ("mallory", "wrong"), ("mallory", PASSWORD)):
        r = await m.get("/v2/", headers=basic(user, password))
        answers.append((r.code, r.headers.getRawHeaders("www-authenticate"), await r.content()))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == 401
    assert PASSWORD not in log_text() and "wrong" not in log_text()


@pytest_twisted.ensureDeferred
async def test_token_flow(make_mirror, htpasswd, log_text):
    """Token flow: 401 with a Bearer challenge naming the realm and scope; anonymous tokens
    pull public/*; a token fetched with credentials pushes; the rules cap what is granted."""
    m = make_mirror(None, hosted=("*",), auth=AuthConfig(htpasswd=htpasswd, token=True, rules=RULES))
    r = await m.get("/v2/public/app/blobs/uploads/", method="POST")
    assert r.code == 401
    challenge = r.headers.getRawHeaders("www-authenticate")[0]
    await r.content()
    assert challenge.startswith(f'Bearer realm="{m.url}/auth/token",service="mirror",scope="repository:public/app:pull,push"')
    # with credentials: a token granting push
    r = await m.get("/auth/token?service=mirror&scope=repository:public/app:pull,push", headers=basic("alice", PASSWORD))
    assert r.code == 200
    token = json.loads(await r.content())["token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": "public/app", "actions": ["pull", "push"]}]
    assert claims["sub"] == "alice"
    bearer = {"Authorization": f"Bearer {token}"}

    class Authed:
        url = m.url

        def get(self, path, **kw):
            kw.setdefault("headers", {}).update(bearer)
            return m.get(path, **kw)

    _digest, body = await push_image(Authed(), "public/app", "v1")
    # anonymous token: pull only
    r = await m.get("/auth/token?service=mirror&scope=repository:public/app:pull,push")
    anon = json.loads(await r.content())["token"]
    assert jwt.decode(anon, options={"verify_signature": False})["access"][0]["actions"] == ["pull"]
    r = await m.get("/v2/public/app/manifests/v1", headers={"Authorization": f"Bearer {anon}"})
    assert r.code == 200 and await r.content() == body
    r = await m.get("/v2/public/app/blobs/uploads/", method="POST", headers={"Authorization": f"Bearer {anon}"})
    assert r.code == 401 and 'error="insufficient_scope"' in r.headers.getRawHeaders("www-authenticate")[0]
    await r.content()
    # a token for one repository does not open another
    r = await m.get("/v2/other/app/manifests/v1", headers=bearer)
    assert r.code == 401
    await r.content()
    # OAuth2 password grant (containerd tries POST first)
    r = await m.get(
        "/auth/token",
        method="POST",
        data=(f"grant_type=password&username=alice&password={PASSWORD.replace(' ', '+')}"
              "&service=mirror&scope=repository:public/app:pull").encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.code == 200 and "access_token" in json.loads(await r.content())
    # wrong password at the token endpoint
    r = await m.get("/auth/token?service=mirror&scope=repository:public/app:pull", headers=basic("alice", "nope"))
    assert r.code == 401 and (await error(r))["code"] == "UNAUTHORIZED"
    assert PASSWORD not in log_text() and token not in log_text()


@pytest_twisted.ensureDeferred
async def test_expired_and_forged_tokens_are_refused(make_mirror, htpasswd, tmp_path):
    """An expired token and one signed with another key are 401 invalid_token."""
    config = AuthConfig(htpasswd=htpasswd, token=True, rules=RULES)
    m = make_mirror(None, hosted=("*",), auth=config)
    r = await m.get("/auth/token?service=mirror&scope=repository:private/x:pull", headers=basic("alice", PASSWORD))
    good = json.loads(await r.content())["token"]
    claims = jwt.decode(good, options={"verify_signature": False})
    forged = jwt.encode(claims, b"another key" * 4, algorithm="HS256")
    expired_claims = {**claims, "exp": claims["iat"] - 60, "nbf": claims["iat"] - 120}
    resource = m.port.factory.resource
    expired = jwt.encode(expired_claims, resource.auth._key, algorithm="HS256")
    for token in (forged, expired, "not.a.token"):
        r = await m.get("/v2/private/x/tags/list", headers={"Authorization": f"Bearer {token}"})
        assert r.code == 401, token
        assert 'error="invalid_token"' in r.headers.getRawHeaders("www-authenticate")[0]
        assert (await error(r))["code"] == "UNAUTHORIZED"
