"""Load test of job submission against one gateway process, all on 127.0.0.1.

    scripts/loadtest                      # both phases, default sizes
    scripts/loadtest --seconds 20 --connections 64

Phase 1 (throughput): one gateway process pinned to one core (taskset, when
present), no worker, an asyncio httpx client on the other cores keeping
`--connections` submits in flight for `--seconds`; reports submits/s and
latency percentiles. Phase 2 (queue overhead): a worker with the tiny model,
jobs submitted one at a time with `Prefer: wait`, overhead = submit->result
wall time minus the job's own engine and media time (`timings`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import KEYS, MODEL, free_port, spawn, stack_env, start_redis, stop, wait_ready

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "What color is the sky?"}], "max_tokens": 8}
AUTH = {"Authorization": f"Bearer {KEYS['alice']}"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Connection:
    """One keep-alive HTTP/1.1 connection sending a pre-encoded request.

    httpx costs more CPU per request than the gateway does, and the client
    shares a two-core machine with it; this client only writes bytes and
    reads a status line, headers and a Content-Length body.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status


async def hammer(base_url: str, seconds: float, connections: int) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    url = httpx.URL(base_url)
    payload = json.dumps(BODY).encode()
    raw = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Authorization: {AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    pool = [Connection(*await asyncio.open_connection(url.host, url.port)) for _ in range(connections)]
    for i in range(200):  # warm up: connections, script cache
        await pool[i % connections].request(raw)
    stop_at = time.perf_counter() + seconds

    async def drive(conn: Connection) -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            status = await conn.request(raw)
            latencies.append((time.perf_counter() - started) * 1000)
            if status != 202:
                errors[str(status)] = errors.get(str(status), 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(drive(conn) for conn in pool))
    elapsed = time.perf_counter() - started
    for conn in pool:
        conn.writer.close()
    return {
        "submits": len(latencies),
        "submits_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(pct(latencies, 0.50), 2),
        "p99_ms": round(pct(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
        "errors": errors,
    }


def one_at_a_time(base_url: str, jobs: int) -> dict:
    overheads, walls, queued = [], [], []
    with httpx.Client(base_url=base_url, headers={**AUTH, "Prefer": "wait=30"}, timeout=60) as client:
        for i in range(jobs + 5):
            started = time.perf_counter()
            job = client.post("/v1/jobs", json=BODY).json()
            wall = (time.perf_counter() - started) * 1000
            assert job["status"] == "succeeded", job
            if i < 5:
                continue  # warm-up
            timings = job["timings"]
            walls.append(wall)
            overheads.append(wall - timings["inference_ms"] - timings["media_ms"])
            queued.append(timings["queued_ms"])
    return {
        "jobs": jobs,
        "wall_p50_ms": round(statistics.median(walls), 2),
        "overhead_p50_ms": round(statistics.median(overheads), 2),
        "overhead_p99_ms": round(pct(overheads, 0.99), 2),
        "queued_ms_p50": round(statistics.median(queued), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--overhead-jobs", type=int, default=100)
    parser.add_argument("--gateway-core", default="0", help="CPU list for taskset (empty: no pinning)")
    args = parser.parse_args()

    from worker.engine.tiny import ensure_bundled_model

    with tempfile.TemporaryDirectory(prefix="vlmq-load-") as tmp:
        work = Path(tmp)
        cache = Path(os.environ.get("VLMQ_MODEL_CACHE_DIR") or Path.home() / ".cache" / "vlmq" / "models")
        ensure_bundled_model(MODEL, cache)
        redis = start_redis(work / "redis")
        port = free_port()
        env = stack_env(redis.url, cache, VLMQ_RATE_LIMIT="1000000", VLMQ_MAX_QUEUED_JOBS="0", VLMQ_BATCH_WINDOW_MS="0")
        base_url = f"http://127.0.0.1:{port}"
        processes = {"gateway": spawn("gateway", ["gateway", "--port", str(port)], env, work / "logs")}
        try:
            if args.gateway_core and shutil.which("taskset"):
                os.system(f"taskset -a -p -c {args.gateway_core} {processes['gateway'].pid} >/dev/null")
                others = sorted(set(range(os.cpu_count() or 1)) - {int(c) for c in args.gateway_core.split(",")})
                if others:
                    os.sched_setaffinity(0, others)
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if httpx.get(f"{base_url}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            try:  # the gateway runs on uvloop too (uvicorn[standard])
                import uvloop

                run = uvloop.run
            except ImportError:
                run = asyncio.run
            submit = run(hammer(base_url, args.seconds, args.connections))
            redis.client().flushdb()
            processes["worker"] = spawn("worker", ["worker", "--concurrency", "1"], env, work / "logs")
            wait_ready(base_url, processes, work / "logs")
            overhead = one_at_a_time(base_url, args.overhead_jobs)
        finally:
            stop(processes)
            redis.process.terminate()
    print(json.dumps({"connections": args.connections, "submit": submit, "queue_overhead": overhead}, indent=2))


if __name__ == "__main__":
    main()
