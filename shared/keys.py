"""Every Redis key and channel vlmq uses, in one place.

Keys that hold data carry a TTL; the reason is given beside each one.
"""

from __future__ import annotations

PREFIX = "vlmq"


def job(job_id: str) -> str:
    """Hash: the job record. TTL = VLMQ_RESULT_TTL, renewed on every transition."""
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    """Pub/sub channel for a job's status changes (channels store nothing, so no TTL)."""
    return f"{PREFIX}:job-events:{job_id}"


JOB_EVENTS_PATTERN = f"{PREFIX}:job-events:*"


def job_id_from_events_channel(channel: str) -> str:
    return channel.rsplit(":", 1)[-1]


def queued(queue: str) -> str:
    """Sorted set of the queued job ids of one model queue, in the order workers take them.

    Only for `progress.queue_position` (ZRANK); Celery's own lists stay the
    source of truth for what runs. Members leave on the transition out of
    `queued` (the job store's script does it); TTL = VLMQ_RESULT_TTL,
    renewed on every insert, so a queue nobody submits to any more goes away.
    """
    return f"{PREFIX}:queued:{queue}"


def idempotency(tenant: str, key_digest: str) -> str:
    """String `body-digest job-id` for one tenant's Idempotency-Key. TTL = VLMQ_RESULT_TTL, like its job."""
    return f"{PREFIX}:idem:{tenant}:{key_digest}"


def job_deliveries(job_id: str) -> str:
    """List of a job's webhook delivery ids. TTL = VLMQ_RESULT_TTL, renewed with each new delivery."""
    return f"{PREFIX}:job-deliveries:{job_id}"


def delivery(delivery_id: str) -> str:
    """Hash: one webhook message (event, url, body, state). TTL = VLMQ_RESULT_TTL, renewed on each attempt."""
    return f"{PREFIX}:delivery:{delivery_id}"


def delivery_attempts(delivery_id: str) -> str:
    """List of one delivery's attempts, oldest first. TTL = VLMQ_RESULT_TTL, renewed on each attempt."""
    return f"{PREFIX}:delivery-attempts:{delivery_id}"


# Sorted set of delivery ids by when their next attempt is due. No TTL: it is
# a live schedule, and each member leaves when its delivery ends (or is
# dropped by the pump when its delivery hash has expired).
WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"


def tenant_jobs(tenant: str) -> str:
    """Sorted set of a tenant's job ids by creation time.

    TTL = VLMQ_RESULT_TTL, renewed on every insert; members older than that
    are trimmed on insert, so the set never outlives the jobs it indexes.
    """
    return f"{PREFIX}:tenant:{tenant}:jobs"


def tenant_active(tenant: str) -> str:
    """Sorted set of a tenant's unfinished (queued or running) job ids by creation time: its quota.

    Members leave on the transition to a terminal status (the job store's
    script does it); TTL = VLMQ_RESULT_TTL, renewed on every insert, and
    members older than that are trimmed on insert, so a job whose record
    expired unfinished stops counting.
    """
    return f"{PREFIX}:tenant:{tenant}:active"


def rate_limit(tenant: str) -> str:
    """String: the tenant's request-rate bucket (api_gateway.limits). TTL = until the bucket is full again."""
    return f"{PREFIX}:rate:{tenant}"


# Sorted set of the ids of jobs marked running, by when they started: what the
# reaper walks to find jobs whose worker died. No TTL: members leave on the
# transition out of `running`, and the reaper drops ids whose record is gone.
RUNNING = f"{PREFIX}:running"


def worker(name: str) -> str:
    """String: one live worker's heartbeat (models it serves). TTL = heartbeat TTL."""
    return f"{PREFIX}:worker:{name}"


WORKERS_PATTERN = f"{PREFIX}:worker:*"


# --- the media cache (shared tier) ---------------------------------------------


def media(tenant: str, uuid_digest: str) -> str:
    """Hash: one tenant's media item named by its uuid (sha256 of the uuid, so any
    uuid makes a bounded, safe key). Fields: uuid, kind, sha256, size, format,
    stored_at, data. TTL = VLMQ_MEDIA_CACHE_TTL, renewed on every use (sliding).
    The tenant is part of the name, so no lookup can ever reach another tenant's entry.
    """
    return f"{PREFIX}:media:{tenant}:{uuid_digest}"


# Sorted set of media keys by last use (Redis server time). No TTL: it is the
# live LRU index that enforces VLMQ_MEDIA_CACHE_MAX_BYTES (the broker's Redis
# runs `noeviction`); members leave when evicted, deleted, or found expired.
MEDIA_INDEX = f"{PREFIX}:media-index"
# Hash media key -> stored bytes, and the running total, beside the index. No
# TTL, for the same reason; each entry's size leaves with its index member.
MEDIA_SIZES = f"{PREFIX}:media-sizes"
MEDIA_BYTES = f"{PREFIX}:media-bytes"


def media_fetch_reply(request_id: str) -> str:
    """List: a worker's answer to one `POST /v1/media` URL fetch, popped by the waiting gateway. TTL 120 s."""
    return f"{PREFIX}:media-fetch:{request_id}"


# Hash of monotonic counters (`name\tlabel=value…` -> count) that every
# process adds to and `GET /metrics` reads. No TTL: a fixed, small set of
# fields whose whole point is to outlive the processes that count them.
METRICS = f"{PREFIX}:metrics"
