"""The classic "run your own registry" walkthrough, end to end, against the real ``twistd mirror``.

A plain private registry (``hosted: ["*"]``, no upstreams) starts empty; skopeo pushes
``library/hello-world:latest`` as Docker schema2; then, with plain HTTP (urllib, no
proxies), the steps a user follows in the Distribution docs: catalog, tags, manifest,
blob, delete by digest, and what is left afterwards (no garbage collection runs).
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request

import pytest

from tests.integration import images
from tests.integration.clients import skip_reason as client_skip_reason
from tests.integration.mirror_proc import MirrorProcess

pytestmark = pytest.mark.integration

REPO, TAG = "library/hello-world", "latest"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, *, method: str = "GET", headers: dict[str, str] | None = None):
    """(status, headers, body) of one request without proxies; HTTP errors are answers."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def get_json(url: str) -> object:
    status, headers, body = http(url)
    assert status == 200, (url, status, body[:300])
    assert headers["Content-Type"].startswith("application/json"), headers["Content-Type"]
    return json.loads(body)


def test_run_your_own_registry_walkthrough(workdir):
    """Empty catalog → skopeo push (schema2) → catalog and tags → manifest with its headers →
    layer blob verified → DELETE the manifest by digest (202) → tags null, the manifest gone,
    the blob still downloadable."""
    reason = client_skip_reason("skopeo")
    if reason:
        pytest.skip(reason)
    (workdir / "registry").mkdir()
    with MirrorProcess(workdir / "registry", [], hosted=["*"]) as m:
        base = f"{m.url}/v2"

        # 1. a fresh registry is empty
        status, headers, body = http(f"{base}/")
        assert status == 200 and headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        assert get_json(f"{base}/_catalog") == {"repositories": []}

        # 2. push library/hello-world:latest as Docker schema2
        layout = images.build_standard_layout(workdir / "layout", big_layer_sizes=None)
        pushed = images.push(layout.path, "latest", m.host_port, REPO, TAG, fmt="v2s2")

        # 3. the catalog lists it, tags/list has the tag
        assert get_json(f"{base}/_catalog") == {"repositories": [REPO]}
        assert get_json(f"{base}/{REPO}/tags/list") == {"name": REPO, "tags": [TAG]}

        # 4. the manifest, asked for as Docker schema2
        status, headers, manifest_bytes = http(f"{base}/{REPO}/manifests/{TAG}",
                                               headers={"Accept": images.MT_DOCKER_MANIFEST})
        assert status == 200
        digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        assert digest == pushed
        assert headers["Docker-Content-Digest"] == digest
        assert headers["ETag"] == f'"{digest}"'
        assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        assert headers["Content-Type"] == images.MT_DOCKER_MANIFEST
        assert int(headers["Content-Length"]) == len(manifest_bytes)
        manifest = json.loads(manifest_bytes)
        assert manifest["mediaType"] == images.MT_DOCKER_MANIFEST and len(manifest["layers"]) == 1

        # 5. the layer blob hashes to its digest
        layer = manifest["layers"][0]["digest"]
        status, headers, blob = http(f"{base}/{REPO}/blobs/{layer}")
        assert status == 200 and len(blob) == manifest["layers"][0]["size"]
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer
        assert headers["Docker-Content-Digest"] == layer

        # 6. delete the manifest by digest
        status, _, body = http(f"{base}/{REPO}/manifests/{digest}", method="DELETE")
        assert status == 202, (status, body)

        # 7. the tag is gone: tags null (Distribution 2.8's answer), the repo stays in the catalog,
        #    the manifest is unknown by tag and by digest
        assert get_json(f"{base}/{REPO}/tags/list") == {"name": REPO, "tags": None}
        assert get_json(f"{base}/_catalog") == {"repositories": [REPO]}
        for ref in (TAG, digest):
            status, _, body = http(f"{base}/{REPO}/manifests/{ref}", headers={"Accept": images.MT_DOCKER_MANIFEST})
            assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN", (ref, status, body)

        # 8. no garbage collection ran: the layer is still downloadable, intact
        status, _, blob_again = http(f"{base}/{REPO}/blobs/{layer}")
        assert status == 200 and blob_again == blob

    assert "Traceback" not in m.log_text() and "Unhandled" not in m.log_text(), m.log_tail()
