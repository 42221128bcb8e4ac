"""Webhook delivery: the `vlmq webhook-worker` process and the announcer other processes use.

Job processes only *announce* an event (`Announcer`): they create the
delivery record and publish a task on the webhook queue. The webhook
worker, a separate Celery process without torch or the model, sends it
(`WebhookSender.deliver`): signed per Standard Webhooks, to the checked
and pinned address, never following redirects. Success is any 2xx; 410
stops for good; timeouts, connection errors, 429 and 5xx are retried after
the next gap of VLMQ_WEBHOOK_RETRY_SCHEDULE (with jitter, and no sooner
than a Retry-After asks); anything else fails at once. A pump thread moves
deliveries whose retry is due back onto the queue.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from shared.deliveries import Delivery, DeliveryStore
from shared.queues import DELIVER_WEBHOOK_TASK, WEBHOOK_QUEUE, make_celery
from shared.schemas import DeliveryAttempt, WebhookEvent
from shared.settings import SharedSettings
from shared.store import JobRecord
from shared.webhooks import signed_headers
from worker.config import WebhookWorkerSettings
from worker.netguard import DestinationRefused, pinned_post

log = logging.getLogger(__name__)

USER_AGENT = "vlmq-webhooks/1"
# No Retry-After makes us wait longer than a day between two attempts.
MAX_RETRY_AFTER = 86400.0
JITTER = 0.2


def publisher(celery: Any):
    def publish(delivery_id: str, round_: int, attempt: int) -> None:
        celery.send_task(DELIVER_WEBHOOK_TASK, args=[delivery_id, round_, attempt], queue=WEBHOOK_QUEUE)

    return publish


class Announcer:
    """Announce job events as webhook messages (at most one per job and event)."""

    def __init__(self, settings: SharedSettings, redis: Any) -> None:
        self.deliveries = DeliveryStore(redis, settings.result_ttl, settings.webhook_lease)
        self._publish = publisher(make_celery(settings, "vlmq-announcer"))

    def __call__(self, record: JobRecord | None, event: WebhookEvent) -> None:
        if record is None:
            return
        try:
            self.deliveries.announce(record, event, self._publish, time.time())
        except Exception:
            # Created but not published: the due set holds it, a pump sends it after the lease.
            log.exception("could not announce %s for job %s", event.value, record.id)


@dataclass(frozen=True)
class Outcome:
    status_code: int | None = None
    error: str | None = None
    retry: bool = False
    retry_after: float | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """RFC 9110 Retry-After: delay-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


@dataclass
class WebhookSender:
    settings: WebhookWorkerSettings
    deliveries: DeliveryStore
    client: httpx.Client
    keys_by_tenant: dict[str, list[bytes]]
    rng: random.Random

    def deliver(self, delivery_id: str, round_: int, attempt: int) -> None:
        started = time.time()
        delivery = self.deliveries.claim(delivery_id, round_, attempt, started)
        if delivery is None:
            return  # a duplicate of a claimed attempt, a superseded round, or a finished delivery
        outcome = self._send(delivery)
        finished = time.time()
        status, next_at = "failed", None
        if outcome.succeeded:
            status = "succeeded"
        elif outcome.retry and attempt <= len(self.settings.webhook_retry_schedule):
            gap = self.settings.webhook_retry_schedule[attempt - 1] * self.rng.uniform(1 - JITTER, 1 + JITTER)
            if outcome.retry_after is not None:
                gap = max(gap, min(outcome.retry_after, MAX_RETRY_AFTER))
            status, next_at = "pending", finished + gap
        record = DeliveryAttempt(
            attempt=delivery.attempts,
            at=started,
            duration_ms=round((finished - started) * 1000, 2),
            status_code=outcome.status_code,
            error=outcome.error,
            outcome="succeeded" if status == "succeeded" else ("retry" if status == "pending" else "failed"),
        )
        self.deliveries.record(delivery, record, status, next_at)
        log.info(
            "webhook %s attempt %d to %s: %s%s",
            delivery.id,
            attempt,
            delivery.url,
            outcome.status_code or outcome.error,
            f", retry in {next_at - finished:.1f}s" if next_at else "",
        )

    def _send(self, delivery: Delivery) -> Outcome:
        keys = self.keys_by_tenant.get(delivery.tenant)
        if not keys:
            return Outcome(error=f"no webhook secret is configured for tenant '{delivery.tenant}'")
        body = delivery.body.encode()
        headers = {**signed_headers(keys, delivery.id, body), "user-agent": USER_AGENT}
        try:
            response = pinned_post(
                self.client,
                delivery.url,
                content=body,
                headers=headers,
                timeout=self.settings.webhook_timeout,
                allow_private_networks=self.settings.webhook_allow_private_networks,
            )
        except DestinationRefused as exc:
            return Outcome(error=f"refused: {exc}")
        except httpx.TimeoutException:
            return Outcome(error=f"timed out after {self.settings.webhook_timeout:g}s", retry=True)
        except httpx.TransportError as exc:
            return Outcome(error=f"connection failed ({type(exc).__name__})", retry=True)
        code = response.status_code
        if 200 <= code < 300:
            return Outcome(status_code=code)
        if code == 429 or code >= 500:
            return Outcome(
                status_code=code,
                retry=True,
                retry_after=retry_after_seconds(response.headers.get("retry-after"), time.time()),
            )
        if code == 410:
            return Outcome(status_code=code, error="the receiver answered 410 Gone: no more attempts")
        if 300 <= code < 400:
            return Outcome(status_code=code, error="the receiver redirected; redirects are not followed")
        return Outcome(status_code=code, error=f"the receiver refused the message ({code})")


class DuePump:
    """Puts deliveries whose next attempt is due back on the webhook queue."""

    def __init__(self, deliveries: DeliveryStore, publish: Any, interval: float) -> None:
        self._deliveries = deliveries
        self._publish = publish
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlmq-webhook-pump", daemon=True)

    def start(self) -> DuePump:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def pump_once(self) -> int:
        sent = 0
        for delivery_id in self._deliveries.take_due(time.time()):
            delivery = self._deliveries.get(delivery_id)
            if delivery is None or delivery.status != "pending":
                self._deliveries.drop_due(delivery_id)
                continue
            self._publish(delivery.id, delivery.round, delivery.round_attempts + 1)
            sent += 1
        return sent

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.pump_once()
            except Exception as exc:  # Redis restarting: the due set waits for us
                log.warning("webhook pump: %s", exc)


def run_webhook_worker(settings: WebhookWorkerSettings | None = None, *, loglevel: str = "INFO") -> None:
    from shared.redis_conn import sync_redis

    settings = settings or WebhookWorkerSettings()
    redis = sync_redis(settings)
    deliveries = DeliveryStore(redis, settings.result_ttl, settings.webhook_lease)
    client = httpx.Client(trust_env=False, follow_redirects=False)
    sender = WebhookSender(settings, deliveries, client, settings.tenant_webhook_keys, random.Random())
    app = make_celery(settings, "vlmq-webhooks")

    @app.task(name=DELIVER_WEBHOOK_TASK)
    def deliver_webhook(delivery_id: str, round_: int, attempt: int) -> None:
        sender.deliver(delivery_id, round_, attempt)

    pump = DuePump(deliveries, publisher(app), settings.webhook_poll_seconds).start()
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={settings.webhook_concurrency}",
                f"--queues={WEBHOOK_QUEUE}",
                f"--hostname=webhooks@{settings.worker_name}",
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        pump.stop()
        client.close()
        redis.close()
