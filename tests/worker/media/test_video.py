"""Video decoding with PyAV, on short videos encoded in the test."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from shared.errors import MediaError
from tests.conftest import png_bytes
from worker.media.video import decode_frame_list, decode_video, sample_indices


def mp4(frames: int = 24, fps: int = 12, size=(64, 48), color_of=lambda i: (10 * i % 256, 0, 0)) -> bytes:
    """An H.264 (or MPEG-4) mp4 whose frame i is filled with color_of(i)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
        except Exception:
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.zeros((size[1], size[0], 3), np.uint8)
            image[...] = color_of(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


LIMITS = {"max_frames": 64, "max_duration": 60.0, "max_pixels": 1_000_000, "timeout": 10.0}


def test_uniform_sampling_and_metadata():
    video = decode_video(mp4(24, 12, color_of=lambda i: (i * 10, 0, 0)), num_frames=4, **LIMITS)
    assert video.frames.shape == (4, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.frame_indices == [0, 8, 15, 23]
    assert video.total_frames == 24 and video.fps == pytest.approx(12)
    assert video.duration == pytest.approx(2.0, abs=0.1)
    # Each sampled frame is the one at its index (red channel encodes the index).
    reds = [round(int(video.frames[k, 24, 32, 0]) / 10) for k in range(4)]
    assert reds == video.frame_indices
    assert video.metadata["frames_indices"] == [0, 8, 15, 23]


def test_sampling_by_fps():
    video = decode_video(mp4(24, 12), num_frames=None, fps=2.0, **LIMITS)
    assert len(video.frame_indices) == 4  # 2 s at 2 frames per second


def test_fewer_frames_than_asked_takes_them_all_and_max_frames_caps():
    assert len(decode_video(mp4(6, 12), num_frames=32, **LIMITS).frame_indices) == 6
    assert len(decode_video(mp4(24, 12), num_frames=32, **{**LIMITS, "max_frames": 5}).frame_indices) == 5


def test_sample_indices_spread_evenly():
    assert sample_indices(100, 10.0, num_frames=5, fps=None, max_frames=64) == [0, 25, 50, 74, 99]
    assert sample_indices(0, 0.0, num_frames=5, fps=None, max_frames=64) == []


def test_duration_and_size_limits():
    with pytest.raises(MediaError) as err:
        decode_video(mp4(24, 12), num_frames=4, **{**LIMITS, "max_duration": 1.0})
    assert err.value.code == "video_too_long"
    with pytest.raises(MediaError) as err:
        decode_video(mp4(4, 12), num_frames=4, **{**LIMITS, "max_pixels": 1000})
    assert err.value.code == "video_too_large"


def test_garbage_and_truncated_videos_are_client_errors_without_internals():
    whole = mp4(24, 12)
    for data in (b"", b"\x00" * 500, png_bytes(), whole[: len(whole) // 3]):
        with pytest.raises(MediaError) as err:
            decode_video(data, num_frames=4, param="messages[0].content[0]", **LIMITS)
        assert err.value.code.startswith("video_")
        assert err.value.param == "messages[0].content[0]"
        assert "/" not in err.value.message.replace("MP4, WebM", "") and "0x" not in err.value.message


def test_jpeg_frame_lists_are_capped_at_num_frames():
    from PIL import Image

    def jpeg(color):
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), color).save(buf, "JPEG")
        return buf.getvalue()

    frames = [jpeg((i * 40, 0, 0)) for i in range(6)]
    video = decode_frame_list(frames, num_frames=4, max_pixels=10_000)
    assert video.frames.shape == (4, 24, 32, 3)
    assert video.total_frames == 4
    with pytest.raises(MediaError):
        decode_frame_list([b"not a jpeg"], num_frames=4, max_pixels=10_000)
