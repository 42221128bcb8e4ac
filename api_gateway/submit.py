"""Accepting a job: check the model, write the record, publish the task."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import anyio

from api_gateway.config import GatewaySettings
from shared import keys
from shared.catalog import BUNDLED_MODELS, queue_name
from shared.errors import TransientError, UnsupportedModelError
from shared.media_policy import check_request_media
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


@dataclass
class ServedModel:
    workers: int
    modalities: list[str] | None


class Submitter:
    def __init__(self, settings: GatewaySettings, redis: Any, store: AsyncJobStore) -> None:
        self._settings = settings
        self._configured = {spec.name: spec.modalities for spec in settings.models}
        self._redis = redis
        self._store = store
        self._celery = make_celery(settings, "vlmq-gateway")

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

    async def submit(self, tenant: str, request: JobCreate) -> JobRecord:
        modalities = await self.check_model(request.model)
        self.check_media(request, modalities)
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
