"""The pure parts of retrying upstream requests and remembering their misses."""

from __future__ import annotations

import pytest

from mirror.upstream.misses import Misses
from mirror.upstream.retry import Backoff, retry_after


def test_backoff_doubles_with_jitter_up_to_the_cap():
    b = Backoff(deadline=1000, base=0.25, cap=8)
    assert [b.delay(n, 0, lambda: 0.0) for n in range(7)] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert [b.delay(n, 0, lambda: 0.999999) for n in range(2)] == pytest.approx([0.25, 0.5])


def test_backoff_gives_up_when_the_wait_would_pass_the_deadline():
    b = Backoff(deadline=2.0)
    assert b.delay(0, 1.8, lambda: 0.0) == 0.125
    assert b.delay(0, 1.9, lambda: 0.0) is None
    assert Backoff(deadline=0).delay(0, 0, lambda: 0.0) is None  # retries off


def test_retry_after_lengthens_the_backoff_and_may_end_the_retries():
    b = Backoff(deadline=100)
    assert b.delay(0, 1, lambda: 0.0, after=3) == 3
    assert b.delay(0, 1, lambda: 0.0, after=0) == 0.125  # never a tight loop
    assert b.delay(5, 1, lambda: 0.0, after=3) == 4.0  # the backoff, when it is longer
    assert b.delay(0, 1, lambda: 0.5, after=300) is None  # past the deadline: the 429 goes to the client


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 0 ", 0.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 10.0),  # now is 10 s before it
        ("Sun, 06 Nov 1994 08:49:00 GMT", 0.0),  # in the past: at once
        ("soon", None),
        ("-1", None),
        (None, None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value, expected):
    assert retry_after(value, 784111777.0 - 10) == expected


def test_misses_are_remembered_for_the_ttl_and_forgotten_on_an_answer():
    m = Misses(ttl=30)
    m.remember("library/app", "nosuchtag", now=100)
    assert m.missing("library/app", "nosuchtag", 129.9)
    assert not m.missing("library/app", "latest", 110)
    assert not m.missing("library/app", "nosuchtag", 130)  # expired
    m.remember("library/app", "nosuchtag", now=200)
    m.found("library/app", "nosuchtag")
    assert not m.missing("library/app", "nosuchtag", 201)


def test_a_missing_repository_covers_every_reference_until_it_answers():
    m = Misses(ttl=30)
    m.remember("nosuch/repo", None, now=0)
    assert m.missing("nosuch/repo", "latest", 1) and m.missing("nosuch/repo", "sha256:" + "a" * 64, 1)
    m.found("nosuch/repo", "v2")
    assert not m.missing("nosuch/repo", "latest", 2)


def test_misses_are_bounded_and_off_at_ttl_zero():
    m = Misses(ttl=30, limit=3)
    for i in range(5):
        m.remember("r", f"t{i}", now=0)
    assert len(m) == 3 and not m.missing("r", "t0", 1) and m.missing("r", "t4", 1)
    off = Misses(ttl=0)
    off.remember("r", "t", now=0)
    assert len(off) == 0 and not off.missing("r", "t", 0)
