"""The chaos scenarios of tests/chaos.py, small enough for every run
(`scripts/chaos` runs them at full size), plus graceful shutdown and the reaper."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from shared import keys
from shared.queues import make_celery
from shared.schemas import JobStatus
from shared.settings import SharedSettings
from shared.store import JobRecord, JobStore
from tests.chaos import AUTH, Cluster, chaos_env, job_body, kill_workers, restart_redis, start_redis_aof, webhook_outage
from tests.conftest import MODEL
from worker.app import VisibilityTimeoutMismatch, check_visibility_timeout
from worker.reaper import Reaper

pytestmark = pytest.mark.slow


def test_kill_9_a_worker_mid_batch_loses_nothing_and_sends_one_webhook_each(model_cache, tmp_path):
    result = kill_workers(model_cache, tmp_path, jobs=40, kills=2)
    print(result)
    assert result["succeeded"] == 40, result
    assert all(n >= 2 for n in result["running_on_the_victim_when_killed"]), result
    assert result["jobs_run_more_than_once"] >= 2, result
    assert result["completed_webhooks"] == result["completed_webhook_ids"] == 40, result
    assert result["duplicate_webhooks"] == 0 and result["webhook_ids_match_jobs"], result
    assert result["reaped"] >= 2, result


def test_redis_stopped_and_restarted_with_aof_loses_no_job(model_cache, tmp_path):
    result = restart_redis(model_cache, tmp_path, jobs=16, down=3.0, tokens=150)
    print(result)
    assert result["at_stop"].get("running", 0) >= 2 and result["at_stop"].get("queued", 0) >= 1, result
    assert result["submit_while_down"] == [503, "service_unavailable"], result
    assert result["succeeded"] == 16, result


def test_redis_killed_and_restarted_with_aof_loses_no_job_accepted_a_second_before(model_cache, tmp_path):
    result = restart_redis(model_cache, tmp_path, jobs=16, down=3.0, tokens=600, how="kill")
    print(result)
    assert result["at_stop"].get("running", 0) >= 2 and result["at_stop"].get("queued", 0) >= 1, result
    assert result["submit_while_down"] == [503, "service_unavailable"], result
    assert result["succeeded"] == 16 and result["processes_exited"] == [], result


def test_a_host_crash_that_loses_redis_last_second_loses_no_job_accepted_before(model_cache, tmp_path):
    # The AOF is cut back by its last second, in which a job finished: its result and others'
    # starts are lost. The reaper takes back jobs left running on their (live) worker.
    result = restart_redis(model_cache, tmp_path, jobs=16, down=3.0, tokens=600, how="crash")
    print(result)
    assert result["at_stop"].get("running", 0) >= 2 and result["at_stop"].get("queued", 0) >= 1, result
    assert result["status_changes_lost"] >= 1, result
    assert result["succeeded"] == 16 and result["processes_exited"] == [], result


def test_webhooks_wait_out_a_receiver_that_is_down(model_cache, tmp_path):
    result = webhook_outage(model_cache, tmp_path, jobs=10, down=6.0, schedule="0.5,1,2,4,8")
    print(result)
    assert result["succeeded"] == 10 and result["all_verified"], result
    assert result["events_received"] == result["events_expected"] == 20, result
    assert result["duplicates"] == 0, result
    assert result["max_attempts_per_delivery"] >= 3, result


def test_sigterm_finishes_short_jobs_and_hands_long_ones_back(model_cache, tmp_path):
    redis_server = start_redis_aof(tmp_path / "redis")
    env = chaos_env(redis_server.url, model_cache, VLMQ_SHUTDOWN_GRACE="20", VLMQ_PROGRESS_SECONDS="0.05")
    cluster = Cluster(redis_server, env, tmp_path / "logs")
    store = redis_server.client()

    def generating(job_id: str) -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            status, tokens = store.hmget(keys.job(job_id), "status", "tokens_generated")
            if status == "running" and int(tokens or 0) > 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"{job_id} never ran")

    def sigterm(slot: str) -> None:
        proc = cluster.processes[slot]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    try:
        cluster.start(workers=1, concurrency=2, webhooks=False)
        with httpx.Client(base_url=cluster.base_url, headers=AUTH, timeout=30) as client:
            # Within the grace period: the job in flight finishes, then the worker exits.
            finishing = client.post("/v1/jobs", json=job_body(1500)).json()["id"]
            generating(finishing)
            sigterm("worker-0")
            assert store.hmget(keys.job(finishing), "status", "attempts") == ["succeeded", "1"]

            # Past it: the job goes back to the queue, its attempt unspent, and another worker runs it.
            cluster.env["VLMQ_SHUTDOWN_GRACE"] = "0.2"
            cluster.add_worker("worker-1", concurrency=2)
            handed = client.post("/v1/jobs", json=job_body(4000)).json()["id"]
            generating(handed)
            first = cluster.worker_name("worker-1")
            sigterm("worker-1")
            assert store.hmget(keys.job(handed), "status", "attempts") == ["queued", "0"]
            assert store.zcard(keys.RUNNING) == 0
            assert "handing back 1 job(s)" in cluster.worker_logs()
            cluster.add_worker("worker-2", concurrency=2)
            finished = client.get(f"/v1/jobs/{handed}", params={"wait": 60}).json()
            while finished["status"] in ("queued", "running"):
                finished = client.get(f"/v1/jobs/{handed}", params={"wait": 60}).json()
            assert finished["status"] == "succeeded" and finished["attempts"] == 1
            assert store.hget(keys.job(handed), "worker") != first
            assert finished["result"]["usage"]["completion_tokens"] == 4000
    finally:
        cluster.stop()
        redis_server.process.terminate()


def test_reaper_requeues_a_dead_workers_job_once_and_fails_it_after_max_attempts(redis_client, redis_server):
    store = JobStore(redis_client, 600)
    celery = make_celery(SharedSettings(redis_url=redis_server.url), "test-reaper")
    published: list[str] = []

    def publish(record: JobRecord) -> None:
        from shared.queues import send_job

        send_job(celery, record.id, record.model, record.priority)
        published.append(record.id)

    def running_job(job_id: str, worker: str, attempts: int) -> None:
        record = JobRecord(id=job_id, tenant="alice", model=MODEL, request={}, attempts=attempts - 1)
        redis_client.hset(keys.job(job_id), mapping=record.to_hash())
        fields = {"worker": worker, "started_at": time.time()}
        assert store.transition(job_id, (JobStatus.queued,), JobStatus.running, fields, count_attempt=True).applied

    redis_client.set(keys.worker("alive"), "{}", ex=60)
    running_job("job_a", "ghost", attempts=1)
    running_job("job_b", "alive", attempts=1)
    running_job("job_c", "ghost", attempts=3)
    reapers = [Reaper(store, publish, lambda r, e: None, max_attempts=3, heartbeat_seconds=1) for _ in range(2)]
    now = time.time()
    assert reapers[0].reap_once(now) == [] and reapers[1].reap_once(now) == []  # first sight: only suspects
    assert reapers[0].reap_once(now + 1) == []  # not missing long enough
    # Two reapers at once: exactly one takes each job back.
    first, second = reapers[0].reap_once(now + 3.5), reapers[1].reap_once(now + 3.5)
    assert sorted(first + second) == ["job_a", "job_c"] and not set(first) & set(second)
    assert store.get("job_a").status is JobStatus.queued and store.get("job_b").status is JobStatus.running
    failed = store.get("job_c")
    assert failed.status is JobStatus.failed and failed.error["code"] == "worker_lost"
    assert published.count("job_a") >= 1 and "job_c" not in published
    queued = [k for k in redis_client.keys(f"vlmq.model.{MODEL}*") if redis_client.type(k) == "list"]
    assert sum(redis_client.llen(k) for k in queued) == len(published)
    assert redis_client.zrange(keys.RUNNING, 0, -1) == ["job_b"]


def test_reaper_takes_back_a_job_left_running_in_its_own_name_that_its_runner_is_not_running(redis_client):
    # Redis lost a finished job's last transition: the job says running on this live worker, which is not running it.
    store = JobStore(redis_client, 600)
    now = time.time()
    jobs = {"orphan": ("me", now - 60), "busy": ("me", now - 60), "starting": ("me", now), "restarted": ("me", now + 3)}
    for job_id, (worker, started_at) in {**jobs, "elsewhere": ("other", now - 60)}.items():
        redis_client.hset(
            keys.job(job_id), mapping=JobRecord(id=job_id, tenant="alice", model=MODEL, request={}).to_hash()
        )
        fields = {"worker": worker, "started_at": started_at}
        assert store.transition(job_id, (JobStatus.queued,), JobStatus.running, fields, count_attempt=True).applied
    for name in ("me", "other"):
        redis_client.set(keys.worker(name), "{}", ex=60)
    published: list[str] = []
    running_here = {"busy"}

    def reaper(name: str, running: set[str]) -> Reaper:
        return Reaper(
            store,
            lambda record: published.append(record.id),
            lambda record, event: None,
            max_attempts=3,
            heartbeat_seconds=1,
            worker_name=name,
            running_ids=lambda: frozenset(running),
        )

    mine, other = reaper("me", running_here), reaper("other", {"elsewhere"})
    assert mine.reap_once(now) == [] and other.reap_once(now) == []  # first sight: only suspects
    running_here.add("starting")  # between its transition and the runner recording it at the first look
    assert other.reap_once(now + 3.5) == []  # its holder is alive: not another worker's business
    # "restarted" was run again here since the first look (started 0.5 s ago): not yet.
    assert mine.reap_once(now + 3.5) == ["orphan"] and published == ["orphan"]
    orphan = store.get("orphan")
    assert orphan.status is JobStatus.queued and orphan.attempts == 1
    assert all(store.get(j).status is JobStatus.running for j in ("busy", "starting", "restarted", "elsewhere"))
    assert sorted(redis_client.zrange(keys.RUNNING, 0, -1)) == ["busy", "elsewhere", "restarted", "starting"]


def test_a_worker_with_another_visibility_timeout_refuses_to_start(redis_client):
    redis_client.set(keys.worker("w1"), '{"models": ["m"], "visibility_timeout": 3600}', ex=60)
    check_visibility_timeout(redis_client, 3600)
    with pytest.raises(VisibilityTimeoutMismatch, match="VLMQ_VISIBILITY_TIMEOUT=60, but live workers use"):
        check_visibility_timeout(redis_client, 60)
