"""The registry's repositories without sockets or real time.

The real Registry and web resource, the in-memory store, a Clock, and a fake upstream
(a Twisted resource) reached through treq's in-memory agent (tests/inmemory.py): tag
freshness and revalidation, stale answers, one fill per blob, verification, hosted
reads and writes and their policy, which kind of repository a name gets, and garbage
collection seeing a repository as the request that filled it did.
"""

from __future__ import annotations

import json
import os

import pytest

from twisted.internet.task import Clock
from twisted.web.client import ResponseFailed

from mirror.config import GcConfig, MirrorConfig, StorageConfig, UpstreamConfig
from mirror.core.oci import DOCKER_MANIFEST, OCI_MANIFEST, Digest
from mirror.registry.gc import collect
from mirror.registry.hosted import HostedRepository
from mirror.registry.mirrored import MirroredRepository
from mirror.storage.fs import open_filesystem_store
from mirror.storage.memory import open_memory_store
from tests.fake_upstream import FakeRegistry, digest_of
from tests.inmemory import InMemoryMirror
from tests.storeutil import Sync, run_now

LAYER = os.urandom(300_000)
CONFIG = b'{"architecture":"amd64","os":"linux"}'
HUB = "http://upstream.test"


def image(fake: FakeRegistry, name: str = "library/app", tag: str = "latest", layer: bytes = LAYER) -> tuple[str, str]:
    """A one-layer Docker schema 2 image in the fake upstream: (manifest digest, layer digest)."""
    return fake.add_image(name, tag, layer, CONFIG)


def make(fake: FakeRegistry | None = None, *, hosted=(), tag_ttl=300.0, **config) -> InMemoryMirror:
    clock = Clock()
    clock.advance(1_000_000)
    upstreams = (UpstreamConfig(registry="docker.io", url=HUB, tag_ttl=tag_ttl, timeout=5),) if fake is not None else ()
    cfg = MirrorConfig(listen=(), storage=StorageConfig(root="unused"), upstreams=upstreams, hosted=tuple(hosted), **config)
    return InMemoryMirror(cfg, open_memory_store(clock.seconds), upstream=fake, clock=clock)


@pytest.fixture
def fake():
    return FakeRegistry()


# mirrored: tags --------------------------------------------------------------------------------
def test_a_tag_is_trusted_for_its_ttl_then_revalidated_with_one_head(fake):
    digest, _ = image(fake)
    m = make(fake, tag_ttl=60)
    for _ in range(3):
        a = m.get("/v2/library/app/manifests/latest")
        assert a.code == 200 and a.header("Docker-Content-Digest") == digest
    assert (fake.count("GET", "/manifests/latest"), fake.count("HEAD", "/manifests/latest")) == (1, 0)
    m.clock.advance(61)
    assert m.get("/v2/library/app/manifests/latest").code == 200
    assert (fake.count("GET", "/manifests/latest"), fake.count("HEAD", "/manifests/latest")) == (1, 1)
    moved, _ = image(fake, layer=b"another layer")  # the tag now points elsewhere
    m.clock.advance(61)
    a = m.get("/v2/library/app/manifests/latest")
    assert a.header("Docker-Content-Digest") == moved and fake.count("GET", "/manifests/latest") == 2
    assert Sync(m.registry.store).metadata.get_tag("docker.io/library/app", "latest") == Digest(*moved.split(":"))


def test_a_tag_confirmed_by_another_node_sharing_the_store_is_fresh_on_this_one(fake):
    """Two registries on one store (two nodes): a tag one fetched is fresh on the other for
    the rest of its TTL, with no upstream request; once it expires, one node revalidates it
    with a HEAD and the other, whose own memory of the tag has expired too, takes that
    confirmation from the store instead of asking the upstream again."""
    digest, _ = image(fake)
    a = make(fake, tag_ttl=60)
    b = InMemoryMirror(a.registry.config, a.registry.store, upstream=fake, clock=a.clock)
    assert a.get("/v2/library/app/manifests/latest").header("Docker-Content-Digest") == digest
    a.clock.advance(30)
    assert b.get("/v2/library/app/manifests/latest").header("Docker-Content-Digest") == digest
    assert (fake.count("GET", "/manifests/latest"), fake.count("HEAD", "/manifests/latest")) == (1, 0)
    a.clock.advance(31)  # past the TTL for both
    assert a.get("/v2/library/app/manifests/latest").code == 200
    assert fake.count("HEAD", "/manifests/latest") == 1
    a.clock.advance(10)
    assert b.get("/v2/library/app/manifests/latest").header("Docker-Content-Digest") == digest
    assert (fake.count("GET", "/manifests/latest"), fake.count("HEAD", "/manifests/latest")) == (1, 1)
    a.clock.advance(60)  # now stale everywhere: b asks the upstream itself
    assert b.get("/v2/library/app/manifests/latest").code == 200
    assert fake.count("HEAD", "/manifests/latest") == 2


def test_one_node_revalidates_a_tag_for_all_that_share_the_store(fake, tmp_path):
    """Nodes (or worker processes) sharing a store and leases: while one asks the upstream
    about a stale tag, another serves the digest it has cached rather than ask too; once
    the first has recorded the answer, the other takes it from the store."""
    from twisted.internet.defer import Deferred

    from mirror.config import ClusterConfig
    from mirror.registry.cluster import Cluster
    from mirror.storage.fsleases import FsLeases

    digest, _ = image(fake)
    a = make(fake, tag_ttl=60)
    leases = FsLeases(tmp_path / "leases", a.clock.seconds)

    def node(name: str) -> InMemoryMirror:
        cluster = Cluster(ClusterConfig(f"http://{name}.test", "a-secret-of-16-chars"), leases, None, a.clock)
        return InMemoryMirror(a.registry.config, a.registry.store, upstream=fake, clock=a.clock, cluster=cluster)

    b, c = node("b"), node("c")
    assert b.get("/v2/library/app/manifests/latest").header("Docker-Content-Digest") == digest
    assert c.get("/v2/library/app/manifests/latest").header("Docker-Content-Digest") == digest
    a.clock.advance(61)
    # c is asking the upstream about the tag right now (it holds the tag's lease)...
    assert a.wait(Deferred.fromCoroutine(c.registry.cluster.claim_tag("docker.io/library/app", "latest")))
    heads = fake.count("HEAD", "/manifests/latest")
    assert b.get("/v2/library/app/manifests/latest").header("Docker-Content-Digest") == digest
    assert fake.count("HEAD", "/manifests/latest") == heads  # ...so b served its cached digest
    a.wait(Deferred.fromCoroutine(c.registry.cluster.release_tag("docker.io/library/app", "latest")))
    assert c.get("/v2/library/app/manifests/latest").code == 200  # c asks (one HEAD) and records it
    assert fake.count("HEAD", "/manifests/latest") == heads + 1
    assert b.get("/v2/library/app/manifests/latest").header("Docker-Content-Digest") == digest
    assert fake.count("HEAD", "/manifests/latest") == heads + 1  # b took c's answer from the store
    assert not list((tmp_path / "leases" / "tags").iterdir())  # (released)


@pytest.mark.parametrize("fault", ["500", "429"])
def test_a_failing_upstream_gets_the_cached_tag_served(fake, fault):
    digest, _ = image(fake)
    m = make(fake, tag_ttl=0)
    assert m.get("/v2/library/app/manifests/latest").code == 200
    fake.faults["library/app:latest"] = fault
    a = m.get("/v2/library/app/manifests/latest")
    assert a.code == 200 and a.header("Docker-Content-Digest") == digest
    assert 'mirror_stale_tags_served_total{upstream="docker.io"} 1.0' in m.registry.metrics.exposition().decode()


def test_a_tag_the_upstream_no_longer_has_is_forgotten(fake):
    image(fake)
    m = make(fake, tag_ttl=0)
    assert m.get("/v2/library/app/manifests/latest").code == 200
    del fake.manifests[("library/app", "latest")]
    a = m.get("/v2/library/app/manifests/latest")
    assert a.code == 404 and a.error_code == "MANIFEST_UNKNOWN"
    assert Sync(m.registry.store).metadata.get_tag("docker.io/library/app", "latest") is None


def test_a_manifest_whose_bytes_contradict_its_type_is_refused_and_not_stored(fake):
    """The one parser decides for pull-through too: a declared type the document contradicts
    is a 502 MANIFEST_INVALID, and nothing is stored."""
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": digest_of(CONFIG), "size": 1}}
    fake.add_manifest("library/odd", "1", doc, DOCKER_MANIFEST)
    m = make(fake)
    a = m.get("/v2/library/odd/manifests/1")
    assert a.code == 502 and a.error_code == "MANIFEST_INVALID"
    assert Sync(m.registry.store).metadata.list_tags("docker.io/library/odd") is None


# mirrored: blobs -------------------------------------------------------------------------------
def test_concurrent_requests_for_a_blob_cause_one_upstream_fetch(fake):
    """Both clients stream the one fill; the blob lands in the store verified."""
    _, layer = image(fake)
    m = make(fake)
    fake.clock, fake.chunk_delay = m.clock, 1.0  # the upstream sends a chunk per (fake) second
    first = m._client.get(f"http://mirror.test/v2/library/app/blobs/{layer}")
    second = m._client.get(f"http://mirror.test/v2/library/app/blobs/{layer}")
    for _ in range(len(LAYER) // 65536 + 2):
        m.clock.advance(1)
        m.pump()
    bodies = [m.wait(m.wait(d).content()) for d in (first, second)]
    assert bodies == [LAYER, LAYER]
    assert fake.count("GET", f"/blobs/{layer}") == 1
    assert Sync(m.registry.store).blobs.stat(Digest(*layer.split(":"))) == len(LAYER)
    assert m.get(f"/v2/library/app/blobs/{layer}").body == LAYER  # now a hit
    assert fake.count("GET", f"/blobs/{layer}") == 1
    exposition = m.registry.metrics.exposition().decode()
    assert 'mirror_cache_requests_total{kind="blob",result="join"} 1.0' in exposition


@pytest.mark.parametrize("streaming", [True, False])
def test_a_corrupt_blob_is_never_stored_nor_handed_on_whole(fake, streaming):
    """Streaming: the client has the headers and all but the last byte when the digest fails
    to verify, and its connection is aborted.  Not yet streaming: a 503."""
    _, layer = image(fake)
    fake.faults[layer] = "corrupt"
    m = make(fake)
    if streaming:
        fake.clock, fake.chunk_delay = m.clock, 1.0
    d = m._client.get(f"http://mirror.test/v2/library/app/blobs/{layer}")
    for _ in range(len(LAYER) // 65536 + 2):
        m.clock.advance(1)
        m.pump()
    response = m.wait(d)
    if streaming:
        assert response.code == 200
        with pytest.raises(ResponseFailed):
            m.wait(response.content())
    else:
        assert response.code == 503 and json.loads(m.wait(response.content()))["errors"][0]["code"] == "UNAVAILABLE"
    assert Sync(m.registry.store).blobs.stat(Digest(*layer.split(":"))) is None
    assert m.registry.fills_in_flight == 0


def test_head_of_an_uncached_blob_asks_the_upstream_without_fetching_it(fake):
    _, layer = image(fake)
    m = make(fake)
    a = m.request("HEAD", f"/v2/library/app/blobs/{layer}")
    assert a.code == 200 and a.header("Content-Length") == str(len(LAYER))
    assert (fake.count("HEAD", f"/blobs/{layer}"), fake.count("GET", f"/blobs/{layer}")) == (1, 0)


def test_a_mirrored_repository_refuses_writes_naming_the_rule(fake):
    m = make(fake, hosted=("myorg/*",))
    a = m.request("POST", "/v2/library/app/blobs/uploads/")
    assert a.code == 403 and a.error_code == "DENIED"
    assert b"myorg/*" in a.body and b"docker.io" in a.body


# hosted -----------------------------------------------------------------------------------------
def push(m: InMemoryMirror, repo: str, tag: str) -> str:
    config = m.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest_of(b'{}')}", data=b"{}")
    layer_data = os.urandom(2000)
    layer = m.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest_of(layer_data)}", data=layer_data)
    assert config.code == layer.code == 201
    body = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(layer_data), "size": 2000}],
    }).encode()
    a = m.request("PUT", f"/v2/{repo}/manifests/{tag}", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert a.code == 201, a.body
    return a.header("Docker-Content-Digest")


def test_hosted_push_pull_and_delete():
    m = make(hosted=("*",))
    digest = push(m, "team/app", "1")
    a = m.get("/v2/team/app/manifests/1")
    assert a.code == 200 and a.header("Docker-Content-Digest") == digest
    assert json.loads(m.get("/v2/_catalog").body) == {"repositories": ["team/app"]}
    assert m.request("DELETE", f"/v2/team/app/manifests/{digest}").code == 202
    assert json.loads(m.get("/v2/team/app/tags/list").body) == {"name": "team/app", "tags": None}


@pytest.mark.parametrize("backend", ["memory", "fs"])
def test_catalog_pages_follow_the_link_header(backend, tmp_path):
    """``_catalog?n=`` pages in lexical order with a ``Link`` to the next page (``last`` =
    the page's last name) until the last page, which has none; n=0 is an empty page; an
    ``n`` that is no number is a 400; ``last`` need not be a listed name."""
    m = make(hosted=("*",))
    if backend == "fs":
        m = InMemoryMirror(m.registry.config, open_filesystem_store(tmp_path / "store"), clock=m.clock)
    names = sorted(f"team/r{i}" for i in range(25)) + ["zz/last"]
    for name in names:
        run_now(m.registry.store.metadata.set_tag(name, "1", Digest.of(b"m")))
    seen, path, pages = [], "/v2/_catalog?n=10", 0
    while path is not None:
        a = m.get(path)
        assert a.code == 200
        page = json.loads(a.body)["repositories"]
        seen += page
        pages += 1
        link = a.header("Link")
        path = link[link.index("<") + 1 : link.index(">")] if link else None
        if path is not None:
            assert link.endswith('>; rel="next"') and f"last={page[-1].replace('/', '%2F')}" in path
    assert seen == names and pages == 3
    assert json.loads(m.get("/v2/_catalog").body) == {"repositories": names}
    a = m.get("/v2/_catalog?n=0")
    assert json.loads(a.body) == {"repositories": []} and a.header("Link") is None
    a = m.get("/v2/_catalog?n=2&last=team/r8")
    assert json.loads(a.body) == {"repositories": ["team/r9", "zz/last"]} and a.header("Link") is None
    assert json.loads(m.get("/v2/_catalog?last=team/r90").body) == {"repositories": ["zz/last"]}
    assert m.get("/v2/_catalog?n=ten").error_code == "PAGINATION_NUMBER_INVALID"


def test_a_catalog_page_skips_what_the_caller_may_not_see():
    """With access rules hiding most repositories, a page still holds ``n`` visible names
    (the store is asked batch after batch) and says whether more follow."""
    m = make(hosted=("*",))
    names = [f"team/r{i:04d}" for i in range(1000)]
    for name in names:
        run_now(m.registry.store.metadata.link_blob(name, Digest.of(b"l")))
    visible = [n for n in names if n.endswith("7")]

    def page(last, n):
        return run_now(m.registry.catalog_page(last, n, lambda key: key.endswith("7")))

    assert page(None, 3) == (visible[:3], True)
    assert page(visible[2], 50) == (visible[3:53], True)
    assert page(visible[-3], 5) == (visible[-2:], False)
    assert page(visible[-2], 1) == (visible[-1:], False)
    assert page(None, None) == (visible, False)
    assert page(None, 0) == ([], False)


def test_a_hosted_repository_serves_only_blobs_it_holds():
    m = make(hosted=("*",))
    push(m, "team/a", "1")
    layer_data = b"only in b"
    assert m.request("POST", f"/v2/team/b/blobs/uploads/?digest={digest_of(layer_data)}", data=layer_data).code == 201
    a = m.get(f"/v2/team/a/blobs/{digest_of(layer_data)}")
    assert a.code == 404 and a.error_code == "BLOB_UNKNOWN"
    assert m.get(f"/v2/team/b/blobs/{digest_of(layer_data)}").body == layer_data


@pytest.mark.parametrize(("setting", "method", "path"), [
    ({"read_only": True}, "POST", "/v2/team/app/blobs/uploads/"),
    ({"read_only": True}, "DELETE", "/v2/team/app/manifests/1"),
    ({"delete": False}, "DELETE", "/v2/team/app/manifests/1"),
])
def test_hosted_policy_refuses_writes(setting, method, path):
    m = make(hosted=("*",), **setting)
    a = m.request(method, path)
    assert a.code == 405 and a.error_code == "UNSUPPORTED"


# the registry ------------------------------------------------------------------------------------
def test_the_router_decides_which_kind_of_repository_a_name_gets(fake):
    m = make(fake, hosted=("myorg/*",))
    assert isinstance(m.registry.repository("myorg/app"), HostedRepository)
    assert isinstance(m.registry.repository("library/app"), MirroredRepository)
    assert isinstance(m.registry.repository("docker.io/myorg/app"), MirroredRepository)
    r = m.registry.repository("alpine", "docker.io")
    assert isinstance(r, MirroredRepository) and r.key == "docker.io/library/alpine"


def test_gc_evicts_content_pulled_through_a_registry_prefix_even_when_everything_is_hosted(fake):
    """hosted: ["*"] with an upstream: an image pulled as /v2/docker.io/library/app is mirrored,
    so age eviction removes it; a hosted image of the same age stays."""
    _, layer = image(fake)
    m = make(fake, hosted=("*",))
    assert m.get("/v2/docker.io/library/app/manifests/latest").code == 200
    assert m.get(f"/v2/docker.io/library/app/blobs/{layer}").code == 200
    push(m, "team/app", "1")
    run_now(m.registry.access.flush())
    m.clock.advance(8 * 24 * 3600)
    config = MirrorConfig(
        listen=(), storage=StorageConfig(root="unused"), upstreams=m.registry.config.upstreams, hosted=("*",),
        gc=GcConfig(grace=3600, max_age=7 * 24 * 3600),
    )
    report = run_now(collect(m.registry.store, config, now=m.clock.seconds))
    assert [repo for repo, _, _ in report.plan.drop_manifests] == ["docker.io/library/app"]
    assert Digest(*layer.split(":")) in report.plan.delete_blobs
    assert m.get("/v2/team/app/manifests/1").code == 200


def gc_config(m: InMemoryMirror, **gc) -> MirrorConfig:
    return MirrorConfig(
        listen=(), storage=StorageConfig(root="unused"), upstreams=m.registry.config.upstreams,
        hosted=m.registry.config.hosted, gc=GcConfig(**gc),
    )


def test_gc_keeps_what_a_manifest_the_parser_refuses_may_reference():
    """A stored manifest an earlier release accepted but this parser cannot read keeps every
    digest in it alive: GC never loses pushed layers over a malformed document."""
    m = make(hosted=("*",))
    store = Sync(m.registry.store)
    layer = b"a layer"
    store.blobs.put(Digest.of(layer), layer)
    store.metadata.link_blob("team/app", Digest.of(layer))
    body = json.dumps({"schemaVersion": 2, "mediaType": 7, "layers": [{"digest": digest_of(layer)}]}).encode()
    store.blobs.put(Digest.of(body), body)
    store.metadata.link_manifest("team/app", Digest.of(body), OCI_MANIFEST)
    store.metadata.set_tag("team/app", "1", Digest.of(body))
    m.clock.advance(30 * 24 * 3600)
    report = run_now(collect(m.registry.store, gc_config(m, grace=0, max_age=3600), now=m.clock.seconds))
    assert report.plan.delete_blobs == []


def test_gc_never_evicts_pushed_content_whose_name_now_routes_to_an_upstream(fake):
    """A repository pushed as docker.io/team/app (hosted: ["*"], no upstream then) and an
    upstream docker.io added later: its name now routes upstream, but its pushed blobs
    are not evicted by age."""
    m = make(hosted=("*",))
    push(m, "docker.io/team/app", "1")
    later = make(fake, hosted=("*",))
    m.clock.advance(30 * 24 * 3600)
    config = MirrorConfig(
        listen=(), storage=StorageConfig(root="unused"), upstreams=later.registry.config.upstreams, hosted=("*",),
        gc=GcConfig(grace=0, max_age=3600),
    )
    report = run_now(collect(m.registry.store, config, now=m.clock.seconds))
    assert report.plan.drop_manifests == [] and report.plan.delete_blobs == []


@pytest.mark.parametrize("source", ["Not A Name", "team/empty", "team/a"])
def test_a_mount_happens_only_from_a_repository_that_holds_the_blob(source):
    """mount=&from= links the blob only when `from` names a repository holding it; else (a
    bad name, a repository without it) the client gets an upload session instead."""
    m = make(hosted=("*",))
    push(m, "team/a", "1")
    config = digest_of(b"{}")
    a = m.request("POST", f"/v2/team/b/blobs/uploads/?mount={config}&from={source}")
    if source == "team/a":
        assert a.code == 201 and a.header("Docker-Content-Digest") == config
        assert m.get(f"/v2/team/b/blobs/{config}").body == b"{}"
    else:
        assert a.code == 202 and a.header("Docker-Upload-UUID")
        assert m.get(f"/v2/team/b/blobs/{config}").code == 404
