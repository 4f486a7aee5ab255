"""Soak: images pulled through the real ``twistd mirror`` while its upstream fails.

The mirror's upstream is the fault proxy (tests/integration/faultproxy.py) in front of the
real Distribution registry, faulting 10 % of blob and manifest requests at random with one
transient fault each: resets and clean closes before an answer, a stall longer than the
mirror's upstream timeout, 500, 502, 503, 429 (``Retry-After: 1``), a body cut short with a
clean close, a body cut short by a reset.  On top of the random faults, every
round forces one of those kinds on a 4 MiB layer, so that each kind hits a multi-MiB body
in every run.

Every round starts a mirror on a fresh store, so every pull is a cold miss; the clients
are skopeo (``dir:`` copies, digests verified by skopeo and again by the harness) and raw
GETs whose bodies the test hashes, two at a time for the big layers (one follows the
other's fill).  The test asserts that every complete response verifies, that the store
never holds a blob that does not hash to its name, that faults were really injected, and
that clients saw no error at all: a mirror that retries before the first byte reached its
client, honours ``Retry-After`` and resumes a broken body with ``Range`` turns every one of
these faults into a little delay.

Set ``MIRROR_SOAK_ROUNDS`` to change the number of rounds (default 20); the figures are
printed (``pytest -s``) and repeated in any failure message.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration import images
from tests.integration.clients import ClientError, skopeo_copy
from tests.integration.clients import skip_reason as client_skip_reason
from tests.integration.faultproxy import TRANSIENT_KINDS, fetch
from tests.integration.mirror_proc import MirrorProcess
from tests.integration.proc_util import wait_until

pytestmark = pytest.mark.integration

SOAK_KINDS = TRANSIENT_KINDS
RATE = 0.10
SEED = 9
ROUNDS = int(os.environ.get("MIRROR_SOAK_ROUNDS", "20"))
UPSTREAM_TIMEOUT = 2.0
STALL = 3.0  # longer than UPSTREAM_TIMEOUT: the mirror's own timeout has to fire
ACCEPT_ALL = ", ".join([images.MT_OCI_MANIFEST, images.MT_OCI_INDEX, images.MT_DOCKER_MANIFEST, images.MT_DOCKER_LIST])
HELLO_KEYS = ("latest", "oci", "multi", "multi-docker")


@pytest.fixture(autouse=True)
def _need_skopeo():
    reason = client_skip_reason("skopeo")
    if reason:
        pytest.skip(reason)


@dataclass
class Tally:
    """What the clients saw."""

    ops: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    """Complete responses (or copies) whose bytes do not match their digest."""

    def get(self, base: str, path: str, digest: str, *, manifest: bool = False) -> None:
        """One raw GET through the mirror; its body must hash to ``digest``."""
        self.ops["raw GET"] += 1
        got = fetch(base + path, headers={"Accept": ACCEPT_ALL} if manifest else None, timeout=60)
        if got.status == 200 and got.complete:
            if not got.verifies(digest) or (manifest and got.headers.get("docker-content-digest") != digest):
                self.wrong.append(f"GET {path}: a complete 200 whose bytes hash to "
                                  f"sha256:{hashlib.sha256(got.body).hexdigest()}")
            return
        detail = got.body[:200].decode("utf-8", "replace") if got.complete else f"{len(got.body)} body bytes"
        self.errors.append(f"GET {path}: status {got.status}, {got.end}, {detail}")

    def skopeo(self, host_port: str, image: images.SeededImage, *, all_platforms: bool = False) -> None:
        """skopeo copy to a ``dir:`` (it checks every digest; so does the harness after it)."""
        self.ops["skopeo copy"] += 1
        try:
            digest = skopeo_copy(f"{host_port}/{image.repo}:{image.tag}", all_platforms=all_platforms, timeout=90)
        except ClientError as e:
            text = f"skopeo {image.ref}: {' '.join(e.log_tail.split())[-300:]}"
            (self.wrong if "did not match" in text or "corrupt" in text else self.errors).append(text)
            return
        if digest != image.digest:
            self.wrong.append(f"skopeo {image.ref}: copied {digest}, expected {image.digest}")


def bad_blobs(root: Path) -> list[str]:
    """Files under the store's ``blobs/`` that do not hash to their names."""
    bad = []
    for path in (root / "blobs").rglob("*"):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != path.name:
                bad.append(str(path.relative_to(root)))
    return bad


def pull_hello_raw(tally: Tally, base: str, seeded: dict[str, images.SeededImage]) -> None:
    """Every manifest (by tag, and children by digest) and blob of the library/hello tags."""
    blobs: set[str] = set()
    for key in HELLO_KEYS:
        image = seeded[key]
        tally.get(base, f"/v2/{image.repo}/manifests/{image.tag}", image.digest, manifest=True)
        for child in image.children.values():
            tally.get(base, f"/v2/{image.repo}/manifests/{child}", child, manifest=True)
        blobs.update(image.blobs)
    for blob in sorted(blobs):
        tally.get(base, f"/v2/{images.HELLO_REPO}/blobs/{blob}", blob)


def pull_big_raw(tally: Tally, base: str, big: images.SeededImage) -> None:
    """The big image's manifest and config, then each layer by two clients at once."""
    tally.get(base, f"/v2/{big.repo}/manifests/{big.tag}", big.digest, manifest=True)
    for blob in big.blobs:
        if blob not in big.layers:
            tally.get(base, f"/v2/{big.repo}/blobs/{blob}", blob)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for layer in big.layers:
            list(pool.map(lambda _, layer=layer: tally.get(base, f"/v2/{big.repo}/blobs/{layer}", layer), range(2)))


def summary(tally: Tally, log: list[dict], rounds: list[str], elapsed: float) -> str:
    random_faults = Counter(r["fault"] for r in log if r["fault"] and not r["forced"])
    forced = Counter(r["fault"] for r in log if r["fault"] and r["forced"])
    statuses = Counter(str(r["status"] or "none") for r in log)
    lines = [
        f"fault soak: {len(rounds)} rounds in {elapsed:.1f} s; upstream timeout {UPSTREAM_TIMEOUT:g} s, "
        f"stall {STALL:g} s, rate {RATE:.0%}, seed {SEED}",
        f"upstream requests through the proxy: {len(log)} (statuses {dict(sorted(statuses.items()))})",
        f"random faults: {sum(random_faults.values())} {dict(sorted(random_faults.items()))}",
        f"forced faults: {sum(forced.values())} {dict(sorted(forced.items()))}",
        f"skipped (not applicable): {dict(Counter(r['skipped'] for r in log if r['skipped']))}",
        f"unfaulted requests that broke anyway: {Counter(r['error'] for r in log if r['error'] and not r['fault'])}",
        f"client operations: {sum(tally.ops.values())} {dict(tally.ops)}",
        f"client errors: {len(tally.errors)} ({len(tally.errors) / max(1, sum(tally.ops.values())):.1%} of operations); "
        f"complete responses that did not verify: {len(tally.wrong)}",
        *(f"  {line}" for line in rounds),
        *(f"  error: {e}" for e in tally.errors[:15]),
        *(f"  WRONG: {w}" for w in tally.wrong[:15]),
    ]
    return "\n".join(lines)


def test_pulls_through_transient_upstream_faults(seeded_upstream, fault_proxy, workdir):
    """Cold pulls through a mirror whose upstream fails 10 % of requests (plus one forced
    fault a round): no client ever sees an error or a wrong byte, and nothing wrong is stored."""
    registry, seeded = seeded_upstream
    big = seeded["big"]
    proxy = fault_proxy(registry.url, rate=RATE, seed=SEED, kinds=SOAK_KINDS, stall=STALL)
    tally = Tally()
    rounds: list[str] = []
    stored_wrong: list[str] = []
    started = time.monotonic()
    for n in range(ROUNDS):
        seen = len(proxy.log())
        errors_before = len(tally.errors) + len(tally.wrong)
        forced = SOAK_KINDS[n % len(SOAK_KINDS)]
        proxy.force(forced, f"/blobs/{big.layers[0]}")
        d = workdir / f"round{n}"
        d.mkdir()
        m = MirrorProcess(d, [{"registry": "docker.io", "url": proxy.url, "timeout": UPSTREAM_TIMEOUT, "tag_ttl": 300}])
        m.start()
        try:
            if n % 2 == 0:
                tally.skopeo(m.host_port, big)
                pull_hello_raw(tally, m.url, seeded)
            else:
                tally.skopeo(m.host_port, seeded["multi"], all_platforms=True)
                pull_big_raw(tally, m.url, big)
        finally:
            m.stop()
        stored_wrong += bad_blobs(m.root)
        shutil.rmtree(m.root, ignore_errors=True)
        faults = Counter(r["fault"] for r in proxy.log()[seen:] if r["fault"])
        rounds.append(f"round {n}: forced {forced}, faults {dict(faults)}, "
                      f"client errors {len(tally.errors) + len(tally.wrong) - errors_before}")
    log = proxy.log()
    report = summary(tally, log, rounds, time.monotonic() - started)
    print(report)

    assert not tally.wrong, report
    assert not stored_wrong, f"blobs in a store that do not hash to their names: {stored_wrong}\n{report}"
    injected = {r["fault"] for r in log if r["fault"]}
    assert any(r["fault"] and not r["forced"] for r in log), report
    if ROUNDS >= len(SOAK_KINDS):  # each kind was forced at least once (on a layer every round asks for)
        assert injected == set(SOAK_KINDS), report
    assert not tally.errors, report


def test_corrupt_body_is_never_cached_nor_served_whole(seeded_upstream, fault_proxy, mirror_for):
    """An upstream body with one byte flipped (same length) reaches no client as a complete
    response and is not stored; the next request gets the right bytes.  For a 4 MiB layer
    (two clients at once, one following the other's fill), its config blob and a manifest
    by tag."""
    registry, seeded = seeded_upstream
    big = seeded["big"]
    proxy = fault_proxy(registry.url)
    m = mirror_for([{"registry": "docker.io", "url": proxy.url, "timeout": UPSTREAM_TIMEOUT, "tag_ttl": 300}])
    config = next(b for b in big.blobs if b not in big.layers)
    layer = big.layers[0]
    cases = [
        (f"/v2/{big.repo}/manifests/{big.tag}", f"/manifests/{big.tag}", big.digest, True),
        (f"/v2/{big.repo}/blobs/{config}", config, config, False),
        (f"/v2/{big.repo}/blobs/{layer}", layer, layer, False),
    ]
    for path, match, digest, manifest in cases:
        proxy.force("corrupt", match)
        headers = {"Accept": ACCEPT_ALL} if manifest else None
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda _, path=path, headers=headers: fetch(m.url + path, headers=headers, timeout=60),
                                range(2 if not manifest else 1)))
        faulted = [r for r in proxy.log() if match in r["path"] and r["fault"] == "corrupt"]
        assert len(faulted) == 1 and faulted[0]["done"], proxy.log()
        for g in got:
            if g.status == 200 and g.complete:
                assert g.verifies(digest), f"{path}: a complete 200 with a wrong body reached the client"
        if not manifest:
            stored = m.root / "blobs" / "sha256" / digest[7:9] / digest[7:]
            wait_until(lambda stored=stored: stored.exists(), 2)  # a retried fill may still be committing
            assert not stored.exists() or hashlib.sha256(stored.read_bytes()).hexdigest() == digest[7:]
        again = fetch(m.url + path, headers=headers, timeout=60)
        assert again.status == 200 and again.verifies(digest), f"{path} after the fault: {again.status} {again.end}"
    assert bad_blobs(m.root) == []
    assert proxy.faults() == {"corrupt": 3}
