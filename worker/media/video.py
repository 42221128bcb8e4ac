"""Video bytes -> sampled RGB frames and their metadata, with PyAV.

Pure: no I/O. Frames are sampled uniformly (`num_frames`, default 32) or at
a rate (`fps`), and only the sampled ones are converted to pixels. Limits
are checked from the container's header before decoding: duration, frame
size; frames decoded are capped, and so is the time spent decoding.
Frames larger than `MAX_FRAME_PIXELS` are scaled down while decoding: the
model's processor shrinks them far below that anyway, and 64 full-HD
frames held at once would be gigabytes.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass

import numpy as np

from shared.errors import MediaError
from worker.media.image import WHITE, decode_image

MAX_FRAME_PIXELS = 1280 * 720
# Qwen's sampling rate when a video comes as a list of frames, with no clock.
FRAME_LIST_FPS = 2.0


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (frames, height, width, 3) uint8 RGB
    fps: float  # of the source
    duration: float  # seconds
    total_frames: int  # in the source
    frame_indices: list[int]

    @property
    def metadata(self) -> dict[str, object]:
        """What HF video processors take as `VideoMetadata`."""
        return {
            "total_num_frames": self.total_frames,
            "fps": self.fps,
            "duration": self.duration,
            "frames_indices": self.frame_indices,
            "height": int(self.frames.shape[1]),
            "width": int(self.frames.shape[2]),
        }


def sample_indices(
    total: int, duration: float, *, num_frames: int | None, fps: float | None, max_frames: int
) -> list[int]:
    """Frame indices spread evenly over the video: `num_frames` of them, or `fps` per second."""
    if total <= 0:
        return []
    wanted = max(1, math.floor(duration * fps)) if fps else (num_frames or total)
    wanted = min(wanted, max_frames, total)
    return sorted({int(i) for i in np.rint(np.linspace(0, total - 1, wanted))})


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def decode_video(
    data: bytes,
    *,
    num_frames: int | None,
    fps: float | None = None,
    max_frames: int,
    max_duration: float,
    max_pixels: int,
    timeout: float,
    param: str | None = None,
) -> DecodedVideo:
    import av

    started = time.monotonic()
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except Exception as exc:
        raise _undecodable(exc, param) from None
    with container:
        if not container.streams.video:
            raise MediaError("The video has no video stream.", param=param, code="video_decode_failed")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise MediaError(
                f"Video frames are {width}x{height} pixels, over the limit of {max_pixels} pixels.",
                param=param,
                code="video_too_large",
            )
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = stream.frames / rate if stream.frames and rate else 0.0
        if duration > max_duration:
            raise MediaError(
                f"The video is {duration:.1f}s long, over the limit of {max_duration:g}s.",
                param=param,
                code="video_too_long",
            )
        total = int(stream.frames or round(duration * rate))
        if total <= 0 or rate <= 0:
            raise MediaError("The video's length or frame rate is unknown.", param=param, code="video_decode_failed")
        wanted = sample_indices(total, duration, num_frames=num_frames, fps=fps, max_frames=max_frames)
        out_w, out_h = _fit(width, height, MAX_FRAME_PIXELS)
        frames: list[np.ndarray] = []
        taken: list[int] = []
        targets = set(wanted)
        try:
            for index, frame in enumerate(container.decode(stream)):
                if time.monotonic() - started > timeout:
                    raise MediaError(
                        f"Decoding the video took longer than {timeout:g}s.", param=param, code="video_decode_timeout"
                    )
                if index in targets:
                    frames.append(frame.to_ndarray(format="rgb24", width=out_w, height=out_h))
                    taken.append(index)
                if index >= wanted[-1]:
                    break
        except MediaError:
            raise
        except Exception as exc:
            if not frames:
                raise _undecodable(exc, param) from None
            # A truncated tail: keep the frames read before it.
    if not frames:
        raise MediaError("The video has no decodable frames.", param=param, code="video_decode_failed")
    return DecodedVideo(np.stack(frames), rate, duration, total, taken)


def decode_frame_list(
    frames: list[bytes],
    *,
    num_frames: int,
    max_pixels: int,
    background: tuple[int, int, int] = WHITE,
    param: str | None = None,
) -> DecodedVideo:
    """A video given as base64 JPEG frames (`data:video/jpeg;base64,<f1>,<f2>,...`), first `num_frames` kept."""
    kept = frames[:num_frames]
    if not kept:
        raise MediaError("The frame list is empty.", param=param, code="video_decode_failed")
    images = [decode_image(f, max_pixels=max_pixels, background=background, param=param) for f in kept]
    size = images[0].size
    arrays = [np.asarray(img if img.size == size else img.resize(size)) for img in images]
    duration = len(arrays) / FRAME_LIST_FPS
    return DecodedVideo(np.stack(arrays), FRAME_LIST_FPS, duration, len(arrays), list(range(len(arrays))))


def _undecodable(exc: BaseException, param: str | None) -> MediaError:
    # PyAV's messages name internal paths and addresses; name only the kind.
    return MediaError(
        f"Could not decode the video ({type(exc).__name__}); send an MP4, WebM, MKV or MOV file.",
        param=param,
        code="video_decode_failed",
    )
