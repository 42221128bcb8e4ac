"""The bundled tiny default model: Qwen2-VL architecture, built offline.

Everything is made here from nothing but code: a byte-level BPE tokenizer
trained with the `tokenizers` library on a generated corpus, the PIL image
processor, Qwen2-VL's chat template and a few hundred thousand seeded random
weights. The result is a real Hugging Face checkpoint directory that
`from_pretrained` loads like any hub model, so every code path the worker
uses for real models runs on it too.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from shared.catalog import TINY_AUDIO_MODEL_NAME, TINY_MODEL_NAME

# Bump when the recipe changes so cached builds are rebuilt, not reused.
TINY_MODEL_VERSION = "3"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's own template, in the content-part form transformers passes to it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = [
    "a",
    "an",
    "the",
    "this",
    "that",
    "image",
    "picture",
    "photo",
    "shows",
    "contains",
    "depicts",
    "of",
    "with",
    "and",
    "in",
    "on",
    "at",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "orange",
    "purple",
    "gray",
    "pink",
    "brown",
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "person",
    "people",
    "sky",
    "sea",
    "road",
    "field",
    "city",
    "street",
    "table",
    "cup",
    "book",
    "small",
    "large",
    "bright",
    "dark",
    "one",
    "two",
    "three",
    "four",
    "five",
    "many",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "background",
    "foreground",
    "what",
    "is",
    "color",
    "describe",
    "caption",
    "tag",
    "answer",
    "question",
    "yes",
    "no",
    "there",
    "are",
    "how",
    "it",
    "looks",
    "like",
    "video",
    "frame",
    "audio",
    "sound",
    "speech",
    "music",
    "clip",
    "second",
    "minute",
    "scene",
    "object",
    "objects",
]


def _corpus(seed: int, lines: int = 4000, words: list[str] = _WORDS) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(3, 14)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        out.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
    out.extend(" ".join(w) for w in itertools.permutations(["the", "image", "shows"], 3))
    out.append("0123456789 +-*/=()[]{}<>:;'\"@#$%&_ \n\t")
    return out


def _train_tokenizer(seed: int, special_tokens: list[str] = SPECIAL_TOKENS, words: list[str] = _WORDS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed, words=words), trainer=trainer)
    return tok


COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "orange": (250, 140, 20),
    "purple": (140, 40, 170),
}
QUESTIONS = [
    "What color is this image?",
    "Describe the image.",
    "Caption this picture.",
    "What do you see?",
    "Tag this photo.",
]


def _sample(rng: random.Random):
    """One synthetic example: a noisy mostly-one-colour picture and the answer about it."""
    from PIL import Image, ImageDraw

    name, rgb = rng.choice(list(COLORS.items()))
    w, h = rng.randint(20, 160), rng.randint(20, 160)
    image = Image.new("RGB", (w, h), rgb)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, 3)):
        other = rng.choice(list(COLORS.values()))
        x, y = rng.randrange(w), rng.randrange(h)
        draw.rectangle([x, y, x + w // 5, y + h // 5], fill=other)
    return image, rng.choice(QUESTIONS), f"The image is mostly {name}."


def _teach(model, processor, seed: int, steps: int = 150, batch: int = 8) -> None:
    """A few seconds of training so the model answers with the picture's colour.

    Random weights only ever repeat one token; a model that reads the pixels
    gives a demo worth looking at and outputs that differ per image, which is
    what makes the engine's equality tests meaningful.
    """
    import torch

    rng = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    processor.tokenizer.padding_side = "right"
    for _ in range(steps):
        images, texts, prompt_lens = [], [], []
        for _ in range(batch):
            image, question, answer = _sample(rng)
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            images.append(image)
            texts.append(prompt + answer + "<|im_end|>")
            prompt_lens.append(len(processor(text=[prompt], images=[image])["input_ids"][0]))
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for row, n in enumerate(prompt_lens):
            labels[row, :n] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    processor.tokenizer.padding_side = "left"


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    """Build the tiny model into `target` (atomically: a half-built dir never appears)."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from worker.engine.processors import FramesQwen2VLProcessor, QwenVideoFrames

    target, staging = Path(target), staging_dir(target)

    raw = _train_tokenizer(seed)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids: dict[str, int] = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}  # type: ignore[arg-type]

    # 28 px per merged token: 4..64 image tokens, so a job runs in milliseconds on a CPU.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64},
    )
    # Videos: up to 16 merged tokens per pair of frames, so 32 frames cost 256 tokens.
    video_frames = QwenVideoFrames(image_processor, size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16})
    processor = FramesQwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        video_processor=video_frames,
    )

    hidden = 64
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = initialize_and_teach(Qwen2VLForConditionalGeneration, config, processor, ids, seed, _teach)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    # The flat preprocessor_config.json too: older transformers releases look only there.
    image_processor.save_pretrained(staging)
    # Record the stock processor class, so hosts with torchvision load it with
    # AutoProcessor like any Qwen2-VL checkpoint.
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = staging / name
        saved = json.loads(path.read_text())
        saved["processor_class"] = "Qwen2VLProcessor"
        path.write_text(json.dumps(saved, indent=2))
    (staging / "vlmq.json").write_text(json.dumps({"name": TINY_MODEL_NAME, "version": TINY_MODEL_VERSION}))
    return publish(staging, target)


def initialize_and_teach(
    model_class: Any, config: Any, processor: Any, ids: dict[str, int], seed: int, teach: Any
) -> Any:
    """A bundled model's weights: seeded fan-in init, a few seconds of `teach`, greedy defaults.

    The default init (std 0.02) leaves the residual stream dominated by the
    input embedding, and with tied embeddings greedy decoding then repeats its
    last token forever. Fan-in scaling makes every layer count, so the text
    depends on the prompt and the media, which is what the tests compare.
    """
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    teach(model, processor, seed)
    model.eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    return model


def ensure_built(cache_dir: Path, name: str, version: str, build: Any) -> Path:
    """The cached build of a bundled model, built first if this version is not there yet."""
    target = Path(cache_dir) / f"{name}-v{version}"
    if not (target / "vlmq.json").exists():
        build(target)
    return target


def staging_dir(target: Path) -> Path:
    """A fresh directory beside `target` to build in; `publish` moves it into place."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".building-", dir=Path(target).parent))


def publish(staging: Path, target: Path) -> Path:
    try:
        os.replace(staging, target)
    except OSError:
        # Another process finished first; its build is identical.
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_model(cache_dir: Path) -> Path:
    return ensure_built(cache_dir, TINY_MODEL_NAME, TINY_MODEL_VERSION, build_tiny_model)


def ensure_bundled_model(name: str, cache_dir: Path) -> Path:
    """The directory of a bundled model, built on first use."""
    if name == TINY_AUDIO_MODEL_NAME:
        from worker.engine.tiny_audio import ensure_tiny_audio_model

        return ensure_tiny_audio_model(cache_dir)
    if name == TINY_MODEL_NAME:
        return ensure_tiny_model(cache_dir)
    raise ValueError(f"{name!r} is not a bundled model")
