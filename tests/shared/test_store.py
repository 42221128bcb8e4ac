from __future__ import annotations

import asyncio

from shared import keys
from shared.schemas import JobStatus
from shared.store import AsyncJobStore, JobRecord, JobStore, new_job_id


def record(tenant: str = "t", created_at: float | None = None) -> JobRecord:
    r = JobRecord(id=new_job_id(), tenant=tenant, model="m", request={"model": "m"}, metadata={"k": "v"})
    if created_at is not None:
        r.created_at = created_at
    return r


def async_store(redis_server) -> tuple[AsyncJobStore, object]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    return AsyncJobStore(client, result_ttl=3600), client


def test_create_get_and_ttls(redis_server, redis_client):
    async def go():
        store, client = async_store(redis_server)
        r = record()
        await store.create(r)
        got = await store.get(r.id)
        await client.aclose()
        return r, got

    r, got = asyncio.run(go())
    assert got == r
    assert 3500 < redis_client.ttl(keys.job(r.id)) <= 3600
    assert 3500 < redis_client.ttl(keys.tenant_jobs("t")) <= 3600
    assert got.to_public().status is JobStatus.queued


def test_transitions_are_guarded_and_published(redis_server, redis_client):
    async def create(r):
        store, client = async_store(redis_server)
        await store.create(r)
        await client.aclose()

    r = record()
    asyncio.run(create(r))
    store = JobStore(redis_client, result_ttl=100)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.job_events(r.id))
    pubsub.get_message(timeout=1)

    moved = store.transition(r.id, [JobStatus.queued], JobStatus.running, {"started_at": 5.0}, count_attempt=True)
    assert moved.applied and moved.status is JobStatus.running
    assert pubsub.get_message(timeout=1)["data"] == "running"
    assert redis_client.ttl(keys.job(r.id)) <= 100

    cancelled = store.transition(r.id, [JobStatus.queued, JobStatus.running], JobStatus.cancelled)
    assert cancelled.applied
    late = store.transition(r.id, [JobStatus.running], JobStatus.succeeded, {"result": {"x": 1}})
    assert not late.applied and late.status is JobStatus.cancelled
    final = store.get(r.id)
    assert final.status is JobStatus.cancelled and final.result is None and final.attempts == 1
    assert final.started_at == 5.0

    missing = store.transition("job_nope", [JobStatus.queued], JobStatus.running)
    assert not missing.applied and missing.status is None


def test_list_newest_first_with_cursor(redis_server, redis_client):
    async def go():
        store, client = async_store(redis_server)
        made = [record(created_at=1000.0 + i) for i in range(5)]
        made.append(record(tenant="other", created_at=2000.0))
        for r in made:
            await store.create(r)
        page1, more1 = await store.list("t", 2)
        page2, more2 = await store.list("t", 2, before=page1[-1].created_at)
        page3, more3 = await store.list("t", 2, before=page2[-1].created_at)
        await client.aclose()
        return made, (page1, more1), (page2, more2), (page3, more3)

    made, p1, p2, p3 = asyncio.run(go())
    ids = [r.id for r in reversed(made[:5])]
    assert [r.id for r in p1[0]] == ids[:2] and p1[1]
    assert [r.id for r in p2[0]] == ids[2:4] and p2[1]
    assert [r.id for r in p3[0]] == ids[4:] and not p3[1]
