"""Tells running jobs they were cancelled, without polling Redis.

One pattern subscription per worker process hears every job's status
changes (the job store publishes each one); when a job this process is
running turns `cancelled`, its event is set, and the engine stops that
request at its next decode step. A job is watched *before* it is marked
running, so a cancel between the two is either refused by the store
(the job is no longer queued) or heard here. After a (re)connect, the
statuses of the watched jobs are read once, in case a message was lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from shared import keys
from shared.schemas import JobStatus

log = logging.getLogger(__name__)


class CancelWatcher:
    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._watched: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlmq-cancel-watcher", daemon=True)

    def start(self, timeout: float = 10.0) -> CancelWatcher:
        self._thread.start()
        if not self._subscribed.wait(timeout):
            raise RuntimeError("could not subscribe to job events")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[threading.Event]:
        event = threading.Event()
        with self._lock:
            self._watched[job_id] = event
        try:
            yield event
        finally:
            with self._lock:
                self._watched.pop(job_id, None)

    def _set(self, job_id: str) -> None:
        with self._lock:
            event = self._watched.get(job_id)
        if event is not None:
            event.set()

    def _recheck(self) -> None:
        with self._lock:
            ids = list(self._watched)
        for job_id in ids:
            if self._redis.hget(keys.job(job_id), "status") == JobStatus.cancelled.value:
                self._set(job_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                try:
                    pubsub.psubscribe(keys.JOB_EVENTS_PATTERN)
                    # The first get_message reads the subscribe confirmation.
                    pubsub.get_message(timeout=5.0)
                    self._subscribed.set()
                    self._recheck()
                    while not self._stop.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message and message["type"] == "pmessage" and message["data"] == JobStatus.cancelled.value:
                            self._set(keys.job_id_from_events_channel(message["channel"]))
                finally:
                    pubsub.close()
            except Exception as exc:  # Redis restarts must not end the watcher
                log.warning("cancel watcher lost its subscription (%s); reconnecting", exc)
                self._stop.wait(0.5)
