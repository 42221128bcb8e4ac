"""The job routes: submit, read (long-poll), cancel, list."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status

from api_gateway.deps import BearerKey, GatewayState, StateDep, TenantDep
from shared.errors import InvalidRequestError, JobExpiredError, NotFoundError
from shared.schemas import JobCreate, JobList, JobPublic, JobStatus, WebhookEvent
from shared.store import JobRecord

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_PREFER_WAIT = re.compile(r"(?:^|[;,\s])wait\s*=\s*(\d+(?:\.\d+)?)")


def prefer_wait(prefer: str | None) -> float | None:
    """Seconds asked for by an RFC 7240 `Prefer: wait=N` header."""
    if not prefer:
        return None
    match = _PREFER_WAIT.search(prefer)
    return float(match.group(1)) if match else None


async def owned_job(state: StateDep, tenant: str, job_id: str) -> JobRecord:
    record = await state.store.get(job_id)
    # Another tenant's job answers exactly like a missing one: ids leak nothing.
    if record is None or record.tenant != tenant:
        raise NotFoundError(
            f"No job '{job_id}': unknown, or its record was removed {state.settings.result_ttl}s after it "
            "last changed (VLMQ_RESULT_TTL).",
            param="job_id",
        )
    return await expire_if_due(state, record)


async def expire_if_due(state: StateDep, record: JobRecord) -> JobRecord:
    """A queued job past its expires_at is `expired` now, even before a worker reaches its task."""
    if record.status is not JobStatus.queued or record.started_at or not record.expires_at:
        return record
    if time.time() <= record.expires_at:
        return record
    error = JobExpiredError.for_ttl(round(record.expires_at - record.created_at))
    fields = {"completed_at": time.time(), "error": error.to_body()}
    moved = await state.store.transition(record.id, (JobStatus.queued,), JobStatus.expired, fields)
    if moved.applied:
        await state.announcer(moved.record, WebhookEvent.expired)
    return moved.record or record


async def public(state: StateDep, record: JobRecord) -> JobPublic:
    return record.to_public(queue_position=await state.store.queue_position(record))


# The submit route is the gateway's hot path (the load test's ~1,500/s on one core):
# it reads its state, key and headers from the request itself rather than through
# FastAPI's dependency solver, which costs more per request than accepting the job,
# and writes its JSON directly. The OpenAPI operation still says what it takes.
_SUBMIT_OPENAPI: dict[str, Any] = {
    "security": [{BearerKey.__name__: []}],
    "parameters": [
        {
            "name": "prefer",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "RFC 7240 `wait=N`: answer `200` with the finished job if it finishes within N seconds.",
        },
        {
            "name": "idempotency-key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            "description": "The same key with the same body returns the first job (`200`); with another body, `409`.",
        },
    ],
}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic, openapi_extra=_SUBMIT_OPENAPI)
async def create_job(body: JobCreate, request: Request) -> Response:
    state: GatewayState = request.app.state.vlmq
    headers = request.headers
    tenant = state.keyring.tenant_for(headers.get("authorization"))
    key = state.submitter.check_idempotency_key(headers.get("idempotency-key"))
    record, replayed, position = await state.submitter.submit(tenant, body, key)
    code = status.HTTP_202_ACCEPTED
    extra = {"Location": f"/v1/jobs/{record.id}"}
    if replayed:
        # The job this key created first; nothing new was queued.
        code = status.HTTP_200_OK
        extra["Idempotent-Replayed"] = "true"
    wait = prefer_wait(headers.get("prefer"))
    finished = None
    if wait:
        finished = await state.events.wait_terminal(state.store, record.id, min(wait, state.settings.max_wait_seconds))
    if finished is not None and finished.status.terminal:
        code = status.HTTP_200_OK
        extra["Preference-Applied"] = f"wait={wait:g}"
    if finished is not None or replayed:
        job = await public(state, finished or record)
    else:
        job = record.to_public(queue_position=position)  # just accepted: the script that queued it said where
    return Response(job.model_dump_json(), status_code=code, headers=extra, media_type="application/json")


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(
    job_id: str,
    state: StateDep,
    tenant: TenantDep,
    wait: Annotated[float, Query(ge=0, description="Long-poll: seconds to wait for a terminal status.")] = 0,
) -> JobPublic:
    record = await owned_job(state, tenant, job_id)
    if wait and not record.status.terminal:
        latest = await state.events.wait_terminal(state.store, job_id, min(wait, state.settings.max_wait_seconds))
        record = latest or record
    return await public(state, record)


@router.post("/{job_id}/cancel", response_model=JobPublic)
async def cancel_job(job_id: str, state: StateDep, tenant: TenantDep) -> JobPublic:
    record = await owned_job(state, tenant, job_id)
    if record.status.terminal:
        return await public(state, record)
    fields = {"completed_at": time.time()}
    # A queued job never runs: its task finds it cancelled. It is announced here.
    moved = await state.store.transition(job_id, (JobStatus.queued,), JobStatus.cancelled, fields)
    if moved.applied:
        await state.announcer(moved.record, WebhookEvent.cancelled)
    else:
        # A running job: its worker hears of it, stops the request at the next decode
        # step, keeps the partial text on the job and announces it. Its late result,
        # if it had already finished, is refused by the store.
        moved = await state.store.transition(job_id, (JobStatus.running,), JobStatus.cancelled, fields)
    record = moved.record or await owned_job(state, tenant, job_id)
    return await public(state, record)


@router.get("", response_model=JobList)
async def list_jobs(
    state: StateDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
) -> JobList:
    before = None
    if after is not None:
        cursor = await state.store.get(after)
        if cursor is None or cursor.tenant != tenant:
            raise InvalidRequestError(f"Unknown pagination cursor '{after}'.", param="after")
        before = cursor.created_at
    records, has_more = await state.store.list(tenant, limit, before)
    data = [await public(state, await expire_if_due(state, r)) for r in records]
    return JobList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )
