"""The micro-batching engine against transformers' own generate, on the tiny model."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from shared.schemas import JobCreate
from worker.engine.batcher import BatchingEngine
from worker.engine.prepare import Preparer
from worker.engine.request import SamplingParams

COLORS = [(220, 30, 30), (30, 180, 40), (30, 60, 220), (240, 220, 30), (10, 10, 10), (140, 40, 170)]


def request(text: str, n_images: int, max_tokens: int = 16, **extra) -> JobCreate:
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}] * n_images
    content = [*content, {"type": "text", "text": text}]
    return JobCreate.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
    )


def mixed_requests(preparer: Preparer):
    """Different image sizes, 0-2 images, different prompts and output lengths."""
    specs = [
        ("What color is this image?", [(COLORS[0], (64, 48))], 16),
        ("Describe the image.", [(COLORS[1], (200, 90))], 5),
        ("Tell me a story about the sea and the sky", [], 20),
        ("Caption this picture.", [(COLORS[2], (28, 28)), (COLORS[3], (120, 160))], 12),
        ("Tag this photo.", [(COLORS[4], (300, 40))], 9),
        ("What do you see?", [(COLORS[5], (90, 90))], 16),
    ]
    prepared = []
    for text, images, max_tokens in specs:
        pil = [Image.new("RGB", size, color) for color, size in images]
        prepared.append(preparer.prepare(request(text, len(pil), max_tokens), pil))
    return prepared


def reference(tiny, prepared) -> list[int]:
    """transformers' generate, one request alone, greedy."""
    with torch.inference_mode():
        out = tiny.model.generate(
            **prepared.inputs,
            max_new_tokens=prepared.params.max_new_tokens,
            do_sample=False,
            pad_token_id=tiny.pad_token_id,
            eos_token_id=tiny.eos_token_ids,
        )
    tokens = out[0, prepared.prompt_tokens :].tolist()
    return [t for t in tokens if t not in tiny.eos_token_ids and t != tiny.pad_token_id]


@pytest.fixture
def engine(tiny):
    engine = BatchingEngine(tiny, max_batch_size=16, batch_window_ms=200).start()
    yield engine
    engine.stop()


def test_concurrent_requests_share_generate_calls_and_match_generate(tiny, engine):
    prepared = mixed_requests(Preparer(tiny, 16))
    barrier = threading.Barrier(len(prepared))
    results = [None] * len(prepared)

    def run(i):
        barrier.wait()
        results[i] = engine.generate(prepared[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prepared))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert engine.generate_calls < len(prepared)
    assert engine.requests_served == len(prepared)
    assert max(r.batch_size for r in results) > 1
    for p, r in zip(prepared, results, strict=True):
        assert r.token_ids == reference(tiny, p)
        assert r.completion_tokens <= p.params.max_new_tokens
        assert r.prompt_tokens == p.prompt_tokens
        assert r.finish_reason == ("length" if r.completion_tokens == p.params.max_new_tokens else "stop")


def test_greedy_colour_answers(tiny, engine):
    preparer = Preparer(tiny, 16)
    red = preparer.prepare(request("What color is this image?", 1), [Image.new("RGB", (50, 50), COLORS[0])])
    result = engine.generate(red)
    assert result.text == "The image is mostly red."
    assert result.finish_reason == "stop"


def test_stop_strings_cut_the_text_and_count_tokens(tiny, engine):
    preparer = Preparer(tiny, 16)
    image = [Image.new("RGB", (50, 50), COLORS[1])]
    full = engine.generate(preparer.prepare(request("What color is this image?", 1), image))
    stopped = engine.generate(preparer.prepare(request("What color is this image?", 1, stop=[" mostly"]), image))
    assert full.text == "The image is mostly green."
    assert stopped.text == "The image is"
    assert stopped.finish_reason == "stop"
    assert 0 < stopped.completion_tokens < full.completion_tokens


def test_max_tokens_is_per_request_inside_a_batch(tiny, engine):
    preparer = Preparer(tiny, 16)
    image = [Image.new("RGB", (50, 50), COLORS[2])]
    short = preparer.prepare(request("What color is this image?", 1, max_tokens=3), image)
    long = preparer.prepare(request("What color is this image?", 1, max_tokens=16), image)
    futures = [engine.submit(short), engine.submit(long)]
    a, b = (f.result() for f in futures)
    assert a.completion_tokens == 3 and a.finish_reason == "length"
    assert b.text == "The image is mostly blue." and b.finish_reason == "stop"
    assert a.token_ids == b.token_ids[:3]


def test_seeded_sampling_is_reproducible(tiny, engine):
    preparer = Preparer(tiny, 16)
    image = [Image.new("RGB", (50, 50), COLORS[3])]
    params = {"temperature": 1.5, "seed": 1234, "max_tokens": 12}
    first = engine.generate(preparer.prepare(request("Describe the image.", 1, **params), image))
    second = engine.generate(preparer.prepare(request("Describe the image.", 1, **params), image))
    assert first.token_ids == second.token_ids


def test_a_failing_request_does_not_fail_its_batch(tiny, engine):
    preparer = Preparer(tiny, 16)
    good = preparer.prepare(request("What color is this image?", 1), [Image.new("RGB", (50, 50), COLORS[0])])
    bad = preparer.prepare(request("What color is this image?", 1), [Image.new("RGB", (50, 50), COLORS[0])])
    bad.inputs["pixel_values"] = bad.inputs["pixel_values"][:3]  # fewer patches than its image tokens
    futures = [engine.submit(good), engine.submit(bad)]
    assert futures[0].result().text == "The image is mostly red."
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises is the point
        futures[1].result()


def test_context_length_is_checked_before_the_engine(tiny):
    from shared.errors import InvalidRequestError

    preparer = Preparer(tiny, 16)
    with pytest.raises(InvalidRequestError) as err:
        preparer.prepare(request("hi", 0, max_tokens=tiny.max_context), [])
    assert err.value.code == "context_length_exceeded"
    assert err.value.param == "max_tokens"


def test_sampling_defaults_follow_the_model(tiny):
    preparer = Preparer(tiny, 7)
    prepared = preparer.prepare(
        JobCreate.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]}), []
    )
    assert prepared.params == SamplingParams(max_new_tokens=7, temperature=0.0, top_p=1.0, top_k=None, seed=None)


def test_cancel_stops_a_running_request_at_the_next_step(tiny, engine):
    import time

    preparer = Preparer(tiny, 16)
    image = [Image.new("RGB", (50, 50), COLORS[0])]
    long = preparer.prepare(request("Describe the image.", 1, max_tokens=3000, min_tokens=3000), image)
    future = engine.submit(long)
    deadline = time.time() + 30
    while long.progress < 5 and time.time() < deadline:
        time.sleep(0.01)
    assert long.progress >= 5
    long.cancelled.set()
    result = future.result(timeout=30)
    assert result.finish_reason == "cancelled"
    assert 5 <= result.completion_tokens < 3000
    assert result.text  # partial text kept


def test_deadline_and_stop_token_ids(tiny, engine):
    import time

    preparer = Preparer(tiny, 16)
    image = [Image.new("RGB", (50, 50), COLORS[1])]
    late = preparer.prepare(request("Describe the image.", 1), image)
    late.deadline = time.time() - 1
    assert engine.generate(late).finish_reason == "deadline"

    full = engine.generate(preparer.prepare(request("What color is this image?", 1), image))
    stop_id = full.token_ids[2]
    cut = engine.generate(preparer.prepare(request("What color is this image?", 1, stop_token_ids=[stop_id]), image))
    assert cut.token_ids == full.token_ids[:3] and cut.finish_reason == "stop"

    forced = engine.generate(
        preparer.prepare(request("What color is this image?", 1, min_tokens=20, max_tokens=20), image)
    )
    assert forced.completion_tokens == 20 and forced.finish_reason == "length"
