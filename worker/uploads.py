"""`POST /v1/media` with a URL, on a worker: fetch it as a job's media is fetched, store it.

The gateway waits on a reply list (`keys.media_fetch_reply`), so the answer
goes there: the stored media object, or the error in the OpenAI shape.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from shared import keys, metrics
from shared.errors import InternalError, MediaError, RequestTooLargeError, VlmqError
from shared.media_cache import MediaCache, sniff_kind
from shared.media_policy import MediaPolicy, check_media_url
from worker.config import WorkerSettings
from worker.media.fetch import MediaFetcher

log = logging.getLogger(__name__)

REPLY_TTL = 120


def fetch_into_cache(
    settings: WorkerSettings,
    fetcher: MediaFetcher,
    cache: MediaCache,
    tenant: str,
    url: str,
    uuid: str,
    kind: str | None,
) -> dict[str, Any]:
    """The stored entry's public object; raises a VlmqError for the client."""
    check_media_url(url, MediaPolicy.from_settings(settings), "url")
    modality = "video" if kind in ("video", "video_frames") else kind or "image"
    fetched = fetcher.fetch(url, modality=modality, param="url")
    fmt: str | None
    if fetched.frames is not None:
        found, fmt = "video_frames", "jpeg"
        data = json.dumps([base64.b64encode(f).decode() for f in fetched.frames]).encode()
    else:
        sniffed = sniff_kind(fetched.data)
        if sniffed is None:
            raise MediaError(
                "The URL's content is not an image, video or audio file vlmq takes.",
                param="url",
                code="unsupported_media_type",
            )
        (found, fmt), data = sniffed, fetched.data
    if kind and kind != found and not (kind == "video" and found == "video_frames"):
        raise MediaError(f"The URL holds {found} media, not {kind}.", param="kind", code="media_kind_mismatch")
    stored = cache.put(tenant, uuid, found, data, fmt)
    counts = {metrics.field("media_cache_evictions", tier="shared"): stored.evicted}
    if not stored.stored:
        metrics.add(cache.redis, counts)
        raise RequestTooLargeError(
            f"The media ({len(data)} bytes) is larger than the cache takes "
            f"(VLMQ_MEDIA_CACHE_MAX_ITEM_BYTES={settings.media_cache_max_item_bytes}).",
            param="url",
        )
    counts[metrics.field("media_cache_stores", tier="shared")] = 1
    metrics.add(cache.redis, counts)
    return stored.entry.public()


def answer_fetch(
    settings: WorkerSettings,
    fetcher: MediaFetcher,
    cache: MediaCache,
    request_id: str,
    tenant: str,
    url: str,
    uuid: str,
    kind: str | None,
) -> None:
    try:
        reply: dict[str, Any] = {"media": fetch_into_cache(settings, fetcher, cache, tenant, url, uuid, kind)}
    except VlmqError as exc:
        reply = {"error": exc.to_body(), "status": exc.status_code}
    except Exception:
        log.exception("media fetch %s failed", request_id)
        error = InternalError("The worker had an error while fetching the media.")
        reply = {"error": error.to_body(), "status": error.status_code}
    name = keys.media_fetch_reply(request_id)
    with cache.redis.pipeline(transaction=True) as pipe:
        pipe.rpush(name, json.dumps(reply))
        pipe.expire(name, REPLY_TTL)
        pipe.execute()
