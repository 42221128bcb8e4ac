"""The uuid media cache across a real pool: gateway + Redis + two worker processes.

Job 1 sends an image with a uuid and runs on one worker; that worker is then
stopped, so job 2, which sends only the uuid, must run on the other one,
which has never seen the image: it resolves it from the shared tier and
answers the same. Misses (another tenant's uuid, an unknown one, an expired
one) fail the job with `media_cache_miss`. The workers' published counters
show the vision encoder skipped on a hit.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.store import JobStore
from tests.conftest import MODEL, Stack, data_url, free_port, png_bytes, spawn, stack_env, start_redis, stop

pytestmark = pytest.mark.slow

TTL = 10  # VLMQ_MEDIA_CACHE_TTL for the whole pool: short, so expiry is testable
RED, BLUE = (220, 30, 30), (30, 60, 220)


@pytest.fixture(scope="module")
def pool(model_cache, tmp_path_factory) -> Iterator[Stack]:
    redis_server = start_redis(tmp_path_factory.mktemp("cache-redis"))
    logs = tmp_path_factory.mktemp("cache-logs")
    port = free_port()
    env = stack_env(redis_server.url, model_cache, VLMQ_MODEL=MODEL, VLMQ_MEDIA_CACHE_TTL=str(TTL))
    processes = {
        name: spawn(name, ["worker", "--model", MODEL, "--concurrency", "2"], env, logs)
        for name in ("worker-a", "worker-b")
    }
    processes["gateway"] = spawn("gateway", ["gateway", "--port", str(port)], env, logs)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                ready = httpx.get(f"{base_url}/readyz", timeout=2)
                if ready.status_code == 200 and ready.json()["workers"] == 2:
                    break
            except httpx.HTTPError:
                pass
            for name, proc in processes.items():
                assert proc.poll() is None, (logs / f"{name}.log").read_text()[-3000:]
            assert time.time() < deadline, "the pool did not start"
            time.sleep(0.2)
        yield Stack(base_url=base_url, redis=redis_server, processes=processes, logs=logs)
    finally:
        stop(processes)
        redis_server.process.terminate()


def body(*content) -> dict:
    text = {"type": "text", "text": "What color is this image?"}
    return {"model": MODEL, "messages": [{"role": "user", "content": [*content, text]}], "max_tokens": 16}


def image(color, uuid: str | None = None) -> dict:
    part: dict = {"type": "image_url", "image_url": {"url": data_url(png_bytes(color))}}
    return {**part, "uuid": uuid} if uuid else part


def by_uuid(uuid: str) -> dict:
    return {"type": "image_url", "image_url": None, "uuid": uuid}


def run(stack: Stack, client: httpx.Client, payload: dict) -> dict:
    reply = client.post("/v1/jobs", json=payload)
    assert reply.status_code == 202, reply.text
    return stack.wait_job(client, reply.json()["id"])


def tiers(job: dict) -> list[tuple[str | None, str | None]]:
    return [(item["shared"], item["worker"]) for item in job["cache"]["items"]]


def counters(stack: Stack) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{stack.base_url}/metrics").text
    return {
        (s.name, s.labels.get("tier", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vlmq_media_cache_")
    }


def test_send_once_reuse_on_another_worker_and_miss_cleanly(pool, media_server):
    store = JobStore(pool.redis.client(), 3600)
    media_server.routes["/cache-blue.png"] = (200, {"Content-Type": "image/png"}, png_bytes(BLUE))
    with pool.client() as alice, pool.client("bob") as bob:
        # Stored ahead of time: an upload (left alone until it expires), and a URL a worker fetches.
        uploaded_at = time.time()
        upload = alice.post("/v1/media", files={"file": ("r.png", png_bytes(RED))}, data={"uuid": "soon-gone"})
        assert upload.status_code == 201, upload.text
        fetched = alice.post("/v1/media", json={"url": media_server.url("/cache-blue.png"), "uuid": "from-url"})
        assert fetched.status_code == 201, fetched.text
        assert fetched.json()["kind"] == "image"

        first = run(pool, alice, body(image(RED, uuid="u")))
        assert first["status"] == "succeeded", first
        assert tiers(first) == [("stored", "miss")]
        ran_first = store.get(first["id"]).worker

        # Stop the worker that ran job 1: job 2 can only run on the other, which never saw the image.
        (name_a,) = [n for n, p in pool.processes.items() if ran_first == f"{socket.gethostname()}-{p.pid}"]
        pool.processes[name_a].terminate()
        pool.processes[name_a].wait(30)

        second = run(pool, alice, body(by_uuid("u")))
        assert second["status"] == "succeeded", second["error"]
        assert store.get(second["id"]).worker not in (None, ran_first)
        assert second["result"]["choices"] == first["result"]["choices"]
        assert second["result"]["usage"] == first["result"]["usage"]
        assert second["result"]["choices"][0]["message"]["content"] == "The image is mostly red."
        assert tiers(second) == [("hit", "miss")]  # bytes from Redis; decoded and encoded on this worker

        before = counters(pool)
        third = run(pool, alice, body(by_uuid("u")))
        assert tiers(third) == [("hit", "hit")]
        assert third["result"]["choices"] == first["result"]["choices"]
        after = counters(pool)
        # The vision encoder did no work for the third job: one encoder hit, no new encoder miss.
        assert (
            after[("vlmq_media_cache_hits_total", "encoder")]
            == before.get(("vlmq_media_cache_hits_total", "encoder"), 0) + 1
        )
        assert (
            after[("vlmq_media_cache_misses_total", "encoder")] == before[("vlmq_media_cache_misses_total", "encoder")]
        )

        from_url = run(pool, alice, body(by_uuid("from-url")))
        assert from_url["result"]["choices"][0]["message"]["content"] == "The image is mostly blue."

        misses = {
            "another tenant's": run(pool, bob, body(by_uuid("u"))),
            "unknown": run(pool, alice, body(image(BLUE), by_uuid("never-sent"))),
        }
        time.sleep(max(0.0, uploaded_at + TTL + 1.5 - time.time()))
        misses["expired"] = run(pool, alice, body(by_uuid("soon-gone")))
        for case, job in misses.items():
            assert job["status"] == "failed", case
            assert job["error"]["type"] == "media_cache_miss", case
        assert misses["unknown"]["error"]["param"] == "messages[0].content[1].uuid"
        assert misses["expired"]["error"]["param"] == "messages[0].content[0].uuid"

        # The synchronous OpenAI-compatible route answers a miss as a 400 in the same shape.
        sync = alice.post("/v1/chat/completions", json=body(by_uuid("never-sent")))
        assert sync.status_code == 400 and sync.json()["error"]["type"] == "media_cache_miss"
