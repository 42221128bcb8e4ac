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

    _split_keys = field_validator("api_keys", mode="before")(split_commas)
