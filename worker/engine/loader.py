"""Finding and loading a model: bundled, a local directory, or s3://.

The hub is never contacted (HF_HUB_OFFLINE is forced): a model either is on
disk or is copied from the operator's own bucket into the cache first.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.catalog import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Any
    processor: Any
    device: Any
    dtype: Any
    max_context: int
    eos_token_ids: list[int]
    pad_token_id: int
    generation_defaults: dict[str, Any]
    # Input modalities ("text", "image", "video", "audio"), from the processor.
    modalities: tuple[str, ...] = ("text",)
    # Set for models whose image embeddings the worker can check: the width
    # the language model takes and the vision grid's merge size (Qwen2-VL).
    embeds_hidden_size: int | None = None
    embeds_merge_size: int | None = None
    # Audio models: the rate the feature extractor takes and its window.
    audio_sampling_rate: int | None = None
    audio_max_seconds: float | None = None

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def resolve_model_path(spec: ModelSpec, cache_dir: Path) -> Path:
    if spec.bundled:
        from worker.engine.tiny import ensure_bundled_model

        return ensure_bundled_model(spec.source, cache_dir)
    if spec.source.startswith("s3://"):
        return download_s3_prefix(spec.source, cache_dir)
    path = Path(spec.source).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model '{spec.name}': {spec.source} is not a model directory (no config.json). "
            "Models load from a local directory or s3://; there is no hub download."
        )
    return path


def download_s3_prefix(url: str, cache_dir: Path) -> Path:
    """Copy every object under an s3:// prefix into the cache (once)."""
    import boto3

    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    target = cache_dir / "s3" / bucket / prefix
    marker = target / ".vlmq-complete"
    if marker.exists():
        return target
    client = boto3.client("s3")
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix) :].lstrip("/")
            if not relative or relative.endswith("/") or ".." in Path(relative).parts:
                continue
            dest = target / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(dest))
    if not (target / "config.json").is_file():
        raise ValueError(f"{url} holds no config.json: not a model")
    marker.touch()
    return target


def load_processor(path: Path) -> Any:
    from transformers import AutoProcessor

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    try:
        processor = AutoProcessor.from_pretrained(path)
        # AutoProcessor quietly falls back to the bare tokenizer when the full processor cannot be built.
        if hasattr(processor, "image_processor") or model_type not in ("qwen2_vl", "qwen2_5_vl"):
            return processor
        reason = f"AutoProcessor gave a {type(processor).__name__}"
    except (ImportError, ValueError, TypeError, OSError) as exc:
        if model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise
        reason = type(exc).__name__
    # Without torchvision (or a video processor config) the stock processor cannot build its video
    # slot: this one takes video frames decoded with PyAV.
    log.info("loading Qwen2-VL's processor with PIL/PyAV video frames (%s)", reason)
    from worker.engine.processors import FramesQwen2VLProcessor

    return FramesQwen2VLProcessor.from_pretrained(path)


def pick_device(requested: str) -> Any:
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: Any) -> Any:
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


def load_model(spec: ModelSpec, *, cache_dir: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForMultimodalLM

    path = resolve_model_path(spec, cache_dir)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    processor = load_processor(path)
    # The multimodal auto class covers image-text-to-text models and audio ones (Qwen2-Audio).
    model = AutoModelForMultimodalLM.from_pretrained(path, dtype=torch_dtype).to(torch_device).eval()

    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.get_text_config().eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = gen.pad_token_id if gen.pad_token_id is not None else processor.tokenizer.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    text_config = model.config.get_text_config()
    defaults = {
        "do_sample": bool(gen.do_sample),
        "temperature": gen.temperature if gen.do_sample else 0.0,
        "top_p": gen.top_p,
        "top_k": gen.top_k,
    }
    log.info("loaded %s from %s on %s (%s)", spec.name, path, torch_device, torch_dtype)
    return LoadedModel(
        name=spec.name,
        path=path,
        model=model,
        processor=processor,
        device=torch_device,
        dtype=torch_dtype,
        max_context=int(getattr(text_config, "max_position_embeddings", 4096)),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
        generation_defaults=defaults,
        **media_capabilities(model.config, processor),
    )


def media_capabilities(config: Any, processor: Any) -> dict[str, Any]:
    """What media the model takes, read from its config and processor."""
    from worker.engine.processors import QwenVideoFrames

    modalities = ["text"]
    found: dict[str, Any] = {}
    if getattr(processor, "image_processor", None) is not None and getattr(config, "vision_config", None):
        modalities.append("image")
        if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
            found["embeds_hidden_size"] = int(config.get_text_config().hidden_size)
            found["embeds_merge_size"] = int(config.vision_config.spatial_merge_size)
    video = getattr(processor, "video_processor", None)
    # Our frames path reproduces Qwen2-VL's video preprocessing; Qwen2.5-VL also needs frame timing.
    if video is not None and not (isinstance(video, QwenVideoFrames) and config.model_type != "qwen2_vl"):
        modalities.append("video")
    extractor = getattr(processor, "feature_extractor", None)
    if extractor is not None and getattr(processor, "audio_token", None):
        modalities.append("audio")
        found["audio_sampling_rate"] = int(extractor.sampling_rate)
        window = getattr(extractor, "n_samples", None)
        found["audio_max_seconds"] = window / extractor.sampling_rate if window else None
    found["modalities"] = tuple(modalities)
    return found
