"""Webhook deliveries: one Redis hash per message, changed only by scripts.

A delivery is one event of one job (`job.completed` of job X), created at
most once: its id is the message's `webhook-id`, derived from job and event,
and creation is a no-op when it exists. So a task that runs twice, or a
gateway and a worker that both see a job end, announce it once.

Attempts are numbered within a *round* (a redelivery starts a new round).
An attempt runs only after it has *claimed* its number, atomically; a
duplicate task for the same attempt finds it taken and does nothing.

The due set (`keys.WEBHOOKS_DUE`) is the safety net and the retry timer: a
pending delivery always has a member there, scored with when to (re)try.
Claiming an attempt pushes its score a lease ahead, so if the process dies
mid-attempt the pump of any webhook worker tries again after the lease.
Retries wait there rather than in Celery countdowns, which the Redis
transport redelivers when they outlast its visibility timeout.

`DeliveryStore` is the blocking face (workers), `AsyncDeliveryStore` the
gateway's; both share the scripts below.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared import keys
from shared.schemas import DeliveryAttempt, DeliveryPublic, WebhookEvent
from shared.store import JobRecord
from shared.webhooks import message_id

Publish = Callable[[str, int, int], None]  # (delivery id, round, attempt)

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[1])
return 1
"""

_CLAIM = """
local state = redis.call('HMGET', KEYS[1], 'status', 'round', 'round_attempts')
if not state[1] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {}
end
if state[1] ~= 'pending' or state[2] ~= ARGV[2] or tonumber(state[3]) ~= tonumber(ARGV[3]) - 1 then return {} end
redis.call('HSET', KEYS[1], 'round_attempts', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""

# ARGV: id, round, ttl, attempt json, status, next_attempt_at ('' = none)
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
if redis.call('HGET', KEYS[1], 'round') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[5], 'next_attempt_at', ARGV[6])
if ARGV[6] == '' then
  redis.call('ZREM', KEYS[3], ARGV[1])
else
  redis.call('ZADD', KEYS[3], tonumber(ARGV[6]), ARGV[1])
end
return 1
"""

_REDELIVER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local round = redis.call('HINCRBY', KEYS[1], 'round', 1)
redis.call('HSET', KEYS[1], 'round_attempts', 0, 'status', 'pending', 'next_attempt_at', ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]), ARGV[1])
return round
"""

# Due members are re-scored a lease ahead as they are taken, so a pump that
# dies before dispatching them loses nothing.
_TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], tonumber(ARGV[2]), id) end
return due
"""


@dataclass
class Delivery:
    id: str
    job_id: str
    tenant: str
    event: WebhookEvent
    url: str
    body: str
    status: str
    created_at: float
    round: int
    round_attempts: int
    attempts: int  # over all rounds
    next_attempt_at: float | None

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> Delivery:
        return cls(
            id=raw["id"],
            job_id=raw["job_id"],
            tenant=raw["tenant"],
            event=WebhookEvent(raw["event"]),
            url=raw["url"],
            body=raw["body"],
            status=raw["status"],
            created_at=float(raw["created_at"]),
            round=int(raw.get("round") or 0),
            round_attempts=int(raw.get("round_attempts") or 0),
            attempts=int(raw.get("attempts") or 0),
            next_attempt_at=float(raw["next_attempt_at"]) if raw.get("next_attempt_at") else None,
        )

    def to_public(self, attempts: list[str]) -> DeliveryPublic:
        return DeliveryPublic(
            id=self.id,
            job_id=self.job_id,
            event=self.event,
            url=self.url,
            status=self.status,  # type: ignore[arg-type]  # written only by the scripts above
            created_at=self.created_at,
            next_attempt_at=self.next_attempt_at if self.status == "pending" else None,
            attempts=[DeliveryAttempt.model_validate_json(a) for a in attempts],
        )


def wanted(record: JobRecord, event: WebhookEvent) -> bool:
    spec = record.webhook
    return spec is not None and event in spec.events


def event_body(record: JobRecord, event: WebhookEvent, now: float) -> str:
    """The message, frozen when the event happens: every attempt sends the same bytes."""
    payload = {
        "type": event.value,
        "timestamp": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
        "data": record.to_public().model_dump(mode="json"),
    }
    return json.dumps(payload, separators=(",", ":"))


def _create_args(record: JobRecord, event: WebhookEvent, now: float, ttl: int, lease: float) -> tuple[str, list[str]]:
    spec = record.webhook
    assert spec is not None
    delivery_id = message_id(record.id, event)
    fields = {
        "id": delivery_id,
        "job_id": record.id,
        "tenant": record.tenant,
        "event": event.value,
        "url": spec.url,
        "body": event_body(record, event, now),
        "status": "pending",
        "created_at": repr(now),
        "round": "0",
        "round_attempts": "0",
        "attempts": "0",
        "next_attempt_at": repr(now),
    }
    args = [delivery_id, str(ttl), repr(now + lease)]
    for name, value in fields.items():
        args += [name, value]
    return delivery_id, args


def _create_keys(record: JobRecord, event: WebhookEvent) -> list[str]:
    delivery_id = message_id(record.id, event)
    return [keys.delivery(delivery_id), keys.job_deliveries(record.id), keys.WEBHOOKS_DUE]


class DeliveryStore:
    """Blocking delivery store for worker threads."""

    def __init__(self, redis: Any, ttl: int, lease: float) -> None:
        self.redis = redis
        self.ttl = ttl
        self.lease = lease
        self._create = redis.register_script(_CREATE)
        self._claim = redis.register_script(_CLAIM)
        self._record = redis.register_script(_RECORD)
        self._redeliver = redis.register_script(_REDELIVER)
        self._take_due = redis.register_script(_TAKE_DUE)

    def announce(self, record: JobRecord, event: WebhookEvent, publish: Publish, now: float) -> bool:
        """Create the delivery of this event unless it exists, and dispatch its first attempt."""
        if not wanted(record, event):
            return False
        delivery_id, args = _create_args(record, event, now, self.ttl, self.lease)
        if not self._create(keys=_create_keys(record, event), args=args):
            return False
        publish(delivery_id, 0, 1)
        return True

    def get(self, delivery_id: str) -> Delivery | None:
        raw = self.redis.hgetall(keys.delivery(delivery_id))
        return Delivery.from_hash(raw) if raw else None

    def claim(self, delivery_id: str, round: int, attempt: int, now: float) -> Delivery | None:
        reply = self._claim(
            keys=[keys.delivery(delivery_id), keys.WEBHOOKS_DUE],
            args=[delivery_id, str(round), str(attempt), repr(now + self.lease)],
        )
        return Delivery.from_hash(dict(zip(reply[::2], reply[1::2], strict=True))) if reply else None

    def record(self, delivery: Delivery, attempt: DeliveryAttempt, status: str, next_attempt_at: float | None) -> bool:
        return bool(
            self._record(
                keys=[keys.delivery(delivery.id), keys.delivery_attempts(delivery.id), keys.WEBHOOKS_DUE],
                args=[
                    delivery.id,
                    str(delivery.round),
                    str(self.ttl),
                    attempt.model_dump_json(),
                    status,
                    repr(next_attempt_at) if next_attempt_at is not None else "",
                ],
            )
        )

    def take_due(self, now: float, limit: int = 100) -> list[str]:
        return list(self._take_due(keys=[keys.WEBHOOKS_DUE], args=[repr(now), repr(now + self.lease), str(limit)]))

    def drop_due(self, delivery_id: str) -> None:
        self.redis.zrem(keys.WEBHOOKS_DUE, delivery_id)

    def public(self, delivery_id: str) -> DeliveryPublic | None:
        delivery = self.get(delivery_id)
        if delivery is None:
            return None
        return delivery.to_public(self.redis.lrange(keys.delivery_attempts(delivery_id), 0, -1))


class AsyncDeliveryStore:
    """The same deliveries for the gateway's event loop."""

    def __init__(self, redis: Any, ttl: int, lease: float) -> None:
        self.redis = redis
        self.ttl = ttl
        self.lease = lease
        self._create = redis.register_script(_CREATE)
        self._redeliver = redis.register_script(_REDELIVER)

    async def announce(self, record: JobRecord, event: WebhookEvent, now: float) -> str | None:
        """Create the delivery unless it exists; its id when this call created it (dispatch it then)."""
        if not wanted(record, event):
            return None
        delivery_id, args = _create_args(record, event, now, self.ttl, self.lease)
        created = await self._create(keys=_create_keys(record, event), args=args)
        return delivery_id if created else None

    async def public(self, delivery_id: str) -> DeliveryPublic | None:
        raw = await self.redis.hgetall(keys.delivery(delivery_id))
        if not raw:
            return None
        return Delivery.from_hash(raw).to_public(await self.redis.lrange(keys.delivery_attempts(delivery_id), 0, -1))

    async def list(self, job_id: str) -> list[DeliveryPublic]:
        ids = await self.redis.lrange(keys.job_deliveries(job_id), 0, -1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for delivery_id in ids:
                pipe.hgetall(keys.delivery(delivery_id))
                pipe.lrange(keys.delivery_attempts(delivery_id), 0, -1)
            replies = await pipe.execute()
        out = []
        for raw, attempts in zip(replies[::2], replies[1::2], strict=True):
            if raw:
                out.append(Delivery.from_hash(raw).to_public(attempts))
        return out

    async def redeliver(self, delivery_id: str, now: float) -> int | None:
        """Start a new round of attempts; its number, or None when the delivery is gone."""
        round_ = await self._redeliver(
            keys=[keys.delivery(delivery_id), keys.WEBHOOKS_DUE], args=[delivery_id, repr(now), repr(now + self.lease)]
        )
        return None if int(round_) < 0 else int(round_)
