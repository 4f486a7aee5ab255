"""Unit tests of Accept merging/negotiation and Range parsing."""

import pytest

from mirror.core.errors import RegistryError
from mirror.core.httpheaders import accepts, parse_accept, parse_range
from mirror.core.oci import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST


def test_accept_merges_separate_lines_in_any_order():
    """docker sends six separate Accept lines in random order: all of them count."""
    lines = [b"application/json", OCI_MANIFEST.encode(), DOCKER_MANIFEST.encode(), DOCKER_MANIFEST_LIST.encode()]
    assert set(parse_accept(lines)) == {"application/json", OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST}
    assert set(parse_accept(list(reversed(lines)))) == set(parse_accept(lines))


def test_accept_splits_comma_joined_line_and_drops_parameters():
    """containerd sends one comma-joined line; q-values and spaces are ignored."""
    line = f"{DOCKER_MANIFEST}, {OCI_INDEX};q=0.9 , */*"
    assert parse_accept([line]) == [DOCKER_MANIFEST, OCI_INDEX, "*/*"]


def test_accept_none():
    """No Accept header means an empty list."""
    assert parse_accept(None) == []


@pytest.mark.parametrize(
    ("accept", "media_type", "ok"),
    [
        ([], OCI_MANIFEST, True),  # no Accept: anything
        (["*/*"], OCI_INDEX, True),
        (["application/*"], OCI_INDEX, True),
        ([DOCKER_MANIFEST], DOCKER_MANIFEST, True),
        ([DOCKER_MANIFEST], OCI_MANIFEST, False),
        ([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST], OCI_INDEX, False),
        (["text/*"], OCI_MANIFEST, False),
    ],
)
def test_accepts(accept, media_type, ok):
    """A media type is acceptable when listed exactly or by a wildcard."""
    assert accepts(accept, media_type) is ok


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=10-", 100, (10, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-1000", 100, (0, 99)),
        ("bytes=90-1000", 100, (90, 99)),  # last clipped to the end
        ("bytes=0-0", 1, (0, 0)),
    ],
)
def test_range_satisfiable(header, size, expected):
    """Single ranges, open-ended and suffix ranges resolve to inclusive byte offsets."""
    r = parse_range(header, size)
    assert (r.first, r.last) == expected
    assert r.content_range() == f"bytes {expected[0]}-{expected[1]}/{size}"


@pytest.mark.parametrize("header", [None, "items=0-1", "bytes=0-1,5-6"])
def test_range_ignored(header):
    """No header, another unit or a multi-range: the whole blob is served (RFC 9110 allows it)."""
    assert parse_range(header, 100) is None


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=5-2", "bytes=abc", "bytes=-", "bytes=-0", "bytes=1-2-3"])
def test_range_unsatisfiable(header):
    """Broken or unsatisfiable ranges are 416 with Content-Range: bytes */size."""
    with pytest.raises(RegistryError) as info:
        parse_range(header, 100)
    assert info.value.status == 416
    assert info.value.headers["Content-Range"] == "bytes */100"
