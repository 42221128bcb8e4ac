"""Webhook delivery against a real receiver on 127.0.0.1 and a real Redis.

The sender, delivery store and due pump are vlmq's own; only the Celery
queue between them is replaced by a thread pool here (the end-to-end tests
run the real `vlmq webhook-worker`).
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from shared.deliveries import DeliveryStore
from shared.schemas import DeliveryPublic, WebhookEvent
from shared.store import JobRecord, new_job_id
from tests.webhook_receiver import SECRET_A, SECRET_B, Receiver, serve
from worker.config import WebhookWorkerSettings
from worker.webhooks import DuePump, WebhookSender, retry_after_seconds


@pytest.fixture
def receiver():
    yield from serve(Receiver(secrets={"a": SECRET_A, "b": SECRET_B}, stall_seconds=1.0))


class Harness:
    def __init__(self, redis_client, *, schedule, allow_private=True, timeout=0.5, lease=30.0):
        self.settings = WebhookWorkerSettings(
            webhook_retry_schedule=schedule,
            webhook_timeout=timeout,
            webhook_allow_private_networks=allow_private,
            webhook_secrets=[f"alice:{SECRET_A}", f"alice:{SECRET_B}"],
        )
        self.deliveries = DeliveryStore(redis_client, 3600, lease)
        self.client = httpx.Client(trust_env=False)
        self.sender = WebhookSender(
            self.settings, self.deliveries, self.client, self.settings.tenant_webhook_keys, random.Random(0)
        )
        self.pool = ThreadPoolExecutor(4)
        self.published: list[tuple[str, int, int]] = []
        self.pump = DuePump(self.deliveries, self.publish, 0.02).start()

    def publish(self, delivery_id: str, round_: int, attempt: int) -> None:
        self.published.append((delivery_id, round_, attempt))
        self.pool.submit(self.sender.deliver, delivery_id, round_, attempt)

    def announce(self, url: str, event=WebhookEvent.completed, tenant="alice") -> tuple[JobRecord, bool]:
        record = JobRecord(
            id=new_job_id(),
            tenant=tenant,
            model="m",
            request={"model": "m", "webhook": {"url": url, "events": [e.value for e in WebhookEvent]}},
        )
        return record, self.deliveries.announce(record, event, self.publish, time.time())

    def settled(self, delivery_id: str, timeout: float = 15) -> DeliveryPublic:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.deliveries.public(delivery_id)
            if found is not None and found.status != "pending":
                return found
            time.sleep(0.02)
        raise AssertionError(f"delivery {delivery_id} still pending: {self.deliveries.public(delivery_id)}")

    def close(self):
        self.pump.stop()
        self.pool.shutdown(wait=True)
        self.client.close()


@pytest.fixture
def harness(redis_client):
    made = []

    def make(**kwargs):
        made.append(Harness(redis_client, **kwargs))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_retries_a_500_and_a_timeout_then_succeeds_once(harness, receiver):
    h = harness(schedule=[0.2, 0.4, 0.4])
    url = receiver.script("/hook", 500, "stall", 200)
    record, created = h.announce(url)
    assert created
    delivery = h.settled(f"msg_{record.id}_completed")
    assert delivery.status == "succeeded"
    assert [(a.status_code, a.outcome) for a in delivery.attempts] == [
        (500, "retry"),
        (None, "retry"),
        (200, "succeeded"),
    ]
    assert "timed out" in delivery.attempts[1].error
    got = receiver.at("/hook")
    assert [r.answered for r in got] == [500, "timeout", 200]
    # One message: the same id and body on every attempt, each signed afresh with both secrets.
    assert {r.webhook_id for r in got} == {delivery.id}
    assert {r.body for r in got} == {got[0].body}
    assert all(r.verified_with == ["a", "b"] for r in got)
    payload = got[0].payload
    assert payload["type"] == "job.completed" and payload["data"]["id"] == record.id
    assert payload["timestamp"].endswith("Z")
    # The schedule's gaps (with up to 20% jitter) separate the attempts.
    assert got[1].at - got[0].at >= 0.2 * 0.8
    assert got[2].at - got[1].at >= 0.4 * 0.8 + 0.5  # the stalled attempt waited out its timeout first


def test_gone_stops_and_other_4xx_fail_without_retry(harness, receiver):
    h = harness(schedule=[0.1, 0.1])
    for path, status in [("/gone", 410), ("/bad", 400), ("/moved", 302)]:
        record, _ = h.announce(receiver.script(path, status))
        delivery = h.settled(f"msg_{record.id}_completed")
        assert delivery.status == "failed" and len(delivery.attempts) == 1, path
        assert delivery.attempts[0].status_code == status
    time.sleep(0.3)
    assert len(receiver.at("/gone")) == len(receiver.at("/bad")) == len(receiver.at("/moved")) == 1


def test_gives_up_after_the_schedule(harness, receiver):
    h = harness(schedule=[0.1, 0.1])
    record, _ = h.announce(receiver.script("/down", 503, 503, 503, 503))
    delivery = h.settled(f"msg_{record.id}_completed")
    assert delivery.status == "failed"
    assert [a.outcome for a in delivery.attempts] == ["retry", "retry", "failed"]
    assert len(receiver.at("/down")) == 3


def test_retry_after_is_honoured(harness, receiver):
    h = harness(schedule=[0.05])
    record, _ = h.announce(receiver.script("/busy", (429, {"Retry-After": "1"}), 200))
    assert h.settled(f"msg_{record.id}_completed").status == "succeeded"
    first, second = receiver.at("/busy")
    assert second.at - first.at >= 1.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", time.time()) == 0.0
    assert retry_after_seconds("120", 0) == 120.0 and retry_after_seconds("soon", 0) is None


def test_private_addresses_are_refused_unless_allowed(harness, receiver):
    h = harness(schedule=[0.1], allow_private=False)
    record, _ = h.announce(receiver.script("/private", 200))
    delivery = h.settled(f"msg_{record.id}_completed")
    assert delivery.status == "failed" and "non-public" in delivery.attempts[0].error
    record, _ = h.announce("http://localhost:1/x")
    assert "non-public" in h.settled(f"msg_{record.id}_completed").attempts[0].error
    assert receiver.at("/private") == []


def test_an_event_is_announced_once_and_an_attempt_claimed_once(harness, receiver):
    h = harness(schedule=[0.1])
    url = receiver.script("/once", 200)
    record, created = h.announce(url)
    assert created
    assert not h.deliveries.announce(record, WebhookEvent.completed, h.publish, time.time())
    delivery_id = f"msg_{record.id}_completed"
    h.publish(delivery_id, 0, 1)  # a duplicate task for the same attempt
    assert h.settled(delivery_id).status == "succeeded"
    time.sleep(0.3)
    assert len(receiver.at("/once")) == 1


def test_a_tenant_without_a_secret_gets_no_unsigned_message(harness, receiver):
    h = harness(schedule=[0.1])
    record, _ = h.announce(receiver.script("/nosecret", 200), tenant="mallory")
    delivery = h.settled(f"msg_{record.id}_completed")
    assert delivery.status == "failed" and "no webhook secret" in delivery.attempts[0].error
    assert receiver.at("/nosecret") == []


def test_a_claimed_attempt_whose_sender_died_is_retried_after_the_lease(harness, receiver, redis_client):
    h = harness(schedule=[5.0], lease=0.5)
    url = receiver.script("/lease", 200)
    record = JobRecord(id=new_job_id(), tenant="alice", model="m", request={"model": "m", "webhook": {"url": url}})
    delivery_id = f"msg_{record.id}_completed"
    # Announced, and attempt 1 claimed by a process that then died before sending.
    assert h.deliveries.announce(record, WebhookEvent.completed, lambda *a: None, time.time())
    assert h.deliveries.claim(delivery_id, 0, 1, time.time()) is not None
    delivery = h.settled(delivery_id, timeout=5)
    assert delivery.status == "succeeded" and len(receiver.at("/lease")) == 1
    assert (delivery_id, 0, 2) in h.published
