from __future__ import annotations

from pydantic import Field, field_validator

from shared.settings import CommaList, SharedSettings, split_commas


class GatewaySettings(SharedSettings):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # `tenant:key` pairs; a tenant may hold several keys (rotation).
    api_keys: CommaList = []
    # Longest a client may hold a request open waiting for a job (`?wait=`,
    # `Prefer: wait=`); the synchronous chat endpoint waits up to sync_timeout.
    max_wait_seconds: float = Field(default=60.0, gt=0)
    sync_timeout: float = Field(default=600.0, gt=0)
    # Seconds a job may wait in the queue when it sets no ttl_seconds; 0 = forever.
    default_job_ttl: int = Field(default=0, ge=0)

    # How long `POST /v1/media` with a URL waits for a worker to fetch and store it.
    media_fetch_wait: float = Field(default=30.0, gt=0)
    # Per tenant, over all gateway processes (kept in Redis): requests per second
    # on /v1 routes, and how many may come at once; 0 turns the limit off.
    rate_limit: float = Field(default=100.0, ge=0)
    rate_limit_burst: int = Field(default=200, ge=1)
    # Most unfinished (queued or running) jobs per tenant; 0 = no limit.
    max_queued_jobs: int = Field(default=10_000, ge=0)
    # Largest request body; inline media (data: URLs) counts, so keep it above VLMQ_MEDIA_MAX_BYTES * 4/3.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)

    _split_keys = field_validator("api_keys", mode="before")(split_commas)
