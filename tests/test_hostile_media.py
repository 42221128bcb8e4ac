"""Hostile media end to end, all in one batch on the real stack: every part is
refused with a typed error naming it, no worker dies or runs a payload, and
the next job is answered. (Each decoder's own edge cases are tested in
tests/worker/media/; the cases already run end to end in
tests/test_media_end_to_end.py are not repeated here.)"""

from __future__ import annotations

import base64
import io
import os
import tempfile

import pytest
import torch
from PIL import Image

from tests.conftest import AUDIO_MODEL, MODEL, data_url, png_bytes
from tests.test_media_end_to_end import answer, image, job, run, text, video, wav
from tests.worker.media.test_video import mp4

pytestmark = pytest.mark.slow

MARKER = os.path.join(tempfile.gettempdir(), "vlmq-hostile-media-ran")


class Exploit:
    """Unpickling this runs a command in whichever process loads it."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def torch_saved(obj) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


def bomb_png() -> bytes:
    """400 megapixels of one grey, under a megabyte compressed."""
    buf = io.BytesIO()
    Image.new("L", (20000, 20000), 0).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_hostile_media_fails_typed_and_the_workers_stay_up(stack):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    frame_bomb = mp4(720, 1, size=(16, 16))  # 12 minutes at 1 fps: past VLMQ_VIDEO_MAX_DURATION
    cases = [
        (job(MODEL, image(data_url(bomb_png())), text("x")), "image_too_large"),
        (job(MODEL, image(data_url(png_bytes()[:60])), text("x")), "image_decode_failed"),
        (job(MODEL, image(data_url(b"GIF89a" + b"\xff" * 64, "image/gif")), text("x")), "image_decode_failed"),
        (job(MODEL, video(data_url(frame_bomb, "video/mp4")), text("x")), "video_too_long"),
        (
            job(AUDIO_MODEL, {"type": "input_audio", "input_audio": {"data": _b64(wav(300, 120.0)), "format": "wav"}}),
            "audio_too_long",
        ),
        (
            job(
                AUDIO_MODEL,
                {"type": "input_audio", "input_audio": {"data": _b64(wav(300, 2.0)[:100]), "format": "wav"}},
            ),
            ("audio_decode_failed", "audio_too_short"),
        ),
        (
            job(MODEL, {"type": "image_embeds", "image_embeds": torch_saved(Exploit())}, text("x")),
            ("invalid_embeds", "mm_embeds_unsupported"),
        ),
        (
            job(
                MODEL,
                {"type": "image_embeds", "image_embeds": {"image_embeds": torch_saved({"x": Exploit()})}},
                text("x"),
            ),
            ("invalid_embeds", "mm_embeds_unsupported"),
        ),
    ]
    with stack.client() as client:
        ids = []
        for body, _ in cases:
            reply = client.post("/v1/jobs", json=body)
            assert reply.status_code == 202, reply.text
            ids.append(reply.json()["id"])
        # The one-pixel image is fine; it runs in the same batch as the hostile ones.
        one_pixel = client.post("/v1/jobs", json=job(MODEL, image(data_url(png_bytes((220, 30, 30), (1, 1))))))
        finished = [stack.wait_job(client, job_id) for job_id in ids]
        for (_, code), result in zip(cases, finished, strict=True):
            assert result["status"] == "failed", result
            error = result["error"]
            assert error["type"] in ("invalid_media", "invalid_request_error"), error
            assert error["code"] in (code if isinstance(code, tuple) else (code,)), error
            assert error["param"] and error["param"].startswith("messages[0].content"), error
            assert "Traceback" not in error["message"] and "/site-packages/" not in error["message"]
        assert stack.wait_job(client, one_pixel.json()["id"])["status"] == "succeeded"

        # Audio bigger than a request may be: refused at the door, never queued.
        huge = base64.b64encode(os.urandom(34 * 1024 * 1024)).decode()
        reply = client.post(
            "/v1/jobs", json=job(AUDIO_MODEL, {"type": "input_audio", "input_audio": {"data": huge, "format": "wav"}})
        )
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"

        assert answer(
            run(stack, client, job(MODEL, image(data_url(png_bytes((220, 30, 30)))), text("What color is this image?")))
        )
    assert not os.path.exists(MARKER), "a pickle payload ran"
    assert all(p.poll() is None for p in stack.processes.values())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
