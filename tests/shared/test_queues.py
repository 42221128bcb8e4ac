"""The gateway's hand-built task message against what Celery itself publishes."""

from __future__ import annotations

import base64
import json

import pytest

from shared.catalog import queue_name
from shared.queues import RUN_JOB_TASK, job_message, make_celery, send_job, task_message
from shared.settings import SharedSettings

# Differ per message (ids) or per process (origin, Celery's reply queue).
PER_MESSAGE = {"id", "root_id", "origin", "correlation_id", "reply_to", "delivery_tag"}


def _decoded(raw: str) -> dict:
    envelope = json.loads(raw)
    envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
    for part in ("headers", "properties"):
        envelope[part] = {k: v for k, v in envelope[part].items() if k not in PER_MESSAGE}
    return envelope


@pytest.mark.parametrize("priority", [0, 4, 9])
def test_the_message_is_the_one_celery_sends(redis_server, redis_client, priority):
    celery = make_celery(SharedSettings(redis_url=redis_server.url), "vlmq-test")
    redis_client.flushdb()
    send_job(celery, "job_abc", "some-model", priority)
    celery.close()
    mine = job_message("job_abc", "some-model", priority)
    lists = [k for k in redis_client.keys(f"{queue_name('some-model')}*") if redis_client.type(k) == "list"]
    assert lists == [mine.key]
    (theirs,) = redis_client.lrange(mine.key, 0, -1)
    expected = _decoded(theirs)
    # Celery leaves ignore_result to the task (ours are all ignore_result): the same to a worker.
    assert _decoded(mine.body) == expected
    assert set(json.loads(mine.body)["headers"]) == set(json.loads(theirs)["headers"])
    assert set(json.loads(mine.body)["properties"]) == set(json.loads(theirs)["properties"])


def test_each_message_has_its_own_ids():
    one, two = (json.loads(task_message(RUN_JOB_TASK, ["j"], "q").body) for _ in range(2))
    assert one["headers"]["id"] != two["headers"]["id"]
    assert one["properties"]["delivery_tag"] != two["properties"]["delivery_tag"]
    assert one["headers"]["root_id"] == one["headers"]["id"] == one["properties"]["correlation_id"]
