"""Unit tests of the OCI grammar: digests, names, tags, references (manifests: test_manifest.py)."""

import pytest

from mirror.core.errors import RegistryError
from mirror.core.oci import Digest, parse_digest, parse_reference, validate_name

SHA = "a" * 64


def code_of(call, *args):
    with pytest.raises(RegistryError) as info:
        call(*args)
    return info.value.code



def test_parse_sha256_digest():
    """A well-formed sha256 digest parses into its two parts and prints back unchanged."""
    d = parse_digest(f"sha256:{SHA}")
    assert (d.algorithm, d.encoded) == ("sha256", SHA)
    assert str(d) == f"sha256:{SHA}"


def test_parse_sha512_digest():
    """sha512 is verifiable, so it is accepted with 128 hex characters."""
    assert parse_digest("sha512:" + "b" * 128).algorithm == "sha512"


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "a" * 63,  # too short
        "sha256:" + "A" * 64,  # upper case hex
        "sha256:" + "g" * 64,  # not hex
        "sha256" + SHA,  # no colon
        "sha256:",  # empty encoded part
        ":" + SHA,  # empty algorithm
        "SHA256:" + SHA,  # algorithm upper case
        "sha256:../../etc/passwd",
    ],
)
def test_malformed_digests_are_digest_invalid(text):
    """Malformed digests are DIGEST_INVALID (400), never accepted."""
    with pytest.raises(RegistryError) as info:
        parse_digest(text)
    assert info.value.code == "DIGEST_INVALID"
    assert info.value.status == 400


def test_unknown_algorithm_is_digest_invalid():
    """A grammatical digest of an algorithm we cannot verify is refused with a clear message."""
    with pytest.raises(RegistryError) as info:
        parse_digest("md5:" + "a" * 32)
    assert info.value.code == "DIGEST_INVALID"
    assert "unsupported digest algorithm" in info.value.message


def test_digest_of_and_matches():
    """Digest.of hashes bytes; matches() checks bytes against a digest."""
    d = Digest.of(b"hello")
    assert str(d) == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert d.matches(b"hello")
    assert not d.matches(b"hellO")


@pytest.mark.parametrize(
    "name",
    ["library/alpine", "a", "a/b/c", "my-org/my_app", "a__b/c.d", "a--b", "ghcr.io/org/app", "x" * 255],
)
def test_valid_names(name):
    """Names from the spec's grammar are accepted as they are."""
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "Library/alpine",  # upper case
        "a/../b",  # dot-dot component
        "..",
        "a//b",  # empty component
        "/a",
        "a/",
        "a/.hidden",
        "a_",  # separator at the end
        "-a",
        "a___b",  # three underscores
        "a b",
        "a%2fb",
        "x" * 256,  # over-long
    ],
)
def test_invalid_names(name):
    """Names outside the grammar (so any that could leave the store) are NAME_INVALID."""
    assert code_of(validate_name, name) == "NAME_INVALID"


def test_reference_tag_or_digest():
    """A reference with a colon is a digest, otherwise a tag."""
    assert parse_reference("latest").tag == "latest"
    assert str(parse_reference(f"sha256:{SHA}").digest) == f"sha256:{SHA}"


@pytest.mark.parametrize("tag", ["-bad", ".bad", "a" * 129, "bad/tag", "bad tag", ""])
def test_invalid_tags(tag):
    """Tags outside [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127} are TAG_INVALID."""
    assert code_of(parse_reference, tag) == "TAG_INVALID"
