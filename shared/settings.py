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
    # How long a job's record, result and webhook deliveries are kept after
    # their last change; then GET answers 404. (Seconds; tests use a few.)
    result_ttl: int = Field(default=7 * 24 * 3600, ge=1)
    allowed_media_domains: CommaList = []
    media_allow_private_networks: bool = False
    # Celery's Redis visibility timeout: an unacked job is handed to another
    # worker after this long, so it must exceed the longest job. (A job found
    # still running on a live worker is not run twice, so a short value costs
    # only re-checks; tests use a few seconds to prove redelivery.)
    visibility_timeout: int = Field(default=3600, ge=1)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # `tenant:whsec_<base64>` pairs; several for one tenant sign side by side (rotation).
    webhook_secrets: CommaList = []
    webhook_timeout: float = Field(default=10.0, gt=0)

    _split = field_validator("allowed_media_domains", "webhook_secrets", mode="before")(split_commas)

    @field_validator("webhook_secrets")
    @classmethod
    def _valid_secrets(cls, value: list[str]) -> list[str]:
        from shared.webhooks import parse_tenant_secrets

        parse_tenant_secrets(value)
        return value

    @property
    def tenant_webhook_keys(self) -> dict[str, list[bytes]]:
        from shared.webhooks import parse_tenant_secrets

        return parse_tenant_secrets(self.webhook_secrets)

    @property
    def webhook_lease(self) -> float:
        """How long a claimed delivery attempt may take before another webhook worker may retry it."""
        return self.webhook_timeout + 30.0

    @property
    def models(self) -> list[ModelSpec]:
        return parse_model_specs(self.model)
