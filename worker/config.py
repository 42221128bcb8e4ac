from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from shared.catalog import ModelSpec
from shared.settings import SharedSettings, split_commas

RGB = Annotated[tuple[int, int, int], NoDecode]


def parse_rgb(value: object) -> object:
    """`255,255,255` as people write it in an environment variable."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip("()[] ").split(",")]
        if len(parts) != 3 or not all(p.isdigit() and int(p) <= 255 for p in parts):
            raise ValueError("expected R,G,B with each value 0-255")
        return tuple(int(p) for p in parts)
    return value


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlmq" / "models"


class WorkerSettings(SharedSettings):
    # Which of VLMQ_MODEL this process serves (one model per worker process);
    # empty means the first.
    worker_model: str = ""
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Jobs in flight (task threads fetching and preparing media for the engine);
    # 0 = twice VLMQ_MAX_BATCH_SIZE, so the next batch is prepared while one decodes.
    concurrency: int = Field(default=0, ge=0, le=1024)
    model_cache_dir: Path = Field(default_factory=_default_cache_dir)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    # auto: continuous batching for the Qwen2-VL family, micro-batched
    # `generate` for every other model; or force `continuous` / `batch`.
    engine: str = Field(default="auto", pattern="^(auto|continuous|batch)$")
    batch_window_ms: float = Field(default=5.0, ge=0)
    max_batch_size: int = Field(default=64, ge=1)
    # Longest prompt + output one request may use (0: the model's limit, capped at 4096).
    max_model_len: int = Field(default=0, ge=0)
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    # Vision-encoder outputs kept per engine, by media key (uuid or content hash), in bytes.
    encoder_cache_bytes: int = Field(default=1024**3, ge=0)
    # Preprocessed media tensors kept per worker process by content key (the
    # media cache's worker tier): a hit skips fetch, decode and preprocessing.
    media_worker_cache_bytes: int = Field(default=1024**3, ge=0)
    cuda_graphs: bool = True
    default_max_tokens: int = Field(default=256, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    # After SIGTERM, seconds to let jobs in flight finish before handing the rest back
    # to the queue; keep the supervisor's kill timeout (compose stop_grace_period) above it.
    shutdown_grace: float = Field(default=60.0, ge=0)
    # --- media: fetching (worker.media.fetch) ---
    media_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)  # images, audio, embeddings
    video_max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    image_fetch_timeout: float = Field(default=5.0, gt=0)
    video_fetch_timeout: float = Field(default=30.0, gt=0)
    audio_fetch_timeout: float = Field(default=10.0, gt=0)
    # Extra tries, with backoff, after a transient failure (timeout, reset, 5xx).
    media_fetch_retries: int = Field(default=2, ge=0, le=10)
    # Off: a redirect fails the fetch. On: at most 5 hops, each re-checked.
    media_allow_redirects: bool = False
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    # --- media: decoding (worker.media.image / video / audio / embeds) ---
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    rgba_background: RGB = (255, 255, 255)
    video_num_frames: int = Field(default=32, ge=1)
    video_max_duration: float = Field(default=600.0, gt=0)
    video_decode_timeout: float = Field(default=30.0, gt=0)
    audio_max_duration: float = Field(default=30.0, gt=0)

    _rgb = field_validator("rgba_background", mode="before")(parse_rgb)
    # How often a running job's `progress.tokens_generated` is written to its record.
    progress_seconds: float = Field(default=1.0, gt=0)

    @property
    def task_threads(self) -> int:
        return self.concurrency or 2 * self.max_batch_size

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
