"""The gateway application, built by `create_app()`; nothing happens at import."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api_gateway import deliveries, health, jobs, media, metrics, openai_compat
from api_gateway.auth import KeyRing
from api_gateway.config import GatewaySettings
from api_gateway.deps import GatewayState
from api_gateway.events import JobEvents
from api_gateway.limits import BodySizeLimit, RateLimiter
from api_gateway.submit import Submitter
from shared.deliveries import AsyncDeliveryStore
from shared.errors import InternalError, RateLimitError, TransientError, VlmqError
from shared.media_cache import AsyncMediaCache
from shared.redis_conn import async_redis
from shared.store import AsyncJobStore

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    keyring = KeyRing(settings.api_keys)  # fail at start, not on the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = async_redis(settings)
        store = AsyncJobStore(redis, settings.result_ttl)
        events = JobEvents(redis)
        await events.start()
        limiter = RateLimiter(redis, settings.rate_limit, settings.rate_limit_burst)
        submitter = Submitter(settings, redis, store, limiter)
        app.state.vlmq = GatewayState(
            settings=settings,
            redis=redis,
            store=store,
            events=events,
            keyring=keyring,
            submitter=submitter,
            announcer=deliveries.GatewayAnnouncer(
                AsyncDeliveryStore(redis, settings.result_ttl, settings.webhook_lease), submitter.celery
            ),
            media=AsyncMediaCache(
                redis, settings.media_cache_ttl, settings.media_cache_max_bytes, settings.media_cache_max_item_bytes
            ),
            limiter=limiter,
        )
        # Everything built so far lives as long as the process: out of the collector's
        # sight, a full collection walks only per-request objects and stays short.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await events.stop()
            await redis.aclose()

    app = FastAPI(
        title="vlmq",
        summary="Asynchronous inference for vision-language models.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(jobs.router)
    app.include_router(deliveries.router)
    app.include_router(openai_compat.router)
    app.include_router(health.router)
    app.include_router(media.router)
    app.include_router(metrics.router)
    _install_error_handlers(app)
    return app


def _error_response(exc: VlmqError) -> JSONResponse:
    headers = {}
    if isinstance(exc, RateLimitError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(exc.to_response(), status_code=exc.status_code, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    import redis.exceptions

    @app.exception_handler(VlmqError)
    async def on_vlmq_error(request: Request, exc: VlmqError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc.errors(), exc.body)
        body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(redis.exceptions.ConnectionError)
    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        return _error_response(TransientError("The job store is unavailable; try again shortly."))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(InternalError("The server had an error while processing your request."))


def describe_validation_error(errors: Sequence[Any], body: Any) -> tuple[str, str | None]:
    """One readable message and an OpenAI-style `param` path for a failed validation.

    Pydantic's error locations also name union branches and discriminator
    tags; walking the location through the body the client actually sent
    keeps only the steps that exist there, so `param` reads like
    `messages[0].content[1].image_url.url`.
    """
    best: tuple[int, str, str | None] | None = None
    for err in errors:
        loc = list(err.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        path, node = "", body
        for i, step in enumerate(loc):
            last = i == len(loc) - 1
            if isinstance(step, int) and isinstance(node, list) and 0 <= step < len(node):
                path, node = f"{path}[{step}]", node[step]
            elif (
                isinstance(step, str)
                and isinstance(node, dict)
                and (step in node or (last and err["type"] == "missing"))
            ):
                path, node = f"{path}.{step}" if path else step, node.get(step)
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            message = "The request body is not valid JSON."
        elif err.get("type") == "missing" and path:
            message = f"Missing required parameter: '{path}'."
        elif path:
            message = f"Invalid value for '{path}': {message}"
        depth = path.count(".") + path.count("[")
        if best is None or depth > best[0]:
            best = (depth, message, path or None)
    if best is None:
        return "Invalid request.", None
    return best[1], best[2]
