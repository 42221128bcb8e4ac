from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field

from shared.catalog import ModelSpec
from shared.settings import SharedSettings


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
    # auto: continuous batching for the Qwen2-VL family, micro-batched
    # `generate` for every other model; or force `continuous` / `batch`.
    engine: str = Field(default="auto", pattern="^(auto|continuous|batch)$")
    batch_window_ms: float = Field(default=5.0, ge=0)
    max_batch_size: int = Field(default=64, ge=1)
    # Longest prompt + output one request may use (0: the model's limit, capped at 4096).
    max_model_len: int = Field(default=0, ge=0)
    gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    cuda_graphs: bool = True
    default_max_tokens: int = Field(default=256, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    media_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    image_fetch_timeout: float = Field(default=5.0, gt=0)
    max_image_pixels: int = Field(default=40_000_000, ge=1)

    @property
    def served_model(self) -> ModelSpec:
        specs = self.models
        if not self.worker_model:
            return specs[0]
        for spec in specs:
            if spec.name == self.worker_model:
                return spec
        raise ValueError(f"VLMQ_WORKER_MODEL={self.worker_model!r} is not one of VLMQ_MODEL's models")
