"""Which models vlmq serves, and the queue each one's jobs go to."""

from __future__ import annotations

import re
from dataclasses import dataclass

TINY_MODEL_NAME = "vlmq-tiny-qwen2-vl"
BUNDLED_MODELS = frozenset({TINY_MODEL_NAME})

_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # a bundled name, a local directory or an s3:// prefix

    @property
    def bundled(self) -> bool:
        return self.source in BUNDLED_MODELS

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
