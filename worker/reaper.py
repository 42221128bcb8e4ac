"""Takes back the jobs of workers that died, long before the broker would.

A worker killed mid-job (kill -9, out of memory, a lost host) leaves its job
`running` and its Celery message unacknowledged; Redis hands that message to
another worker only after the visibility timeout, which must exceed the
longest job (an hour by default). The reaper makes the wait about
`3 x VLMQ_HEARTBEAT_SECONDS` instead: every live worker walks the running
index, and a job whose holder's heartbeat has been missing on two scans at
least a heartbeat TTL apart is published again and set back to `queued`
(or failed `worker_lost` once it has used VLMQ_MAX_ATTEMPTS), both with a
compare-and-set on the holder, so of two reapers, or a reaper and a
redelivered message, exactly one takes it.

The second look is what keeps a Redis restart from reaping live workers:
their heartbeat keys may have expired while Redis was down, and they write
them again within one period of it coming back.

A job can also be orphaned on a live worker: if Redis loses its last second
of writes (a host crash under `appendfsync everysec`), a job the worker
finished may come back `running` on it. Its heartbeat is alive, so no other
reaper touches it, and a redelivered message on another worker defers to the
holder as long as it lives. So each reaper also takes back jobs held in its
own name that its runner is not running, seen so on two scans a grace apart
and started at least a grace ago (which also covers the moment between a
job's transition to running and the runner recording it).

The message is published *before* the job is set back, so a crash between
the two leaves an extra message (which finds the job running on a live
worker, or finished, and does nothing) rather than a queued job without one.
The dead worker's own message comes back after the visibility timeout and
finds the job finished, or running elsewhere, likewise harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from shared import keys
from shared.schemas import JobStatus, WebhookEvent
from shared.store import JobRecord, JobStore
from worker.jobs import Announce, worker_lost

log = logging.getLogger(__name__)

Publish = Callable[[JobRecord], None]


class Reaper:
    def __init__(
        self,
        store: JobStore,
        publish: Publish,
        announce: Announce,
        *,
        max_attempts: int,
        heartbeat_seconds: float,
        worker_name: str = "",
        running_ids: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self._store = store
        # This worker's name and the jobs its runner is running now: its own orphans.
        self._me = worker_name
        self._running_ids = running_ids
        self._publish = publish
        self._announce = announce
        self._max_attempts = max_attempts
        self._interval = heartbeat_seconds
        # A heartbeat key lives 3 periods (worker.heartbeat); a holder must stay missing that long again.
        self.grace = max(2.0, heartbeat_seconds * 3)
        self._missing_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlmq-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def reap_once(self, now: float | None = None) -> list[str]:
        """One scan; the ids of the jobs taken back (requeued or failed)."""
        now = time.time() if now is None else now
        redis = self._store.redis
        ids = self._store.running()
        with redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.job(job_id), "worker")
            holders = pipe.execute()
        alive = _alive(redis, {h for h in holders if h})
        mine = self._running_ids()
        reaped = []
        seen = set()
        for job_id, holder in zip(ids, holders, strict=True):
            own = bool(self._me) and holder == self._me
            if own and job_id in mine:
                continue
            if not own and holder and holder in alive:
                continue
            seen.add(job_id)
            first = self._missing_since.setdefault(job_id, now)
            if now - first < self.grace:
                continue
            record = self._store.get(job_id)
            if record is None:
                redis.zrem(keys.RUNNING, job_id)
                continue
            if record.status is not JobStatus.running or record.worker != holder:
                continue
            if own and (job_id in self._running_ids() or now - (record.started_at or 0) < self.grace):
                continue  # this worker (re)started it since the first look
            if self._take_back(record, "which no longer runs it" if own else "which died"):
                reaped.append(job_id)
        # Forget jobs that are no longer suspect (finished, taken back, or their worker returned).
        self._missing_since = {k: v for k, v in self._missing_since.items() if k in seen and k not in reaped}
        return reaped

    def _take_back(self, record: JobRecord, why: str) -> bool:
        holder = record.worker or ""
        if record.attempts >= self._max_attempts:
            moved = self._store.transition(
                record.id,
                (JobStatus.running,),
                JobStatus.failed,
                {"error": worker_lost(record.attempts).to_body(), "completed_at": time.time()},
                expect_worker=holder,
            )
            if moved.applied:
                log.error("reaper: job %s lost its worker %s %d times; failed", record.id, holder, record.attempts)
                self._announce(moved.record, WebhookEvent.failed)
            return moved.applied
        self._publish(record)
        moved = self._store.transition(
            record.id, (JobStatus.running,), JobStatus.queued, {"tokens_generated": 0}, expect_worker=holder
        )
        if moved.applied:
            log.warning("reaper: job %s was running on %s, %s; queued again", record.id, holder, why)
        return moved.applied

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.reap_once()
            except Exception as exc:  # Redis restarting: look again next period
                log.warning("reaper: %s", exc)


def _alive(redis: Any, names: set[str]) -> set[str]:
    ordered = sorted(names)
    if not ordered:
        return set()
    with redis.pipeline(transaction=False) as pipe:
        for name in ordered:
            pipe.exists(keys.worker(name))
        found = pipe.execute()
    return {name for name, exists in zip(ordered, found, strict=True) if exists}
