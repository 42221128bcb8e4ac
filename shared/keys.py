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


def tenant_jobs(tenant: str) -> str:
    """Sorted set of a tenant's job ids by creation time.

    TTL = VLMQ_RESULT_TTL, renewed on every insert; members older than that
    are trimmed on insert, so the set never outlives the jobs it indexes.
    """
    return f"{PREFIX}:tenant:{tenant}:jobs"


def worker(name: str) -> str:
    """String: one live worker's heartbeat (models it serves). TTL = heartbeat TTL."""
    return f"{PREFIX}:worker:{name}"


WORKERS_PATTERN = f"{PREFIX}:worker:*"
