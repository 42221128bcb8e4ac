"""The cancel watcher hears a job's cancellation through the job store's events."""

from __future__ import annotations

import time

from shared.schemas import JobStatus
from shared.store import JobRecord, JobStore, new_job_id
from worker.cancel import CancelWatcher


def running_job(redis_client) -> tuple[JobStore, str]:
    store = JobStore(redis_client, 3600)
    record = JobRecord(id=new_job_id(), tenant="t", model="m", request={"model": "m"})
    redis_client.hset(f"vlmq:job:{record.id}", mapping=record.to_hash())
    assert store.transition(record.id, [JobStatus.queued], JobStatus.running).applied
    return store, record.id


def test_a_watched_job_is_told_when_it_is_cancelled(redis_server, redis_client):
    watcher = CancelWatcher(redis_server.client()).start()
    try:
        store, job_id = running_job(redis_client)
        _, other = running_job(redis_client)
        with watcher.watch(job_id) as cancelled, watcher.watch(other) as untouched:
            assert not cancelled.is_set()
            started = time.monotonic()
            store.transition(job_id, [JobStatus.running], JobStatus.cancelled)
            assert cancelled.wait(2), "the cancel was not heard"
            assert time.monotonic() - started < 1
            store.transition(other, [JobStatus.running], JobStatus.succeeded)
            time.sleep(0.2)
            assert not untouched.is_set()
    finally:
        watcher.stop()


def test_a_cancel_missed_while_disconnected_is_found_on_reconnect(redis_server, redis_client):
    watcher = CancelWatcher(redis_server.client()).start()
    try:
        store, job_id = running_job(redis_client)
        with watcher.watch(job_id) as cancelled:
            # Drop the watcher's connection while the cancel happens; it reconnects and re-reads.
            subscribers = [c["id"] for c in redis_client.client_list() if int(c.get("psub", 0)) > 0]
            assert subscribers
            for client_id in subscribers:
                redis_client.client_kill_filter(_id=client_id)
            store.transition(job_id, [JobStatus.running], JobStatus.cancelled)
            assert cancelled.wait(5), "the cancel was not found after reconnecting"
    finally:
        watcher.stop()
