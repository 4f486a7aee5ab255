"""nginx as a round-robin load balancer in front of several mirror nodes, on 127.0.0.1.

What operators put in front of a cluster: every request may reach any node.  Bodies are
streamed both ways (no request or response buffering), uploads of any size pass, and the
access log records which node answered each request (``$upstream_addr``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from tests.integration.proc_util import HarnessError, ManagedProcess, tail_file, wait_until
from tests.integration.upstream_registry import free_port, port_is_open

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def skip_reason() -> str | None:
    return None if Path(NGINX).exists() else "nginx is not installed (apt-get install nginx-light)"


class NginxBalancer:
    """nginx on a free port balancing over ``backends`` (``host:port`` each)."""

    def __init__(self, directory: Path, backends: Sequence[str]) -> None:
        self.directory = directory
        self.port = free_port()
        self.access_log = directory / "logs" / "access.log"
        (directory / "logs").mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"        server {b};" for b in backends)
        self.conf = directory / "nginx.conf"
        self.conf.write_text(f"""\
daemon off;
user root;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/logs/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format lb '$request_method $request_uri $status $upstream_addr';
    access_log {self.access_log} lb;
    client_body_temp_path {directory}/tmp_body;
    proxy_temp_path {directory}/tmp_proxy;
    fastcgi_temp_path {directory}/tmp_fastcgi;
    uwsgi_temp_path {directory}/tmp_uwsgi;
    scgi_temp_path {directory}/tmp_scgi;
    upstream nodes {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{self.port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://nodes;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
""")
        self.process: ManagedProcess | None = None

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> NginxBalancer:
        self.process = ManagedProcess([NGINX, "-p", str(self.directory), "-c", str(self.conf)],
                                      stdout=self.directory / "logs" / "stdout.log")
        if not wait_until(lambda: port_is_open(self.port) or not self.process.alive(), 10) or not self.process.alive():
            log = tail_file(self.directory / "logs" / "error.log")
            self.stop()
            raise HarnessError("nginx did not start", log)
        return self

    def answered_by(self) -> list[str]:
        """The node (``host:port``) that answered each request so far."""
        if not self.access_log.exists():
            return []
        return [line.split()[-1] for line in self.access_log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> NginxBalancer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
