"""Running one job: load it, resolve its media, hand it to the engine, store the result.

Thin on purpose: every decision about batching lives in the engine, every
byte of media in `worker.media`, every state change in the job store.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from shared.errors import ClientError, InternalError, TransientError, VlmqError, error_body
from shared.media_policy import check_media_url
from shared.schemas import ChatCompletion, JobCreate, JobStatus, parse_job_request
from shared.store import JobRecord, JobStore
from worker.config import WorkerSettings
from worker.engine.prepare import Preparer
from worker.engine.request import Generation
from worker.media.fetch import MediaFetcher
from worker.media.image import decode_image

log = logging.getLogger(__name__)

ACTIVE = (JobStatus.queued, JobStatus.running)


class RetryLater(Exception):
    """Control flow: the job hit a transient error and should run again after `defer` seconds."""

    def __init__(self, defer: float, cause: VlmqError) -> None:
        super().__init__(str(cause))
        self.defer = defer
        self.cause = cause


@dataclass
class JobRunner:
    settings: WorkerSettings
    store: JobStore
    fetcher: MediaFetcher
    preparer: Preparer
    engine: Any  # anything with submit(PreparedRequest) -> Future[Generation]
    model_name: str

    def run(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None:
            log.warning("job %s is gone (expired or deleted); dropping its task", job_id)
            return
        if record.status.terminal:
            # Redelivery of a finished (or cancelled) job: nothing to do, nothing to repeat.
            return
        started = time.time()
        moved = self.store.transition(job_id, ACTIVE, JobStatus.running, {"started_at": started}, count_attempt=True)
        if not moved.applied:
            return
        attempt = record.attempts + 1
        try:
            self._execute(record, started)
        except ClientError as exc:
            self._fail(job_id, exc)
        except TransientError as exc:
            if attempt >= self.settings.max_attempts:
                self._fail(job_id, exc)
                return
            self.store.transition(job_id, (JobStatus.running,), JobStatus.queued, {"error": exc.to_body()})
            raise RetryLater(defer=min(2.0**attempt, 60.0), cause=exc) from None
        except Exception:
            log.exception("job %s failed with an internal error", job_id)
            self._fail(job_id, InternalError("The worker had an error while running the job."))

    def _execute(self, record: JobRecord, started: float) -> None:
        request = parse_job_request(record.request)
        media_started = time.perf_counter()
        images = self._resolve_media(request)
        prepared = self.preparer.prepare(request, images, request_id=record.id)
        media_ms = (time.perf_counter() - media_started) * 1000
        generation: Generation = self.engine.submit(prepared).result()
        result = completion(record, generation)
        timings = {
            "queued_ms": round((started - record.created_at) * 1000, 2),
            "media_ms": round(media_ms, 2),
            "inference_ms": round(generation.inference_ms, 2),
            "batch_size": generation.batch_size,
            "batch_id": generation.batch_id,
        }
        fields = {
            "result": result.model_dump(mode="json"),
            "completed_at": time.time(),
            "timings": timings,
            "error": {},
        }
        if not self.store.transition(record.id, (JobStatus.running,), JobStatus.succeeded, fields).applied:
            log.info("job %s finished after it was cancelled; result discarded", record.id)

    def _resolve_media(self, request: JobCreate) -> list[Any]:
        images = []
        for param, part in request.media_parts():
            if part.image_url is None:
                raise ClientError(
                    "Media referenced by uuid alone needs the media cache, which this worker does not have yet.",
                    param=param,
                    code="media_cache_unavailable",
                )
            url = part.image_url.url
            check_media_url(url, self.settings.allowed_media_domains, f"{param}.image_url.url")
            data = self.fetcher.fetch(url, param=f"{param}.image_url.url")
            images.append(decode_image(data, max_pixels=self.settings.max_image_pixels, param=param))
        return images

    def _fail(self, job_id: str, exc: BaseException) -> None:
        fields = {"error": error_body(exc), "completed_at": time.time()}
        self.store.transition(job_id, ACTIVE, JobStatus.failed, fields)


def completion(record: JobRecord, generation: Generation) -> ChatCompletion:
    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "created": int(time.time()),
            "model": record.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text},
                    "finish_reason": generation.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
                "total_tokens": generation.prompt_tokens + generation.completion_tokens,
            },
        }
    )
