"""The worker process: build resources once, register the task, consume.

`run_worker` loads the model and starts the engine before Celery takes its
first message, then runs Celery's threads pool so several jobs are in
flight at once (media fetched and preprocessed in parallel) while one
engine thread batches them on the device.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from shared import keys
from shared.queues import FETCH_MEDIA_TASK, MEDIA_QUEUE, RUN_JOB_TASK, make_celery, send_job
from shared.redis_conn import sync_redis
from shared.store import JobStore
from worker.config import WorkerSettings
from worker.jobs import JobRunner, RetryLater

log = logging.getLogger(__name__)


@dataclass
class WorkerResources:
    settings: WorkerSettings
    redis: Any
    runner: JobRunner
    engine: Any
    heartbeat: Any
    cancels: Any
    media_cache: Any  # shared.media_cache.MediaCache: the shared tier, on its own binary client
    reaper: Any = None

    @classmethod
    def start(cls, settings: WorkerSettings) -> WorkerResources:
        from shared.media_cache import MediaCache
        from worker.cancel import CancelWatcher
        from worker.engine.loader import load_model
        from worker.engine.prepare import Preparer
        from worker.heartbeat import Heartbeat
        from worker.media.fetch import MediaFetcher
        from worker.media_cache import ItemCache
        from worker.resolver import MediaResolver
        from worker.webhooks import Announcer

        spec = settings.served_model
        model = load_model(spec, cache_dir=settings.model_cache_dir, device=settings.device, dtype=settings.dtype)
        redis = sync_redis(settings)
        check_visibility_timeout(redis, settings.visibility_timeout)
        engine = build_engine(model, settings).start()
        cancels = CancelWatcher(redis).start()
        fetcher = MediaFetcher.from_settings(settings)
        # Media bytes are binary: the shared tier gets a client that does not decode replies.
        media_cache = MediaCache(
            sync_redis(settings, decode_responses=False),
            ttl=settings.media_cache_ttl,
            max_bytes=settings.media_cache_max_bytes,
            max_item_bytes=settings.media_cache_max_item_bytes,
        )
        preparer = Preparer(model, settings.default_max_tokens, items=ItemCache(settings.media_worker_cache_bytes))
        runner = JobRunner(
            settings=settings,
            store=JobStore(redis, settings.result_ttl),
            fetcher=fetcher,
            preparer=preparer,
            resolver=MediaResolver(settings, fetcher, preparer, shared=media_cache, items=preparer.items),
            engine=engine,
            model_name=spec.name,
            watch_cancel=cancels.watch,
            announce=Announcer(settings, redis),
        )
        info = {
            "device": str(model.device),
            "modalities": {spec.name: list(model.modalities)},
            "visibility_timeout": settings.visibility_timeout,
        }
        heartbeat = Heartbeat(redis, settings.worker_name, [spec.name], settings.heartbeat_seconds, info).start()
        return cls(
            settings=settings,
            redis=redis,
            runner=runner,
            engine=engine,
            heartbeat=heartbeat,
            cancels=cancels,
            media_cache=media_cache,
        )

    def start_reaper(self, celery: Any) -> None:
        from worker.reaper import Reaper

        self.reaper = Reaper(
            self.runner.store,
            lambda record: send_job(celery, record.id, record.model, record.priority),
            self.runner.announce,
            max_attempts=self.settings.max_attempts,
            heartbeat_seconds=self.settings.heartbeat_seconds,
            worker_name=self.settings.worker_name,
            running_ids=self.runner.running_ids,
        ).start()

    def stop(self) -> None:
        if self.reaper is not None:
            self.reaper.stop()
        self.heartbeat.stop()
        self.cancels.stop()
        self.engine.stop()
        self.runner.fetcher.close()
        self.media_cache.redis.close()
        self.redis.close()


class VisibilityTimeoutMismatch(SystemExit):
    pass


def check_visibility_timeout(redis: Any, mine: int) -> None:
    """Refuse to join a pool whose live workers use another VLMQ_VISIBILITY_TIMEOUT.

    Every consumer restores unacked messages older than *its* timeout, so one
    worker with a shorter value would hand the long jobs of all the others
    to a second worker while they still run.
    """
    import json

    names = list(redis.scan_iter(match=keys.WORKERS_PATTERN, count=100))
    beats = [json.loads(raw) for raw in (redis.mget(names) if names else []) if raw]
    other = {beat.get("visibility_timeout") for beat in beats} - {None, mine}
    if other:
        raise VisibilityTimeoutMismatch(
            f"VLMQ_VISIBILITY_TIMEOUT={mine}, but live workers use {sorted(other)}: it must be the same on "
            "every worker of a Redis (stop them all to change it)."
        )


def build_engine(model: Any, settings: WorkerSettings) -> Any:
    from worker.engine.batcher import BatchingEngine
    from worker.engine.continuous import ContinuousEngine, supports_continuous

    if settings.engine == "continuous" or (settings.engine == "auto" and supports_continuous(model)):
        engine = ContinuousEngine(
            model,
            max_batch_size=settings.max_batch_size,
            max_model_len=settings.max_model_len,
            gpu_memory_fraction=settings.gpu_memory_fraction,
            cuda_graphs=settings.cuda_graphs,
            encoder_cache_bytes=settings.encoder_cache_bytes,
        )
        # Requests are checked against what one KV slot holds, not the model's whole window.
        model.max_context = engine.max_len
        return engine
    return BatchingEngine(model, max_batch_size=settings.max_batch_size, batch_window_ms=settings.batch_window_ms)


def create_celery_app(resources: WorkerResources) -> Any:
    app = make_celery(resources.settings, "vlmq-worker")

    @app.task(name=RUN_JOB_TASK, bind=True, max_retries=None)
    def run_job(self: Any, job_id: str) -> None:
        try:
            resources.runner.run(job_id)
        except RetryLater as retry:
            raise self.retry(countdown=retry.defer) from None

    @app.task(name=FETCH_MEDIA_TASK)
    def fetch_media(request_id: str, tenant: str, url: str, uuid: str, kind: str | None = None) -> None:
        from worker.uploads import answer_fetch

        runner = resources.runner
        answer_fetch(runner.settings, runner.fetcher, resources.media_cache, request_id, tenant, url, uuid, kind)

    return app


def run_worker(settings: WorkerSettings | None = None, *, loglevel: str = "INFO") -> None:
    settings = settings or WorkerSettings()
    spec = settings.served_model
    # Task threads preparing media compete with the engine thread for the GIL; a
    # shorter switch interval lets the engine's short Python steps in sooner.
    sys.setswitchinterval(0.001)
    resources = WorkerResources.start(settings)
    app = create_celery_app(resources)
    resources.start_reaper(app)
    _drain_on_shutdown(resources, settings.shutdown_grace)
    try:
        app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={settings.task_threads}",
                f"--queues={spec.queue},{MEDIA_QUEUE}",
                f"--hostname={spec.name}@{settings.worker_name}",
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        resources.stop()
        log.info("worker %s (pid %d) stopped", settings.worker_name, os.getpid())


def _drain_on_shutdown(resources: WorkerResources, grace: float) -> None:
    """On SIGTERM Celery stops taking messages and waits for the jobs in flight; after
    `grace` seconds the ones still running are handed back to the queue (nothing is
    left `running` for the reaper, nothing is lost if the supervisor then kills us)."""
    import threading

    from celery import signals

    def drain_later(**_: Any) -> None:
        def drain() -> None:
            handed = resources.runner.drain()
            if handed:
                log.warning("shutting down: handing back %d job(s): %s", len(handed), ", ".join(handed))

        log.info("shutting down: finishing jobs in flight for up to %gs", grace)
        timer = threading.Timer(grace, drain)
        timer.daemon = True
        timer.start()

    signals.worker_shutting_down.connect(drain_later, weak=False)
