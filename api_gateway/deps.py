"""Typed access to the app's resources from route handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Header, Request

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


async def authenticate(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> str:
    tenant = state.keyring.tenant_for(authorization)
    await state.limiter.check(tenant)
    return tenant


TenantDep = Annotated[str, Depends(authenticate)]
