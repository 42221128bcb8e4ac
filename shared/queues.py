"""The Celery wiring both sides agree on: task names, queues and broker options.

The gateway only publishes (`send_task` by name, so it never imports the
worker); the worker registers the tasks and consumes. Both build their app
with `make_celery`, so the broker options cannot drift apart: Redis hands an
unacked message to another worker after `visibility_timeout`, and that must
be the same everywhere.
"""

from __future__ import annotations

from typing import Any

from shared.catalog import queue_name
from shared.redis_conn import is_sentinel
from shared.schemas import PRIORITY_MAX
from shared.settings import SharedSettings

RUN_JOB_TASK = "vlmq.run_job"
DELIVER_WEBHOOK_TASK = "vlmq.deliver_webhook"
# Webhooks have their own queue and worker process, so a slow receiver never
# holds a GPU worker's thread and a busy GPU never delays a webhook.
WEBHOOK_QUEUE = "vlmq.webhooks"
# `POST /v1/media` with a URL: the gateway never fetches (it makes no outbound
# requests at all), so every model worker also consumes this queue and fetches
# through its SSRF-guarded fetcher, like any job's media.
FETCH_MEDIA_TASK = "vlmq.fetch_media"
MEDIA_QUEUE = "vlmq.media"
# Job priorities 0-9 (9 most urgent) map onto the Redis transport's ten
# lists per queue, where 0 is taken first.
PRIORITY_STEPS = list(range(10))


def broker_priority(priority: int) -> int:
    return PRIORITY_MAX - priority


def send_job(celery: Any, job_id: str, model: str, priority: int) -> None:
    """Publish the task that runs a job, on its model's queue at its priority."""
    celery.send_task(RUN_JOB_TASK, args=[job_id], queue=queue_name(model), priority=broker_priority(priority))


def celery_config(settings: SharedSettings) -> dict[str, Any]:
    sentinel = {"master_name": settings.redis_sentinel_master} if is_sentinel(settings.redis_url) else {}
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            **sentinel,
            "visibility_timeout": settings.visibility_timeout,
            # Workers take the most urgent list first (with prefetch 1, below,
            # so a worker does not hold a low-priority job while an urgent one waits).
            "queue_order_strategy": "priority",
            "priority_steps": PRIORITY_STEPS,
            # Look for messages of dead workers (unacked past the visibility
            # timeout) every tenth of it, not every 100 s, so a short timeout
            # also means a prompt redelivery.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
        },
        # Results live on our job record, not in Celery's backend.
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # A job is acknowledged only once it has finished, and a worker that
        # dies mid-job hands it back: redelivery is made safe by the job store.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def make_celery(settings: SharedSettings, main: str) -> Any:
    from celery import Celery

    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app
