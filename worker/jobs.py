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
from shared.media_policy import MediaPolicy, check_media_url, check_request_media
from shared.schemas import (
    AudioURLPart,
    ChatCompletion,
    ImageEmbedsPart,
    ImagePart,
    InputAudioPart,
    JobCreate,
    JobStatus,
    MediaPart,
    VideoPart,
    parse_job_request,
)
from shared.store import JobRecord, JobStore
from worker.config import WorkerSettings
from worker.engine.prepare import Preparer
from worker.engine.request import Generation
from worker.media.audio import decode_audio
from worker.media.embeds import decode_image_embeds
from worker.media.fetch import MediaFetcher
from worker.media.image import decode_image
from worker.media.video import decode_frame_list, decode_video

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
        media = self._resolve_media(request)
        prepared = self.preparer.prepare(request, media, request_id=record.id)
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
        """Fetch and decode every media part, in order; the same checks as the gateway run first."""
        model = self.preparer.model
        check_request_media(request, self.settings, model.modalities)
        if any(isinstance(p, ImageEmbedsPart) for _, p in request.media_parts()) and not getattr(
            self.engine, "accepts_image_embeds", False
        ):
            raise ClientError(
                "This worker's engine cannot take image_embeds yet.", param="messages", code="mm_embeds_unsupported"
            )
        return [self._resolve_part(request, param, part) for param, part in request.media_parts()]

    def _resolve_part(self, request: JobCreate, param: str, part: MediaPart) -> Any:
        if part.media is None:
            raise ClientError(
                "Media referenced by uuid alone needs the media cache, which this worker does not have yet.",
                param=param,
                code="media_cache_unavailable",
            )
        settings = self.settings
        model = self.preparer.model
        io_kwargs = request.media_io_kwargs
        source = f"{param}.{part.url_param}"
        if isinstance(part, ImageEmbedsPart):
            if model.embeds_hidden_size is None:
                raise ClientError(
                    f"The model '{model.name}' does not take image_embeds.", param=param, code="unsupported_modality"
                )
            value = part.image_embeds
            named = {"image_embeds": value} if isinstance(value, str) else dict(value or {})
            tensors = {
                name: self.fetcher.decode_base64(data, modality="image", param=f"{source}.{name}")
                for name, data in named.items()
            }
            return decode_image_embeds(
                tensors,
                hidden_size=model.embeds_hidden_size,
                merge_size=model.embeds_merge_size,
                max_tokens=model.max_context,
                param=param,
            )
        if isinstance(part, InputAudioPart):
            assert part.input_audio is not None
            data = self.fetcher.decode_base64(part.input_audio.data, modality="audio", param=source)
            return self._audio(data, param, part.input_audio.format)

        url = part.url
        assert url is not None
        check_media_url(url, MediaPolicy.from_settings(settings), source)
        fetched = self.fetcher.fetch(url, modality=part.modality, param=source)
        if isinstance(part, ImagePart):
            background = (io_kwargs.image.rgba_background_color if io_kwargs else None) or settings.rgba_background
            return decode_image(fetched.data, max_pixels=settings.max_image_pixels, background=background, param=param)
        if isinstance(part, VideoPart):
            num_frames = (io_kwargs.video.num_frames if io_kwargs else None) or settings.video_num_frames
            fps = io_kwargs.video.fps if io_kwargs else None
            if fetched.frames is not None:
                return decode_frame_list(
                    fetched.frames,
                    num_frames=min(num_frames, settings.video_max_frames),
                    max_pixels=settings.max_image_pixels,
                    background=settings.rgba_background,
                    param=param,
                )
            return decode_video(
                fetched.data,
                num_frames=None if fps else num_frames,
                fps=fps,
                max_frames=settings.video_max_frames,
                max_duration=settings.video_max_duration,
                max_pixels=settings.max_image_pixels,
                timeout=settings.video_decode_timeout,
                param=param,
            )
        if isinstance(part, AudioURLPart):
            return self._audio(fetched.data, param, None)
        raise ClientError(f"Unsupported content part {part.type}.", param=param)

    def _audio(self, data: bytes, param: str, format_hint: str | None) -> Any:
        model = self.preparer.model
        if model.audio_sampling_rate is None:
            raise ClientError(
                f"The model '{model.name}' does not take audio.", param=param, code="unsupported_modality"
            )
        limit = self.settings.audio_max_duration
        if model.audio_max_seconds:
            limit = min(limit, model.audio_max_seconds)
        return decode_audio(
            data, sampling_rate=model.audio_sampling_rate, max_duration=limit, format_hint=format_hint, param=param
        )

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
