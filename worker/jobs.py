"""Running one job: load it, resolve its media, hand it to the engine, store the result.

Thin on purpose: every decision about batching lives in the engine, every
byte of media in `worker.media`, every state change in the job store.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from shared import keys, metrics
from shared.errors import ClientError, InternalError, JobExpiredError, TransientError, VlmqError, error_body
from shared.media_policy import check_request_media
from shared.schemas import (
    EVENT_FOR_STATUS,
    ChatCompletion,
    ImageEmbedsPart,
    JobCreate,
    JobStatus,
    WebhookEvent,
    parse_job_request,
)
from shared.store import JobRecord, JobStore
from worker.config import WorkerSettings
from worker.engine.prepare import Preparer
from worker.engine.request import Generation, PreparedRequest
from worker.media.fetch import MediaFetcher
from worker.resolver import MediaResolver, Resolved

log = logging.getLogger(__name__)

ACTIVE = (JobStatus.queued, JobStatus.running)

Announce = Callable[[JobRecord | None, WebhookEvent], None]


class RetryLater(Exception):
    """Control flow: the job should run again after `defer` seconds (a transient error, or a busy twin)."""

    def __init__(self, defer: float, cause: VlmqError) -> None:
        super().__init__(str(cause))
        self.defer = defer
        self.cause = cause


def _no_announce(record: JobRecord | None, event: WebhookEvent) -> None:
    return None


@contextlib.contextmanager
def _unwatched(job_id: str) -> Iterator[threading.Event]:
    yield threading.Event()


@dataclass
class JobRunner:
    settings: WorkerSettings
    store: JobStore
    fetcher: MediaFetcher
    preparer: Preparer
    engine: Any  # anything with submit(PreparedRequest) -> Future[Generation]
    model_name: str

    # Sets the returned event when the job is cancelled (worker.cancel.CancelWatcher.watch).
    watch_cancel: Callable[[str], contextlib.AbstractContextManager[threading.Event]] = _unwatched
    announce: Announce = field(default=_no_announce)
    # Resolves media parts through the cache tiers; by default one without caches.
    resolver: MediaResolver | None = None
    # Jobs this process is running now, with their stop events: a redelivery of one of them
    # is a twin, not a dead worker's; `drain` stops them all to hand them back.
    _running: dict[str, threading.Event] = field(default_factory=dict, init=False)
    _draining: bool = field(default=False, init=False)
    _counted: tuple[int, int] = field(default=(0, 0), init=False)
    _counted_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        if self.resolver is None:
            self.resolver = MediaResolver(self.settings, self.fetcher, self.preparer)

    def drain(self) -> list[str]:
        """Shutting down: stop every job in flight at its next step and hand it back to the queue.

        Each stops like a cancelled one (the engine drops it at its next decode
        step), but goes back to `queued` without spending an attempt, and its
        task is published again for another worker.
        """
        self._draining = True
        running = list(self._running.items())
        for _, stop in running:
            stop.set()
        return [job_id for job_id, _ in running]

    def running_ids(self) -> frozenset[str]:
        """The jobs this process is running now (recorded just after their transition to running)."""
        return frozenset(self._running)

    def run(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None:
            log.warning("job %s is gone (expired or deleted); dropping its task", job_id)
            return
        if record.status.terminal:
            # A redelivery of a finished job: nothing to run again. Its event may not have
            # been announced if the worker died right after the transition; announcing twice
            # is a no-op, so make sure.
            self.announce(record, EVENT_FOR_STATUS[record.status])
            return
        now = time.time()
        if (
            record.status is JobStatus.queued
            and record.started_at is None
            and record.expires_at
            and now > record.expires_at
        ):
            self._expire(record)
            return
        if record.status is JobStatus.running and self._interrupted(record):
            return
        if self._draining:
            raise RetryLater(defer=0.5, cause=TransientError("this worker is shutting down"))
        with self.watch_cancel(job_id) as cancelled:
            fields = {"started_at": now, "worker": self.settings.worker_name, "tokens_generated": 0}
            # Only from the status seen above (and, for a dead worker's job, only from that worker):
            # of two deliveries of one job, one takes it and the other finds it taken.
            moved = self.store.transition(
                job_id,
                (record.status,),
                JobStatus.running,
                fields,
                count_attempt=True,
                expect_worker=record.worker if record.status is JobStatus.running else None,
                request=record.request,
            )
            if not moved.applied or moved.record is None:
                return
            self.announce(moved.record, WebhookEvent.started)
            attempt = moved.record.attempts
            self._running[job_id] = cancelled
            try:
                self._execute(moved.record, now, cancelled)
            except RetryLater:
                raise
            except ClientError as exc:
                self._fail(job_id, exc)
            except TransientError as exc:
                if attempt >= self.settings.max_attempts:
                    exc.message = f"{exc.message} (gave up after {attempt} attempts)"
                    self._fail(job_id, exc)
                else:
                    back = self.store.transition(
                        job_id, (JobStatus.running,), JobStatus.queued, {"error": exc.to_body()}, request=record.request
                    )
                    if back.applied:
                        raise RetryLater(defer=self._defer(2.0**attempt), cause=exc) from None
            except Exception:
                log.exception("job %s failed with an internal error", job_id)
                self._fail(job_id, InternalError("The worker had an error while running the job."))
            finally:
                self._running.pop(job_id, None)
                self._announce_if_cancelled(job_id)

    def _defer(self, seconds: float) -> float:
        # A countdown longer than the broker's visibility timeout would be redelivered while it waits.
        return max(0.5, min(seconds, 60.0, self.settings.visibility_timeout / 2))

    def _interrupted(self, record: JobRecord) -> bool:
        """Handle a job redelivered while marked running; True when this task is done with it.

        Either its worker died mid-job (kill -9, out of memory, a crash the job
        itself causes), or the visibility timeout ran out while a live worker
        is still at it.
        """
        holder = record.worker
        here = holder == self.settings.worker_name
        if (here and record.id in self._running) or (
            holder and not here and self.store.redis.exists(keys.worker(holder))
        ):
            # Still running elsewhere: look again later, so this message keeps watching
            # over the job in case that worker dies after all.
            raise RetryLater(
                defer=self._defer(self.settings.heartbeat_seconds * 3),
                cause=TransientError(f"job {record.id} is running on {holder}"),
            )
        if record.attempts >= self.settings.max_attempts:
            log.error("job %s: its worker stopped mid-job %d times; failing it", record.id, record.attempts)
            self._fail(record.id, worker_lost(record.attempts))
            return True
        log.warning("job %s: its worker (%s) stopped mid-job; running it again", record.id, holder)
        return False

    def _expire(self, record: JobRecord) -> None:
        error = JobExpiredError.for_ttl(round((record.expires_at or 0) - record.created_at))
        fields = {"completed_at": time.time(), "error": error.to_body()}
        moved = self.store.transition(record.id, (JobStatus.queued,), JobStatus.expired, fields, request=record.request)
        if moved.applied:
            self.announce(moved.record, WebhookEvent.expired)

    def _announce_if_cancelled(self, job_id: str) -> None:
        # The status alone first: this runs after every job, and the whole record can be megabytes.
        if self.store.status(job_id) is not JobStatus.cancelled:
            return
        record = self.store.get(job_id)
        if record is not None and record.status is JobStatus.cancelled:
            self.announce(record, WebhookEvent.cancelled)

    def _execute(self, record: JobRecord, started: float, cancelled: threading.Event) -> None:
        request = parse_job_request(record.request)
        media_started = time.perf_counter()
        resolved = self._resolve_media(record.tenant, request)
        prepared = self.preparer.prepare(request, resolved.media, request_id=record.id, keys=resolved.keys)
        prepared.cancelled = cancelled
        media_ms = (time.perf_counter() - media_started) * 1000
        timings: dict[str, Any] = {
            "queued_ms": round((started - record.created_at) * 1000, 2),
            "media_ms": round(media_ms, 2),
        }
        cache = {"items": resolved.report} if resolved.report else {}
        if cancelled.is_set():
            self._hand_back_if_draining(record)
            self.store.transition(
                record.id,
                (JobStatus.cancelled,),
                JobStatus.cancelled,
                {"timings": timings, "cache": cache},
                request=record.request,
            )
            return
        generation = self._generate(record.id, prepared)
        self._count({})  # the encoder cache's hits and misses for this job's batch
        if getattr(self.engine, "encoder_cache", None) is not None:
            for report, key in zip(resolved.report, resolved.keys, strict=False):
                if key is not None and report.get("modality") in ("image", "video"):
                    report["encoder"] = "hit" if key in prepared.encoder_hits else "miss"
        result = completion(record, generation)
        timings.update(
            inference_ms=round(generation.inference_ms, 2),
            batch_size=generation.batch_size,
            batch_id=generation.batch_id,
        )
        fields = {
            "result": result.model_dump(mode="json"),
            "timings": timings,
            "tokens_generated": generation.completion_tokens,
            "cache": cache,
        }
        if generation.finish_reason != "cancelled":
            done = self.store.transition(
                record.id,
                (JobStatus.running,),
                JobStatus.succeeded,
                {**fields, "completed_at": time.time(), "error": {}},
                request=record.request,
            )
            if done.applied:
                self.announce(done.record, WebhookEvent.completed)
                return
            if done.status is JobStatus.queued:
                # Set back to queued while it ran here: a reaper took it back, or Redis lost our
                # transition to running (a crash under appendfsync everysec). Acking this task
                # could leave it queued with no message: retry instead (an extra one is harmless).
                raise RetryLater(defer=0.5, cause=TransientError(f"job {record.id} was queued again while it ran"))
        self._hand_back_if_draining(record)
        # Cancelled while it ran: keep what was generated (the partial text) on the cancelled job.
        self.store.transition(record.id, (JobStatus.cancelled,), JobStatus.cancelled, fields, request=record.request)

    def _hand_back_if_draining(self, record: JobRecord) -> None:
        """Stopped by `drain`, not by a cancel: back to the queue, without spending an attempt."""
        if not self._draining:
            return
        fields = {"attempts": max(0, record.attempts - 1), "tokens_generated": 0}
        back = self.store.transition(
            record.id,
            (JobStatus.running,),
            JobStatus.queued,
            fields,
            expect_worker=self.settings.worker_name,
            request=record.request,
        )
        if back.applied:
            log.warning("job %s handed back: this worker is shutting down", record.id)
            raise RetryLater(defer=0.5, cause=TransientError("handed back by a worker shutting down"))

    def _generate(self, job_id: str, prepared: PreparedRequest) -> Generation:
        """Wait for the engine, writing the tokens generated so far to the record as it goes."""
        future = self.engine.submit(prepared)
        reported = 0
        while True:
            try:
                generation: Generation = future.result(timeout=self.settings.progress_seconds)
                return generation
            except concurrent.futures.TimeoutError:
                if prepared.progress != reported:
                    reported = prepared.progress
                    self.store.set_progress(job_id, reported)

    def _resolve_media(self, tenant: str, request: JobCreate) -> Resolved:
        """Every media part through the cache tiers, in order; the same checks as the gateway run first."""
        model = self.preparer.model
        check_request_media(request, self.settings, model.modalities)
        if any(isinstance(p, ImageEmbedsPart) for _, p in request.media_parts()) and not getattr(
            self.engine, "accepts_image_embeds", False
        ):
            raise ClientError(
                "This worker's engine cannot take image_embeds yet.", param="messages", code="mm_embeds_unsupported"
            )
        resolved = Resolved()
        assert self.resolver is not None
        try:
            self.resolver.resolve(tenant, request, resolved)
        finally:
            self._count(resolved.counts)
        return resolved

    def _count(self, counts: dict[str, int]) -> None:
        """Publish this job's cache counters, and the engine's encoder-cache ones since the last job."""
        counts = dict(counts)
        cache = getattr(self.engine, "encoder_cache", None)
        if cache is not None:
            with self._counted_lock:
                hits, misses = cache.hits, cache.misses
                counts[metrics.field("media_cache_hits", tier="encoder")] = hits - self._counted[0]
                counts[metrics.field("media_cache_misses", tier="encoder")] = misses - self._counted[1]
                self._counted = (hits, misses)
        try:
            metrics.add(self.store.redis, counts)
        except Exception as exc:  # counters never fail a job
            log.warning("could not publish metrics: %s", exc)

    def _fail(self, job_id: str, exc: BaseException) -> None:
        fields = {"error": error_body(exc), "completed_at": time.time()}
        moved = self.store.transition(job_id, ACTIVE, JobStatus.failed, fields)
        if moved.applied:
            self.announce(moved.record, WebhookEvent.failed)


def worker_lost(attempts: int) -> InternalError:
    return InternalError(
        f"The job was interrupted {attempts} times: its worker stopped while running it "
        "(crash, out of memory or killed). It is not retried again.",
        code="worker_lost",
    )


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
