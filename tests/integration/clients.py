"""Real container clients pulling THROUGH A MIRROR, each set up with its own mirror configuration.

Every function works in its own ``mktemp -d`` directory (removed afterwards,
with anything mounted below it unmounted; ``MIRROR_TEST_KEEP=1`` keeps it),
writes every config file the client reads into it (nothing is read from
/etc/containers, /etc/docker, /etc/containerd or ~), and runs the client with
HTTP(S)_PROXY set to the closed port 127.0.0.1:9 and NO_PROXY for loopback,
so a fallback to the real upstream (registry-1.docker.io) fails at once and
nothing leaves the machine. Every step has a timeout; every daemon is
stopped by PID (TERM, then KILL). A failure raises :class:`ClientError`
carrying the client's log tail.

Mirror configuration per client (image names keep saying ``docker.io``):

* skopeo/podman: registries.conf ``[[registry]] prefix="docker.io"`` +
  ``[[registry.mirror]] location="HOST:PORT" insecure=true``;
* containerd (ctr): ``--hosts-dir`` with ``docker.io/hosts.toml`` listing
  ``http://HOST:PORT`` as a pull/resolve host (containerd adds ``?ns=docker.io``);
* dockerd: daemon.json ``"registry-mirrors": ["http://HOST:PORT"]`` (docker.io only).

The returned digest is what the client reports: skopeo's ``--digestfile``
(for a single-platform copy of an index: the platform instance's digest),
podman's ``.Digest``, the image target digest in containerd, docker's
RepoDigest (the last three: the tag's digest, i.e. the index for multi-arch).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

try:
    from . import proc_util
    from .proc_util import HarnessError
except ImportError:  # imported as a top-level module (tests/integration on sys.path)
    import proc_util  # type: ignore[no-redef]
    from proc_util import HarnessError  # type: ignore[no-redef]

T = TypeVar("T")
PULL_TIMEOUT = 120.0
DAEMON_START_TIMEOUT = 60.0
CTR_NAMESPACE = "mirrortest"
DOCKER_HUB_UPSTREAM = "https://registry-1.docker.io"

CLIENTS = ("skopeo", "podman", "ctr", "docker")
_BINARIES: dict[str, tuple[str, ...]] = {
    "skopeo": ("skopeo",),
    "podman": ("podman",),
    "ctr": ("containerd", "ctr"),
    "docker": ("dockerd", "docker", "containerd"),
}
_NEEDS_ROOT = frozenset({"podman", "ctr", "docker"})


class ClientError(HarnessError):
    """A client pull or its verification failed; the message ends with the log tail."""

    def __init__(self, client: str, message: str, log_tail: str = "") -> None:
        """Record which client failed and why."""
        self.client = client
        super().__init__(f"{client}: {message}", log_tail)


# --------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------

def missing_requirements(name: str) -> list[str]:
    """What this machine lacks to run client ``name`` (empty if it can run)."""
    if name not in _BINARIES:
        raise ValueError(f"unknown client {name!r}; known: {', '.join(CLIENTS)}")
    missing = [f"binary '{b}' not on PATH" for b in _BINARIES[name] if shutil.which(b) is None]
    if name in _NEEDS_ROOT and not proc_util.is_root():
        missing.append("must run as root")
    return missing


def client_available(name: str) -> bool:
    """True if client ``name`` (skopeo, podman, ctr, docker) can run here."""
    return not missing_requirements(name)


def skip_reason(name: str) -> str | None:
    """A pytest skip reason if client ``name`` cannot run here, else None."""
    missing = missing_requirements(name)
    return f"{name} unavailable: {'; '.join(missing)}" if missing else None


# --------------------------------------------------------------------------
# references and verification helpers
# --------------------------------------------------------------------------

def normalize_image(ref: str) -> str:
    """Docker-style normalisation: ``hello`` → ``docker.io/library/hello:latest``."""
    ref = ref.removeprefix("docker://")
    first, sep, rest = ref.partition("/")
    if not sep:
        ref = f"docker.io/library/{ref}"
    elif "." not in first and ":" not in first and first != "localhost":
        ref = f"docker.io/{ref}"
    first, _, rest = ref.partition("/")
    if first == "docker.io" and "/" not in rest:
        ref = f"docker.io/library/{rest}"
    last = ref.rsplit("/", 1)[1]
    if ":" not in last and "@" not in last:
        ref += ":latest"
    return ref


def registry_of(image: str) -> str:
    """The registry part of a normalised reference."""
    return image.split("/", 1)[0]


def _host(host_port: str) -> str:
    """``HOST`` of ``HOST:PORT``."""
    return host_port.rsplit(":", 1)[0]


def _check_host_port(host_port: str) -> None:
    """Reject anything but ``HOST:PORT`` (no scheme, no path)."""
    if "://" in host_port or "/" in host_port or ":" not in host_port:
        raise ValueError(f"mirror must be HOST:PORT, got {host_port!r}")


def host_platform() -> str:
    """``linux/<goarch>`` of this machine."""
    import platform as _p

    machine = _p.machine().lower()
    return "linux/" + {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_dir_copy(out: Path, digest: str) -> None:
    """Check a skopeo ``dir:`` copy: every digest-named file hashes to its name,
    manifest.json hashes to ``digest``, and every referenced manifest/blob is there."""
    for f in out.iterdir():
        name = f.name.removesuffix(".manifest.json")
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
            if _sha256_file(f) != name:
                raise ClientError("skopeo", f"corrupt file {f.name} in dir: copy")
    top = out / "manifest.json"
    if "sha256:" + _sha256_file(top) != digest:
        raise ClientError("skopeo", f"manifest.json does not hash to {digest}")
    doc = json.loads(top.read_bytes())
    manifests = [doc]
    if "manifests" in doc:
        manifests = []
        for m in doc["manifests"]:
            child = out / (m["digest"].split(":", 1)[1] + ".manifest.json")
            if child.exists():
                manifests.append(json.loads(child.read_bytes()))
        if not manifests:
            raise ClientError("skopeo", "no child manifest of the index was copied")
    for m in manifests:
        for d in [m["config"]["digest"], *(layer["digest"] for layer in m["layers"])]:
            if not (out / d.split(":", 1)[1]).exists():
                raise ClientError("skopeo", f"blob {d} missing from dir: copy")


def _client_env(w: Path, *direct_hosts: str, **extra: str) -> dict[str, str]:
    """Isolated HOME etc. in ``w`` plus the blackhole proxy."""
    return proc_util.blackhole_env(proc_util.base_env(w / "home", **extra), *direct_hosts)


def _run_client(client: str, argv: list[str], *, w: Path, env: dict[str, str], timeout: float,
                log: Path, isolate: bool = False, overlays: Sequence[str] = ("/var/lib",)) -> str:
    """Run a client command; on failure raise ClientError with its output tail."""
    if isolate:
        argv = proc_util.isolated_argv(w, argv, overlays=overlays)
    try:
        res = proc_util.run(argv, timeout=timeout, env=env, cwd=w, log=log, what=client)
    except HarnessError as e:
        raise ClientError(client, str(e).split("\n", 1)[0], e.log_tail) from None
    return res.stdout


def _write_registries_conf(path: Path, registry: str | None, mirror: str | None) -> None:
    """A registries.conf with (optionally) one registry and its insecure mirror."""
    text = 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
    if registry and mirror:
        text += (f'\n[[registry]]\nprefix = "{registry}"\nlocation = "{registry}"\n'
                 f'\n[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n')
    path.write_text(text)


def _split_platform(platform: str) -> list[str]:
    """``os/arch[/variant]`` → [os, arch, variant?]."""
    parts = platform.split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"platform must be os/arch[/variant], got {platform!r}")
    return parts


# --------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------

def skopeo_copy(source_ref: str, dest_dir: Path | None = None, *, registries_conf_mirror: str | None = None,
                all_platforms: bool = False, tls_verify: bool = False,
                creds: tuple[str, str] | str | None = None, platform: str | None = None,
                cert_dir: Path | None = None, timeout: float = PULL_TIMEOUT) -> str:
    """``skopeo copy docker://SOURCE dir:DEST``; returns skopeo's digest after verifying every file.

    Direct form: ``source_ref`` names the registry itself
    (``127.0.0.1:PORT/library/hello:latest``, ``docker://`` optional) and
    ``tls_verify``/``cert_dir``/``creds`` apply to it. Mirror form:
    ``registries_conf_mirror="HOST:PORT"`` and a Docker Hub name
    (``docker.io/library/hello:latest``, ``hello``...): registries.conf sends
    the pull to that insecure mirror. ``dest_dir`` must be absent or empty; it
    is kept for the caller (None: a temporary one is used and removed).
    The digest is the copied manifest's: with ``all_platforms`` the index
    digest, otherwise for an index the chosen platform instance's digest.
    """
    with proc_util.WorkDir("mirror-skopeo.") as w:
        if registries_conf_mirror is not None:
            _check_host_port(registries_conf_mirror)
            image = normalize_image(source_ref)
            _write_registries_conf(w / "registries.conf", registry_of(image), registries_conf_mirror)
            direct = [_host(registries_conf_mirror)]
        else:
            image = source_ref.removeprefix("docker://")
            _write_registries_conf(w / "registries.conf", None, None)
            direct = [_host(image.split("/", 1)[0])]
        (w / "policy.json").write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
        (w / "auth.json").write_text("{}")
        (w / "registries.d").mkdir()
        out = Path(dest_dir) if dest_dir is not None else w / "out"
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"dest_dir {out} is not empty")
        argv = ["skopeo", "--registries-conf", str(w / "registries.conf"), "--policy", str(w / "policy.json"),
                "--registries.d", str(w / "registries.d")]
        if platform:
            parts = _split_platform(platform)
            argv += ["--override-os", parts[0], "--override-arch", parts[1]]
            if len(parts) == 3:
                argv += ["--override-variant", parts[2]]
        argv += ["copy", "--retry-times", "0", "--authfile", str(w / "auth.json"),
                 "--digestfile", str(w / "digest")]
        if registries_conf_mirror is None:
            argv.append(f"--src-tls-verify={'true' if tls_verify else 'false'}")
            if cert_dir is not None:
                argv += ["--src-cert-dir", str(cert_dir)]
        if creds is not None:
            argv += ["--src-creds", creds if isinstance(creds, str) else f"{creds[0]}:{creds[1]}"]
        if all_platforms:
            argv.append("--all")
        argv += [f"docker://{image}", f"dir:{out}"]
        _run_client("skopeo", argv, w=w, env=_client_env(w, *direct), timeout=timeout,
                    log=w / "skopeo.log", isolate=True)
        digest = (w / "digest").read_text().strip()
        verify_dir_copy(out, digest)
        return digest


# --------------------------------------------------------------------------
# podman
# --------------------------------------------------------------------------

def podman_pull(mirror_host_port: str, image: str, *, platform: str | None = None,
                storage_driver: str = "vfs", timeout: float = PULL_TIMEOUT) -> str:
    """``podman pull`` through a registries.conf mirror; returns podman's ``.Digest``.

    Storage (vfs by default), runroot, conf, auth and events all live in the
    temp dir; podman runs in a private mount namespace where /var/lib and /run
    are copy-on-write overlays (it writes a blob-info cache below
    /var/lib/containers and netavark's /run/containers/networks as root).
    """
    _check_host_port(mirror_host_port)
    image = normalize_image(image)
    with proc_util.WorkDir("mirror-podman.") as w:
        _write_registries_conf(w / "registries.conf", registry_of(image), mirror_host_port)
        (w / "storage.conf").write_text(f'[storage]\ndriver = "{storage_driver}"\n'
                                        f'runroot = "{w}/runroot"\ngraphroot = "{w}/root"\n')
        (w / "containers.conf").write_text(
            f'[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'events_logfile_path = "{w}/events.log"\n[network]\nnetwork_config_dir = "{w}/net"\n')
        (w / "policy.json").write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
        (w / "auth.json").write_text("{}")
        env = _client_env(w, _host(mirror_host_port),
                          CONTAINERS_REGISTRIES_CONF=str(w / "registries.conf"),
                          CONTAINERS_STORAGE_CONF=str(w / "storage.conf"),
                          CONTAINERS_CONF=str(w / "containers.conf"),
                          REGISTRY_AUTH_FILE=str(w / "auth.json"))
        base = ["podman", "--root", str(w / "root"), "--runroot", str(w / "runroot"),
                "--storage-driver", storage_driver, "--cgroup-manager", "cgroupfs",
                "--events-backend", "file", "--tmpdir", str(w / "libpodtmp"),
                "--network-config-dir", str(w / "net")]
        pull = base + ["pull", "--signature-policy", str(w / "policy.json")]
        if platform:
            pull += ["--platform", platform]
        log = w / "podman.log"
        overlays = ("/var/lib", "/run")
        _run_client("podman", pull + [image], w=w, env=env, timeout=timeout, log=log,
                    isolate=True, overlays=overlays)
        digest = _run_client("podman", base + ["image", "inspect", "--format", "{{.Digest}}", image],
                             w=w, env=env, timeout=30, log=log, isolate=True, overlays=overlays).strip()
        if not digest.startswith("sha256:"):
            raise ClientError("podman", f"no digest for {image}: {digest!r}", proc_util.tail_file(log))
        return digest


# --------------------------------------------------------------------------
# containerd
# --------------------------------------------------------------------------

def _check_socket_path(path: Path) -> None:
    """Unix socket paths are limited to 107 bytes; fail early with a clear message."""
    if len(str(path).encode()) > 100:
        raise ValueError(f"socket path too long for a unix socket: {path} (use a shorter work dir)")


class ContainerdDaemon:
    """A private containerd whose root, state, sockets and opt dir are in a work dir.

    CRI and the btrfs/zfs/devmapper/aufs snapshotters are disabled. Use as a
    context manager; :meth:`stop` stops it by PID (TERM, then KILL) and
    unmounts whatever its snapshotters left below the work dir.
    """

    def __init__(self, workdir: Path, *, env: dict[str, str] | None = None) -> None:
        """Prepare the config in ``workdir`` (which the caller owns)."""
        self.workdir = Path(workdir)
        self.socket = self.workdir / "containerd.sock"
        self.config_path = self.workdir / "containerd.toml"
        self.log_path = self.workdir / "containerd.log"
        self.env = env if env is not None else proc_util.base_env(self.workdir)
        _check_socket_path(Path(f"{self.socket}.ttrpc"))
        self._proc: proc_util.ManagedProcess | None = None

    def _write_config(self) -> None:
        """containerd config v2 confined to the work dir."""
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(f'''version = 2
root = "{w}/root"
state = "{w}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = "{self.socket}.debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "{w}/opt"
''')

    def ctr_argv(self, *args: str, namespace: str = CTR_NAMESPACE) -> list[str]:
        """``ctr --address SOCK --namespace NS ARGS...``."""
        return ["ctr", "--address", str(self.socket), "--namespace", namespace, *args]

    def ctr(self, *args: str, timeout: float = 30.0, log: Path | None = None,
            env: dict[str, str] | None = None) -> str:
        """Run a ctr command against this daemon; returns stdout (raises ClientError)."""
        try:
            return proc_util.run(self.ctr_argv(*args), timeout=timeout, env=env or self.env,
                                 cwd=self.workdir, log=log, what="ctr").stdout
        except HarnessError as e:
            raise ClientError("ctr", str(e).split("\n", 1)[0], e.log_tail) from None

    def start(self, timeout: float = DAEMON_START_TIMEOUT) -> ContainerdDaemon:
        """Start containerd and wait until ``ctr version`` answers."""
        self._write_config()
        self._proc = proc_util.ManagedProcess(["containerd", "--config", str(self.config_path)],
                                              stdout=self.log_path, env=self.env, cwd=self.workdir)

        def ready() -> bool:
            """containerd answers on its socket (raises if it died)."""
            if self._proc is None or not self._proc.alive():
                raise ClientError("ctr", "containerd exited during startup", proc_util.tail_file(self.log_path))
            if not self.socket.exists():
                return False
            res = proc_util.run(self.ctr_argv("version"), timeout=5, env=self.env, check=False)
            return res.returncode == 0

        try:
            if not proc_util.wait_until(ready, timeout, 0.1):
                raise ClientError("ctr", "containerd did not start", proc_util.tail_file(self.log_path))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop containerd by PID and unmount leftovers below the work dir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop(term_timeout=10)
        proc_util.unmount_under(self.workdir)

    @property
    def pid(self) -> int | None:
        """containerd's PID while running."""
        return self._proc.pid if self._proc and self._proc.alive() else None

    def __enter__(self) -> ContainerdDaemon:
        """Start."""
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop."""
        self.stop()


def write_hosts_toml(hosts_dir: Path, registry: str, mirror_host_port: str, *,
                     upstream: str | None = None) -> Path:
    """``HOSTS_DIR/<registry>/hosts.toml`` with the mirror as pull/resolve host."""
    server = upstream or (DOCKER_HUB_UPSTREAM if registry == "docker.io" else f"https://{registry}")
    path = hosts_dir / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'server = "{server}"\n\n[host."http://{mirror_host_port}"]\n'
                    f'  capabilities = ["pull", "resolve"]\n')
    return path


def _ctr_verify(daemon: ContainerdDaemon, image: str, digest: str, *, platform: str,
                all_platforms: bool, log: Path) -> None:
    """Walk index → manifests → config/layers; every blob must be in the content store."""
    have = set(daemon.ctr("content", "ls", "-q", timeout=15, log=log).split())

    def need(d: str) -> None:
        """Fail unless blob ``d`` is in the content store."""
        if d not in have:
            raise ClientError("ctr", f"blob {d} of {image} missing from the content store",
                              proc_util.tail_file(log))

    need(digest)
    top = json.loads(daemon.ctr("content", "get", digest, timeout=15))
    if "manifests" in top:
        want_os, want_arch = _split_platform(platform)[:2]
        mans = [m["digest"] for m in top["manifests"]
                if all_platforms or ((m.get("platform") or {}).get("os") == want_os
                                     and (m.get("platform") or {}).get("architecture") == want_arch)]
        if not all_platforms:
            mans = mans[:1]
        if not mans:
            raise ClientError("ctr", f"no manifest for {platform} in the index of {image}")
    else:
        mans = [digest]
    for m in mans:
        need(m)
        doc = json.loads(daemon.ctr("content", "get", m, timeout=15))
        for d in [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]:
            need(d)


def ctr_pull(mirror_host_port: str, image: str, *, all_platforms: bool = False,
             platform: str | None = None, snapshotter: str = "overlayfs",
             timeout: float = PULL_TIMEOUT) -> str:
    """``ctr images pull --hosts-dir`` via a private containerd; returns the image's target digest.

    Verifies that the image is listed, that every blob it needs (all
    platforms with ``all_platforms``) is in the content store, and that
    ``ctr images check`` reports it complete and unpacked. A foreign
    ``platform`` is fetched with ``ctr content fetch`` (no unpack, no
    ``images check``) because ctr 1.6's ``images pull --platform <foreign>``
    fails its unpack check.
    """
    _check_host_port(mirror_host_port)
    image = normalize_image(image)
    plat = platform or host_platform()
    with proc_util.WorkDir("mirror-ctr.") as w:
        env = _client_env(w, _host(mirror_host_port))
        write_hosts_toml(w / "certs.d", registry_of(image), mirror_host_port)
        log = w / "ctr.log"
        with ContainerdDaemon(w / "containerd", env=env) as daemon:
            foreign = platform is not None and plat.split("/")[:2] != host_platform().split("/")[:2]
            if foreign and not all_platforms:
                cmd, unpack = ["content", "fetch", "--platform", plat], False
            else:
                cmd, unpack = ["images", "pull", "--snapshotter", snapshotter], True
                if all_platforms:
                    cmd.append("--all-platforms")
                elif platform:
                    cmd += ["--platform", platform]
            daemon.ctr(*cmd, "--hosts-dir", str(w / "certs.d"), image, timeout=timeout, log=log)
            listed = daemon.ctr("images", "ls", f"name=={image}", timeout=15, log=log).splitlines()[1:]
            digest = listed[0].split()[2] if listed else ""
            if not digest.startswith("sha256:"):
                raise ClientError("ctr", f"{image} not listed by containerd", proc_util.tail_file(log))
            _ctr_verify(daemon, image, digest, platform=plat, all_platforms=all_platforms, log=log)
            if not unpack:  # `images check` would look for the host platform's manifest
                return digest
            check = daemon.ctr("images", "check", "--snapshotter", snapshotter, f"name=={image}",
                               timeout=15, log=log).splitlines()[1:]
            fields = check[0].split() if check else []
            if "complete" not in fields:
                raise ClientError("ctr", f"images check: not complete: {check}", proc_util.tail_file(log))
            if fields[-1] != "true":
                raise ClientError("ctr", f"images check: not unpacked: {check}", proc_util.tail_file(log))
            return digest


# --------------------------------------------------------------------------
# docker
# --------------------------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (for pinging dockerd)."""

    def __init__(self, path: str, timeout: float = 2.0) -> None:
        """Connect to ``path``."""
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        """Open the unix socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _docker_ping(sock: Path) -> bool:
    """True if dockerd answers ``GET /_ping`` with OK."""
    conn = _UnixHTTPConnection(str(sock))
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class DockerDaemon:
    """A private dockerd with ``registry-mirrors``, on its own private containerd.

    daemon.json sets the mirror, data-root, exec-root, pidfile, key path and
    unix socket inside the work dir; vfs storage (by default), cgroupfs, no
    iptables, no bridge. dockerd is pointed at a :class:`ContainerdDaemon`
    in the work dir (``--containerd``) instead of starting its own, which
    would create /opt/containerd on the host, and runs in a private mount
    namespace with a copy-on-write /run (it creates /run/docker/plugins).
    """

    def __init__(self, workdir: Path, mirror_host_port: str | None, *, storage_driver: str = "vfs",
                 env: dict[str, str] | None = None) -> None:
        """Prepare paths in ``workdir`` (which the caller owns)."""
        if mirror_host_port is not None:
            _check_host_port(mirror_host_port)
        self.workdir = Path(workdir)
        self.mirror = mirror_host_port
        self.storage_driver = storage_driver
        self.socket = self.workdir / "docker.sock"
        self.log_path = self.workdir / "dockerd.log"
        self.env = env if env is not None else proc_util.base_env(self.workdir)
        self.cli_env = dict(self.env, DOCKER_CONFIG=str(self.workdir / "cli"))
        self.containerd = ContainerdDaemon(self.workdir / "containerd", env=self.env)
        _check_socket_path(self.socket)
        self._proc: proc_util.ManagedProcess | None = None
        #: more directories dockerd sees as private copy-on-write overlays (e.g. ``/etc/docker``
        #: for a certs.d written in the work dir, see :func:`trust_ca_in_docker`)
        self.extra_overlays: tuple[str, ...] = ()

    def _write_config(self) -> Path:
        """daemon.json confined to the work dir."""
        w = self.workdir
        for d in ("data", "exec", "cli"):
            (w / d).mkdir(exist_ok=True)
        cfg = {
            "registry-mirrors": [f"http://{self.mirror}"] if self.mirror else [],
            "data-root": str(w / "data"), "exec-root": str(w / "exec"),
            "pidfile": str(w / "docker.pid"), "deprecated-key-path": str(w / "key.json"),
            "hosts": [f"unix://{self.socket}"], "containerd": str(self.containerd.socket),
            "containerd-namespace": "mirrortest-docker",
            "containerd-plugins-namespace": "mirrortest-docker-plugins",
            "storage-driver": self.storage_driver, "exec-opts": ["native.cgroupdriver=cgroupfs"],
            "iptables": False, "ip6tables": False, "ip-masq": False, "bridge": "none",
            "userland-proxy": False, "log-level": "info",
        }
        path = w / "daemon.json"
        path.write_text(json.dumps(cfg, indent=1))
        return path

    def start(self, timeout: float = DAEMON_START_TIMEOUT) -> DockerDaemon:
        """Start containerd and dockerd; wait until ``/_ping`` answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.containerd.start(timeout)
            config = self._write_config()
            # dockerd always creates /run/docker/plugins: give it a copy-on-write /run
            argv = proc_util.isolated_argv(self.workdir, ["dockerd", "--config-file", str(config)],
                                           overlays=("/run", *self.extra_overlays))
            self._proc = proc_util.ManagedProcess(argv, stdout=self.log_path, env=self.env,
                                                  cwd=self.workdir)

            def ready() -> bool:
                """dockerd answers /_ping (raises if it died)."""
                if self._proc is None or not self._proc.alive():
                    raise ClientError("docker", "dockerd exited during startup",
                                      proc_util.tail_file(self.log_path))
                return self.socket.exists() and _docker_ping(self.socket)

            if not proc_util.wait_until(ready, timeout, 0.1):
                raise ClientError("docker", "dockerd did not start", proc_util.tail_file(self.log_path))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop dockerd, then its containerd (by PID), then unmount leftovers."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                proc.stop(term_timeout=15)
        finally:
            self.containerd.stop()
            proc_util.unmount_under(self.workdir)

    def docker(self, *args: str, timeout: float = 30.0, log: Path | None = None) -> str:
        """Run the docker CLI against this daemon; returns stdout (raises ClientError)."""
        argv = ["docker", "-H", f"unix://{self.socket}", *args]
        try:
            return proc_util.run(argv, timeout=timeout, env=self.cli_env, cwd=self.workdir,
                                 log=log, what="docker").stdout
        except HarnessError as e:
            tail = e.log_tail + "\n--- dockerd ---\n" + proc_util.tail(
                "\n".join(line for line in proc_util.iter_lines(self.log_path)
                          if "level=error" in line or "level=warn" in line), 8)
            raise ClientError("docker", str(e).split("\n", 1)[0], tail) from None

    def pull(self, image: str, *, platform: str | None = None, timeout: float = PULL_TIMEOUT) -> str:
        """``docker pull``; returns the RepoDigest digest of the pulled reference."""
        image = normalize_image(image)
        log = self.workdir / "pull.log"
        args = ["pull", "-q"] + (["--platform", platform] if platform else []) + [image]
        self.docker(*args, timeout=timeout, log=log)
        repo = image.rsplit("@", 1)[0]
        repo = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[1] else repo
        familiar = repo.removeprefix("docker.io/").removeprefix("library/")
        out = self.docker("image", "inspect", "--format", "{{range .RepoDigests}}{{println .}}{{end}}",
                          image, timeout=15, log=log)
        for line in out.split():
            name, _, digest = line.partition("@")
            if name in (repo, familiar, repo.removeprefix("docker.io/")):
                return digest
        raise ClientError("docker", f"no RepoDigest for {image} in {out.split()}", proc_util.tail_file(log))

    def __enter__(self) -> DockerDaemon:
        """Start."""
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop."""
        self.stop()


def docker_pull(mirror_host_port: str, image: str, *, platform: str | None = None,
                storage_driver: str = "vfs", timeout: float = PULL_TIMEOUT) -> str:
    """``docker pull`` on a private dockerd whose daemon.json lists the mirror; returns the RepoDigest's digest.

    dockerd only applies ``registry-mirrors`` to docker.io images, and only
    mirror URLs without a path.
    """
    _check_host_port(mirror_host_port)
    image = normalize_image(image)
    if registry_of(image) != "docker.io":
        raise ValueError(f"dockerd only mirrors docker.io images, got {image}")
    with proc_util.WorkDir("mirror-docker.") as w:
        env = _client_env(w, _host(mirror_host_port))
        with DockerDaemon(w / "docker", mirror_host_port, storage_driver=storage_driver, env=env) as daemon:
            return daemon.pull(image, platform=platform, timeout=timeout)


# --------------------------------------------------------------------------
# pushing to (and pulling from) a registry directly: the private-registry side
# --------------------------------------------------------------------------

def private_docker(workdir: Path, registry_host_port: str, *, storage_driver: str = "vfs") -> DockerDaemon:
    """A :class:`DockerDaemon` with no mirror, for push/pull against ``registry_host_port`` itself.

    dockerd treats 127.0.0.0/8 registries as insecure (plain HTTP) by default,
    so ``127.0.0.1:PORT/repo:tag`` names need no daemon.json setting. Not started.
    """
    _check_host_port(registry_host_port)
    workdir = Path(workdir)
    return DockerDaemon(workdir / "docker", None, storage_driver=storage_driver,
                        env=_client_env(workdir, _host(registry_host_port)))


def docker_push(daemon: DockerDaemon, image: str, *, timeout: float = PULL_TIMEOUT) -> str:
    """``docker push IMAGE``; returns the manifest digest docker reports (``digest: sha256:...``)."""
    out = daemon.docker("push", image, timeout=timeout, log=daemon.workdir / "push.log")
    for line in out.splitlines():
        _, found, rest = line.partition("digest: ")
        if found and rest.startswith("sha256:"):
            return rest.split()[0]
    raise ClientError("docker", f"no digest in the output of docker push {image}", proc_util.tail(out))


def docker_repo_digest(daemon: DockerDaemon, image: str) -> str:
    """The digest of ``image``'s RepoDigest for its own repository (``REPO@sha256:...``)."""
    repo = image.rsplit("@", 1)[0]
    if ":" in repo.rsplit("/", 1)[-1]:
        repo = repo.rsplit(":", 1)[0]
    out = daemon.docker("image", "inspect", "--format", "{{range .RepoDigests}}{{println .}}{{end}}",
                        image, timeout=15)
    for line in out.split():
        name, _, digest = line.partition("@")
        if name == repo:
            return digest
    raise ClientError("docker", f"no RepoDigest for {repo} in {out.split()}")


class PodmanSession:
    """podman with its storage, runroot, configs and auth in one temp dir, for several commands.

    Like :func:`podman_pull` (vfs storage, private mount namespace with
    copy-on-write /var/lib and /run, blackhole proxy) but talking to
    registries directly: pass ``--tls-verify=false`` for plain-HTTP ones.
    The local image store lives as long as the session. Use as a context
    manager; the directory is removed on exit.
    """

    def __init__(self, *direct_hosts: str, storage_driver: str = "vfs") -> None:
        """Prepare (nothing runs yet); ``direct_hosts`` bypass the blackhole proxy."""
        self._workdir = proc_util.WorkDir("mirror-podman-session.")
        w = self.workdir = self._workdir.path
        self.log = w / "podman.log"
        _write_registries_conf(w / "registries.conf", None, None)
        (w / "storage.conf").write_text(f'[storage]\ndriver = "{storage_driver}"\n'
                                        f'runroot = "{w}/runroot"\ngraphroot = "{w}/root"\n')
        (w / "containers.conf").write_text(
            f'[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'events_logfile_path = "{w}/events.log"\n[network]\nnetwork_config_dir = "{w}/net"\n')
        self.policy = w / "policy.json"
        self.policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
        (w / "auth.json").write_text("{}")
        self.env = _client_env(w, *direct_hosts,
                               CONTAINERS_REGISTRIES_CONF=str(w / "registries.conf"),
                               CONTAINERS_STORAGE_CONF=str(w / "storage.conf"),
                               CONTAINERS_CONF=str(w / "containers.conf"),
                               REGISTRY_AUTH_FILE=str(w / "auth.json"))
        self.base = ["podman", "--root", str(w / "root"), "--runroot", str(w / "runroot"),
                     "--storage-driver", storage_driver, "--cgroup-manager", "cgroupfs",
                     "--events-backend", "file", "--tmpdir", str(w / "libpodtmp"),
                     "--network-config-dir", str(w / "net")]

    def podman(self, *args: str, timeout: float = PULL_TIMEOUT) -> str:
        """Run one podman command; returns stdout (raises ClientError with the log tail)."""
        return _run_client("podman", self.base + list(args), w=self.workdir, env=self.env, timeout=timeout,
                           log=self.log, isolate=True, overlays=("/var/lib", "/run"))

    def digest(self, image: str) -> str:
        """``podman image inspect --format {{.Digest}}`` of a local image."""
        digest = self.podman("image", "inspect", "--format", "{{.Digest}}", image, timeout=30).strip()
        if not digest.startswith("sha256:"):
            raise ClientError("podman", f"no digest for {image}: {digest!r}", proc_util.tail_file(self.log))
        return digest

    def push(self, image: str, *, tls_verify: bool = False, timeout: float = PULL_TIMEOUT) -> str:
        """``podman push IMAGE`` (to the registry its name says); returns ``--digestfile``'s digest."""
        digest_file = self.workdir / "push.digest"
        digest_file.unlink(missing_ok=True)
        self.podman("push", f"--tls-verify={'true' if tls_verify else 'false'}",
                    "--digestfile", str(digest_file), image, timeout=timeout)
        return digest_file.read_text().strip()

    def pull(self, image: str, *, tls_verify: bool = False, timeout: float = PULL_TIMEOUT) -> str:
        """``podman pull IMAGE`` (any transport); returns the pulled image's ``.Digest``."""
        self.podman("pull", f"--tls-verify={'true' if tls_verify else 'false'}",
                    "--signature-policy", str(self.policy), image, timeout=timeout)
        return self.digest(image.removeprefix("docker://"))

    def pull_id(self, source: str, *, tls_verify: bool = False, timeout: float = PULL_TIMEOUT) -> str:
        """``podman pull -q SOURCE`` for any transport (``oci:DIR:REF``...); returns the image ID
        (``sha256:<hex>``, the config digest)."""
        out = self.podman("pull", "-q", f"--tls-verify={'true' if tls_verify else 'false'}",
                          "--signature-policy", str(self.policy), source, timeout=timeout)
        lines = out.split()
        if not lines:
            raise ClientError("podman", f"no image ID from podman pull {source}", proc_util.tail_file(self.log))
        return "sha256:" + lines[-1].removeprefix("sha256:")

    def pull_layout(self, layout_dir: Path, ref: str, *, timeout: float = PULL_TIMEOUT) -> str:
        """``pull_id`` of ``oci:LAYOUT:REF``.  podman names such an image after the layout's
        path, so the path must be a valid reference; random temp dir names are not always
        (mkdtemp may end one with ``_``): pull through a symlink with a safe name."""
        safe = Path(tempfile.gettempdir()) / f"mirror-podman-layout-{secrets.token_hex(6)}"
        safe.symlink_to(Path(layout_dir).resolve())
        try:
            return self.pull_id(f"oci:{safe}:{ref}", timeout=timeout)
        finally:
            safe.unlink()

    def image_ids(self) -> list[str]:
        """Full IDs (``sha256:<hex>``) of every local image."""
        return ["sha256:" + i.removeprefix("sha256:")
                for i in self.podman("images", "-q", "--no-trunc", timeout=30).split()]

    def close(self) -> None:
        """Remove the session's directory (unmounting leftovers)."""
        self._workdir.cleanup()

    def __enter__(self) -> PodmanSession:
        """Return self."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """close()."""
        self.close()


# --------------------------------------------------------------------------
# TLS trust and logins (private registries with HTTPS and client auth)
# --------------------------------------------------------------------------

def trust_ca_in_docker(daemon: DockerDaemon, registry_host_port: str, ca_pem: bytes) -> Path:
    """Make ``daemon`` (not started yet) trust ``ca_pem`` for ``registry_host_port`` through
    ``/etc/docker/certs.d/HOST:PORT/ca.crt`` -- without touching the host's ``/etc``.

    dockerd runs in a private mount namespace; this adds a copy-on-write overlay on
    ``/etc/docker`` (``/etc`` if that does not exist) whose upper layer is in the daemon's work
    dir, and writes ``ca.crt`` into it. Returns the upper-layer path of the file.

    Note: dockerd always treats 127.0.0.0/8 registries as insecure (it tries HTTPS with
    verification off, then HTTP), so a pull from a loopback HTTPS registry does not prove that
    the CA was checked; it proves that dockerd spoke TLS when the port speaks only TLS.
    """
    _check_host_port(registry_host_port)
    if daemon._proc is not None:
        raise RuntimeError("trust_ca_in_docker must be called before the daemon starts")
    etc = "/etc/docker" if Path("/etc/docker").is_dir() else "/etc"
    upper = daemon.workdir / ("ovl" + etc.replace("/", "_")) / "upper"
    certs_d = upper / ("certs.d" if etc == "/etc/docker" else "docker/certs.d")
    path = certs_d / registry_host_port / "ca.crt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ca_pem)
    if etc not in daemon.extra_overlays:
        daemon.extra_overlays = (*daemon.extra_overlays, etc)
    return path


def run_with_input(argv: Sequence[str], input_text: str, *, timeout: float, env: dict[str, str],
                   cwd: Path, log: Path | None = None) -> tuple[int, str]:
    """Run a command feeding ``input_text`` on stdin (a password for ``--password-stdin``);
    returns (exit code, stdout+stderr). The input is never logged. Timeouts kill the group."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=cwd, text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        raise ClientError(Path(argv[0]).name, f"timed out after {timeout}s: {' '.join(proc_util.display_argv(list(argv)))}",
                          proc_util.tail(out or "")) from None
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(proc_util.display_argv(list(argv)))} (password on stdin)\n{out}[exit {proc.returncode}]\n")
    return proc.returncode, out


def docker_login(daemon: DockerDaemon, registry_host_port: str, user: str, password: str, *,
                 check: bool = True, timeout: float = 60.0) -> tuple[int, str]:
    """``docker login HOST:PORT -u USER --password-stdin`` against ``daemon``; (exit code, output).
    With ``check`` a failure raises :class:`ClientError`."""
    argv = ["docker", "-H", f"unix://{daemon.socket}", "login", registry_host_port, "-u", user, "--password-stdin"]
    rc, out = run_with_input(argv, password, timeout=timeout, env=daemon.cli_env, cwd=daemon.workdir,
                             log=daemon.workdir / "login.log")
    if check and rc != 0:
        raise ClientError("docker", f"docker login {registry_host_port} -u {user} exited {rc}", proc_util.tail(out))
    return rc, out


def podman_login(session: PodmanSession, registry_host_port: str, user: str, password: str, *,
                 tls_verify: bool = False, cert_dir: Path | None = None, check: bool = True,
                 timeout: float = 60.0) -> tuple[int, str]:
    """``podman login HOST:PORT -u USER --password-stdin`` in ``session`` (credentials go to the
    session's auth.json); (exit code, output). With ``check`` a failure raises :class:`ClientError`."""
    args = session.base + ["login", f"--tls-verify={'true' if tls_verify else 'false'}", "-u", user, "--password-stdin"]
    if cert_dir is not None:
        args += ["--cert-dir", str(cert_dir)]
    argv = proc_util.isolated_argv(session.workdir, args + [registry_host_port], overlays=("/var/lib", "/run"))
    rc, out = run_with_input(argv, password, timeout=timeout, env=session.env, cwd=session.workdir, log=session.log)
    if check and rc != 0:
        raise ClientError("podman", f"podman login {registry_host_port} -u {user} exited {rc}", proc_util.tail(out))
    return rc, out


def pull(client: str, mirror_host_port: str, image: str, **kwargs: object) -> str:
    """Dispatch to the pull function of ``client`` (skopeo uses the mirror form)."""
    if client == "skopeo":
        return skopeo_copy(image, None, registries_conf_mirror=mirror_host_port, **kwargs)  # type: ignore[arg-type]
    funcs = {"podman": podman_pull, "ctr": ctr_pull, "docker": docker_pull}
    if client not in funcs:
        raise ValueError(f"unknown client {client!r}")
    return str(funcs[client](mirror_host_port, image, **kwargs))  # type: ignore[operator]


def timed(fn: Callable[..., T], *args: object, **kwargs: object) -> tuple[T, float]:
    """(result, seconds) of calling ``fn``."""
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


__all__ = [
    "CLIENTS", "ClientError", "ContainerdDaemon", "DockerDaemon", "PodmanSession", "client_available",
    "ctr_pull", "docker_login", "docker_pull", "docker_push", "docker_repo_digest", "missing_requirements",
    "normalize_image", "podman_login", "podman_pull", "private_docker", "pull", "run_with_input", "skip_reason",
    "skopeo_copy", "timed", "trust_ca_in_docker", "verify_dir_copy", "write_hosts_toml",
]
