"""FsLeases: leases as files, with S3Leases' semantics (a fake clock; real files under
tmp_path); the worker processes of one machine fill blobs by them."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from twisted.internet.task import Clock

from mirror.storage.fsleases import FsLeases
from tests.storeutil import Sync, run_now

NAME = "fills/sha256/" + "ab" * 32


@pytest.fixture
def clock():
    c = Clock()
    c.advance(1_700_000_000)
    return c


@pytest.fixture
def leases(tmp_path, clock):
    return Sync(FsLeases(tmp_path / "leases", clock.seconds))


def test_one_holder_at_a_time_and_its_own_lease_again(leases):
    """The first to ask takes it; another is told who holds it; the holder asking again
    (as a restarted process does) has it."""
    assert leases.acquire(NAME, "a", 30) is None
    assert leases.acquire(NAME, "b", 30) == "a"
    assert leases.acquire(NAME, "a", 30) is None


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(leases, clock):
    assert leases.acquire(NAME, "a", 30) is None
    clock.advance(29.9)
    assert leases.acquire(NAME, "b", 30) == "a"
    clock.advance(0.2)
    assert leases.acquire(NAME, "b", 30) is None
    assert leases.acquire(NAME, "a", 30) == "b"


def test_renewal_extends_only_the_holder_s_lease(leases, clock, tmp_path):
    assert leases.acquire(NAME, "a", 30) is None
    clock.advance(20)
    leases.renew(NAME, "a", 30)
    clock.advance(20)  # 40 s after the acquire, 20 after the renewal: still live
    assert leases.acquire(NAME, "b", 30) == "a"
    leases.renew(NAME, "b", 30)  # not b's to extend: nothing changes
    assert FsLeases(tmp_path / "leases").current(NAME)[0] == "a"


def test_a_renewal_after_a_takeover_leaves_the_new_holder(leases, clock, tmp_path):
    assert leases.acquire(NAME, "a", 30) is None
    clock.advance(31)
    assert leases.acquire(NAME, "b", 30) is None
    leases.renew(NAME, "a", 30)
    assert FsLeases(tmp_path / "leases").current(NAME)[0] == "b"


def test_release_lets_go_only_of_the_holder_s_lease(leases, tmp_path):
    assert leases.acquire(NAME, "a", 30) is None
    leases.release(NAME, "b")
    assert leases.acquire(NAME, "b", 30) == "a"
    leases.release(NAME, "a")
    assert not (tmp_path / "leases" / NAME).exists()
    assert leases.acquire(NAME, "b", 30) is None


def test_a_torn_lease_reads_as_expired(leases, tmp_path):
    """A lease a crash left half-written does not block the work for ever."""
    path = tmp_path / "leases" / NAME
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"holder": "a", "exp')
    assert leases.acquire(NAME, "b", 30) is None
    doc = json.loads(path.read_bytes())
    assert doc["holder"] == "b"


def test_release_and_reads_create_nothing(tmp_path):
    """Opening a store read-only (gc --dry-run) must not write: only acquire and renew
    create the directory."""
    leases = Sync(FsLeases(tmp_path / "leases"))
    leases.release(NAME, "a")
    assert FsLeases(tmp_path / "leases").current(NAME) is None
    assert not (tmp_path / "leases").exists()


def test_a_name_cannot_leave_the_directory(leases):
    for name in ("../x", "fills/../../x", "/abs", "", "a//b"):
        with pytest.raises(ValueError):
            leases.acquire(name, "a", 30)


def _race(directory: Path, holder: str, start, results) -> None:
    start.wait()
    results.put((holder, run_now(FsLeases(directory).acquire(NAME, holder, 30))))


def test_of_processes_asking_at_once_exactly_one_gets_it(tmp_path):
    """The read-modify-write is under a lock shared by processes: eight processes released
    at once, one holder."""
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / "leases", f"p{i}", start, results)) for i in range(8)]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=10) for _ in procs]
    for p in procs:
        p.join(10)
    winners = [holder for holder, other in outcomes if other is None]
    assert len(winners) == 1
    assert all(other == winners[0] for holder, other in outcomes if other is not None)


def test_only_this_user_may_open_the_lock(leases, tmp_path):
    """The directory and its lock file are this user's alone: another local user who could
    open the lock could hold it, and every worker waiting on it with it."""
    assert leases.acquire("fills/sha256/" + "ab" * 32, "node-a", 60) is None
    assert (tmp_path / "leases").stat().st_mode & 0o077 == 0
    assert (tmp_path / "leases" / ".lock").stat().st_mode & 0o077 == 0
