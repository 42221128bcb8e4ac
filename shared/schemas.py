"""Request, job and result schemas: the public shapes of API.md.

Named by role: `JobCreate` is what a client sends (an OpenAI Chat
Completions body plus job options), `JobPublic` what it reads back.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.errors import InvalidRequestError


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.expired})


class WebhookEvent(enum.StrEnum):
    started = "job.started"
    completed = "job.completed"
    failed = "job.failed"
    cancelled = "job.cancelled"
    expired = "job.expired"


# The event a job's terminal status announces.
EVENT_FOR_STATUS = {
    JobStatus.running: WebhookEvent.started,
    JobStatus.succeeded: WebhookEvent.completed,
    JobStatus.failed: WebhookEvent.failed,
    JobStatus.cancelled: WebhookEvent.cancelled,
    JobStatus.expired: WebhookEvent.expired,
}
DEFAULT_WEBHOOK_EVENTS = (WebhookEvent.completed, WebhookEvent.failed, WebhookEvent.cancelled, WebhookEvent.expired)
PRIORITY_DEFAULT = 5
PRIORITY_MAX = 9


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- content parts -----------------------------------------------------------
#
# As vLLM accepts them. Every media part may carry a `uuid`; a media part
# whose value is null refers by that uuid to media the service has seen.


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaURL(_Strict):
    url: str = Field(min_length=1)


class ImageURL(MediaURL):
    detail: Literal["auto", "low", "high"] | None = None


# What `input_audio.format` may name: the containers the audio decoders read.
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm")


class InputAudio(_Strict):
    data: str = Field(min_length=1, description="base64 of the audio file")
    format: str = Field(description=f"one of {', '.join(AUDIO_FORMATS)}")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        value = value.lower()
        if value not in AUDIO_FORMATS:
            raise ValueError(f"audio format must be one of {', '.join(AUDIO_FORMATS)}")
        return value


class _MediaPart(_Strict):
    """A part that carries media: its payload lives in the field named like its type.

    The payload may be null (or, as stored jobs are written without nulls,
    absent) when a uuid names media the service already holds."""

    modality: ClassVar[str]
    uuid: str | None = Field(default=None, min_length=1, max_length=256)

    @property
    def media(self) -> Any:
        return getattr(self, self.type)  # type: ignore[attr-defined]

    @property
    def url(self) -> str | None:
        media = self.media
        return media.url if isinstance(media, MediaURL) else None

    @property
    def url_param(self) -> str:
        """Where in the part the fetched value sits, for error `param`s."""
        return f"{self.type}.url"  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _media_or_uuid(self) -> _MediaPart:
        if self.media is None and self.uuid is None:
            kind = self.type  # type: ignore[attr-defined]
            raise ValueError(f"{kind} is null: give the media, or a uuid of media sent before")
        return self


class ImagePart(_MediaPart):
    modality: ClassVar[str] = "image"
    type: Literal["image_url"]
    image_url: ImageURL | None = None


class VideoPart(_MediaPart):
    modality: ClassVar[str] = "video"
    type: Literal["video_url"]
    video_url: MediaURL | None = None


class AudioURLPart(_MediaPart):
    modality: ClassVar[str] = "audio"
    type: Literal["audio_url"]
    audio_url: MediaURL | None = None


class InputAudioPart(_MediaPart):
    modality: ClassVar[str] = "audio"
    type: Literal["input_audio"]
    input_audio: InputAudio | None = None

    @property
    def url_param(self) -> str:
        return "input_audio.data"


class ImageEmbedsPart(_MediaPart):
    """Precomputed image embeddings: a base64 tensor, or a dict of them (the
    embeddings under `image_embeds` plus the model's extra tensors, e.g.
    Qwen2-VL's `image_grid_thw`)."""

    modality: ClassVar[str] = "image"
    type: Literal["image_embeds"]
    image_embeds: str | dict[str, str] | None = None

    @property
    def url_param(self) -> str:
        return "image_embeds"

    @field_validator("image_embeds")
    @classmethod
    def _needs_embeds(cls, value: str | dict[str, str] | None) -> str | dict[str, str] | None:
        if isinstance(value, dict) and "image_embeds" not in value:
            raise ValueError("a dict of tensors needs its 'image_embeds' entry")
        if isinstance(value, dict) and len(value) > 8:
            raise ValueError("at most 8 tensors")
        return value


MediaPart = ImagePart | VideoPart | AudioURLPart | InputAudioPart | ImageEmbedsPart
ContentPart = Annotated[
    TextPart | ImagePart | VideoPart | AudioURLPart | InputAudioPart | ImageEmbedsPart,
    Field(discriminator="type"),
]


class ImageIOKwargs(_Strict):
    rgba_background_color: tuple[int, int, int] | None = Field(
        default=None, description="[R, G, B], 0-255: what transparent pixels become"
    )

    @field_validator("rgba_background_color")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and any(not 0 <= c <= 255 for c in value):
            raise ValueError("each colour value is between 0 and 255")
        return value


class VideoIOKwargs(_Strict):
    num_frames: int | None = Field(default=None, ge=1, description="frames sampled uniformly over the video")
    fps: float | None = Field(default=None, gt=0, le=60, description="or: frames sampled per second")

    @model_validator(mode="after")
    def _one_rule(self) -> VideoIOKwargs:
        if self.num_frames is not None and self.fps is not None:
            raise ValueError("num_frames and fps are mutually exclusive")
        return self


class MediaIOKwargs(_Strict):
    """Per-request decoding options, as vLLM's `media_io_kwargs`."""

    image: ImageIOKwargs = Field(default_factory=ImageIOKwargs)
    video: VideoIOKwargs = Field(default_factory=VideoIOKwargs)


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_rules(self) -> Message:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if (
            isinstance(self.content, list)
            and self.role != "user"
            and any(not isinstance(p, TextPart) for p in self.content)
        ):
            raise ValueError(f"only user messages may carry media; this is a {self.role} message")
        return self

    @property
    def parts(self) -> list[TextPart | MediaPart]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [TextPart(type="text", text=self.content)]
        return list(self.content)


# --- the request -------------------------------------------------------------


class WebhookSpec(_Strict):
    """Where to announce a job's events; signed with the tenant's secret (VLMQ_WEBHOOK_SECRETS)."""

    url: str = Field(min_length=1, max_length=2048)
    events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS), min_length=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        import httpx

        try:
            parsed = httpx.URL(value)
        except Exception:
            raise ValueError("the webhook URL is malformed") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("the webhook URL must be http(s)://host/…")
        if parsed.userinfo:
            raise ValueError("webhook URLs may not carry user:password@")
        return value

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[WebhookEvent]) -> list[WebhookEvent]:
        return list(dict.fromkeys(value))


class JobCreate(_Strict):
    """An OpenAI Chat Completions request, as vLLM accepts it, plus job options."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    # vLLM's sampling extensions, accepted the same way.
    top_k: int | None = Field(default=None, ge=-1)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=1, description="Only n=1 is served.")
    stream: bool = Field(default=False, description="Streaming is not offered; must be false.")
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    media_io_kwargs: MediaIOKwargs | None = None
    # Job options (not OpenAI's): see API.md.
    webhook: WebhookSpec | None = None
    priority: int = Field(default=PRIORITY_DEFAULT, ge=0, le=PRIORITY_MAX, description="9 is the most urgent.")
    ttl_seconds: int | None = Field(
        default=None, ge=1, le=30 * 24 * 3600, description="Expire the job if it has not started by then."
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool) -> bool:
        if value:
            raise ValueError("streaming is not supported: poll the job or use the synchronous endpoint")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise ValueError("metadata holds at most 16 keys of 64 characters with values of 512")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def media_parts(self) -> list[tuple[str, MediaPart]]:
        """(param path, part) for every media part, in the order they stand."""
        found: list[tuple[str, MediaPart]] = []
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if not isinstance(part, TextPart):
                        found.append((f"messages[{i}].content[{j}]", part))
        return found

    def modality_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, part in self.media_parts():
            counts[part.modality] = counts.get(part.modality, 0) + 1
        return counts


# --- results -----------------------------------------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "cancelled"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class Timings(BaseModel):
    """Where a finished job's time went, in milliseconds."""

    queued_ms: float | None = None  # created -> picked up by the worker that ran it
    media_ms: float | None = None  # fetching, decoding and preprocessing media and prompt
    inference_ms: float | None = None  # the engine's generate call (shared with its batch)
    batch_size: int | None = None
    batch_id: str | None = None


class CacheItem(BaseModel):
    """What the media cache did for one media item of a job."""

    param: str  # the part, as error `param`s name it: messages[0].content[1]
    modality: str
    uuid: str | None = None
    # Shared tier (all workers, by uuid): `hit` (media null resolved by its uuid), `stored` (sent
    # with a uuid and written), `refreshed` (the same media was there: TTL renewed), `skipped`
    # (too large to cache); null without a uuid.
    shared: Literal["hit", "stored", "refreshed", "skipped"] | None = None
    # Worker tier (the process that ran the job, by content): `hit` skipped fetch/decode and
    # preprocessing and, for the Qwen2-VL engine, finds the vision encoder output under the same
    # key; null where the model has no worker tier (embeddings, audio, non-Qwen2-VL processors).
    worker: Literal["hit", "miss"] | None = None


class MediaCacheReport(BaseModel):
    items: list[CacheItem] = Field(default_factory=list)


class JobProgress(BaseModel):
    """How far an unfinished job has come; null where it does not apply."""

    queue_position: int | None = None  # while queued: jobs ahead of it in its model's queue (0 = next)
    tokens_generated: int | None = None  # while running (and kept once finished)


class JobPublic(BaseModel):
    id: str
    object: Literal["job"] = "job"
    model: str
    status: JobStatus
    created_at: int
    started_at: int | None = None
    completed_at: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    result: ChatCompletion | None = None
    error: ErrorBody | None = None
    attempts: int = 0
    timings: Timings | None = None
    priority: int = PRIORITY_DEFAULT
    expires_at: int | None = None  # a queued job not started by then ends `expired`
    webhook: WebhookSpec | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    cache: MediaCacheReport | None = None  # per media item: which cache tiers hit


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class DeliveryAttempt(BaseModel):
    attempt: int
    at: float
    duration_ms: float
    status_code: int | None = None
    error: str | None = None
    outcome: Literal["succeeded", "retry", "failed"]


class DeliveryPublic(BaseModel):
    """One webhook message of a job and every attempt to deliver it."""

    id: str  # also the message's `webhook-id`
    object: Literal["webhook.delivery"] = "webhook.delivery"
    job_id: str
    event: WebhookEvent
    url: str
    status: Literal["pending", "succeeded", "failed"]
    created_at: float
    next_attempt_at: float | None = None
    attempts: list[DeliveryAttempt] = Field(default_factory=list)


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryPublic]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "vlmq"
    workers: int = 0
    # Input modalities ("text", "image", "video", "audio"); empty while no
    # worker has said what an unbundled model takes.
    modalities: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def parse_job_request(raw: dict[str, Any]) -> JobCreate:
    """Re-validate a stored request (the worker trusts nothing it reads back)."""
    try:
        return JobCreate.model_validate(raw)
    except ValueError as exc:  # stored by an older gateway with other rules
        raise InvalidRequestError(f"stored request no longer valid: {exc}") from None
