"""`/v1/media`: put media in the tenant's cache ahead of time, read its entry, delete it.

An upload (multipart, field `file`) is stored by the gateway itself: it is
read up to VLMQ_MEDIA_CACHE_MAX_ITEM_BYTES and must be an image, video or
audio file by its magic bytes; nothing is decoded here (the gateway never
loads PIL or PyAV), the worker's decoders judge it when a job uses it.

A URL (JSON `{"url": …}`) is not fetched here: the gateway makes no
outbound requests, so a URL cannot turn it into a proxy into its own
network. It goes to the workers' media queue and is fetched by the same
SSRF-guarded fetcher, allow-list and limits as a job's media; the gateway
waits (up to VLMQ_MEDIA_FETCH_WAIT) for the answer.
"""

from __future__ import annotations

import functools
import json
import secrets
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from api_gateway.deps import StateDep, TenantDep
from api_gateway.submit import live_workers
from shared import keys, metrics
from shared.errors import (
    InvalidRequestError,
    MediaError,
    NotFoundError,
    RequestTooLargeError,
    TransientError,
    VlmqError,
    from_body,
)
from shared.media_cache import sniff_kind
from shared.media_policy import MediaPolicy, check_media_url
from shared.queues import FETCH_MEDIA_TASK, MEDIA_QUEUE

router = APIRouter(prefix="/v1/media", tags=["media"])

UUID = Annotated[str, Field(min_length=1, max_length=256)]
_FILE_KINDS = ("image", "video", "audio")


class MediaFromURL(BaseModel):
    url: str = Field(min_length=1, max_length=8192)
    uuid: UUID | None = None
    kind: str | None = Field(default=None, description="image | video | audio; checked against the content")


def _new_uuid() -> str:
    return "media_" + secrets.token_hex(12)


def _check_uuid(value: str | None) -> str:
    if value is None or value == "":
        return _new_uuid()
    if len(value) > 256:
        raise InvalidRequestError("uuid takes at most 256 characters.", param="uuid")
    return value


def _check_kind(value: str | None) -> str | None:
    if value and value not in _FILE_KINDS:
        raise InvalidRequestError(f"kind must be one of {', '.join(_FILE_KINDS)}.", param="kind")
    return value or None


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_media(request: Request, state: StateDep, tenant: TenantDep, response: Response) -> dict[str, Any]:
    """Store media in the tenant's cache; reference it later as `{"image_url": null, "uuid": …}`."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        entry = await _upload(request, state, tenant)
    elif content_type.startswith("application/json"):
        try:
            body = MediaFromURL.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise InvalidRequestError(f"Invalid value for '{param}': {first.get('msg')}", param=param) from None
        entry = await _from_url(state, tenant, body)
    else:
        raise InvalidRequestError(
            "Send multipart/form-data with a `file` field, or JSON with a `url`.", param="Content-Type"
        )
    response.headers["Location"] = f"/v1/media/{entry['id']}"
    return entry


async def _upload(request: Request, state: StateDep, tenant: str) -> dict[str, Any]:
    cap = state.settings.media_cache_max_item_bytes
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("The multipart body needs a `file` field holding the media.", param="file")
        uuid = _check_uuid(_text_field(form.get("uuid")))
        kind = _check_kind(_text_field(form.get("kind")))
        data = await upload.read(cap + 1)
    if len(data) > cap:
        raise RequestTooLargeError(
            f"The file is larger than {cap} bytes (VLMQ_MEDIA_CACHE_MAX_ITEM_BYTES).", param="file"
        )
    sniffed = sniff_kind(data)
    if sniffed is None:
        raise MediaError("The file is not an image, video or audio file vlmq takes.", param="file")
    found, fmt = sniffed
    if kind and kind != found:
        raise MediaError(f"The file is {found} media, not {kind}.", param="kind", code="media_kind_mismatch")
    stored = await state.media.put(tenant, uuid, found, data, fmt)
    counts = {metrics.field("media_cache_evictions", tier="shared"): stored.evicted}
    if stored.stored:
        counts[metrics.field("media_cache_stores", tier="shared")] = 1
    await metrics.add_async(state.redis, counts)
    if not stored.stored:
        raise RequestTooLargeError("The media cache cannot hold this file (VLMQ_MEDIA_CACHE_MAX_BYTES).", param="file")
    return stored.entry.public()


def _text_field(value: Any) -> str | None:
    return value if isinstance(value, str) else None


async def _from_url(state: StateDep, tenant: str, body: MediaFromURL) -> dict[str, Any]:
    uuid = _check_uuid(body.uuid)
    kind = _check_kind(body.kind)
    check_media_url(body.url, MediaPolicy.from_settings(state.settings), "url")
    if not await live_workers(state.redis):
        raise TransientError("No worker is running to fetch the URL; try again shortly.")
    wait = state.settings.media_fetch_wait
    request_id = secrets.token_hex(12)
    send = functools.partial(
        state.submitter.celery.send_task,
        FETCH_MEDIA_TASK,
        args=[request_id, tenant, body.url, uuid, kind],
        queue=MEDIA_QUEUE,
        # Not fetched at all once nobody waits for it any more.
        expires=wait,
    )
    try:
        await anyio.to_thread.run_sync(send)
    except Exception:
        raise TransientError("The media queue is unavailable; try again shortly.") from None
    popped = await state.redis.blpop([keys.media_fetch_reply(request_id)], timeout=wait)
    if popped is None:
        raise TransientError(f"No worker fetched the URL within {wait:g}s; try again.", code="media_fetch_timeout")
    reply = json.loads(popped[1])
    if "error" in reply:
        error: VlmqError = from_body(reply["error"], "The media could not be fetched.")
        error.status_code = int(reply.get("status") or error.status_code)
        raise error
    return dict(reply["media"])


@router.get("/{uuid:path}")
async def get_media(uuid: str, state: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """The entry's metadata (a read is a use: it renews the TTL)."""
    entry = await state.media.lookup(tenant, uuid)
    if entry is None:
        raise _not_found(uuid)
    return entry.public()


@router.delete("/{uuid:path}")
async def delete_media(uuid: str, state: StateDep, tenant: TenantDep) -> dict[str, Any]:
    if not await state.media.delete(tenant, uuid):
        raise _not_found(uuid)
    return {"id": uuid, "object": "media.deleted", "deleted": True}


def _not_found(uuid: str) -> NotFoundError:
    # Another tenant's uuid answers exactly like a missing one.
    return NotFoundError(f"No media is cached under the uuid '{uuid}'.", param="uuid", code="media_cache_miss")
