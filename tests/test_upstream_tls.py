"""Unit tests of upstream TLS settings (mirror.upstream.tls and the config keys).

Handshakes are real TLS in memory (``iosim``): a server with a self-signed certificate,
and a client made by :class:`UpstreamTLSPolicy`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.web.client import HTTPConnectionPool, ResponseNeverReceived
from zope.interface import implementer

from mirror.config import ConfigError, UpstreamConfig, parse_config
from mirror.upstream.tls import UpstreamTLSPolicy, describe_tls_failure, read_ca_bundle, upstream_agent


@attrs.frozen
class Identity:
    """A self-signed CA:TRUE certificate for some names, and its key (PEM)."""

    cert: bytes
    key: bytes


def identity(*names: str) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    sans = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return Identity(cert.public_bytes(serialization.Encoding.PEM), pem_key)


REGISTRY = identity("reg.test", "127.0.0.1")
OTHER = identity("reg.test", "127.0.0.1")  # the same names, another (untrusted) key
ELSEWHERE = identity("elsewhere.test")


@implementer(IHandshakeListener)
class Client(Protocol):
    """Records how the TLS handshake ended."""

    completed = False
    reason = None

    def handshakeCompleted(self) -> None:
        self.completed = True

    def connectionLost(self, reason=None) -> None:
        self.reason = reason


def handshake(policy: UpstreamTLSPolicy, host: bytes, server: Identity) -> Client:
    """Connect a client made by ``policy`` for ``host`` to a server presenting ``server``."""
    client = Client()
    server_options = CertificateOptions(
        privateKey=serialization.load_pem_private_key(server.key, None), certificate=x509.load_pem_x509_certificate(server.cert)
    )
    client_factory = TLSMemoryBIOFactory(policy.creatorForNetloc(host, 443), True, Factory.forProtocol(lambda: client))
    server_factory = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(Protocol))
    _, _, pump = connectedServerAndClient(lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None))
    pump.flush()
    return client


def bundle(tmp_path: Path, *identities: Identity, extra: bytes = b"") -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(extra + b"".join(i.cert for i in identities))
    return path


# read_ca_bundle ------------------------------------------------------------------------


def test_bundle_with_several_certificates(tmp_path):
    """Every certificate of a bundle is read; other PEM blocks (a key) are ignored."""
    path = bundle(tmp_path, REGISTRY, OTHER, extra=b"a comment\n" + REGISTRY.key)
    assert len(read_ca_bundle(path)) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no PEM certificate"),
        (REGISTRY.key, "holds no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n", "certificate 1 of 1 is malformed"),
    ],
)
def test_bundle_without_a_certificate(tmp_path, content, message):
    """A bundle must hold certificates, and only well-formed ones."""
    path = tmp_path / "ca.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_ca_bundle(path)


# the policy --------------------------------------------------------------------------


def test_bundle_is_trusted_exactly(tmp_path):
    """With a bundle, a server whose certificate it holds is accepted; another key for the
    same name is refused, and so is the platform's trust (no public CA signed these)."""
    policy = UpstreamTLSPolicy(read_ca_bundle(bundle(tmp_path, REGISTRY)))
    assert handshake(policy, b"reg.test", REGISTRY).completed
    assert handshake(policy, b"127.0.0.1", REGISTRY).completed  # an IP address SAN
    refused = handshake(policy, b"reg.test", OTHER)
    assert not refused.completed and "certificate verify failed" in str(refused.reason.value)


def test_any_certificate_of_the_bundle_is_trusted(tmp_path):
    """A bundle of several CAs trusts each."""
    policy = UpstreamTLSPolicy(read_ca_bundle(bundle(tmp_path, ELSEWHERE, REGISTRY)))
    assert handshake(policy, b"reg.test", REGISTRY).completed
    assert handshake(policy, b"elsewhere.test", ELSEWHERE).completed


def test_host_name_is_still_checked(tmp_path):
    """A trusted certificate for another name is refused."""
    policy = UpstreamTLSPolicy(read_ca_bundle(bundle(tmp_path, ELSEWHERE)))
    refused = handshake(policy, b"reg.test", ELSEWHERE)
    assert not refused.completed and refused.reason is not None


def test_no_verification_accepts_anything():
    """verify=False: an unknown certificate for another name is accepted."""
    policy = UpstreamTLSPolicy(verify=False)
    assert handshake(policy, b"reg.test", ELSEWHERE).completed
    assert handshake(policy, b"127.0.0.1", OTHER).completed


def test_no_verification_still_sends_the_server_name():
    """SNI goes out for DNS names (virtual hosts pick their certificate by it), not for addresses."""
    policy = UpstreamTLSPolicy(verify=False)

    def server_name(host: bytes) -> bytes | None:
        creator = policy.creatorForNetloc(host, 443)
        protocol = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol)).buildProtocol(None)
        return creator.clientConnectionForTLS(protocol).get_servername()

    assert server_name(b"reg.test") == b"reg.test"
    assert server_name(b"127.0.0.1") is None


def test_tls_failures_are_described(tmp_path):
    """Handshake failures, as Twisted's HTTP client wraps them, become a few plain words;
    anything else is not described."""
    policy = UpstreamTLSPolicy(read_ca_bundle(bundle(tmp_path, REGISTRY)))
    untrusted = handshake(policy, b"reg.test", OTHER).reason
    wrong_name = handshake(UpstreamTLSPolicy(read_ca_bundle(bundle(tmp_path, ELSEWHERE))), b"reg.test", ELSEWHERE).reason
    assert describe_tls_failure(ResponseNeverReceived([untrusted])) == "TLS handshake failed: certificate verify failed"
    assert describe_tls_failure(ResponseNeverReceived([wrong_name])) == (
        "TLS handshake failed: the certificate is not for this host name"
    )
    assert describe_tls_failure(untrusted.value) == "TLS handshake failed: certificate verify failed"
    assert describe_tls_failure(ResponseNeverReceived([Failure(ConnectionRefusedError())])) is None
    assert describe_tls_failure(ValueError("x")) is None


def test_bundle_and_no_verification_exclude_each_other(tmp_path):
    """A bundle with verification off is a contradiction, refused."""
    with pytest.raises(ValueError):
        UpstreamTLSPolicy(read_ca_bundle(bundle(tmp_path, REGISTRY)), verify=False)


# the agent ---------------------------------------------------------------------------


class RecordingPool(HTTPConnectionPool):
    """Records the keys connections are asked for, and what the agent then sends over them."""

    def __init__(self) -> None:
        super().__init__(MemoryReactorClock(), persistent=True)
        self.keys: list[object] = []
        self.sent: list[object] = []

    def getConnection(self, key, endpoint):
        self.keys.append(key)
        return succeed(self)

    def request(self, request):  # the connection's side: the request the agent built
        self.sent.append(request)
        return Deferred()


def test_upstream_agent_only_for_own_settings_and_on_its_own_connections(tmp_path):
    """An upstream with default TLS shares the common agent (None); one with a bundle or
    without verification gets an agent whose pooled connections no other agent gets."""
    pool = RecordingPool()
    reactor = MemoryReactorClock()
    assert upstream_agent(UpstreamConfig("a.io", "https://reg.test"), reactor, pool) is None
    with_ca = UpstreamConfig("b.io", "https://reg.test", ca_file=bundle(tmp_path, REGISTRY))
    unverified = UpstreamConfig("c.io", "https://reg.test", tls_verify=False)
    for config in (with_ca, unverified, unverified):
        agent = upstream_agent(config, reactor, pool)
        assert agent is not None
        agent.request(b"GET", b"https://reg.test/v2/")
    assert [key[1] for key in pool.keys] == [(b"https", b"reg.test", 443)] * 3
    assert [request.persistent for request in pool.sent] == [True] * 3  # the pool's own setting
    assert len({key[0] for key in pool.keys}) == 3  # each agent its own partition, even for equal settings


# config ------------------------------------------------------------------------------


def upstream_yaml(**keys: object) -> str:
    fields = ", ".join(f"{k}: {v}" for k, v in {"registry": "a.io", "url": "'https://reg.test'", **keys}.items())
    return f"listen: x\nstorage: {{root: x}}\nupstreams: [{{registry: z.io, url: 'http://z'}}, {{{fields}}}]"


def test_config_keys(tmp_path):
    """ca_file and tls_verify parse; verification is on unless tls_verify: false is given."""
    path = bundle(tmp_path, REGISTRY)
    cfg = parse_config(upstream_yaml(ca_file=f"'{path}'"))
    assert (cfg.upstreams[1].ca_file, cfg.upstreams[1].tls_verify) == (path, True)
    assert (cfg.upstreams[0].ca_file, cfg.upstreams[0].tls_verify) == (None, True)
    assert parse_config(upstream_yaml(tls_verify="false")).upstreams[1].tls_verify is False


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"ca_file": "/nonexistent/ca.pem"}, "m.yaml: upstreams[1].ca_file: cannot read /nonexistent/ca.pem: No such file"),
        ({"ca_file": "EMPTY"}, "m.yaml: upstreams[1].ca_file: EMPTY holds no PEM certificate"),
        ({"ca_file": "CA", "url": "'http://reg.test'"}, "m.yaml: upstreams[1].ca_file: applies to an https:// url only"),
        ({"tls_verify": "false", "url": "'http://reg.test'"}, "m.yaml: upstreams[1].tls_verify: applies to an https:// url"),
        ({"ca_file": "CA", "tls_verify": "false"}, "m.yaml: upstreams[1].ca_file: give ca_file or tls_verify: false, not both"),
        ({"tls_verify": "'no'"}, "m.yaml: upstreams[1].tls_verify: expected true or false"),
    ],
)
def test_config_errors_name_the_key(tmp_path, keys, expected):
    """A bundle that cannot serve, or settings that contradict each other, stop loading with
    one line naming upstreams[N].ca_file (or tls_verify)."""
    (tmp_path / "empty.pem").write_text("no certificate here\n")
    files = {"EMPTY": str(tmp_path / "empty.pem"), "CA": str(bundle(tmp_path, REGISTRY))}
    keys = {k: files.get(v, v) if isinstance(v, str) else v for k, v in keys.items()}
    with pytest.raises(ConfigError) as info:
        parse_config(upstream_yaml(**keys), "m.yaml")
    assert str(info.value).startswith(expected.replace("EMPTY", files["EMPTY"]))
