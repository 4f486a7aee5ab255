"""Upstream TLS settings against a real HTTPS upstream.

A CNCF Distribution registry serves HTTPS with a fresh self-signed certificate for
127.0.0.1; a small image is pushed to it with skopeo.  One real ``twistd mirror`` stands
in front of it under several registry names, each upstream with its own TLS settings:

* ``withca.test``: ``ca_file`` is the registry's certificate: pulls work, digests verified;
* ``bundle.test``: a bundle holding an unrelated CA and the registry's certificate: works;
* ``noca.test``: no settings (the platform's trust store): refused with a certificate
  error, at once, which proves verification is real;
* ``wrongca.test``: ``ca_file`` is another CA's certificate: refused;
* ``noverify.test``: ``tls_verify: false``: works, and the start log warns, naming it.

The upstreams all reach the same host and port: a connection opened by one (without
verification) must not be reused by another.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from tests.integration import images
from tests.integration.clients import skip_reason as client_skip_reason
from tests.integration.mirror_proc import MirrorProcess
from tests.integration.proc_util import WorkDir
from tests.integration.upstream_registry import (
    DistributionRegistry,
    http_request,
    make_self_signed_cert,
    skip_reason,
    write_key_and_cert,
)

pytestmark = pytest.mark.integration

ACCEPT = ", ".join([images.MT_DOCKER_MANIFEST, images.MT_OCI_MANIFEST, images.MT_OCI_INDEX, images.MT_DOCKER_LIST])
PROMPT = 5.0  # seconds: a certificate error is reported at once, well within the upstream timeout


@pytest.fixture(scope="module")
def setup():
    """(mirror, seeded image): the HTTPS upstream holding library/hello:latest, and the
    mirror in front of it under the names above.  Both are stopped by PID at the end."""
    for reason in (skip_reason(), client_skip_reason("skopeo")):
        if reason:
            pytest.skip(reason)
    with WorkDir("mirror-upstream-tls.") as w:
        registry = DistributionRegistry(w / "registry", tls=True)
        registry.start()
        mirror = None
        try:
            image = images.seed_images(registry, big_layer_sizes=None, only=["latest"])["latest"]
            other_key, other_cert = make_self_signed_cert("another CA")
            write_key_and_cert(other_key, other_cert, w / "other.key", w / "other.crt")
            (w / "bundle.crt").write_bytes((w / "other.crt").read_bytes() + registry.ca_cert_path.read_bytes())
            upstreams = [
                {"registry": "withca.test", "url": registry.url, "ca_file": str(registry.ca_cert_path)},
                {"registry": "bundle.test", "url": registry.url, "ca_file": str(w / "bundle.crt")},
                {"registry": "noca.test", "url": registry.url},
                {"registry": "wrongca.test", "url": registry.url, "ca_file": str(w / "other.crt")},
                {"registry": "noverify.test", "url": registry.url, "tls_verify": False},
            ]
            (w / "mirror").mkdir()
            mirror = MirrorProcess(w / "mirror", upstreams).start()
            yield mirror, image
        finally:
            if mirror is not None:
                mirror.stop()
            registry.close()


def get(mirror: MirrorProcess, path: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    return http_request(f"{mirror.url}{path}", headers={"Accept": accept} if accept else {}, timeout=30)


def assert_pulls(mirror: MirrorProcess, image: images.SeededImage, registry: str) -> None:
    """The manifest and every blob of the image come through the mirror, matching their digests."""
    status, headers, body = get(mirror, f"/v2/{registry}/{image.repo}/manifests/{image.tag}", ACCEPT)
    assert status == 200, body
    assert headers["docker-content-digest"] == image.digest == images.sha256_digest(body)
    for digest in image.blobs:
        status, _, blob = get(mirror, f"/v2/{registry}/{image.repo}/blobs/{digest}")
        assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == digest


def assert_certificate_refused(mirror: MirrorProcess, image: images.SeededImage, registry: str) -> None:
    """A pull fails promptly with 503 UNAVAILABLE whose message names the certificate problem."""
    started = time.monotonic()
    status, _, body = get(mirror, f"/v2/{registry}/{image.repo}/manifests/{image.tag}", ACCEPT)
    assert time.monotonic() - started < PROMPT
    error = json.loads(body)["errors"][0]
    assert (status, error["code"]) == (503, "UNAVAILABLE"), body
    assert error["message"].startswith(f"upstream {registry} unreachable while GET https://"), error["message"]
    assert error["message"].endswith(": TLS handshake failed: certificate verify failed"), error["message"]


def test_ca_file_trusts_the_upstream(setup):
    """ca_file holding the upstream's certificate: the pull works, every digest verified."""
    mirror, image = setup
    assert_pulls(mirror, image, "withca.test")


def test_ca_file_with_several_certificates(setup):
    """A bundle of several certificates trusts each: the upstream's is second in it."""
    mirror, image = setup
    assert_pulls(mirror, image, "bundle.test")


def test_without_ca_file_the_self_signed_upstream_is_refused(setup):
    """No ca_file: the platform's trust store does not know the certificate, so the pull
    fails with a certificate error (no hang): verification is real."""
    mirror, image = setup
    assert_certificate_refused(mirror, image, "noca.test")


def test_another_ca_is_refused(setup):
    """ca_file holding an unrelated CA: the upstream's certificate is refused."""
    mirror, image = setup
    assert_certificate_refused(mirror, image, "wrongca.test")


def test_tls_verify_false_pulls_and_warns_at_start(setup):
    """tls_verify: false: the pull works, and the start log carries a warning naming the upstream."""
    mirror, image = setup
    assert_pulls(mirror, image, "noverify.test")
    warnings = [line for line in mirror.log_text().splitlines() if "tls_verify: false" in line]
    assert len(warnings) == 1 and "#warn]" in warnings[0], warnings
    assert "noverify.test" in warnings[0] and "NOT verified" in warnings[0]


def test_settings_do_not_leak_between_upstreams_of_one_host(setup):
    """Right after an unverified pull from the same host and port, the upstreams that verify
    still refuse: pooled connections are never shared across TLS settings."""
    mirror, image = setup
    assert_pulls(mirror, image, "noverify.test")
    assert_certificate_refused(mirror, image, "noca.test")
    assert_certificate_refused(mirror, image, "wrongca.test")
    assert_pulls(mirror, image, "withca.test")
