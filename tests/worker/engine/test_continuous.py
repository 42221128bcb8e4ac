"""Continuous batching against transformers' own generate, on the tiny model (CPU, float32)."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from shared.errors import InvalidRequestError
from tests.worker.engine.test_batcher import COLORS, mixed_requests, reference, request
from worker.engine.continuous import ContinuousEngine
from worker.engine.prepare import Preparer


@pytest.fixture
def engine(tiny):
    engine = ContinuousEngine(tiny, max_batch_size=8).start()
    yield engine
    engine.stop()


def test_mixed_requests_arriving_at_different_times_match_generate(tiny, engine):
    prepared = mixed_requests(Preparer(tiny, 16))
    futures = []
    for i, p in enumerate(prepared):
        futures.append(engine.submit(p))
        time.sleep(0.003 * (i % 3))  # some join while others are decoding
    results = [f.result(timeout=60) for f in futures]
    for p, r in zip(prepared, results, strict=True):
        assert r.token_ids == reference(tiny, p)
        assert r.prompt_tokens == p.prompt_tokens
    total_tokens = sum(r.completion_tokens for r in results)
    assert engine.decode_steps < total_tokens - len(results)  # decode steps were shared
    assert max(r.batch_size for r in results) > 1
    assert engine.requests_served == len(prepared)


def test_vision_encoder_runs_once_for_requests_admitted_together(tiny):
    engine = ContinuousEngine(tiny, max_batch_size=8)
    preparer = Preparer(tiny, 8)
    prepared = [
        preparer.prepare(request("What color is this image?", 1), [Image.new("RGB", (40 + 10 * i, 50), c)])
        for i, c in enumerate(COLORS)
    ]
    futures = [engine.submit(p) for p in prepared]  # queued before the scheduler starts
    engine.start()
    try:
        results = [f.result(timeout=60) for f in futures]
    finally:
        engine.stop()
    assert engine.vision_calls == 1
    assert [r.token_ids for r in results] == [reference(tiny, p) for p in prepared]


def test_admission_control_queues_what_does_not_fit(tiny):
    engine = ContinuousEngine(tiny, max_batch_size=2).start()
    preparer = Preparer(tiny, 16)
    prepared = mixed_requests(preparer)
    peak = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            peak.append(len(engine._active))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = [f.result(timeout=60) for f in [engine.submit(p) for p in prepared]]
    finally:
        watching.set()
        watcher.join()
        engine.stop()
    assert max(peak) <= 2
    assert [r.token_ids for r in results] == [reference(tiny, p) for p in prepared]


def test_a_request_larger_than_a_slot_is_refused_clearly(tiny):
    engine = ContinuousEngine(tiny, max_batch_size=2, max_model_len=64).start()
    try:
        prepared = Preparer(tiny, 16).prepare(
            request("What color is this image?", 1, max_tokens=60), [Image.new("RGB", (50, 50), COLORS[0])]
        )
        with pytest.raises(InvalidRequestError) as err:
            engine.generate(prepared)
        assert err.value.code == "context_length_exceeded" and "VLMQ_MAX_MODEL_LEN" in err.value.message
    finally:
        engine.stop()


def test_cancel_deadline_stop_strings_and_stop_tokens(tiny, engine):
    preparer = Preparer(tiny, 16)
    image = [Image.new("RGB", (50, 50), COLORS[1])]
    long = preparer.prepare(request("Describe the image.", 1, max_tokens=3000, min_tokens=3000), image)
    future = engine.submit(long)
    while long.progress < 5:
        time.sleep(0.005)
    long.cancelled.set()
    cancelled = future.result(timeout=30)
    assert cancelled.finish_reason == "cancelled" and 5 <= cancelled.completion_tokens < 3000

    late = preparer.prepare(request("Describe the image.", 1), image)
    late.deadline = time.time() - 1
    assert engine.generate(late).finish_reason == "deadline"

    full = engine.generate(preparer.prepare(request("What color is this image?", 1), image))
    assert full.text == "The image is mostly green."
    stopped = engine.generate(preparer.prepare(request("What color is this image?", 1, stop=[" mostly"]), image))
    assert stopped.text == "The image is" and stopped.finish_reason == "stop"
    cut = engine.generate(
        preparer.prepare(request("What color is this image?", 1, stop_token_ids=[full.token_ids[2]]), image)
    )
    assert cut.token_ids == full.token_ids[:3]
    forced = engine.generate(
        preparer.prepare(request("What color is this image?", 1, min_tokens=20, max_tokens=20), image)
    )
    assert forced.completion_tokens == 20 and forced.finish_reason == "length"


def test_seeded_sampling_does_not_depend_on_batch_neighbours(tiny, engine):
    preparer = Preparer(tiny, 16)
    image = [Image.new("RGB", (50, 50), COLORS[3])]
    params = {"temperature": 1.5, "seed": 99, "max_tokens": 12, "top_k": 50, "top_p": 0.9}
    alone = engine.generate(preparer.prepare(request("Describe the image.", 1, **params), image))
    crowd = [preparer.prepare(request("Caption this picture.", 1, max_tokens=12), image) for _ in range(4)]
    mine = preparer.prepare(request("Describe the image.", 1, **params), image)
    futures = [engine.submit(p) for p in [*crowd, mine]]
    assert futures[-1].result(timeout=60).token_ids == alone.token_ids


def test_encoder_cache_hits_skip_the_vision_tower_and_keep_outputs_equal(tiny, engine):
    preparer = Preparer(tiny, 16)
    red, blue = (Image.new("RGB", (70, 56), COLORS[0]), Image.new("RGB", (56, 84), COLORS[2]))
    first = preparer.prepare(request("What color is this image?", 1), [red])
    first.media_keys = {"image": ["tenant-a:model:red"]}
    assert engine.generate(first).token_ids == reference(tiny, first)
    assert engine.vision_items == 1

    again = preparer.prepare(request("Describe the image.", 1), [red])
    again.media_keys = {"image": ["tenant-a:model:red"]}
    assert engine.generate(again).token_ids == reference(tiny, again)
    assert engine.vision_items == 1  # a hit: no encoder work
    assert engine.encoder_cache.hits == 1

    mixed = preparer.prepare(request("Caption this picture.", 2), [red, blue])
    mixed.media_keys = {"image": ["tenant-a:model:red", "tenant-a:model:blue"]}
    assert engine.generate(mixed).token_ids == reference(tiny, mixed)
    assert engine.vision_items == 2  # only the new image was encoded

    other_tenant = preparer.prepare(request("What color is this image?", 1), [red])
    other_tenant.media_keys = {"image": ["tenant-b:model:red"]}
    engine.generate(other_tenant)
    assert engine.vision_items == 3  # keys are the namespace: no cross-tenant reuse


def test_encoder_cache_evicts_least_recently_used_under_its_budget():
    import torch

    from worker.engine.continuous import EncoderCache

    cache = EncoderCache(max_bytes=3 * 400)
    for name in "abc":
        cache.put(name, torch.zeros(100))  # 400 bytes each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(100))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.bytes == 1200 and len(cache) == 3
    cache.put("huge", torch.zeros(1000))  # larger than the whole budget: not kept
    assert cache.get("huge") is None and len(cache) == 3
