"""The real twistd process: the plugin is listed, and a bad config ends it without a traceback."""

import subprocess
import sys
from pathlib import Path


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
