"""Client authentication without the network: scopes, access rules, htpasswd, Basic."""

from __future__ import annotations

import base64

import jwt
import pytest

from mirror.config import AccessRule, AuthConfig
from mirror.web.auth import Authenticator, parse_scope

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
    assert auth.rule_actions(None, "public/x") == {"pull"}
    assert auth.rule_actions("bob", "readonly/x") == {"pull"}
    assert auth.rule_actions("bob", "anything") == {"pull", "push", "delete"}
    token = auth.issue_token("bob", ["repository:readonly/x:*"])
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
