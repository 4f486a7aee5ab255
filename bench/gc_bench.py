"""GC benchmark: mark and sweep over a generated store of 100k blobs and 10k manifests.

Usage: .venv/bin/python bench/gc_bench.py [--blobs 100000] [--manifests 10000] [--garbage 0.2]

It writes a store in a temp dir (blob files of a few bytes: GC cost is in the walk and the
manifest reads, not in the bytes), half the repositories mirrored and half hosted, with
one blob in five unreferenced and every file older than the grace period. Then it times a
dry run and a real run of `mirror gc --json`, run as the service runs it (a child
process) while a reactor here ticks every 10 ms, and reports the longest the reactor was
kept from ticking (the service must keep answering during GC). Prints one JSON line and a
Markdown row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import reactor, task
from twisted.internet.utils import getProcessOutputAndValue

from mirror.core.oci import OCI_MANIFEST, Digest
from mirror.storage.fs import open_filesystem_store
from tests.storeutil import Sync, blob_path


def build(root: Path, blobs: int, manifests: int, garbage: float, seed: int = 1) -> None:
    rng = random.Random(seed)
    metadata = Sync(open_filesystem_store(root)).metadata
    old = time.time() - 30 * 24 * 3600

    def write(data: bytes) -> Digest:
        d = Digest.of(data)
        path = blob_path(root, d)  # written directly, without fsync: a store this size builds in seconds
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (old, old))
        return d

    pool = [write(b"blob %d" % i) for i in range(blobs)]
    referenced = pool[: int(blobs * (1 - garbage))]
    repos = [f"docker.io/library/r{i}" if i % 2 else f"team/r{i}" for i in range(manifests // 10)]
    for i in range(manifests):
        repo = repos[i % len(repos)]
        layers = [referenced[(i * 8 + k) % len(referenced)] for k in range(8)]
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(rng.choice(referenced)), "size": 9},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": str(d), "size": 9} for d in layers],
        }
        m = write(json.dumps(doc).encode())
        metadata.link_manifest(repo, m, OCI_MANIFEST)
        metadata.set_tag(repo, f"t{i}", m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--manifests", type=int, default=10_000)
    parser.add_argument("--garbage", type=float, default=0.2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mirror-gc-bench."))
    try:
        t0 = time.monotonic()
        build(work / "store", args.blobs, args.manifests, args.garbage)
        build_s = time.monotonic() - t0
        # What the service does: `mirror gc --json` in a child process, while this
        # reactor ticks every 10 ms.
        conf = work / "gc.yaml"
        conf.write_text(json.dumps({"listen": "tcp:0", "storage": {"root": str(work / "store")},
                                    "upstreams": [{"registry": "docker.io", "url": "http://127.0.0.1:9"}],
                                    "hosted": ["team/*"], "gc": {"grace": 3600, "max_age": 0}}))
        argv = ["-m", "mirror.tools.cli", "gc", "--config", str(conf), "--json"]
        results = {}

        def child(label, extra):
            d = getProcessOutputAndValue(sys.executable, argv + extra, env=os.environ,
                                         path=str(Path(__file__).resolve().parents[1]))

            def record(r):
                results[label] = (json.loads(r[0].decode().splitlines()[-1]), time.monotonic())

            return d.addCallback(record)

        def both():
            d = child("dry", ["--dry-run"])
            d.addCallback(lambda _: child("real", []))
            d.addBoth(lambda x: (reactor.stop(), x)[1])
            return d

        worst = {"dry": 0.0, "real": 0.0}
        last = [time.monotonic()]

        def tick():
            now = time.monotonic()
            phase = "dry" if "dry" not in results else "real"
            worst[phase] = max(worst[phase], now - last[0] - 0.01)
            last[0] = now

        task.LoopingCall(tick).start(0.01)
        start = time.monotonic()
        reactor.callWhenRunning(both)
        reactor.run()
        _dry, dry_end = results["dry"]
        real, real_end = results["real"]
        out = {
            "blobs": args.blobs + args.manifests,
            "manifests": args.manifests,
            "build_seconds": round(build_s, 1),
            "dry_run_seconds": round(dry_end - start, 2),
            "gc_seconds": round(real_end - dry_end, 2),
            "blobs_deleted": real["blobs_deleted"],
            "gc_reported_seconds": real["seconds"],
            "max_reactor_stall_ms_dry": round(worst["dry"] * 1000, 1),
            "max_reactor_stall_ms_gc": round(worst["real"] * 1000, 1),
        }
        print(json.dumps(out))
        print(
            f"| {out['blobs']} blobs, {out['manifests']} manifests | dry run {out['dry_run_seconds']} s "
            f"| gc {out['gc_seconds']} s, {out['blobs_deleted']} deleted "
            f"| max reactor stall {out['max_reactor_stall_ms_dry']} / {out['max_reactor_stall_ms_gc']} ms |"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
