"""Accepting a job: check the model, write the record, publish the task."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from api_gateway.config import GatewaySettings
from api_gateway.limits import RateLimiter
from shared import keys, metrics
from shared.catalog import BUNDLED_MODELS
from shared.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    TransientError,
    UnsupportedModelError,
)
from shared.media_policy import check_request_media
from shared.queues import job_message, make_celery
from shared.schemas import JobCreate
from shared.store import AsyncJobStore, JobRecord, new_job_id

log = logging.getLogger(__name__)


async def live_workers(redis: Any) -> list[dict[str, Any]]:
    """Heartbeats of the workers alive now (each key expires unless renewed)."""
    names = [name async for name in redis.scan_iter(match=keys.WORKERS_PATTERN, count=100)]
    if not names:
        return []
    return [json.loads(raw) for raw in await redis.mget(names) if raw]


@dataclass
class ServedModel:
    workers: int
    modalities: list[str] | None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


MAX_IDEMPOTENCY_KEY = 255
# Seconds a client over its queued-job quota is asked to wait; jobs finish in seconds to minutes.
QUOTA_RETRY_AFTER = 5.0


class Submitter:
    def __init__(self, settings: GatewaySettings, redis: Any, store: AsyncJobStore, limiter: RateLimiter) -> None:
        self._settings = settings
        self._configured = {spec.name: spec.modalities for spec in settings.models}
        self._webhook_tenants = set(settings.tenant_webhook_keys)
        self._default_ttl = settings.default_job_ttl
        self._redis = redis
        self._store = store
        self._limiter = limiter
        self.celery = make_celery(settings, "vlmq-gateway")

    async def served_models(self) -> dict[str, ServedModel]:
        """Model name -> live workers serving it and its modalities (configured models included at 0).

        Bundled models' modalities are known statically; any other model's
        come from the heartbeats of the workers that loaded it.
        """
        served = {
            name: ServedModel(0, list(modalities) if modalities else None)
            for name, modalities in sorted(self._configured.items())
        }
        for beat in await live_workers(self._redis):
            announced = beat.get("modalities") or {}
            for model in beat.get("models", []):
                entry = served.setdefault(model, ServedModel(0, None))
                entry.workers += 1
                if entry.modalities is None and announced.get(model):
                    entry.modalities = list(announced[model])
        for name, entry in served.items():
            if entry.modalities is None and name in BUNDLED_MODELS:
                entry.modalities = list(BUNDLED_MODELS[name])
        return served

    async def check_model(self, model: str) -> list[str] | None:
        """Refuse a model nobody serves; return its modalities when known."""
        known = self._configured.get(model)
        if known:
            return list(known)
        served = await self.served_models()
        if model not in served:
            raise UnsupportedModelError(
                f"The model '{model}' does not exist or is not served here; GET /v1/models lists the models.",
                param="model",
            )
        return served[model].modalities

    def check_media(self, request: JobCreate, modalities: list[str] | None) -> None:
        """Refuse media the worker would refuse, before anything is queued."""
        check_request_media(request, self._settings, modalities)

    def check_webhook(self, tenant: str, request: JobCreate) -> None:
        if request.webhook is not None and tenant not in self._webhook_tenants:
            raise InvalidRequestError(
                "No webhook secret is configured for your tenant, so webhooks cannot be signed; "
                "ask the operator to add one to VLMQ_WEBHOOK_SECRETS.",
                param="webhook",
                code="webhook_secret_missing",
            )

    async def submit(
        self, tenant: str, request: JobCreate, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool, int | None]:
        """Accept a job; with an Idempotency-Key, the first job for that key and body instead.

        Returns the job, whether it is an earlier one (a replay) and, for a new
        job, its place in its model's queue. Accepting is one Redis script: it
        counts the request against the tenant's rate limit (routes that submit
        authenticate without counting), and writes the record, its indexes, the
        key, the Celery task and the counter together or not at all.
        """
        modalities = await self.check_model(request.model)
        self.check_media(request, modalities)
        self.check_webhook(tenant, request)
        body = request.model_dump(mode="json", exclude_none=True)
        record = JobRecord(id=new_job_id(), tenant=tenant, model=request.model, request=body, metadata=request.metadata)
        ttl = request.ttl_seconds or self._default_ttl
        if ttl:
            record.expires_at = record.created_at + ttl
        idempotency = body_digest = None
        if idempotency_key is not None:
            body_digest = _digest(json.dumps(body, sort_keys=True, separators=(",", ":")))
            idempotency = (keys.idempotency(tenant, _digest(idempotency_key)), f"{body_digest} {record.id}")
        try:
            created = await self._store.create(
                record,
                self._settings.max_queued_jobs,
                message=job_message(record.id, request.model, request.priority),
                idempotency=idempotency,
                metric=metrics.field("jobs_submitted", model=request.model),
                rate=self._limiter.bucket(tenant),
            )
        except RedisError as exc:
            # Not written means not accepted, and the script writes all or nothing.
            log.error("could not queue job %s: %s", record.id, exc)
            raise TransientError("The job queue is unavailable; try again shortly.") from None
        if created.accepted:
            return record, False, created.queue_position
        if created.wait_ms:
            self._limiter.raise_if_waiting(created.wait_ms)
        if created.earlier is not None and body_digest is not None:
            return await self._replay(created.earlier, body_digest), True, None
        raise RateLimitError(
            f"Your tenant has {self._settings.max_queued_jobs} unfinished jobs, the most allowed "
            "(VLMQ_MAX_QUEUED_JOBS); submit more as they finish.",
            retry_after=QUOTA_RETRY_AFTER,
            code="too_many_queued_jobs",
        )

    async def _replay(self, earlier: str, body_digest: str) -> JobRecord:
        earlier_digest, _, job_id = earlier.partition(" ")
        if earlier_digest != body_digest:
            raise ConflictError(
                f"This Idempotency-Key was already used with a different request body (job {job_id}); "
                "use a new key for a new request.",
                code="idempotency_key_reused",
            )
        record = await self._store.get(job_id)
        if record is None:
            raise NotFoundError(f"The job this Idempotency-Key created ({job_id}) has expired.", code="job_expired")
        return record

    @staticmethod
    def check_idempotency_key(value: str | None) -> str | None:
        if value is not None and not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidRequestError(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters.", param="Idempotency-Key"
            )
        return value
