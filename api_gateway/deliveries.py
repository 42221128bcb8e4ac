"""Webhook deliveries from the gateway's side: announcing the events it causes,
and the routes that show and resend a job's deliveries."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from fastapi import APIRouter

from api_gateway.deps import StateDep, TenantDep
from api_gateway.jobs import owned_job
from shared.deliveries import AsyncDeliveryStore
from shared.errors import NotFoundError
from shared.queues import DELIVER_WEBHOOK_TASK, WEBHOOK_QUEUE
from shared.schemas import DeliveryList, DeliveryPublic, WebhookEvent
from shared.store import JobRecord
from shared.webhooks import message_id

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["webhooks"])


class GatewayAnnouncer:
    """Announce an event the gateway caused (a cancel, an expiry noticed on read)."""

    def __init__(self, deliveries: AsyncDeliveryStore, celery: Any) -> None:
        self.deliveries = deliveries
        self._celery = celery

    async def publish(self, delivery_id: str, round_: int) -> None:
        def send() -> None:
            self._celery.send_task(DELIVER_WEBHOOK_TASK, args=[delivery_id, round_, 1], queue=WEBHOOK_QUEUE)

        await anyio.to_thread.run_sync(send)

    async def __call__(self, record: JobRecord | None, event: WebhookEvent) -> None:
        if record is None:
            return
        try:
            delivery_id = await self.deliveries.announce(record, event, time.time())
            if delivery_id:
                await self.publish(delivery_id, 0)
        except Exception:
            # Created but not published: the due set holds it, a webhook worker's pump sends it.
            log.exception("could not announce %s for job %s", event.value, record.id)


@router.get("/{job_id}/deliveries", response_model=DeliveryList)
async def list_deliveries(job_id: str, state: StateDep, tenant: TenantDep) -> DeliveryList:
    await owned_job(state, tenant, job_id)
    return DeliveryList(data=await state.announcer.deliveries.list(job_id))


@router.post("/{job_id}/deliveries/{delivery_id}/redeliver", response_model=DeliveryPublic, status_code=202)
async def redeliver(job_id: str, delivery_id: str, state: StateDep, tenant: TenantDep) -> DeliveryPublic:
    await owned_job(state, tenant, job_id)
    deliveries = state.announcer.deliveries
    # Delivery ids are derived from job and event: another job's delivery is refused here.
    ours = delivery_id in {message_id(job_id, event) for event in WebhookEvent}
    round_ = await deliveries.redeliver(delivery_id, time.time()) if ours else None
    if round_ is None:
        raise NotFoundError(f"Job '{job_id}' has no delivery '{delivery_id}'.", param="delivery_id")
    await state.announcer.publish(delivery_id, round_)
    found = await deliveries.public(delivery_id)
    if found is None:
        raise NotFoundError(f"Job '{job_id}' has no delivery '{delivery_id}'.", param="delivery_id")
    return found
