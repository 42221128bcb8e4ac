"""Wake waiting requests when a job changes, without polling Redis.

One pattern subscription per gateway process receives every job's status
changes and sets the events of the requests watching that job. A waiter
re-reads the job after each wake-up, and at least every `recheck` seconds in
case a message was lost while the subscription reconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator

from shared import keys
from shared.store import AsyncJobStore, JobRecord

log = logging.getLogger(__name__)


class JobEvents:
    def __init__(self, redis, recheck: float = 5.0) -> None:
        self._redis = redis
        self._recheck = recheck
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="vlmq-job-events")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.psubscribe(keys.JOB_EVENTS_PATTERN)
                    self._wake_all()  # anything missed while (re)connecting
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
                        if message and message["type"] == "pmessage":
                            self._wake(keys.job_id_from_events_channel(message["channel"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarts must not end the listener
                log.warning("job event subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(0.5)

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    @contextlib.contextmanager
    def _watch(self, job_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters[job_id].add(event)
        try:
            yield event
        finally:
            self._waiters[job_id].discard(event)
            if not self._waiters[job_id]:
                del self._waiters[job_id]

    async def wait_terminal(self, store: AsyncJobStore, job_id: str, timeout: float) -> JobRecord | None:
        """The job once it is terminal, or as it stands when `timeout` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self._watch(job_id) as event:
            while True:
                event.clear()  # before the read: a change after it still wakes us
                record = await store.get(job_id)
                remaining = deadline - loop.time()
                if record is None or record.status.terminal or remaining <= 0:
                    return record
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, self._recheck))
