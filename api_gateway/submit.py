"""Accepting a job: check the model, write the record, publish the task."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import anyio

from api_gateway.config import GatewaySettings
from shared import keys
from shared.catalog import queue_name
from shared.errors import TransientError, UnsupportedModelError
from shared.media_policy import check_media_url
from shared.queues import RUN_JOB_TASK, make_celery
from shared.schemas import JobCreate
from shared.store import AsyncJobStore, JobRecord, new_job_id

log = logging.getLogger(__name__)


async def live_workers(redis: Any) -> list[dict[str, Any]]:
    """Heartbeats of the workers alive now (each key expires unless renewed)."""
    names = [name async for name in redis.scan_iter(match=keys.WORKERS_PATTERN, count=100)]
    if not names:
        return []
    return [json.loads(raw) for raw in await redis.mget(names) if raw]


class Submitter:
    def __init__(self, settings: GatewaySettings, redis: Any, store: AsyncJobStore) -> None:
        self._configured = {spec.name for spec in settings.models}
        self._allowed_domains = settings.allowed_media_domains
        self._redis = redis
        self._store = store
        self._celery = make_celery(settings, "vlmq-gateway")

    async def served_models(self) -> dict[str, int]:
        """Model name -> number of live workers serving it (configured models included at 0)."""
        counts = dict.fromkeys(sorted(self._configured), 0)
        for beat in await live_workers(self._redis):
            for model in beat.get("models", []):
                counts[model] = counts.get(model, 0) + 1
        return counts

    async def check_model(self, model: str) -> None:
        if model in self._configured:
            return
        if model not in await self.served_models():
            raise UnsupportedModelError(
                f"The model '{model}' does not exist or is not served here; GET /v1/models lists the models.",
                param="model",
            )

    def check_media(self, request: JobCreate) -> None:
        """Refuse media the worker would refuse, before anything is queued."""
        for param, part in request.media_parts():
            if part.image_url is not None:
                check_media_url(part.image_url.url, self._allowed_domains, f"{param}.image_url.url")

    async def submit(self, tenant: str, request: JobCreate) -> JobRecord:
        await self.check_model(request.model)
        self.check_media(request)
        record = JobRecord(
            id=new_job_id(),
            tenant=tenant,
            model=request.model,
            request=request.model_dump(mode="json", exclude_none=True),
            metadata=request.metadata,
        )
        await self._store.create(record)
        publish = functools.partial(
            self._celery.send_task, RUN_JOB_TASK, args=[record.id], queue=queue_name(request.model)
        )
        try:
            await anyio.to_thread.run_sync(publish)
        except Exception as exc:
            # Not queued means not accepted: take the record back so nothing waits forever.
            log.error("could not publish job %s: %s", record.id, exc)
            await self._store.delete(record)
            raise TransientError("The job queue is unavailable; try again shortly.") from None
        return record
