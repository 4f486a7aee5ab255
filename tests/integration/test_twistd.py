"""The real twistd process: the plugin is listed, and a bad config, a listener that cannot
be opened or a store that cannot be opened ends it at start-up without a traceback."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def write_config(tmp_path, text):
    path = tmp_path / "mirror.yaml"
    path.write_text(text)
    return path


def test_twistd_help_lists_mirror():
    """`twistd --help` lists the mirror command."""
    twistd = Path(sys.executable).with_name("twistd")
    out = subprocess.run([twistd, "--help"], capture_output=True, text=True, timeout=60, cwd="/").stdout
    assert any(line.split()[:1] == ["mirror"] for line in out.splitlines())


def test_twistd_with_bad_config_exits_without_traceback(tmp_path):
    """The real twistd process refuses a bad config: non-zero exit, the one line, no traceback."""
    path = write_config(tmp_path, "listen: 5\nstorage: {root: /tmp/x}\n")
    twistd = Path(sys.executable).with_name("twistd")
    result = subprocess.run(
        [twistd, "--nodaemon", "--pidfile=", "mirror", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert f"mirror: {path}: listen: expected an endpoint string or a list of them" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_the_installed_mirror_command_runs(tmp_path):
    """`mirror check-config` as users run it: the console script next to the interpreter."""
    mirror = Path(sys.executable).with_name("mirror")
    config = write_config(tmp_path, f"listen: tcp:0\nstorage: {{root: '{tmp_path}/store'}}\n")
    result = subprocess.run([mirror, "check-config", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config}: ok\n"


TWISTD = Path(sys.executable).with_name("twistd")
MIRROR = Path(sys.executable).with_name("mirror")
COMMANDS = {
    "twistd": lambda config: [TWISTD, "--nodaemon", "--pidfile=", "mirror", "--config", str(config)],
    "mirror serve": lambda config: [MIRROR, "serve", "--config", str(config)],
}


def start_up_failure(tmp_path, command, text):
    """Run ``command`` on the config ``text``; it must end at start-up: (exit code, stderr, stdout)."""
    config = write_config(tmp_path, text)
    started = time.monotonic()
    result = subprocess.run(COMMANDS[command](config), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert time.monotonic() - started < 15, "start-up failure took too long"
    assert "Traceback" not in result.stderr + result.stdout
    return result.returncode, result.stderr, result.stdout


@pytest.fixture
def busy_port():
    """A 127.0.0.1 port another socket listens on for the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("key", ["listen", "metrics.listen"])
def test_a_port_in_use_stops_start_up_with_one_line(tmp_path, busy_port, command, key):
    """A `listen` or `metrics.listen` port another process holds ends the service at once:
    exit 2 and one line on stderr naming the endpoint, its key and the reason, no traceback
    (it used to log the error and run on, listening on nothing)."""
    endpoint = f"tcp:{busy_port}:interface=127.0.0.1"
    free = "tcp:0:interface=127.0.0.1"
    listen, metrics = (endpoint, free) if key == "listen" else (free, endpoint)
    code, err, _ = start_up_failure(
        tmp_path, command, f"listen: '{listen}'\nmetrics: {{listen: '{metrics}'}}\nstorage: {{root: '{tmp_path}/store'}}\n"
    )
    assert code == 2
    assert err == f"mirror: cannot listen on {endpoint} ({key}): Address already in use\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_the_second_of_several_endpoints_is_named_by_its_index(tmp_path, busy_port, command):
    """With a list of endpoints the line names the one that failed: `listen[1]`."""
    endpoint = f"tcp:{busy_port}:interface=127.0.0.1"
    code, err, _ = start_up_failure(
        tmp_path, command, f"listen: ['tcp:0:interface=127.0.0.1', '{endpoint}']\nstorage: {{root: '{tmp_path}/store'}}\n"
    )
    assert code == 2
    assert err == f"mirror: cannot listen on {endpoint} (listen[1]): Address already in use\n"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("problem", ["missing", "garbage"])
def test_a_bad_certificate_stops_start_up_with_one_line(tmp_path, command, problem):
    """An `ssl:` endpoint whose key or certificate file is missing or not PEM ends the
    service with one line naming the endpoint (it used to be a traceback)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    if problem == "garbage":
        key.write_text("not a key\n")
        cert.write_text("not a certificate\n")
    endpoint = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    code, err, _ = start_up_failure(tmp_path, command, f"listen: '{endpoint}'\nstorage: {{root: '{tmp_path}/store'}}\n")
    assert code == 2
    assert err.startswith(f"mirror: cannot listen on {endpoint} (listen): ") and err.count("\n") == 1
    reason = err.rsplit("): ", 1)[1]
    if problem == "missing":
        assert reason == f"No such file or directory: {cert}\n"
    else:
        assert reason.startswith("not a usable key or certificate (")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_store_that_cannot_be_opened_stops_start_up_with_one_line(tmp_path, command):
    """`storage.root` under a regular file: exit 2 and one line naming the key."""
    (tmp_path / "file").write_text("")
    code, err, _ = start_up_failure(tmp_path, command, f"listen: 'tcp:0'\nstorage: {{root: '{tmp_path}/file/store'}}\n")
    assert code == 2
    assert err.startswith(f"mirror: {tmp_path}/mirror.yaml: storage.root: ") and err.count("\n") == 1
