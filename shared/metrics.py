"""Pool-wide counters, kept in one Redis hash (`keys.METRICS`).

Every process adds to the same fields (`HINCRBY`), so a counter is the
pool's total, survives the process that counted and needs no scraping of
workers that may sit on private hosts; `GET /metrics` reads the hash and
renders it as Prometheus text. A field is `name\\tlabel=value\\t…` (tabs: no
model name or tenant holds one); the job store's transition script writes
`jobs_finished` fields the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared import keys

# name -> help text; the names `GET /metrics` renders as counters (`vlmq_<name>_total`).
COUNTERS = {
    "media_cache_hits": "Media items found in a cache tier (shared: Redis by uuid; worker: preprocessed "
    "tensors in a worker process; encoder: vision-encoder outputs in an engine).",
    "media_cache_misses": "Media items looked up in a cache tier and not found.",
    "media_cache_stores": "Media items written to the shared tier (a job's media with a uuid, or POST /v1/media).",
    "media_cache_evictions": "Shared-tier entries removed to stay under VLMQ_MEDIA_CACHE_MAX_BYTES.",
    "jobs_submitted": "Jobs accepted by the gateway.",
    "jobs_finished": "Jobs that reached a terminal status.",
}


def field(name: str, **labels: str) -> str:
    return "\t".join([name, *(f"{k}={v}" for k, v in sorted(labels.items()))])


def parse_field(raw: str) -> tuple[str, dict[str, str]]:
    name, *pairs = raw.split("\t")
    labels = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    return name, labels


def add(redis: Any, counts: Mapping[str, int]) -> None:
    """Add to counters (blocking client); zero counts are skipped, one round trip."""
    counts = {f: n for f, n in counts.items() if n}
    if not counts:
        return
    with redis.pipeline(transaction=False) as pipe:
        for name, n in counts.items():
            pipe.hincrby(keys.METRICS, name, n)
        pipe.execute()


async def add_async(redis: Any, counts: Mapping[str, int]) -> None:
    counts = {f: n for f, n in counts.items() if n}
    if not counts:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for name, n in counts.items():
            pipe.hincrby(keys.METRICS, name, n)
        await pipe.execute()
