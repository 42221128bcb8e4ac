"""The media cache tiers in the worker: real Redis, the tiny model's continuous engine, JobRunner.

Two "workers" here are two sets of in-process state (engine, preprocessed
items) over one Redis: what one stores under a uuid, the other resolves
from the shared tier. tests/test_cache_end_to_end.py does the same with
two real worker processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import redis as redis_lib
import torch

from shared import keys, metrics
from shared.media_cache import MediaCache
from shared.schemas import JobCreate, JobStatus
from shared.store import JobRecord, JobStore, new_job_id
from tests.conftest import MODEL, data_url, png_bytes
from tests.worker.engine.test_batcher import reference
from worker.config import WorkerSettings
from worker.engine.continuous import ContinuousEngine
from worker.engine.prepare import Preparer
from worker.jobs import JobRunner
from worker.media.fetch import MediaFetcher
from worker.media.image import decode_image
from worker.media_cache import ItemCache
from worker.resolver import MediaResolver

RED, BLUE = (220, 30, 30), (30, 60, 220)
QUESTION = {"type": "text", "text": "What color is this image?"}


@dataclass
class Worker:
    runner: JobRunner
    engine: ContinuousEngine
    resolver: MediaResolver
    items: ItemCache


@pytest.fixture
def pool(tiny, redis_server, redis_client):
    started: list[Worker] = []
    clients = []

    def worker(name: str, ttl: int = 60) -> Worker:
        settings = WorkerSettings(redis_url=redis_server.url, worker_name=name, media_cache_ttl=ttl)
        binary = redis_lib.Redis.from_url(redis_server.url)
        clients.append(binary)
        shared = MediaCache(binary, ttl=ttl, max_bytes=10**8, max_item_bytes=10**7)
        items = ItemCache(10**8)
        preparer = Preparer(tiny, 16, items=items)
        fetcher = MediaFetcher.from_settings(settings)
        resolver = MediaResolver(settings, fetcher, preparer, shared=shared, items=items)
        engine = ContinuousEngine(tiny, max_batch_size=4).start()
        runner = JobRunner(
            settings=settings,
            store=JobStore(redis_client, 3600),
            fetcher=fetcher,
            preparer=preparer,
            resolver=resolver,
            engine=engine,
            model_name=MODEL,
        )
        started.append(Worker(runner, engine, resolver, items))
        return started[-1]

    yield worker
    for w in started:
        w.engine.stop()
        w.runner.fetcher.close()
    for client in clients:
        client.close()


def image(color=RED, uuid: str | None = None, size=(64, 48)) -> dict:
    part: dict = {"type": "image_url", "image_url": {"url": data_url(png_bytes(color, size))}}
    if uuid:
        part["uuid"] = uuid
    return part


def by_uuid(uuid: str, kind: str = "image_url") -> dict:
    return {"type": kind, kind: None, "uuid": uuid}


def run(worker: Worker, redis_client, *content, tenant: str = "alice") -> JobRecord:
    body = {"model": MODEL, "messages": [{"role": "user", "content": [*content, QUESTION]}], "max_tokens": 12}
    record = JobRecord(id=new_job_id(), tenant=tenant, model=MODEL, request=body)
    redis_client.hset(keys.job(record.id), mapping=record.to_hash())
    worker.runner.run(record.id)
    done = worker.runner.store.get(record.id)
    assert done is not None
    return done


def answer(record: JobRecord) -> str:
    assert record.status is JobStatus.succeeded, record.error
    return record.result["choices"][0]["message"]["content"]


def tiers(record: JobRecord) -> list[tuple[str | None, str | None]]:
    return [(item["shared"], item["worker"]) for item in record.cache["items"]]


def test_a_uuid_hit_skips_decode_preprocessing_and_the_vision_tower_with_equal_tokens(pool, redis_client, tiny):
    a = pool("worker-a")
    first = run(a, redis_client, image(RED, uuid="sku-1"))
    assert answer(first) == "The image is mostly red."
    assert tiers(first) == [("stored", "miss")]
    assert a.engine.vision_items == 1

    again = run(a, redis_client, by_uuid("sku-1"))
    assert tiers(again) == [("hit", "hit")]
    assert [item["encoder"] for item in first.cache["items"]] == ["miss"]
    assert [item["encoder"] for item in again.cache["items"]] == ["hit"]  # the job says which tier hit
    assert a.engine.vision_items == 1  # no encoder work for the cached item
    assert a.engine.encoder_cache.hits == 1
    assert again.result["choices"] == first.result["choices"]
    assert again.result["usage"] == first.result["usage"]

    # Token for token: the uuid-resolved request (cached pixels, cached encoder output)
    # against transformers' generate on the same request built from the image itself.
    by_ref = JobCreate.model_validate(
        first.request | {"messages": [{"role": "user", "content": [by_uuid("sku-1"), QUESTION]}]}
    )
    cached = a.resolver.resolve("alice", by_ref)
    prepared = a.runner.preparer.prepare(by_ref, cached.media, keys=cached.keys)
    fresh = Preparer(tiny, 16).prepare(
        JobCreate.model_validate(first.request), [decode_image(png_bytes(RED, (64, 48)), max_pixels=10**7)]
    )
    assert torch.equal(prepared.inputs["pixel_values"], fresh.inputs["pixel_values"])
    assert torch.equal(prepared.inputs["input_ids"], fresh.inputs["input_ids"])
    generated = a.engine.generate(prepared)
    assert a.engine.vision_items == 1
    assert generated.token_ids == reference(tiny, fresh)


def test_another_worker_resolves_the_uuid_from_the_shared_tier(pool, redis_client):
    a, b = pool("worker-a"), pool("worker-b")
    first = run(a, redis_client, image(BLUE, uuid="u"))
    second = run(b, redis_client, by_uuid("u"))
    assert answer(second) == answer(first) == "The image is mostly blue."
    assert second.result["usage"] == first.result["usage"]
    assert tiers(second) == [("hit", "miss")]  # the bytes came from Redis; B decoded and encoded them
    assert b.engine.vision_items == 1
    third = run(b, redis_client, by_uuid("u"))
    assert tiers(third) == [("hit", "hit")] and b.engine.vision_items == 1


def test_unknown_other_tenants_and_expired_uuids_fail_as_cache_misses(pool, redis_client):
    a = pool("worker-a", ttl=1)
    assert answer(run(a, redis_client, image(RED, uuid="alices")))
    cases = {
        "another tenant's": run(a, redis_client, by_uuid("alices"), tenant="bob"),
        "unknown": run(a, redis_client, image(BLUE), by_uuid("never-sent")),
    }
    time.sleep(1.1)
    cases["expired"] = run(a, redis_client, by_uuid("alices"))
    for name, record in cases.items():
        assert record.status is JobStatus.failed, name
        assert record.error["type"] == "media_cache_miss", name
        assert record.error["code"] == "media_cache_miss", name
        assert record.attempts == 1, name  # a client error: not retried
    assert cases["unknown"].error["param"] == "messages[0].content[1].uuid"
    assert cases["expired"].error["param"] == "messages[0].content[0].uuid"
    assert "never-sent" in cases["unknown"].error["message"]


def test_media_sent_again_under_a_uuid_replaces_what_it_names(pool, redis_client):
    a = pool("worker-a")
    assert answer(run(a, redis_client, image(RED, uuid="logo"))) == "The image is mostly red."
    assert answer(run(a, redis_client, image(BLUE, uuid="logo"))) == "The image is mostly blue."
    reused = run(a, redis_client, by_uuid("logo"))
    assert answer(reused) == "The image is mostly blue."
    assert tiers(reused) == [("hit", "hit")]
    same_again = run(a, redis_client, image(BLUE, uuid="logo"))
    assert tiers(same_again) == [("refreshed", "hit")]


def test_the_same_bytes_without_a_uuid_hit_by_content_hash_per_tenant(pool, redis_client):
    a = pool("worker-a")
    run(a, redis_client, image(RED, size=(80, 80)))
    again = run(a, redis_client, image(RED, size=(80, 80)))
    assert tiers(again) == [(None, "hit")]
    assert a.engine.vision_items == 1
    other = run(a, redis_client, image(RED, size=(80, 80)), tenant="bob")
    assert tiers(other) == [(None, "miss")]  # tenants never share derived tensors
    assert a.engine.vision_items == 2


def test_a_uuid_of_other_media_kind_is_refused(pool, redis_client):
    a = pool("worker-a")
    run(a, redis_client, image(RED, uuid="picture"))
    failed = run(a, redis_client, by_uuid("picture", "video_url"))
    assert failed.status is JobStatus.failed
    assert failed.error["type"] == "invalid_media" and failed.error["code"] == "media_kind_mismatch"


def test_workers_publish_their_cache_counters(pool, redis_client):
    a = pool("worker-a")
    run(a, redis_client, image(RED, uuid="m"))
    run(a, redis_client, by_uuid("m"))
    run(a, redis_client, by_uuid("missing"))
    counts = {}
    for raw, value in redis_client.hgetall(keys.METRICS).items():
        name, labels = metrics.parse_field(raw)
        counts[(name, tuple(sorted(labels.items())))] = int(value)
    assert counts[("media_cache_stores", (("tier", "shared"),))] == 1
    assert counts[("media_cache_hits", (("tier", "shared"),))] == 1
    assert counts[("media_cache_misses", (("tier", "shared"),))] == 1
    assert counts[("media_cache_hits", (("tier", "worker"),))] == 1
    assert counts[("media_cache_misses", (("tier", "worker"),))] == 1
    assert counts[("media_cache_hits", (("tier", "encoder"),))] == 1
    assert counts[("media_cache_misses", (("tier", "encoder"),))] == 1
    assert counts[("jobs_finished", (("model", MODEL), ("status", "succeeded")))] == 2
    assert counts[("jobs_finished", (("model", MODEL), ("status", "failed")))] == 1
