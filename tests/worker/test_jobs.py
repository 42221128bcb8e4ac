"""JobRunner on a real Redis job store, the tiny model's real engine and a real media server."""

from __future__ import annotations

import threading
import time

import pytest

from shared import keys
from shared.deliveries import DeliveryStore
from shared.schemas import JobStatus, WebhookEvent
from shared.store import JobRecord, JobStore, new_job_id
from tests.conftest import MODEL, data_url, png_bytes
from worker.cancel import CancelWatcher
from worker.config import WorkerSettings
from worker.engine.batcher import BatchingEngine
from worker.engine.prepare import Preparer
from worker.jobs import JobRunner, RetryLater
from worker.media.fetch import MediaFetcher
from worker.webhooks import Announcer


@pytest.fixture(scope="module")
def engine(tiny):
    engine = BatchingEngine(tiny, max_batch_size=8, batch_window_ms=1).start()
    yield engine
    engine.stop()


@pytest.fixture
def runner(tiny, engine, redis_server, redis_client):
    settings = WorkerSettings(
        redis_url=redis_server.url,
        worker_name="test-worker",
        max_attempts=3,
        progress_seconds=0.05,
        allowed_media_domains=["127.0.0.1"],
        media_allow_private_networks=True,
        heartbeat_seconds=1,
    )
    watcher = CancelWatcher(redis_client).start()
    fetcher = MediaFetcher.from_settings(settings)
    runner = JobRunner(
        settings=settings,
        store=JobStore(redis_client, 3600),
        fetcher=fetcher,
        preparer=Preparer(tiny, 16),
        engine=engine,
        model_name=MODEL,
        watch_cancel=watcher.watch,
        announce=Announcer(settings, redis_client),
    )
    yield runner
    watcher.stop()
    fetcher.close()


def put_job(redis_client, url: str | None = None, **request) -> JobRecord:
    content = [{"type": "text", "text": "What color is this image?"}]
    if url:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "webhook": {"url": "http://127.0.0.1:9/hook", "events": [e.value for e in WebhookEvent]},
        **request,
    }
    record = JobRecord(id=new_job_id(), tenant="alice", model=MODEL, request=body)
    redis_client.hset(keys.job(record.id), mapping=record.to_hash())
    return record


def announced(redis_client, job_id: str) -> list[str]:
    return [d.rsplit("_", 1)[-1] for d in redis_client.lrange(keys.job_deliveries(job_id), 0, -1)]


def test_a_job_runs_once_even_when_its_task_runs_twice(runner, redis_client):
    record = put_job(redis_client, data_url(png_bytes()))
    runner.run(record.id)
    runner.run(record.id)  # a redelivered task
    done = runner.store.get(record.id)
    assert done.status is JobStatus.succeeded and done.attempts == 1
    assert done.tokens_generated == done.result["usage"]["completion_tokens"]
    assert set(done.timings) >= {"queued_ms", "media_ms", "inference_ms"}
    assert announced(redis_client, record.id) == ["started", "completed"]
    body = DeliveryStore(redis_client, 3600, 30).get(f"msg_{record.id}_completed").body
    assert '"status":"succeeded"' in body


def test_transient_failures_stop_after_max_attempts(runner, redis_client, media_server):
    record = put_job(redis_client, media_server.url("/error500"))
    for attempt in (1, 2):
        with pytest.raises(RetryLater):
            runner.run(record.id)
        again = runner.store.get(record.id)
        assert again.status is JobStatus.queued and again.attempts == attempt
    runner.run(record.id)
    failed = runner.store.get(record.id)
    assert failed.status is JobStatus.failed and failed.attempts == 3
    assert failed.error["type"] == "media_unavailable"
    assert "gave up after 3 attempts" in failed.error["message"]
    assert announced(redis_client, record.id) == ["started", "failed"]


def test_a_job_whose_worker_keeps_dying_fails_at_the_limit(runner, redis_client):
    record = put_job(redis_client)
    store = runner.store
    # Two earlier attempts died mid-job on a worker that is gone (no heartbeat): a third is allowed.
    store.transition(record.id, [JobStatus.queued], JobStatus.running, {"worker": "dead-1", "attempts": 2})
    runner.run(record.id)
    assert store.get(record.id).status is JobStatus.succeeded and store.get(record.id).attempts == 3

    poison = put_job(redis_client)
    store.transition(poison.id, [JobStatus.queued], JobStatus.running, {"worker": "dead-2", "attempts": 3})
    runner.run(poison.id)
    failed = store.get(poison.id)
    assert failed.status is JobStatus.failed and failed.attempts == 3
    assert failed.error["code"] == "worker_lost" and "interrupted 3 times" in failed.error["message"]


def test_a_job_still_running_on_a_live_worker_is_not_run_twice(runner, redis_client):
    record = put_job(redis_client)
    runner.store.transition(record.id, [JobStatus.queued], JobStatus.running, {"worker": "alive-1", "attempts": 1})
    redis_client.set(keys.worker("alive-1"), "{}", ex=10)
    with pytest.raises(RetryLater):
        runner.run(record.id)
    still = runner.store.get(record.id)
    assert still.status is JobStatus.running and still.attempts == 1 and still.worker == "alive-1"


def test_a_job_not_started_within_its_ttl_expires_and_never_runs(runner, redis_client):
    record = put_job(redis_client)
    redis_client.hset(keys.job(record.id), "expires_at", repr(time.time() - 1))
    runner.run(record.id)
    expired = runner.store.get(record.id)
    assert expired.status is JobStatus.expired and expired.attempts == 0 and expired.started_at is None
    assert expired.error["code"] == "job_expired"
    assert announced(redis_client, record.id) == ["expired"]


def test_a_cancelled_running_job_stops_and_keeps_its_partial_text(runner, redis_client):
    record = put_job(redis_client, data_url(png_bytes()), max_tokens=3000, min_tokens=3000)
    thread = threading.Thread(target=runner.run, args=(record.id,))
    thread.start()
    deadline = time.time() + 30
    while time.time() < deadline and not (runner.store.get(record.id).tokens_generated or 0) >= 3:
        time.sleep(0.02)
    running = runner.store.get(record.id)
    assert running.status is JobStatus.running and running.tokens_generated >= 3  # progress, while it runs
    assert runner.store.transition(record.id, [JobStatus.running], JobStatus.cancelled).applied
    thread.join(10)
    assert not thread.is_alive(), "the engine did not stop the cancelled request"
    cancelled = runner.store.get(record.id)
    assert cancelled.status is JobStatus.cancelled
    (choice,) = cancelled.result["choices"]
    assert choice["finish_reason"] == "cancelled" and choice["message"]["content"]
    assert 3 <= cancelled.result["usage"]["completion_tokens"] < 3000
    assert announced(redis_client, record.id) == ["started", "cancelled"]
    assert '"finish_reason":"cancelled"' in DeliveryStore(redis_client, 3600, 30).get(f"msg_{record.id}_cancelled").body


def test_a_job_whose_transition_to_running_redis_lost_is_retried_not_dropped(runner, redis_client):
    # A Redis crash (appendfsync everysec) lost the job's transition to running but not its
    # task's delivery: the record says queued while this worker runs it. Acking the task
    # would leave the job queued with no message.
    record = put_job(redis_client, max_tokens=400, min_tokens=400)
    before = redis_client.hgetall(keys.job(record.id))
    outcome: list[str] = []

    def run() -> None:
        try:
            runner.run(record.id)
            outcome.append("acked")
        except RetryLater:
            outcome.append("retried")

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 30
    while time.time() < deadline and not (runner.store.get(record.id).tokens_generated or 0) >= 3:
        time.sleep(0.02)
    redis_client.delete(keys.job(record.id))
    redis_client.hset(keys.job(record.id), mapping=before)
    redis_client.zrem(keys.RUNNING, record.id)
    thread.join(30)
    assert outcome == ["retried"]
    again = runner.store.get(record.id)
    assert again.status is JobStatus.queued and again.result is None
    runner.run(record.id)  # the retry
    done = runner.store.get(record.id)
    assert done.status is JobStatus.succeeded and done.attempts == 1
