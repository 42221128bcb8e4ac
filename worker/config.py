from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from shared.catalog import ModelSpec
from shared.settings import SharedSettings, split_commas


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlmq" / "models"


class WorkerSettings(SharedSettings):
    # Which of VLMQ_MODEL this process serves (one model per worker process);
    # empty means the first.
    worker_model: str = ""
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    concurrency: int = Field(default=8, ge=1, le=256)
    model_cache_dir: Path = Field(default_factory=_default_cache_dir)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    batch_window_ms: float = Field(default=5.0, ge=0)
    max_batch_size: int = Field(default=32, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    media_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    image_fetch_timeout: float = Field(default=5.0, gt=0)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    # How often a running job's `progress.tokens_generated` is written to its record.
    progress_seconds: float = Field(default=1.0, gt=0)

    @property
    def served_model(self) -> ModelSpec:
        specs = self.models
        if not self.worker_model:
            return specs[0]
        for spec in specs:
            if spec.name == self.worker_model:
                return spec
        raise ValueError(f"VLMQ_WORKER_MODEL={self.worker_model!r} is not one of VLMQ_MODEL's models")


class WebhookWorkerSettings(SharedSettings):
    """The webhook worker (`vlmq webhook-worker`): no model, no torch."""

    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Seconds to wait before each retry of a failed delivery; one attempt more than entries.
    webhook_retry_schedule: Annotated[list[float], NoDecode] = [5, 300, 1800, 7200, 18000, 36000, 86400]
    # Lifts the public-address rule for webhook URLs (private deployments, tests).
    webhook_allow_private_networks: bool = False
    webhook_concurrency: int = Field(default=16, ge=1, le=512)
    # How often the pump looks for deliveries whose retry is due.
    webhook_poll_seconds: float = Field(default=1.0, gt=0)

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: object) -> object:
        value = split_commas(value)
        if isinstance(value, list) and any(float(v) < 0 for v in value):
            raise ValueError("VLMQ_WEBHOOK_RETRY_SCHEDULE takes seconds >= 0")
        return value
