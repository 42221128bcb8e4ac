"""The Celery wiring both sides agree on: task names, queues and broker options.

The gateway only publishes (`send_task` by name, so it never imports the
worker); the worker registers the tasks and consumes. Both build their app
with `make_celery`, so the broker options cannot drift apart: Redis hands an
unacked message to another worker after `visibility_timeout`, and that must
be the same everywhere.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import socket
import uuid
from dataclasses import dataclass
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


# kombu's Redis transport keeps priority p > 0 of queue q in the list "q\x06\x16p".
_PRIORITY_SEP = "\x06\x16"
_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"
# Celery's canvas options for a plain task (protocol 2's third body item).
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass(frozen=True)
class TaskMessage:
    """One Celery task message, ready to LPUSH: `key` is the broker list, `body` the envelope."""

    key: str
    body: str


# Stand-ins for a message's own values in the cached envelope (a NUL cannot occur in
# a task, queue or model name); each is a whole JSON string there, quotes included.
_ID, _TAG, _BODY, _ARGSREPR = (json.dumps(f"\0{name}") for name in ("id", "tag", "body", "argsrepr"))


@functools.lru_cache(maxsize=1024)
def _envelope(task: str, queue: str, priority: int) -> str:
    """The envelope of every message for (task, queue, priority), its own values left as stand-ins."""
    task_id = json.loads(_ID)
    return json.dumps(
        {
            "body": json.loads(_BODY),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": task,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                "argsrepr": json.loads(_ARGSREPR),
                "kwargsrepr": "{}",
                "origin": _ORIGIN,
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": priority,
                "body_encoding": "base64",
                "delivery_tag": json.loads(_TAG),
            },
        }
    )


def task_message(task: str, args: list[Any], queue: str, priority: int = 0) -> TaskMessage:
    """The message `send_task(task, args, queue=queue, priority=priority)` would put on Redis.

    Celery's message protocol 2 in kombu's Redis envelope (JSON, body base64),
    built without a Celery app or a connection, so the gateway can push it in
    the same Lua script that writes the job record: accepting a job is one
    atomic Redis step, never a record without its task or a task without its
    record. `priority` is the broker's (0 is taken first); tests compare the
    result with what Celery itself publishes, and a real worker consumes it.
    The envelope is built once per (task, queue, priority), then filled in:
    this runs on every submit.
    """
    body = base64.b64encode(json.dumps([args, {}, _EMBED]).encode()).decode()
    text = (
        _envelope(task, queue, priority)
        .replace(_ID, f'"{uuid.uuid4()}"')
        .replace(_TAG, f'"{uuid.uuid4()}"')
        .replace(_BODY, f'"{body}"')
        .replace(_ARGSREPR, json.dumps(repr(args)))
    )
    key = f"{queue}{_PRIORITY_SEP}{priority}" if priority else queue
    return TaskMessage(key, text)


def job_message(job_id: str, model: str, priority: int) -> TaskMessage:
    """The task that runs a job, on its model's queue at its priority (what `send_job` publishes)."""
    return task_message(RUN_JOB_TASK, [job_id], queue_name(model), broker_priority(priority))


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
        # No remote control (`celery inspect`/`control`; vlmq uses neither). Its pub/sub channel is a
        # second broker socket: when Redis goes away (failover, kill -9) and kombu notices there first,
        # its teardown re-reads the consumer's pending BRPOP, fails, and then raises AttributeError
        # ('NoneType' object has no attribute 'hostname'), which Celery treats as unrecoverable: the
        # worker exited instead of reconnecting (tests/test_sentinel.py).
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def make_celery(settings: SharedSettings, main: str) -> Any:
    from celery import Celery

    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app
