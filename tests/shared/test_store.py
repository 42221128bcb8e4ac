from __future__ import annotations

import asyncio
import json
import time

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


def create(redis_server, *records: JobRecord) -> None:
    """Write `records` through the gateway's asyncio store."""

    async def go() -> None:
        store, client = async_store(redis_server)
        for r in records:
            await store.create(r)
        await client.aclose()

    asyncio.run(go())


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
    r = record()
    create(redis_server, r)
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


def test_the_queue_index_holds_exactly_the_queued_jobs_in_broker_order(redis_server, redis_client):
    from shared.catalog import queue_name

    def made(priority: int, at: float) -> JobRecord:
        r = record(created_at=at)
        r.request["priority"] = priority
        return r

    old_low, new_urgent, old_mid, new_mid = made(1, 10.0), made(9, 40.0), made(5, 20.0), made(5, 30.0)
    create(redis_server, old_low, new_urgent, old_mid, new_mid)
    index = keys.queued(queue_name("m"))
    assert redis_client.zrange(index, 0, -1) == [new_urgent.id, old_mid.id, new_mid.id, old_low.id]

    store = JobStore(redis_client, result_ttl=100)
    moved = store.transition(old_mid.id, [JobStatus.queued], JobStatus.running)
    assert moved.record.id == old_mid.id and moved.record.status is JobStatus.running  # the record as left
    assert redis_client.zrange(index, 0, -1) == [new_urgent.id, new_mid.id, old_low.id]
    # Back to queued (a transient error's retry): behind the jobs of its priority already waiting.
    store.transition(old_mid.id, [JobStatus.running], JobStatus.queued)
    assert redis_client.zrange(index, 0, -1) == [new_urgent.id, new_mid.id, old_mid.id, old_low.id]
    store.transition(new_urgent.id, [JobStatus.queued], JobStatus.cancelled)
    assert redis_client.zrank(index, new_mid.id) == 0 and redis_client.zrank(index, new_urgent.id) is None


def test_progress_is_written_only_while_running(redis_server, redis_client):
    r = record()
    create(redis_server, r)
    store = JobStore(redis_client, result_ttl=100)
    assert not store.set_progress(r.id, 3)
    store.transition(r.id, [JobStatus.queued], JobStatus.running)
    assert store.set_progress(r.id, 7) and store.get(r.id).tokens_generated == 7
    store.transition(r.id, [JobStatus.running], JobStatus.succeeded)
    assert not store.set_progress(r.id, 9) and store.get(r.id).tokens_generated == 7
    assert not store.set_progress("job_gone", 1) and not redis_client.exists(keys.job("job_gone"))


def test_create_writes_the_job_its_task_and_its_count_in_one_step(redis_server, redis_client):
    from shared import metrics
    from shared.queues import job_message

    redis_client.flushdb()
    metric = metrics.field("jobs_submitted", model="m")

    async def go():
        store, client = async_store(redis_server)
        first, second, third = (record(created_at=time.time() + i) for i in range(3))
        idem = keys.idempotency("t", "k1")
        outcomes = [
            await store.create(first, 2, message=job_message(first.id, "m", 5), idempotency=(idem, f"d {first.id}")),
            # The same key again: the first job's value back, nothing written or sent.
            await store.create(second, 2, message=job_message(second.id, "m", 5), idempotency=(idem, "d x")),
            await store.create(second, 2, message=job_message(second.id, "m", 5), metric=metric),
            # At the quota (2 unfinished): refused, nothing written or sent.
            await store.create(third, 2, message=job_message(third.id, "m", 5), metric=metric),
        ]
        await client.aclose()
        return first, second, third, outcomes

    first, second, third, (a, b, c, d) = asyncio.run(go())
    assert a.accepted and a.queue_position == 0
    assert not b.accepted and b.earlier == f"d {first.id}"
    assert c.accepted and c.queue_position == 1
    assert not d.accepted and d.earlier is None
    assert not redis_client.exists(keys.job(third.id))
    tasks = [json.loads(m)["headers"]["argsrepr"] for m in redis_client.lrange(job_message("x", "m", 5).key, 0, -1)]
    assert sorted(tasks) == sorted([repr([first.id]), repr([second.id])])
    assert redis_client.hget(keys.METRICS, metric) == "1"
    assert redis_client.get(keys.idempotency("t", "k1")) == f"d {first.id}"


def test_a_caller_holding_the_request_is_not_sent_it_again(redis_server, redis_client):
    r = record()
    r.request["messages"] = [{"role": "user", "content": "x" * 100_000}]

    create(redis_server, r)
    store = JobStore(redis_client, result_ttl=100)
    replies = []
    script = store._transition

    def spy(**kwargs):
        replies.append(script(**kwargs))
        return replies[-1]

    store._transition = spy
    moved = store.transition(r.id, [JobStatus.queued], JobStatus.running, request=r.request)
    assert moved.record.request == r.request  # the caller's, given back
    assert "request" not in replies[-1][2] and sum(len(str(v)) for v in replies[-1][2]) < 2_000  # Redis left it out
    full = store.transition(r.id, [JobStatus.running], JobStatus.succeeded)
    assert "request" in replies[-1][2] and full.record.request == r.request
    assert store.get(r.id).request == r.request and store.status(r.id) is JobStatus.succeeded
