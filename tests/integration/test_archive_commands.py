"""`mirror export` and `mirror import` as commands (child processes): exit codes, messages,
and the store they leave."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_ociarchive import FilesystemStore, flip_byte_in_largest_blob, snapshot

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, root: Path, **extra) -> Path:
    path.write_text(json.dumps({"listen": "tcp:0", "storage": {"root": str(root)},
                                "upstreams": [{"registry": "docker.io", "url": "http://127.0.0.1:9"},
                                              {"registry": "ghcr.io", "url": "http://127.0.0.1:9"}], **extra}))
    return path


def mirror(*args):
    return subprocess.run([sys.executable, "-m", "mirror.tools.cli", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_export_and_import_commands(source, tmp_path):
    """`mirror export` then `mirror import`: exit 0 with a line per image and a summary; a
    tampered archive: exit 1, one line on stderr, no traceback, nothing imported."""
    store, _ = source
    src_config = write_config(tmp_path / "src.yaml", store.root)
    dst_config = write_config(tmp_path / "dst.yaml", tmp_path / "target")
    out = tmp_path / "cache.tar"
    done = mirror("export", "--config", str(src_config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "exported docker.io/library/hello:latest sha256:" in done.stdout
    assert f"wrote {out}: 4 images, " in done.stdout
    bad = tmp_path / "bad.tar"
    bad.write_bytes(out.read_bytes())
    flip_byte_in_largest_blob(bad)
    refused = mirror("import", str(bad), "--config", str(dst_config))
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"mirror import: {bad}: refused: blobs/sha256/")
    assert refused.stderr.rstrip().endswith("; nothing was imported") and refused.stderr.count("\n") == 1
    assert list(FilesystemStore(tmp_path / "target").repositories()) == []
    missing = mirror("import", str(tmp_path / "absent.tar"), "--config", str(dst_config))
    assert missing.returncode == 1 and "refused: No such file or directory" in missing.stderr
    done = mirror("import", str(out), "--config", str(dst_config))
    assert done.returncode == 0, done.stderr
    assert f"imported 4 images from {out}: " in done.stdout
    assert snapshot(FilesystemStore(tmp_path / "target")) == snapshot(store)
    for result in (refused, missing, done):
        assert "Traceback" not in result.stderr


def test_export_command_errors(tmp_path):
    """An empty store or an uncached image: exit 1 and one line; no archive."""
    config = write_config(tmp_path / "c.yaml", tmp_path / "empty")
    result = mirror("export", "--config", str(config), "--out", str(tmp_path / "x.tar"))
    assert result.returncode == 1 and "nothing to export: the store holds no tagged image" in result.stderr
    result = mirror("export", "--config", str(config), "--out", str(tmp_path / "x.tar"), "alpine")
    assert result.returncode == 1
    assert result.stderr == ("mirror export: alpine: docker.io/library/alpine:latest is not in the store (warm it first); "
                             "no archive written\n")
    assert not (tmp_path / "x.tar").exists()
