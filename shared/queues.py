"""The Celery wiring both sides agree on: task names, queues and broker options.

The gateway only publishes (`send_task` by name, so it never imports the
worker); the worker registers the tasks and consumes. Both build their app
with `make_celery`, so the broker options cannot drift apart: Redis hands an
unacked message to another worker after `visibility_timeout`, and that must
be the same everywhere.
"""

from __future__ import annotations

from typing import Any

from shared.settings import SharedSettings

RUN_JOB_TASK = "vlmq.run_job"


def celery_config(settings: SharedSettings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
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
