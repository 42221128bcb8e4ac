"""The shared tier of the media cache: a tenant's media by uuid, in Redis, for every worker.

What is stored is the media as fetched and validated (the file's bytes, a
video's frame list, an embeddings payload), never anything derived from it:
bytes are the same for every model and processor setting, so one entry
serves the whole pool, and each worker derives (decodes, preprocesses,
encodes) what its own model needs, caching that in-process by content hash.

Why Redis, not the S3 bucket: every worker and the gateway already hold a
connection to it, a hit is one round trip (~0.1 ms, the hot path of a
uuid-only part), TTLs and atomic scripts come for free, and media is small
next to what Redis is sized for. The broker's Redis runs `noeviction`, so
the byte budget is ours to keep: each write runs one script that drops
expired entries from the index, then evicts least recently used entries
until the new one fits under VLMQ_MEDIA_CACHE_MAX_BYTES. Items above
VLMQ_MEDIA_CACHE_MAX_ITEM_BYTES are not cached at all (a long video does
not belong in the broker's memory).

Identity: `(tenant, uuid)`. The tenant is part of the key, so another
tenant's uuid is indistinguishable from one never stored. Sending media with
a uuid that exists overwrites it (the last media sent under a uuid is what
the uuid names); because everything derived is keyed by content hash, an
overwrite can never leave a stale tensor anywhere in the pool. Every use
renews an entry's TTL (sliding), so what stays in use stays cached.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from shared import keys

# What an entry holds, and which content parts may refer to it.
KINDS = ("image", "video", "video_frames", "audio", "image_embeds")
PART_KINDS: dict[str, tuple[str, ...]] = {
    "image_url": ("image",),
    "video_url": ("video", "video_frames"),
    "audio_url": ("audio",),
    "input_audio": ("audio",),
    "image_embeds": ("image_embeds",),
}
_META = ("uuid", "kind", "sha256", "size", "format", "stored_at")

_PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ttl, max, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
local function forget(member)
  total = total - tonumber(redis.call('HGET', KEYS[3], member) or '0')
  redis.call('HDEL', KEYS[3], member)
  redis.call('ZREM', KEYS[2], member)
end
-- Entries whose TTL ran out left their index member behind: settle their bytes.
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl, 'LIMIT', 0, 256)) do
  if redis.call('EXISTS', member) == 0 then forget(member) end
end
if redis.call('HEXISTS', KEYS[3], KEYS[1]) == 1 then forget(KEYS[1]) end
redis.call('DEL', KEYS[1])
local evicted = 0
while total + size > max do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  forget(oldest[1])
  redis.call('DEL', oldest[1])
  evicted = evicted + 1
end
if total < 0 then total = 0 end
if total + size > max then
  redis.call('SET', KEYS[4], total)
  return {0, evicted}
end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
redis.call('SET', KEYS[4], total + size)
return {1, evicted}
"""

# A use: renew the TTL and the LRU position, return the metadata (not the bytes).
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local t = redis.call('TIME')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1e6, KEYS[1])
return redis.call('HMGET', KEYS[1], 'uuid', 'kind', 'sha256', 'size', 'format', 'stored_at')
"""

_DELETE = """
local existed = redis.call('DEL', KEYS[1])
local size = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
redis.call('HDEL', KEYS[3], KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
if size > 0 then redis.call('DECRBY', KEYS[4], size) end
return existed
"""


def entry_key(tenant: str, uuid: str) -> str:
    return keys.media(tenant, hashlib.sha256(uuid.encode()).hexdigest())


def content_digest(kind: str, data: bytes) -> str:
    return hashlib.sha256(kind.encode() + b"\0" + data).hexdigest()


@dataclass(frozen=True)
class Entry:
    uuid: str
    kind: str
    sha256: str
    size: int
    format: str | None
    stored_at: float
    expires_at: float

    def public(self) -> dict[str, Any]:
        """The `media` object of `/v1/media`."""
        return {
            "id": self.uuid,
            "object": "media",
            "kind": self.kind,
            "bytes": self.size,
            "sha256": self.sha256,
            "format": self.format,
            "created_at": int(self.stored_at),
            "expires_at": int(self.expires_at),
        }


@dataclass(frozen=True)
class Stored:
    stored: bool  # False: larger than the item cap or the whole budget
    evicted: int
    entry: Entry


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class _Scripts:
    def __init__(self, redis: Any, ttl: int, max_bytes: int, max_item_bytes: int) -> None:
        self.redis = redis
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.max_item_bytes = max_item_bytes
        self._put = redis.register_script(_PUT)
        self._touch = redis.register_script(_TOUCH)
        self._delete = redis.register_script(_DELETE)

    @staticmethod
    def _keys(tenant: str, uuid: str) -> list[str]:
        return [entry_key(tenant, uuid), keys.MEDIA_INDEX, keys.MEDIA_SIZES, keys.MEDIA_BYTES]

    def _put_args(self, uuid: str, kind: str, data: bytes, format: str | None) -> tuple[list[Any], Entry]:
        if kind not in KINDS:
            raise ValueError(f"unknown media kind {kind!r}")
        now = time.time()
        entry = Entry(uuid, kind, content_digest(kind, data), len(data), format, now, now + self.ttl)
        fields: list[Any] = ["uuid", uuid, "kind", kind, "sha256", entry.sha256, "size", str(len(data))]
        fields += ["stored_at", repr(now), "data", data]
        if format:
            fields += ["format", format]
        return [str(self.ttl), str(self.max_bytes), str(len(data)), *fields], entry

    def _entry(self, reply: Any, uuid: str) -> Entry | None:
        if not reply:
            return None
        found = dict(zip(_META, (_text(v) for v in reply), strict=True))
        if found["uuid"] != uuid or not found["kind"]:  # a sha256 collision of uuids, or a half-written entry
            return None
        return Entry(
            uuid=uuid,
            kind=found["kind"] or "",
            sha256=found["sha256"] or "",
            size=int(found["size"] or 0),
            format=found["format"] or None,
            stored_at=float(found["stored_at"] or 0),
            expires_at=time.time() + self.ttl,
        )


class MediaCache(_Scripts):
    """The shared tier for worker threads (blocking; a client without decode_responses)."""

    def lookup(self, tenant: str, uuid: str) -> Entry | None:
        """A use of the entry: renews its TTL. None when unknown, expired or another tenant's."""
        return self._entry(self._touch(keys=self._keys(tenant, uuid)[:2], args=[str(self.ttl)]), uuid)

    def data(self, tenant: str, uuid: str) -> bytes | None:
        value = self.redis.hget(entry_key(tenant, uuid), "data")
        return value.encode("latin-1") if isinstance(value, str) else value

    def put(self, tenant: str, uuid: str, kind: str, data: bytes, format: str | None = None) -> Stored:
        args, entry = self._put_args(uuid, kind, data, format)
        if len(data) > self.max_item_bytes:
            return Stored(False, 0, entry)
        stored, evicted = self._put(keys=self._keys(tenant, uuid), args=args)
        return Stored(bool(stored), int(evicted), entry)

    def delete(self, tenant: str, uuid: str) -> bool:
        return bool(self._delete(keys=self._keys(tenant, uuid)))


class AsyncMediaCache(_Scripts):
    """The same tier for the gateway's event loop."""

    async def lookup(self, tenant: str, uuid: str) -> Entry | None:
        return self._entry(await self._touch(keys=self._keys(tenant, uuid)[:2], args=[str(self.ttl)]), uuid)

    async def put(self, tenant: str, uuid: str, kind: str, data: bytes, format: str | None = None) -> Stored:
        args, entry = self._put_args(uuid, kind, data, format)
        if len(data) > self.max_item_bytes:
            return Stored(False, 0, entry)
        stored, evicted = await self._put(keys=self._keys(tenant, uuid), args=args)
        return Stored(bool(stored), int(evicted), entry)

    async def delete(self, tenant: str, uuid: str) -> bool:
        return bool(await self._delete(keys=self._keys(tenant, uuid)))

    async def usage(self) -> tuple[int, int]:
        """(bytes, entries) the shared tier holds now."""
        total = await self.redis.get(keys.MEDIA_BYTES)
        return int(total or 0), int(await self.redis.zcard(keys.MEDIA_INDEX))


# --- what a file is, from its first bytes ------------------------------------------


def sniff_kind(data: bytes) -> tuple[str, str] | None:
    """(kind, format) of a media file by its magic bytes, or None when it is none we take.

    The gateway stores uploads without decoding them (it never loads PIL or
    PyAV); the type check keeps obvious non-media out, and the worker's
    decoders (with their pixel, duration and time limits) judge the rest
    when a job uses it.
    """
    head = data[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "gif"
    if head.startswith(b"BM"):
        return "image", "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image", "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio", "wav"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", "avi"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B "):
            return "audio", "m4a"
        return "video", "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "webm"
    if head.startswith(b"fLaC"):
        return "audio", "flac"
    if head.startswith(b"OggS"):
        return "audio", "ogg"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio", "mp3"
    return None
