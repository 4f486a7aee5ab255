"""The supervisor's ``/metrics``: its own, then every worker's, labelled by worker.

The supervisor counts what only it sees (:class:`SupervisorMetrics`: workers restarted,
workers up, and the garbage collection it runs).  Every worker counts its requests,
cache lookups and upstream fetches in its own :class:`~mirror.metrics.Metrics`; at each
scrape the supervisor reads each worker's exposition from the worker's internal listener
and adds the label ``worker="<i>"`` to every sample (:func:`combine`), so that a sum over
``worker`` is the service's total and a worker that misbehaves stands out.  Families the
supervisor reports itself (the GC's, which workers never update) are taken from the
supervisor alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mirror.metrics import GcMetrics

__all__ = ["SupervisorMetrics", "combine", "relabel"]


class SupervisorMetrics:
    """What the supervisor counts; ``up`` says how many workers are ready (at scrape time)."""

    def __init__(self, configured: int, up: Callable[[], int]) -> None:
        self.registry = r = CollectorRegistry()
        self.gc = GcMetrics(r)
        self.restarts = Counter(
            "mirror_worker_restarts", "Worker processes started again after they died", ["worker"], registry=r
        )
        Gauge("mirror_workers", "Worker processes configured", registry=r).set(configured)
        Gauge("mirror_workers_up", "Worker processes ready to serve", registry=r).set_function(lambda: float(up()))

    def gc_run(self, freed: int, store_bytes: int, store_blobs: int) -> None:
        self.gc.gc_run(freed, store_bytes, store_blobs)

    def restarted(self, worker: int) -> None:
        self.restarts.labels(str(worker)).inc()


def relabel(text: str, worker: str) -> list[Metric]:
    """The families of the exposition ``text``, each sample with ``worker`` added.

    Raises:
        ValueError: ``text`` is not the Prometheus text format.
    """
    families = []
    for family in text_string_to_metric_families(text):
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = [sample._replace(labels={**sample.labels, "worker": worker}) for sample in family.samples]
        families.append(copy)
    return families


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def combine(own: CollectorRegistry, workers: Mapping[int, str]) -> bytes:
    """The exposition of ``own`` registry, then of every worker's metrics (its exposition
    text by index) labelled ``worker="<index>"``, one family per name.  A family ``own``
    has is not taken from the workers; a worker whose text cannot be parsed is left out."""
    exposition = generate_latest(own)
    mine = {family.name for family in text_string_to_metric_families(exposition.decode())}  # (as a worker's parse)
    merged: dict[str, Metric] = {}
    for index, text in sorted(workers.items()):
        try:
            families = relabel(text, str(index))
        except ValueError:
            continue
        for family in families:
            if family.name in mine:
                continue
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            into.samples.extend(family.samples)
    theirs = CollectorRegistry(auto_describe=False)
    theirs.register(_Families(list(merged.values())))
    return exposition + generate_latest(theirs)
