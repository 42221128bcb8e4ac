"""Tells the pool this worker is alive and which model it serves.

A key with a TTL, renewed by a background thread: when the process dies the
key simply expires, and the gateway stops counting it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any

from shared import keys

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, redis: Any, name: str, models: list[str], interval: float, info: dict[str, Any]) -> None:
        self._redis = redis
        self._key = keys.worker(name)
        self._interval = interval
        self._payload = json.dumps(
            {"name": name, "models": models, "pid": os.getpid(), "started_at": time.time(), **info}
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlmq-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):  # shutting down; the key expires anyway
            self._redis.delete(self._key)

    def _beat(self) -> None:
        self._redis.set(self._key, self._payload, ex=max(2, int(self._interval * 3)))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception as exc:  # Redis restarting: keep trying
                log.warning("heartbeat failed: %s", exc)
