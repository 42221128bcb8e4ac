"""Typed access to the app's resources from route handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from starlette.requests import HTTPConnection

from api_gateway.auth import KeyRing
from api_gateway.config import GatewaySettings
from api_gateway.events import JobEvents
from api_gateway.limits import RateLimiter
from api_gateway.submit import Submitter
from shared.media_cache import AsyncMediaCache
from shared.store import AsyncJobStore

if TYPE_CHECKING:
    from api_gateway.deliveries import GatewayAnnouncer


@dataclass
class GatewayState:
    settings: GatewaySettings
    redis: Any
    store: AsyncJobStore
    events: JobEvents
    keyring: KeyRing
    submitter: Submitter
    announcer: GatewayAnnouncer
    media: AsyncMediaCache
    limiter: RateLimiter


async def get_state(request: Request) -> GatewayState:
    # async: FastAPI runs a plain function dependency in a worker thread, on every request.
    return request.app.state.vlmq


StateDep = Annotated[GatewayState, Depends(get_state)]


class BearerKey(HTTPBearer):
    """The `Authorization` header as sent, documented as the bearer scheme (the Authorize button in /docs).

    `KeyRing.tenant_for` reads it, so a missing, malformed or wrong key gets
    vlmq's own OpenAI-shaped 401, and nothing but a header lookup runs per request.
    """

    async def __call__(self, request: HTTPConnection) -> str | None:  # type: ignore[override]
        return request.headers.get("authorization")


bearer_key = BearerKey(
    description="An API key from VLMQ_API_KEYS, sent as `Authorization: Bearer <key>`.", auto_error=False
)
AuthorizationDep = Annotated[str | None, Depends(bearer_key)]


async def authenticate(state: StateDep, authorization: AuthorizationDep) -> str:
    tenant = state.keyring.tenant_for(authorization)
    await state.limiter.check(tenant)
    return tenant


async def authenticate_submit(state: StateDep, authorization: AuthorizationDep) -> str:
    """As `authenticate`, for routes that submit: the script accepting the job counts the request."""
    return state.keyring.tenant_for(authorization)


TenantDep = Annotated[str, Depends(authenticate)]
SubmitTenantDep = Annotated[str, Depends(authenticate_submit)]
