"""Video, audio and image embeddings through the preparer and the model, on the tiny models."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from shared.schemas import JobCreate
from worker.engine.batcher import collate
from worker.engine.mm_embeds import with_image_embeds
from worker.engine.prepare import Preparer
from worker.engine.processors import QwenVideoFrames
from worker.engine.tiny_audio import tone
from worker.media.audio import DecodedAudio
from worker.media.embeds import ImageEmbeds
from worker.media.video import DecodedVideo

RED, BLUE, GREEN = (220, 30, 30), (30, 60, 220), (30, 180, 40)


def request(*parts, max_tokens=12) -> JobCreate:
    content = []
    for part in parts:
        if part == "image":
            content.append({"type": "image_url", "image_url": {"url": "data:,"}})
        elif part == "video":
            content.append({"type": "video_url", "video_url": {"url": "data:,"}})
        elif part == "audio":
            content.append({"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}})
        elif part == "embeds":
            content.append({"type": "image_embeds", "image_embeds": "AA=="})
        else:
            content.append({"type": "text", "text": part})
    return JobCreate.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    )


def video_of(color, frames=4, size=(80, 60)) -> DecodedVideo:
    array = np.zeros((frames, size[1], size[0], 3), np.uint8)
    array[...] = color
    return DecodedVideo(array, 2.0, frames / 2.0, frames, list(range(frames)))


def greedy(model, inputs, max_new_tokens=12) -> list[int]:
    with torch.inference_mode():
        out = model.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.pad_token_id
        )
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def text_of(model, tokens) -> str:
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


# --- video -------------------------------------------------------------------------


def reference_patchify():
    """Qwen2VLVideoProcessor.patchify, taken from transformers' source (the module itself needs torchvision)."""
    source = Path(transformers.__file__).parent / "models/qwen2_vl/video_processing_qwen2_vl.py"
    tree = ast.parse(source.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    func = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    module = ast.Module(body=[func], type_ignores=[])
    scope: dict = {"torch": torch}
    exec(compile(module, str(source), "exec"), scope)
    return scope["patchify"]


def test_video_patches_match_transformers_qwen2_vl_video_processor(tiny):
    frames_processor = tiny.processor.video_processor
    assert isinstance(frames_processor, QwenVideoFrames)
    rng = np.random.default_rng(0)
    for frames in (4, 5):  # an odd count is padded with the last frame, as upstream does
        video = rng.standard_normal((frames, 3, 56, 84)).astype(np.float32)
        ours, grid = frames_processor.patchify(video)
        theirs, *their_grid = reference_patchify()(None, torch.from_numpy(video)[None], 14, 2, 2)
        assert grid == tuple(their_grid)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(ours)), theirs[0])


def test_a_still_video_is_preprocessed_like_the_image(tiny):
    image = Image.new("RGB", (80, 60), RED)
    image.putpixel((3, 3), BLUE)
    frames_processor = QwenVideoFrames(tiny.processor.image_processor, size=dict(tiny.processor.image_processor.size))
    video = frames_processor([np.stack([np.asarray(image)] * 2)])
    pictures = tiny.processor.image_processor(images=[image], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == pictures["image_grid_thw"].tolist()
    assert torch.allclose(video["pixel_values_videos"], pictures["pixel_values"], atol=1e-6)


def test_video_requests_answer_from_the_frames(tiny):
    preparer = Preparer(tiny, 16)
    answers = {}
    for name, color in (("red", RED), ("blue", BLUE)):
        prepared = preparer.prepare(request("video", "What color is this image?"), [video_of(color, 8)])
        assert prepared.inputs["video_grid_thw"].tolist() == [[4, 4, 6]]
        answers[name] = text_of(tiny, greedy(tiny, prepared.inputs)[0])
    assert answers == {"red": "The image is mostly red.", "blue": "The image is mostly blue."}


def test_videos_and_images_batch_with_other_requests(tiny):
    preparer = Preparer(tiny, 16)
    prepared = [
        preparer.prepare(request("video", "What color is this image?"), [video_of(GREEN, 6)]),
        preparer.prepare(request("image", "What color is this image?"), [Image.new("RGB", (50, 70), BLUE)]),
        preparer.prepare(request("Tell me about the sea"), []),
        preparer.prepare(request("video", "What color is this image?"), [video_of(RED, 3, (40, 90))]),
    ]
    alone = [greedy(tiny, p.inputs)[0] for p in prepared]
    together = greedy(tiny, collate(prepared, tiny.pad_token_id, tiny.device))
    for row, tokens in enumerate(alone):
        assert together[row][: len(tokens)] == tokens
    assert text_of(tiny, alone[0]) == "The image is mostly green."
    assert text_of(tiny, alone[3]) == "The image is mostly red."


def test_images_stay_in_their_place(tiny):
    preparer = Preparer(tiny, 16)
    images = [Image.new("RGB", (56, 56), RED), Image.new("RGB", (112, 56), BLUE)]
    prepared = preparer.prepare(request("first", "image", "then", "image", "end"), images)
    ids = prepared.inputs["input_ids"][0].tolist()
    image_token = tiny.model.config.image_token_id
    runs = [len(run) for run in "".join("x" if t == image_token else " " for t in ids).split()]
    assert runs == [4, 8]  # the 56x56 image first, then the 112x56 one


# --- image embeddings -----------------------------------------------------------------


def vision_embeds(tiny, image) -> ImageEmbeds:
    pixels = tiny.processor.image_processor(images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = tiny.model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"], return_dict=True)
    return ImageEmbeds(embeds=out.pooler_output[0], grid_thw=pixels["image_grid_thw"])


def test_vision_tower_output_as_embeds_gives_the_same_tokens_as_the_image(tiny):
    preparer = Preparer(tiny, 16)
    images = [Image.new("RGB", size, color) for size, color in (((90, 60), BLUE), ((40, 120), GREEN))]
    from_pixels = [preparer.prepare(request("image", "What color is this image?"), [im]) for im in images]
    from_embeds = [
        preparer.prepare(request("embeds", "What color is this image?"), [vision_embeds(tiny, im)]) for im in images
    ]
    for pixels, embeds in zip(from_pixels, from_embeds, strict=True):
        assert set(embeds.inputs) == {
            "input_ids",
            "attention_mask",
            "mm_token_type_ids",
            "image_embeds",
            "image_grid_thw",
        }
        assert torch.equal(pixels.inputs["input_ids"], embeds.inputs["input_ids"])
        assert torch.equal(pixels.inputs["mm_token_type_ids"], embeds.inputs["mm_token_type_ids"])
    expected = [greedy(tiny, p.inputs)[0] for p in from_pixels]
    assert [text_of(tiny, t) for t in expected] == ["The image is mostly blue.", "The image is mostly green."]

    alone = [greedy(tiny, with_image_embeds(dict(p.inputs)))[0] for p in from_embeds]
    assert alone == expected
    # Left-padded together with a text-only request, as the engine batches them.
    text_only = preparer.prepare(request("Tell me about the sea"), [])
    batch = with_image_embeds(collate([*from_embeds, text_only], tiny.pad_token_id, tiny.device))
    together = greedy(tiny, batch)
    for row, tokens in enumerate(expected):
        assert together[row][: len(tokens)] == tokens


def test_embeds_and_pixels_cannot_share_a_batch(tiny):
    preparer = Preparer(tiny, 16)
    image = Image.new("RGB", (56, 56), RED)
    batch = collate(
        [
            preparer.prepare(request("image", "x"), [image]),
            preparer.prepare(request("embeds", "x"), [vision_embeds(tiny, image)]),
        ],
        tiny.pad_token_id,
        tiny.device,
    )
    with pytest.raises(ValueError):
        with_image_embeds(batch)


# --- audio -------------------------------------------------------------------------------


def audio_of(freq, seconds) -> DecodedAudio:
    return DecodedAudio(tone(freq, seconds, amplitude=0.4), 16_000)


def test_audio_requests_answer_from_the_sound(tiny_audio):
    assert tiny_audio.modalities == ("text", "audio")
    assert tiny_audio.audio_sampling_rate == 16_000 and tiny_audio.audio_max_seconds == 4.0
    preparer = Preparer(tiny_audio, 16)
    prepared = [
        preparer.prepare(request("audio", "What do you hear?"), [audio_of(freq, seconds)])
        for freq, seconds in ((200, 1.0), (2500, 2.5), (300, 3.5))
    ]
    assert {tuple(p.inputs["input_features"].shape) for p in prepared} == {(1, 32, 200)}
    alone = [greedy(tiny_audio, p.inputs)[0] for p in prepared]
    assert [text_of(tiny_audio, t) for t in alone] == [
        "The sound is a low tone.",
        "The sound is a high tone.",
        "The sound is a low tone.",
    ]
    together = greedy(tiny_audio, collate(prepared, tiny_audio.pad_token_id, tiny_audio.device))
    for row, tokens in enumerate(alone):
        assert together[row][: len(tokens)] == tokens


def test_models_refuse_modalities_they_lack(tiny, tiny_audio):
    from shared.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as err:
        Preparer(tiny_audio, 16).prepare(request("image", "x"), [Image.new("RGB", (8, 8))])
    assert err.value.code == "unsupported_modality"
    with pytest.raises(InvalidRequestError):
        Preparer(tiny, 16).prepare(request("audio", "x"), [audio_of(200, 1.0)])
