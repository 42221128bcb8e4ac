"""Settings both services read from the environment (prefix `VLMQ_`).

Each service has its own class (`api_gateway.config.GatewaySettings`,
`worker.config.WorkerSettings`) built at start-up from this base; nothing is
read at import time. Lists are comma-separated, as people write them in a
shell or a compose file.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.catalog import TINY_MODEL_NAME, ModelSpec, parse_model_specs

CommaList = Annotated[list[str], NoDecode]


def split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class SharedSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLMQ_", extra="ignore", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Comma-separated model entries: a bundled name, a local directory,
    # `s3://bucket/prefix`, or `name=source` to choose the public name.
    model: str = TINY_MODEL_NAME
    result_ttl: int = Field(default=7 * 24 * 3600, ge=60)
    allowed_media_domains: CommaList = []
    media_allow_private_networks: bool = False
    # Celery's Redis visibility timeout: an unacked job is handed to another
    # worker after this long, so it must exceed the longest job.
    visibility_timeout: int = Field(default=3600, ge=60)
    heartbeat_seconds: float = Field(default=5.0, gt=0)

    _split = field_validator("allowed_media_domains", mode="before")(split_commas)

    @property
    def models(self) -> list[ModelSpec]:
        return parse_model_specs(self.model)
