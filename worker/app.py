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

from shared.queues import FETCH_MEDIA_TASK, MEDIA_QUEUE, RUN_JOB_TASK, make_celery
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

    @classmethod
    def start(cls, settings: WorkerSettings) -> WorkerResources:
        import redis as redis_lib

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
        engine = build_engine(model, settings).start()
        redis = redis_lib.Redis.from_url(settings.redis_url, decode_responses=True)
        cancels = CancelWatcher(redis).start()
        fetcher = MediaFetcher.from_settings(settings)
        # Media bytes are binary: the shared tier gets a client that does not decode replies.
        media_cache = MediaCache(
            redis_lib.Redis.from_url(settings.redis_url),
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
        info = {"device": str(model.device), "modalities": {spec.name: list(model.modalities)}}
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

    def stop(self) -> None:
        self.heartbeat.stop()
        self.cancels.stop()
        self.engine.stop()
        self.runner.fetcher.close()
        self.media_cache.redis.close()
        self.redis.close()


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
