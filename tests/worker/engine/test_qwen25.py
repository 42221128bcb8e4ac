"""The continuous engine on a Qwen2.5-VL checkpoint (window attention in the vision tower)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from shared.catalog import ModelSpec
from tests.worker.engine.test_batcher import COLORS, reference, request
from worker.engine.continuous import ContinuousEngine
from worker.engine.loader import load_model
from worker.engine.prepare import Preparer


@pytest.fixture(scope="module")
def qwen25(tiny, tmp_path_factory):
    """A small random Qwen2.5-VL built on the tiny model's tokenizer and processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {k: getattr(tiny.model.config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id")}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": tiny.model.config.get_text_config().vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "eos_token_id": tiny.eos_token_ids[0],
            "pad_token_id": tiny.pad_token_id,
        },
        vision_config={
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "window_size": 56,
            "fullatt_block_indexes": [1, 3],
        },
        vision_end_token_id=tiny.model.config.vision_end_token_id,
        tie_word_embeddings=True,
        **ids,
    )
    torch.manual_seed(1)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.generation_config.eos_token_id = tiny.eos_token_ids[0]
    model.generation_config.pad_token_id = tiny.pad_token_id
    model.generation_config.do_sample = False
    path = tmp_path_factory.mktemp("qwen25")
    model.save_pretrained(path)
    tiny.processor.save_pretrained(path)
    return load_model(ModelSpec("q25", str(path)), cache_dir=path, device="cpu", dtype="float32")


def test_continuous_engine_matches_generate_on_qwen2_5_vl(qwen25):
    engine = ContinuousEngine(qwen25, max_batch_size=4).start()
    try:
        preparer = Preparer(qwen25, 12)
        prepared = [
            preparer.prepare(request("What color is this image?", 1), [Image.new("RGB", (112, 84), COLORS[0])]),
            preparer.prepare(request("Describe the image.", 2), [Image.new("RGB", (56, 56), c) for c in COLORS[1:3]]),
            preparer.prepare(request("Tell me about the sea", 0), []),
        ]
        results = [f.result(timeout=60) for f in [engine.submit(p) for p in prepared]]
    finally:
        engine.stop()
    for p, r in zip(prepared, results, strict=True):
        assert r.token_ids == reference(qwen25, p)
        assert r.completion_tokens > 0
