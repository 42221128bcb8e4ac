"""Load test of job submission against one gateway process, all on 127.0.0.1.

    scripts/loadtest                      # all phases, default sizes
    scripts/loadtest --seconds 20 --connections 32 --rate 2000

One gateway process pinned to one core (taskset, when present), no worker,
the load client on the other cores (raw HTTP/1.1 on keep-alive connections:
httpx would cost more CPU per request than the gateway does).
Phase 1 (closed loop): `--connections` submits always in flight for
`--seconds`: the most the gateway takes, and its latency at that load.
Phase 2 (open loop): submits due at `--rate` per second whether or not the
last were answered; latency is measured from when each was due.
Phase 3 (queue overhead): a worker with the tiny model, jobs submitted one at
a time with `Prefer: wait`, overhead = submit->result wall time minus the
job's own engine and media time (`timings`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
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


def submit_request(base_url: str) -> bytes:
    url = httpx.URL(base_url)
    payload = json.dumps(BODY).encode()
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Authorization: {AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def connect(base_url: str, connections: int, raw: bytes) -> list[Connection]:
    url = httpx.URL(base_url)
    pool = [Connection(*await asyncio.open_connection(url.host, url.port)) for _ in range(connections)]
    for i in range(200):  # warm up: connections, script cache
        await pool[i % connections].request(raw)
    return pool


def summary(latencies: list[float], errors: dict[str, int], elapsed: float) -> dict:
    return {
        "submits": len(latencies),
        "submits_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(pct(latencies, 0.50), 2),
        "p99_ms": round(pct(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
        "errors": errors,
    }


async def closed_loop(base_url: str, seconds: float, connections: int) -> dict:
    """Each connection sends its next submit as soon as the last is answered: the most the gateway takes."""
    raw = submit_request(base_url)
    pool = await connect(base_url, connections, raw)
    latencies: list[float] = []
    errors: dict[str, int] = {}
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
    return {"connections": connections, **summary(latencies, errors, elapsed)}


async def open_loop(base_url: str, seconds: float, rate: float, connections: int, warmup: float = 2.0) -> dict:
    """Submits arrive at `rate` per second whatever the replies do, as independent clients would.

    A submit's latency runs from when it was due, so time spent waiting for a
    free connection (the gateway falling behind) counts against it. The first
    `warmup` seconds at the rate are sent but not counted (the gateway's new
    connections, its Redis pool growing to match).
    """
    raw = submit_request(base_url)
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for conn in await connect(base_url, connections, raw):
        idle.put_nowait(conn)
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def one(due: float) -> None:
        conn = await idle.get()
        status = await conn.request(raw)
        idle.put_nowait(conn)
        if due < counted_from:
            return
        latencies.append((time.perf_counter() - due) * 1000)
        if status != 202:
            errors[str(status)] = errors.get(str(status), 0) + 1

    total = int((warmup + seconds) * rate)
    started = time.perf_counter()
    counted_from = started + warmup
    pending: set[asyncio.Task[None]] = set()  # only those in flight: the client keeps no history
    sent = 0
    while sent < total:
        now = time.perf_counter()
        # The event loop's timers tick in milliseconds: send every submit already due.
        while sent < total and started + sent / rate <= now:
            task = asyncio.ensure_future(one(started + sent / rate))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
    await asyncio.gather(*pending)
    elapsed = time.perf_counter() - counted_from
    while not idle.empty():
        idle.get_nowait().writer.close()
    return {"offered_per_s": rate, "connections": connections, **summary(latencies, errors, elapsed)}


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
    parser.add_argument("--connections", type=int, default=16, help="closed loop: submits in flight")
    parser.add_argument("--rate", type=float, default=1500, help="open loop: submits per second (0: skip)")
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
            # The client's own garbage collector would pause it mid-run (its latency lists
            # grow to tens of thousands of entries) and charge the pause to the gateway.
            gc.disable()
            submit = {"closed_loop": run(closed_loop(base_url, args.seconds, args.connections))}
            redis.client().flushdb()
            if args.rate:
                submit["open_loop"] = run(open_loop(base_url, args.seconds, args.rate, 64))
            gc.enable()
            redis.client().flushdb()
            processes["worker"] = spawn("worker", ["worker", "--concurrency", "1"], env, work / "logs")
            wait_ready(base_url, processes, work / "logs")
            overhead = one_at_a_time(base_url, args.overhead_jobs)
        finally:
            stop(processes)
            redis.process.terminate()
    print(json.dumps({"submit": submit, "queue_overhead": overhead}, indent=2))


if __name__ == "__main__":
    main()
