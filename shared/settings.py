"""Settings both services read from the environment (prefix `VLMQ_`).

Each service has its own class (`api_gateway.config.GatewaySettings`,
`worker.config.WorkerSettings`) built at start-up from this base; nothing is
read at import time. Lists are comma-separated, as people write them in a
shell or a compose file.

What lives here is what the gateway must know to refuse a request at once
that the worker would refuse later (media sources, limits, embeddings).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.catalog import DEFAULT_MODELS, MEDIA_MODALITIES, ModelSpec, parse_model_specs

CommaList = Annotated[list[str], NoDecode]
ModalityLimits = Annotated[dict[str, int], NoDecode]

DEFAULT_MM_LIMITS = {"image": 4, "video": 1, "audio": 1}


def split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def parse_modality_limits(value: object) -> object:
    """`image=4,video=1` (or a JSON-like dict); unnamed modalities keep their default."""
    if isinstance(value, str):
        pairs: dict[str, object] = {}
        cleaned = value.replace("{", "").replace("}", "").replace('"', "")
        for item in (part.strip() for part in cleaned.split(",") if part.strip()):
            name, sep, number = item.replace(":", "=").partition("=")
            if not sep:
                raise ValueError(f"expected modality=count, got {item!r}")
            pairs[name.strip()] = number.strip()
        value = pairs
    if isinstance(value, dict):
        unknown = set(value) - set(MEDIA_MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; known: {', '.join(MEDIA_MODALITIES)}")
        limits = {**DEFAULT_MM_LIMITS, **{str(k): int(v) for k, v in value.items()}}
        if any(v < 0 for v in limits.values()):
            raise ValueError("modality limits must be >= 0")
        return limits
    return value


def format_modality_limits(limits: dict[str, int]) -> str:
    return ",".join(f"{name}={count}" for name, count in limits.items())


class SharedSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLMQ_", extra="ignore", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    # The Sentinel group to ask for the master when VLMQ_REDIS_URL is `sentinel://…` (shared.redis_conn).
    redis_sentinel_master: str = "mymaster"
    # Comma-separated model entries: a bundled name, a local directory,
    # `s3://bucket/prefix`, or `name=source` to choose the public name.
    model: str = DEFAULT_MODELS
    # How long a job's record, result and webhook deliveries are kept after
    # their last change; then GET answers 404. (Seconds; tests use a few.)
    result_ttl: int = Field(default=7 * 24 * 3600, ge=1)
    # Exact hosts, or `*.example.com` for subdomains. Empty admits any host
    # whose addresses are public (the address rule below still applies).
    allowed_media_domains: CommaList = []
    # Lifts only the address rule (private, loopback, link-local ...), for
    # private deployments and tests; the allow-list still applies.
    media_allow_private_networks: bool = False
    # `file://` media is refused unless this names a directory; only files
    # under it (after resolving symlinks and `..`) are read.
    allowed_local_media_path: str = ""
    # Buckets `s3://` media may name; empty admits any bucket the worker's
    # credentials can read.
    s3_allowed_buckets: CommaList = []
    # Most items per request, per modality (`image=4,video=1,audio=1`).
    limit_mm_per_prompt: ModalityLimits = Field(default_factory=lambda: dict(DEFAULT_MM_LIMITS))
    # Precomputed embeddings go straight into the language model: only for
    # trusted clients, so off unless asked for.
    enable_mm_embeds: bool = False
    # The most frames a client may ask to sample from one video.
    video_max_frames: int = Field(default=64, ge=1, le=1024)
    # Celery's Redis visibility timeout: an unacked job is handed to another
    # worker after this long, so it must exceed the longest job. (A job found
    # still running on a live worker is not run twice, so a short value costs
    # only re-checks; tests use a few seconds to prove redelivery.)
    visibility_timeout: int = Field(default=3600, ge=1)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # `tenant:whsec_<base64>` pairs; several for one tenant sign side by side (rotation).
    webhook_secrets: CommaList = []
    webhook_timeout: float = Field(default=10.0, gt=0)

    # --- the media cache's shared tier (shared.media_cache), in the broker's Redis ---
    # Seconds an entry lives after its last use (every hit renews it).
    media_cache_ttl: int = Field(default=24 * 3600, ge=1)
    # Bytes all tenants' entries may hold together; least recently used go first.
    media_cache_max_bytes: int = Field(default=1024**3, ge=0)
    # Larger items are used but not cached (a later uuid-only reference misses).
    media_cache_max_item_bytes: int = Field(default=32 * 1024**2, ge=1)

    _split = field_validator("allowed_media_domains", "s3_allowed_buckets", "webhook_secrets", mode="before")(
        split_commas
    )
    _limits = field_validator("limit_mm_per_prompt", mode="before")(parse_modality_limits)

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
