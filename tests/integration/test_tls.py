"""TLS: the real ``twistd mirror`` on an HTTPS and a plain-HTTP endpoint at once.

A test CA and a server certificate for IP 127.0.0.1 (signed by the CA) are made with
``cryptography``; the registry is a private one (``hosted: ["*"]``) listening on
``ssl:PORT`` and ``tcp:PORT2`` from one config. Clients verify the certificate:

* skopeo pushes over plain HTTP and over HTTPS, and pulls over HTTPS with verification on
  (``--src-cert-dir`` holding ``ca.crt``): digests agree with what was pushed;
* skopeo with verification on but without the CA fails with a certificate error, and so
  does a name the certificate does not cover (``localhost``): verification is real;
* token auth over HTTPS: the realm names ``https://`` on the TLS port, skopeo logs in
  through it with verification on;
* dockerd pulls and pushes over HTTPS with the CA in ``certs.d`` (see the note in
  :func:`test_docker_push_and_pull_over_https`);
* bad input: plain HTTP to the TLS port and a TLS handshake to the plain port both fail
  within seconds (no hang), an idle half-open connection blocks nobody, and the service
  is healthy afterwards on both endpoints.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import secrets
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.integration import images
from tests.integration.clients import (
    ClientError,
    docker_push,
    docker_repo_digest,
    private_docker,
    skopeo_copy,
    trust_ca_in_docker,
)
from tests.integration.clients import (
    skip_reason as client_skip_reason,
)
from tests.integration.mirror_proc import MirrorProcess, tcp_endpoint, tls_endpoint
from tests.integration.upstream_registry import free_port, http_request

pytestmark = pytest.mark.integration

PROMPT = 5.0  # seconds: "fails promptly", far below any client's handshake/read timeout


def _need(client: str) -> None:
    reason = client_skip_reason(client)
    if reason:
        pytest.skip(reason)


# --------------------------------------------------------------------------
# a CA and a server certificate for 127.0.0.1
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class TlsFiles:
    ca_pem: bytes
    ca_cert: Path  # the CA certificate (PEM)
    cert_dir: Path  # a containers-style cert dir: only ca.crt
    key: Path  # the server's private key
    cert: Path  # the server's certificate (PEM), signed by the CA, SAN IP:127.0.0.1


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mirror tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca_and_server_cert(directory: Path) -> TlsFiles:
    """A P-256 CA and a server certificate for IP 127.0.0.1 signed by it (1 day)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("mirror test CA")).issuer_name(_name("mirror test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    # CN deliberately not an address: clients must match the SAN
    cert = (x509.CertificateBuilder().subject_name(_name("mirror test server")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (directory / "ca.pem").write_bytes(ca_pem)
    cert_dir = directory / "certs"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(ca_pem)
    key_path = directory / "server.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path = directory / "server.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TlsFiles(ca_pem, directory / "ca.pem", cert_dir, key_path, cert_path)


@dataclass
class TlsRegistry:
    mirror: MirrorProcess
    tls: TlsFiles
    tls_port: int

    @property
    def tls_host_port(self) -> str:
        return f"127.0.0.1:{self.tls_port}"

    @property
    def https_url(self) -> str:
        return f"https://{self.tls_host_port}"

    @property
    def http_host_port(self) -> str:
        return self.mirror.host_port

    def verified_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tls.ca_cert))


def _start_tls_registry(workdir: Path, **extra: object) -> TlsRegistry:
    tls = make_ca_and_server_cert(workdir / "tls")
    tls_port = free_port()
    http_port = free_port()
    while http_port == tls_port:
        http_port = free_port()
    d = workdir / "registry"
    d.mkdir()
    m = MirrorProcess(d, [], listen=[tls_endpoint(tls_port, tls.key, tls.cert), tcp_endpoint(http_port)],
                      hosted=["*"], **extra)
    assert m.ports == [tls_port, http_port] and m.port == http_port
    m.start()
    return TlsRegistry(m, tls, tls_port)


def _stop_and_check(r: TlsRegistry) -> None:
    r.mirror.stop()
    problems = [line for line in r.mirror.log_text().splitlines() if "Traceback" in line or "Unhandled" in line]
    assert not problems, f"{r.mirror.log}:\n" + "\n".join(problems[:10])


@pytest.fixture
def tls_registry(workdir: Path) -> Iterator[TlsRegistry]:
    """A private registry listening on HTTPS (``ssl:``) and plain HTTP (``tcp:``) at once."""
    r = _start_tls_registry(workdir)
    try:
        yield r
    finally:
        _stop_and_check(r)


@pytest.fixture
def layout(workdir: Path) -> images.OciLayout:
    """``latest`` (tiny) and ``big`` (two 1 MiB random layers: several TLS records per blob)."""
    return images.build_standard_layout(workdir / "src-layout", big_layer_sizes=(1 << 20, 1 << 20))


def _assert_healthy(r: TlsRegistry) -> None:
    """Both endpoints answer ``/v2/`` (HTTPS with the CA verified) and the process lives."""
    assert r.mirror.proc is not None and r.mirror.proc.alive()
    status, headers, body = http_request(f"{r.https_url}/v2/", ssl_context=r.verified_context(), timeout=10)
    assert (status, body) == (200, b"{}") and headers["docker-distribution-api-version"] == "registry/2.0"
    status, _, body = http_request(f"{r.mirror.url}/v2/", timeout=10)
    assert (status, body) == (200, b"{}")


# --------------------------------------------------------------------------
# the endpoints themselves
# --------------------------------------------------------------------------

def test_both_endpoints_serve_and_the_certificate_verifies(tls_registry):
    """One config, two endpoints: HTTPS presents the CA-signed certificate for 127.0.0.1 (Python's
    default verification: chain and IP SAN) and HTTP answers too; without the CA Python refuses."""
    r = tls_registry
    _assert_healthy(r)
    with socket.create_connection(("127.0.0.1", r.tls_port), timeout=10) as raw:
        with r.verified_context().wrap_socket(raw, server_hostname="127.0.0.1") as s:
            der = s.getpeercert(binary_form=True)
    assert der == x509.load_pem_x509_certificate(r.tls.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    with pytest.raises(urllib.error.URLError) as refused:
        http_request(f"{r.https_url}/v2/", ssl_context=ssl.create_default_context(), timeout=10)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError), refused.value
    # the API over HTTPS
    status, _, body = http_request(f"{r.https_url}/v2/_catalog", ssl_context=r.verified_context(), timeout=10)
    assert status == 200 and json.loads(body) == {"repositories": []}


# --------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------

@pytest.mark.clients
def test_skopeo_push_http_and_https_pull_https_verified(tls_registry, layout, workdir):
    """Push over plain HTTP, pull over HTTPS with verification on (``--src-cert-dir`` with the CA):
    same digests, every blob intact; push over verified HTTPS, pull back over both endpoints."""
    _need("skopeo")
    r = tls_registry
    # HTTP in, HTTPS out
    for ref in ("latest", "big"):
        want = images.layout_ref_digest(layout.path, ref)
        assert images.push_layout(layout.path, ref, r.http_host_port, f"tls/{ref}", "1") == want
        got = skopeo_copy(f"{r.tls_host_port}/tls/{ref}:1", workdir / f"https-{ref}", tls_verify=True,
                          cert_dir=r.tls.cert_dir)
        assert got == want
    # HTTPS in (verified), both out
    pushed = images.push(layout.path, "big", r.tls_host_port, "tls/pushed-https", "1", fmt="v2s2",
                         tls_verify=True, cert_dir=r.tls.cert_dir)
    status, headers, body = http_request(f"{r.https_url}/v2/tls/pushed-https/manifests/1", ssl_context=r.verified_context(),
                                         headers={"Accept": images.MT_DOCKER_MANIFEST}, timeout=10)
    assert status == 200 and headers["docker-content-digest"] == pushed == images.sha256_digest(body)
    assert skopeo_copy(f"{r.tls_host_port}/tls/pushed-https:1", tls_verify=True, cert_dir=r.tls.cert_dir) == pushed
    assert skopeo_copy(f"{r.http_host_port}/tls/pushed-https:1") == pushed
    # a layer by HTTPS, byte for byte against the manifest's digest and size
    layer = json.loads(body)["layers"][0]
    status, _, blob = http_request(f"{r.https_url}/v2/tls/pushed-https/blobs/{layer['digest']}",
                                   ssl_context=r.verified_context(), timeout=30)
    assert status == 200 and len(blob) == layer["size"] and images.sha256_digest(blob) == layer["digest"]


@pytest.mark.clients
def test_skopeo_verification_is_real(tls_registry, layout, workdir):
    """With verification on, skopeo refuses the server without the CA (unknown authority) and
    refuses a name the certificate does not cover (``localhost``); it never falls back to HTTP."""
    _need("skopeo")
    r = tls_registry
    want = images.push_layout(layout.path, "latest", r.http_host_port, "tls/verify", "1")
    empty = workdir / "no-ca"
    empty.mkdir()
    started = time.monotonic()
    with pytest.raises(ClientError) as no_ca:
        skopeo_copy(f"{r.tls_host_port}/tls/verify:1", tls_verify=True, cert_dir=empty, timeout=60)
    assert time.monotonic() - started < 30
    text = str(no_ca.value)
    assert "x509" in text and ("unknown authority" in text or "not trusted" in text), text

    with pytest.raises(ClientError) as wrong_name:
        skopeo_copy(f"localhost:{r.tls_port}/tls/verify:1", tls_verify=True, cert_dir=r.tls.cert_dir, timeout=60)
    assert "x509" in str(wrong_name.value) and "localhost" in str(wrong_name.value), str(wrong_name.value)
    # the same with the CA and the certified address works
    assert skopeo_copy(f"{r.tls_host_port}/tls/verify:1", tls_verify=True, cert_dir=r.tls.cert_dir) == want


@pytest.mark.clients
def test_token_auth_over_https(workdir, layout):
    """Token auth behind both endpoints: the Bearer realm follows the scheme and address the
    client used (``https://`` on the TLS port, ``http://`` on the plain one), and skopeo with
    credentials and verification on pushes and pulls over HTTPS through that realm."""
    _need("skopeo")
    password = "tls-" + secrets.token_hex(8)
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
    r = _start_tls_registry(workdir, auth={"htpasswd": str(htpasswd), "token": True})
    try:
        status, headers, _ = http_request(f"{r.https_url}/v2/", ssl_context=r.verified_context(), timeout=10)
        assert status == 401
        assert headers["www-authenticate"].startswith(f'Bearer realm="https://{r.tls_host_port}/auth/token"')
        status, headers, _ = http_request(f"{r.mirror.url}/v2/", timeout=10)
        assert status == 401
        assert headers["www-authenticate"].startswith(f'Bearer realm="http://{r.http_host_port}/auth/token"')

        pushed = images.push(layout.path, "latest", r.tls_host_port, "secure/app", "1", creds=("alice", password),
                             tls_verify=True, cert_dir=r.tls.cert_dir)
        assert skopeo_copy(f"{r.tls_host_port}/secure/app:1", tls_verify=True, cert_dir=r.tls.cert_dir,
                           creds=("alice", password)) == pushed
        with pytest.raises(ClientError) as anonymous:
            skopeo_copy(f"{r.tls_host_port}/secure/app:1", tls_verify=True, cert_dir=r.tls.cert_dir)
        assert "unauthorized" in str(anonymous.value).lower(), str(anonymous.value)
        log = r.mirror.log_text()
        assert '"GET /auth/token?' in log and password not in log
    finally:
        _stop_and_check(r)


# --------------------------------------------------------------------------
# docker
# --------------------------------------------------------------------------

@pytest.mark.clients
def test_docker_push_and_pull_over_https(tls_registry, layout, workdir):
    """dockerd with the CA in ``certs.d/127.0.0.1:TLSPORT/ca.crt`` (a private overlay on
    /etc/docker: nothing is written to the host) pulls, pushes and pulls back over the
    HTTPS-only port: RepoDigests match what the registry serves.

    dockerd always counts 127.0.0.0/8 as an insecure registry, which means "HTTPS without
    verification, then HTTP" (and it then does not even read certs.d). The port speaks only
    TLS, so success proves dockerd spoke TLS, not that it verified the chain; skopeo's tests
    above prove the chain and name verify."""
    _need("docker")
    _need("skopeo")
    r = tls_registry
    seeded = images.push(layout.path, "latest", r.http_host_port, "tls/docker-seed", "1", fmt="v2s2")
    seed_ref = f"{r.tls_host_port}/tls/docker-seed:1"
    target = f"{r.tls_host_port}/tls/docker-pushed:1"
    before = len(r.mirror.log_text())
    daemon = private_docker(workdir, r.tls_host_port)
    trust_ca_in_docker(daemon, r.tls_host_port, r.tls.ca_pem)
    with daemon:
        daemon.docker("pull", "-q", seed_ref, timeout=120)
        assert docker_repo_digest(daemon, seed_ref) == seeded
        daemon.docker("tag", seed_ref, target)
        pushed = docker_push(daemon, target)
        status, headers, _ = http_request(f"{r.https_url}/v2/tls/docker-pushed/manifests/1",
                                          ssl_context=r.verified_context(), method="HEAD",
                                          headers={"Accept": images.MT_DOCKER_MANIFEST}, timeout=10)
        assert status == 200 and headers["docker-content-digest"] == pushed
        daemon.docker("image", "rm", seed_ref, target)
        daemon.docker("pull", "-q", target, timeout=120)
        assert docker_repo_digest(daemon, target) == pushed
    # the log saw the pulls and the push (it does not say which port; only TLS works on that one)
    log = r.mirror.log_text()[before:]
    assert '"HEAD /v2/tls/docker-seed/manifests/1 HTTP/1.1" 200' in log
    assert f'"GET /v2/tls/docker-seed/manifests/{seeded} HTTP/1.1" 200' in log
    assert '"PUT /v2/tls/docker-pushed/manifests/1 HTTP/1.1" 201' in log
    assert f'"GET /v2/tls/docker-pushed/manifests/{pushed} HTTP/1.1" 200' in log
    _assert_healthy(r)


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------

def test_plain_http_to_the_tls_port_fails_promptly(tls_registry):
    """urllib speaking plain HTTP to the TLS port gets an error within seconds (the TLS layer
    rejects the non-handshake bytes and closes), raw bytes get the connection closed, a TLS
    handshake to the plain port is refused at once, an idle connection to the TLS port blocks no
    one; afterwards both endpoints are healthy."""
    r = tls_registry
    # 1. urllib, plain HTTP, TLS port
    started = time.monotonic()
    outcome: object
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://{r.tls_host_port}/v2/", timeout=20) as resp:
            outcome = resp.status
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        outcome = e
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT, f"plain HTTP to the TLS port took {elapsed:.1f}s ({outcome!r})"
    assert not isinstance(outcome, int), f"plain HTTP to the TLS port answered {outcome}"
    assert not isinstance(outcome, TimeoutError | socket.timeout), outcome

    # 2. raw request bytes: the server closes (maybe after a TLS alert), no HTTP answer
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", r.tls_port), timeout=20) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        try:
            while chunk := s.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    assert time.monotonic() - started < PROMPT
    assert not received.startswith(b"HTTP/"), received[:100]

    # 3. a TLS handshake to the plain port: refused at once (RegistryChannel), not a hang
    started = time.monotonic()
    ctx = ssl.create_default_context(cafile=str(r.tls.ca_cert))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection(("127.0.0.1", r.mirror.port), timeout=20) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                pass
    assert time.monotonic() - started < PROMPT

    # 4. an idle connection to the TLS port (no ClientHello) and a half-sent one don't block others
    with socket.create_connection(("127.0.0.1", r.tls_port), timeout=20) as idle, \
            socket.create_connection(("127.0.0.1", r.tls_port), timeout=20) as partial:
        partial.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello record, then nothing
        started = time.monotonic()
        _assert_healthy(r)
        assert time.monotonic() - started < PROMPT
        del idle

    # 5. still healthy, and a TLS error is not a crash in the log
    _assert_healthy(r)
