"""Which models vlmq serves, and the queue each one's jobs go to."""

from __future__ import annotations

import re
from dataclasses import dataclass

TINY_MODEL_NAME = "vlmq-tiny-qwen2-vl"
TINY_AUDIO_MODEL_NAME = "vlmq-tiny-qwen2-audio"

# The input modalities a model takes. Text is always one of them; the media
# ones are the keys of VLMQ_LIMIT_MM_PER_PROMPT.
TEXT = "text"
IMAGE = "image"
VIDEO = "video"
AUDIO = "audio"
MEDIA_MODALITIES = (IMAGE, VIDEO, AUDIO)

# Bundled models, built offline on first use, and what each one accepts. The
# gateway knows these statically; other models' modalities come from the
# heartbeats of the workers serving them.
BUNDLED_MODELS: dict[str, tuple[str, ...]] = {
    TINY_MODEL_NAME: (TEXT, IMAGE, VIDEO),
    TINY_AUDIO_MODEL_NAME: (TEXT, AUDIO),
}
DEFAULT_MODELS = ",".join(BUNDLED_MODELS)

_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # a bundled name, a local directory or an s3:// prefix

    @property
    def bundled(self) -> bool:
        return self.source in BUNDLED_MODELS

    @property
    def modalities(self) -> tuple[str, ...] | None:
        """Known without loading the model only for bundled ones."""
        return BUNDLED_MODELS.get(self.source)

    @property
    def queue(self) -> str:
        return queue_name(self.name)


def queue_name(model: str) -> str:
    return "vlmq.model." + _NAME_OK.sub("_", model)


def parse_model_specs(value: str) -> list[ModelSpec]:
    specs: list[ModelSpec] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        if "=" in entry:
            name, source = (s.strip() for s in entry.split("=", 1))
        else:
            source = entry
            name = entry if entry in BUNDLED_MODELS else source.rstrip("/").rsplit("/", 1)[-1]
        if not name or not source:
            raise ValueError(f"invalid model entry {entry!r} in VLMQ_MODEL")
        specs.append(ModelSpec(name=name, source=source))
    if not specs:
        raise ValueError("VLMQ_MODEL names no model")
    if len({s.name for s in specs}) != len(specs):
        raise ValueError("VLMQ_MODEL names the same model twice")
    return specs
