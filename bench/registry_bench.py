#!/usr/bin/env python3
"""Benchmark: the registry side at scale -- pushes of many repositories, reads meanwhile, listings.

    .venv/bin/python bench/registry_bench.py [--repos 10000] [--pushers 8] [--mirror-ref HEAD]

What it does (everything on 127.0.0.1; the mirror and the pushers' process stopped by PID
at the end, also on Ctrl-C; the temp dir removed):

0. exports the mirror's code at ``--mirror-ref`` with ``git archive`` (as ``bench/run.py``
   does, whose helpers it uses) and starts ``twistd -n mirror`` from there on a fresh store,
   with one hosted namespace (``bench/*``) and no upstream;
1. pushes a seed repository ``bench/seed`` (one 4 KiB random layer, a config, a manifest
   tagged ``latest``); runs ``wrk`` (1 thread, 16 connections, ``--wrk-seconds``) on that
   manifest by tag, as ``bench/run.py`` does on a mirrored one: the hot path's req/s; then
   a probe reads it every ``--probe-interval`` ms on the idle server (``--idle-seconds``);
2. pushes ``--repos`` repositories ``bench/r<i>`` through the API from ``--pushers``
   threads (in a child process, so that the client's interpreter lock does not distort
   the probe), each on its own keep-alive connection.  Per repository three requests:
   the seed's layer by cross-repository mount (``POST .../blobs/uploads/?mount=&from=``),
   a small random config blob by monolithic upload (``POST ...?digest=`` with the body),
   and the manifest (``PUT .../manifests/latest``).  Meanwhile the probe reads on, on its
   own connection: cached-read latency during the pushes.  Push requests per second = requests / wall time;
3. ``sync`` (outside the timing), then walks ``_catalog?n=100`` page by page
   (following the ``Link`` header) from one client, over and over for at least
   ``--listing-seconds`` and at least once to the end, while the probe reads on: catalog
   page latency, and read latency while listings run.  The first complete walk is
   checked: every pushed repository exactly once, in lexical order.

Latencies are wall seconds from sending a request to reading the whole answer, on
keep-alive connections (Python ``http.client``).  Prints a Markdown table and writes
``bench/results/registry-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import json
import multiprocessing
import os
import queue
import resource
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import run as base  # noqa: E402  (bench/run.py: export, process tracking, machine info)

from tests.integration import proc_util  # noqa: E402
from tests.integration.upstream_registry import free_port  # noqa: E402

NAMESPACE = "bench"
SEED = f"{NAMESPACE}/seed"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
TIMEOUT = 60.0
KINDS = {"mount": "POST mount", "upload": "POST ?digest= upload", "manifest": "PUT manifest"}


class Conn:
    """One keep-alive HTTP/1.1 connection to the mirror."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, expect: int = 200) -> tuple[float, bytes, http.client.HTTPResponse]:
        """Send, read the whole answer; (seconds, body, response).  A status other than
        ``expect`` is a :class:`base.BenchError`."""
        t0 = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        seconds = time.perf_counter() - t0
        if resp.status != expect:
            raise base.BenchError(f"{method} {path} -> {resp.status} (expected {expect}): {data[:300]!r}")
        return seconds, data, resp

    def close(self) -> None:
        self.conn.close()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_for(config: bytes, layer: bytes) -> bytes:
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)}],
    }, sort_keys=True).encode()


def config_blob(i: int) -> bytes:
    """A small config, different per repository (so every manifest is a new blob)."""
    return json.dumps({"architecture": "amd64", "os": "linux", "repo": i,
                       "nonce": os.urandom(8).hex(), "rootfs": {"type": "layers", "diff_ids": []}}).encode()


def push_blob(conn: Conn, repo: str, data: bytes) -> None:
    conn.request("POST", f"/v2/{repo}/blobs/uploads/?{urlencode({'digest': sha256(data)})}", data,
                 {"Content-Type": "application/octet-stream"}, expect=201)


def push_seed(port: int) -> tuple[bytes, str]:
    """The seed repository; returns its layer and the path of its manifest by tag."""
    conn = Conn(port)
    try:
        layer, config = os.urandom(4096), config_blob(-1)
        push_blob(conn, SEED, layer)
        push_blob(conn, SEED, config)
        conn.request("PUT", f"/v2/{SEED}/manifests/latest", manifest_for(config, layer),
                     {"Content-Type": OCI_MANIFEST}, expect=201)
    finally:
        conn.close()
    return layer, f"/v2/{SEED}/manifests/latest"


# the pushers: a child process --------------------------------------------------------------
def pushers_main(port: int, repos: int, pushers: int, layer_digest: str, layer_size: int,
                 results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Push ``repos`` repositories from ``pushers`` threads; put one result dict on ``results``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops this process by PID
    counter = iter(range(repos))
    lock = threading.Lock()
    latencies: list[dict[str, list[float]]] = [{"mount": [], "upload": [], "manifest": []} for _ in range(pushers)]
    errors: list[str] = []

    def next_index() -> int | None:
        with lock:
            return next(counter, None)

    def pusher(k: int) -> None:
        conn = Conn(port)
        mine = latencies[k]
        try:
            for _ in range(repos + 1):
                i = next_index()
                if i is None or errors:
                    return
                repo = f"{NAMESPACE}/r{i:05d}"
                s, _, _ = conn.request(
                    "POST", f"/v2/{repo}/blobs/uploads/?{urlencode({'mount': layer_digest, 'from': SEED})}",
                    b"", expect=201)
                mine["mount"].append(s)
                config = config_blob(i)
                s, _, _ = conn.request("POST", f"/v2/{repo}/blobs/uploads/?{urlencode({'digest': sha256(config)})}",
                                       config, {"Content-Type": "application/octet-stream"}, expect=201)
                mine["upload"].append(s)
                manifest = json.dumps({
                    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
                    "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": layer_size}],
                }, sort_keys=True).encode()
                s, _, _ = conn.request("PUT", f"/v2/{repo}/manifests/latest", manifest,
                                       {"Content-Type": OCI_MANIFEST}, expect=201)
                mine["manifest"].append(s)
        except Exception as e:
            errors.append(f"pusher {k}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=pusher, args=(k,), daemon=True) for k in range(pushers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    kinds = {kind: [s for mine in latencies for s in mine[kind]] for kind in latencies[0]}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put({"wall_s": wall, "requests": sum(map(len, kinds.values())), "errors": errors, "latencies": kinds,
                 "cpu_s": usage.ru_utime + usage.ru_stime})


# the probe --------------------------------------------------------------------------------
class Probe:
    """Reads one cached manifest every ``interval`` seconds on its own connection, in a
    thread; :meth:`mark` starts a new named phase of samples."""

    def __init__(self, port: int, path: str, interval: float) -> None:
        self.port, self.path, self.interval = port, path, interval
        self.samples: dict[str, list[float]] = {}
        self.phase = "idle"
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def mark(self, phase: str) -> None:
        self.phase = phase

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT + 5)

    def _run(self) -> None:
        conn = Conn(self.port)
        headers = {"Accept": base.ACCEPT}
        next_at = time.perf_counter()
        try:
            while not self._stop.is_set():
                phase = self.phase
                try:
                    s, _, _ = conn.request("GET", self.path, headers=headers)
                except (OSError, http.client.HTTPException, base.BenchError) as e:
                    self.errors.append(f"{phase}: {e}")
                    conn.close()
                    conn = Conn(self.port)
                    if len(self.errors) > 100:
                        return
                    continue
                if phase == self.phase:  # a sample that straddles two phases counts for neither
                    self.samples.setdefault(phase, []).append(s)
                next_at = max(next_at + self.interval, time.perf_counter())
                self._stop.wait(max(0.0, next_at - time.perf_counter()))
        finally:
            conn.close()


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """Count, p50, p99 and max in milliseconds."""
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"count": len(ordered), "p50_ms": round(at(0.50), 2), "p99_ms": round(at(0.99), 2),
            "max_ms": round(ordered[-1] * 1000, 2), "mean_ms": round(statistics.fmean(ordered) * 1000, 2)}


def next_link(resp: http.client.HTTPResponse) -> str | None:
    """The target of a ``Link: <...>; rel="next"`` header."""
    link = resp.getheader("Link")
    if not link or 'rel="next"' not in link:
        return None
    return link[link.index("<") + 1 : link.index(">")]


def walk_catalog(port: int, page_size: int, min_seconds: float, deadline: float) -> dict[str, Any]:
    """Walk ``_catalog?n=page_size`` to the end, again and again for ``min_seconds``; page
    latencies, and the repositories of the first complete walk."""
    conn = Conn(port)
    pages: list[float] = []
    first_walk: list[str] | None = None
    walks = 0
    t0 = time.perf_counter()
    try:
        while first_walk is None or time.perf_counter() - t0 < min_seconds:
            if time.monotonic() > deadline:
                raise base.BenchError("time budget exhausted while listing")
            seen: list[str] = []
            path: str | None = f"/v2/_catalog?n={page_size}"
            while path is not None:
                s, body, resp = conn.request("GET", path)
                pages.append(s)
                names = json.loads(body)["repositories"]
                seen.extend(names)
                path = next_link(resp)
                if path is not None and not names:
                    raise base.BenchError(f"empty catalog page with a next link: {path}")
            walks += 1
            if first_walk is None:
                first_walk = seen
    finally:
        conn.close()
    return {"pages": pages, "walks": walks, "first_walk": first_walk or [], "seconds": time.perf_counter() - t0}


# one run ----------------------------------------------------------------------------------
def start_mirror(work: Path, src: Path) -> tuple[proc_util.ManagedProcess, int, Any]:
    port = free_port()
    config = {"listen": f"tcp:{port}:interface=127.0.0.1", "storage": {"root": str(work / "store")},
              "hosted": [f"{NAMESPACE}/*"], "gc": {"interval": 0}}
    (work / "mirror.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    argv = [base.TWISTD, "--nodaemon", "--pidfile=", "--logfile", str(work / "mirror.log"), "mirror",
            "--config", str(work / "mirror.yaml")]
    proc = proc_util.ManagedProcess(argv, stdout=work / "twistd.out", cwd=src, env=base.mirror_env(src))
    remove = base.REAPER.add(f"mirror {port}", proc.stop)
    if not proc_util.wait_until(lambda: base.answers(port) or not proc.alive(), 30) or not proc.alive():
        proc.stop()
        remove()
        raise base.BenchError("mirror did not start: " + proc_util.tail_file(work / "mirror.log"))
    return proc, port, remove


def wait_quiet(limit: float) -> dict[str, float]:
    """Wait (at most ``limit`` s) until the machine is under 15 % busy for 2 s (see bench/run.py)."""
    t0 = time.monotonic()
    busy = base.cpu_busy()
    while busy >= 0.15 and time.monotonic() - t0 < limit:
        base.log(f"machine {100 * busy:.0f}% busy: waiting for it to be quiet")
        busy = base.cpu_busy(5.0)
    return {"waited_s": round(time.monotonic() - t0, 1), "cpu_busy_at_start": round(busy, 3)}


class MachineCpu:
    """The machine's busy CPU seconds (all cores, /proc/stat) between two calls of :meth:`split`."""

    def __init__(self) -> None:
        self.last = self._busy()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    def split(self) -> float:
        now = self._busy()
        spent, self.last = now - self.last, now
        return round(spent, 2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace, work: Path, src: Path, deadline: float) -> dict[str, Any]:
    proc, port, remove = start_mirror(work, src)
    out: dict[str, Any] = {"repos": args.repos, "pushers": args.pushers}
    probe: Probe | None = None
    child: multiprocessing.process.BaseProcess | None = None
    try:
        layer, manifest_path = push_seed(port)
        if args.wrk_seconds > 0:
            out["wrk_idle"] = base.run_wrk(f"http://127.0.0.1:{port}{manifest_path}", work, args.wrk_seconds)
            base.log(f"wrk on the idle server: {out['wrk_idle']['rps']:.0f} req/s, p99 {out['wrk_idle']['p99_ms']} ms")
        probe = Probe(port, manifest_path, args.probe_interval / 1000)
        probe.start()
        time.sleep(args.idle_seconds)

        # pushes, probed
        base.log(f"pushing {args.repos} repositories from {args.pushers} pushers")
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        child = ctx.Process(target=pushers_main, args=(port, args.repos, args.pushers, sha256(layer), len(layer), results),
                            daemon=True)
        probe.mark("pushing")
        cpu0 = cpu_seconds(proc.pid)
        machine = MachineCpu()
        child.start()
        assert child.pid is not None
        stop_child = base.REAPER.add("pushers", lambda: proc_util.stop_pid(child.pid) if child.pid else None)
        try:
            pushed = results.get(timeout=max(1.0, deadline - time.monotonic()))
        except queue.Empty:
            raise base.BenchError("time budget exhausted while pushing") from None
        finally:
            probe.mark("after-push")
            child.join(30)
            stop_child()
            if child.is_alive():
                proc_util.stop_pid(child.pid)
        out["push_mirror_cpu_s"] = round(cpu_seconds(proc.pid) - cpu0, 2)
        out["push_machine_cpu_s"] = machine.split()  # everyone's: others' load shows as the excess
        out["pushers_cpu_s"] = round(pushed["cpu_s"], 2)
        if pushed["errors"]:
            raise base.BenchError(f"{len(pushed['errors'])} pushers failed, first: {pushed['errors'][0]}")
        out["push_wall_s"] = round(pushed["wall_s"], 2)
        out["push_requests"] = pushed["requests"]
        out["push_rps"] = round(pushed["requests"] / pushed["wall_s"], 1)
        out["push_request_latency"] = percentiles([s for kind in pushed["latencies"].values() for s in kind])
        out["push_request_latency_by_kind"] = {kind: percentiles(s) for kind, s in pushed["latencies"].items()}
        base.log(f"pushed: {out['push_rps']} requests/s over {out['push_wall_s']} s")

        # listings, probed
        os.sync()  # the pushes' dirty pages, written back outside the timing
        time.sleep(1.0)
        probe.mark("listing")
        machine.split()
        walked = walk_catalog(port, args.page_size, args.listing_seconds, deadline)
        probe.mark("done")
        out["listing_machine_cpu_s"] = machine.split()
        expected = sorted([SEED, *(f"{NAMESPACE}/r{i:05d}" for i in range(args.repos))])
        first = walked["first_walk"]
        out["catalog_walk_correct"] = first == expected
        if first != expected:
            missing = sorted(set(expected) - set(first))[:5]
            extra = sorted(set(first) - set(expected))[:5]
            base.log(f"catalog walk differs: {len(first)} names, expected {len(expected)}; "
                     f"missing {missing}, extra {extra}, sorted={first == sorted(first)}")
        out["catalog_page"] = percentiles(walked["pages"])
        out["catalog_walks"] = walked["walks"]
        out["catalog_listing_s"] = round(walked["seconds"], 2)
        out["mirror_rss_mib"] = round((base._status_kib(proc.pid, "VmRSS") or 0) / 1024, 1)
    finally:
        if probe is not None:
            probe.stop()
            out["reads"] = {phase: percentiles(s) for phase, s in probe.samples.items()}
            out["probe_errors"] = probe.errors[:5]
        proc.stop()
        remove()
    return out


def markdown(r: dict[str, Any]) -> str:
    reads = r.get("reads", {})

    def p(phase: str, key: str) -> str:
        v = reads.get(phase, {}).get(key)
        return "–" if v is None else f"{v:,.2f}"

    wrk = r.get("wrk_idle", {})
    rows = [
        ("wrk -c16, cached manifest by tag, idle server: req/s (p99 ms)",
         f"{wrk.get('rps', 0):,.0f} ({wrk.get('p99_ms', '–')})" if wrk else "–"),
        ("cached manifest read, idle: p50 / p99 ms", f"{p('idle', 'p50_ms')} / {p('idle', 'p99_ms')}"),
        ("cached manifest read during pushes: p50 / p99 ms",
         f"{p('pushing', 'p50_ms')} / {p('pushing', 'p99_ms')}"),
        ("push requests/s (mount + config upload + manifest PUT)", f"{r.get('push_rps', 0):,.1f}"),
        ("push request latency: p50 / p99 ms",
         f"{r.get('push_request_latency', {}).get('p50_ms', '–')} / {r.get('push_request_latency', {}).get('p99_ms', '–')}"),
        *((f"  {KINDS.get(kind, kind)}: p50 / p99 ms", f"{lat.get('p50_ms', '–')} / {lat.get('p99_ms', '–')}")
          for kind, lat in r.get("push_request_latency_by_kind", {}).items()),
        ("CPU seconds during the pushes: mirror / pushers / whole machine",
         f"{r.get('push_mirror_cpu_s', '–')} / {r.get('pushers_cpu_s', '–')} / {r.get('push_machine_cpu_s', '–')}"),
        ("`_catalog?n=100` page: p50 / p99 ms",
         f"{r.get('catalog_page', {}).get('p50_ms', '–')} / {r.get('catalog_page', {}).get('p99_ms', '–')}"),
        ("cached manifest read while listing: p50 / p99 ms", f"{p('listing', 'p50_ms')} / {p('listing', 'p99_ms')}"),
        ("catalog walk complete and sorted", str(r.get("catalog_walk_correct"))),
    ]
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repos", type=int, default=10_000, help="repositories to push (default 10000)")
    parser.add_argument("--pushers", type=int, default=8, help="concurrent pushers (default 8)")
    parser.add_argument("--page-size", type=int, default=100, help="n of _catalog?n= (default 100)")
    parser.add_argument("--listing-seconds", type=float, default=20.0,
                        help="walk the catalog for at least this long (and at least once to the end)")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="probe the idle server this long first")
    parser.add_argument("--wrk-seconds", type=int, default=10,
                        help="first, wrk -c16 on the seed's manifest by tag for this long (0: skip)")
    parser.add_argument("--probe-interval", type=float, default=10.0, help="ms between probe reads (default 10)")
    parser.add_argument("--mirror-ref", default="HEAD", help="the commit to measure (worktree: the checkout)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="time budget of the whole run")
    parser.add_argument("--quiet-wait", type=float, default=0.0,
                        help="first wait up to this many seconds for the machine to be under 15%% busy "
                             "(it may be shared; default 0: don't wait)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="where the JSON goes")
    args = parser.parse_args(argv)
    if not 1 <= args.pushers <= 64 or args.repos < 1:
        raise SystemExit("--pushers must be 1..64 and --repos at least 1")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_term)
    sys.setswitchinterval(0.0005)  # the probe's thread gets the interpreter promptly
    deadline = time.monotonic() + args.max_minutes * 60
    started = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "started": started.isoformat(timespec="seconds"), "machine": base.machine_info(),
                              "loadavg_start": Path("/proc/loadavg").read_text().strip()}
    status = 0
    work = proc_util.WorkDir("mirror-registry-bench.")
    base.REAPER.add("workdir", work.cleanup)
    try:
        if args.mirror_ref == "worktree":
            src, result["mirror_code"] = REPO, {"commit": "worktree", **base.git_state()}
        else:
            result["mirror_code"] = base.export_mirror(args.mirror_ref, work.path / "mirror-src")
            src = work.path / "mirror-src"
        base.log(f"mirror code: {result['mirror_code'].get('commit')} {result['mirror_code'].get('subject', '')}")
        result["quiet"] = wait_quiet(args.quiet_wait)
        (work.path / "run").mkdir()
        result["result"] = measure(args, work.path / "run", src, deadline)
    except base.BenchError as e:
        base.log(f"failed: {e}")
        result["error"] = str(e)
        status = 1
    except KeyboardInterrupt:
        base.log("interrupted; stopping everything")
        result["error"] = "interrupted"
        status = 130
    finally:
        base.REAPER.stop_all()
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"registry-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=1))
    if "result" in result:
        print(markdown(result["result"]))
    print(f"\nresults: {path}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
