"""Chat request + decoded media -> a PreparedRequest, on the task's thread.

Templating, tokenizing and pixel preprocessing run here, in parallel across
task threads, so the engine thread only ever runs the model.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidRequestError
from shared.schemas import ImageEmbedsPart, JobCreate, MediaPart, TextPart
from worker.engine.loader import LoadedModel
from worker.engine.request import PreparedRequest, SamplingParams

_ROLES = {"developer": "system"}
# How each modality stands in a chat template's content parts.
_TEMPLATE_TYPES = {"image": "image", "video": "video", "audio": "audio"}


def hf_messages(request: JobCreate) -> list[dict[str, Any]]:
    """OpenAI messages -> the content-part form HF chat templates take (media in place)."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        role = _ROLES.get(message.role, message.role)
        if isinstance(message.content, str) or message.content is None:
            out.append({"role": role, "content": message.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append({"type": _TEMPLATE_TYPES[part.modality]})
        out.append({"role": role, "content": parts})
    return out


def sampling_params(request: JobCreate, model: LoadedModel, default_max_tokens: int) -> SamplingParams:
    defaults = model.generation_defaults
    temperature = request.temperature if request.temperature is not None else defaults["temperature"]
    top_p = request.top_p if request.top_p is not None else (defaults["top_p"] or 1.0)
    top_k = request.top_k if request.top_k is not None else defaults["top_k"]
    max_new_tokens = request.max_new_tokens or default_max_tokens
    if request.min_tokens > max_new_tokens:
        raise InvalidRequestError(
            f"min_tokens ({request.min_tokens}) exceeds max_tokens ({max_new_tokens}).", param="min_tokens"
        )
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature or 0.0),
        top_p=float(top_p),
        top_k=top_k if temperature and top_k and top_k > 0 else None,
        seed=request.seed,
        stop=tuple(request.stop or ()),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
    )


@dataclass(frozen=True)
class Preprocessed:
    """One image or video as the model's processor made it: its patches and its (1, 3) grid."""

    modality: str
    pixels: Any  # (patches, dim)
    grid: Any  # (1, 3): t, h, w in patches

    @property
    def nbytes(self) -> int:
        return int(self.pixels.numel() * self.pixels.element_size() + self.grid.numel() * self.grid.element_size())


# The processor's output names for each modality's patches and grids.
_PIXEL_KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


class Preparer:
    """Applies the model's chat template and processor; safe to call from many threads.

    With `items` (a `worker.media_cache.ItemCache`), a Qwen2-VL processor's
    images and videos are preprocessed one item at a time and each result is
    kept under its media key, so a later request with the same item skips
    decoding and preprocessing (it hands in the `Preprocessed` item instead).
    Per item or all at once, the processor computes the same tensors: each
    item is resized and patched on its own either way.
    """

    def __init__(self, model: LoadedModel, default_max_tokens: int, items: Any = None) -> None:
        self.model = model
        self.default_max_tokens = default_max_tokens
        # Fast tokenizers are not safe to share across threads, so threads borrow copies
        # from a pool: a few, made on first need (preparing is CPU-bound: more copies than
        # cores would not run any faster, and a copy per task thread costs seconds to make).
        self._copies: queue.LifoQueue[Any] = queue.LifoQueue()
        self._made = 0
        self._max_copies = max(2, min(8, os.cpu_count() or 2))
        self._lock = threading.Lock()
        self.items = items
        self.per_item = _per_item_processor(model.processor)

    @property
    def caches_items(self) -> bool:
        return self.items is not None and self.per_item

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[Any]:
        try:
            processor = self._copies.get_nowait()
        except queue.Empty:
            with self._lock:
                make = self._made < self._max_copies
                self._made += make
            processor = copy.deepcopy(self.model.processor) if make else self._copies.get()
        try:
            yield processor
        finally:
            self._copies.put(processor)

    def prepare(
        self, request: JobCreate, media: list[Any], request_id: str = "", keys: list[str | None] | None = None
    ) -> PreparedRequest:
        """`media` holds one item per media part, in the order of `request.media_parts()`: decoded
        media, or (when `caches_items`) a `Preprocessed` one; `keys` the media key of each."""
        with self._borrow() as processor:
            return self._prepare(processor, request, media, request_id, keys)

    def _prepare(
        self, processor: Any, request: JobCreate, media: list[Any], request_id: str, keys: list[str | None] | None
    ) -> PreparedRequest:
        keys = keys if keys is not None else [None] * len(media)
        parts = [part for _, part in request.media_parts()]
        for param, part in request.media_parts():
            if part.modality not in self.model.modalities:
                raise InvalidRequestError(
                    f"The model '{self.model.name}' does not take {part.modality} input.",
                    param=param,
                    code="unsupported_modality",
                )
        prompt = processor.apply_chat_template(hf_messages(request), add_generation_prompt=True, tokenize=False)
        images = [m for p, m in zip(parts, media, strict=True) if p.modality == "image" and not _embeds(p)]
        embeds = [m for p, m in zip(parts, media, strict=True) if _embeds(p)]
        videos = [m.frames for p, m in zip(parts, media, strict=True) if p.modality == "video"]
        audio = [m.samples for p, m in zip(parts, media, strict=True) if p.modality == "audio"]
        if embeds and images:
            raise InvalidRequestError(
                "A request may carry images or image_embeds, not both.", code="mixed_image_inputs"
            )
        if embeds:
            inputs = self._with_embeds(processor, prompt, embeds, videos)
        elif self.per_item and not audio:
            inputs = self._per_item(processor, prompt, parts, media, keys)
        else:
            kwargs: dict[str, Any] = {"sampling_rate": self.model.audio_sampling_rate} if audio else {}
            try:
                inputs = dict(
                    processor(
                        text=[prompt],
                        images=images or None,
                        videos=videos or None,
                        audio=audio or None,
                        return_tensors="pt",
                        **kwargs,
                    )
                )
            except ValueError as exc:
                # The processor's own input checks (sizes, counts): the request's to fix.
                raise InvalidRequestError(f"The media could not be prepared for this model: {exc}") from None
        params = sampling_params(request, self.model, self.default_max_tokens)
        media_keys: dict[str, list[str | None]] = {}
        for part, key in zip(parts, keys, strict=True):
            if part.modality in _PIXEL_KEYS and not _embeds(part):
                media_keys.setdefault(part.modality, []).append(key)
        prepared = PreparedRequest(inputs=inputs, params=params, request_id=request_id, media_keys=media_keys)
        budget = self.model.max_context
        if prepared.prompt_tokens + params.max_new_tokens > budget:
            raise InvalidRequestError(
                f"This model's maximum context length is {budget} tokens; the prompt has "
                f"{prepared.prompt_tokens} and max_tokens asks for {params.max_new_tokens} more.",
                param="max_tokens" if prepared.prompt_tokens < budget else "messages",
                code="context_length_exceeded",
            )
        return prepared

    def _per_item(
        self, processor: Any, prompt: str, parts: list[MediaPart], media: list[Any], keys: list[str | None]
    ) -> dict[str, Any]:
        """The processor's inputs, built item by item (Qwen2-VL): cached items reused, new ones cached."""
        import torch

        done: dict[str, list[Preprocessed]] = {"image": [], "video": []}
        for part, item, key in zip(parts, media, keys, strict=True):
            if not isinstance(item, Preprocessed):
                try:
                    item = self._preprocess(processor, part.modality, item)
                except ValueError as exc:
                    raise InvalidRequestError(f"The media could not be prepared for this model: {exc}") from None
                if key is not None and self.items is not None:
                    self.items.put(key, item)
            done[item.modality].append(item)
        inputs: dict[str, Any] = {}
        for modality, token in (("image", processor.image_token), ("video", processor.video_token)):
            items = done[modality]
            sub = processor.image_processor if modality == "image" else processor.video_processor
            merge = int(sub.merge_size) ** 2
            prompt = expand_image_slots(prompt, token, [int(i.grid.prod()) // merge for i in items])
            if items:
                pixels_key, grid_key = _PIXEL_KEYS[modality]
                inputs[pixels_key] = torch.cat([i.pixels for i in items])
                inputs[grid_key] = torch.cat([i.grid for i in items])
        text = processor.tokenizer([prompt], return_tensors="pt")
        inputs["input_ids"] = text["input_ids"]
        inputs["attention_mask"] = text["attention_mask"]
        inputs["mm_token_type_ids"] = torch.tensor(processor.create_mm_token_type_ids(text["input_ids"]))
        return inputs

    def _preprocess(self, processor: Any, modality: str, item: Any) -> Preprocessed:
        if modality == "image":
            out = processor.image_processor(images=[item], return_tensors="pt")
        else:
            out = processor.video_processor([item.frames], return_tensors="pt")
        pixels_key, grid_key = _PIXEL_KEYS[modality]
        return Preprocessed(modality, out[pixels_key], out[grid_key])

    def _with_embeds(self, processor: Any, prompt: str, embeds: list[Any], videos: list[Any]) -> dict[str, Any]:
        """Inputs for a request whose images come as embeddings (Qwen2-VL family).

        The processor refuses image tokens without pixels, so the slots are
        expanded here (from each embedding's grid) and the text tokenized
        directly; videos still go through the processor's video path.
        """
        import torch

        inputs: dict[str, Any] = {}
        prompt = expand_image_slots(prompt, processor.image_token, [e.tokens for e in embeds])
        if videos:
            inputs.update(processor.video_processor(videos, return_tensors="pt"))
            merge = processor.video_processor.merge_size**2
            counts = [int(grid.prod()) // merge for grid in inputs["video_grid_thw"]]
            prompt = expand_image_slots(prompt, processor.video_token, counts)
        text = processor.tokenizer([prompt], return_tensors="pt")
        inputs["input_ids"] = text["input_ids"]
        inputs["attention_mask"] = text["attention_mask"]
        inputs["mm_token_type_ids"] = torch.tensor(processor.create_mm_token_type_ids(text["input_ids"]))
        inputs["image_embeds"] = torch.cat([e.embeds for e in embeds]).to(self.model.dtype)
        inputs["image_grid_thw"] = torch.cat([e.grid_thw for e in embeds])
        return inputs


def _per_item_processor(processor: Any) -> bool:
    """Qwen2-VL's processor: images and videos become patches item by item, with no per-request extras
    (Qwen2.5-VL's adds `second_per_grid_ts`, so it keeps the all-at-once path)."""
    from transformers import Qwen2VLProcessor

    return isinstance(processor, Qwen2VLProcessor)


def _embeds(part: MediaPart) -> bool:
    return isinstance(part, ImageEmbedsPart)


def expand_image_slots(prompt: str, image_token: str, tokens: list[int]) -> str:
    """Give each slot of `image_token` in a templated prompt its number of tokens, in order."""
    pieces = prompt.split(image_token)
    if len(pieces) - 1 != len(tokens):
        raise InvalidRequestError(
            f"The prompt has {len(pieces) - 1} media slots for {len(tokens)} items.", code="media_slots"
        )
    out = [pieces[0]]
    for count, piece in zip(tokens, pieces[1:], strict=True):
        out.append(image_token * count + piece)
    return "".join(out)
