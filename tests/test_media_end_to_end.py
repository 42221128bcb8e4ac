"""Every kind of media, end to end: gateway -> Redis -> the worker of each bundled model.

Media is made in the test (an mp4 encoded with PyAV, tones written with
soundfile, PNGs, the tiny model's own vision-tower output as embeddings)
and served from a data: URL, the local HTTP server, moto's S3 and the
allowed local directory.
"""

from __future__ import annotations

import base64
import io

import pytest
import soundfile as sf
import torch

from tests.conftest import AUDIO_MODEL, MODEL, data_url, png_bytes
from tests.worker.media.test_video import mp4
from worker.engine.tiny_audio import tone

pytestmark = pytest.mark.slow

RED, BLUE, GREEN = (220, 30, 30), (30, 60, 220), (30, 180, 40)


def job(model: str, *content, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": list(content)}], "max_tokens": 16, **extra}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def wav(freq: float, seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(freq, seconds, amplitude=0.4), 16_000, format="WAV")
    return buf.getvalue()


def answer(finished: dict) -> str:
    assert finished["status"] == "succeeded", finished
    return finished["result"]["choices"][0]["message"]["content"]


def run(stack, client, body) -> dict:
    reply = client.post("/v1/jobs", json=body)
    assert reply.status_code == 202, reply.text
    return stack.wait_job(client, reply.json()["id"])


def solid_mp4(color) -> bytes:
    return mp4(12, 6, size=(64, 48), color_of=lambda i: color)


def test_models_list_their_modalities(stack):
    with stack.client() as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[MODEL]["modalities"] == ["text", "image", "video"]
    assert models[AUDIO_MODEL]["modalities"] == ["text", "audio"]
    assert models[MODEL]["workers"] == models[AUDIO_MODEL]["workers"] == 1


def test_video_from_http_and_data_url(stack, media_server):
    media_server.routes["/clip.mp4"] = (200, {"Content-Type": "video/mp4"}, solid_mp4(RED))
    with stack.client() as client:
        from_http = run(
            stack, client, job(MODEL, video(media_server.url("/clip.mp4")), text("What color is this image?"))
        )
        from_data = run(
            stack,
            client,
            job(
                MODEL,
                video(data_url(solid_mp4(BLUE), "video/mp4")),
                text("What color is this image?"),
                media_io_kwargs={"video": {"num_frames": 4}},
            ),
        )
    assert answer(from_http) == "The image is mostly red."
    assert answer(from_data) == "The image is mostly blue."
    # All 12 frames (the default asks for 32) -> 6 frame pairs of 2x2 merged tokens, versus 4 frames -> 2 pairs.
    assert from_http["result"]["usage"]["prompt_tokens"] - from_data["result"]["usage"]["prompt_tokens"] == 4 * 4


def test_video_as_a_jpeg_frame_list(stack):
    from PIL import Image

    def jpeg(color) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), color).save(buf, "JPEG")
        return base64.b64encode(buf.getvalue()).decode()

    url = "data:video/jpeg;base64," + ",".join(jpeg(GREEN) for _ in range(6))
    with stack.client() as client:
        assert answer(run(stack, client, job(MODEL, video(url), text("What color is this image?")))) == (
            "The image is mostly green."
        )


def test_audio_inline_from_s3_and_from_a_local_file(stack, s3_server, local_media):
    (local_media / "low.flac").write_bytes(_flac(200, 2.0))
    s3_url = s3_server.put("sounds/high.wav", wav(2500, 1.5))
    with stack.client() as client:
        inline = run(
            stack,
            client,
            job(
                AUDIO_MODEL,
                {
                    "type": "input_audio",
                    "input_audio": {"data": base64.b64encode(wav(3000, 1.0)).decode(), "format": "wav"},
                },
                text("What do you hear?"),
            ),
        )
        from_s3 = run(
            stack,
            client,
            job(AUDIO_MODEL, {"type": "audio_url", "audio_url": {"url": s3_url}}, text("What do you hear?")),
        )
        from_disk = run(
            stack,
            client,
            job(
                AUDIO_MODEL,
                {"type": "audio_url", "audio_url": {"url": f"file://{local_media}/low.flac"}},
                text("What do you hear?"),
            ),
        )
    assert answer(inline) == "The sound is a high tone."
    assert answer(from_s3) == "The sound is a high tone."
    assert answer(from_disk) == "The sound is a low tone."


def _flac(freq, seconds) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(freq, seconds, amplitude=0.4), 16_000, format="FLAC")
    return buf.getvalue()


def test_several_images_from_several_sources(stack, s3_server, local_media, media_server):
    (local_media / "green.png").write_bytes(png_bytes(GREEN))
    s3_url = s3_server.put("images/blue.png", png_bytes(BLUE))
    body = job(
        MODEL,
        text("First"),
        image(f"file://{local_media}/green.png"),
        text("then"),
        image(s3_url),
        image(media_server.url("/red.png")),
        image(data_url(png_bytes(GREEN, (30, 30)))),
        text("What color is this image?"),
    )
    with stack.client() as client:
        finished = run(stack, client, body)
    assert finished["status"] == "succeeded", finished
    assert finished["result"]["usage"]["prompt_tokens"] > 4 * 4


def test_image_embeds_from_the_vision_tower(stack, tiny):
    from worker.engine.batcher import BatchingEngine

    pixels = tiny.processor.image_processor(images=[_pil(BLUE)], return_tensors="pt")
    with torch.inference_mode():
        embeds = tiny.model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"], return_dict=True)
    payload = {"image_embeds": _b64(embeds.pooler_output[0]), "image_grid_thw": _b64(pixels["image_grid_thw"])}
    with stack.client() as client:
        finished = run(
            stack,
            client,
            job(MODEL, {"type": "image_embeds", "image_embeds": payload}, text("What color is this image?")),
        )
    if getattr(BatchingEngine, "accepts_image_embeds", False):
        assert answer(finished) == "The image is mostly blue."
    else:
        # Until the engine feeds embeddings to generate, the worker says so instead of ignoring them.
        assert finished["status"] == "failed"
        assert finished["error"]["code"] == "mm_embeds_unsupported"


def _pil(color):
    from PIL import Image

    return Image.new("RGB", (90, 60), color)


def _b64(tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode()


def test_refused_inputs_are_400_at_submit(stack):
    red = data_url(png_bytes(RED))
    cases = [
        (job(MODEL, *[image(red)] * 5, text("x")), "too_many_media_items", "VLMQ_LIMIT_MM_PER_PROMPT"),
        (
            job(MODEL, {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
            "unsupported_modality",
            "audio",
        ),
        (job(AUDIO_MODEL, image(red)), "unsupported_modality", "image"),
        (
            job(MODEL, video(data_url(b"x", "video/mp4")), video(data_url(b"x", "video/mp4"))),
            "too_many_media_items",
            "video",
        ),
        (job(MODEL, image("http://169.254.169.254/latest/meta-data/")), "domain_not_allowed", "169.254"),
        (job(MODEL, image("s3://another-bucket/x.png")), "bucket_not_allowed", "VLMQ_S3_ALLOWED_BUCKETS"),
        (job(MODEL, image("file:///etc/passwd")), "path_not_allowed", "VLMQ_ALLOWED_LOCAL_MEDIA_PATH"),
        (job(MODEL, image("gopher://127.0.0.1/x")), "scheme", "gopher"),
        (
            job(MODEL, image(red), {"type": "image_embeds", "image_embeds": "AAAA"}),
            "mixed_image_inputs",
            "not both",
        ),
        (
            job(MODEL, video(red), media_io_kwargs={"video": {"num_frames": 500}}),
            "too_many_frames",
            "VLMQ_VIDEO_MAX_FRAMES",
        ),
    ]
    with stack.client() as client:
        for body, code, words in cases:
            reply = client.post("/v1/jobs", json=body)
            assert reply.status_code == 400, (code, reply.text)
            error = reply.json()["error"]
            assert error["code"] == code, error
            assert words in error["message"], error


def test_broken_media_fails_the_job_typed_and_workers_keep_serving(stack, s3_server, media_server):
    long_audio = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(wav(300, 6.0)).decode(), "format": "wav"},
    }
    bad_embeds = {"image_embeds": _b64(torch.randn(6, 32)), "image_grid_thw": _b64(torch.tensor([[1, 4, 6]]))}
    cases = [
        (job(MODEL, video(data_url(b"\x00" * 300, "video/mp4")), text("x")), "video_decode_failed"),
        (job(MODEL, video(data_url(solid_mp4(RED)[:400], "video/mp4")), text("x")), "video_decode_failed"),
        (job(AUDIO_MODEL, long_audio, text("x")), "audio_too_long"),
        (
            job(AUDIO_MODEL, {"type": "audio_url", "audio_url": {"url": data_url(b"RIFFjunk", "audio/wav")}}),
            "audio_decode_failed",
        ),
        (job(MODEL, image("s3://vlmq-media/missing.png")), "s3_not_found"),
        (job(MODEL, image(media_server.url("/missing.png"))), "http_404"),
        (job(MODEL, {"type": "image_embeds", "image_embeds": bad_embeds}, text("x")), None),
        (job(MODEL, image(data_url(png_bytes((0, 0, 0), (400, 1))))), "image_aspect_ratio"),
    ]
    with stack.client() as client:
        ids = [client.post("/v1/jobs", json=body).json()["id"] for body, _ in cases]
        finished = [stack.wait_job(client, job_id) for job_id in ids]
        for (_, code), result in zip(cases, finished, strict=True):
            assert result["status"] == "failed", result
            error = result["error"]
            assert error["type"] in ("invalid_media", "invalid_request_error"), error
            if code is not None:
                assert error["code"] == code, error
            else:  # embeddings: refused for their shape, or by an engine without embedding support
                assert error["code"] in ("invalid_embeds_shape", "mm_embeds_unsupported"), error
            assert (error["param"] and error["param"].startswith("messages[0].content[0]")) or error[
                "param"
            ] == "messages"
        assert answer(
            run(stack, client, job(MODEL, image(data_url(png_bytes(RED))), text("What color is this image?")))
        )
        assert answer(
            run(
                stack,
                client,
                job(AUDIO_MODEL, {"type": "audio_url", "audio_url": {"url": data_url(wav(200, 1.0), "audio/wav")}}),
            )
        )
    assert all(p.poll() is None for p in stack.processes.values())
