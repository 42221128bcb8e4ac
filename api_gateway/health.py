"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api_gateway.deps import StateDep
from api_gateway.submit import live_workers

router = APIRouter(tags=["service"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    try:
        await state.redis.ping()
        workers = await live_workers(state.redis)
    except Exception as exc:
        return _not_ready(f"Redis is not reachable: {type(exc).__name__}.")
    if not workers:
        return _not_ready("No worker is serving yet.")
    models = sorted({m for beat in workers for m in beat.get("models", [])})
    return JSONResponse({"status": "ready", "workers": len(workers), "models": models})


def _not_ready(message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "service_unavailable", "param": None, "code": "not_ready"}}
    return JSONResponse(body, status_code=503)
