"""``kill -9`` in the middle of a fill leaves nothing behind once the service is back.

Two real ``twistd mirror`` processes share one filesystem store, in front of an
in-process upstream that trickles its blobs (so fills stay under way for seconds).  One
process is killed with SIGKILL mid-fill and started again: when it answers, every file
in the spool is held by a live process — the other process's fill, and the killed one's,
which the restarted process took over and resumes from the bytes on disk (a Range request
from where it stopped) — and both fills complete, verified.  (The spool's writers hold an
flock on their files; the clean-up at start removes only files no live process holds,
after the restarted process took the ones it can resume: mirror/storage/spool.py.)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal

import pytest_twisted

import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.integration.mirror_proc import MirrorProcess
from tests.storeutil import blob_path

CHUNK = 64 * 1024
SIZE = 4 * 1024 * 1024  # 64 chunks: about 6 s at the upstream's pace below


def spool_files(spool) -> list[str]:
    """The blobs being written (not their notes)."""
    return [n for n in os.listdir(spool) if not n.endswith(".fill")]


def held_by_a_live_process(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def _until(check, seconds: float, what: str) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"not within {seconds} s: {what}")


@pytest_twisted.ensureDeferred
async def test_kill_mid_fill_leaves_no_partial_file_and_spares_a_live_fill(fake_upstream, tmp_path):
    killed_blob, live_blob = os.urandom(SIZE), os.urandom(SIZE)
    killed = fake_upstream.add_blob(killed_blob, "library/app")
    live = fake_upstream.add_blob(live_blob, "library/app")
    fake_upstream.chunk_delay = 0.1
    spool = tmp_path / "store" / "spool"
    upstreams = [{"registry": "docker.io", "url": fake_upstream.url}]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    storage = {"root": str(tmp_path / "store")}
    a = MirrorProcess(a_dir, upstreams, storage=storage).start()
    b = MirrorProcess(b_dir, upstreams, storage=storage).start()
    try:
        doomed = treq.get(f"{a.url}/v2/library/app/blobs/{killed}", unbuffered=True, persistent=False)
        surviving = treq.get(f"{b.url}/v2/library/app/blobs/{live}", unbuffered=True, persistent=False)
        await _until(lambda: len(spool_files(spool)) == 2, 10, "both fills under way")
        await _until(lambda: all(os.path.getsize(spool / n) > CHUNK for n in spool_files(spool)), 10, "bytes spooled")
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        await _until(lambda: not a.proc.alive(), 10, "the killed process gone")
        try:
            await (await doomed).content()
        except Exception:
            pass  # the client of the killed process lost its connection: as it must
        left = sorted(os.listdir(spool))
        files = spool_files(spool)
        assert len(files) == 2  # the dead process's partial file is still there...
        (dead,) = [n for n in files if not held_by_a_live_process(spool / n)]
        assert dead + ".fill" in left  # (its note: what it was the fill of)
        on_disk = os.path.getsize(spool / dead)
        a.proc = None
        a.start()  # (blocks: the live fill waits meanwhile, well within its timeout)
        # ...and once the restarted service answers, no file is left that no live process holds.
        for name in spool_files(spool):
            assert held_by_a_live_process(spool / name), name
        assert "resuming 1 fills a previous run left unfinished" in a.log_text()
        response = await surviving
        body = await response.content()
        assert response.code == 200 and hashlib.sha256(body).hexdigest() == live.split(":")[1]
        await _until(lambda: not os.listdir(spool), 15, "both fills committed")
        assert blob_path(tmp_path / "store", live).read_bytes() == live_blob
        assert blob_path(tmp_path / "store", killed).read_bytes() == killed_blob
        # The killed process's fill went on from the bytes it had written, not from the start.
        resumed_from = [int(r) for r in fake_upstream.ranges_asked]
        assert resumed_from and on_disk - CHUNK <= resumed_from[0] <= on_disk + CHUNK
    finally:
        a.stop()
        b.stop()
