#!/usr/bin/env python3
"""Benchmark: the mirror next to CNCF Distribution in proxy mode, same upstream, same run.

    .venv/bin/python bench/run.py [--runs 3] [--quick] [--no-https] [--quiet-wait 120] [--py-spy DIR]
    .venv/bin/python bench/run.py --summarize bench/results/bench-....json

Needs docker-registry, skopeo, nginx(-light) and wrk (apt), and py-spy (pip) only for
``--py-spy``.  What it does (everything on 127.0.0.1, every process stopped by its PID
at the end, also on Ctrl-C, every temp dir removed, every loop bounded in count and time,
``--max-minutes`` for the whole):

0. exports the mirror's code at ``--mirror-ref`` (default HEAD) with ``git archive`` into
   the temp dir and runs ``twistd mirror`` from there, so that commits or edits made in
   the checkout during a run do not change what is measured (``--mirror-ref worktree``
   runs the checkout as it is; then a change during the run is reported);

1. starts an upstream: ``/usr/bin/docker-registry serve`` (CNCF Distribution 2.8) with
   filesystem storage in a temp dir (``tests/integration/upstream_registry.py``), and
   (unless ``--no-https``) a second one serving HTTPS with a self-signed P-256
   certificate for 127.0.0.1 made at start by the same harness;
2. pushes three generated images with random (incompressible, gzip level 0) layers with
   skopeo: ``bench/a:latest`` 3 x 256 MiB, ``bench/b:latest`` 30 x 4 MiB,
   ``bench/c:latest`` one tiny layer (``--quick``: 3 x 32 MiB and 30 x 1 MiB); A also to
   the HTTPS upstream (skopeo trusting its CA through ``--dest-cert-dir``);
3. per run, first the references straight from the upstream (same client): the pull of
   A (sequential and 3 in parallel), the pull of A by the verifying client, the 20-client
   fan-ins of B and (unless ``--no-fanin-a``) of A, and wrk on its own manifest by digest;
   then for each server -- ``mirror`` (the real ``twistd mirror``) and Distribution in
   proxy mode (``proxy.remoteurl`` = the upstream) -- on a fresh, empty store:

   * cold pull of A (manifest by tag, config, then each layer sequentially): wall
     seconds, MB/s, time to the first body byte of the first layer, how long after
     the client finished the server's store held all of A, and the server's CPU
     seconds per GB of layers (below);
   * warm pull of A (everything cached -- it waits until A's layers are files in the
     server's store): MB/s, sequential and 3 layers in parallel;
   * fan-in: 20 clients cold-pull B at the same moment: wall time, and upstream
     ``GET .../blobs/<digest>`` per blob from the upstream's access log;
   * small requests: ``wrk`` (1 thread, 16 keep-alive connections, Accept header set by a
     Lua script) on the manifest of C by tag, and by digest, once cached: req/s, p50, p99,
     and how many manifest requests reached the upstream meanwhile;
   * a restart on a fresh store for a cold pull of A by the verifying client (the same
     figures as the first cold pull);
   * a restart on a fresh store for a cold pull of A with the 3 layers in parallel;
   * a restart on a fresh store for a fan-in of big layers: 20 clients cold-pull A at the
     same moment (the peak-RSS target "<= 150 MiB while 20 clients pull 256 MiB
     layers"); skip with ``--no-fanin-a``;
   * peak RSS of the server process in each phase (VmHWM after resetting it through
     ``/proc/PID/clear_refs``, and VmRSS sampled every 100 ms as a cross-check).

   Then the HTTPS upstream (skip with ``--no-https``): A straight from it (http.client
   over TLS trusting its CA; unverified and verifying client) and, per server on a fresh
   store, a cold pull of A by each client: the mirror's upstream has ``ca_file`` = the CA,
   Distribution's proxy gets ``SSL_CERT_FILE`` = the CA (Go on Linux reads roots there).

   Also a reference: nginx (``sendfile on``) serving the blob files out of the mirror's
   store.  Before every phase ``sync`` flushes dirty pages (outside the timing); with
   ``--quiet-wait`` each run first waits for the (shared) machine to be idle.

4. writes everything (every run, the medians) as JSON to ``bench/results/`` and prints
   Markdown tables of medians: mirror / Distribution; the cold path side by side (each
   cold pull of A with its ratio to the direct pull from the same upstream by the same
   kind of client); the references; the issues' targets, met or not.

The client is Python's ``http.client`` reading 1 MiB chunks into one buffer and
discarding them; it checks each body's length against the manifest's descriptor.  The
verifying client also hashes every body as it reads it (sha256, chunk by chunk) and
checks it against its digest, as docker or containerd do; that costs the client CPU
(sha256 alone about 0.65 CPU-s per GB here), so its pulls are compared only with the
direct pull by the same verifying client.  MB/s is 10^6 bytes per second of layer bytes.

CPU seconds per GB (10^9 bytes of layers): utime + stime + cutime + cstime from
``/proc/PID/stat`` of every process in the server's tree (its threads are in its own
figures; children reaped meanwhile in cutime/cstime), read before the pull and after the
server's store holds A, over the layer bytes.  A cold pull starts only once the server is
idle (no CPU tick in 0.5 s, no process come or gone; at most 15 s), so start-up work --
the mirror's first periodic GC, a child process, runs right after start -- is not
counted.  The upstream's CPU is read the same way, and the client thread's with
``time.thread_time``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration import images, proc_util  # noqa: E402
from tests.integration.upstream_registry import (  # noqa: E402
    MANIFEST_ACCEPT,
    DistributionRegistry,
    free_port,
    port_is_open,
)

MIB = 1 << 20
CHUNK = 1 * MIB
ACCEPT = ", ".join(MANIFEST_ACCEPT)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
TWISTD = str(Path(sys.executable).with_name("twistd"))
HTTP_TIMEOUT = 120.0  # seconds a client waits on a socket before it gives up
FANIN_CLIENTS = 20
BLOB_GET_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
MANIFEST_RE = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)$")


class BenchError(RuntimeError):
    """A benchmark step failed (wrong status, short body, a server that died...)."""


class Deadline:
    """The whole benchmark's time budget; phases check it before they start."""

    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + minutes * 60

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise BenchError(f"time budget exhausted before {what}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# process tracking: everything we start is stopped by PID in one place
# --------------------------------------------------------------------------------------

class Reaper:
    """Stops everything registered, last first; safe to call more than once."""

    def __init__(self) -> None:
        self._stops: list[tuple[str, Callable[[], object]]] = []

    def add(self, name: str, stop: Callable[[], object]) -> Callable[[], None]:
        entry = (name, stop)
        self._stops.append(entry)

        def remove() -> None:
            if entry in self._stops:
                self._stops.remove(entry)
        return remove

    def stop_all(self) -> None:
        while self._stops:
            name, stop = self._stops.pop()
            try:
                stop()
            except Exception as e:
                log(f"stopping {name}: {e}")


REAPER = Reaper()


@contextmanager
def tracked(name: str, stop: Callable[[], object]) -> Iterator[None]:
    """Register ``stop`` with the reaper for the duration of the block, and call it after."""
    remove = REAPER.add(name, stop)
    try:
        yield
    finally:
        remove()
        stop()


# --------------------------------------------------------------------------------------
# images: written to an OCI layout by streaming (no 256 MiB in memory), pushed with skopeo
# --------------------------------------------------------------------------------------

class _HashingSink:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        pass


class _RandomReader:
    """``size`` bytes of os.urandom, as a readable file object."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def write_random_layer(layout: images.OciLayout, size: int, name: str) -> tuple[images.Descriptor, str]:
    """A gzip(level 0) tar layer with one file of ``size`` random bytes, streamed to disk.

    Returns its descriptor and its diff ID (digest of the tar), like images.random_layer
    but without holding the layer in memory.
    """
    tmp = layout.path / "blobs" / f".tmp-{name}"
    with open(tmp, "wb") as raw:
        blob = _HashingSink(raw)
        with gzip.GzipFile(fileobj=blob, mode="wb", compresslevel=0, mtime=images.EPOCH, filename="") as gz:
            tar_sink = _HashingSink(gz)
            with tarfile.open(fileobj=tar_sink, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = size, images.EPOCH, 0o644
                info.uname = info.gname = "root"
                tf.addfile(info, _RandomReader(size))
    digest = "sha256:" + blob.sha.hexdigest()
    os.replace(tmp, layout.blob_path(digest))
    return images.Descriptor(images.MT_OCI_LAYER, digest, blob.size), "sha256:" + tar_sink.sha.hexdigest()


def add_random_image(layout: images.OciLayout, ref: str, layer_sizes: Sequence[int]) -> None:
    """Tag ``ref`` in the layout: an image of random layers of the given payload sizes."""
    layers = [write_random_layer(layout, size, f"{ref}-{i}.bin") for i, size in enumerate(layer_sizes)]
    arch = images.host_arch()
    config = {
        "created": images.CREATED, "architecture": arch, "os": "linux",
        "config": {"Cmd": [f"/{ref}-0.bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
        "history": [{"created": images.CREATED, "created_by": "bench/run.py"} for _ in layers],
    }
    cdesc = layout.put_blob(images.canonical_json(config), images.MT_OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": images.MT_OCI_MANIFEST, "config": cdesc.to_json(),
                "layers": [d.to_json() for d, _ in layers]}
    layout.tag(ref, layout.put_blob(images.canonical_json(manifest), images.MT_OCI_MANIFEST))


@dataclass(frozen=True)
class Image:
    repo: str
    tag: str
    manifest_digest: str
    config: tuple[str, int]
    layers: tuple[tuple[str, int], ...]

    @property
    def layer_bytes(self) -> int:
        return sum(size for _, size in self.layers)


def seed_upstream(upstream: DistributionRegistry, workdir: Path, sizes: dict[str, Sequence[int]],
                  tls_upstream: DistributionRegistry | None = None) -> tuple[dict[str, Image], Image | None]:
    """Build the images in an OCI layout under ``workdir``, push them, read them back.

    With ``tls_upstream`` (an HTTPS registry) image A is pushed there too, skopeo
    verifying its certificate against the registry's CA; returns (images, A there).
    """
    layout_dir = workdir / "layout"
    layout = images.OciLayout(layout_dir)
    for key, layer_sizes in sizes.items():
        t0 = time.monotonic()
        add_random_image(layout, key, layer_sizes)
        log(f"generated image {key}: {len(layer_sizes)} layers, {sum(layer_sizes) / MIB:.0f} MiB "
            f"in {time.monotonic() - t0:.1f}s")
    out = {key: push_image(upstream, layout_dir, key) for key in sizes}
    tls_a = None
    if tls_upstream is not None:
        assert tls_upstream.ca_cert_path is not None
        cert_dir = workdir / "tls-upstream-certs"  # skopeo's --dest-cert-dir: *.crt are CAs
        cert_dir.mkdir()
        shutil.copyfile(tls_upstream.ca_cert_path, cert_dir / "ca.crt")
        tls_a = push_image(tls_upstream, layout_dir, "a", cert_dir=cert_dir)
        if tls_a.layers != out["a"].layers or tls_a.config != out["a"].config:
            raise BenchError("image A differs between the two upstreams")
    proc_util.remove_tree(layout_dir)  # the upstreams have their own copies
    return out, tls_a


def push_image(upstream: DistributionRegistry, layout_dir: Path, key: str, cert_dir: Path | None = None) -> Image:
    """Push ``key`` from the layout as ``bench/<key>:latest`` and read its manifest back."""
    t0 = time.monotonic()
    images.push(layout_dir, key, upstream.host_port, f"bench/{key}", "latest", fmt="v2s2", timeout=900,
                tls_verify=cert_dir is not None, cert_dir=cert_dir)
    log(f"pushed bench/{key}:latest to {upstream.url} in {time.monotonic() - t0:.1f}s")
    resp = upstream.client().get_manifest(f"bench/{key}", "latest")
    if resp.status != 200:
        raise BenchError(f"upstream GET manifest bench/{key}:latest -> {resp.status}")
    doc = json.loads(resp.body)
    return Image(f"bench/{key}", "latest", images.sha256_digest(resp.body),
                 (doc["config"]["digest"], int(doc["config"]["size"])),
                 tuple((layer["digest"], int(layer["size"])) for layer in doc["layers"]))


# --------------------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------------------

class Client:
    """One keep-alive HTTP/1.1 connection to host:port that reads bodies and discards them.

    With ``ssl_context`` the connection is HTTPS (the context says which CA to trust).
    """

    def __init__(self, port: int, timeout: float = HTTP_TIMEOUT, ssl_context: ssl.SSLContext | None = None) -> None:
        self.conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ssl_context)
                     if ssl_context is not None else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout))
        self.buf = bytearray(CHUNK)

    def close(self) -> None:
        self.conn.close()

    def get(self, path: str, headers: dict[str, str] | None = None, *, expect_size: int | None = None,
            expect_digest: str | None = None, keep: bool = False) -> tuple[int, float, bytes]:
        """GET ``path``; returns (body bytes, seconds to the first body byte, body if ``keep``).

        With ``expect_digest`` (``sha256:<hex>``) every chunk is hashed as it is read, like a
        real client (docker, containerd) verifies a blob, and a mismatch raises.
        """
        t0 = time.perf_counter()
        self.conn.request("GET", path, headers=headers or {})
        resp = self.conn.getresponse()
        if resp.status != 200:
            body = resp.read()
            raise BenchError(f"GET {path} -> {resp.status}: {body[:200]!r}")
        if keep:
            body = resp.read()
            if expect_digest is not None and images.sha256_digest(body) != expect_digest:
                raise BenchError(f"GET {path}: body does not match {expect_digest}")
            return len(body), time.perf_counter() - t0, body
        view = memoryview(self.buf)
        n = resp.readinto(view[:1])  # the first byte alone, for the time to first byte
        ttfb = time.perf_counter() - t0
        sha = hashlib.sha256() if expect_digest is not None else None
        if sha is not None:
            sha.update(view[:n])
        total = n
        for _ in range(1 << 30):  # bounded by the body's length; each read is <= 1 MiB
            n = resp.readinto(view)
            if not n:
                break
            if sha is not None:
                sha.update(view[:n])
            total += n
        if expect_size is not None and total != expect_size:
            raise BenchError(f"GET {path}: {total} bytes, expected {expect_size}")
        if sha is not None and f"sha256:{sha.hexdigest()}" != expect_digest:
            raise BenchError(f"GET {path}: body does not hash to {expect_digest}")
        return total, ttfb, b""


def manifest_path(image: Image) -> str:
    return f"/v2/{image.repo}/manifests/{image.tag}"


def blob_path(image: Image, digest: str) -> str:
    return f"/v2/{image.repo}/blobs/{digest}"


def store_blob_path(digest: str) -> str:
    """Where the mirror's store (and so nginx) has a blob: blobs/sha256/<2 hex>/<hex>."""
    hexd = digest.split(":", 1)[1]
    return f"/blobs/sha256/{hexd[:2]}/{hexd}"


def pull(port: int, image: Image, *, parallel: int = 1, registry: bool = True,
         path_for: Callable[[str], str] | None = None, verify: bool = False,
         ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """Pull ``image``: manifest by tag, config, layers (``parallel`` connections).

    ``registry=False`` skips manifest and config (for nginx, which only has files).
    ``verify`` hashes every body as it is read and checks it against its digest (the
    manifest's against the upstream's, the config's and the layers' against the
    manifest's descriptors), as a real client does; otherwise only lengths are checked.
    ``ssl_context``: pull over HTTPS, trusting what the context trusts.
    Returns wall seconds, MB/s of layer bytes, the first layer's time to first byte,
    and (sequential pulls) the CPU seconds the client's thread spent per GB of layers.
    """
    path_for = path_for or (lambda d: blob_path(image, d))
    t0 = time.perf_counter()
    cpu0 = time.thread_time()
    client = Client(port, ssl_context=ssl_context)
    try:
        layers = list(image.layers)
        if registry:
            _, _, body = client.get(manifest_path(image), {"Accept": ACCEPT}, keep=True,
                                    expect_digest=image.manifest_digest if verify else None)
            doc = json.loads(body)
            got = [(layer["digest"], int(layer["size"])) for layer in doc["layers"]]
            if got != layers:
                raise BenchError(f"{image.repo}: manifest layers differ from the upstream's")
            client.get(path_for(doc["config"]["digest"]), expect_size=int(doc["config"]["size"]),
                       expect_digest=doc["config"]["digest"] if verify else None)
        ttfbs: dict[str, float] = {}
        if parallel <= 1:
            for digest, size in layers:
                _, ttfb, _ = client.get(path_for(digest), expect_size=size, expect_digest=digest if verify else None)
                ttfbs[digest] = ttfb
        else:
            errors: list[BaseException] = []
            lock = threading.Lock()

            def worker(part: list[tuple[str, int]]) -> None:
                c = Client(port, ssl_context=ssl_context)
                try:
                    for digest, size in part:
                        _, ttfb, _ = c.get(path_for(digest), expect_size=size,
                                           expect_digest=digest if verify else None)
                        with lock:
                            ttfbs[digest] = ttfb
                except BaseException as e:
                    errors.append(e)
                finally:
                    c.close()

            parts = [layers[i::parallel] for i in range(parallel)]
            threads = [threading.Thread(target=worker, args=(p,), daemon=True) for p in parts if p]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=HTTP_TIMEOUT * (len(layers) + 1))
            if errors:
                raise BenchError(f"parallel pull failed: {errors[0]}")
            if any(t.is_alive() for t in threads):
                raise BenchError("parallel pull timed out")
    finally:
        client.close()
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {"wall_s": wall, "mb_s": image.layer_bytes / wall / 1e6,
                           "ttfb_first_layer_ms": ttfbs[layers[0][0]] * 1e3, "verified": verify}
    if parallel <= 1:  # one thread did all the work
        out["client_cpu_s_per_gb"] = (time.thread_time() - cpu0) / (image.layer_bytes / 1e9)
    return out


def fan_in(port: int, image: Image, clients: int) -> dict[str, float]:
    """``clients`` threads, released together, each pulling ``image`` sequentially."""
    barrier = threading.Barrier(clients + 1, timeout=60)
    results: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            barrier.wait()
            r = pull(port, image)
            with lock:
                results.append(r["wall_s"])
        except BaseException as e:
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    deadline = time.monotonic() + HTTP_TIMEOUT * (len(image.layers) + 2)
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    wall = time.perf_counter() - t0
    if errors:
        raise BenchError(f"fan-in: {len(errors)} of {clients} clients failed, first: {errors[0]}")
    if any(t.is_alive() for t in threads):
        raise BenchError("fan-in: clients still running at the deadline")
    total = image.layer_bytes * clients
    return {"wall_s": wall, "aggregate_mb_s": total / wall / 1e6,
            "client_wall_median_s": statistics.median(results), "client_wall_max_s": max(results)}


# --------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------

class ProxyRegistry(DistributionRegistry):
    """Distribution as a pull-through cache (``proxy.remoteurl``) with its own storage."""

    def __init__(self, workdir: Path, remote_url: str, env: dict[str, str] | None = None) -> None:
        super().__init__(workdir, env=env)
        self.remote_url = remote_url

    def config(self) -> dict[str, object]:
        cfg = super().config()
        cfg["proxy"] = {"remoteurl": self.remote_url}
        return cfg


class Server:
    """A server under test, started fresh (empty store) by :meth:`start`."""

    name = ""  # its key in the results
    label = ""

    def __init__(self, root: Path, upstream: DistributionRegistry) -> None:
        self.root = root
        self.upstream = upstream
        self.generation = 0
        self.workdir: Path | None = None

    @property
    def title(self) -> str:
        """Its name in the log (and its work dirs'): the name, and which upstream if HTTPS."""
        return f"{self.name}-https" if self.upstream.tls else self.name

    @property
    def pid(self) -> int: ...

    @property
    def port(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def alive(self) -> bool: ...

    def blob_file(self, digest: str) -> Path: ...

    def new_workdir(self) -> Path:
        self.generation += 1
        self.workdir = self.root / f"{self.title}-{self.generation}"
        self.workdir.mkdir(parents=True)
        return self.workdir

    def wipe(self) -> None:
        if self.workdir is not None:
            proc_util.remove_tree(self.workdir)
            self.workdir = None


CODE_SEEN: set[str] = set()


def mirror_code_hash(src: Path) -> str:
    """sha256 over the mirror's sources (mirror/**/*.py, the twistd plugin) under ``src`` now."""
    h = hashlib.sha256()
    for path in sorted([*(src / "mirror").rglob("*.py"), *(src / "twisted" / "plugins").glob("*.py")]):
        h.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20,
                                  stdin=subprocess.DEVNULL).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"head": git("rev-parse", "HEAD"), "head_subject": git("log", "-1", "--format=%s"),
            "dirty": git("status", "--short", "--", "mirror", "twisted", "setup.py").splitlines()}


class MirrorServer(Server):
    """``twistd -n mirror`` run from ``src`` (a ``git archive`` of one commit, or the checkout).

    The config is the shipped defaults plus the listen address, the store's path and one
    upstream ``docker.io`` whose ``url`` is the upstream Distribution (for an HTTPS
    upstream, with ``ca_file`` its CA certificate).
    """

    name = "mirror"
    label = "mirror (twistd)"

    def __init__(self, root: Path, upstream: DistributionRegistry, src: Path, workers: int = 1) -> None:
        super().__init__(root, upstream)
        self.src = src
        self.workers = workers
        if workers > 1:
            self.name, self.label = f"mirror-w{workers}", f"mirror (twistd, workers: {workers})"
        self.proc: proc_util.ManagedProcess | None = None
        self._port = 0

    def start(self) -> None:
        CODE_SEEN.add(mirror_code_hash(self.src))  # the checkout may change under a long run
        w = self.new_workdir()
        self._port = free_port()
        upstream: dict[str, str] = {"registry": "docker.io", "url": self.upstream.url}
        if self.upstream.ca_cert_path is not None:
            upstream["ca_file"] = str(self.upstream.ca_cert_path)
        config: dict[str, Any] = {"listen": f"tcp:{self._port}:interface=127.0.0.1",
                                  "storage": {"root": str(w / "store")}, "upstreams": [upstream]}
        if self.workers > 1:
            config["workers"] = self.workers
        (w / "mirror.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
        argv = [TWISTD, "--nodaemon", "--pidfile=", "--logfile", str(w / "mirror.log"), "mirror",
                "--config", str(w / "mirror.yaml")]
        self.proc = proc_util.ManagedProcess(argv, stdout=w / "twistd.out", cwd=self.src, env=mirror_env(self.src))
        if not proc_util.wait_until(lambda: self._ready() or not self.alive(), 30):
            self.stop()
            raise BenchError("mirror did not start: " + self.log_tail())
        if not self.alive():
            raise BenchError("mirror exited at start-up: " + self.log_tail())

    def _ready(self) -> bool:
        return answers(self._port)

    def log_tail(self) -> str:
        w = self.workdir
        if w is None:
            return ""
        return proc_util.tail_file(w / "twistd.out") + "\n" + proc_util.tail_file(w / "mirror.log")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        return self._port

    @property
    def store(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "store"

    def blob_file(self, digest: str) -> Path:
        return self.store / store_blob_path(digest).lstrip("/")


def answers(port: int) -> bool:
    """Whether a registry on 127.0.0.1:``port`` answers ``GET /v2/`` with 200."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


def mirror_env(src: Path) -> dict[str, str]:
    """The environment for twistd: ``src`` first on sys.path, no proxies."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "pythonpath")}
    env["PYTHONPATH"] = str(src)
    return env


def export_mirror(ref: str, dest: Path) -> dict[str, str]:
    """``git archive REF`` of the mirror's code into ``dest``; returns the commit and its subject.

    The benchmark runs the mirror from this copy, so commits or edits made in the
    checkout while it runs do not change what is measured.
    """
    def git(*args: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(["git", "-C", str(REPO), *args], timeout=120, check=True, stdin=subprocess.DEVNULL,
                              **kw)
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}", capture_output=True, text=True).stdout.strip()
    subject = git("log", "-1", "--format=%s", commit, capture_output=True, text=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = git("archive", "--format=tar", commit, "mirror", "twisted", capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tf:
        tf.extractall(dest)  # our own repository's files
    # check that a twistd started there imports this copy, not the checkout
    res = subprocess.run([sys.executable, "-c", "import mirror.tap, sys; print(mirror.tap.__file__)"],
                         cwd=dest, env=mirror_env(dest), capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    where = res.stdout.strip()
    if res.returncode != 0 or not where.startswith(str(dest)):
        raise BenchError(f"the exported mirror does not import from {dest}: {where or res.stderr[-500:]}")
    return {"commit": commit, "subject": subject, "imported_from": where}


class DistributionProxyServer(Server):
    name = "distribution"
    label = "Distribution 2.8.2 proxy"

    def __init__(self, root: Path, upstream: DistributionRegistry) -> None:
        super().__init__(root, upstream)
        self.reg: ProxyRegistry | None = None

    def start(self) -> None:
        env = None
        if self.upstream.ca_cert_path is not None:  # Go on Linux takes its root CAs from SSL_CERT_FILE
            env = {**os.environ, "SSL_CERT_FILE": str(self.upstream.ca_cert_path)}
        self.reg = ProxyRegistry(self.new_workdir(), self.upstream.url, env)
        self.reg.start()

    def stop(self) -> None:
        if self.reg is not None:
            self.reg.close()
            self.reg = None

    def alive(self) -> bool:
        return self.reg is not None and self.reg.running

    @property
    def pid(self) -> int:
        assert self.reg is not None and self.reg.pid is not None
        return self.reg.pid

    @property
    def port(self) -> int:
        assert self.reg is not None
        return self.reg.port

    def blob_file(self, digest: str) -> Path:
        assert self.reg is not None
        hexd = digest.split(":", 1)[1]
        return self.reg.data_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


@contextmanager
def running(server: Server) -> Iterator[Server]:
    """A fresh instance of ``server`` (empty store), stopped and wiped afterwards."""
    remove = REAPER.add(server.title, server.stop)
    try:
        server.start()
        yield server
    finally:
        remove()
        try:
            server.stop()
        finally:
            server.wipe()


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------

def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssWatch:
    """Peak RSS of one process over a phase: VmHWM (reset at the start) and sampled VmRSS."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.sampled_kib = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssWatch:
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open(f"/proc/{self.pid}/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            pass
        self._thread.start()
        return self

    def _run(self) -> None:
        for _ in range(10_000_000):  # bounded; ends with the phase
            rss = _status_kib(self.pid, "VmRSS")
            if rss is not None:
                self.sampled_kib = max(self.sampled_kib, rss)
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.hwm_kib = _status_kib(self.pid, "VmHWM") or 0

    @property
    def peak_mib(self) -> float:
        return max(self.hwm_kib, self.sampled_kib) / 1024


# --------------------------------------------------------------------------------------
# CPU time
# --------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3, the state, is [0])."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()  # the name may hold spaces and parentheses


def tree_cpu(pid: int) -> tuple[float, frozenset[int]]:
    """CPU seconds (user + system) used so far by ``pid`` and every process below it.

    For each process of the tree (found through the parent PIDs of /proc/*/stat): utime +
    stime, which count all its threads, plus cutime + cstime, which count the children it
    has already reaped (so a worker that exits between two readings is not lost).
    Returns (seconds, the PIDs counted).
    """
    stats: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    ticks, counted, todo = 0, set[int](), [pid]
    for _ in range(len(stats) + 1):  # a tree has at most that many members
        if not todo:
            break
        p = todo.pop()
        if p in counted or p not in stats:
            continue
        counted.add(p)
        ticks += sum(int(x) for x in stats[p][11:15])  # utime stime cutime cstime: fields 14-17
        todo += children.get(p, [])
    return ticks / CLK_TCK, frozenset(counted)


def wait_idle(pid: int, timeout: float = 15.0, window: float = 0.5) -> float:
    """Seconds until ``pid``'s process tree is idle: over ``window`` seconds it used at most
    one clock tick of CPU and no process joined or left it.

    A server just started may still be busy with start-up work (the mirror's first periodic
    GC runs at once, as a child process); that is not the cost of the phase that follows.
    After ``timeout`` it gives up and the phase is measured anyway.
    """
    t0 = time.monotonic()
    cpu, pids = tree_cpu(pid)
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        cpu2, pids2 = tree_cpu(pid)
        if cpu2 - cpu <= 1.5 / CLK_TCK and pids2 == pids:
            break
        cpu, pids = cpu2, pids2
    else:
        log(f"process {pid} still busy after {timeout:.0f}s; measuring anyway")
    return time.monotonic() - t0


class CpuWatch:
    """CPU seconds used by a process tree between ``__enter__`` and ``__exit__``."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.cpu_s: float | None = None
        self.procs = 0

    def __enter__(self) -> CpuWatch:
        self._start = tree_cpu(self.pid)[0] if self.pid is not None else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pid is not None:
            end, pids = tree_cpu(self.pid)
            self.procs = len(pids)
            self.cpu_s = end - self._start if pids else None  # None: the process is gone

    def per_gb(self, nbytes: int) -> float | None:
        return None if self.cpu_s is None else self.cpu_s / (nbytes / 1e9)


# --------------------------------------------------------------------------------------
# upstream access log
# --------------------------------------------------------------------------------------

def upstream_counts(upstream: DistributionRegistry, since: int, image: Image) -> dict[str, Any]:
    """GETs and HEADs per blob of ``image`` and manifest requests, from the access log since ``since``."""
    gets: Counter[str] = Counter()
    heads: Counter[str] = Counter()
    manifest_gets = manifest_heads = 0
    for e in upstream.access_log(since):
        m = BLOB_GET_RE.match(e.path)
        if m and m["repo"] == image.repo:
            (gets if e.method == "GET" else heads if e.method == "HEAD" else Counter())[m["digest"]] += 1
            continue
        m = MANIFEST_RE.match(e.path)
        if m and m["repo"] == image.repo:
            manifest_gets += e.method == "GET"
            manifest_heads += e.method == "HEAD"
    per_blob = [gets.get(d, 0) for d, _ in image.layers]
    return {"blob_gets_total": sum(per_blob), "blob_gets_min": min(per_blob), "blob_gets_max": max(per_blob),
            "blob_gets_per_blob": sum(per_blob) / len(per_blob),
            "blob_heads_total": sum(heads.get(d, 0) for d, _ in image.layers),
            "manifest_gets": manifest_gets, "manifest_heads": manifest_heads}


def settled_mark(upstream: DistributionRegistry, timeout: float = 5.0) -> int:
    """The access-log length once it stopped growing (lines are written after responses)."""
    last = -1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = upstream.mark()
        if n == last:
            return n
        last = n
        time.sleep(0.3)
    return upstream.mark()


# --------------------------------------------------------------------------------------
# wrk and nginx
# --------------------------------------------------------------------------------------

_WRK_LATENCY_RE = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(url: str, workdir: Path, seconds: int, connections: int = 16) -> dict[str, float]:
    """``wrk -t1 -c16 --latency`` with the manifest Accept header; req/s, p50, p99 (ms)."""
    if WRK is None:
        raise BenchError("wrk is not installed (apt-get install wrk)")
    script = workdir / "accept.lua"
    script.write_text(f'wrk.method = "GET"\nwrk.headers["Accept"] = "{ACCEPT}"\n')
    res = proc_util.run([WRK, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
                         "-s", str(script), url], timeout=seconds + 60, what="wrk")
    out = res.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = {p: float(v) * _UNIT_MS[u] for p, v, u in _WRK_LATENCY_RE.findall(out)}
    if rps is None or "50" not in lat or "99" not in lat:
        raise BenchError(f"cannot parse wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock_err = re.search(r"Socket errors:(.*)", out)
    total = re.search(r"(\d+) requests in", out)
    return {"rps": float(rps.group(1)), "p50_ms": lat["50"], "p99_ms": lat["99"],
            "requests": int(total.group(1)) if total else 0,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sock_err.group(1).strip() if sock_err else ""}


def nginx_pull(store: Path, workdir: Path, image: Image) -> dict[str, float]:
    """Serve ``store`` with nginx (sendfile on) and pull the image's layer files from it."""
    if not Path(NGINX).exists():
        raise BenchError("nginx is not installed (apt-get install nginx-light)")
    port = free_port()
    prefix = workdir / "nginx"
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
daemon off;
user root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp_body;
    proxy_temp_path {prefix}/tmp_proxy;
    fastcgi_temp_path {prefix}/tmp_fastcgi;
    uwsgi_temp_path {prefix}/tmp_uwsgi;
    scgi_temp_path {prefix}/tmp_scgi;
    server {{
        listen 127.0.0.1:{port};
        root {store};
        default_type application/octet-stream;
    }}
}}
""")
    proc = proc_util.ManagedProcess([NGINX, "-p", str(prefix), "-c", str(conf)], stdout=prefix / "logs" / "stdout.log")
    with tracked("nginx", proc.stop):
        if not proc_util.wait_until(lambda: port_is_open(port) or not proc.alive(), 10):
            raise BenchError("nginx did not start")
        if not proc.alive():
            raise BenchError("nginx exited: " + proc.log_tail() + proc_util.tail_file(prefix / "logs" / "error.log"))
        return pull(port, image, registry=False, path_for=store_blob_path)


# --------------------------------------------------------------------------------------
# py-spy (optional)
# --------------------------------------------------------------------------------------

@contextmanager
def py_spy(pid: int, out: Path | None) -> Iterator[None]:
    """``py-spy record`` the mirror during a phase, if ``out`` is given."""
    if out is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = proc_util.ManagedProcess([PY_SPY, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                                     "--output", str(out), "--nonblocking", "--threads"], stdout=out.with_suffix(".log"))

    def stop() -> None:
        if proc.alive():
            proc.popen.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        proc.stop()

    with tracked("py-spy", stop):
        time.sleep(0.5)  # let it attach
        yield


# --------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------

@dataclass
class Options:
    runs: int
    quick: bool
    fanin_a: bool
    https: bool
    workers: int
    wrk_seconds: int
    spy_dir: Path | None
    deadline: Deadline
    quiet_wait: float


def measured_cold_pull(server: Server, image: Image, upstream: DistributionRegistry, *, verify: bool) -> dict[str, Any]:
    """A sequential pull of ``image`` from ``server`` and the wait until its store holds it,
    with the CPU time the server (its whole process tree) and the upstream used meanwhile.
    It starts once the server is idle (:func:`wait_idle`)."""
    idle_after = wait_idle(server.pid)
    with CpuWatch(server.pid) as cpu, CpuWatch(upstream.pid) as up_cpu:
        r = pull(server.port, image, verify=verify)
        r["cache_complete_after_s"] = wait_cached(server, image)
    r.update({"server_idle_wait_s": idle_after, "server_cpu_s": cpu.cpu_s, "server_cpu_s_per_gb": cpu.per_gb(image.layer_bytes),
              "server_processes": cpu.procs, "upstream_cpu_s_per_gb": up_cpu.per_gb(image.layer_bytes)})
    return r


def direct_pull(upstream: DistributionRegistry, image: Image, *, verify: bool = False,
                ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """A sequential pull of ``image`` straight from ``upstream``, with the upstream's CPU time."""
    with CpuWatch(upstream.pid) as up_cpu:
        r = pull(upstream.port, image, verify=verify, ssl_context=ssl_context)
    r["upstream_cpu_s_per_gb"] = up_cpu.per_gb(image.layer_bytes)
    return r


def fresh_cold_pull(server: Server, image: Image, upstream: DistributionRegistry, opts: Options, run_no: int,
                    name: str, *, verify: bool, spy_out: Path | None = None) -> dict[str, Any]:
    """Start ``server`` on an empty store and measure one cold pull (:func:`measured_cold_pull`);
    the result carries the peak RSS meanwhile as ``rss_mib``."""
    opts.deadline.check(f"{server.title} {name}")
    settle()
    with running(server):
        log(f"run {run_no} {server.title}: {name}")
        with RssWatch(server.pid) as w, py_spy(server.pid, spy_out):
            r = measured_cold_pull(server, image, upstream, verify=verify)
    r["rss_mib"] = w.peak_mib
    return r


def bench_server(server: Server, imgs: dict[str, Image], upstream: DistributionRegistry, opts: Options,
                 run_no: int, scratch: Path) -> dict[str, Any]:
    """All phases for one server, on fresh stores."""
    a, b, c = imgs["a"], imgs["b"], imgs["c"]
    r: dict[str, Any] = {}
    rss: dict[str, float] = {}

    def spy(phase: str) -> Path | None:
        if opts.spy_dir is not None and server.name == "mirror":
            return opts.spy_dir / f"run{run_no}-{phase}.txt"
        return None

    def phase(name: str) -> None:
        opts.deadline.check(f"{server.name} {name}")
        if not server.alive():
            raise BenchError(f"{server.name} died before {name}")
        settle()
        log(f"run {run_no} {server.name}: {name}")

    with running(server):
        phase("cold pull A")
        with RssWatch(server.pid) as w, py_spy(server.pid, spy("cold")):
            r["cold"] = measured_cold_pull(server, a, upstream, verify=False)
        rss["cold"] = w.peak_mib

        phase("warm pull A")
        with RssWatch(server.pid) as w, py_spy(server.pid, spy("warm")):
            r["warm"] = pull(server.port, a)
            r["warm_par3"] = pull(server.port, a, parallel=3)
        rss["warm"] = w.peak_mib

        if isinstance(server, MirrorServer):
            phase("nginx on the mirror's store")
            r["nginx"] = nginx_pull(server.store, scratch, a)

        phase(f"fan-in B ({FANIN_CLIENTS} clients)")
        mark = settled_mark(upstream)
        with RssWatch(server.pid) as w, py_spy(server.pid, spy("fanin_b")):
            r["fanin_b"] = fan_in(server.port, b, FANIN_CLIENTS)
        rss["fanin_b"] = w.peak_mib
        settled_mark(upstream)  # access-log lines are written as responses end
        r["fanin_b"].update(upstream_counts(upstream, mark, b))

        phase("manifest req/s")
        pull(server.port, c)  # cache C (manifest by tag, config, layer)
        wait_cached(server, c)
        with RssWatch(server.pid) as w, py_spy(server.pid, spy("wrk_tag")):
            for key, ref in (("wrk_tag", c.tag), ("wrk_digest", c.manifest_digest)):
                mark = settled_mark(upstream)
                r[key] = run_wrk(f"http://127.0.0.1:{server.port}/v2/{c.repo}/manifests/{ref}", scratch,
                                 opts.wrk_seconds)
                settled_mark(upstream)
                counts = upstream_counts(upstream, mark, c)
                r[key]["upstream_manifest_requests"] = counts["manifest_gets"] + counts["manifest_heads"]
                r[key]["upstream_requests"] = len(upstream.access_log(mark))
                r[key]["upstream_v2_pings"] = sum(1 for e in upstream.access_log(mark) if e.path in ("/v2/", "/v2"))
        rss["wrk"] = w.peak_mib

    r["cold_verified"] = fresh_cold_pull(server, a, upstream, opts, run_no,
                                         "cold pull A, client-verified (fresh store)", verify=True,
                                         spy_out=spy("cold_verified"))
    rss["cold_verified"] = r["cold_verified"].pop("rss_mib")

    phase_name = "cold pull A, 3 layers in parallel (fresh store)"
    opts.deadline.check(phase_name)
    settle()
    with running(server):
        log(f"run {run_no} {server.name}: {phase_name}")
        with RssWatch(server.pid) as w:
            r["cold_par3"] = pull(server.port, a, parallel=3)
        rss["cold_par3"] = w.peak_mib

    if opts.fanin_a:
        phase_name = f"fan-in A ({FANIN_CLIENTS} clients, fresh store)"
        opts.deadline.check(phase_name)
        settle()
        with running(server):
            log(f"run {run_no} {server.name}: {phase_name}")
            mark = settled_mark(upstream)
            with RssWatch(server.pid) as w, py_spy(server.pid, spy("fanin_a")):
                r["fanin_a"] = fan_in(server.port, a, FANIN_CLIENTS)
            rss["fanin_a"] = w.peak_mib
            settled_mark(upstream)
            r["fanin_a"].update(upstream_counts(upstream, mark, a))

    r["rss_mib"] = rss
    r["rss_mib"]["max"] = max(rss.values())
    return r


def bench_workers(server: MirrorServer, imgs: dict[str, Image], upstream: DistributionRegistry, opts: Options,
                  run_no: int, scratch: Path) -> dict[str, Any]:
    """The mirror with ``workers: N`` on a fresh store: the 20-client fan-in of B (and its
    upstream GETs per blob: one fetch per blob across the workers), then wrk on C's manifest
    by tag, as in :func:`bench_server`."""
    b, c = imgs["b"], imgs["c"]
    r: dict[str, Any] = {}
    opts.deadline.check(f"{server.name} fan-in B")
    settle()
    with running(server):
        log(f"run {run_no} {server.name}: fan-in B ({FANIN_CLIENTS} clients)")
        mark = settled_mark(upstream)
        with RssWatch(server.pid) as w:
            r["fanin_b"] = fan_in(server.port, b, FANIN_CLIENTS)
        settled_mark(upstream)
        r["fanin_b"].update(upstream_counts(upstream, mark, b))
        log(f"run {run_no} {server.name}: manifest req/s")
        pull(server.port, c)
        wait_cached(server, c)
        mark = settled_mark(upstream)
        r["wrk_tag"] = run_wrk(f"http://127.0.0.1:{server.port}/v2/{c.repo}/manifests/{c.tag}", scratch,
                               opts.wrk_seconds)
        settled_mark(upstream)
        counts = upstream_counts(upstream, mark, c)
        r["wrk_tag"]["upstream_manifest_requests"] = counts["manifest_gets"] + counts["manifest_heads"]
        r["rss_mib_supervisor"] = w.peak_mib
    return r


@dataclass
class HttpsSetup:
    """The HTTPS upstream (Distribution with a certificate made at start), image A on it,
    the servers in front of it, and an SSL context that trusts it (for direct pulls)."""

    upstream: DistributionRegistry
    image: Image
    servers: list[Server]
    context: ssl.SSLContext


def bench_https(run_no: int, https: HttpsSetup, opts: Options, out: dict[str, Any]) -> None:
    """The HTTPS-upstream phases of one run, into ``out``: the direct pulls of A from the
    upstream (``https_upstream_direct*``), then per server, each on a fresh store, a cold
    pull of A with the verifying client and one without (``<server>.https_cold*``)."""
    up, a = https.upstream, https.image
    opts.deadline.check("the HTTPS phase")
    settle()
    log(f"run {run_no}: direct pull from the HTTPS upstream")
    out["https_upstream_direct"] = direct_pull(up, a, ssl_context=https.context)
    out["https_upstream_direct_verified"] = direct_pull(up, a, verify=True, ssl_context=https.context)
    order = https.servers if run_no % 2 == 1 else list(reversed(https.servers))
    for server in order:
        r = out.setdefault(server.name, {})
        rss = r.setdefault("rss_mib", {})
        for key, verify, what in (("https_cold_verified", True, "client-verified"),
                                  ("https_cold", False, "unverified client")):
            spy_out = opts.spy_dir / f"run{run_no}-{key}.txt" if opts.spy_dir and server.name == "mirror" else None
            r[key] = fresh_cold_pull(server, a, up, opts, run_no, f"cold pull A from the HTTPS upstream, {what} "
                                     "(fresh store)", verify=verify, spy_out=spy_out)
            rss[key] = r[key].pop("rss_mib")
        rss["max"] = max(rss.values())


def cpu_busy(interval: float = 2.0) -> float:
    """Fraction of the machine's CPU time that was busy over ``interval`` seconds (/proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle
    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(opts: Options) -> dict[str, float]:
    """Wait (at most ``opts.quiet_wait`` s) until the machine is < 15 % busy for 2 s.

    Between runs our own servers are idle, so what is busy is someone else (a shared
    machine). This keeps a run from starting in the middle of another test suite, but
    cannot stop one from starting later: the load is recorded either way.
    """
    t0 = time.monotonic()
    limit = min(opts.quiet_wait, max(0.0, opts.deadline.left() - 60))
    busy = cpu_busy()
    announced = False
    for _ in range(100_000):
        if busy < 0.15 or time.monotonic() - t0 >= limit:
            break
        if not announced:
            log(f"machine {100 * busy:.0f}% busy: waiting up to {limit:.0f}s for it to be quiet")
            announced = True
        busy = cpu_busy()
    return {"waited_s": time.monotonic() - t0, "cpu_busy_at_start": busy}


def settle() -> None:
    """Flush dirty pages before a phase (outside its timing).

    Distribution does not fsync what it caches, so without this a warm pull right after
    a cold one competes with the kernel writing back the 768 MiB just cached; the mirror
    fsyncs before it commits a blob.  Syncing first measures both on a quiet disk.
    """
    os.sync()


def wait_cached(server: Server, image: Image, timeout: float = 180.0) -> float:
    """Seconds until every layer of ``image`` is a committed file in the server's store.

    The mirror commits a blob before it sends its last byte, so this is 0 for it.
    Distribution 2.8's proxy fetches a missing blob twice: once streamed to the client,
    once by a background goroutine into its storage; a "warm" pull right after a cold
    one would otherwise still be served from the upstream.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if all(server.blob_file(d).is_file() and server.blob_file(d).stat().st_size == size
               for d, size in image.layers):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise BenchError(f"{server.name}: {image.repo} not in its store {timeout:.0f}s after the pull")


def one_run(run_no: int, servers: list[Server], imgs: dict[str, Image], upstream: DistributionRegistry,
            opts: Options, scratch: Path, https: HttpsSetup | None) -> dict[str, Any]:
    opts.deadline.check(f"run {run_no}")
    quiet = wait_quiet(opts) if opts.quiet_wait > 0 else {"cpu_busy_at_start": cpu_busy(1.0)}
    out: dict[str, Any] = {"run": run_no, "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           "loadavg_start": os.getloadavg(), **quiet}
    settle()
    log(f"run {run_no}: direct pull from the upstream")
    out["upstream_direct"] = direct_pull(upstream, imgs["a"])
    out["upstream_direct_verified"] = direct_pull(upstream, imgs["a"], verify=True)
    out["upstream_direct_par3"] = pull(upstream.port, imgs["a"], parallel=3)
    log(f"run {run_no}: fan-in B straight from the upstream ({FANIN_CLIENTS} clients)")
    out["upstream_fanin_b"] = fan_in(upstream.port, imgs["b"], FANIN_CLIENTS)
    if opts.fanin_a:
        opts.deadline.check("direct fan-in A")
        settle()
        log(f"run {run_no}: fan-in A straight from the upstream ({FANIN_CLIENTS} clients)")
        out["upstream_fanin_a"] = fan_in(upstream.port, imgs["a"], FANIN_CLIENTS)
    c = imgs["c"]
    out["upstream_wrk_digest"] = run_wrk(f"{upstream.url}/v2/{c.repo}/manifests/{c.manifest_digest}", scratch,
                                         opts.wrk_seconds)
    # alternate the order so neither server always goes first
    order = servers if run_no % 2 == 1 else list(reversed(servers))
    for server in order:
        if isinstance(server, MirrorServer) and server.workers > 1:
            out["mirror_workers"] = bench_workers(server, imgs, upstream, opts, run_no, scratch)
        else:
            out[server.name] = bench_server(server, imgs, upstream, opts, run_no, scratch)
    if https is not None:
        bench_https(run_no, https, opts, out)
    out["loadavg_end"] = os.getloadavg()
    return out


# --------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------

# (key, label, path into a server's result, higher_is_better)
METRICS: list[tuple[str, str, tuple[str, ...], bool]] = [
    ("cold_wall", "cold pull A, sequential: wall s", ("cold", "wall_s"), False),
    ("cold_mbs", "cold pull A, sequential: MB/s", ("cold", "mb_s"), True),
    ("cold_ttfb", "cold pull A: TTFB of first layer, ms", ("cold", "ttfb_first_layer_ms"), False),
    ("cold_settle", "cold pull A: s until the cache holds A after the client is done",
     ("cold", "cache_complete_after_s"), False),
    ("cold_cpu_gb", "cold pull A: server CPU-s per GB (its process tree, until the cache holds A)",
     ("cold", "server_cpu_s_per_gb"), False),
    ("cold_verified_mbs", "cold pull A, client-verified (fresh store): MB/s", ("cold_verified", "mb_s"), True),
    ("cold_verified_ttfb", "cold pull A, client-verified: TTFB of first layer, ms",
     ("cold_verified", "ttfb_first_layer_ms"), False),
    ("cold_verified_cpu_gb", "cold pull A, client-verified: server CPU-s per GB",
     ("cold_verified", "server_cpu_s_per_gb"), False),
    ("cold_par3_mbs", "cold pull A, 3 layers in parallel: MB/s", ("cold_par3", "mb_s"), True),
    ("warm_mbs", "warm pull A, sequential: MB/s", ("warm", "mb_s"), True),
    ("warm_par3_mbs", "warm pull A, 3 layers in parallel: MB/s", ("warm_par3", "mb_s"), True),
    ("fanin_b_wall", "fan-in B, 20 clients cold: wall s", ("fanin_b", "wall_s"), False),
    ("fanin_b_gets", "fan-in B: upstream GETs per blob (mean)", ("fanin_b", "blob_gets_per_blob"), False),
    ("fanin_b_gets_max", "fan-in B: upstream GETs per blob (max)", ("fanin_b", "blob_gets_max"), False),
    ("fanin_a_wall", "fan-in A, 20 clients cold: wall s", ("fanin_a", "wall_s"), False),
    ("fanin_a_mbs", "fan-in A: aggregate MB/s to clients", ("fanin_a", "aggregate_mb_s"), True),
    ("fanin_a_gets", "fan-in A: upstream GETs per blob (mean)", ("fanin_a", "blob_gets_per_blob"), False),
    ("fanin_a_gets_max", "fan-in A: upstream GETs per blob (max)", ("fanin_a", "blob_gets_max"), False),
    ("tag_rps", "manifest by tag (cached), 16 conns: req/s", ("wrk_tag", "rps"), True),
    ("tag_p50", "manifest by tag: p50 ms", ("wrk_tag", "p50_ms"), False),
    ("tag_p99", "manifest by tag: p99 ms", ("wrk_tag", "p99_ms"), False),
    ("tag_upstream", "manifest by tag: upstream requests during it (all kinds)",
     ("wrk_tag", "upstream_requests"), False),
    ("digest_rps", "manifest by digest, 16 conns: req/s", ("wrk_digest", "rps"), True),
    ("digest_p50", "manifest by digest: p50 ms", ("wrk_digest", "p50_ms"), False),
    ("digest_p99", "manifest by digest: p99 ms", ("wrk_digest", "p99_ms"), False),
    ("digest_upstream", "manifest by digest: upstream requests during it (all kinds)",
     ("wrk_digest", "upstream_requests"), False),
    ("rss_cold", "peak RSS, cold pull A: MiB", ("rss_mib", "cold"), False),
    ("https_cold_verified_mbs", "HTTPS upstream: cold pull A, client-verified (fresh store): MB/s",
     ("https_cold_verified", "mb_s"), True),
    ("https_cold_verified_ttfb", "HTTPS upstream: cold pull A, client-verified: TTFB of first layer, ms",
     ("https_cold_verified", "ttfb_first_layer_ms"), False),
    ("https_cold_verified_cpu_gb", "HTTPS upstream: cold pull A, client-verified: server CPU-s per GB",
     ("https_cold_verified", "server_cpu_s_per_gb"), False),
    ("https_cold_mbs", "HTTPS upstream: cold pull A, unverified client (fresh store): MB/s", ("https_cold", "mb_s"), True),
    ("https_cold_cpu_gb", "HTTPS upstream: cold pull A, unverified client: server CPU-s per GB",
     ("https_cold", "server_cpu_s_per_gb"), False),
    ("rss_cold_verified", "peak RSS, cold pull A, client-verified: MiB", ("rss_mib", "cold_verified"), False),
    ("rss_https_cold_verified", "peak RSS, HTTPS upstream: cold pull A, client-verified: MiB",
     ("rss_mib", "https_cold_verified"), False),
    ("rss_cold_par3", "peak RSS, cold pull A, 3 in parallel: MiB", ("rss_mib", "cold_par3"), False),
    ("rss_warm", "peak RSS, warm pull A: MiB", ("rss_mib", "warm"), False),
    ("rss_fanin_b", "peak RSS, fan-in B: MiB", ("rss_mib", "fanin_b"), False),
    ("rss_fanin_a", "peak RSS, fan-in A (20 clients x image A): MiB", ("rss_mib", "fanin_a"), False),
    ("rss_wrk", "peak RSS, manifest req/s: MiB", ("rss_mib", "wrk"), False),
    ("rss_max", "peak RSS, all phases: MiB", ("rss_mib", "max"), False),
]

REFERENCES: list[tuple[str, str, tuple[str, ...]]] = [
    ("upstream_mbs", "upstream Distribution direct, sequential: MB/s", ("upstream_direct", "mb_s")),
    ("upstream_par3_mbs", "upstream Distribution direct, 3 in parallel: MB/s", ("upstream_direct_par3", "mb_s")),
    ("upstream_ttfb", "upstream Distribution direct: TTFB of first layer, ms", ("upstream_direct", "ttfb_first_layer_ms")),
    ("upstream_fanin_b_wall", "upstream Distribution direct: fan-in B, 20 clients: wall s", ("upstream_fanin_b", "wall_s")),
    ("upstream_fanin_a_wall", "upstream Distribution direct: fan-in A, 20 clients: wall s", ("upstream_fanin_a", "wall_s")),
    ("nginx_mbs", "nginx sendfile on the mirror's store, sequential: MB/s", ("mirror", "nginx", "mb_s")),
    ("upstream_digest_rps", "upstream Distribution (not a proxy): manifest by digest, 16 conns: req/s",
     ("upstream_wrk_digest", "rps")),
    ("upstream_digest_p50", "upstream Distribution (not a proxy): manifest by digest: p50 ms",
     ("upstream_wrk_digest", "p50_ms")),
]


def _cold_rows() -> list[tuple[str, str, str, tuple[str, ...], tuple[str, ...]]]:
    """The cold path side by side: every sequential pull of A by one client, each compared
    with the direct pull from the same upstream by the same kind of client (unverified or
    verifying) in the same run.  Rows: (upstream, from, client, path in a run, direct's path)."""
    rows = []
    for upstream, prefix in (("plain HTTP", ""), ("HTTPS", "https_")):
        for client, suffix in (("unverified", ""), ("verifies sha256", "_verified")):
            direct = (f"{prefix}upstream_direct{suffix}",)
            rows.append((upstream, "direct", client, direct, direct))
            for who, server in (("mirror", "mirror"), ("Distribution proxy", "distribution")):
                rows.append((upstream, who, client, (server, f"{prefix}cold{suffix}"), direct))
    return rows


COLD_ROWS = _cold_rows()

# metrics shown in the cold-path table rather than in the main one
COLD_TABLE_METRICS = {"cold_cpu_gb", "cold_verified_mbs", "cold_verified_ttfb", "cold_verified_cpu_gb",
                      "https_cold_verified_mbs", "https_cold_verified_ttfb", "https_cold_verified_cpu_gb",
                      "https_cold_mbs", "https_cold_cpu_gb"}


def dig(d: Any, path: Sequence[str]) -> float | None:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return float(d) if isinstance(d, (int, float)) else None


def median_of(runs: list[dict[str, Any]], path: Sequence[str]) -> tuple[float | None, list[float]]:
    values = [v for v in (dig(r, path) for r in runs) if v is not None]
    return (statistics.median(values) if values else None), values


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"metrics": {}, "references": {}}
    for key, label, path, higher in METRICS:
        m, mv = median_of(runs, ("mirror", *path))
        d, dv = median_of(runs, ("distribution", *path))
        summary["metrics"][key] = {"label": label, "higher_is_better": higher, "mirror": m, "distribution": d,
                                   "ratio": (m / d) if m is not None and d else None,
                                   "mirror_runs": mv, "distribution_runs": dv}
    for key, label, path in REFERENCES:
        v, vs = median_of(runs, path)
        summary["references"][key] = {"label": label, "median": v, "runs": vs}
    summary["cold_path"] = []
    for up, who, client, path, direct in COLD_ROWS:
        row: dict[str, Any] = {"upstream": up, "from": who, "client": client,
                               "x_direct": _per_run_ratio(runs, (*path, "mb_s"), (*direct, "mb_s"))}
        for key in ("mb_s", "ttfb_first_layer_ms", "server_cpu_s_per_gb", "upstream_cpu_s_per_gb",
                    "client_cpu_s_per_gb"):
            row[key] = median_of(runs, (*path, key))[0]
        summary["cold_path"].append(row)
    summary["targets"] = targets(runs, summary)
    return summary


def cold_row(summary: dict[str, Any], upstream: str, who: str, client: str) -> dict[str, Any]:
    """A row of the summary's cold-path table (all None if it is not there)."""
    for row in summary.get("cold_path", []):
        if (row["upstream"], row["from"], row["client"]) == (upstream, who, client):
            return dict(row)
    return {}


def _per_run_ratio(runs: list[dict[str, Any]], num: Sequence[str], den: Sequence[str]) -> float | None:
    """Median over runs of num/den, each taken within one run."""
    ratios = [n / d for n, d in ((dig(r, num), dig(r, den)) for r in runs) if n is not None and d]
    return statistics.median(ratios) if ratios else None


def targets(runs: list[dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged on the medians (and on every run for the exact ones)."""
    m = summary["metrics"]
    out: list[dict[str, Any]] = []

    def add(name: str, value: str, met: bool | None, no_data: bool = False) -> None:
        out.append({"target": name, "measured": value, "met": met, "no_data": no_data})

    r = m["warm_mbs"]["ratio"]
    add("warm throughput >= Distribution's",
        f"{fmt(m['warm_mbs']['mirror'])} vs {fmt(m['warm_mbs']['distribution'])} MB/s (x{fmt(r)})",
        None if r is None else r >= 1)
    r = _per_run_ratio(runs, ("mirror", "cold", "mb_s"), ("upstream_direct", "mb_s"))
    rd = _per_run_ratio(runs, ("distribution", "cold", "mb_s"), ("upstream_direct", "mb_s"))
    add("cold pull within 10% of a direct pull from the upstream",
        f"mirror cold = {fmt(r)} x direct (Distribution proxy: {fmt(rd)} x)", None if r is None else r >= 0.9)
    r = _per_run_ratio(runs, ("mirror", "cold_verified", "mb_s"), ("upstream_direct_verified", "mb_s"))
    rd = _per_run_ratio(runs, ("distribution", "cold_verified", "mb_s"), ("upstream_direct_verified", "mb_s"))
    add("cold pull >= 0.6 x a direct client-verified pull (plain-HTTP upstream; both clients verify)",
        f"mirror cold = {fmt(r)} x direct ({fmt(m['cold_verified_mbs']['mirror'])} MB/s; "
        f"Distribution proxy: {fmt(rd)} x)", None if r is None else r >= 0.6, no_data=r is None and rd is None)
    r = _per_run_ratio(runs, ("mirror", "https_cold_verified", "mb_s"), ("https_upstream_direct_verified", "mb_s"))
    rd = _per_run_ratio(runs, ("distribution", "https_cold_verified", "mb_s"),
                        ("https_upstream_direct_verified", "mb_s"))
    add("cold pull >= 0.6 x a direct client-verified pull (HTTPS upstream; both clients verify)",
        f"mirror cold = {fmt(r)} x direct ({fmt(m['https_cold_verified_mbs']['mirror'])} MB/s; "
        f"Distribution proxy: {fmt(rd)} x)", None if r is None else r >= 0.6, no_data=r is None and rd is None)
    c, cv = m["cold_cpu_gb"], m["cold_verified_cpu_gb"]
    add("mirror CPU-s per cold GB <= 1.3 (plain-HTTP upstream)",
        f"{fmt(c['mirror'])} (client-verified pull: {fmt(cv['mirror'])}; Distribution proxy {fmt(c['distribution'])})",
        None if c["mirror"] is None else c["mirror"] <= 1.3, no_data=c["mirror"] is None and cv["mirror"] is None)
    c, cv = m["https_cold_cpu_gb"], m["https_cold_verified_cpu_gb"]
    add("mirror CPU-s per cold GB <= 1.3 (HTTPS upstream: TLS decryption included)",
        f"{fmt(c['mirror'])} (client-verified pull: {fmt(cv['mirror'])}; Distribution proxy {fmt(c['distribution'])})",
        None if c["mirror"] is None else c["mirror"] <= 1.3, no_data=c["mirror"] is None and cv["mirror"] is None)
    https_direct = cold_row(summary, "HTTPS", "direct", "verifies sha256").get("ttfb_first_layer_ms")
    add("time to first byte of a cold pull unchanged (judge against an earlier recorded run)",
        f"mirror {fmt(m['cold_ttfb']['mirror'])} ms, client-verified {fmt(m['cold_verified_ttfb']['mirror'])} ms, "
        f"HTTPS upstream {fmt(m['https_cold_verified_ttfb']['mirror'])} ms (direct from the upstream: "
        f"{fmt(summary['references']['upstream_ttfb']['median'])} ms, HTTPS {fmt(https_direct)} ms)", None)
    gets = [v for key in ("fanin_b", "fanin_a") for run in runs
            for v in (dig(run, ("mirror", key, "blob_gets_min")), dig(run, ("mirror", key, "blob_gets_max")))
            if v is not None]
    dgets = [v for run in runs for v in (dig(run, ("distribution", "fanin_b", "blob_gets_per_blob")),)
             if v is not None]
    add("fan-in: exactly 1 upstream GET per blob",
        f"mirror min {fmt(min(gets)) if gets else '–'}, max {fmt(max(gets)) if gets else '–'} over all fan-ins "
        f"(Distribution proxy, fan-in B mean: {fmt(statistics.median(dgets)) if dgets else '–'})",
        None if not gets else min(gets) == max(gets) == 1)
    rb = _per_run_ratio(runs, ("mirror", "fanin_b", "wall_s"), ("upstream_fanin_b", "wall_s"))
    ra = _per_run_ratio(runs, ("mirror", "fanin_a", "wall_s"), ("upstream_fanin_a", "wall_s"))
    rdb = _per_run_ratio(runs, ("distribution", "fanin_b", "wall_s"), ("upstream_fanin_b", "wall_s"))
    fan = [x for x in (rb, ra) if x is not None]
    add("fan-in wall time no slower than the same 20 clients pulling the same image straight from the upstream",
        f"mirror / direct: B {fmt(rb)} x, A {fmt(ra)} x (Distribution proxy, B: {fmt(rdb)} x)",
        None if not fan else max(fan) <= 1, no_data=not fan and rdb is None)
    rw = _per_run_ratio(runs, ("mirror_workers", "wrk_tag", "rps"), ("mirror", "wrk_tag", "rps"))
    if rw is not None:
        w_rps, _ = median_of(runs, ("mirror_workers", "wrk_tag", "rps"))
        w_p99, _ = median_of(runs, ("mirror_workers", "wrk_tag", "p99_ms"))
        add("cached manifest req/s with 2 workers >= 1.4 x one worker (16 connections; wrk on the same 2 cores)",
            f"{fmt(w_rps)} req/s = {fmt(rw)} x one worker ({fmt(m['tag_rps']['mirror'])})", rw >= 1.4)
        add("cached manifest p99 <= 20 ms at 16 connections, 2 workers",
            f"{fmt(w_p99)} ms (one worker: {fmt(m['tag_p99']['mirror'])} ms)", None if w_p99 is None else w_p99 <= 20)
        rf = _per_run_ratio(runs, ("mirror_workers", "fanin_b", "wall_s"), ("upstream_fanin_b", "wall_s"))
        wgets = [v for run in runs for v in (dig(run, ("mirror_workers", "fanin_b", "blob_gets_max")),) if v is not None]
        add("fan-in B with 2 workers no slower than the same 20 clients straight from the upstream",
            f"2 workers / direct: {fmt(rf)} x; upstream GETs per blob, max {fmt(max(wgets)) if wgets else '–'}",
            None if rf is None else rf <= 1 and (not wgets or max(wgets) == 1))
    rss = [v for run in runs for v in (dig(run, ("mirror", "rss_mib", "fanin_a")),) if v is not None]
    add("peak RSS <= 150 MiB while 20 clients pull 256 MiB layers",
        f"max {fmt(max(rss)) if rss else '–'} MiB over runs (median {fmt(m['rss_fanin_a']['mirror'])}; "
        f"Distribution proxy {fmt(m['rss_fanin_a']['distribution'])})", None if not rss else max(rss) <= 150)
    r = m["tag_rps"]["ratio"]
    add("cached manifest req/s >= Distribution's",
        f"{fmt(m['tag_rps']['mirror'])} vs {fmt(m['tag_rps']['distribution'])} req/s by tag (x{fmt(r)}); "
        f"by digest {fmt(m['digest_rps']['mirror'])} vs {fmt(m['digest_rps']['distribution'])} "
        f"(x{fmt(m['digest_rps']['ratio'])})", None if r is None else r >= 1)
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown(summary: dict[str, Any], n_runs: int) -> str:
    lines = [f"Medians of {n_runs} run(s). Ratio = mirror / Distribution "
             "(arrow: which direction is better).", "",
             "| metric | mirror | Distribution proxy | ratio |", "|---|---:|---:|---:|"]
    for key, m in summary["metrics"].items():
        if (m["mirror"] is None and m["distribution"] is None) or key in COLD_TABLE_METRICS:
            continue
        arrow = "↑" if m["higher_is_better"] else "↓"
        lines.append(f"| {m['label']} {arrow} | {fmt(m['mirror'])} | {fmt(m['distribution'])} | "
                     f"{fmt(m['ratio']) if m['ratio'] is not None else '–'} |")
    cold = [row for row in summary.get("cold_path", []) if row["mb_s"] is not None]
    if cold:
        lines += ["", "Cold pull of A, sequential, one client, each server on a fresh store. x direct: MB/s over "
                  "a direct pull from the same upstream by the same kind of client (median of per-run ratios). "
                  "CPU-s per GB of layers: the server's process tree (until its store holds A), the upstream's, "
                  "the client thread's.", "",
                  "| upstream | from | client | MB/s ↑ | x direct ↑ | TTFB ms ↓ | server CPU-s/GB ↓ | "
                  "upstream CPU-s/GB | client CPU-s/GB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in cold:
            lines.append(f"| {row['upstream']} | {row['from']} | {row['client']} | {fmt(row['mb_s'])} | "
                         f"{fmt(row['x_direct'])} | {fmt(row['ttfb_first_layer_ms'])} | "
                         f"{fmt(row['server_cpu_s_per_gb'])} | {fmt(row['upstream_cpu_s_per_gb'])} | "
                         f"{fmt(row['client_cpu_s_per_gb'])} |")
    lines += ["", "| reference (same client) | median |", "|---|---:|"]
    for ref in summary["references"].values():
        if ref["median"] is not None:
            lines.append(f"| {ref['label']} | {fmt(ref['median'])} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in summary.get("targets", []):
        if t.get("no_data"):
            continue
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="ascii", errors="replace")
                    if line.startswith("model name")), "")
    except OSError:
        pass
    mem_kib = _status_like("/proc/meminfo", "MemTotal")
    versions = {}
    for name, argv in (("docker-registry", ["docker-registry", "--version"]), ("nginx", [NGINX, "-v"]),
                       ("wrk", [WRK or "wrk", "-v"]), ("skopeo", ["skopeo", "--version"])):
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
            versions[name] = (res.stdout + res.stderr).strip().splitlines()[0] if (res.stdout + res.stderr).strip() else ""
        except (OSError, subprocess.TimeoutExpired):
            versions[name] = "not installed"
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round((mem_kib or 0) / MIB, 1),
            "kernel": platform.release(), "python": platform.python_version(), "versions": versions,
            "hostname": socket.gethostname()}


def _status_like(path: str, key: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="repetitions; the table shows medians (default 3)")
    p.add_argument("--quick", action="store_true", help="small images (3 x 32 MiB, 30 x 1 MiB) for a dry run")
    p.add_argument("--no-fanin-a", dest="fanin_a", action="store_false",
                   help="skip the 20-client fan-in of image A (the slowest phase)")
    p.add_argument("--workers", type=int, default=2,
                   help="also measure the mirror with this many worker processes (fan-in B, manifest req/s); "
                        "0 or 1 skips it (default 2)")
    p.add_argument("--no-https", dest="https", action="store_false",
                   help="skip the HTTPS-upstream phase (a second upstream with TLS, image A pushed to it)")
    p.add_argument("--wrk-seconds", type=int, default=None, help="duration of each wrk run (default 10, quick 3)")
    p.add_argument("--max-minutes", type=float, default=40.0,
                   help="time budget; phases not started by then are skipped (default 40)")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each run, wait up to this many seconds for the machine to be under 15%% "
                        "busy (it may be shared; default 0: don't wait)")
    p.add_argument("--mirror-ref", default="HEAD",
                   help="git commit of the mirror to run, exported with git archive so that edits made "
                        "meanwhile do not change it (default HEAD); 'worktree' runs the checkout as it is")
    p.add_argument("--py-spy", dest="spy_dir", type=Path, default=None,
                   help="record the mirror with py-spy (raw format) in each phase into this directory")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="where the JSON goes")
    p.add_argument("--summarize", type=Path, default=None, metavar="JSON",
                   help="print the table for an earlier results file and exit (runs nothing)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize is not None:
        earlier = json.loads(args.summarize.read_text())
        print(markdown(summarize(earlier["runs"]), len(earlier["runs"])))
        return 0
    if not 1 <= args.runs <= 20:
        raise SystemExit("--runs must be between 1 and 20")
    if not Path("/usr/bin/docker-registry").exists():
        raise SystemExit("CNCF Distribution is not installed (apt-get install docker-registry)")
    if shutil.which("skopeo") is None:
        raise SystemExit("skopeo is not installed (apt-get install skopeo)")
    if args.spy_dir is not None and not Path(PY_SPY).exists():
        raise SystemExit("py-spy is not installed (.venv/bin/pip install py-spy)")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    # SIGINT too: a shell starts background jobs with SIGINT ignored, which Python keeps
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_term)

    sizes: dict[str, Sequence[int]] = (
        {"a": [32 * MIB] * 3, "b": [1 * MIB] * 30, "c": [64]} if args.quick else
        {"a": [256 * MIB] * 3, "b": [4 * MIB] * 30, "c": [64]})
    opts = Options(runs=args.runs, quick=args.quick, fanin_a=args.fanin_a, https=args.https, workers=args.workers,
                   wrk_seconds=args.wrk_seconds or (3 if args.quick else 10),
                   spy_dir=args.spy_dir.resolve() if args.spy_dir else None, deadline=Deadline(args.max_minutes),
                   quiet_wait=args.quiet_wait)
    started = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "uptime_start": Path("/proc/loadavg").read_text().strip(),
        "quick": args.quick, "sizes_mib": {k: [s / MIB for s in v] for k, v in sizes.items()},
        "fanin_clients": FANIN_CLIENTS, "wrk": "wrk -t1 -c16 --latency, Accept header from a Lua script",
        "runs": [],
        "git_start": git_state(),
    }
    status = 0
    work = proc_util.WorkDir("mirror-bench.")
    REAPER.add("workdir", work.cleanup)
    try:
        upstream = DistributionRegistry(work.path / "upstream")
        tls_upstream = DistributionRegistry(work.path / "upstream-tls", tls=True) if args.https else None
        with ExitStack() as stack:
            stack.enter_context(tracked("upstream", upstream.close))
            upstream.start()
            log(f"upstream Distribution on {upstream.url}")
            if tls_upstream is not None:
                stack.enter_context(tracked("upstream-tls", tls_upstream.close))
                tls_upstream.start()
                log(f"HTTPS upstream Distribution on {tls_upstream.url}")
            imgs, tls_a = seed_upstream(upstream, work.path, sizes, tls_upstream)
            result["images"] = {k: {"repo": i.repo, "layers": len(i.layers), "layer_bytes": i.layer_bytes}
                                for k, i in imgs.items()}
            if args.mirror_ref == "worktree":
                src = REPO
                result["mirror_code"] = {"commit": "worktree", **git_state()}
            else:
                result["mirror_code"] = export_mirror(args.mirror_ref, work.path / "mirror-src")
                src = work.path / "mirror-src"
            log(f"mirror code: {result['mirror_code'].get('commit')} {result['mirror_code'].get('subject', '')}")
            servers: list[Server] = [MirrorServer(work.path, upstream, src),
                                     DistributionProxyServer(work.path, upstream)]
            if args.workers > 1:
                servers.append(MirrorServer(work.path, upstream, src, workers=args.workers))
            https = None
            if tls_upstream is not None and tls_a is not None:
                assert tls_upstream.ca_cert_path is not None
                https = HttpsSetup(tls_upstream, tls_a,
                                   [MirrorServer(work.path, tls_upstream, src),
                                    DistributionProxyServer(work.path, tls_upstream)],
                                   ssl.create_default_context(cafile=str(tls_upstream.ca_cert_path)))
                result["https_upstream"] = {"url": tls_upstream.url, "certificate": "self-signed P-256, "
                                            "SAN 127.0.0.1, made at start (tests/integration/upstream_registry.py)"}
            for run_no in range(1, args.runs + 1):
                try:
                    result["runs"].append(one_run(run_no, servers, imgs, upstream, opts, work.path, https))
                except BenchError as e:
                    log(f"run {run_no} failed: {e}")
                    result.setdefault("errors", []).append(f"run {run_no}: {e}")
                    status = 1
                    if opts.deadline.left() <= 0:
                        break
                write_results(result, args.results, started)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        result.setdefault("errors", []).append("interrupted")
        status = 130
    finally:
        REAPER.stop_all()
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["uptime_end"] = Path("/proc/loadavg").read_text().strip()
    result["git_end"] = git_state()
    result["mirror_code_hashes"] = sorted(CODE_SEEN)
    if len(CODE_SEEN) > 1:
        log(f"warning: the mirror's code changed during the run ({len(CODE_SEEN)} versions ran)")
        result.setdefault("errors", []).append(f"the mirror's code changed during the run: {sorted(CODE_SEEN)}")
    result["summary"] = summarize(result["runs"])
    path = write_results(result, args.results, started)
    print(markdown(result["summary"], len(result["runs"])))
    print(f"\nresults: {path}")
    return status


def write_results(result: dict[str, Any], directory: Path, started: dt.datetime) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if result.get('quick') else ''}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
