"""A job's life on the real stack: gateway, GPU worker and webhook worker as
subprocesses on a real Redis, a webhook receiver verifying every message with
the `standardwebhooks` library."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import keys
from shared.queues import RUN_JOB_TASK, make_celery
from shared.settings import SharedSettings
from tests.conftest import MODEL, Stack, data_url, free_port, png_bytes, spawn, stack_env, start_redis, stop, wait_ready
from tests.webhook_receiver import SECRET_A, SECRET_B, Receiver, serve

pytestmark = pytest.mark.slow


def lifecycle_env(redis_url, model_cache):
    return stack_env(
        redis_url,
        model_cache,
        VLMQ_WEBHOOK_SECRETS=f"alice:{SECRET_A},alice:{SECRET_B}",
        VLMQ_WEBHOOK_RETRY_SCHEDULE="0.3,0.6,0.6",
        VLMQ_WEBHOOK_TIMEOUT="1",
        VLMQ_WEBHOOK_ALLOW_PRIVATE_NETWORKS="1",
        VLMQ_WEBHOOK_POLL_SECONDS="0.05",
        VLMQ_PROGRESS_SECONDS="0.1",
        VLMQ_DEFAULT_JOB_TTL="600",
        VLMQ_BATCH_WINDOW_MS="1",
    )


@pytest.fixture(scope="module")
def life(model_cache, tmp_path_factory) -> Iterator[Stack]:
    redis_server = start_redis(tmp_path_factory.mktemp("life-redis"))
    logs = tmp_path_factory.mktemp("life-logs")
    port = free_port()
    env = lifecycle_env(redis_server.url, model_cache)
    processes = {
        # One job at a time, so tests can hold the worker busy and keep others queued.
        "worker": spawn("worker", ["worker", "--concurrency", "1"], env, logs),
        "webhooks": spawn("webhooks", ["webhook-worker", "--concurrency", "4"], env, logs),
        "gateway": spawn("gateway", ["gateway", "--port", str(port)], env, logs),
    }
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, processes, logs)
        yield Stack(base_url=base_url, redis=redis_server, processes=processes, logs=logs)
    finally:
        stop(processes)
        redis_server.process.terminate()


@pytest.fixture(scope="module")
def receiver():
    yield from serve(Receiver(secrets={"a": SECRET_A, "b": SECRET_B}, stall_seconds=1.5))


def text_job(**extra) -> dict:
    return {
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
        "max_tokens": 12,
        **extra,
    }


def long_job(tokens: int = 3000, **extra) -> dict:
    # Exactly `tokens` tokens: long enough to be cancelled mid-run (a few ms each on CPU).
    return text_job(max_tokens=tokens, min_tokens=tokens, **extra)


def wait_until(fetch, predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fetch()
        if predicate(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached: {value}")


def test_the_webhook_worker_runs_without_torch(life):
    maps = Path(f"/proc/{life.processes['webhooks'].pid}/maps").read_text()
    assert "torch" not in maps and "libc" in maps


def test_webhook_retried_after_a_500_and_a_timeout_is_completed_once(life, receiver):
    url = receiver.script("/completed", 500, "stall", 200)
    with life.client() as client:
        created = client.post("/v1/jobs", json=text_job(webhook={"url": url, "events": ["job.completed"]})).json()
        job = life.wait_job(client, created["id"])
        assert job["status"] == "succeeded"
        got = receiver.wait_for("/completed", lambda r: len(r) >= 3)
        assert [r.answered for r in got] == [500, "timeout", 200]
        # Every attempt verifies (with either of the tenant's secrets), carries one id and one body.
        assert all(r.verified_with == ["a", "b"] for r in got)
        assert {r.webhook_id for r in got} == {f"msg_{job['id']}_completed"}
        assert len({r.body for r in got}) == 1
        assert int(got[2].headers["webhook-timestamp"]) >= int(got[0].headers["webhook-timestamp"])
        payload = got[0].payload
        assert payload["type"] == "job.completed"
        assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "succeeded"
        assert payload["data"]["result"] == job["result"]

        # The same task delivered again (a broker redelivery): no second run, no second message.
        celery = make_celery(SharedSettings(redis_url=life.redis.url), "test-producer")
        celery.send_task(RUN_JOB_TASK, args=[job["id"]], queue=f"vlmq.model.{MODEL}")
        time.sleep(1.5)
        assert len(receiver.at("/completed")) == 3
        again = client.get(f"/v1/jobs/{job['id']}").json()
        assert again["attempts"] == 1 and again["result"] == job["result"]

        (delivery,) = client.get(f"/v1/jobs/{job['id']}/deliveries").json()["data"]
        assert delivery["status"] == "succeeded" and delivery["event"] == "job.completed"
        assert [(a["status_code"], a["outcome"]) for a in delivery["attempts"]] == [
            (500, "retry"),
            (None, "retry"),
            (200, "succeeded"),
        ]
        with life.client("bob") as bob:
            assert bob.get(f"/v1/jobs/{job['id']}/deliveries").status_code == 404

        resent = client.post(f"/v1/jobs/{job['id']}/deliveries/{delivery['id']}/redeliver")
        assert resent.status_code == 202
        fourth = receiver.wait_for("/completed", lambda r: len(r) == 4)[-1]
        assert fourth.webhook_id == delivery["id"] and fourth.verified_with == ["a", "b"]
        assert fourth.body == got[0].body
        after = wait_until(
            lambda: client.get(f"/v1/jobs/{job['id']}/deliveries").json()["data"][0],
            lambda d: len(d["attempts"]) == 4,
            what="redelivery recorded",
        )
        assert after["status"] == "succeeded"


def test_cancel_a_running_and_a_queued_job(life, receiver):
    events = ["job.started", "job.completed", "job.cancelled"]
    with life.client() as client:
        running = client.post(
            "/v1/jobs", json=long_job(webhook={"url": receiver.url("/running"), "events": events})
        ).json()
        queued = client.post("/v1/jobs", json=text_job(webhook={"url": receiver.url("/queued"), "events": events}))
        queued = queued.json()
        # Progress: the running job reports tokens as it goes; the other waits first in line.
        busy = wait_until(
            lambda: client.get(f"/v1/jobs/{running['id']}").json(),
            lambda j: (j["progress"]["tokens_generated"] or 0) >= 5,
            what="tokens generated",
        )
        assert busy["status"] == "running" and busy["progress"]["queue_position"] is None
        waiting = client.get(f"/v1/jobs/{queued['id']}").json()
        assert waiting["status"] == "queued" and waiting["progress"]["queue_position"] == 0

        cancelled_queued = client.post(f"/v1/jobs/{queued['id']}/cancel").json()
        assert cancelled_queued["status"] == "cancelled" and cancelled_queued["completed_at"]
        started = time.time()
        assert client.post(f"/v1/jobs/{running['id']}/cancel").json()["status"] == "cancelled"
        stopped = wait_until(
            lambda: client.get(f"/v1/jobs/{running['id']}").json(),
            lambda j: j["result"] is not None,
            timeout=10,
            what="partial result",
        )
        assert time.time() - started < 5, "the engine should stop the request at its next decode step"
        (choice,) = stopped["result"]["choices"]
        assert choice["finish_reason"] == "cancelled" and choice["message"]["content"]
        assert 5 <= stopped["result"]["usage"]["completion_tokens"] < 3000
        assert stopped["status"] == "cancelled"

        # The worker is free again at once, and the queued job's task, when reached, did not run it.
        after = life.wait_job(client, client.post("/v1/jobs", json=text_job()).json()["id"])
        assert after["status"] == "succeeded"
        never = client.get(f"/v1/jobs/{queued['id']}").json()
        assert never["status"] == "cancelled" and never["started_at"] is None and never["attempts"] == 0

    hooks = receiver.wait_for("/running", lambda r: len(r) >= 2)
    assert [r.payload["type"] for r in hooks] == ["job.started", "job.cancelled"]
    assert hooks[1].payload["data"]["result"]["choices"][0]["finish_reason"] == "cancelled"
    (only,) = receiver.wait_for("/queued", lambda r: len(r) >= 1)
    assert only.payload["type"] == "job.cancelled" and only.verified_with == ["a", "b"]
    time.sleep(0.5)
    assert len(receiver.at("/running")) == 2 and len(receiver.at("/queued")) == 1


def test_a_job_not_started_within_its_ttl_expires_without_running(life, receiver):
    with life.client() as client:
        blocker = client.post("/v1/jobs", json=long_job()).json()
        wait_until(lambda: client.get(f"/v1/jobs/{blocker['id']}").json()["status"], lambda s: s == "running")
        late = client.post("/v1/jobs", json=text_job(ttl_seconds=1, webhook={"url": receiver.url("/expired")}))
        late = late.json()
        assert late["expires_at"] - late["created_at"] in (0, 1, 2)
        time.sleep(1.5)
        client.post(f"/v1/jobs/{blocker['id']}/cancel")
        # Not read through the gateway first: the worker itself finds it expired on pickup.
        store = life.redis.client()
        wait_until(lambda: store.hget(keys.job(late["id"]), "status"), lambda s: s == "expired", timeout=30)
        expired = client.get(f"/v1/jobs/{late['id']}").json()
    assert expired["started_at"] is None and expired["attempts"] == 0 and expired["result"] is None
    assert expired["error"]["code"] == "job_expired"
    (hook,) = receiver.wait_for("/expired", lambda r: len(r) >= 1)
    assert hook.payload["type"] == "job.expired" and hook.verified_with == ["a", "b"]


def test_idempotent_submit_runs_once_and_prefer_wait_returns_the_result(life, receiver):
    body = text_job(webhook={"url": receiver.url("/idem"), "events": ["job.started", "job.completed"]})
    with life.client() as client:
        first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "e2e-1", "Prefer": "wait=30"})
        assert first.status_code == 200, first.text  # finished within the wait
        job = first.json()
        assert job["status"] == "succeeded" and first.headers["preference-applied"] == "wait=30"
        assert set(job["timings"]) >= {"queued_ms", "media_ms", "inference_ms"}
        assert job["timings"]["inference_ms"] > 0 and job["timings"]["queued_ms"] >= 0
        assert job["progress"]["tokens_generated"] == job["result"]["usage"]["completion_tokens"]
        assert job["expires_at"] - job["created_at"] in (599, 600, 601)  # VLMQ_DEFAULT_JOB_TTL
        replay = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "e2e-1"})
        assert replay.status_code == 200 and replay.json()["id"] == job["id"]
        assert replay.json()["attempts"] == 1
        changed = client.post("/v1/jobs", json=text_job(), headers={"Idempotency-Key": "e2e-1"})
        assert changed.status_code == 409
    hooks = receiver.wait_for("/idem", lambda r: len(r) >= 2)
    time.sleep(0.5)
    assert [r.payload["type"] for r in receiver.at("/idem")] == ["job.started", "job.completed"]
    assert hooks[0].payload["data"]["status"] == "running"


def test_priority_order_is_honoured_by_the_worker(life, model_cache):
    """Fill the queue while no worker runs, then start one with concurrency 1."""
    stop({"worker": life.processes["worker"]})
    submitted = []
    with life.client() as client:
        wait_until(lambda: client.get("/readyz").status_code, lambda s: s == 503, what="worker gone")
        for priority in (0, 5, 9, 1, 9, 5, 3):
            submitted.append((priority, client.post("/v1/jobs", json=text_job(priority=priority, max_tokens=2)).json()))
        positions = [client.get(f"/v1/jobs/{j['id']}").json()["progress"]["queue_position"] for _, j in submitted]
        assert positions == [6, 2, 0, 5, 1, 3, 4]
        env = lifecycle_env(life.redis.url, model_cache)
        life.processes["worker"] = spawn("worker-2", ["worker", "--concurrency", "1"], env, life.logs)
        wait_ready(life.base_url, {"worker": life.processes["worker"]}, life.logs)
        for _, job in submitted:
            assert life.wait_job(client, job["id"])["status"] == "succeeded"
    store = life.redis.client()
    order = sorted(submitted, key=lambda pj: float(store.hget(keys.job(pj[1]["id"]), "started_at")))
    assert [p for p, _ in order] == [9, 9, 5, 5, 3, 1, 0]
    assert [j["id"] for p, j in order if p == 9] == [j["id"] for p, j in submitted if p == 9]  # FIFO within one
