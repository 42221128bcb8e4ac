"""The stack on Redis Sentinel, through a real failover.

A master, its replica and a sentinel (real redis-servers on 127.0.0.1); a
gateway and a worker that know only `sentinel://…` and the group's name.
Jobs run; the replica is made to catch up (`WAIT`), a job is left generating,
and the master is killed with SIGKILL. A submit right after the kill gets 503
(or, were the replica promoted already, 202 and the job runs). The sentinel
promotes the replica, and then: the job that
was generating finishes (the worker's writes wait out the failover) and the
worker is still up, the jobs finished before are still there, `/readyz` is 200
again and new jobs (the gateway's one-script accept, with the Celery task
pushed by the same script) run on the new master.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis

from shared import keys
from tests.conftest import KEYS, MODEL, free_port, redis_binary, spawn, stack_env, start_redis, stop, wait_ready
from tests.test_lifecycle import long_job, wait_until

pytestmark = pytest.mark.slow

GROUP = "vlmqmaster"
AUTH = {"Authorization": f"Bearer {KEYS['alice']}"}


def start_sentinel(tmp: Path, master_port: int) -> tuple[int, subprocess.Popen]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "sentinel.conf"  # the sentinel rewrites it as it learns, so it lives in tmp
    conf.write_text(
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f"dir {tmp}\n"
        f"sentinel monitor {GROUP} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {GROUP} 1000\n"
        f"sentinel failover-timeout {GROUP} 5000\n"
    )
    log = open(tmp / "sentinel.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([redis_binary(), str(conf), "--sentinel"], stdout=log, stderr=log)
    return port, proc


def master_port(sentinel: redis.Redis) -> int | None:
    try:
        address = sentinel.sentinel_get_master_addr_by_name(GROUP)
    except redis.RedisError:
        return None
    return int(address[1]) if address else None


def replica_in_sync(sentinel: redis.Redis, port: int) -> bool:
    """The sentinel sees the replica on `port`, up, with its link to the master up: it can promote it."""
    try:
        replicas = sentinel.sentinel_slaves(GROUP)
    except redis.RedisError:
        return False
    return any(
        int(r["port"]) == port
        and r.get("master-link-status") == "ok"
        and not (r.get("is_sdown") or r.get("is_disconnected"))
        for r in replicas
    )


def short_job() -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def text(job: dict) -> str:
    return job["result"]["choices"][0]["message"]["content"]


def test_jobs_run_through_a_sentinel_failover_after_the_master_is_killed(model_cache, tmp_path):
    master = start_redis(tmp_path / "master")
    replica = start_redis(tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(master.port)))
    sentinel_port, sentinel_proc = start_sentinel(tmp_path / "sentinel", master.port)
    sentinel = redis.Redis(port=sentinel_port, decode_responses=True, socket_timeout=2)
    logs = tmp_path / "logs"
    port = free_port()
    env = stack_env(f"sentinel://127.0.0.1:{sentinel_port}/0", model_cache, VLMQ_REDIS_SENTINEL_MASTER=GROUP)
    processes: dict[str, subprocess.Popen] = {}
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: replica_in_sync(sentinel, replica.port), bool, timeout=20, what="sentinel sees the replica")
        assert master_port(sentinel) == master.port
        processes["worker"] = spawn("worker", ["worker", "--concurrency", "2"], env, logs)
        processes["gateway"] = spawn("gateway", ["gateway", "--port", str(port)], env, logs)
        wait_ready(base_url, processes, logs, models={MODEL})
        with httpx.Client(base_url=base_url, headers=AUTH, timeout=60) as client:

            def submit(body: dict | None = None) -> str:
                reply = client.post("/v1/jobs", json=body or short_job())
                assert reply.status_code == 202, reply.text
                return reply.json()["id"]

            def finished(job_id: str, timeout: float = 30) -> dict:
                deadline = time.time() + timeout
                while time.time() < deadline:
                    reply = client.get(f"/v1/jobs/{job_id}", params={"wait": 5})
                    if reply.status_code == 200 and reply.json()["status"] not in ("queued", "running"):
                        return reply.json()
                    time.sleep(0.1)
                raise AssertionError(f"{job_id} did not finish")

            # Before: jobs run, on the master the sentinel named.
            before = {job_id: finished(job_id) for job_id in [submit() for _ in range(3)]}
            assert [job["status"] for job in before.values()] == ["succeeded"] * 3, before
            assert all(text(job) for job in before.values()), before
            assert master.client().exists(*(keys.job(job_id) for job_id in before)) == 3

            # A job generating when the master dies (its record is on the replica, by the WAIT below).
            in_flight = submit(long_job(tokens=1500))
            store = master.client()
            wait_until(
                lambda: store.hmget(keys.job(in_flight), "status", "tokens_generated"),
                lambda s: s[0] == "running" and int(s[1] or 0) > 0,
                timeout=30,
                what="long job generating",
            )
            # Replication is asynchronous: make the replica catch up with everything written so far,
            # so what the test asserts afterwards is what failover promises (writes after this may be lost).
            assert store.execute_command("WAIT", 1, 5000) >= 1
            assert store.hget(keys.job(in_flight), "status") == "running"
            master.process.kill()
            master.process.wait(10)
            killed = time.time()
            # While there is no master: refused with 503 (or, once the replica is promoted, accepted).
            during = client.post("/v1/jobs", json=short_job())
            assert during.status_code in (202, 503), during.text
            if during.status_code == 503:
                assert during.json()["error"]["type"] == "service_unavailable", during.text

            wait_until(lambda: master_port(sentinel), lambda p: p == replica.port, timeout=30, what="failover")
            failover_s = time.time() - killed
            wait_until(lambda: replica.client().info("replication")["role"], lambda r: r == "master", timeout=10)
            wait_until(
                lambda: httpx.get(f"{base_url}/readyz", timeout=5).status_code,
                lambda c: c == 200,
                timeout=30,
                what="/readyz 200 after failover",
            )

            if during.status_code == 202:
                assert finished(during.json()["id"])["status"] == "succeeded"

            # After: the job caught by the failover finished on the new master ...
            job = finished(in_flight)
            assert job["status"] == "succeeded" and text(job), job
            assert replica.client().hget(keys.job(in_flight), "status") == "succeeded"
            assert processes["worker"].poll() is None, "the worker exited when the master went away"
            # ... the jobs finished before are still readable, as they were ...
            for job_id, job in before.items():
                again = client.get(f"/v1/jobs/{job_id}").json()
                assert again["status"] == "succeeded" and text(again) == text(job), again
            # ... and new jobs are accepted and run.
            after = {job_id: finished(job_id) for job_id in [submit() for _ in range(4)]}
            assert [job["status"] for job in after.values()] == ["succeeded"] * 4, after
            assert all(text(job) for job in after.values()), after
            assert replica.client().exists(*(keys.job(job_id) for job_id in after)) == 4
            assert httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200
        for name, proc in processes.items():
            assert proc.poll() is None, f"{name} exited"
        print(f"failover took {failover_s:.1f} s; a submit while the master was down: {during.status_code}")
    except BaseException:
        for name in processes:
            print(f"--- {name} ---\n{(logs / f'{name}.log').read_text(errors='replace')[-6000:]}")
        print((tmp_path / "sentinel" / "sentinel.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        stop(processes)
        for proc in (sentinel_proc, replica.process, master.process):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
