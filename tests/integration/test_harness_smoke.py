"""Smoke tests of the integration harness itself, against Distribution directly (no mirror).

A plain Distribution registry holding ``library/hello`` stands in for the
mirror, exactly like the reference client self-test: if these pass, the
harness (registry variants, token issuer, image generation, skopeo pushes and
the four client drivers) works, and any failure in a mirror test is the
mirror's.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

try:
    from . import clients, images, proc_util, upstream_registry
except ImportError:  # tests/integration is on sys.path (no __init__.py)
    import clients  # type: ignore[no-redef]
    import images  # type: ignore[no-redef]
    import proc_util  # type: ignore[no-redef]
    import upstream_registry  # type: ignore[no-redef]

pytestmark = pytest.mark.integration  # tests that run a client are also marked `clients`

SMALL_BIG_LAYERS = (2 * images.MIB, 1 * images.MIB)
Seeded = tuple[upstream_registry.DistributionRegistry, dict[str, images.SeededImage]]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A module-wide temp dir, unmounted below and removed afterwards (skips without the tools)."""
    for reason in (upstream_registry.skip_reason(), clients.skip_reason("skopeo")):
        if reason:
            pytest.skip(reason)
    with proc_util.WorkDir("mirror-smoke.") as w:
        yield w


@pytest.fixture(scope="module")
def seeded(workdir: Path) -> Iterator[Seeded]:
    """An anonymous Distribution seeded with the standard set (small random image)."""
    with upstream_registry.DistributionRegistry(workdir / "plain") as reg:
        yield reg, images.seed_images(reg, big_layer_sizes=SMALL_BIG_LAYERS)


def test_free_port_is_free_and_loopback() -> None:
    """free_port() returns a port we can bind on 127.0.0.1 right away."""
    port = upstream_registry.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 1024 < port < 65536


def test_seed_pushes_every_manifest_kind(seeded: Seeded) -> None:
    """seed() leaves each tag with the expected media type, children and blobs."""
    reg, info = seeded
    assert info["latest"].media_type == images.MT_DOCKER_MANIFEST
    assert info["oci"].media_type == images.MT_OCI_MANIFEST
    assert info["multi"].media_type == images.MT_OCI_INDEX
    assert info["multi-docker"].media_type == images.MT_DOCKER_LIST
    assert set(info["multi"].children) == set(info["multi-docker"].children) == {"linux/amd64", "linux/arm64"}
    assert info["multi"].child("linux/amd64") != info["multi"].child("linux/arm64")
    assert info["big"].repo == images.BIG_REPO and len(info["big"].layers) == len(SMALL_BIG_LAYERS)
    client = reg.client()
    for item in info.values():
        assert client.manifest_digest(item.repo, item.tag) == item.digest
        for blob in item.blobs:
            assert client.get_blob(item.repo, blob, method="HEAD").status == 200
    assert images.seed.__doc__  # seed() is the digest-only view of seed_images()


def test_access_log_counts_requests(seeded: Seeded) -> None:
    """Every request shows up in the access log with method, path, query and status."""
    reg, info = seeded
    mark = reg.mark()
    client = reg.client()
    client.head_manifest("library/hello", "latest")
    client.request("GET", "/v2/library/hello/manifests/nope?ns=docker.io")
    entries = reg.access_log(since=mark)
    assert [(e.method, e.path, e.status) for e in entries] == [
        ("HEAD", "/v2/library/hello/manifests/latest", 200),
        ("GET", "/v2/library/hello/manifests/nope", 404)]
    assert entries[1].query == "ns=docker.io"
    assert reg.count_requests("HEAD", "/manifests/latest", since=mark) == 1
    assert reg.count_requests(status=404, since=mark) == 1
    assert info["latest"].digest


def test_registry_stop_and_restart_keeps_port_and_data(workdir: Path) -> None:
    """stop() closes the port; start() brings the same data back on the same port."""
    with upstream_registry.DistributionRegistry(workdir / "restart") as reg:
        digest = images.seed(reg, big_layer_sizes=None, only=["latest"])["latest"]
        port, pid = reg.port, reg.pid
        reg.stop()
        assert not reg.running and not upstream_registry.port_is_open(port)
        assert pid is not None and not proc_util.pid_alive(pid)
        reg.start()
        assert reg.port == port and reg.pid != pid
        assert reg.client().manifest_digest("library/hello", "latest") == digest
        assert reg.count_requests("PUT", "/manifests/latest") == 1  # log survives restarts


@pytest.mark.clients
def test_htpasswd_registry(workdir: Path) -> None:
    """htpasswd auth: anonymous requests get a Basic challenge; skopeo pushes and copies with creds."""
    with upstream_registry.DistributionRegistry(workdir / "htpasswd", auth="htpasswd") as reg:
        anon = upstream_registry.RegistryClient(reg.url).get_manifest("library/hello", "latest")
        assert anon.status == 401 and anon.headers["www-authenticate"].startswith("Basic")
        digest = images.seed(reg, big_layer_sizes=None, only=["latest"])["latest"]
        assert clients.skopeo_copy(f"{reg.host_port}/library/hello:latest", creds=reg.creds) == digest
        with pytest.raises(clients.ClientError, match="unauthorized"):
            clients.skopeo_copy(f"{reg.host_port}/library/hello:latest", creds=("mirror-test", "wrong"))


@pytest.mark.clients
@pytest.mark.parametrize("key_ref", ["kid", "x5c"])
def test_token_registry(workdir: Path, key_ref: Literal["kid", "x5c"]) -> None:
    """Token auth: the issuer demands credentials, counts requests, and Distribution trusts its JWTs."""
    with upstream_registry.DistributionRegistry(workdir / f"token-{key_ref}", auth="token",
                                                token_key_ref=key_ref) as reg:
        issuer = reg.token_issuer
        assert issuer is not None
        challenge = upstream_registry.RegistryClient(reg.url).ping().headers["www-authenticate"]
        scheme, params = upstream_registry.parse_challenge(challenge)
        assert (scheme, params["realm"], params["service"]) == ("bearer", issuer.realm, issuer.service)
        digest = images.seed(reg, big_layer_sizes=None, only=["latest"])["latest"]
        granted = issuer.count()
        assert granted >= 1
        assert clients.skopeo_copy(f"{reg.host_port}/library/hello:latest", creds=reg.creds) == digest
        assert issuer.count() == granted + 1  # one token per skopeo run and scope
        last = issuer.requests[-1]
        assert last.username == reg.username and last.scopes == ("repository:library/hello:pull",)
        header, claims = upstream_registry.decode_jwt_unverified(
            issuer.issue([("repository", "library/hello", ["pull"])]))
        assert header["alg"] == "ES256" and (key_ref in header)
        assert claims["aud"] == issuer.service and claims["iss"] == issuer.issuer
        # anonymous token requests are refused; a JWT signed by another key is rejected
        status, _h, _b = upstream_registry.http_request(f"{issuer.realm}?service={issuer.service}")
        assert status == 401
        other = upstream_registry.TokenIssuer(workdir / f"other-{key_ref}", service=issuer.service,
                                              issuer=issuer.issuer, key_ref=key_ref)
        forged = other.issue([("repository", "library/hello", ["pull"])])
        status, _h, _b = upstream_registry.http_request(
            f"{reg.url}/v2/library/hello/manifests/latest", headers={"Authorization": f"Bearer {forged}"})
        assert status == 401
        # the issuer can be restarted on the same port (same realm)
        realm = issuer.realm
        issuer.stop()
        issuer.start()
        assert issuer.realm == realm
        assert reg.client().manifest_digest("library/hello", "latest") == digest


def test_token_registry_anonymous_pull(workdir: Path) -> None:
    """token_anonymous=True hands out pull tokens without credentials (like Docker Hub)."""
    with upstream_registry.DistributionRegistry(workdir / "token-anon", auth="token",
                                                token_anonymous=True) as reg:
        digest = images.seed(reg, big_layer_sizes=None, only=["latest"])["latest"]
        client = upstream_registry.RegistryClient(reg.url)
        assert client.manifest_digest("library/hello", "latest") == digest
        assert reg.token_issuer is not None and reg.token_issuer.requests[-1].username is None


@pytest.mark.clients
def test_tls_registry(workdir: Path) -> None:
    """tls=True serves HTTPS with a certificate for 127.0.0.1 that skopeo can verify."""
    with upstream_registry.DistributionRegistry(workdir / "tls", tls=True) as reg:
        assert reg.url.startswith("https://") and reg.ca_cert_path is not None
        digest = images.seed(reg, big_layer_sizes=None, only=["latest"])["latest"]
        certs = workdir / "tls-certs"
        certs.mkdir()
        (certs / "ca.crt").write_bytes(reg.ca_cert_path.read_bytes())
        got = clients.skopeo_copy(f"{reg.host_port}/library/hello:latest", tls_verify=True, cert_dir=certs)
        assert got == digest


def test_layout_is_deterministic_except_random_layers() -> None:
    """latest/multi have the same digests every time; big is random unless seeded."""
    with proc_util.WorkDir("mirror-layout.") as tmp_path:
        _check_layouts(tmp_path)


def _check_layouts(tmp_path: Path) -> None:
    """Build four layouts under ``tmp_path`` and compare their digests."""
    a = images.build_standard_layout(tmp_path / "a", big_layer_sizes=(4096,))
    b = images.build_standard_layout(tmp_path / "b", big_layer_sizes=(4096,))
    c = images.build_standard_layout(tmp_path / "c", big_layer_sizes=(4096,), seed=7)
    d = images.build_standard_layout(tmp_path / "d", big_layer_sizes=(4096,), seed=7)
    for ref in ("latest", "multi"):
        assert a.refs[ref].digest == b.refs[ref].digest
    assert a.refs["big"].digest != b.refs["big"].digest
    assert c.refs["big"].digest == d.refs["big"].digest
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert {m["annotations"][images.REF_NAME] for m in index["manifests"]} == {"latest", "multi", "big"}


def test_random_layer_is_an_incompressible_gzip_tar() -> None:
    """A random layer is a gzip tar of one file of exactly the asked size; diff_id matches."""
    layer = images.random_layer(3 * images.MIB)
    tar = gzip.decompress(layer.blob)
    assert images.sha256_digest(tar) == layer.diff_id
    assert 3 * images.MIB < len(layer.blob) < 3 * images.MIB + 16 * 1024  # tar + gzip framing
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        (member,) = tf.getmembers()
        assert member.size == 3 * images.MIB
    assert len(gzip.compress(tar, compresslevel=1)) > 3 * images.MIB  # truly random


@pytest.mark.clients
@pytest.mark.parametrize("client", clients.CLIENTS)
@pytest.mark.parametrize("tag", ["latest", "multi", "multi-docker"])
def test_client_pulls_through_mirror_config(seeded: Seeded, client: str, tag: str) -> None:
    """Each client, configured with the registry as docker.io's mirror, pulls the expected digest."""
    reason = clients.skip_reason(client)
    if reason:
        pytest.skip(reason)
    reg, info = seeded
    item = info[tag]
    kwargs = {"all_platforms": True} if client == "skopeo" and item.children else {}
    mark = reg.mark()
    assert clients.pull(client, reg.host_port, f"docker.io/library/hello:{tag}", **kwargs) == item.digest
    assert reg.count_requests("GET", "/blobs/", since=mark) >= 2


@pytest.mark.clients
@pytest.mark.parametrize("client", ["skopeo", "ctr", "docker"])
def test_client_pulls_big_random_image(seeded: Seeded, client: str) -> None:
    """Multi-MiB random layers arrive intact (each layer blob fetched once)."""
    reason = clients.skip_reason(client)
    if reason:
        pytest.skip(reason)
    reg, info = seeded
    mark = reg.mark()
    assert clients.pull(client, reg.host_port, "library/big:latest") == info["big"].digest
    for layer in info["big"].layers:
        assert reg.count_requests("GET", f"/blobs/{layer}", since=mark) == 1


@pytest.mark.clients
def test_client_platform_selection(seeded: Seeded) -> None:
    """A non-host platform from the index: skopeo reports the arm64 instance digest."""
    reg, info = seeded
    got = clients.skopeo_copy("library/hello:multi", registries_conf_mirror=reg.host_port,
                              platform="linux/arm64")
    assert got == info["multi"].child("linux/arm64")


@pytest.mark.clients
@pytest.mark.parametrize("client", ["skopeo", "ctr"])
def test_missing_image_fails_fast_without_leaving_the_machine(seeded: Seeded, client: str) -> None:
    """A pull the mirror cannot serve falls back to docker.io, which the blackhole proxy refuses."""
    reason = clients.skip_reason(client)
    if reason:
        pytest.skip(reason)
    reg, _info = seeded
    with pytest.raises(clients.ClientError) as err:
        clients.pull(client, reg.host_port, "library/absent:latest")
    assert "127.0.0.1:9" in str(err.value)  # the fallback hit the blackhole proxy


@pytest.mark.clients
def test_no_leftovers_after_daemon_clients(seeded: Seeded) -> None:
    """ctr and docker pulls leave no temp dirs, mounts or daemons behind."""
    reg, info = seeded
    tmp = Path(tempfile.gettempdir())
    marks = (f"{tmp}/mirror-ctr.", f"{tmp}/mirror-docker.")

    def client_dirs() -> set[Path]:  # only the clients' own dirs: other runs may share /tmp
        return {p for p in tmp.glob("mirror-*") if any(str(p).startswith(m) for m in marks)}

    before = client_dirs()
    for client in ("ctr", "docker"):
        if clients.client_available(client):
            assert clients.pull(client, reg.host_port, "hello") == info["latest"].digest
    new = sorted(str(p) for p in client_dirs() - before)
    assert not new
    assert not [line for line in Path("/proc/mounts").read_text().splitlines()
                if any(f" {m}" in line for m in marks)]
    assert not [pid for pid in _pids() if any(m in _cmdline(pid) for m in marks)]


def _pids() -> list[int]:
    """All PIDs from /proc."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    """A process's command line ('' if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""
