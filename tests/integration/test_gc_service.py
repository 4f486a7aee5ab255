"""GC inside the real service: the periodic run (a `mirror gc` child process) frees what a
delete left, and reports it in the log and the metrics."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.integration import images
from tests.integration.clients import skip_reason
from tests.integration.mirror_proc import MirrorProcess
from tests.integration.upstream_registry import free_port

pytestmark = pytest.mark.integration


def test_periodic_gc_in_the_service(workdir):
    """With gc.interval 1 s and a grace period of 3 s, a deleted manifest's blobs leave the
    store within a few seconds while the service keeps serving; metrics count the runs.
    (Without any grace, a run between a push's blob uploads and its manifest PUT may take
    the blobs the manifest is about to reference: the push then fails, as it should.)"""
    if skip_reason("skopeo"):
        pytest.skip(skip_reason("skopeo"))
    metrics_port = free_port()
    d = workdir / "gc"
    d.mkdir()
    with MirrorProcess(
        d, [], hosted=["*"], gc={"interval": 1, "grace": 3}, metrics={"listen": f"tcp:{metrics_port}:interface=127.0.0.1"}
    ) as m:
        layout = workdir / "layout"
        images.build_standard_layout(layout, big_layer_sizes=None)
        digest = images.push(layout, "latest", m.host_port, "team/app", "v1")
        keep = images.push(layout, "multi", m.host_port, "team/keep", "v1", fmt="oci", all_platforms=True)
        blobs_before = sum(1 for p in (m.root / "blobs").rglob("*") if p.is_file())
        request = urllib.request.Request(f"{m.url}/v2/team/app/manifests/{digest}", method="DELETE")
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 202
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sum(1 for p in (m.root / "blobs").rglob("*") if p.is_file()) < blobs_before:
                break
            time.sleep(0.2)
        assert sum(1 for p in (m.root / "blobs").rglob("*") if p.is_file()) < blobs_before
        with urllib.request.urlopen(f"{m.url}/v2/team/keep/manifests/{keep}", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["schemaVersion"] == 2
        def gc_runs() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
                text = r.read().decode()
            runs = [line for line in text.splitlines() if line.startswith("mirror_gc_runs_total ")]
            return float(runs[0].split()[1]) if runs else 0.0

        # the child's summary reaches the service when the child exits, just after its deletes
        deadline = time.monotonic() + 20
        while gc_runs() < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gc_runs() >= 1
        assert "gc: " in m.log_text() and "blobs deleted" in m.log_text()
