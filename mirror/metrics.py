"""Prometheus metrics of the service (served by :mod:`mirror.web.health`).

:class:`Metrics` owns its own ``CollectorRegistry`` (so several services, as in the
tests, never collide) and has one method per thing that happens.  Labels are bounded
sets — route names, status codes, upstream registry names, outcome classes — never a
repository, a digest, a URL or a credential.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily

__all__ = ["GcMetrics", "Metrics"]


class GcMetrics:
    """What garbage collection runs report: the process that runs them counts them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.store_bytes = Gauge("mirror_store_bytes", "Bytes in the blob store (at the last GC run)", registry=r)
        self.store_blobs = Gauge("mirror_store_blobs", "Blobs in the store (at the last GC run)", registry=r)
        self.gc_runs = Counter("mirror_gc_runs", "Garbage collection runs", registry=r)
        self.gc_freed = Counter("mirror_gc_freed_bytes", "Bytes freed by garbage collection", registry=r)

    def gc_run(self, freed: int, store_bytes: int, store_blobs: int) -> None:
        self.gc_runs.inc()
        self.gc_freed.inc(freed)
        self.store_bytes.set(store_bytes)
        self.store_blobs.set(store_blobs)


class Metrics:
    """Counters and gauges of one service."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mirror_http_requests", "Requests answered", ["route", "method", "status"], registry=r)
        self.bytes_served = Counter("mirror_http_response_bytes", "Response body bytes sent", ["route"], registry=r)
        self.cache = Counter("mirror_cache_requests", "Cache lookups", ["kind", "result"], registry=r)
        self.joins = Counter("mirror_inflight_joins", "Requests that joined an in-flight upstream fetch", registry=r)
        self.fetches = Counter("mirror_upstream_fetches", "Upstream fetches", ["upstream", "kind", "outcome"], registry=r)
        self.fetch_bytes = Counter("mirror_upstream_bytes", "Bytes fetched from upstreams", ["upstream"], registry=r)
        self.fetch_errors = Counter("mirror_upstream_errors", "Failed upstream fetches", ["upstream"], registry=r)
        self.retries = Counter(
            "mirror_upstream_retries",
            "Upstream requests tried again after a transient failure",
            ["upstream", "reason"],
            registry=r,
        )
        self.give_ups = Counter(
            "mirror_upstream_give_ups",
            "Upstream requests failed for good once retries ran out",
            ["upstream", "reason"],
            registry=r,
        )
        self.resumes = Counter(
            "mirror_upstream_resumes", "Blob bodies resumed with a Range request after breaking mid-way", ["upstream"], registry=r
        )
        self.follows = Counter(
            "mirror_cluster_follows", "Blob fills followed from another node instead of the upstream", ["outcome"], registry=r
        )
        self.stale = Counter(
            "mirror_stale_tags_served", "Tags served unchecked because the upstream failed", ["upstream"], registry=r
        )
        self.gc = GcMetrics(r)

    def request(self, route: str, method: str, status: int, sent: int) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.bytes_served.labels(route).inc(sent)

    def cache_lookup(self, kind: str, result: str) -> None:
        self.cache.labels(kind, result).inc()
        if result == "join":
            self.joins.inc()

    def fetched(self, upstream: str, kind: str, outcome: str, size: int) -> None:
        kind_of_outcome = "ok" if outcome == "stored" else ("digest_mismatch" if outcome == "digest mismatch" else "error")
        self.fetches.labels(upstream, kind, kind_of_outcome).inc()
        self.fetch_bytes.labels(upstream).inc(size)
        if kind_of_outcome != "ok":
            self.fetch_errors.labels(upstream).inc()

    def upstream_retried(self, upstream: str, reason: str) -> None:
        self.retries.labels(upstream, reason).inc()

    def upstream_gave_up(self, upstream: str, reason: str) -> None:
        self.give_ups.labels(upstream, reason).inc()

    def upstream_resumed(self, upstream: str) -> None:
        self.resumes.labels(upstream).inc()

    def followed(self, outcome: str) -> None:
        self.follows.labels("ok" if outcome == "stored" else "error").inc()

    def stale_tag(self, upstream: str) -> None:
        self.stale.labels(upstream).inc()

    def gc_run(self, freed: int, store_bytes: int, store_blobs: int) -> None:
        self.gc.gc_run(freed, store_bytes, store_blobs)

    def watch_ratelimits(self, upstreams: Callable[[], Iterable[tuple[str, str | None]]]) -> None:
        """Report each upstream's last ``ratelimit-remaining`` at scrape time."""
        self.registry.register(_RateLimitCollector(upstreams))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RateLimitCollector:
    def __init__(self, upstreams: Callable[[], Iterable[tuple[str, str | None]]]) -> None:
        self._upstreams = upstreams

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mirror_upstream_ratelimit_remaining",
            "Pulls left per the upstream's last ratelimit-remaining header (Docker Hub)",
            labels=["upstream"],
        )
        for name, header in self._upstreams():
            value = (header or "").split(";", 1)[0].strip()
            if value.isdigit():
                family.add_metric([name], int(value))
        yield family
