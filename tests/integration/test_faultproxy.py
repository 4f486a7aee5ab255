"""The fault proxy (tests/integration/faultproxy.py) against the real Distribution registry.

Each fault kind, forced on a multi-MiB blob GET, must show the client the symptom it names
(seen on a raw socket: :func:`~tests.integration.faultproxy.fetch`), and everything else
must pass through untouched: bytes, headers, ``Range``, keep-alive, request bodies.  If these
pass, a failure in the soak test (test_fault_soak.py) is the mirror's.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json

import pytest

from tests.integration import images
from tests.integration.faultproxy import BODY_KINDS, KINDS, Exchange, fetch
from tests.integration.proc_util import HarnessError
from tests.integration.upstream_registry import DistributionRegistry

pytestmark = pytest.mark.integration

ACCEPT_ALL = ", ".join([images.MT_OCI_MANIFEST, images.MT_OCI_INDEX, images.MT_DOCKER_MANIFEST, images.MT_DOCKER_LIST])
STALL = 1.0
SLOW_RATE = 4 * 1024 * 1024


@pytest.fixture
def upstream(seeded_upstream):
    """(registry, the big image, its first layer's digest and bytes)."""
    registry, seeded = seeded_upstream
    big = seeded["big"]
    layer = big.layers[0]
    body = registry.client().get_blob(big.repo, layer).body
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer and len(body) > 4 * images.MIB
    return registry, big, layer, body


@pytest.fixture
def proxy(upstream, fault_proxy):
    """A proxy in front of the seeded upstream, no random faults."""
    registry = upstream[0]
    return fault_proxy(registry.url, stall=STALL, slow_rate=SLOW_RATE)


def record_for(proxy, path_part, *, index=-1):
    """The proxy's record of the (last) request whose path holds ``path_part``."""
    found = [r for r in proxy.log() if path_part in r["path"]]
    assert found, f"no request for {path_part} in the proxy log"
    return found[index]


def test_passthrough_bytes_headers_range_head_and_errors(upstream, proxy):
    """Unfaulted, the proxy is invisible: the same manifest bytes and headers as the registry
    sends, the whole blob, ``Range`` answered 206 with the right bytes, ``HEAD`` and 404."""
    registry, big, layer, whole = upstream
    direct = registry.client().get_manifest(big.repo, big.tag)
    got = fetch(f"{proxy.url}/v2/{big.repo}/manifests/{big.tag}", headers={"Accept": ACCEPT_ALL})
    assert got.status == 200 and got.complete and got.body == direct.body
    for name in ("content-type", "docker-content-digest", "etag", "docker-distribution-api-version"):
        assert got.headers[name] == direct.headers[name]

    blob_url = f"{proxy.url}/v2/{big.repo}/blobs/{layer}"
    got = fetch(blob_url)
    assert got.status == 200 and got.verifies(layer) and int(got.headers["content-length"]) == len(whole)

    got = fetch(blob_url, headers={"Range": "bytes=1000-200999"})
    assert got.status == 206 and got.complete and got.body == whole[1000:201000]
    assert got.headers["content-range"] == f"bytes 1000-200999/{len(whole)}"
    resumed = fetch(blob_url, headers={"Range": f"bytes={len(whole) - 12345}-"})
    assert resumed.status == 206 and resumed.body == whole[-12345:]
    rec = record_for(proxy, layer)
    assert rec["range"] == f"bytes={len(whole) - 12345}-" and rec["status"] == 206 and rec["bytes"] == 12345

    head = fetch(blob_url, method="HEAD")
    assert head.status == 200 and head.complete and head.body == b""
    assert int(head.headers["content-length"]) == len(whole) and head.headers["docker-content-digest"] == layer

    missing = fetch(f"{proxy.url}/v2/{big.repo}/blobs/sha256:{'0' * 64}")
    assert missing.status == 404 and json.loads(missing.body)["errors"][0]["code"] == "BLOB_UNKNOWN"

    log = proxy.log()
    assert [(r["method"], r["status"], r["fault"]) for r in log] == [
        ("GET", 200, None), ("GET", 200, None), ("GET", 206, None), ("GET", 206, None), ("HEAD", 200, None),
        ("GET", 404, None),
    ]
    assert log[1]["bytes"] == log[1]["length"] == len(whole) and log[2]["range"] == "bytes=1000-200999"
    assert all(r["done"] and r["error"] is None for r in log)
    assert len(proxy.log_path.read_text().splitlines()) == len(log)  # the JSON-lines copy


def test_keep_alive_request_bodies_and_location(upstream, proxy):
    """One client connection carries several requests, a made-up 503 included; a blob upload
    (request bodies, ``Location`` built from the proxied ``Host``) works through it."""
    _, big, layer, whole = upstream
    proxy.force("status_503", "/blobs/")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.request("GET", f"/v2/{big.repo}/blobs/{layer}")
        r = conn.getresponse()
        assert r.status == 503 and json.loads(r.read())["errors"][0]["code"] == "UNAVAILABLE"
        sock = conn.sock
        conn.request("GET", f"/v2/{big.repo}/blobs/{layer}")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == whole
        conn.request("POST", "/v2/proxytest/upload/blobs/uploads/", body=b"")
        r = conn.getresponse()
        r.read()
        assert r.status == 202
        location = r.getheader("Location")
        assert location.startswith(proxy.url)  # the upstream saw the proxy's Host
        data = b"uploaded through the fault proxy\n" * 1000
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        sep = "&" if "?" in location else "?"
        conn.request("PUT", f"{location[len(proxy.url):]}{sep}digest={digest}", body=data,
                     headers={"Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        r.read()
        assert r.status == 201
        assert conn.sock is sock  # all on one connection
    finally:
        conn.close()
    assert fetch(f"{proxy.url}/v2/proxytest/upload/blobs/{digest}").body == data


def test_authorization_and_challenges_pass_through(fault_proxy, workdir):
    """``WWW-Authenticate`` reaches the client and ``Authorization`` reaches the registry."""
    with DistributionRegistry(workdir / "auth-registry", auth="htpasswd") as registry:
        proxy = fault_proxy(registry.url)
        anonymous = fetch(f"{proxy.url}/v2/")
        assert anonymous.status == 401 and anonymous.headers["www-authenticate"].startswith("Basic ")
        user, password = registry.creds
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        assert fetch(f"{proxy.url}/v2/", headers={"Authorization": f"Basic {basic}"}).status == 200


def expect_symptom(kind, got: Exchange, whole: bytes, rec: dict):
    """Assert that ``got`` is what ``kind`` promises (see the faultproxy module docstring)."""
    n = len(whole)
    if kind == "reset_before":
        assert (got.status, got.end, got.body) == (None, "reset", b"")
    elif kind == "close_before":
        assert (got.status, got.end, got.body) == (None, "eof", b"")
    elif kind == "stall_before":
        assert (got.status, got.end, got.body) == (None, "eof", b"")
        assert got.elapsed >= STALL * 0.9
    elif kind.startswith("status_"):
        code = int(kind[7:])
        assert got.status == code and got.complete
        assert json.loads(got.body)["errors"][0]["code"] in ("UNKNOWN", "UNAVAILABLE", "TOOMANYREQUESTS")
        assert got.headers.get("retry-after") == ("1" if code == 429 else None)
        assert rec["status"] == code
    elif kind == "truncate":
        assert got.status == 200 and int(got.headers["content-length"]) == n
        assert got.end == "eof" and 0 < len(got.body) < n and got.body == whole[: len(got.body)]
        assert len(got.body) == rec["at"] == rec["bytes"]
    elif kind == "reset_mid":
        assert got.status == 200 and int(got.headers["content-length"]) == n
        assert got.end == "reset" and len(got.body) < n and got.body == whole[: len(got.body)]
        assert rec["bytes"] == rec["at"] and len(got.body) == rec["at"]  # what was sent arrived before the RST
    elif kind == "corrupt":
        assert got.status == 200 and got.complete and len(got.body) == n and got.body != whole
        diffs = [i for i in range(0, n, 4096) if got.body[i:i + 4096] != whole[i:i + 4096]]
        assert len(diffs) == 1
        at = rec["at"]
        assert got.body[at] == whole[at] ^ 0xFF and got.body[:at] == whole[:at] and got.body[at + 1:] == whole[at + 1:]
    elif kind == "slow_body":
        assert got.status == 200 and got.body == whole
        assert 0.8 * n / SLOW_RATE <= got.elapsed < 3 * n / SLOW_RATE + 1
    elif kind == "stall_mid":
        assert got.status == 200 and got.body == whole
        assert got.max_gap >= STALL * 0.9 and 0 < rec["at"] < n
    else:
        raise AssertionError(f"no expectation for {kind}")


@pytest.mark.parametrize("kind", KINDS)
def test_forced_fault_shows_its_symptom(kind, upstream, proxy):
    """A forced fault hits the next blob GET only, and the client sees what the kind names;
    the request after it passes untouched."""
    _, big, layer, whole = upstream
    proxy.force(kind, f"/blobs/{layer}")
    manifest = fetch(f"{proxy.url}/v2/{big.repo}/manifests/{big.tag}", headers={"Accept": ACCEPT_ALL})
    assert manifest.verifies(big.digest)  # not matched: untouched, and the fault still queued
    got = fetch(f"{proxy.url}/v2/{big.repo}/blobs/{layer}")
    rec = record_for(proxy, layer)
    assert rec["fault"] == kind and rec["forced"] and rec["skipped"] is None
    expect_symptom(kind, got, whole, rec)
    assert fetch(f"{proxy.url}/v2/{big.repo}/blobs/{layer}").verifies(layer)
    assert proxy.faults() == {kind: 1}


def test_forced_parameters_count_and_method(upstream, proxy):
    """``at`` fixes the cut, ``count`` repeats a fault, ``method`` narrows it; a body fault
    cannot apply to a ``HEAD``, nor to a body that is not a 200/206 (it is ``skipped``)."""
    _, big, layer, whole = upstream
    url = f"{proxy.url}/v2/{big.repo}/blobs/{layer}"
    proxy.force("truncate", layer, at=1000)
    got = fetch(url)
    assert got.end == "eof" and got.body == whole[:1000]
    proxy.force("status_502", layer, count=2)
    assert [fetch(url).status for _ in range(3)] == [502, 502, 200]
    proxy.force("status_503", layer, method="HEAD")
    assert fetch(url).verifies(layer)
    assert fetch(url, method="HEAD").status == 503
    proxy.force("truncate", "/blobs/")
    assert fetch(url, method="HEAD").status == 200  # stays queued past the HEAD ...
    assert fetch(f"{proxy.url}/v2/{big.repo}/blobs/sha256:{'0' * 64}").status == 404  # ... a 404 consumes it
    assert record_for(proxy, "0" * 64)["skipped"] == "truncate"
    proxy.force("reset_mid", layer, at=3 * images.MIB)
    got = fetch(url, headers={"Range": f"bytes={images.MIB}-"})
    assert got.status == 206 and got.end == "reset" and got.body == whole[images.MIB:4 * images.MIB]


def test_random_faults_follow_rate_filter_and_seed(upstream, fault_proxy):
    """Random faults hit only matching targets (never the ``/v2/`` ping), at the configured
    rate, one per request, the same sequence for the same seed; body kinds skip ``HEAD``."""
    registry, big, layer, _ = upstream
    always = fault_proxy(registry.url, rate=1.0, kinds=["status_503"])
    assert fetch(f"{always.url}/v2/").status == 200
    assert fetch(f"{always.url}/v2/{big.repo}/tags/list").status == 200
    assert fetch(f"{always.url}/v2/{big.repo}/manifests/{big.tag}").status == 503
    assert fetch(f"{always.url}/v2/{big.repo}/blobs/{big.blobs[0]}").status == 503

    def run(seed):
        proxy = fault_proxy(registry.url, rate=0.3, seed=seed, kinds=["status_502", "status_503", "status_429"])
        statuses = [fetch(f"{proxy.url}/v2/{big.repo}/manifests/{big.digest}").status for _ in range(40)]
        assert [r["status"] for r in proxy.log()] == statuses
        return statuses

    first, again, other = run(7), run(7), run(8)
    assert first == again != other
    faulted = [s for s in first if s != 200]
    assert 4 <= len(faulted) <= 20 and set(faulted) <= {502, 503, 429}

    body_only = fault_proxy(registry.url, rate=1.0, kinds=list(BODY_KINDS))
    assert fetch(f"{body_only.url}/v2/{big.repo}/blobs/{layer}", method="HEAD").status == 200
    assert body_only.log()[-1]["fault"] is None and body_only.log()[-1]["skipped"] is None


def test_control_api(upstream, proxy):
    """Settings change while running; a bad kind or setting is refused; clear forgets."""
    _, big, _, _ = upstream
    assert proxy.config()["rate"] == 0.0
    proxy.configure(rate=1.0, kinds=["status_429"])
    assert fetch(f"{proxy.url}/v2/{big.repo}/manifests/{big.tag}").status == 429
    with pytest.raises(HarnessError):
        proxy.configure(kinds=["no_such_fault"])
    with pytest.raises(HarnessError):
        proxy.force("no_such_fault")
    proxy.configure(rate=0.0)
    proxy.force("status_500")
    proxy.clear()
    assert proxy.log() == []
    assert fetch(f"{proxy.url}/v2/{big.repo}/manifests/{big.tag}").status == 200
