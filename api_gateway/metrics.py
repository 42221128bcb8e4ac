"""`GET /metrics`: the pool's counters and a few gauges, in Prometheus text format.

Counters come from the Redis hash every process adds to (`shared.metrics`),
so any gateway replica serves the pool's totals and workers expose nothing
themselves. Gauges are read at scrape time. No auth, as Prometheus scrapes
expect: it reveals counts, never tenants or content.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from api_gateway.deps import StateDep
from api_gateway.submit import live_workers
from shared import keys, metrics
from shared.catalog import queue_name

router = APIRouter(tags=["service"])


class _Snapshot:
    """A registry collector over values read before rendering (collect() cannot await)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


async def _families(state: StateDep) -> list[Metric]:
    raw: dict[str, str] = await state.redis.hgetall(keys.METRICS)
    grouped: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in metrics.COUNTERS}
    for fieldname, value in raw.items():
        name, labels = metrics.parse_field(fieldname)
        if name in grouped:
            grouped[name].append((labels, float(value)))
    families: list[Metric] = []
    for name, samples in grouped.items():
        label_names = sorted({k for labels, _ in samples for k in labels})
        family = CounterMetricFamily(f"vlmq_{name}", metrics.COUNTERS[name], labels=label_names)
        for labels, count in sorted(samples, key=lambda s: sorted(s[0].items())):
            family.add_metric([labels.get(k, "") for k in label_names], count)
        families.append(family)

    media_bytes, media_entries = await state.media.usage()
    gauges: list[tuple[str, str, Any]] = [
        ("vlmq_media_cache_shared_bytes", "Bytes the shared media cache holds now.", media_bytes),
        ("vlmq_media_cache_shared_max_bytes", "VLMQ_MEDIA_CACHE_MAX_BYTES.", state.settings.media_cache_max_bytes),
        ("vlmq_media_cache_shared_entries", "Entries the shared media cache holds now.", media_entries),
        ("vlmq_workers_live", "Worker processes whose heartbeat is current.", len(await live_workers(state.redis))),
    ]
    for name, help_text, value in gauges:
        families.append(GaugeMetricFamily(name, help_text, value=value))
    queued = GaugeMetricFamily("vlmq_jobs_queued", "Jobs waiting in each model's queue.", labels=["model"])
    for spec in state.settings.models:
        queued.add_metric([spec.name], await state.redis.zcard(keys.queued(queue_name(spec.name))))
    families.append(queued)
    return families


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(state: StateDep) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(await _families(state)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
