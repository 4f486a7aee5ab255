"""Run the real ``twistd mirror`` as a child process, the way users run it.

:class:`MirrorProcess` writes a config file, starts ``twistd -n mirror --config ...``
on a free 127.0.0.1 port, waits until ``GET /v2/`` answers, and stops the process by
its PID (TERM, then KILL) — also when a test fails.  It can be stopped and started
again on the same store and port (the "upstream gone, restart" tests).
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import yaml

from tests.integration.proc_util import HarnessError, ManagedProcess, wait_until
from tests.integration.upstream_registry import free_port

TWISTD = str(Path(sys.executable).with_name("twistd"))
REPO = Path(__file__).resolve().parents[2]


def endpoint_port(description: str) -> int:
    """The port of a ``tcp:PORT:...`` or ``ssl:PORT:...`` server endpoint string."""
    kind, _, rest = description.partition(":")
    first = rest.split(":", 1)[0]
    if first.startswith("port="):
        first = first[5:]
    if kind not in ("tcp", "ssl") or not first.isdigit():
        raise ValueError(f"not a tcp:/ssl: endpoint with a port: {description!r}")
    return int(first)


def tls_endpoint(port: int, key: Path, cert: Path, *, interface: str = "127.0.0.1") -> str:
    """An ``ssl:`` server endpoint string (paths escaped for the endpoint parser)."""
    def esc(value: object) -> str:
        return str(value).replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
    return f"ssl:{port}:interface={interface}:privateKey={esc(key)}:certKey={esc(cert)}"


def tcp_endpoint(port: int, *, interface: str = "127.0.0.1") -> str:
    """A plain ``tcp:`` server endpoint string."""
    return f"tcp:{port}:interface={interface}"


class MirrorProcess:
    """``twistd -n mirror`` in front of the given upstreams, with its store in ``workdir``."""

    def __init__(self, workdir: Path, upstreams: list[dict[str, object]], *,
                 listen: list[str] | None = None, storage: dict[str, object] | None = None,
                 **extra: object) -> None:
        """``listen``: endpoint strings replacing the default single ``tcp:PORT`` one; one must
        be a plain ``tcp:`` endpoint (it is :attr:`port`, used for readiness and :attr:`url`).
        :attr:`ports` lists every endpoint's port, in order.  ``storage``: the storage section
        (default: a directory in ``workdir``)."""
        self.workdir = workdir
        if listen is None:
            self.port = free_port()
            listen_value: str | list[str] = f"tcp:{self.port}:interface=127.0.0.1"
            self.ports = [self.port]
        else:
            self.ports = [endpoint_port(e) for e in listen]
            plain = [endpoint_port(e) for e in listen if e.split(":", 1)[0] == "tcp"]
            if not plain:
                raise ValueError(f"listen needs a plain tcp: endpoint for readiness checks: {listen}")
            self.port = plain[0]
            listen_value = list(listen)
        self.root = workdir / "store"
        self.log = workdir / "mirror.log"
        self.config_path = workdir / "mirror.yaml"
        config = {
            "listen": listen_value,
            "storage": storage or {"root": str(self.root), "access_flush_interval": 1},
            "upstreams": upstreams,
            **extra,
        }
        self.config_path.write_text(yaml.safe_dump(config))
        # With client auth on, GET /v2/ is a 401: readiness asks the open /healthz instead.
        self.ready_path = "/healthz" if extra.get("auth") else "/v2/"
        self.proc: ManagedProcess | None = None

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}{self.ready_path}", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> MirrorProcess:
        argv = [TWISTD, "--nodaemon", "--pidfile=", "--logfile", str(self.log), "mirror", "--config", str(self.config_path)]
        self.proc = ManagedProcess(argv, stdout=self.workdir / "twistd.out", cwd=REPO)
        if not wait_until(lambda: self._ready() or not self.proc.alive(), 20):
            self.stop()
            raise HarnessError("mirror did not start", self.log_tail())
        if not self.proc.alive():
            raise HarnessError("mirror exited at start-up", self.log_tail())
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        out = (self.workdir / "twistd.out").read_text(errors="replace") if (self.workdir / "twistd.out").exists() else ""
        return "\n".join((out + text).splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> MirrorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
