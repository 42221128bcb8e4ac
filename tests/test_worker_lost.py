"""A job that keeps killing its worker ends `failed` after VLMQ_MAX_ATTEMPTS, not in a loop.

Real workers are killed with SIGKILL while they run the job; the broker
hands its unacked task to the next worker once the visibility timeout has
passed (2 s here, so the test takes seconds rather than hours).
"""

from __future__ import annotations

import time

import pytest

from shared import keys
from tests.conftest import free_port, spawn, stack_env, start_redis, stop, wait_ready
from tests.test_lifecycle import long_job, wait_until

pytestmark = pytest.mark.slow


def test_a_job_that_keeps_killing_its_worker_fails_after_max_attempts(model_cache, tmp_path_factory):
    redis_server = start_redis(tmp_path_factory.mktemp("lost-redis"))
    logs = tmp_path_factory.mktemp("lost-logs")
    port = free_port()
    env = stack_env(
        redis_server.url,
        model_cache,
        VLMQ_VISIBILITY_TIMEOUT="2",
        VLMQ_HEARTBEAT_SECONDS="0.5",
        VLMQ_MAX_ATTEMPTS="3",
    )
    base_url = f"http://127.0.0.1:{port}"
    processes = {"gateway": spawn("gateway", ["gateway", "--port", str(port)], env, logs)}
    store = redis_server.client()
    try:
        import httpx

        wait_until(lambda: _up(base_url), bool, timeout=60, what="gateway up")
        reply = httpx.post(
            f"{base_url}/v1/jobs", json=long_job(), headers={"Authorization": "Bearer key-alice"}, timeout=30
        )
        job_id = reply.json()["id"]
        for kill in range(1, 4):
            worker = spawn(f"worker-{kill}", ["worker", "--concurrency", "1"], env, logs)
            processes[f"worker-{kill}"] = worker
            wait_ready(base_url, processes, logs)
            # The job is running on this worker (its attempt counted), and then the worker dies.
            wait_until(
                lambda: store.hmget(keys.job(job_id), "status", "attempts", "tokens_generated"),
                lambda s, k=kill: s[0] == "running" and s[1] == str(k) and int(s[2] or 0) > 0,
                timeout=60,
                what=f"attempt {kill} running",
            )
            worker.kill()
            worker.wait(10)
            del processes[f"worker-{kill}"]

        started = time.time()
        processes["worker-4"] = spawn("worker-4", ["worker", "--concurrency", "1"], env, logs)
        wait_until(lambda: store.hget(keys.job(job_id), "status"), lambda s: s == "failed", timeout=90)
        job = httpx.get(f"{base_url}/v1/jobs/{job_id}", headers={"Authorization": "Bearer key-alice"}).json()
        assert job["attempts"] == 3
        assert job["error"]["code"] == "worker_lost"
        assert "interrupted 3 times" in job["error"]["message"]
        assert time.time() - started < 60
        # The fourth worker survived the poison job and serves the next one.
        ok = httpx.post(
            f"{base_url}/v1/jobs",
            json=long_job(tokens=4),
            headers={"Authorization": "Bearer key-alice", "Prefer": "wait=30"},
            timeout=40,
        )
        assert ok.json()["status"] == "succeeded"
    finally:
        stop(processes)
        redis_server.process.terminate()


def _up(base_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
