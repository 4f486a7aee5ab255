"""Unit tests of WWW-Authenticate parsing and the token cache."""

from mirror.upstream.challenge import DEFAULT_TOKEN_LIFETIME, TokenCache, parse_challenge, token_from_response


def test_docker_hub_bearer_challenge():
    """Docker Hub's challenge: realm, service and a scope, quoted."""
    c = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.params["service"] == "registry.docker.io"
    assert c.params["scope"] == "repository:library/alpine:pull"


def test_scope_with_commas_inside_quotes():
    """A scope listing several actions contains commas inside the quotes."""
    c = parse_challenge('Bearer realm="https://r/t", scope="repository:a/b:pull,push", error="invalid_token"')
    assert c.params["scope"] == "repository:a/b:pull,push"
    assert c.params["error"] == "invalid_token"


def test_basic_challenge_and_escapes():
    """Basic challenges parse too; backslash escapes inside quotes are undone."""
    c = parse_challenge('Basic realm="my \\"registry\\""')
    assert c.scheme == "basic"
    assert c.realm == 'my "registry"'


def test_unparseable_challenges():
    """Empty or garbled headers give None rather than a half-parsed challenge."""
    assert parse_challenge(None) is None
    assert parse_challenge("") is None
    assert parse_challenge('Bearer realm="unterminated') is None
    assert parse_challenge("realm=x") is None


def test_token_response_forms():
    """Either 'token' or 'access_token'; expires_in defaults to 60 s."""
    assert token_from_response({"token": "t", "expires_in": 300}) == ("t", 300.0)
    assert token_from_response({"access_token": "a"}) == ("a", DEFAULT_TOKEN_LIFETIME)
    assert token_from_response({"token": "t", "expires_in": "soon"}) == ("t", DEFAULT_TOKEN_LIFETIME)
    assert token_from_response({"nope": 1}) is None
    assert token_from_response([]) is None


def test_token_cache_reuses_until_margin_before_expiry():
    """A token is reused while valid and dropped shortly before it expires."""
    cache = TokenCache()
    cache.put("repository:a:pull", "tok", 300, now=1000)
    assert cache.get("repository:a:pull", 1000) == "tok"
    assert cache.get("repository:a:pull", 1289) == "tok"
    assert cache.get("repository:a:pull", 1291) is None  # within the 10 s margin
    assert cache.get("repository:b:pull", 1000) is None


def test_short_lived_token_margin_is_half_its_life():
    """A 4-second token is used for 2 seconds, not refused outright."""
    cache = TokenCache()
    cache.put("s", "t", 4, now=0)
    assert cache.get("s", 1.9) == "t"
    assert cache.get("s", 2.0) is None


def test_drop():
    """A refused token is forgotten."""
    cache = TokenCache()
    cache.put("s", "t", 300, now=0)
    cache.drop("s")
    assert cache.get("s", 1) is None
