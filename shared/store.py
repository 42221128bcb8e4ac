"""The job store: one Redis hash per job, changed only by atomic transitions.

A transition is a Lua script: it moves a job from one of the allowed statuses
to a new one, writes the given fields, renews the TTL and publishes the new
status on the job's channel, all at once. So a job cancelled while running
cannot later be marked succeeded, and two deliveries of the same task cannot
both store a result. `JobStore` is the blocking face (worker threads),
`AsyncJobStore` the asyncio one (gateway); both share the record format and
the scripts below.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import keys
from shared.catalog import queue_name
from shared.queues import TaskMessage
from shared.schemas import (
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    ChatCompletion,
    ErrorBody,
    JobProgress,
    JobPublic,
    JobStatus,
    MediaCacheReport,
    Timings,
    WebhookSpec,
)

# KEYS: job, its events channel, the running index. ARGV: allowed statuses,
# new status, ttl, count attempt (1/0), now, expected worker ('' = any), leave
# the request out of the reply (1/0), then field/value pairs. The expected
# worker makes "take a dead worker's job back" a compare-and-set: of two
# processes that both saw it, one wins.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, '', {}} end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then allowed = true end
end
if not allowed then return {0, cur, {}} end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[6] then return {0, cur, {}} end
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
local id = redis.call('HGET', KEYS[1], 'id')
local qkey = redis.call('HGET', KEYS[1], 'qkey')
if qkey then
  if ARGV[2] == 'queued' then
    -- queue_score() below, in Lua: back in line by priority, behind those already waiting.
    local priority = tonumber(redis.call('HGET', KEYS[1], 'priority') or '5')
    redis.call('ZADD', qkey, (9 - priority) * 1e10 + tonumber(ARGV[5]), id)
    redis.call('EXPIRE', qkey, tonumber(ARGV[3]))
  else
    redis.call('ZREM', qkey, id)
  end
end
if ARGV[2] == 'running' then
  redis.call('ZADD', KEYS[3], tonumber(ARGV[5]), id)
else
  redis.call('ZREM', KEYS[3], id)
end
if ARGV[2] ~= 'queued' and ARGV[2] ~= 'running' then
  local akey = redis.call('HGET', KEYS[1], 'akey')
  if akey then redis.call('ZREM', akey, id) end
  if cur ~= ARGV[2] then
    -- shared.metrics' field format. A job enters a terminal status once (a cancelled job's
    -- later cancelled -> cancelled write only adds fields), so it counts once.
    local model = redis.call('HGET', KEYS[1], 'model') or ''
    redis.call('HINCRBY', KEYS[4], 'jobs_finished\tmodel=' .. model .. '\tstatus=' .. ARGV[2], 1)
  end
end
redis.call('PUBLISH', KEYS[2], ARGV[2])
local flat = redis.call('HGETALL', KEYS[1])
if ARGV[7] == '1' then
  local kept = {}
  for i = 1, #flat, 2 do
    if flat[i] ~= 'request' then
      kept[#kept + 1] = flat[i]
      kept[#kept + 1] = flat[i + 1]
    end
  end
  flat = kept
end
return {1, ARGV[2], flat}
"""

# A Lua function: GCRA, the token bucket of the per-tenant rate limit. `key` holds the
# theoretical arrival time of the next request; Redis's clock, so every gateway agrees.
# Counts the request and returns 0, or returns the ms to wait (and counts nothing).
GCRA_FUNCTION = """
local function gcra(key, interval, burst)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  interval = tonumber(interval)
  burst = tonumber(burst)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local next_tat = tat + interval
  local wait = next_tat - interval * burst - now
  if wait > 0 then return math.ceil(wait) end
  redis.call('SET', key, tostring(next_tat), 'PX', math.max(1, math.ceil(next_tat - now)))
  return 0
end
"""

# Accepting a job, all in one step. KEYS: job, tenant index, queue-position index,
# tenant's active jobs, Idempotency-Key (the job key again when none), broker list
# (ditto when nothing is published), metrics, rate-limit bucket (ditto when none).
# ARGV: ttl, created_at, queue score, most active jobs (0 = no limit), id,
# Idempotency-Key value ('' = none), task message ('' = none), metrics field,
# rate limit's ms per request ('' = none) and burst, the hash's field/value pairs (a JSON list).
# Returns {1, queue position} when accepted, {0} when the tenant is at its quota
# (nothing written), {2, the key's value} when the Idempotency-Key was used before,
# {3, ms to wait} when the tenant is over its rate (nothing written).
# The rate is checked first (a replay is a request too), then the key, so a
# replay is answered even at the quota; the quota check and the write are one
# step, so parallel submits cannot overshoot it; the task goes on the broker's
# list with the record, so a job is never written without its task nor its
# task sent without the job.
_CREATE = (
    GCRA_FUNCTION
    + """
if ARGV[9] ~= '' then
  local wait = gcra(KEYS[8], ARGV[9], ARGV[10])
  if wait > 0 then return {3, wait} end
end
local ttl = tonumber(ARGV[1])
local created = tonumber(ARGV[2])
local limit = tonumber(ARGV[4])
if ARGV[6] ~= '' then
  local earlier = redis.call('GET', KEYS[5])
  if earlier then return {2, earlier} end
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', created - ttl)
if limit > 0 and redis.call('ZCARD', KEYS[4]) >= limit then return {0} end
redis.call('HSET', KEYS[1], unpack(cjson.decode(ARGV[11])))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], created, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', created - ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[5])
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('ZADD', KEYS[4], created, ARGV[5])
redis.call('EXPIRE', KEYS[4], ttl)
if ARGV[6] ~= '' then redis.call('SET', KEYS[5], ARGV[6], 'EX', ttl) end
if ARGV[7] ~= '' then redis.call('LPUSH', KEYS[6], ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HINCRBY', KEYS[7], ARGV[8], 1) end
return {1, redis.call('ZRANK', KEYS[3], ARGV[5])}
"""
)

# Only while a job is running, and only if it still exists: a late progress
# write must neither resurrect an expired record nor touch a finished one.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'tokens_generated', ARGV[1])
  return 1
end
return 0
"""


def queue_score(priority: int, enqueued_at: float) -> float:
    """Order of the queue-position index: urgent first, then oldest first (the broker's order)."""
    return (PRIORITY_MAX - priority) * 1e10 + enqueued_at


_JSON_FIELDS = ("request", "metadata", "result", "error", "timings", "cache")
_FLOAT_FIELDS = ("started_at", "completed_at", "expires_at")


def new_job_id() -> str:
    # Time-ordered prefix keeps ids roughly sortable in logs; the rest is random.
    return f"job_{int(time.time() * 1000):x}{secrets.token_hex(8)}"


@dataclass
class JobRecord:
    id: str
    tenant: str
    model: str
    request: dict[str, Any]
    status: JobStatus = JobStatus.queued
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    attempts: int = 0
    # A queued job not started by then ends `expired` (ttl_seconds or VLMQ_DEFAULT_JOB_TTL).
    expires_at: float | None = None
    # The worker that last moved it to running: tells a dead worker's job from a live one's.
    worker: str | None = None
    tokens_generated: int | None = None
    cache: dict[str, Any] | None = None

    @property
    def priority(self) -> int:
        return int(self.request.get("priority", PRIORITY_DEFAULT))

    @property
    def webhook(self) -> WebhookSpec | None:
        raw = self.request.get("webhook")
        return WebhookSpec.model_validate(raw) if raw else None

    def to_hash(self) -> dict[str, str]:
        out: dict[str, str] = {
            "id": self.id,
            "tenant": self.tenant,
            "model": self.model,
            "status": self.status.value,
            "created_at": repr(self.created_at),
            "attempts": str(self.attempts),
            "priority": str(self.priority),
            "qkey": keys.queued(queue_name(self.model)),
            "akey": keys.tenant_active(self.tenant),
        }
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = repr(value)
        for name in ("worker", "tokens_generated"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value)
        for name in _JSON_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = json.dumps(value, separators=(",", ":"))
        return out

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> JobRecord:
        def opt_float(name: str) -> float | None:
            return float(raw[name]) if raw.get(name) else None

        def opt_json(name: str) -> Any:
            return json.loads(raw[name]) if raw.get(name) else None

        return cls(
            id=raw["id"],
            tenant=raw["tenant"],
            model=raw["model"],
            request=opt_json("request") or {},
            status=JobStatus(raw["status"]),
            created_at=float(raw["created_at"]),
            started_at=opt_float("started_at"),
            completed_at=opt_float("completed_at"),
            metadata=opt_json("metadata") or {},
            result=opt_json("result"),
            error=opt_json("error"),
            timings=opt_json("timings"),
            attempts=int(raw.get("attempts") or 0),
            expires_at=opt_float("expires_at"),
            worker=raw.get("worker") or None,
            tokens_generated=int(raw["tokens_generated"]) if raw.get("tokens_generated") else None,
            cache=opt_json("cache"),
        )

    def to_public(self, queue_position: int | None = None) -> JobPublic:
        return JobPublic(
            id=self.id,
            model=self.model,
            status=self.status,
            created_at=int(self.created_at),
            started_at=int(self.started_at) if self.started_at else None,
            completed_at=int(self.completed_at) if self.completed_at else None,
            metadata=self.metadata,
            result=ChatCompletion.model_validate(self.result) if self.result else None,
            error=ErrorBody.model_validate(self.error) if self.error else None,
            attempts=self.attempts,
            timings=Timings.model_validate(self.timings) if self.timings else None,
            priority=self.priority,
            expires_at=int(self.expires_at) if self.expires_at else None,
            webhook=self.webhook,
            progress=JobProgress(
                queue_position=queue_position if self.status is JobStatus.queued else None,
                tokens_generated=self.tokens_generated,
            ),
            cache=MediaCacheReport.model_validate(self.cache) if self.cache else None,
        )


@dataclass(frozen=True)
class Created:
    """Outcome of `AsyncJobStore.create`: `accepted`, or why not.

    Not accepted with `wait_ms` set: over the rate limit, retry after that
    long; with `earlier` set: the Idempotency-Key was used before and
    `earlier` is the value kept for it; with neither: the tenant is at its quota.
    """

    accepted: bool
    queue_position: int | None = None
    earlier: str | None = None
    wait_ms: int | None = None


@dataclass(frozen=True)
class Transition:
    """Outcome of a transition: `applied` is False when the job was elsewhere (or gone).

    `record` is the job as the transition left it (read in the same script,
    so no later change can slip in between): what a webhook announces.
    """

    applied: bool
    status: JobStatus | None
    record: JobRecord | None = None


def _transition_args(
    allowed: Iterable[JobStatus],
    to: JobStatus,
    ttl: int,
    fields: Mapping[str, Any],
    count_attempt: bool,
    expect_worker: str | None = None,
    omit_request: bool = False,
) -> list[str]:
    args = [
        ",".join(s.value for s in allowed),
        to.value,
        str(ttl),
        "1" if count_attempt else "0",
        repr(time.time()),
        expect_worker or "",
        "1" if omit_request else "0",
    ]
    for name, value in fields.items():
        args.append(name)
        if name in _JSON_FIELDS:
            args.append(json.dumps(value, separators=(",", ":")))
        else:
            args.append(repr(value) if isinstance(value, float) else str(value))
    return args


def _transition_keys(job_id: str) -> list[str]:
    return [keys.job(job_id), keys.job_events(job_id), keys.RUNNING, keys.METRICS]


def _transition_result(reply: list[Any], request: dict[str, Any] | None = None) -> Transition:
    applied, status, flat = int(reply[0]), reply[1], reply[2]
    if isinstance(status, bytes):
        status = status.decode()
    record = JobRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True))) if flat else None
    if record is not None and request is not None:
        record.request = request
    return Transition(bool(applied), JobStatus(status) if status else None, record)


class JobStore:
    """Blocking job store for worker threads (redis-py clients are thread-safe)."""

    def __init__(self, redis: Any, result_ttl: int) -> None:
        self.redis = redis
        self.result_ttl = result_ttl
        self._transition = redis.register_script(_TRANSITION)
        self._progress = redis.register_script(_PROGRESS)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def status(self, job_id: str) -> JobStatus | None:
        raw = self.redis.hget(keys.job(job_id), "status")
        return JobStatus(raw) if raw else None

    def set_progress(self, job_id: str, tokens_generated: int) -> bool:
        return bool(self._progress(keys=[keys.job(job_id)], args=[str(tokens_generated)]))

    def transition(
        self,
        job_id: str,
        allowed: Iterable[JobStatus],
        to: JobStatus,
        fields: Mapping[str, Any] | None = None,
        *,
        count_attempt: bool = False,
        expect_worker: str | None = None,
        request: dict[str, Any] | None = None,
    ) -> Transition:
        """Move the job if its status is one of `allowed` (and, given `expect_worker`, that worker holds it).

        A job's request is written when it is created and never changes; a
        caller that holds it already passes it as `request`, and the record
        returned carries it without Redis sending it again (with inline media
        it is most of the record, and parsing it holds the GIL).
        """
        args = _transition_args(
            allowed, to, self.result_ttl, fields or {}, count_attempt, expect_worker, request is not None
        )
        return _transition_result(self._transition(keys=_transition_keys(job_id), args=args), request)

    def running(self) -> list[str]:
        """Ids of the jobs marked running now, on any worker."""
        return list(self.redis.zrange(keys.RUNNING, 0, -1))


class AsyncJobStore:
    """The same store for the gateway's event loop."""

    def __init__(self, redis: Any, result_ttl: int) -> None:
        self.redis = redis
        self.result_ttl = result_ttl
        self._transition = redis.register_script(_TRANSITION)
        self._create = redis.register_script(_CREATE)

    async def create(
        self,
        record: JobRecord,
        max_active: int = 0,
        *,
        message: TaskMessage | None = None,
        idempotency: tuple[str, str] | None = None,
        metric: str | None = None,
        rate: tuple[str, str, str] | None = None,
    ) -> Created:
        """Write a new job and, in the same step, push its task `message` and count `metric`.

        Nothing is written when the tenant already has `max_active` unfinished
        jobs, or when `idempotency` (the key's Redis name, the value to keep
        there) names a key used before, or when the request is over the rate
        limit `rate` (bucket key, ms per request, burst; counted here):
        `Created` says which.
        """
        job_key = keys.job(record.id)
        args: list[Any] = [
            self.result_ttl,
            repr(record.created_at),
            repr(queue_score(record.priority, record.created_at)),
            max_active,
            record.id,
            idempotency[1] if idempotency else "",
            message.body if message else "",
            metric or "",
            rate[1] if rate else "",
            rate[2] if rate else "",
        ]
        # The hash as one JSON list of field/value pairs: one argument to encode, not thirty.
        args.append(json.dumps([item for pair in record.to_hash().items() for item in pair], separators=(",", ":")))
        reply = await self._create(
            keys=[
                job_key,
                keys.tenant_jobs(record.tenant),
                keys.queued(queue_name(record.model)),
                keys.tenant_active(record.tenant),
                idempotency[0] if idempotency else job_key,
                message.key if message else job_key,
                keys.METRICS,
                rate[0] if rate else job_key,
            ],
            args=args,
        )
        outcome = int(reply[0])
        if outcome == 1:
            return Created(True, queue_position=int(reply[1]))
        if outcome == 3:
            return Created(False, wait_ms=int(reply[1]))
        return Created(False, earlier=reply[1] if outcome == 2 else None)

    async def active_jobs(self, tenant: str) -> int:
        """The tenant's jobs not finished yet (queued or running)."""
        return int(await self.redis.zcard(keys.tenant_active(tenant)))

    async def queue_position(self, record: JobRecord) -> int | None:
        """Queued jobs ahead of this one in its model's queue (0 = next), or None when not queued."""
        if record.status is not JobStatus.queued:
            return None
        rank = await self.redis.zrank(keys.queued(queue_name(record.model)), record.id)
        return int(rank) if rank is not None else None

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    async def transition(
        self,
        job_id: str,
        allowed: Iterable[JobStatus],
        to: JobStatus,
        fields: Mapping[str, Any] | None = None,
    ) -> Transition:
        args = _transition_args(allowed, to, self.result_ttl, fields or {}, False)
        return _transition_result(await self._transition(keys=_transition_keys(job_id), args=args))

    async def list(self, tenant: str, limit: int, before: float | None = None) -> tuple[list[JobRecord], bool]:
        """A tenant's jobs, newest first, created strictly before `before`; and whether more remain."""
        top = f"({before!r}" if before is not None else "+inf"
        ids = await self.redis.zrevrangebyscore(keys.tenant_jobs(tenant), top, "-inf", start=0, num=limit + 1)
        has_more = len(ids) > limit
        records = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids[:limit]:
                pipe.hgetall(keys.job(job_id))
            for raw in await pipe.execute():
                if raw:
                    records.append(JobRecord.from_hash(raw))
        return records, has_more
