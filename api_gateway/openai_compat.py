"""OpenAI-compatible routes, so the official `openai` client works unchanged."""

from __future__ import annotations

from fastapi import APIRouter

from api_gateway.deps import StateDep, SubmitTenantDep, TenantDep
from shared.errors import ClientError, TransientError, from_body
from shared.schemas import ChatCompletion, JobCreate, JobStatus, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["openai"])


class JobTimeoutError(TransientError):
    status_code = 504
    type = "timeout"


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: JobCreate, state: StateDep, tenant: SubmitTenantDep) -> ChatCompletion:
    record, _, _ = await state.submitter.submit(tenant, body)
    finished = await state.events.wait_terminal(state.store, record.id, state.settings.sync_timeout)
    if finished is None or not finished.status.terminal:
        raise JobTimeoutError(
            f"Job {record.id} did not finish within {state.settings.sync_timeout:g}s; it keeps running: "
            f"poll GET /v1/jobs/{record.id}.",
            code=record.id,
        )
    if finished.status is JobStatus.succeeded and finished.result:
        return ChatCompletion.model_validate(finished.result)
    if finished.status is JobStatus.failed:
        raise from_body(finished.error, f"Job {record.id} failed.")
    raise ClientError(f"Job {record.id} was {finished.status.value}.", code=f"job_{finished.status.value}")


@router.get("/models", response_model=ModelList)
async def list_models(state: StateDep, tenant: TenantDep) -> ModelList:
    served = await state.submitter.served_models()
    return ModelList(
        data=[
            ModelCard(id=name, workers=entry.workers, modalities=entry.modalities or [])
            for name, entry in served.items()
        ]
    )
