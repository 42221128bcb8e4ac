"""What the engine consumes and produces, independent of how it batches."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def batch_key(self) -> tuple[Any, ...]:
        """Requests that may share one `generate` call."""
        eos = (self.min_tokens, self.ignore_eos)
        if self.greedy:
            return ("greedy", *eos)
        return ("sample", self.temperature, self.top_p, self.top_k, self.seed, *eos)


@dataclass(eq=False)
class PreparedRequest:
    """A tokenized prompt with its preprocessed pixels, ready for the model.

    `inputs` holds the processor's tensors for one request: input_ids,
    attention_mask and mm_token_type_ids of shape (1, L), and for images
    pixel_values (patches, dim) and image_grid_thw (images, 3).
    """

    inputs: dict[str, Any]
    params: SamplingParams
    request_id: str = ""
    # Set by anyone (a cancel watcher, a shutdown): the engine stops the
    # request at its next decode step and returns the partial text.
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Wall-clock time (time.time()) after which the engine stops it the same way.
    deadline: float | None = None
    # Tokens generated so far, updated by the engine as it decodes.
    progress: int = 0
    # Cache identity of each media item, per modality, in prompt order ({"image": [key, None]}):
    # the engine reuses a cached encoder output for a key instead of running the vision tower.
    # Keys are namespaced by whoever builds them (tenant, model, processor settings).
    media_keys: dict[str, list[str | None]] = field(default_factory=dict)
    # The media keys whose encoder output the engine took from its cache (filled by the engine).
    encoder_hits: set[str] = field(default_factory=set)

    def should_stop(self) -> str | None:
        if self.cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and time.time() > self.deadline:
            return "deadline"
        return None

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length | cancelled | deadline
    prompt_tokens: int
    batch_id: str
    batch_size: int
    inference_ms: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


EngineFuture = Future  # resolves to a Generation
