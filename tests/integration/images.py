"""Test images: OCI image layouts written with the standard library, pushed with skopeo.

Layouts (``oci-layout``, ``index.json``, ``blobs/sha256/...``) hold these
references (``org.opencontainers.image.ref.name``):

* ``latest``: a tiny deterministic single-layer image for the host architecture;
* ``multi``: a deterministic OCI index of linux/amd64 and linux/arm64 images;
* ``big``: an image with several multi-MiB layers of random (incompressible)
  data, random on every call unless a ``seed`` is given.

Every layer is a real gzip-compressed tar (docker and containerd unpack
layers): media type ``application/vnd.oci.image.layer.v1.tar+gzip``. The
random layers use gzip level 0 ("stored" blocks): valid gzip, written ~20×
faster than level 1, and random data would not compress anyway. A layer
blob is therefore its payload size plus under 16 KiB of tar/gzip framing
(tar pads to 10 KiB records; stored gzip adds 5 bytes per 64 KiB).

:func:`push` copies a reference to a registry with ``skopeo copy`` (Docker
schema2 or OCI format, optionally all platforms) and returns the digest the
registry serves for the tag. :func:`seed` pushes the standard set.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform as _platform
import random
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

try:
    from . import proc_util
    from .upstream_registry import RegistryClient
except ImportError:  # imported as a top-level module (tests/integration on sys.path)
    import proc_util  # type: ignore[no-redef]
    from upstream_registry import RegistryClient  # type: ignore[no-redef]

MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)

REF_NAME = "org.opencontainers.image.ref.name"
EPOCH = 1700000000
CREATED = "2023-11-14T22:13:20Z"
MIB = 1 << 20
DEFAULT_BIG_LAYERS = (4 * MIB, 4 * MIB, 4 * MIB)

HELLO_REPO = "library/hello"
BIG_REPO = "library/big"
SKOPEO = "skopeo"
PUSH_TIMEOUT = 120.0

Format = Literal["v2s2", "oci"]


def host_arch() -> str:
    """The GOARCH name of this machine (amd64, arm64, ...)."""
    machine = _platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: object) -> bytes:
    """Deterministic compact JSON bytes (sorted keys)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    platform: Mapping[str, str] | None = None
    annotations: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, object]:
        """The descriptor as it appears in manifests and indexes."""
        out: dict[str, object] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Layer:
    """A gzip layer blob and the digest of its uncompressed tar (the diff ID)."""

    blob: bytes
    diff_id: str


def make_tar(files: Mapping[str, bytes], mtime: int = EPOCH) -> bytes:
    """A deterministic PAX tar of regular files (sorted by name, root-owned, 0644)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            body = files[name]
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(body), mtime, 0o644
            info.uname = info.gname = "root"
            tf.addfile(info, io.BytesIO(body))
    return raw.getvalue()


def make_layer(files: Mapping[str, bytes], *, compresslevel: int = 9) -> Layer:
    """A gzip-compressed tar layer of ``files`` (deterministic: fixed mtimes)."""
    tar = make_tar(files)
    return Layer(gzip.compress(tar, compresslevel=compresslevel, mtime=EPOCH), sha256_digest(tar))


def random_layer(size: int, rng: random.Random | None = None, name: str = "random.bin") -> Layer:
    """A layer holding one file of ``size`` random bytes (gzip level 0, incompressible).

    With ``rng`` the bytes come from that generator (deterministic for a
    seeded one); otherwise from ``os.urandom``.
    """
    payload = rng.randbytes(size) if rng is not None else os.urandom(size)
    return make_layer({name: payload}, compresslevel=0)


class OciLayout:
    """Writer for an OCI image layout directory."""

    def __init__(self, path: Path) -> None:
        """Create (or reuse) the layout at ``path``."""
        self.path = Path(path)
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self._refs: dict[str, Descriptor] = {}
        index = self.path / "index.json"
        if index.exists():
            for m in json.loads(index.read_text()).get("manifests", []):
                name = (m.get("annotations") or {}).get(REF_NAME)
                if name:
                    self._refs[name] = Descriptor(m["mediaType"], m["digest"], m["size"],
                                                  m.get("platform"), m.get("annotations"))
        self._write_index()

    @property
    def refs(self) -> dict[str, Descriptor]:
        """Reference name → descriptor of what it points to."""
        return dict(self._refs)

    def blob_path(self, digest: str) -> Path:
        """Path of a blob in the layout."""
        return self.path / "blobs" / "sha256" / digest.split(":", 1)[1]

    def put_blob(self, data: bytes, media_type: str) -> Descriptor:
        """Store a blob (content-addressed) and return its descriptor."""
        desc = Descriptor(media_type, sha256_digest(data), len(data))
        path = self.blob_path(desc.digest)
        if not path.exists():
            path.write_bytes(data)
        return desc

    def add_image(self, layers: Sequence[Layer], *, arch: str | None = None, os_name: str = "linux",
                  cmd: Sequence[str] = ("/hello.txt",), labels: Mapping[str, str] | None = None,
                  ) -> Descriptor:
        """Write config + OCI manifest for ``layers``; returns the manifest descriptor (with platform)."""
        arch = arch or host_arch()
        config: dict[str, object] = {
            "created": CREATED, "architecture": arch, "os": os_name,
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Cmd": list(cmd), **({"Labels": dict(labels)} if labels else {})},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created": CREATED, "created_by": "tests/integration/images.py"}
                        for _ in layers],
        }
        cdesc = self.put_blob(canonical_json(config), MT_OCI_CONFIG)
        ldescs = [self.put_blob(layer.blob, MT_OCI_LAYER) for layer in layers]
        manifest = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "config": cdesc.to_json(),
                    "layers": [d.to_json() for d in ldescs]}
        mdesc = self.put_blob(canonical_json(manifest), MT_OCI_MANIFEST)
        return Descriptor(mdesc.media_type, mdesc.digest, mdesc.size,
                          platform={"architecture": arch, "os": os_name})

    def add_index(self, manifests: Sequence[Descriptor]) -> Descriptor:
        """Write an OCI image index over ``manifests`` (which carry platforms)."""
        index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                 "manifests": [m.to_json() for m in manifests]}
        return self.put_blob(canonical_json(index), MT_OCI_INDEX)

    def tag(self, name: str, desc: Descriptor) -> Descriptor:
        """Point reference ``name`` at ``desc`` in index.json."""
        tagged = Descriptor(desc.media_type, desc.digest, desc.size, None, {REF_NAME: name})
        self._refs[name] = tagged
        self._write_index()
        return tagged

    def _write_index(self) -> None:
        """Rewrite index.json from the refs."""
        index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                 "manifests": [d.to_json() for _, d in sorted(self._refs.items())]}
        (self.path / "index.json").write_text(json.dumps(index, indent=1))


def hello_layer(arch: str) -> Layer:
    """The tiny deterministic layer: /hello.txt naming the architecture."""
    return make_layer({"hello.txt": f"hello from the mirror test image ({arch})\n".encode()})


def add_hello(layout: OciLayout) -> dict[str, Descriptor]:
    """Add ``latest`` (host arch) and ``multi`` (amd64+arm64 index); deterministic."""
    arch = host_arch()
    single = layout.add_image([hello_layer(arch)], arch=arch)
    amd = single if arch == "amd64" else layout.add_image([hello_layer("amd64")], arch="amd64")
    arm = single if arch == "arm64" else layout.add_image([hello_layer("arm64")], arch="arm64")
    index = layout.add_index([amd, arm])
    return {"latest": layout.tag("latest", single), "multi": layout.tag("multi", index)}


def add_big(layout: OciLayout, layer_sizes: Sequence[int] = DEFAULT_BIG_LAYERS, *,
            seed: int | None = None, ref: str = "big") -> Descriptor:
    """Add an image with one random layer per entry of ``layer_sizes`` (bytes of payload)."""
    rng = random.Random(seed) if seed is not None else None
    layers = [random_layer(size, rng, name=f"random-{i}.bin") for i, size in enumerate(layer_sizes)]
    return layout.tag(ref, layout.add_image(layers, cmd=("/random-0.bin",)))


def build_standard_layout(path: Path, *, big_layer_sizes: Sequence[int] | None = DEFAULT_BIG_LAYERS,
                          seed: int | None = None) -> OciLayout:
    """A layout with ``latest``, ``multi`` and (unless sizes is None) ``big``."""
    layout = OciLayout(path)
    add_hello(layout)
    if big_layer_sizes is not None:
        add_big(layout, big_layer_sizes, seed=seed)
    return layout


# --------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------

def _skopeo_base(workdir: Path) -> list[str]:
    """skopeo with isolated policy, registries.conf and registries.d in ``workdir``."""
    (workdir / "policy.json").write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
    (workdir / "registries.conf").write_text('unqualified-search-registries = []\nshort-name-mode = "disabled"\n')
    (workdir / "registries.d").mkdir(exist_ok=True)
    (workdir / "auth.json").write_text("{}")
    return [SKOPEO, "--registries-conf", str(workdir / "registries.conf"),
            "--policy", str(workdir / "policy.json"), "--registries.d", str(workdir / "registries.d")]


def push(layout_dir: Path, ref_in_layout: str, dest_host_port: str, repo: str, tag: str, *,
         fmt: Format = "v2s2", all_platforms: bool = False, creds: tuple[str, str] | str | None = None,
         tls_verify: bool = False, cert_dir: Path | None = None, timeout: float = PUSH_TIMEOUT) -> str:
    """``skopeo copy oci:LAYOUT:REF docker://HOST:PORT/REPO:TAG``; returns the tag's digest.

    ``fmt="v2s2"`` converts to Docker schema2 (an index becomes a Docker
    manifest list with ``all_platforms``); ``"oci"`` keeps OCI types.
    Without ``all_platforms`` an index is reduced to the host platform's
    image. The returned digest is skopeo's ``--digestfile``: the digest of
    the manifest (or index/list) it wrote for the tag.
    """
    with proc_util.WorkDir("mirror-push.") as w:
        argv = _skopeo_base(w) + ["copy", "-q", "--retry-times", "0", "--authfile", str(w / "auth.json"),
                                  f"--dest-tls-verify={'true' if tls_verify else 'false'}",
                                  "--digestfile", str(w / "digest"),
                                  "--format", fmt]
        if all_platforms:
            argv.append("--all")
        if cert_dir is not None:
            argv += ["--dest-cert-dir", str(cert_dir)]
        if creds is not None:
            argv += ["--dest-creds", creds if isinstance(creds, str) else f"{creds[0]}:{creds[1]}"]
        argv += [f"oci:{Path(layout_dir).resolve()}:{ref_in_layout}",
                 f"docker://{dest_host_port}/{repo}:{tag}"]
        env = proc_util.blackhole_env(proc_util.base_env(w), dest_host_port.rsplit(":", 1)[0])
        proc_util.run(proc_util.isolated_argv(w, argv), timeout=timeout, env=env, cwd=w,
                      what=f"skopeo push {repo}:{tag}")
        return (w / "digest").read_text().strip()


@dataclass(frozen=True)
class SkopeoResult:
    """What one :func:`skopeo_copy_refs` run did: exit code, ``--digestfile`` digest, output."""

    returncode: int
    digest: str | None
    output: str

    @property
    def ok(self) -> bool:
        """True if skopeo exited 0."""
        return self.returncode == 0


def skopeo_copy_refs(source: str, dest: str, *, extra: Sequence[str] = (), direct_hosts: Sequence[str] = (),
                     check: bool = True, timeout: float = PUSH_TIMEOUT) -> SkopeoResult:
    """``skopeo copy SOURCE DEST`` with any transports (``oci:DIR:REF``, ``docker://HOST:PORT/REPO:TAG``...).

    Isolated like :func:`push` (own policy, registries.conf, empty authfile,
    blackhole proxy, private /var/lib); TLS verification is off both ways
    (plain-HTTP registries on 127.0.0.1). ``extra`` goes after ``copy``
    (e.g. ``--all``, ``--preserve-digests``, ``--format oci``).
    ``direct_hosts`` are exempted from the blackhole proxy besides loopback.
    With ``check=False`` a failure is returned (``ok`` False, the output's
    tail in ``output``) instead of raised.
    """
    with proc_util.WorkDir("mirror-skopeo-copy.") as w:
        argv = _skopeo_base(w) + ["copy", "-q", "--retry-times", "0", "--authfile", str(w / "auth.json"),
                                  "--src-tls-verify=false", "--dest-tls-verify=false",
                                  "--digestfile", str(w / "digest"), *extra, source, dest]
        env = proc_util.blackhole_env(proc_util.base_env(w), *direct_hosts)
        res = proc_util.run(proc_util.isolated_argv(w, argv), timeout=timeout, env=env, cwd=w,
                            check=check, what="skopeo copy")
        digest_file = w / "digest"
        digest = digest_file.read_text().strip() if res.returncode == 0 and digest_file.exists() else None
        return SkopeoResult(res.returncode, digest, proc_util.tail(res.stdout + "\n" + res.stderr))


def push_layout(layout_dir: Path, ref_in_layout: str, dest_host_port: str, repo: str, tag: str, *,
                all_platforms: bool = False, timeout: float = PUSH_TIMEOUT) -> str:
    """Push a layout reference to ``HOST:PORT/REPO:TAG`` unchanged (``--preserve-digests``, no
    ``--format``): the registry receives the layout's own manifest/index bytes and blobs.
    Returns skopeo's ``--digestfile`` digest."""
    extra = ["--preserve-digests"] + (["--all"] if all_platforms else [])
    res = skopeo_copy_refs(f"oci:{Path(layout_dir).resolve()}:{ref_in_layout}",
                           f"docker://{dest_host_port}/{repo}:{tag}", extra=extra, timeout=timeout)
    assert res.digest is not None
    return res.digest


def pull_to_layout(src_host_port: str, repo: str, reference: str, layout_dir: Path, ref_in_layout: str, *,
                   all_platforms: bool = False, timeout: float = PUSH_TIMEOUT) -> str:
    """``skopeo copy --preserve-digests docker://HOST:PORT/REPO:REF oci:LAYOUT:REF_IN_LAYOUT``.

    ``reference`` is a tag or a ``sha256:`` digest. Nothing is converted, so
    the layout ends up holding the registry's manifest bytes and blobs.
    Returns skopeo's ``--digestfile`` digest.
    """
    sep = "@" if reference.startswith("sha256:") else ":"
    Path(layout_dir).mkdir(parents=True, exist_ok=True)
    extra = ["--preserve-digests"] + (["--all"] if all_platforms else [])
    res = skopeo_copy_refs(f"docker://{src_host_port}/{repo}{sep}{reference}",
                           f"oci:{Path(layout_dir).resolve()}:{ref_in_layout}", extra=extra, timeout=timeout)
    assert res.digest is not None
    return res.digest


def layout_ref_digest(layout_dir: Path, ref_in_layout: str) -> str:
    """The digest ``index.json`` of a layout gives for a reference name."""
    index = json.loads((Path(layout_dir) / "index.json").read_text())
    for m in index.get("manifests", []):
        if (m.get("annotations") or {}).get(REF_NAME) == ref_in_layout:
            return str(m["digest"])
    raise KeyError(f"{ref_in_layout!r} not in {layout_dir}/index.json")


def layout_closure(layout_dir: Path, ref_in_layout: str) -> dict[str, Path]:
    """Every blob a reference needs in a layout: digest → file, the top manifest/index included.

    Walks index → child manifests (only those present: a single-platform
    copy of an index holds one child) → config and layers; each file must
    exist and hash to its name (a missing or corrupt blob raises).
    """
    root = Path(layout_dir)

    def blob(digest: str) -> Path:
        path = root / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not path.is_file():
            raise proc_util.HarnessError(f"{root}: blob {digest} missing")
        if sha256_digest(path.read_bytes()) != digest:
            raise proc_util.HarnessError(f"{root}: blob {digest} does not hash to its name")
        return path

    out: dict[str, Path] = {}
    pending = [layout_ref_digest(root, ref_in_layout)]
    while pending:
        digest = pending.pop()
        if digest in out:
            continue
        path = out[digest] = blob(digest)
        doc = json.loads(path.read_bytes())
        if "manifests" in doc:
            present = [m["digest"] for m in doc["manifests"]
                       if (root / "blobs" / "sha256" / m["digest"].split(":", 1)[1]).exists()]
            if not present:
                raise proc_util.HarnessError(f"{root}: no child manifest of {digest} present")
            pending += present
        else:
            for d in [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]:
                out[d] = blob(d)
    return out


# --------------------------------------------------------------------------
# seeding a registry
# --------------------------------------------------------------------------

class RegistryLike(Protocol):
    """What :func:`seed` needs: an address (and optionally credentials/client)."""

    @property
    def host_port(self) -> str:
        """``HOST:PORT``."""
        ...


@dataclass(frozen=True)
class SeededImage:
    """What a tag points to in the registry after seeding."""

    repo: str
    tag: str
    digest: str
    media_type: str
    children: Mapping[str, str] = field(default_factory=dict)
    """For an index/list: ``"os/arch"`` → child manifest digest."""
    blobs: tuple[str, ...] = ()
    """Config and layer digests of every image under the tag (sorted, unique)."""
    layers: tuple[str, ...] = ()
    """Layer digests only (sorted, unique)."""

    @property
    def ref(self) -> str:
        """``repo:tag``."""
        return f"{self.repo}:{self.tag}"

    def child(self, platform: str | None = None) -> str:
        """Child digest for ``os/arch`` (default linux/host arch); the digest itself if not an index."""
        if not self.children:
            return self.digest
        return self.children[platform or f"linux/{host_arch()}"]


STANDARD_SET: tuple[tuple[str, str, str, Format, bool], ...] = (
    # key, layout ref, (repo, tag) come from the key; format; all platforms
    ("latest", "latest", "latest", "v2s2", False),
    ("oci", "latest", "oci", "oci", False),
    ("multi", "multi", "multi", "oci", True),
    ("multi-docker", "multi", "multi-docker", "v2s2", True),
)
"""library/hello tags: latest=Docker schema2, oci=OCI manifest, multi=OCI index,
multi-docker=Docker manifest list. ``big`` (library/big:latest) is added by seed()."""


def describe(client: RegistryClient, repo: str, tag: str) -> SeededImage:
    """Read what ``repo:tag`` points to (digest, children, blobs) from the registry."""
    top = client.get_manifest(repo, tag)
    if top.status != 200:
        raise proc_util.HarnessError(f"GET {repo}:{tag} -> {top.status}", top.body[:300].decode("utf-8", "replace"))
    doc = json.loads(top.body)
    media_type = (top.content_type or doc.get("mediaType") or "").split(";")[0]
    children: dict[str, str] = {}
    manifests: list[dict[str, Any]] = []
    if media_type in INDEX_TYPES:
        for m in doc["manifests"]:
            plat = m.get("platform") or {}
            children[f"{plat.get('os')}/{plat.get('architecture')}"] = m["digest"]
            child = client.get_manifest(repo, m["digest"])
            manifests.append(json.loads(child.body))
    else:
        manifests.append(doc)
    layers = sorted({str(layer["digest"]) for m in manifests for layer in m["layers"]})
    configs = {str(m["config"]["digest"]) for m in manifests}
    return SeededImage(repo, tag, sha256_digest(top.body), media_type, children,
                       tuple(sorted(configs | set(layers))), tuple(layers))


def _client_for(registry: RegistryLike) -> RegistryClient:
    """The registry's own client if it has one, else an anonymous HTTP one."""
    make = getattr(registry, "client", None)
    if callable(make):
        return make()  # type: ignore[no-any-return]
    return RegistryClient(f"http://{registry.host_port}")


def seed_images(registry: RegistryLike, *, big_layer_sizes: Sequence[int] | None = DEFAULT_BIG_LAYERS,
                seed: int | None = None, hello_repo: str = HELLO_REPO, big_repo: str = BIG_REPO,
                only: Iterable[str] | None = None) -> dict[str, SeededImage]:
    """Push the standard set and describe it. Keys: latest, oci, multi, multi-docker, big.

    ``big`` is ``library/big:latest`` with random layers (``big_layer_sizes``
    bytes each; None skips it). ``only`` restricts to some keys.
    Credentials come from ``registry.creds`` if it has them.
    """
    wanted = set(only) if only is not None else None
    creds = getattr(registry, "creds", None)
    out: dict[str, SeededImage] = {}
    with proc_util.WorkDir("mirror-seed.") as w:
        build_standard_layout(w / "oci", big_layer_sizes=None)
        jobs = [(key, ref, hello_repo, tag, fmt, all_p) for key, ref, tag, fmt, all_p in STANDARD_SET]
        if big_layer_sizes is not None:
            add_big(OciLayout(w / "oci"), big_layer_sizes, seed=seed)
            jobs.append(("big", "big", big_repo, "latest", "v2s2", False))
        client = _client_for(registry)
        for key, ref, repo, tag, fmt, all_p in jobs:
            if wanted is not None and key not in wanted:
                continue
            digest = push(w / "oci", ref, registry.host_port, repo, tag, fmt=fmt,
                          all_platforms=all_p, creds=creds)
            info = describe(client, repo, tag)
            if info.digest != digest:
                raise proc_util.HarnessError(f"{repo}:{tag}: skopeo wrote {digest}, registry serves {info.digest}")
            out[key] = info
    return out


def seed(registry: RegistryLike, **kwargs: object) -> dict[str, str]:
    """Push the standard set; returns key → digest (see :func:`seed_images` for the keys)."""
    return {k: v.digest for k, v in seed_images(registry, **kwargs).items()}  # type: ignore[arg-type]
