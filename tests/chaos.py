"""Chaos scenarios on the real stack: processes killed with SIGKILL, Redis
stopped (SIGTERM), killed (SIGKILL) or crashed (SIGKILL and the AOF's last
second cut off) and restarted, a webhook receiver that is down. Everything
runs on 127.0.0.1: redis-server, the gateway, Celery workers and the webhook worker
as subprocesses, and a receiver that verifies every message with the
`standardwebhooks` library.

The test suite runs each scenario small (tests/test_chaos.py);
`scripts/chaos` runs them at full size and prints the figures:

    python -m tests.chaos kill --jobs 200 --kills 5
    python -m tests.chaos redis --jobs 100
    python -m tests.chaos redis-kill --jobs 100
    python -m tests.chaos redis-crash --jobs 100
    python -m tests.chaos webhooks --jobs 50 --down 180
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared import keys
from tests.conftest import (
    KEYS,
    MODEL,
    RedisServer,
    data_url,
    free_port,
    png_bytes,
    spawn,
    stack_env,
    start_redis,
    stop,
    wait_ready,
)
from tests.webhook_receiver import SECRET_A, Receiver, serve

AUTH = {"Authorization": f"Bearer {KEYS['alice']}"}


def start_redis_aof(data_dir: Path, port: int | None = None) -> RedisServer:
    """redis-server as compose.yaml runs it: AOF, fsync every second, noeviction."""
    aof = ("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction")
    return start_redis(data_dir, port=port, persistence=aof, timeout=20)


def job_body(tokens: int, webhook_url: str | None = None, events: tuple[str, ...] = ("job.completed",)) -> dict:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png_bytes((30, 60, 220)))}},
                    {"type": "text", "text": "What color is this image?"},
                ],
            }
        ],
        "max_tokens": tokens,
        "min_tokens": tokens,
    }
    if webhook_url:
        body["webhook"] = {"url": webhook_url, "events": list(events)}
    return body


@dataclass
class Cluster:
    """Gateway, webhook worker and GPU workers on one Redis; workers come and go by name."""

    redis: RedisServer
    env: dict[str, str]
    logs: Path
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    spawned: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, workers: int, concurrency: int = 4, webhooks: bool = True) -> Cluster:
        self.processes["gateway"] = spawn("gateway", ["gateway", "--port", str(self.port)], self.env, self.logs)
        if webhooks:
            self.processes["webhooks"] = spawn("webhooks", ["webhook-worker"], self.env, self.logs)
        for i in range(workers):
            self.add_worker(f"worker-{i}", concurrency)
        wait_ready(self.base_url, self.processes, self.logs)
        self.wait_workers(workers)
        return self

    def add_worker(self, slot: str, concurrency: int = 4) -> subprocess.Popen:
        self.spawned += 1
        proc = spawn(f"{slot}.{self.spawned}", ["worker", "--concurrency", str(concurrency)], self.env, self.logs)
        self.processes[slot] = proc
        return proc

    def worker_name(self, slot: str) -> str:
        return f"{socket.gethostname()}-{self.processes[slot].pid}"

    def wait_workers(self, count: int, timeout: float = 120) -> None:
        store = self.redis.client()
        wait_for(lambda: len(list(store.scan_iter(match=keys.WORKERS_PATTERN))) >= count, timeout, "workers up")

    def stop(self) -> None:
        stop(self.processes)

    def worker_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("worker-*.log")))


def wait_for(predicate, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def submit_all(base_url: str, bodies: list[dict]) -> list[str]:
    ids = []
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=30) as client:
        for body in bodies:
            reply = client.post("/v1/jobs", json=body)
            assert reply.status_code == 202, reply.text
            ids.append(reply.json()["id"])
    return ids


def finished_jobs(base_url: str, ids: list[str], timeout: float) -> list[dict]:
    """Every job once terminal (polled through the gateway)."""
    done: dict[str, dict] = {}
    deadline = time.time() + timeout
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=30) as client:
        while len(done) < len(ids) and time.time() < deadline:
            for job_id in ids:
                if job_id in done:
                    continue
                try:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                except httpx.HTTPError:
                    continue
                if job.get("status") not in (None, "queued", "running"):
                    done[job_id] = job
            time.sleep(0.2)
    missing = [i for i in ids if i not in done]
    assert not missing, f"{len(missing)} jobs never finished, e.g. {missing[:3]}"
    return [done[i] for i in ids]


@contextmanager
def receiver_on(port: int) -> Iterator[Receiver]:
    yield from serve(Receiver(secrets={"a": SECRET_A}, port=port))


def completed_per_id(receiver: Receiver, path: str) -> collections.Counter[str]:
    """How many verified, acknowledged `job.completed` messages arrived per webhook-id."""
    return collections.Counter(
        r.webhook_id
        for r in receiver.at(path)
        if r.verified_with == ["a"] and r.answered == 200 and r.payload["type"] == "job.completed"
    )


def chaos_env(redis_url: str, model_cache: Path, **extra: str) -> dict[str, str]:
    base = {
        "VLMQ_WEBHOOK_SECRETS": f"alice:{SECRET_A}",
        "VLMQ_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "1",
        "VLMQ_WEBHOOK_POLL_SECONDS": "0.2",
        "VLMQ_HEARTBEAT_SECONDS": "0.5",
        "VLMQ_BATCH_WINDOW_MS": "2",
        "VLMQ_RATE_LIMIT": "0",
        "VLMQ_SHUTDOWN_GRACE": "5",
    }
    return stack_env(redis_url, model_cache, **{**base, **extra})


# --- scenarios -------------------------------------------------------------------


def kill_workers(
    model_cache: Path, workdir: Path, jobs: int, kills: int, tokens: int = 1000, concurrency: int = 2
) -> dict[str, Any]:
    """`jobs` jobs through two workers while one of them is SIGKILLed `kills` times mid-batch."""
    redis_server = start_redis_aof(workdir / "redis")
    receiver_port = free_port()
    env = chaos_env(
        redis_server.url,
        model_cache,
        VLMQ_MAX_ATTEMPTS=str(kills + 2),
        # Long enough that the reaper, not the broker, brings nearly every job back; short
        # enough that a message caught between delivery and its job's start is back soon.
        VLMQ_VISIBILITY_TIMEOUT="30",
        VLMQ_WEBHOOK_RETRY_SCHEDULE="0.5,1,2,4",
    )
    cluster = Cluster(redis_server, env, workdir / "logs")
    started = time.time()
    try:
        with receiver_on(receiver_port) as receiver:
            cluster.start(workers=2, concurrency=concurrency)
            url = f"http://127.0.0.1:{receiver_port}/hooks"
            ids = submit_all(cluster.base_url, [job_body(tokens, url) for _ in range(jobs)])
            store = redis_server.client()
            killed_running = []
            for _ in range(kills):
                victim = cluster.worker_name("worker-1")

                def busy(victim: str = victim) -> bool:
                    running = store.zrange(keys.RUNNING, 0, -1)
                    return sum(store.hget(keys.job(j), "worker") == victim for j in running) >= 2

                wait_for(busy, 120, "the victim running jobs")
                killed_running.append(
                    sum(store.hget(keys.job(j), "worker") == victim for j in store.zrange(keys.RUNNING, 0, -1))
                )
                proc = cluster.processes["worker-1"]
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                cluster.add_worker("worker-1", concurrency)
                cluster.wait_workers(2)
            finished = finished_jobs(cluster.base_url, ids, timeout=300)
            elapsed = time.time() - started
            wait_for(lambda: len(completed_per_id(receiver, "/hooks")) >= jobs, 120, "every webhook")
            time.sleep(1.0)  # any duplicate would arrive now
            per_id = completed_per_id(receiver, "/hooks")
        logs = cluster.worker_logs()
        return {
            "jobs": jobs,
            "kills": kills,
            "running_on_the_victim_when_killed": killed_running,
            "succeeded": sum(j["status"] == "succeeded" and j["result"] is not None for j in finished),
            "statuses": dict(collections.Counter(j["status"] for j in finished)),
            "jobs_run_more_than_once": sum(j["attempts"] > 1 for j in finished),
            "reaped": logs.count("reaper: job"),
            "completed_webhooks": sum(per_id.values()),
            "completed_webhook_ids": len(per_id),
            "duplicate_webhooks": sum(n - 1 for n in per_id.values() if n > 1),
            "webhook_ids_match_jobs": set(per_id) == {f"msg_{i}_completed" for i in ids},
            "seconds": round(elapsed, 1),
        }
    finally:
        cluster.stop()
        redis_server.process.terminate()


def restart_redis(
    model_cache: Path, workdir: Path, jobs: int, down: float, tokens: int = 200, how: str = "term"
) -> dict[str, Any]:
    """Stop Redis (AOF on) while jobs are queued and running, start it again on the same port
    and data: none lost. `how`: "term", a clean stop; "kill", SIGKILL; "crash", SIGKILL and the
    AOF cut back to its size a second earlier, what a host crash can leave under everysec."""
    if how not in ("term", "kill", "crash"):
        raise ValueError(f"how: 'term', 'kill' or 'crash', not {how!r}")
    data = workdir / "redis"
    redis_server = start_redis_aof(data)
    servers = [redis_server]
    env = chaos_env(redis_server.url, model_cache)
    cluster = Cluster(redis_server, env, workdir / "logs")
    try:
        cluster.start(workers=1, concurrency=4, webhooks=False)
        ids = submit_all(cluster.base_url, [job_body(tokens) for _ in range(jobs)])
        accepted = time.time()
        store = redis_server.client()
        wait_for(lambda: store.zcard(keys.RUNNING) >= 2, 60, "jobs running")
        aof = aof_file(data)
        if how == "term":
            statuses = statuses_of(store, ids)
            redis_server.process.send_signal(signal.SIGTERM)  # a clean stop: Redis fsyncs the AOF on the way out
        else:
            # With appendfsync everysec a crash can lose the last second of writes, and with them
            # a 202 answered in it (README, Reliability); jobs accepted before must all survive.
            # So: from half a second after the last 202, wait for a second in which a job
            # finished (its writes are the ones at risk), and kill Redis at its end.
            mark, statuses = second_with_a_finish(store, aof, ids, after=accepted + 0.5)
            redis_server.process.kill()
        redis_server.process.wait(30)
        outage_started = time.time()
        dropped = 0
        if how == "crash":  # what was written but not yet fsynced is gone too
            dropped = aof.stat().st_size - mark
            os.truncate(aof, mark)
        kept = statuses_kept(data, workdir / "redis-kept", ids)
        with httpx.Client(base_url=cluster.base_url, headers=AUTH, timeout=30) as client:
            during = client.post("/v1/jobs", json=job_body(4))
        time.sleep(max(0.0, down - (time.time() - outage_started)))
        servers.append(start_redis_aof(data, port=redis_server.port))
        back = time.time()
        finished = finished_jobs(cluster.base_url, ids, timeout=240)
        return {
            "how": how,
            "jobs": jobs,
            "at_stop": dict(collections.Counter(statuses.values())),
            "kept_by_aof": dict(collections.Counter(kept.values())),
            "status_changes_lost": sum(_progress(kept[i]) < _progress(statuses[i]) for i in ids),
            "aof_bytes_dropped": dropped,
            "down_seconds": round(back - outage_started, 1),
            "submit_while_down": [during.status_code, during.json()["error"]["type"]],
            "succeeded": sum(j["status"] == "succeeded" and j["result"] is not None for j in finished),
            "statuses": dict(collections.Counter(j["status"] for j in finished)),
            "seconds_to_finish_after_restart": round(time.time() - back, 1),
            "jobs_run_more_than_once": sum(j["attempts"] > 1 for j in finished),
            "taken_back_by_own_reaper": cluster.worker_logs().count("which no longer runs it; queued again"),
            "processes_exited": sorted(name for name, proc in cluster.processes.items() if proc.poll() is not None),
        }
    finally:
        cluster.stop()
        for server in servers:
            if server.process.poll() is None:
                server.process.terminate()


def _progress(status: str | None) -> int:
    return {None: -1, "queued": 0, "running": 1}.get(status, 2)


def statuses_of(store: Any, ids: list[str]) -> dict[str, str | None]:
    with store.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(keys.job(job_id), "status")
        return dict(zip(ids, pipe.execute(), strict=True))


def aof_file(data: Path) -> Path:
    """The file Redis appends to now (Redis 7: appendonlydir/*.incr.aof; before: appendonly.aof)."""
    found = list(data.glob("appendonlydir/*.incr.aof")) or [data / "appendonly.aof"]
    return max(found, key=lambda path: path.stat().st_mtime)


def second_with_a_finish(
    store: Any, aof: Path, ids: list[str], after: float, timeout: float = 60
) -> tuple[int, dict[str, str | None]]:
    """A second, from `after` on, in which a job succeeded with others still running and queued:
    the AOF's size at its start, and the statuses at its end."""
    time.sleep(max(0.0, after - time.time()))
    deadline = time.time() + timeout
    while time.time() < deadline:
        mark, before = aof.stat().st_size, collections.Counter(statuses_of(store, ids).values())
        time.sleep(1.0)
        statuses = statuses_of(store, ids)
        now = collections.Counter(statuses.values())
        if now["succeeded"] > before["succeeded"] and now["running"] >= 2 and now["queued"] >= 1:
            return mark, statuses
    raise AssertionError("no job finished while others were running and queued")


def statuses_kept(data: Path, copy: Path, ids: list[str]) -> dict[str, str | None]:
    """The job statuses a stopped Redis's AOF holds, read from a copy of it on another port."""
    shutil.copytree(data, copy)
    server = start_redis_aof(copy)
    try:
        return statuses_of(server.client(), ids)
    finally:
        server.process.terminate()
        server.process.wait(10)


def webhook_outage(model_cache: Path, workdir: Path, jobs: int, down: float, schedule: str) -> dict[str, Any]:
    """The receiver is down while jobs finish; every event arrives once it is back, once per webhook-id."""
    redis_server = start_redis_aof(workdir / "redis")
    env = chaos_env(redis_server.url, model_cache, VLMQ_WEBHOOK_RETRY_SCHEDULE=schedule)
    cluster = Cluster(redis_server, env, workdir / "logs")
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks"
    events = ("job.started", "job.completed")
    try:
        cluster.start(workers=1, concurrency=8)
        outage = time.time()
        ids = submit_all(cluster.base_url, [job_body(8, url, events) for _ in range(jobs)])
        finished = finished_jobs(cluster.base_url, ids, timeout=120)
        time.sleep(max(0.0, down - (time.time() - outage)))
        with receiver_on(port) as receiver:
            back = time.time()
            wanted = {f"msg_{i}_{e.split('.')[1]}" for i in ids for e in events}

            def all_in() -> bool:
                return {r.webhook_id for r in receiver.at("/hooks")} >= wanted

            wait_for(all_in, 900, "every webhook after the receiver came back", every=0.2)
            delivered_in = time.time() - back
            time.sleep(2.0)
            got = receiver.at("/hooks")
        per_id = collections.Counter(r.webhook_id for r in got)
        with httpx.Client(base_url=cluster.base_url, headers=AUTH, timeout=30) as client:
            attempts = [len(d["attempts"]) for i in ids for d in client.get(f"/v1/jobs/{i}/deliveries").json()["data"]]
        return {
            "jobs": jobs,
            "down_seconds": round(back - outage, 1),
            "succeeded": sum(j["status"] == "succeeded" for j in finished),
            "events_expected": len(wanted),
            "events_received": len(per_id),
            "all_verified": all(r.verified_with == ["a"] for r in got),
            "duplicates": sum(n - 1 for n in per_id.values() if n > 1),
            "max_attempts_per_delivery": max(attempts),
            "seconds_to_deliver_after_return": round(delivered_in, 1),
        }
    finally:
        cluster.stop()
        redis_server.process.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    kill = sub.add_parser("kill")
    kill.add_argument("--jobs", type=int, default=200)
    kill.add_argument("--kills", type=int, default=5)
    red = sub.add_parser("redis")
    red.add_argument("--jobs", type=int, default=100)
    red.add_argument("--down", type=float, default=10.0)
    for name in ("redis-kill", "redis-crash"):
        red_kill = sub.add_parser(name)
        red_kill.add_argument("--jobs", type=int, default=100)
        red_kill.add_argument("--down", type=float, default=10.0)
    hooks = sub.add_parser("webhooks")
    hooks.add_argument("--jobs", type=int, default=50)
    hooks.add_argument("--down", type=float, default=180.0)
    hooks.add_argument("--schedule", default="5,15,30,60,120,300")
    args = parser.parse_args()

    from worker.engine.tiny import ensure_bundled_model

    with tempfile.TemporaryDirectory(prefix="vlmq-chaos-") as tmp:
        work = Path(tmp)
        cache = work / "models"
        ensure_bundled_model(MODEL, cache)
        threading.current_thread().name = args.scenario
        if args.scenario == "kill":
            result = kill_workers(cache, work, args.jobs, args.kills)
        elif args.scenario.startswith("redis"):
            how = {"redis": "term", "redis-kill": "kill", "redis-crash": "crash"}[args.scenario]
            result = restart_redis(cache, work, args.jobs, args.down, how=how)
        else:
            result = webhook_outage(cache, work, args.jobs, args.down, args.schedule)
        print(json.dumps({"scenario": args.scenario, **result}, indent=2))


if __name__ == "__main__":
    main()
