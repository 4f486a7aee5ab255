"""The real ``twistd mirror`` with ``workers: 2`` in front of a real Distribution (issue 12).

One supervisor process accepts and hands each connection to a worker process.  Checked
here from outside, as a user sees it: both workers serve (the metrics say which served
what); concurrent cold requests for one blob reach the upstream once, whichever workers
they land on; a worker killed with SIGKILL is restarted, logged, and the service answers
meanwhile; SIGHUP with a changed config reaches every worker; SIGTERM leaves no worker
behind, nor does a supervisor killed outright; TLS listeners and a real client (skopeo)
work through the workers.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import signal
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.clients import skip_reason as client_skip_reason
from tests.integration.clients import skopeo_copy
from tests.integration.mirror_proc import REPO, TWISTD, MirrorProcess, tcp_endpoint, tls_endpoint
from tests.integration.proc_util import ManagedProcess, pid_alive, wait_until
from tests.integration.test_tls import make_ca_and_server_cert
from tests.integration.upstream_registry import free_port

pytestmark = pytest.mark.integration


def http(url, *, method="GET", data=None, context=None):
    """(status, body) of one request on a connection of its own (so each may land on
    another worker); HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return sorted(found)


def worker_pids(m: MirrorProcess) -> list[int]:
    assert m.proc is not None
    return [p for p in children(m.proc.pid) if b"mirror.workers.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric ``name`` in an exposition: labels (sorted) -> value."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")))
            found[labels] = float(match.group(2))
    return found


def by_worker(text: str, name: str, **labels: str) -> dict[str, float]:
    """Metric ``name`` summed per worker over the samples that have ``labels``."""
    totals: dict[str, float] = {}
    for key, value in samples(text, name).items():
        d = dict(key)
        if all(d.get(k) == v for k, v in labels.items()):
            totals[d.get("worker", "")] = totals.get(d.get("worker", ""), 0) + value
    return totals


class Workers(MirrorProcess):
    """``twistd mirror`` with ``workers: 2`` and a metrics listener.  With ``logfile``
    False it runs as ``mirror serve`` does (logging to standard output)."""

    def __init__(self, workdir: Path, upstreams, *, logfile: bool = True, unix: Path | None = None, **extra) -> None:
        self.metrics_port = free_port()
        extra.setdefault("workers", 2)
        super().__init__(workdir, upstreams, metrics={"listen": tcp_endpoint(self.metrics_port)}, **extra)
        self.logfile = logfile
        if unix is not None:  # (the harness takes tcp: and ssl: endpoints only)
            config = yaml.safe_load(self.config_path.read_text())
            listen = config["listen"] if isinstance(config["listen"], list) else [config["listen"]]
            config["listen"] = [*listen, f"unix:{unix}"]
            self.config_path.write_text(yaml.safe_dump(config))

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self) -> Workers:
        if self.logfile:
            super().start()
        else:
            argv = [TWISTD, "--nodaemon", "--pidfile=", "mirror", "--config", str(self.config_path)]
            self.proc = ManagedProcess(argv, stdout=self.workdir / "twistd.out", cwd=REPO)
            if not wait_until(lambda: self._ready() or not self.proc.alive(), 20):
                raise AssertionError(f"mirror did not start:\n{self.log_tail()}")
        assert wait_until(lambda: http(f"{self.metrics_url}/readyz")[0] == 200, 20), self.log_tail()
        return self

    def log_text(self) -> str:
        out = self.workdir / "twistd.out"
        return super().log_text() + (out.read_text(errors="replace") if out.exists() else "")

    def metrics(self) -> str:
        status, body = http(f"{self.metrics_url}/metrics")
        assert status == 200
        return body.decode()

    def reconfigure(self, **changes) -> None:
        config = yaml.safe_load(self.config_path.read_text())
        config.update(changes)
        self.config_path.write_text(yaml.safe_dump(config))


@pytest.fixture
def start_workers(workdir):
    started: list[Workers] = []

    def start(upstreams, **kw) -> Workers:
        d = workdir / f"workers{len(started)}"
        d.mkdir()
        m = Workers(d, upstreams, **kw)
        started.append(m)
        return m.start()

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def upstreams(seeded_upstream):
    registry, _ = seeded_upstream
    return [{"registry": "docker.io", "url": registry.url, "tag_ttl": 300}]


def test_both_workers_serve_and_concurrent_cold_pulls_fetch_a_blob_once(seeded_upstream, upstreams, start_workers):
    """Twenty concurrent cold GETs of a 4 MiB layer, handed round-robin to two workers:
    every client gets the verified bytes, Distribution's access log shows one GET of it,
    and the metrics (labelled by worker) show both workers answered blob requests."""
    registry, seeded = seeded_upstream
    m = start_workers(upstreams)
    layer = seeded["big"].layers[0]
    url = f"{m.url}/v2/{seeded['big'].repo}/blobs/{layer}"
    before = registry.mark()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: http(url), range(20)))
    assert [(status, "sha256:" + hashlib.sha256(body).hexdigest()) for status, body in answers] == [(200, layer)] * 20
    gets = [e for e in registry.access_log(since=before) if e.method == "GET" and layer in e.path]
    assert len(gets) == 1, gets
    text = m.metrics()
    served = by_worker(text, "mirror_http_requests_total", route="blob", status="200")
    assert set(served) == {"0", "1"} and sum(served.values()) == 20
    fetched = by_worker(text, "mirror_upstream_fetches_total", kind="blob")
    assert sum(fetched.values()) == 1  # one worker fetched; the other followed its fill or found it stored
    assert samples(text, "mirror_workers_up") == {(): 2.0}


def test_a_killed_worker_is_restarted_logged_and_the_service_keeps_answering(seeded_upstream, upstreams, start_workers):
    _, seeded = seeded_upstream
    m = start_workers(upstreams)
    image = seeded["latest"]
    manifest = f"{m.url}/v2/{image.repo}/manifests/{image.tag}"
    assert http(manifest)[0] == 200
    victim, survivor = worker_pids(m)
    os.kill(victim, signal.SIGKILL)
    # (a connection handed to it at the very instant it died goes with it, as with any
    # process that crashes: wait until the supervisor knows, then ask)
    assert wait_until(lambda: f"(pid {victim}) was killed by signal 9" in m.log_text(), 10), m.log_tail()
    statuses = [http(manifest)[0] for _ in range(20)]  # while it is dead and while it restarts
    assert statuses == [200] * 20
    assert wait_until(lambda: samples(m.metrics(), "mirror_workers_up") == {(): 2.0}, 15), m.log_tail()
    pids = worker_pids(m)
    assert survivor in pids and victim not in pids and len(pids) == 2
    log = m.log_text()
    assert re.search(rf"worker \d \(pid {victim}\) was killed by signal 9 after [\d.]+ s; restarting it in 0.5 s", log)
    restarts = samples(m.metrics(), "mirror_worker_restarts_total")
    assert sum(restarts.values()) == 1
    assert [http(manifest)[0] for _ in range(4)] == [200] * 4  # the restarted worker takes its turn again
    served = by_worker(m.metrics(), "mirror_http_requests_total", route="manifest", status="200")
    assert set(served) == {"0", "1"}


def test_sighup_with_a_changed_config_reaches_every_worker(upstreams, start_workers):
    """read_only: true, then SIGHUP: a push is refused whichever worker gets it (each POST
    on a connection of its own, so they alternate); a bad file is refused by the
    supervisor and the workers keep the config they have."""
    m = start_workers(upstreams, hosted=["team/*"])
    assert http(f"{m.url}/v2/team/app/blobs/uploads/", method="POST")[0] == 202
    m.reconfigure(read_only=True)
    m.proc.popen.send_signal(signal.SIGHUP)
    assert wait_until(lambda: m.log_text().count("config reloaded from") >= 3, 10), m.log_tail()
    assert [http(f"{m.url}/v2/team/app/blobs/uploads/", method="POST")[0] for _ in range(4)] == [405] * 4
    refused = by_worker(m.metrics(), "mirror_http_requests_total", route="start_upload", status="405")
    assert refused == {"0": 2.0, "1": 2.0}
    good = m.config_path.read_text()
    m.config_path.write_text(good + "bogus: 1\n")
    m.proc.popen.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "config reload refused" in m.log_text(), 10)
    assert m.log_text().count("config reloaded from") == 3
    assert [http(f"{m.url}/v2/team/app/blobs/uploads/", method="POST")[0] for _ in range(2)] == [405] * 2


def test_sigterm_stops_every_worker_and_a_killed_supervisor_leaves_none(upstreams, start_workers):
    """Run as `mirror serve` runs it (logging to standard output, which the workers then
    write to themselves, tagged).  SIGTERM: the supervisor shuts down once its workers did.
    SIGKILL of the supervisor: its workers exit on their own."""
    m = start_workers(upstreams, logfile=False)
    assert http(f"{m.url}/v2/")[0] == 200
    pids = worker_pids(m)
    assert len(pids) == 2
    assert re.search(r"\[worker [01]\] .*\"GET /v2/ HTTP/1.1\" 200", m.log_text())
    m.proc.popen.send_signal(signal.SIGTERM)
    assert m.proc.popen.wait(timeout=20) == -signal.SIGTERM  # (twistd ends by the signal it was stopped with)
    assert not any(pid_alive(p) for p in pids)
    log = m.log_text()
    assert all(f"(pid {p}) exited with code 0" in log for p in pids) and "Server Shut Down." in log
    m.stop()

    m = start_workers(upstreams)
    pids = worker_pids(m)
    assert len(pids) == 2
    supervisor = m.proc.popen.pid
    m.proc.popen.send_signal(signal.SIGKILL)
    m.proc.popen.wait(timeout=10)
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10), [p for p in pids if pid_alive(p)]
    import shutil
    import tempfile

    left = list(Path(tempfile.gettempdir()).glob(f"mirror-workers-{supervisor}-*"))
    assert len(left) == 1  # its config copy: the next supervisor to start sweeps it; here, the test
    shutil.rmtree(left[0])


def unix_get(path: Path, target: str) -> bytes:
    """The raw response to ``GET target`` over the UNIX socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_real_client_pulls_through_two_workers_over_plain_http_and_tls(seeded_upstream, upstreams, start_workers, workdir):
    """skopeo pulls (and verifies) an image through the workers; the same service's ssl:
    listener is accepted as plain TCP by the supervisor and spoken TLS by the worker, and
    its unix: listener is handed over alike."""
    if client_skip_reason("skopeo"):
        pytest.skip(client_skip_reason("skopeo"))
    _, seeded = seeded_upstream
    tls = make_ca_and_server_cert(workdir / "tls")
    tls_port = free_port()
    port = free_port()
    unix_path = workdir / "mirror.sock"
    m = start_workers(upstreams, listen=[tcp_endpoint(port), tls_endpoint(tls_port, tls.key, tls.cert)], unix=unix_path)
    image = seeded["latest"]
    assert skopeo_copy(f"{m.host_port}/{image.repo}:{image.tag}") == image.digest
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    for _ in range(2):  # (a connection each: both workers)
        status, body = http(f"https://127.0.0.1:{tls_port}/v2/", context=context)
        assert (status, body) == (200, b"{}")
    assert skopeo_copy(f"127.0.0.1:{tls_port}/{image.repo}:{image.tag}", tls_verify=True, cert_dir=tls.cert_dir) == image.digest
    for _ in range(2):
        answer = unix_get(unix_path, f"/v2/{image.repo}/manifests/{image.tag}")
        assert answer.startswith(b"HTTP/1.1 200 ") and f"Docker-Content-Digest: {image.digest}".encode() in answer
    served = by_worker(m.metrics(), "mirror_http_requests_total", route="base")
    assert set(served) == {"0", "1"}


@pytest.mark.parametrize("workers", [1, 2])
def test_tag_revalidations_do_not_grow_with_workers(seeded_upstream, start_workers, workers):
    """A cached tag past its TTL is revalidated by one worker for all: the upstream sees
    about one manifest request per TTL however many workers serve the tag (8 clients
    asking for 6 s, on connections of their own, so on both workers)."""
    import threading
    import time

    registry, seeded = seeded_upstream
    image = seeded["big"]
    m = start_workers([{"registry": "docker.io", "url": registry.url, "tag_ttl": 1}], workers=workers)
    url = f"{m.url}/v2/{image.repo}/manifests/{image.tag}"
    assert http(url)[0] == 200
    before = registry.mark()
    stop = time.monotonic() + 6.0
    errors: list[object] = []

    def hammer() -> None:
        while time.monotonic() < stop:
            status, _ = http(url)
            if status != 200:
                errors.append(status)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    asked = [e for e in registry.access_log(since=before) if f"/manifests/{image.tag}" in e.path]
    assert not errors
    # one per TTL (6, and one more at a boundary); each worker asking for itself made 10-12
    assert len(asked) <= 8, [(e.method, e.time) for e in asked]


def test_a_token_one_worker_issued_is_good_on_every_worker(start_workers, workdir):
    """With token auth and no key_file, every worker signs and checks client tokens with
    the same key: a token from one is accepted by whichever worker gets the next request."""
    import base64
    import json

    from tests.integration.test_client_auth import PASSWORD, USER, _write_htpasswd

    htpasswd = workdir / "htpasswd"
    _write_htpasswd(htpasswd)
    auth = {"htpasswd": str(htpasswd), "token": True,
            "access": [{"repository": "*", "users": ["pull", "push", "delete"]}]}
    m = start_workers([], hosted=["*"], auth=auth)
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(f"{m.url}/auth/token?service=mirror&scope=repository:team/app:pull",
                                     headers={"Authorization": f"Basic {basic}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        token = json.loads(r.read())["token"]
    statuses = []
    for _ in range(8):  # connections of their own: handed to both workers in turn
        request = urllib.request.Request(f"{m.url}/v2/team/app/tags/list", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                statuses.append(r.status)
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
    assert statuses == [404] * 8  # NAME_UNKNOWN: authorised on both workers (401 where a worker's key differed)


def test_a_restarted_worker_gets_the_running_config_not_the_edited_file(upstreams, start_workers):
    """The file edited but not reloaded (read_only: true), then a worker dies: its
    replacement serves the config the supervisor runs (pushes accepted everywhere), and a
    SIGHUP right after its start does not end it."""
    m = start_workers(upstreams, hosted=["team/*"])
    m.reconfigure(read_only=True)  # (no SIGHUP)
    victim = worker_pids(m)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: f"(pid {victim}) was killed by signal 9" in m.log_text(), 10), m.log_tail()
    assert wait_until(lambda: len(worker_pids(m)) == 2 and victim not in worker_pids(m), 10), m.log_tail()
    newcomer = next(p for p in worker_pids(m) if p != victim)
    m.config_path.write_text(m.config_path.read_text().replace("read_only: true", "read_only: false"))
    m.proc.popen.send_signal(signal.SIGHUP)  # while the new worker may still be starting
    assert wait_until(lambda: samples(m.metrics(), "mirror_workers_up") == {(): 2.0}, 15), m.log_tail()
    assert "killed by signal 1" not in m.log_text(), m.log_tail()
    assert newcomer in worker_pids(m)
    assert [http(f"{m.url}/v2/team/app/blobs/uploads/", method="POST")[0] for _ in range(4)] == [202] * 4


def test_workers_serve_when_twistd_runs_as_a_daemon(upstreams, workdir):
    """twistd without -n forks after building the service: the workers still know their
    supervisor (the daemon) and serve; SIGTERM to it stops them all."""
    import time

    d = workdir / "daemon"
    d.mkdir()
    m = Workers(d, upstreams)  # (its config; started here by hand, as a daemon)
    pidfile = d / "twistd.pid"
    argv = [TWISTD, f"--pidfile={pidfile}", "--logfile", str(d / "daemon.log"), "mirror", "--config", str(m.config_path)]
    ManagedProcess(argv, stdout=d / "launch.out", cwd=REPO).popen.wait(30)  # (returns once it forked)
    assert wait_until(pidfile.exists, 10), (d / "launch.out").read_text()
    daemon = int(pidfile.read_text())
    workers: list[int] = []
    try:
        ok = wait_until(lambda: http(f"{m.metrics_url}/readyz")[0] == 200, 20)
        log = (d / "daemon.log").read_text(errors="replace")
        assert ok, log[-3000:]
        assert http(f"{m.url}/v2/")[0] == 200
        assert "restarting it" not in log, log[-3000:]
        workers = [p for p in children(daemon) if b"mirror.workers.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2
    finally:
        os.kill(daemon, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while pid_alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(daemon):
            os.kill(daemon, signal.SIGKILL)
    assert wait_until(lambda: not any(pid_alive(p) for p in workers), 10)
