"""What the gateway decides alone about a job's life: idempotency, TTLs, priority,
cancel, deliveries. Real HTTP, real Redis, no worker."""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

from api_gateway.config import GatewaySettings
from shared import keys
from shared.deliveries import DeliveryStore
from shared.schemas import WebhookEvent
from tests.api_gateway.server import serve
from tests.conftest import KEYS, MODEL
from tests.webhook_receiver import SECRET_A

QUEUE = f"vlmq.model.{MODEL}"


@pytest.fixture
def make_gateway(redis_server, redis_client):
    servers = contextlib.ExitStack()

    def make(**overrides) -> httpx.Client:
        settings = GatewaySettings(
            redis_url=redis_server.url,
            api_keys=[f"{t}:{k}" for t, k in KEYS.items()],
            model=MODEL,
            webhook_secrets=[f"alice:{SECRET_A}"],
            **overrides,
        )
        base_url = servers.enter_context(serve(settings))
        return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=30)

    with servers:
        yield make


@pytest.fixture
def gateway(make_gateway):
    return make_gateway()


def job(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def as_bob(client: httpx.Client) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS['bob']}"}


def queued_messages(redis_client) -> int:
    return sum(redis_client.llen(QUEUE + (f"\x06\x16{p}" if p else "")) for p in range(10))


def test_idempotency_key_returns_the_same_job_and_refuses_another_body(gateway, redis_client):
    first = gateway.post("/v1/jobs", json=job(metadata={"n": "1"}), headers={"Idempotency-Key": "order-42"})
    assert first.status_code == 202
    again = gateway.post("/v1/jobs", json=job(metadata={"n": "1"}), headers={"Idempotency-Key": "order-42"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert queued_messages(redis_client) == 1, "a replay must not queue a second run"
    other = gateway.post("/v1/jobs", json=job(metadata={"n": "2"}), headers={"Idempotency-Key": "order-42"})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    # Keys are per tenant: bob's "order-42" is his own.
    bobs = gateway.post(
        "/v1/jobs", json=job(metadata={"n": "1"}), headers={"Idempotency-Key": "order-42", **as_bob(gateway)}
    )
    assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]
    assert [j["id"] for j in gateway.get("/v1/jobs").json()["data"]] == [first.json()["id"]]
    too_long = gateway.post("/v1/jobs", json=job(), headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "Idempotency-Key"


def test_concurrent_requests_with_one_key_make_one_job(gateway, redis_client):
    import concurrent.futures

    def post(_):
        return gateway.post("/v1/jobs", json=job(), headers={"Idempotency-Key": "race"}).json()["id"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(post, range(8)))
    assert len(ids) == 1
    assert queued_messages(redis_client) == 1


def test_queue_position_follows_priority_then_age(gateway):
    ids = {}
    for name, priority in [("low", 0), ("mid-1", 5), ("urgent", 9), ("mid-2", 5)]:
        reply = gateway.post("/v1/jobs", json=job(priority=priority))
        assert reply.json()["priority"] == priority
        ids[name] = reply.json()["id"]
    positions = {name: gateway.get(f"/v1/jobs/{i}").json()["progress"]["queue_position"] for name, i in ids.items()}
    assert positions == {"urgent": 0, "mid-1": 1, "mid-2": 2, "low": 3}
    gateway.post(f"/v1/jobs/{ids['urgent']}/cancel")
    assert gateway.get(f"/v1/jobs/{ids['low']}").json()["progress"]["queue_position"] == 2
    assert gateway.get(f"/v1/jobs/{ids['urgent']}").json()["progress"]["queue_position"] is None
    assert gateway.post("/v1/jobs", json=job(priority=10)).status_code == 400


def test_priority_picks_the_broker_list(gateway, redis_client):
    gateway.post("/v1/jobs", json=job(priority=9))
    gateway.post("/v1/jobs", json=job(priority=0))
    assert redis_client.llen(QUEUE) == 1  # priority 9 -> the list workers take first
    assert redis_client.llen(QUEUE + "\x06\x169") == 1


def test_ttl_expires_a_queued_job_and_sets_a_default(make_gateway):
    gateway = make_gateway(default_job_ttl=3600)
    defaulted = gateway.post("/v1/jobs", json=job()).json()
    assert defaulted["expires_at"] - defaulted["created_at"] in (3599, 3600, 3601)
    short = gateway.post("/v1/jobs", json=job(ttl_seconds=1)).json()
    assert short["expires_at"] - short["created_at"] in (0, 1, 2)
    time.sleep(1.3)
    expired = gateway.get(f"/v1/jobs/{short['id']}").json()
    assert expired["status"] == "expired" and expired["started_at"] is None
    assert expired["error"]["code"] == "job_expired" and expired["error"]["type"] == "expired_error"
    assert gateway.get(f"/v1/jobs/{defaulted['id']}").json()["status"] == "queued"


def test_result_ttl_then_404_with_a_clear_message(make_gateway):
    gateway = make_gateway(result_ttl=1)
    job_id = gateway.post("/v1/jobs", json=job()).json()["id"]
    assert gateway.get(f"/v1/jobs/{job_id}").status_code == 200
    time.sleep(2.2)
    gone = gateway.get(f"/v1/jobs/{job_id}")
    assert gone.status_code == 404
    assert "VLMQ_RESULT_TTL" in gone.json()["error"]["message"]


def test_webhooks_need_a_tenant_secret_and_an_http_url(gateway):
    hook = {"url": "https://hooks.example.com/vlmq"}
    accepted = gateway.post("/v1/jobs", json=job(webhook=hook)).json()
    assert accepted["webhook"] == {
        "url": "https://hooks.example.com/vlmq",
        "events": ["job.completed", "job.failed", "job.cancelled", "job.expired"],
    }
    refused = gateway.post("/v1/jobs", json=job(webhook=hook), headers=as_bob(gateway))
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "webhook_secret_missing"
    for bad in ("ftp://x/y", "https://u:p@hooks.example.com/", "not a url"):
        reply = gateway.post("/v1/jobs", json=job(webhook={"url": bad}))
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "webhook.url", bad
    unknown = gateway.post("/v1/jobs", json=job(webhook={**hook, "events": ["job.exploded"]}))
    assert unknown.status_code == 400


def test_cancelling_a_queued_job_announces_it_once_and_deliveries_are_tenant_isolated(gateway, redis_client):
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["job.started", "job.cancelled"]}
    job_id = gateway.post("/v1/jobs", json=job(webhook=hook)).json()["id"]
    assert gateway.get(f"/v1/jobs/{job_id}/deliveries").json() == {"object": "list", "data": []}
    assert gateway.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert gateway.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    (delivery,) = gateway.get(f"/v1/jobs/{job_id}/deliveries").json()["data"]
    assert delivery["id"] == f"msg_{job_id}_cancelled" and delivery["event"] == "job.cancelled"
    assert delivery["status"] == "pending" and delivery["attempts"] == []
    # Its first attempt is on the webhook queue (no webhook worker runs here).
    assert redis_client.llen("vlmq.webhooks") == 1
    body = DeliveryStore(redis_client, 60, 30).get(delivery["id"]).body
    assert '"type":"job.cancelled"' in body and '"status":"cancelled"' in body

    assert gateway.get(f"/v1/jobs/{job_id}/deliveries", headers=as_bob(gateway)).status_code == 404
    path = f"/v1/jobs/{job_id}/deliveries/{delivery['id']}/redeliver"
    assert gateway.post(path, headers=as_bob(gateway)).status_code == 404
    resent = gateway.post(path)
    assert resent.status_code == 202 and resent.json()["status"] == "pending"
    assert redis_client.llen("vlmq.webhooks") == 2
    assert redis_client.hget(keys.delivery(delivery["id"]), "round") == "1"
    assert gateway.post(f"/v1/jobs/{job_id}/deliveries/msg_nope/redeliver").status_code == 404
    assert WebhookEvent.cancelled.value == delivery["event"]
