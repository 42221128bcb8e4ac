"""No way in: keys, limits and tenant isolation, on real HTTP with a real Redis.

Two gateway processes' worth of apps share one Redis, as behind a load
balancer, to show the limits hold across processes.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from api_gateway.auth import KeyRing, hashed_entry
from api_gateway.config import GatewaySettings
from shared import keys
from shared.errors import AuthenticationError
from shared.schemas import JobStatus, WebhookEvent
from shared.store import JobStore
from shared.webhooks import message_id
from tests.api_gateway.server import serve
from tests.conftest import KEYS, MODEL, png_bytes
from tests.webhook_receiver import SECRET_A, SECRET_B


def settings(redis_server, **extra) -> GatewaySettings:
    return GatewaySettings(
        redis_url=redis_server.url,
        api_keys=[f"{t}:{k}" for t, k in KEYS.items()],
        model=MODEL,
        webhook_secrets=[f"alice:{SECRET_A}", f"bob:{SECRET_B}"],
        **extra,
    )


def client(base_url: str, tenant: str = "alice") -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=30)


def job(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def error_of(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --- keys ----------------------------------------------------------------------


def test_keys_may_be_configured_as_sha256_digests():
    ring = KeyRing([hashed_entry("carol", "s3cret"), "dave:plain-key", "dave:sha256:" + "ab" * 32])
    assert ring.tenant_for("Bearer s3cret") == "carol"
    assert ring.tenant_for("bearer plain-key") == "dave"
    for wrong in ("Bearer s3cre", "Bearer " + "ab" * 32, "Bearer sha256:" + "ab" * 32, "Basic s3cret"):
        with pytest.raises(AuthenticationError):
            ring.tenant_for(wrong)
    with pytest.raises(ValueError):
        KeyRing(["no-separator"])


def test_key_check_takes_the_same_time_for_near_and_far_misses():
    """Every stored digest is compared, in constant time, whatever the guess."""
    ring = KeyRing([f"t{i}:key-{i:04d}" for i in range(200)])

    def best_of(guess: str) -> float:
        times = []
        for _ in range(30):
            started = time.perf_counter()
            with pytest.raises(AuthenticationError):
                ring.tenant_for(f"Bearer {guess}")
            times.append(time.perf_counter() - started)
        return min(times)

    near, far = best_of("key-0000x"), best_of("zzzzzzzzzz")
    assert 0.5 < near / far < 2.0


# --- limits --------------------------------------------------------------------


def test_rate_limit_is_per_tenant_and_shared_by_gateway_processes(redis_server, redis_client):
    config = settings(redis_server, rate_limit=0.5, rate_limit_burst=4)
    with serve(config) as one, serve(config) as two, client(one) as a1, client(two) as a2, client(one, "bob") as b:
        answers = [c.get("/v1/jobs").status_code for c in (a1, a2, a1, a2, a1, a2)]
        assert answers[:4] == [200] * 4 and answers[4:] == [429, 429]
        limited = a2.get("/v1/jobs")
        error = error_of(limited, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert int(limited.headers["retry-after"]) >= 1
        assert b.get("/v1/jobs").status_code == 200  # another tenant's bucket is full
        assert a1.get("/healthz").status_code == 200  # probes are never limited
        time.sleep(2.1)  # 0.5/s: one request's worth comes back
        assert a1.get("/v1/jobs").status_code == 200
        assert a2.get("/v1/jobs").status_code == 429
    assert 0 < redis_client.pttl(keys.rate_limit("alice")) <= 8000


def test_submits_share_the_bucket_and_a_limited_submit_writes_nothing(redis_server, redis_client):
    from shared.queues import job_message

    config = settings(redis_server, rate_limit=0.2, rate_limit_burst=3)
    with serve(config) as url, client(url) as alice:
        assert alice.post("/v1/jobs", json=job()).status_code == 202
        assert alice.get("/v1/jobs").status_code == 200
        assert alice.post("/v1/jobs", json=job()).status_code == 202
        for limited in (alice.post("/v1/jobs", json=job()), alice.post("/v1/chat/completions", json=job())):
            error = error_of(limited, 429)
            assert error["code"] == "rate_limit_exceeded" and int(limited.headers["retry-after"]) >= 1
        assert alice.get("/v1/jobs").status_code == 429
    # Two jobs: two records, two tasks on the broker's list, two counted.
    assert len(redis_client.zrange(keys.tenant_jobs("alice"), 0, -1)) == 2
    assert redis_client.llen(job_message("any", MODEL, 5).key) == 2


def test_queued_job_quota_counts_unfinished_jobs_only(redis_server, redis_client):
    with serve(settings(redis_server, max_queued_jobs=3)) as base, client(base) as alice, client(base, "bob") as bob:
        ids = [alice.post("/v1/jobs", json=job()).json()["id"] for _ in range(3)]
        over = alice.post("/v1/jobs", json=job())
        error = error_of(over, 429)
        assert error["code"] == "too_many_queued_jobs" and "VLMQ_MAX_QUEUED_JOBS" in error["message"]
        assert int(over.headers["retry-after"]) >= 1
        assert alice.get("/v1/jobs").json()["data"][0]["id"] == ids[-1]  # nothing was written
        assert bob.post("/v1/jobs", json=job()).status_code == 202
        # An Idempotency-Key replay still answers while at the quota.
        redis_client.delete(*redis_client.keys("vlmq:tenant:alice:active"))
        first = alice.post("/v1/jobs", json=job(), headers={"Idempotency-Key": "k"})
        assert first.status_code == 202
        assert alice.post("/v1/jobs", json=job()).status_code == 202
        assert alice.post("/v1/jobs", json=job()).status_code == 202
        assert alice.post("/v1/jobs", json=job()).status_code == 429
        assert alice.post("/v1/jobs", json=job(), headers={"Idempotency-Key": "k"}).status_code == 200
        # A job that finishes (here: cancelled) frees its place; so does one a worker finishes.
        assert alice.post(f"/v1/jobs/{first.json()['id']}/cancel").json()["status"] == "cancelled"
        nxt = alice.post("/v1/jobs", json=job())
        assert nxt.status_code == 202
        JobStore(redis_client, 60).transition(nxt.json()["id"], (JobStatus.queued,), JobStatus.succeeded)
        assert alice.post("/v1/jobs", json=job()).status_code == 202


def test_request_body_size_limit(redis_server, redis_client):
    with serve(settings(redis_server, max_body_bytes=4096)) as base, client(base) as alice:
        big = job(messages=[{"role": "user", "content": "x" * 5000}])
        error = error_of(alice.post("/v1/jobs", json=big), 413)
        assert error["code"] == "request_too_large" and "VLMQ_MAX_BODY_BYTES" in error["message"]

        def chunks():  # no Content-Length: counted as it streams
            yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'

        streamed = alice.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert error_of(streamed, 413)["code"] == "request_too_large"
        assert alice.post("/v1/jobs", json=job()).status_code == 202
        assert not redis_client.keys("vlmq:job:*") or len(redis_client.keys("vlmq:job:*")) == 1


# --- tenant isolation on every route -------------------------------------------

# How to fill each path parameter with an object that belongs to alice. A route
# with a parameter not named here fails the test: teach it the new route.
PARAM_FOR = {
    "job_id": lambda made: made["job_id"],
    "delivery_id": lambda made: made["delivery_id"],
    "uuid": lambda made: made["uuid"],
}


def v1_routes_with_ids(schema: dict) -> list[tuple[str, str, list[str]]]:
    routes = []
    for path, methods in schema["paths"].items():
        names = re.findall(r"{(\w+)}", path)
        if path.startswith("/v1/") and names:
            routes.extend((method.upper(), path, names) for method in methods)
    return routes


def test_no_route_reaches_another_tenants_objects(redis_server, redis_client):
    with serve(settings(redis_server)) as base, client(base) as alice, client(base, "bob") as bob:
        hook = {"url": "https://hooks.example.com/x", "events": ["job.completed"]}
        created = alice.post("/v1/jobs", json=job(webhook=hook, metadata={"secret": "alice"})).json()
        # Finish it and announce, so alice has a delivery id too.
        store = JobStore(redis_client, 60)
        store.transition(created["id"], (JobStatus.queued,), JobStatus.succeeded, {"completed_at": time.time()})
        from shared.deliveries import DeliveryStore

        record = store.get(created["id"])
        DeliveryStore(redis_client, 60, 30).announce(record, WebhookEvent.completed, lambda *a: None, time.time())
        upload = {"file": ("logo.png", png_bytes(), "image/png")}
        stored = alice.post("/v1/media", files=upload, data={"uuid": "logo-7f3a"})
        assert stored.status_code == 201, stored.text
        made = {
            "job_id": created["id"],
            "delivery_id": message_id(created["id"], WebhookEvent.completed),
            "uuid": "logo-7f3a",
        }
        assert len(alice.get(f"/v1/jobs/{created['id']}/deliveries").json()["data"]) == 1

        routes = v1_routes_with_ids(alice.get("/openapi.json").json())
        assert {path for _, path, _ in routes} >= {
            "/v1/jobs/{job_id}",
            "/v1/jobs/{job_id}/cancel",
            "/v1/jobs/{job_id}/deliveries",
        }
        for method, path, names in routes:
            unknown = [n for n in names if n not in PARAM_FOR]
            assert not unknown, f"{method} {path}: teach this test how to make an object for {unknown}"
            url = path.format(**{n: PARAM_FOR[n](made) for n in names})
            theirs = bob.request(method, url, json=job())
            missing_url = re.sub(r"job_\w+", "job_0000", url).replace(made["uuid"], "no-such-media")
            missing = bob.request(method, missing_url, json=job())
            # Another tenant's object answers exactly like one that does not exist.
            assert theirs.status_code == missing.status_code == 404, (method, url, theirs.text)
            assert theirs.json()["error"]["type"] == missing.json()["error"]["type"]
            assert "alice" not in theirs.text

        # Lists: bob's are empty, and alice's id is no cursor for him.
        assert bob.get("/v1/jobs").json()["data"] == []
        assert bob.get("/v1/jobs", params={"after": created["id"]}).status_code == 400
        # Nothing bob did changed alice's job.
        after = alice.get(f"/v1/jobs/{created['id']}").json()
        assert after["status"] == "succeeded" and after["metadata"] == {"secret": "alice"}
        (delivery,) = alice.get(f"/v1/jobs/{created['id']}/deliveries").json()["data"]
        assert delivery["attempts"] == []
        assert alice.get("/v1/media/logo-7f3a").status_code == 200  # bob's DELETE did not reach it
