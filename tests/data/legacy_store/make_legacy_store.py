#!/usr/bin/env python3
"""Build the legacy store fixture: a store directory written by mirror at commit 9abd62a.

Run it with a Python environment where ``mirror`` is the package of a checkout of
9abd62a (editable install), from that checkout:

    git -C /work/main worktree add /work/legacy-9abd62a 9abd62a
    python3 -m venv /work/legacy-venv
    /work/legacy-venv/bin/pip install -e '/work/legacy-9abd62a[test]'
    cd /work/legacy-9abd62a && /work/legacy-venv/bin/python \
        /work/main/tests/data/legacy_store/make_legacy_store.py

It drives the REAL legacy service over HTTP (in-process, on the real reactor, listening on
127.0.0.1, ephemeral ports), with a FakeRegistry (tests/fake_upstream.py of 9abd62a) as
the docker.io upstream:

1. build: pull mirrored images through the mirror, push hosted images, delete a tag, a
   manifest and a blob link, leave one upload session unfinished, flush the access
   record, age the blobs only the deleted manifest held, run the legacy GC for real;
2. query: a fresh process starts a fresh legacy service on the same store with the
   shipped conf.yaml (whose upstream URL has nothing listening) and records, over HTTP,
   what it serves: that answer is expected.json;
3. check expected.json against the files (every digest is the sha256 of its blob file,
   deleted things are absent, link/tag/manifest sets match the directory tree), check
   the query did not change the store, pack store-9abd62a.tar.gz and check it extracts
   to the same tree.

Outputs (in --out, default: this script's directory): conf.yaml, expected.json,
store-9abd62a.tar.gz.  Content is deterministic (fixed seeds); mtimes and the id of the
abandoned upload session differ from run to run.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

LEGACY_COMMIT = "9abd62a"
TARBALL = f"store-{LEGACY_COMMIT}.tar.gz"
HERE = Path(__file__).resolve().parent

# Nothing listens on the discard port: the shipped config's upstream refuses connections,
# so whatever the service answers with it comes from the store.
DEAD_UPSTREAM = "http://127.0.0.1:9"

CONFIG_TEMPLATE = """\
# The configuration of the legacy store fixture (mirror {commit}).
# Built with upstreams[0].url = the in-process FakeRegistry's ephemeral URL; expected.json
# was then recorded with this very file, whose upstream URL has nothing listening.
# storage.root is relative to the directory the tarball is extracted into.
listen: "tcp:0:interface=127.0.0.1"
storage:
  root: {root}
upstreams:
  - registry: docker.io
    url: {url}
hosted:
  - "myorg/*"
delete: true
gc:
  interval: 0          # no periodic GC; the script runs mirror.gc.collect itself
  grace: 3600
  max_age: 604800
  delete_untagged: false
"""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
SBOM_TYPE = "application/vnd.example.sbom"
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
GONE_AGE = 30 * 24 * 3600  # the blobs of myorg/gone are made this old before GC
CREATED = "2024-01-01T00:00:00Z"


# content ---------------------------------------------------------------------------------
def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def seeded(seed: str, size: int) -> bytes:
    """``size`` deterministic pseudo-random bytes (sha256 in counter mode)."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:size])


def canon(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def image_config(arch: str, name: str, layers: list[bytes]) -> bytes:
    return canon(
        {
            "architecture": arch,
            "os": "linux",
            "created": CREATED,
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": [f"/bin/{name}"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(b) for b in layers]},
        }
    )


def descriptor(media_type: str, blob: bytes, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": sha(blob), "size": len(blob), **extra}


# snapshot of a directory tree --------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """relative path -> (kind, size, integer mtime, sha256) for everything under ``root``."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_dir():
                found[rel] = ("dir", 0, int(st.st_mtime), "")
            else:
                found[rel] = ("file", st.st_size, int(st.st_mtime), hashlib.sha256(path.read_bytes()).hexdigest())
    return found


# the legacy code ------------------------------------------------------------------------------
def import_legacy(legacy_root: Path) -> str:
    """Put the legacy checkout first on sys.path, import it, and return its commit."""
    commit = subprocess.run(
        ["git", "-C", str(legacy_root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not commit.startswith(LEGACY_COMMIT):
        sys.exit(f"{legacy_root} is at {commit[:12]}, not {LEGACY_COMMIT}: run from a checkout of {LEGACY_COMMIT}")
    dirty = subprocess.run(
        ["git", "-C", str(legacy_root), "status", "--porcelain", "--", "mirror", "tests", "setup.py"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if dirty:
        sys.exit(f"{legacy_root} has local changes to the code:\n{dirty}")
    sys.path.insert(0, str(legacy_root))
    import mirror
    import tests.fake_upstream

    for module in (mirror, tests.fake_upstream):
        if not Path(module.__file__).resolve().is_relative_to(legacy_root):
            sys.exit(f"{module.__name__} imported from {module.__file__}, not from {legacy_root}")
    return commit


def start_logging(path: Path, events: list[dict]) -> None:
    from twisted.logger import FileLogObserver, formatEventAsClassicLogText, globalLogBeginner

    log = open(path, "a")  # noqa: SIM115 - open for the life of the process
    keep = lambda event: events.append(event) if event.get("event_kind") else None  # noqa: E731
    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(log, formatEventAsClassicLogText), keep], redirectStandardIO=False
    )


class Client:
    """HTTP against one mirror; every response body is read (and returned)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def __call__(self, method: str, path: str, data: bytes | None = None, headers=None):
        import treq

        h = {k: [v] for k, v in (headers or {}).items()}
        r = await treq.request(method, self.url + path, data=data, headers=h, persistent=False)
        body = await r.content()
        return r, body

    @staticmethod
    def header(r, name: str) -> str | None:
        values = r.headers.getRawHeaders(name)
        return values[0] if values else None


def expect(r, body: bytes, status: int, what: str) -> None:
    if r.code != status:
        raise AssertionError(f"{what}: expected {status}, got {r.code}: {body[:300]!r}")


async def start_mirror(reactor, config):
    """The legacy service, as tests/conftest.py builds it, on an ephemeral 127.0.0.1 port."""
    from twisted.internet.threads import deferToThread
    from twisted.web.client import HTTPConnectionPool

    from mirror.hosted import HostedRegistry
    from mirror.site import build_site
    from mirror.tap import build_auth, build_service

    pool = HTTPConnectionPool(reactor, persistent=True)
    service = build_service(config, reactor, pool)
    hosted = HostedRegistry(service, deferToThread)
    port = reactor.listenTCP(0, build_site(service, hosted, build_auth(config)), interface="127.0.0.1")
    return service, hosted, port, pool, f"http://127.0.0.1:{port.getHost().port}"


async def settled(reactor, service) -> None:
    """Wait until every blob fill has committed to the store."""
    from twisted.internet.task import deferLater

    for _ in range(2000):
        if not service.fills_in_flight:
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("fills still in flight after 20 s")


# phase 1: build ---------------------------------------------------------------------------
async def build(reactor, work: Path) -> None:
    from twisted.internet.threads import deferToThread
    from twisted.web.server import Site

    from mirror.config import parse_config
    from mirror.gc import collect, summary
    from tests.fake_upstream import FakeRegistry

    store_root = work / "store"
    upstream = FakeRegistry()
    upstream_port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
    upstream.url = f"http://127.0.0.1:{upstream_port.getHost().port}"
    config = parse_config(
        CONFIG_TEMPLATE.format(commit=LEGACY_COMMIT, root=store_root, url=upstream.url), "build-config"
    )
    service, hosted, port, pool, url = await start_mirror(reactor, config)
    http = Client(url)
    claims: dict = {"repositories": {}, "deleted": {}, "not_cached": [], "orphan_blobs": []}

    def claim(repo: str, kind: str, pulled_as: str | None = None) -> dict:
        entry = {"kind": kind, "manifests": [], "blob_links": []}
        if pulled_as is not None:
            entry["pulled_as"] = pulled_as  # the name:reference the client asked the mirror for
        return claims["repositories"].setdefault(repo, entry)

    # --- 1. mirrored content (upstream side) --------------------------------------------
    def upstream_image(name, tag, media_type, config_type, layer_type, cfg, layers, **extra):
        for blob in (cfg, *layers):
            upstream.add_blob(blob)
        doc = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": descriptor(config_type, cfg),
            "layers": [descriptor(layer_type, b) for b in layers],
            **extra,
        }
        if tag is not None:
            return upstream.add_manifest(name, tag, doc, media_type), doc
        data = json.dumps(doc).encode()
        upstream.manifests[(name, sha(data))] = (data, media_type)
        return sha(data), doc

    alpine_layers = [seeded("alpine-layer-0", 3000), seeded("alpine-layer-1", 2500)]
    alpine, _ = upstream_image(
        "library/alpine", "3.19", DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER,
        image_config("amd64", "alpine", alpine_layers), alpine_layers,
    )
    # busybox shares alpine's first layer (one blob file, two mirrored repositories)
    busybox_layers = [alpine_layers[0], seeded("busybox-layer-0", 2200)]
    busybox, _ = upstream_image(
        "library/busybox", "latest", DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER,
        image_config("amd64", "busybox", busybox_layers), busybox_layers,
    )
    children = {}
    for arch, size in (("amd64", 2600), ("arm64", 2700)):
        layer = seeded(f"multi-{arch}-layer-0", size)
        cfg = image_config(arch, "multi", [layer])
        digest, _ = upstream_image("library/multi", None, OCI_MANIFEST, OCI_CONFIG, OCI_LAYER, cfg, [layer])
        data = upstream.manifests[("library/multi", digest)][0]
        children[arch] = (digest, data, sha(cfg), sha(layer))
    index_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            descriptor(OCI_MANIFEST, children[arch][1], platform={"architecture": arch, "os": "linux"})
            for arch in ("amd64", "arm64")
        ],
    }
    multi = upstream.add_manifest("library/multi", "1", index_doc, OCI_INDEX)

    # --- 1. mirrored content (pulled through the mirror) ----------------------------------
    async def pull_manifest(name: str, ref: str) -> dict:
        r, body = await http("GET", f"/v2/{name}/manifests/{ref}", headers={"Accept": ACCEPT})
        expect(r, body, 200, f"pull {name}:{ref}")
        assert Client.header(r, "docker-content-digest") == sha(body)
        return json.loads(body)

    async def pull_blob(name: str, digest: str) -> None:
        r, body = await http("GET", f"/v2/{name}/blobs/{digest}")
        expect(r, body, 200, f"pull blob {name}@{digest}")
        assert sha(body) == digest, f"{name}@{digest}: wrong bytes"
        await settled(reactor, service)

    for name, ref, key, digest in (
        ("library/alpine", "3.19", "docker.io/library/alpine", alpine),
        ("docker.io/library/busybox", "latest", "docker.io/library/busybox", busybox),
    ):
        doc = await pull_manifest(name, ref)
        c = claim(key, "mirrored", f"{name}:{ref}")
        c["manifests"].append(digest)
        for desc in [doc["config"], *doc["layers"]]:
            await pull_blob(name, desc["digest"])

    index = await pull_manifest("library/multi", "1")
    assert [m["digest"] for m in index["manifests"]] == [children["amd64"][0], children["arm64"][0]]
    c = claim("docker.io/library/multi", "mirrored", "library/multi:1")
    c["manifests"] += [multi, children["amd64"][0]]
    amd64 = await pull_manifest("library/multi", children["amd64"][0])
    for desc in [amd64["config"], *amd64["layers"]]:
        await pull_blob("library/multi", desc["digest"])
    arm = children["arm64"]
    claims["not_cached"].append({"repository": "docker.io/library/multi", "manifest": arm[0], "blobs": [arm[2], arm[3]]})

    # --- 2. hosted content -------------------------------------------------------------
    async def push_blob(repo: str, data: bytes) -> str:
        digest = sha(data)
        r, body = await http("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", data=data,
                             headers={"Content-Type": "application/octet-stream"})
        expect(r, body, 201, f"monolithic push {repo}@{digest}")
        assert Client.header(r, "docker-content-digest") == digest
        claim(repo, "hosted")["blob_links"].append(digest)
        return digest

    async def push_chunked(repo: str, data: bytes, split: int) -> str:
        digest = sha(data)
        r, body = await http("POST", f"/v2/{repo}/blobs/uploads/")
        expect(r, body, 202, f"start upload {repo}")
        location = Client.header(r, "location")
        first, rest = data[:split], data[split:]
        r, body = await http("PATCH", location, data=first, headers={
            "Content-Type": "application/octet-stream", "Content-Range": f"0-{len(first) - 1}"})
        expect(r, body, 202, f"PATCH {location}")
        assert Client.header(r, "range") == f"0-{len(first) - 1}"
        location = Client.header(r, "location")
        r, body = await http("PUT", f"{location}?digest={digest}", data=rest,
                             headers={"Content-Type": "application/octet-stream"})
        expect(r, body, 201, f"PUT {location}")
        claim(repo, "hosted")["blob_links"].append(digest)
        return digest

    async def push_manifest(repo: str, ref: str, data: bytes) -> str:
        r, body = await http("PUT", f"/v2/{repo}/manifests/{ref}", data=data, headers={"Content-Type": OCI_MANIFEST})
        expect(r, body, 201, f"push manifest {repo}:{ref}")
        digest = Client.header(r, "docker-content-digest")
        assert digest == sha(data)
        claim(repo, "hosted")["manifests"].append(digest)
        return digest

    def oci_manifest(cfg: bytes, layers: list[bytes], cfg_type: str = OCI_CONFIG, layer_type: str = OCI_LAYER, **extra) -> bytes:
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            **({"artifactType": extra.pop("artifactType")} if "artifactType" in extra else {}),
            "config": descriptor(cfg_type, cfg, **({"data": "e30="} if cfg_type == OCI_EMPTY else {})),
            "layers": [descriptor(layer_type, b) for b in layers],
            **extra,
        }
        return json.dumps(doc, indent=2).encode() + b"\n"  # not canonical: bytes must be served as pushed

    shared = seeded("myorg-shared-layer", 4096)
    app1_layer = seeded("myorg-app1-layer", 2000)
    app2_layer = seeded("myorg-app2-layer", 2100)
    app1_cfg = image_config("amd64", "app1", [shared, app1_layer])
    app2_cfg = image_config("amd64", "app2", [shared, app2_layer])
    await push_blob("myorg/app", app1_cfg)
    await push_chunked("myorg/app", shared, split=2500)  # POST, PATCH, PUT with the last chunk
    await push_blob("myorg/app", app1_layer)
    app1_data = oci_manifest(app1_cfg, [shared, app1_layer])
    app1 = await push_manifest("myorg/app", "1", app1_data)
    # app:2 reuses the shared layer: a client HEADs it and skips the upload
    r, body = await http("HEAD", f"/v2/myorg/app/blobs/{sha(shared)}")
    expect(r, body, 200, "HEAD shared layer")
    await push_blob("myorg/app", app2_cfg)
    await push_blob("myorg/app", app2_layer)
    app2 = await push_manifest("myorg/app", "2", oci_manifest(app2_cfg, [shared, app2_layer]))

    # a referrer of myorg/app:1 (an SBOM artifact, pushed by digest as oras does)
    sbom = canon({"spdxVersion": "SPDX-2.3", "name": "myorg/app:1", "packages": [{"name": "app", "versionInfo": "1"}]})
    await push_blob("myorg/app", b"{}")
    await push_blob("myorg/app", sbom)
    referrer_data = oci_manifest(
        b"{}", [sbom], cfg_type=OCI_EMPTY, layer_type="application/spdx+json", artifactType=SBOM_TYPE,
        subject=descriptor(OCI_MANIFEST, app1_data),
        annotations={"org.opencontainers.image.created": CREATED},
    )
    r, body = await http("PUT", f"/v2/myorg/app/manifests/{sha(referrer_data)}", data=referrer_data,
                         headers={"Content-Type": OCI_MANIFEST})
    expect(r, body, 201, "push referrer")
    assert Client.header(r, "oci-subject") == app1
    referrer = sha(referrer_data)
    claim("myorg/app", "hosted")["manifests"].append(referrer)
    claims["referrer_subject"] = {"repository": "myorg/app", "digest": app1, "artifact_type": SBOM_TYPE}

    # myorg/other: a cross-repository mount, its own config, a tag; and a blob link deleted below
    r, body = await http("POST", f"/v2/myorg/other/blobs/uploads/?mount={sha(shared)}&from=myorg/app")
    expect(r, body, 201, "mount shared layer into myorg/other")
    claim("myorg/other", "hosted")["blob_links"].append(sha(shared))
    other_cfg = image_config("amd64", "other", [shared])
    await push_blob("myorg/other", other_cfg)
    await push_manifest("myorg/other", "latest", oci_manifest(other_cfg, [shared]))
    orphan = await push_blob("myorg/other", seeded("myorg-other-orphan", 1800))

    # myorg/gone:1, deleted by digest below
    gone_layer = seeded("myorg-gone-layer", 1900)
    gone_cfg = image_config("amd64", "gone", [gone_layer])
    await push_blob("myorg/gone", gone_cfg)
    await push_blob("myorg/gone", gone_layer)
    gone = await push_manifest("myorg/gone", "1", oci_manifest(gone_cfg, [gone_layer]))

    # --- 3. deletes --------------------------------------------------------------------
    r, body = await http("DELETE", "/v2/myorg/app/manifests/2")
    expect(r, body, 202, "delete tag myorg/app:2")
    r, body = await http("DELETE", f"/v2/myorg/gone/manifests/{gone}")
    expect(r, body, 202, "delete manifest myorg/gone@digest")
    r, body = await http("DELETE", f"/v2/myorg/other/blobs/{orphan}")
    expect(r, body, 202, "delete blob link myorg/other@orphan")
    claims["repositories"]["myorg/gone"]["manifests"].remove(gone)
    claims["repositories"]["myorg/other"]["blob_links"].remove(orphan)
    claims["orphan_blobs"].append({"digest": orphan, "was_linked_in": "myorg/other"})
    claims["deleted"] = {
        "tags": [{"repository": "myorg/app", "tag": "2", "was": app2, "how": "DELETE /v2/myorg/app/manifests/2"}],
        "manifests": [{"repository": "myorg/gone", "digest": gone, "was_tags": ["1"],
                       "how": f"DELETE /v2/myorg/gone/manifests/{gone}"}],
        "blob_links": [{"repository": "myorg/other", "digest": orphan, "how": f"DELETE /v2/myorg/other/blobs/{orphan}"}],
    }

    # --- 5. an abandoned upload session ----------------------------------------------------
    r, body = await http("POST", "/v2/myorg/app/blobs/uploads/")
    expect(r, body, 202, "start abandoned upload")
    location = Client.header(r, "location")
    chunk = seeded("myorg-abandoned-upload", 1500)
    r, body = await http("PATCH", location, data=chunk, headers={
        "Content-Type": "application/octet-stream", "Content-Range": f"0-{len(chunk) - 1}"})
    expect(r, body, 202, "PATCH abandoned upload")
    claims["upload"] = {"repository": "myorg/app", "id": Client.header(r, "docker-upload-uuid"),
                        "size": len(chunk), "sha256_so_far": sha(chunk)}

    # --- 4. GC ---------------------------------------------------------------------------
    service.access.flush()
    store = service.store
    now = time.time()
    gone_blobs = {gone: "myorg/gone manifest", sha(gone_cfg): "myorg/gone config", sha(gone_layer): "myorg/gone layer"}
    for digest in gone_blobs:
        path = store_root / "blobs" / "sha256" / digest[7:9] / digest[7:]
        assert path.is_file(), path
        os.utime(path, (now - GONE_AGE, now - GONE_AGE))
    dry = await deferToThread(collect, store, config, now=time.time, dry_run=True)
    planned = {str(d) for d in dry.plan.delete_blobs}
    if planned != set(gone_blobs) or dry.plan.drop_manifests or dry.plan.drop_tags:
        raise AssertionError(f"unexpected GC plan: {dry.plan}")
    report = await deferToThread(collect, store, config, now=time.time, dry_run=False)
    if report.blobs_deleted != len(gone_blobs):
        raise AssertionError(f"GC deleted {report.blobs_deleted} blobs, expected {len(gone_blobs)}")
    service.access.flush()
    for entry in claims["repositories"].values():  # GC removes the links of what it sweeps
        entry["blob_links"] = [d for d in entry["blob_links"] if d not in gone_blobs]
    claims["deleted"]["gc_swept_blobs"] = [
        {"digest": d, "was": what, "aged_by_seconds": GONE_AGE} for d, what in sorted(gone_blobs.items())
    ]
    claims["gc"] = {
        "call": "mirror.gc.collect(store, config, now=time.time, dry_run=False)",
        "policy": {k: getattr(config.gc, k) for k in ("grace", "max_age", "max_size", "delete_untagged")},
        "summary": {k: v for k, v in summary(report).items() if k != "seconds"},
        "blobs_deleted": sorted(str(d) for d in report.plan.delete_blobs),
    }
    claims["upstream_requests"] = {f"{m} {p}": n for (m, p), n in sorted(upstream.requests.items())}
    for (method, path), n in upstream.requests.items():
        if "/blobs/" in path and n != 1:
            raise AssertionError(f"upstream saw {n} x {method} {path}: a blob was fetched twice")

    await port.stopListening()
    await pool.closeCachedConnections()
    await upstream_port.stopListening()
    (work / "claims.json").write_text(json.dumps(claims, indent=2, sort_keys=True) + "\n")


# phase 2: query -------------------------------------------------------------------------
async def query(reactor, work: Path, events: list[dict]) -> None:
    """A fresh service on the store, with the shipped conf.yaml: record what it serves."""
    from mirror.config import load_config

    os.chdir(work)  # conf.yaml's storage.root is relative
    config = load_config(work / "conf.yaml")
    assert config.upstreams[0].url == DEAD_UPSTREAM
    claims = json.loads((work / "claims.json").read_text())
    service, hosted, port, pool, url = await start_mirror(reactor, config)
    http = Client(url)
    out: dict = {}

    async def get_json(path: str) -> tuple[int, object]:
        r, body = await http("GET", path)
        return r.code, json.loads(body)

    async def error_of(method: str, path: str) -> dict:
        r, body = await http(method, path, headers={"Accept": ACCEPT})
        answer = {"method": method, "path": path, "status": r.code}
        if method != "HEAD" and body:
            answer["code"] = json.loads(body)["errors"][0]["code"]
        return answer

    async def blob(repo: str, digest: str, media_type: str | None = None, declared: int | None = None) -> dict:
        r, body = await http("HEAD", f"/v2/{repo}/blobs/{digest}")
        expect(r, body, 200, f"HEAD {repo}@{digest}")
        head_size = int(Client.header(r, "content-length"))
        r, body = await http("GET", f"/v2/{repo}/blobs/{digest}")
        expect(r, body, 200, f"GET {repo}@{digest}")
        assert sha(body) == digest and len(body) == head_size, f"{repo}@{digest}: bytes do not match"
        if declared is not None:
            assert declared == len(body), f"{repo}@{digest}: descriptor says {declared}, served {len(body)}"
        answer = {"digest": digest, "size": len(body)}
        if media_type is not None:
            answer["media_type"] = media_type
        return answer

    code, catalog = await get_json("/v2/_catalog")
    assert code == 200
    out["catalog"] = catalog
    assert catalog["repositories"] == sorted(claims["repositories"]), catalog
    out["tags_list"] = {}
    out["repositories"] = {}
    served_blobs: dict[str, int] = {}
    for repo in catalog["repositories"]:
        claim = claims["repositories"][repo]
        code, tags_answer = await get_json(f"/v2/{repo}/tags/list")
        assert code == 200, tags_answer
        out["tags_list"][repo] = tags_answer
        entry: dict = {"kind": claim["kind"], "tags": {}, "manifests": {}}
        if "pulled_as" in claim:
            entry["pulled_as"] = claim["pulled_as"]
        for tag in tags_answer["tags"] or []:
            r, body = await http("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
            expect(r, body, 200, f"GET {repo}:{tag}")
            entry["tags"][tag] = Client.header(r, "docker-content-digest")
        assert set(entry["tags"].values()) <= set(claim["manifests"]), (repo, entry["tags"])
        for digest in claim["manifests"]:
            r, data = await http("GET", f"/v2/{repo}/manifests/{digest}", headers={"Accept": ACCEPT})
            expect(r, data, 200, f"GET {repo}@{digest}")
            assert Client.header(r, "docker-content-digest") == digest
            assert sha(data) == digest, f"{repo}@{digest}: served bytes are not the digest's"
            served_blobs[digest] = len(data)
            doc = json.loads(data)
            m: dict = {
                "media_type": Client.header(r, "content-type"),
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "tags": sorted(t for t, d in entry["tags"].items() if d == digest),
            }
            if "manifests" in doc:
                m["kind"] = "index"
                m["manifests"] = [
                    {"digest": c["digest"], "media_type": c["mediaType"], "size": c["size"],
                     "platform": c.get("platform"), "cached": c["digest"] in claim["manifests"]}
                    for c in doc["manifests"]
                ]
            else:
                m["kind"] = "image"
                m["config"] = await blob(repo, doc["config"]["digest"], doc["config"]["mediaType"], doc["config"]["size"])
                m["layers"] = [await blob(repo, d["digest"], d["mediaType"], d["size"]) for d in doc["layers"]]
                for b in (m["config"], *m["layers"]):
                    served_blobs[b["digest"]] = b["size"]
                if "artifactType" in doc:
                    m["artifact_type"] = doc["artifactType"]
                if "subject" in doc:
                    m["subject"] = doc["subject"]["digest"]
            entry["manifests"][digest] = m
        if claim["kind"] == "hosted":
            entry["blob_links"] = {}
            for digest in sorted(claim["blob_links"]):
                b = await blob(repo, digest)
                entry["blob_links"][digest] = b["size"]
                served_blobs[digest] = b["size"]
        out["repositories"][repo] = entry

    # referrers of myorg/app:1
    subject = claims["referrer_subject"]
    r, body = await http("GET", f"/v2/{subject['repository']}/referrers/{subject['digest']}")
    expect(r, body, 200, "referrers")
    assert Client.header(r, "content-type") == OCI_INDEX
    filtered_r, filtered_body = await http(
        "GET", f"/v2/{subject['repository']}/referrers/{subject['digest']}?artifactType={subject['artifact_type']}")
    expect(filtered_r, filtered_body, 200, "referrers filtered")
    out["referrers"] = {
        "repository": subject["repository"],
        "subject": subject["digest"],
        "answer": json.loads(body),
        "filtered": {"artifactType": subject["artifact_type"], "answer": json.loads(filtered_body),
                     "oci_filters_applied": Client.header(filtered_r, "oci-filters-applied")},
    }

    # what was deleted: absent over HTTP
    deleted = claims["deleted"]
    out["deleted"] = {"tags": [], "manifests": [], "blob_links": [], "gc_swept_blobs": []}
    for t in deleted["tags"]:
        e = await error_of("GET", f"/v2/{t['repository']}/manifests/{t['tag']}")
        assert e["status"] == 404, e
        still = await http("GET", f"/v2/{t['repository']}/manifests/{t['was']}", headers={"Accept": ACCEPT})
        out["deleted"]["tags"].append({**t, "answer": e, "manifest_by_digest_status": still[0].code})
    for mf in deleted["manifests"]:
        answers = [await error_of("GET", f"/v2/{mf['repository']}/manifests/{mf['digest']}")]
        answers += [await error_of("GET", f"/v2/{mf['repository']}/manifests/{tag}") for tag in mf["was_tags"]]
        assert all(a["status"] == 404 for a in answers), answers
        out["deleted"]["manifests"].append({**mf, "answers": answers})
    for link in deleted["blob_links"]:
        answers = [await error_of("HEAD", f"/v2/{link['repository']}/blobs/{link['digest']}"),
                   await error_of("GET", f"/v2/{link['repository']}/blobs/{link['digest']}")]
        assert all(a["status"] == 404 for a in answers), answers
        out["deleted"]["blob_links"].append({**link, "answers": answers})
    gone_repo = deleted["manifests"][0]["repository"]
    for swept in deleted["gc_swept_blobs"]:
        answers = [await error_of("GET", f"/v2/{gone_repo}/blobs/{swept['digest']}")]
        assert all(a["status"] == 404 for a in answers), answers
        out["deleted"]["gc_swept_blobs"].append({**swept, "answers": answers})

    # content the store never had: only the (dead) upstream could serve it
    out["not_cached"] = []
    for nc in claims["not_cached"]:
        answers = [await error_of("GET", f"/v2/{nc['repository']}/manifests/{nc['manifest']}")]
        answers += [await error_of("HEAD", f"/v2/{nc['repository']}/blobs/{d}") for d in nc["blobs"]]
        assert all(a["status"] >= 500 for a in answers), answers
        out["not_cached"].append({**nc, "answers": answers})

    # a blob file no repository links (its link was deleted; GC grace kept the bytes)
    out["orphan_blobs"] = []
    for orphan in claims["orphan_blobs"]:
        r, body = await http("GET", f"/v2/docker.io/library/alpine/blobs/{orphan['digest']}")
        expect(r, body, 200, "orphan via a mirrored name")
        assert sha(body) == orphan["digest"]
        served_blobs[orphan["digest"]] = len(body)
        out["orphan_blobs"].append({
            **orphan, "size": len(body),
            "note": "in blobs/, linked nowhere; 404 from myorg/other, but 9abd62a serves it (200) "
                    "through any mirrored repository name, e.g. GET /v2/docker.io/library/alpine/blobs/<digest>",
        })

    # the abandoned upload session
    up = claims["upload"]
    r, body = await http("GET", f"/v2/{up['repository']}/blobs/uploads/{up['id']}")
    expect(r, body, 204, "upload status")
    out["uploads"] = [{**up, "status": r.code, "range": Client.header(r, "range"),
                       "note": "the id is a uuid4 and differs on every run of the script"}]
    assert out["uploads"][0]["range"] == f"0-{up['size'] - 1}"

    out["blobs"] = dict(sorted(served_blobs.items()))
    out["gc"] = claims["gc"]
    fetched = [e for e in events if e.get("event_kind") == "upstream_fetch" and e.get("outcome") == "stored"]
    assert not fetched, f"the query phase fetched from the upstream: {fetched}"
    out["query_phase"] = {
        "upstream": DEAD_UPSTREAM + " (nothing listening)",
        "stale_tags_served": sorted({f"{e['repository']}:{e['tag']}" for e in events if e.get("event_kind") == "stale_tag"}),
        "upstream_fetches_stored": 0,
    }
    out["build_phase_upstream_requests"] = claims["upstream_requests"]
    await port.stopListening()
    await pool.closeCachedConnections()
    (work / "queried.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


# phase 3: check, pack -------------------------------------------------------------------------
def check_against_files(expected: dict, store: Path) -> None:
    """expected.json against the directory tree."""

    def blob_file(digest: str) -> Path:
        alg, hexd = digest.split(":")
        return store / "blobs" / alg / hexd[:2] / hexd

    on_disk = {}
    for path in (store / "blobs").glob("*/*/*"):
        on_disk[f"{path.parent.parent.name}:{path.name}"] = path
    for digest, size in expected["blobs"].items():
        data = blob_file(digest).read_bytes()
        assert sha(data) == digest and len(data) == size, digest
        assert blob_file(digest).parent.name == digest[7:9]
    assert set(on_disk) == set(expected["blobs"]), set(on_disk) ^ set(expected["blobs"])
    for swept in expected["deleted"]["gc_swept_blobs"]:
        assert not blob_file(swept["digest"]).exists(), swept
    for repo, entry in expected["repositories"].items():
        base = store / "repositories" / repo
        links = {f"sha256:{p.name}": p.read_text() for p in (base / "_manifests" / "sha256").glob("*")}
        assert links == {d: m["media_type"] for d, m in entry["manifests"].items()}, (repo, links)
        for d, m in entry["manifests"].items():
            assert m["sha256"] == d[7:] and sha(blob_file(d).read_bytes()) == d
        tags = {p.name: p.read_text() for p in (base / "_tags").glob("*")} if (base / "_tags").is_dir() else {}
        assert tags == entry["tags"], (repo, tags)
        layer_links = {f"sha256:{p.name}" for p in (base / "_layers" / "sha256").glob("*")}
        assert layer_links == set(entry.get("blob_links", {})), (repo, layer_links)
    for t in expected["deleted"]["tags"]:
        assert not (store / "repositories" / t["repository"] / "_tags" / t["tag"]).exists()
    for m in expected["deleted"]["manifests"]:
        assert not (store / "repositories" / m["repository"] / "_manifests" / "sha256" / m["digest"][7:]).exists()
    for link in expected["deleted"]["blob_links"]:
        assert not (store / "repositories" / link["repository"] / "_layers" / "sha256" / link["digest"][7:]).exists()
    ref = expected["referrers"]
    ref_dir = store / "repositories" / ref["repository"] / "_referrers" / "sha256" / ref["subject"][7:]
    stored = sorted(json.loads(p.read_bytes())["digest"] for p in ref_dir.glob("*/*"))
    assert stored == sorted(d["digest"] for d in ref["answer"]["manifests"]), stored
    up = expected["uploads"][0]
    data = (store / "uploads" / up["id"] / "data").read_bytes()
    assert sha(data) == up["sha256_so_far"] and (store / "uploads" / up["id"] / "repo").read_text() == up["repository"]
    assert sorted(os.listdir(store / "uploads")) == [up["id"]]
    assert not os.listdir(store / "spool")


def pack(store: Path, tarball: Path) -> None:
    """store/ as a gzipped tar: sorted, numeric owner 0, mtimes kept (seconds), modes normalised."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = [store, *sorted(store.rglob("*"))]
        for path in paths:
            st = path.lstat()
            info = tarfile.TarInfo("store" if path == store else f"store/{path.relative_to(store)}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = int(st.st_mtime)
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, st.st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    with open(tarball, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="", compresslevel=9) as gz:
        gz.write(buf.getvalue())


def run_reactor_phase(phase: str, work: Path, legacy_root: Path) -> None:
    """Run one phase in this process (the reactor runs once per process)."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    events: list[dict] = []
    start_logging(work / f"{phase}.log", events)

    async def main(reactor):
        try:
            if phase == "build":
                await build(reactor, work)
            else:
                await query(reactor, work, events)
        except BaseException:
            traceback.print_exc()
            raise

    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--legacy-root", type=Path, default=Path.cwd(), help=f"a checkout of {LEGACY_COMMIT} (default: cwd)")
    parser.add_argument("--out", type=Path, default=HERE, help="where conf.yaml, expected.json and the tarball go")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--phase", choices=("build", "query"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    legacy_root = args.legacy_root.resolve()
    commit = import_legacy(legacy_root)

    if args.phase is not None:  # a child process: one reactor phase
        run_reactor_phase(args.phase, args.work.resolve(), legacy_root)
        return

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="legacy-store-")) if args.work is None else args.work.resolve()
    if args.work is not None and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--legacy-root", str(legacy_root), "--work", str(work)]
    ok = False
    try:
        conf_text = CONFIG_TEMPLATE.format(commit=LEGACY_COMMIT, root="store", url=DEAD_UPSTREAM)
        (work / "conf.yaml").write_text(conf_text)
        print(f"building the store in {work / 'store'} with {commit[:12]}", flush=True)
        subprocess.run([*me, "--phase", "build"], check=True, cwd=legacy_root)
        store = work / "store"
        before = snapshot(store)
        print("querying a fresh legacy service on it (upstream: nothing listening)", flush=True)
        subprocess.run([*me, "--phase", "query"], check=True, cwd=legacy_root)
        after = snapshot(store)
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        assert not changed, f"the query phase changed the store: {sorted(changed)}"

        queried = json.loads((work / "queried.json").read_text())
        expected = {
            "legacy_commit": commit,
            "tarball": TARBALL,
            "config": "conf.yaml",
            "store_root_in_tarball": "store",
            **queried,
        }
        check_against_files(expected, store)

        tarball = out / TARBALL
        pack(store, tarball)
        with tempfile.TemporaryDirectory() as extract_dir:
            with tarfile.open(tarball) as tar:
                tar.extractall(extract_dir, filter="data")
            extracted = snapshot(Path(extract_dir) / "store")
            assert extracted == before, "the tarball does not extract to the store"
            check_against_files(expected, Path(extract_dir) / "store")
        (out / "conf.yaml").write_text(conf_text)
        (out / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
        print(f"wrote {out / TARBALL} ({tarball.stat().st_size} bytes), {out / 'expected.json'}, {out / 'conf.yaml'}")
        ok = True
    finally:
        if args.work is None and ok:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"failed; the scratch directory (store, logs) is kept: {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
