from __future__ import annotations

import copy

import torch
from PIL import Image

from worker.engine import vision


def test_batched_vision_attention_equals_per_image_attention(tiny):
    processor = tiny.processor.image_processor
    sizes = [(56, 56), (56, 56), (84, 56), (56, 56), (112, 140), (112, 140)]
    batch = processor(
        images=[Image.new("RGB", s, (i * 40, 90, 200 - i * 30)) for i, s in enumerate(sizes)], return_tensors="pt"
    )
    stock = tiny.model.model.visual
    patched = copy.deepcopy(stock)
    assert vision.install(patched) == len(patched.blocks)
    with torch.inference_mode():
        expected = stock(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        got = patched(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
