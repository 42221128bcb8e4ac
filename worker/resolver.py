"""A job's media parts -> items the preparer takes, through the cache tiers.

For each media part, in prompt order:

1. The source. A part with media is fetched (the SSRF-guarded fetcher) and
   hashed; if it also has a uuid, the bytes go to the shared tier under
   (tenant, uuid), overwriting what the uuid named before. A part with
   media `null` looks its uuid up in the shared tier: unknown, expired or
   another tenant's is a `MediaCacheMissError` naming the part.
2. The worker tier, by `item_key` (tenant, model, processor, decode options,
   content hash): a hit hands the preprocessed item over, so decode and
   preprocessing (and, for a uuid-only part, even the bytes' transfer from
   Redis) are skipped. The engine then finds the encoder output under the
   same key.
3. Otherwise the bytes are decoded here and preprocessed by the preparer,
   which keeps the result in the worker tier.

What happened to each item is reported on the job (`cache`) and counted
for `/metrics`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from shared import metrics
from shared.errors import ClientError, MediaCacheMissError, MediaError
from shared.media_cache import PART_KINDS, MediaCache, content_digest
from shared.media_policy import MediaPolicy, check_media_url
from shared.schemas import ImageEmbedsPart, InputAudioPart, JobCreate, MediaPart, VideoPart
from worker.config import WorkerSettings
from worker.engine.prepare import Preparer
from worker.media.audio import decode_audio
from worker.media.embeds import decode_image_embeds
from worker.media.fetch import MediaFetcher
from worker.media.image import decode_image
from worker.media.video import decode_frame_list, decode_video
from worker.media_cache import ItemCache, item_key, processor_fingerprint


@dataclass
class Source:
    """Media as fetched: what the shared tier stores."""

    kind: str
    data: bytes
    format: str | None = None


@dataclass
class Resolved:
    media: list[Any] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    report: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, tier: str, n: int = 1) -> None:
        f = metrics.field(name, tier=tier)
        self.counts[f] = self.counts.get(f, 0) + n


@dataclass
class MediaResolver:
    settings: WorkerSettings
    fetcher: MediaFetcher
    preparer: Preparer
    shared: MediaCache | None = None
    items: ItemCache | None = None
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = processor_fingerprint(self.preparer.model.processor)

    def resolve(self, tenant: str, request: JobCreate, out: Resolved | None = None) -> Resolved:
        """Fill `out` (counts included, even when a part fails) and return it."""
        out = out if out is not None else Resolved()
        for param, part in request.media_parts():
            item, key, report = self._part(tenant, request, param, part, out)
            out.media.append(item)
            out.keys.append(key)
            out.report.append(report)
        return out

    def _part(
        self, tenant: str, request: JobCreate, param: str, part: MediaPart, out: Resolved
    ) -> tuple[Any, str | None, dict[str, Any]]:
        report: dict[str, Any] = {"param": param, "modality": part.modality, "uuid": part.uuid}
        source: Source | None = None
        if part.media is None:
            assert part.uuid is not None  # the schema refuses media null without a uuid
            entry = self.shared.lookup(tenant, part.uuid) if self.shared else None
            if entry is None:
                out.count("media_cache_misses", "shared")
                raise self._miss(part.uuid, param)
            out.count("media_cache_hits", "shared")
            if entry.kind not in PART_KINDS[part.type]:
                raise MediaError(
                    f"The uuid '{part.uuid}' names {entry.kind.replace('_', ' ')} media, which a {part.type} "
                    "part cannot use.",
                    param=f"{param}.uuid",
                    code="media_kind_mismatch",
                )
            digest, kind, format = entry.sha256, entry.kind, entry.format
            report["shared"] = "hit"
        else:
            source = self._fetch(request, param, part)
            digest, kind, format = content_digest(source.kind, source.data), source.kind, source.format
            report["shared"] = self._store(tenant, part.uuid, source, digest, out) if part.uuid else None

        key = self._key(tenant, request, part, kind, digest)
        if key is not None and self.items is not None and self.preparer.caches_items:
            cached = self.items.get(key)
            report["worker"] = "hit" if cached is not None else "miss"
            out.count("media_cache_hits" if cached is not None else "media_cache_misses", "worker")
            if cached is not None:
                return cached, key, report
        if source is None:
            assert part.uuid is not None and self.shared is not None
            data = self.shared.data(tenant, part.uuid)
            if data is None:  # evicted between the lookup and now
                raise self._miss(part.uuid, param)
            source = Source(kind, data, format)
        return self._decode(request, param, part, source), key, report

    @staticmethod
    def _miss(uuid: str, param: str) -> MediaCacheMissError:
        return MediaCacheMissError(
            f"No media is cached under the uuid '{uuid}' for your API key's tenant: it was never sent, "
            "or has expired (VLMQ_MEDIA_CACHE_TTL) or been evicted. Send the media again with this uuid, "
            "or upload it with POST /v1/media.",
            param=f"{param}.uuid",
        )

    def _store(self, tenant: str, uuid: str, source: Source, digest: str, out: Resolved) -> str:
        """Put media sent with a uuid in the shared tier; unchanged media only has its TTL renewed."""
        if self.shared is None:
            return "skipped"
        existing = self.shared.lookup(tenant, uuid)
        if existing is not None and existing.sha256 == digest:
            return "refreshed"
        stored = self.shared.put(tenant, uuid, source.kind, source.data, source.format)
        out.count("media_cache_evictions", "shared", stored.evicted)
        if not stored.stored:
            return "skipped"
        out.count("media_cache_stores", "shared")
        return "stored"

    def _key(self, tenant: str, request: JobCreate, part: MediaPart, kind: str, digest: str) -> str | None:
        if isinstance(part, ImageEmbedsPart):
            return None  # embeddings are the encoder's output already: nothing to derive
        settings, io = self.settings, request.media_io_kwargs
        options: dict[str, Any] = {}
        if part.modality in ("image", "video"):
            options["background"] = (io.image.rgba_background_color if io else None) or settings.rgba_background
        if isinstance(part, VideoPart):
            options.update(
                num_frames=(io.video.num_frames if io else None) or settings.video_num_frames,
                fps=io.video.fps if io else None,
                max_frames=settings.video_max_frames,
            )
        return item_key(tenant, self.preparer.model.name, self.fingerprint, kind, options, digest)

    # --- fetch and decode -------------------------------------------------------------

    def _fetch(self, request: JobCreate, param: str, part: MediaPart) -> Source:
        source = f"{param}.{part.url_param}"
        if isinstance(part, ImageEmbedsPart):
            value = part.image_embeds
            named = {"image_embeds": value} if isinstance(value, str) else dict(value or {})
            return Source("image_embeds", json.dumps(named, sort_keys=True).encode())
        if isinstance(part, InputAudioPart):
            assert part.input_audio is not None
            data = self.fetcher.decode_base64(part.input_audio.data, modality="audio", param=source)
            return Source("audio", data, part.input_audio.format)
        url = part.url
        assert url is not None
        check_media_url(url, MediaPolicy.from_settings(self.settings), source)
        fetched = self.fetcher.fetch(url, modality=part.modality, param=source)
        if fetched.frames is not None:
            frames = [base64.b64encode(f).decode() for f in fetched.frames]
            return Source("video_frames", json.dumps(frames).encode())
        return Source(part.modality, fetched.data)

    def _decode(self, request: JobCreate, param: str, part: MediaPart, source: Source) -> Any:
        settings = self.settings
        model = self.preparer.model
        io_kwargs = request.media_io_kwargs
        if source.kind == "image_embeds":
            if model.embeds_hidden_size is None:
                raise ClientError(
                    f"The model '{model.name}' does not take image_embeds.", param=param, code="unsupported_modality"
                )
            named = json.loads(source.data)
            tensors = {
                name: self.fetcher.decode_base64(data, modality="image", param=f"{param}.{part.url_param}.{name}")
                for name, data in named.items()
            }
            return decode_image_embeds(
                tensors,
                hidden_size=model.embeds_hidden_size,
                merge_size=model.embeds_merge_size,
                max_tokens=model.max_context,
                param=param,
            )
        if source.kind == "audio":
            return self._audio(source.data, param, source.format)
        if source.kind == "image":
            background = (io_kwargs.image.rgba_background_color if io_kwargs else None) or settings.rgba_background
            return decode_image(source.data, max_pixels=settings.max_image_pixels, background=background, param=param)
        num_frames = (io_kwargs.video.num_frames if io_kwargs else None) or settings.video_num_frames
        fps = io_kwargs.video.fps if io_kwargs else None
        if source.kind == "video_frames":
            return decode_frame_list(
                [base64.b64decode(f) for f in json.loads(source.data)],
                num_frames=min(num_frames, settings.video_max_frames),
                max_pixels=settings.max_image_pixels,
                background=settings.rgba_background,
                param=param,
            )
        return decode_video(
            source.data,
            num_frames=None if fps else num_frames,
            fps=fps,
            max_frames=settings.video_max_frames,
            max_duration=settings.video_max_duration,
            max_pixels=settings.max_image_pixels,
            timeout=settings.video_decode_timeout,
            param=param,
        )

    def _audio(self, data: bytes, param: str, format_hint: str | None) -> Any:
        model = self.preparer.model
        if model.audio_sampling_rate is None:
            raise ClientError(
                f"The model '{model.name}' does not take audio.", param=param, code="unsupported_modality"
            )
        limit = self.settings.audio_max_duration
        if model.audio_max_seconds:
            limit = min(limit, model.audio_max_seconds)
        return decode_audio(
            data, sampling_rate=model.audio_sampling_rate, max_duration=limit, format_hint=format_hint, param=param
        )
