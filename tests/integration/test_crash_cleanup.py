"""``kill -9`` in the middle of a fill leaves nothing behind once the service is back.

Two real ``twistd mirror`` processes share one filesystem store, in front of an
in-process upstream that trickles its blobs (so fills stay under way for seconds).  One
process is killed with SIGKILL mid-fill and started again: when it answers, the spool
holds only the file the other, live, process is still writing; that fill goes on and
completes, verified.  (The spool's writers hold an flock on their files; the clean-up at
start removes only files no live process holds: mirror/storage/spool.py.)
"""

from __future__ import annotations

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
        await _until(lambda: len(os.listdir(spool)) == 2, 10, "both fills under way")
        await _until(lambda: all(os.path.getsize(spool / n) > CHUNK for n in os.listdir(spool)), 10, "bytes spooled")
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        await _until(lambda: not a.proc.alive(), 10, "the killed process gone")
        try:
            await (await doomed).content()
        except Exception:
            pass  # the client of the killed process lost its connection: as it must
        left = sorted(os.listdir(spool))
        assert len(left) == 2  # the dead process's partial file is still there...
        a.proc = None
        a.start()  # (blocks: the live fill waits meanwhile, well within its timeout)
        # ...and gone once the restarted service answers; the live process's fill is kept.
        remaining = os.listdir(spool)
        assert len(remaining) == 1 and remaining[0] in left
        assert "removed 1 unfinished spool files" in a.log_text()
        response = await surviving
        body = await response.content()
        assert response.code == 200 and hashlib.sha256(body).hexdigest() == live.split(":")[1]
        await _until(lambda: not os.listdir(spool), 10, "the live fill committed")
        assert blob_path(tmp_path / "store", live).read_bytes() == live_blob
        assert not blob_path(tmp_path / "store", killed).exists()
    finally:
        a.stop()
        b.stop()
