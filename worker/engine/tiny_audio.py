"""The bundled tiny audio model: Qwen2-Audio architecture, built offline.

Made like the tiny Qwen2-VL (see `tiny.py`): a byte-level BPE tokenizer
trained on a generated corpus, Whisper's feature extractor with settings
written here (32 mel bins, a 4-second window), Qwen2-Audio's chat template
and a few thousand seeded weights, taught for a few seconds to say whether
a sound is a high or a low tone. It runs the worker's whole audio path
(decode, resample, features, audio tokens, generate) for real.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from shared.catalog import TINY_AUDIO_MODEL_NAME
from worker.engine.tiny import _WORDS, _train_tokenizer, ensure_built, initialize_and_teach, publish, staging_dir

TINY_AUDIO_MODEL_VERSION = "1"
SAMPLING_RATE = 16_000
WINDOW_SECONDS = 4
# Twice Whisper's hop: 50 audio tokens for a full window keeps the tiny model fast.
HOP = 320

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_bos|>",
    "<|AUDIO|>",
    "<|audio_eos|>",
]

# Qwen2-Audio's own template, in the content-part form transformers passes to it.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = [*_WORDS, "high", "low", "tone", "pitch", "hear", "loud", "quiet"]
QUESTIONS = ["What do you hear?", "Is this a high or a low tone?", "Describe the sound.", "What is this audio?"]
LOW_HZ, HIGH_HZ = (110.0, 420.0), (1500.0, 4000.0)


def tone(frequency: float, seconds: float, *, amplitude: float = 0.5, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A sine tone at SAMPLING_RATE, float32 in [-1, 1]."""
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    wave = amplitude * np.sin(2 * math.pi * frequency * t)
    if noise:
        wave = wave + np.random.default_rng(seed).normal(0.0, noise, wave.shape)
    return np.clip(wave, -1, 1).astype(np.float32)


def _sample(rng: random.Random) -> tuple[np.ndarray, str, str]:
    high = rng.random() < 0.5
    low_hz, high_hz = HIGH_HZ if high else LOW_HZ
    audio = tone(
        math.exp(rng.uniform(math.log(low_hz), math.log(high_hz))),
        rng.uniform(0.3, WINDOW_SECONDS),
        amplitude=rng.uniform(0.1, 0.8),
        noise=rng.uniform(0.0, 0.05),
        seed=rng.randrange(1 << 30),
    )
    return audio, rng.choice(QUESTIONS), f"The sound is a {'high' if high else 'low'} tone."


def _teach(model, processor, seed: int, steps: int = 120, batch: int = 8, pool: int = 96) -> None:
    """A few seconds of training so the answer depends on the sound's pitch.

    Features are computed once for a pool of examples (the mel transform is
    the slow part) and batches are drawn from it.
    """
    import torch

    rng = random.Random(seed)
    audios, texts, answer_lens = [], [], []
    for _ in range(pool):
        audio, question, answer = _sample(rng)
        msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        audios.append(audio)
        texts.append(prompt + answer + "<|im_end|>")
        # The prompt ends in a newline, a pre-token boundary: the answer tokenizes on its own.
        answer_lens.append(len(processor.tokenizer(answer + "<|im_end|>")["input_ids"]))
    processor.tokenizer.padding_side = "right"
    enc = processor(text=texts, audio=audios, sampling_rate=SAMPLING_RATE, return_tensors="pt", padding=True)
    processor.tokenizer.padding_side = "left"
    labels = torch.full_like(enc["input_ids"], -100)
    lengths = enc["attention_mask"].sum(-1).tolist()
    for row, (n, k) in enumerate(zip(lengths, answer_lens, strict=True)):
        labels[row, n - k : n] = enc["input_ids"][row, n - k : n]

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randperm(pool, generator=generator)[:batch]
        chosen = {key: value[rows] for key, value in enc.items()}
        loss = model(**chosen, labels=labels[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def build_tiny_audio_model(target: Path, seed: int = 0) -> Path:
    """Build the tiny audio model into `target` (atomically, like the tiny Qwen2-VL)."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    target, staging = Path(target), staging_dir(target)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(seed, SPECIAL_TOKENS, WORDS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids: dict[str, int] = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}  # type: ignore[arg-type]

    mel_bins = 32
    extractor = WhisperFeatureExtractor(
        feature_size=mel_bins,
        sampling_rate=SAMPLING_RATE,
        hop_length=HOP,
        chunk_length=WINDOW_SECONDS,
        n_fft=400,
        return_attention_mask=True,
    )
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)

    hidden = 64
    frames = WINDOW_SECONDS * SAMPLING_RATE // HOP
    config = Qwen2AudioConfig(
        audio_config={
            "d_model": 32,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "encoder_layers": 1,
            "num_mel_bins": mel_bins,
            "max_source_positions": frames // 2,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": True,
        },
        audio_token_index=ids["<|AUDIO|>"],
    )
    model = initialize_and_teach(Qwen2AudioForConditionalGeneration, config, processor, ids, seed, _teach)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    marker = {"name": TINY_AUDIO_MODEL_NAME, "version": TINY_AUDIO_MODEL_VERSION}
    (staging / "vlmq.json").write_text(json.dumps(marker))
    return publish(staging, target)


def ensure_tiny_audio_model(cache_dir: Path) -> Path:
    return ensure_built(cache_dir, TINY_AUDIO_MODEL_NAME, TINY_AUDIO_MODEL_VERSION, build_tiny_audio_model)
