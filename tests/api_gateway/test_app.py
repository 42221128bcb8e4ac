"""The gateway on real HTTP and a real Redis, with no worker: what it decides alone."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from api_gateway.app import create_app
from api_gateway.config import GatewaySettings
from shared import keys
from shared.schemas import JobStatus
from shared.store import JobStore
from tests.api_gateway.server import serve
from tests.conftest import KEYS, MODEL


@pytest.fixture
def gateway(redis_server, redis_client):
    settings = GatewaySettings(
        redis_url=redis_server.url,
        api_keys=[f"{t}:{k}" for t, k in KEYS.items()],
        model=MODEL,
        allowed_media_domains=["images.example.com", "*.cdn.example.com"],
    )
    with (
        serve(settings) as base_url,
        httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=30) as client,
    ):
        yield client


def job(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def error_of(reply, status):
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_auth_is_required_everywhere(gateway):
    for method, path in [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/job_x"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/jobs/job_x/cancel"),
    ]:
        missing = error_of(gateway.request(method, path, headers={"Authorization": ""}, json=job()), 401)
        assert missing["code"] == "missing_api_key"
        wrong = error_of(gateway.request(method, path, headers={"Authorization": "Bearer x"}, json=job()), 401)
        assert wrong["type"] == "authentication_error"


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", "Missing"),
        (job(max_tokens=-1), "max_tokens", "greater than"),
        (job(stream=True), "stream", "streaming"),
        (
            job(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content[0].image_url.url",
            "Missing",
        ),
        (job(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text", "Missing"),
        (job(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", "should be"),
    ],
)
def test_invalid_bodies_name_the_field(gateway, body, param, words):
    error = error_of(gateway.post("/v1/jobs", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert words in error["message"]


def test_invalid_json_and_unknown_routes(gateway):
    error = error_of(gateway.post("/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in error["message"]
    assert error_of(gateway.get("/v1/nothing"), 404)["type"] == "not_found_error"


def test_unknown_model_is_404(gateway):
    error = error_of(gateway.post("/v1/jobs", json=job(model="gpt-9")), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_media_url_rules_at_submit(gateway):
    def with_url(url):
        return job(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])

    assert gateway.post("/v1/jobs", json=with_url("https://images.example.com/a.png")).status_code == 202
    assert gateway.post("/v1/jobs", json=with_url("https://a.cdn.example.com/a.png")).status_code == 202
    for url, code in [
        ("https://evil.example.com/a.png", "domain_not_allowed"),
        ("https://cdn.example.com/a.png", "domain_not_allowed"),
        ("ftp://images.example.com/a.png", "scheme"),
        ("https://u:p@images.example.com/a.png", "userinfo"),
    ]:
        error = error_of(gateway.post("/v1/jobs", json=with_url(url)), 400)
        assert error["code"] == code, url
        assert error["param"] == "messages[0].content[0].image_url.url"
    assert error_of(gateway.post("/v1/jobs", json=with_url("data:image/png,raw")), 400)["code"] == "invalid_data_url"


def test_accepted_job_is_queued_for_its_model(gateway, redis_client):
    reply = gateway.post("/v1/jobs", json=job(metadata={"a": "1"}))
    assert reply.status_code == 202
    created = reply.json()
    assert created["status"] == "queued" and created["metadata"] == {"a": "1"}
    # Default priority 5 is broker priority 4: the Redis transport's list for it.
    assert redis_client.llen(f"vlmq.model.{MODEL}\x06\x164") == 1
    assert created["priority"] == 5 and created["progress"] == {"queue_position": 0, "tokens_generated": None}
    assert gateway.get(f"/v1/jobs/{created['id']}").json() == created


def test_long_poll_wakes_on_the_transition_not_on_a_timer(gateway, redis_client):
    job_id = gateway.post("/v1/jobs", json=job()).json()["id"]
    store = JobStore(redis_client, 3600)

    def finish_later():
        time.sleep(0.5)
        store.transition(job_id, [JobStatus.queued], JobStatus.failed, {"error": {"message": "x", "type": "t"}})

    threading.Thread(target=finish_later).start()
    started = time.monotonic()
    polled = gateway.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
    elapsed = time.monotonic() - started
    assert polled["status"] == "failed"
    assert 0.4 < elapsed < 3  # woken by the event, well before the 5 s re-check


def test_long_poll_returns_current_state_on_timeout(gateway):
    job_id = gateway.post("/v1/jobs", json=job()).json()["id"]
    started = time.monotonic()
    assert gateway.get(f"/v1/jobs/{job_id}", params={"wait": 1}).json()["status"] == "queued"
    assert 0.9 < time.monotonic() - started < 3


def test_prefer_wait_on_create_returns_202_when_unfinished(gateway):
    reply = gateway.post("/v1/jobs", json=job(), headers={"Prefer": "wait=1"})
    assert reply.status_code == 202 and reply.json()["status"] == "queued"


def test_cancel_a_queued_job(gateway, redis_client):
    job_id = gateway.post("/v1/jobs", json=job()).json()["id"]
    cancelled = gateway.post(f"/v1/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["completed_at"]
    assert gateway.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert redis_client.hget(keys.job(job_id), "status") == "cancelled"


def test_list_paginates_newest_first(gateway):
    ids = [gateway.post("/v1/jobs", json=job()).json()["id"] for _ in range(5)]
    first = gateway.get("/v1/jobs", params={"limit": 3}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:3] and first["has_more"]
    second = gateway.get("/v1/jobs", params={"limit": 3, "after": first["last_id"]}).json()
    assert [j["id"] for j in second["data"]] == ids[::-1][3:] and not second["has_more"]
    assert error_of(gateway.get("/v1/jobs", params={"after": "job_nope"}), 400)["param"] == "after"


def test_readiness_needs_a_worker(gateway, redis_client):
    assert gateway.get("/healthz").json() == {"status": "ok"}
    assert error_of(gateway.get("/readyz"), 503)["code"] == "not_ready"
    redis_client.set(keys.worker("w1"), '{"name": "w1", "models": ["other-model"]}', ex=10)
    ready = gateway.get("/readyz").json()
    assert ready["status"] == "ready" and ready["models"] == ["other-model"]
    models = {m["id"]: m["workers"] for m in gateway.get("/v1/models").json()["data"]}
    assert models == {MODEL: 0, "other-model": 1}
    # A model served by a live worker is accepted even if this gateway was not told about it.
    assert gateway.post("/v1/jobs", json=job(model="other-model")).status_code == 202


def test_openapi_docs_are_served(gateway):
    assert gateway.get("/docs").status_code == 200
    schema = gateway.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/chat/completions", "/v1/models"} <= set(paths)
    # The submit route reads its key and headers itself; its operation must still say so.
    submit = paths["/v1/jobs"]["post"]
    assert submit["security"] == paths["/v1/jobs"]["get"]["security"] == [{"BearerKey": []}]
    assert "BearerKey" in schema["components"]["securitySchemes"]
    assert {(p["name"], p["in"]) for p in submit["parameters"]} == {("prefer", "header"), ("idempotency-key", "header")}
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobCreate"}
    assert submit["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobPublic"
    }


def test_sync_endpoint_times_out_with_a_pointer_to_the_job(redis_server, redis_client):
    settings = GatewaySettings(redis_url=redis_server.url, api_keys=["a:k"], model=MODEL, sync_timeout=0.5)

    async def go():
        transport = httpx.ASGITransport(app=create_app(settings))
        app = transport.app
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://gw") as client,
        ):
            return await client.post("/v1/chat/completions", json=job(), headers={"Authorization": "Bearer k"})

    reply = asyncio.run(go())
    error = error_of(reply, 504)
    assert error["code"].startswith("job_") and "poll" in error["message"]


def test_media_rules_at_submit(gateway):
    red = {"type": "image_url", "image_url": {"url": "https://images.example.com/a.png"}}

    def with_parts(*parts, **extra):
        return job(messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "x"}]}], **extra)

    assert gateway.post("/v1/jobs", json=with_parts(red, red, red, red)).status_code == 202
    too_many = error_of(gateway.post("/v1/jobs", json=with_parts(*[red] * 5)), 400)
    assert too_many["code"] == "too_many_media_items"
    assert "VLMQ_LIMIT_MM_PER_PROMPT=image=4,video=1,audio=1" in too_many["message"]
    embeds = error_of(gateway.post("/v1/jobs", json=with_parts({"type": "image_embeds", "image_embeds": "AA=="})), 400)
    assert embeds["code"] == "mm_embeds_disabled" and "VLMQ_ENABLE_MM_EMBEDS" in embeds["message"]
    assert embeds["param"] == "messages[0].content[0]"
    audio = {"type": "audio_url", "audio_url": {"url": "https://images.example.com/a.wav"}}
    unsupported = error_of(gateway.post("/v1/jobs", json=with_parts(audio)), 400)
    assert unsupported["code"] == "unsupported_modality" and "audio" in unsupported["message"]
    numeric = {"type": "video_url", "video_url": {"url": "http://0x7f.1/a.mp4"}}
    assert error_of(gateway.post("/v1/jobs", json=with_parts(numeric)), 400)["code"] == "domain_not_allowed"
    for bad in ({"video": {"num_frames": 2, "fps": 1}}, {"image": {"rgba_background_color": [0, 0, 300]}}):
        assert gateway.post("/v1/jobs", json=with_parts(red, media_io_kwargs=bad)).status_code == 400
    models = {m["id"]: m["modalities"] for m in gateway.get("/v1/models").json()["data"]}
    assert models == {MODEL: ["text", "image", "video"]}


def test_modalities_of_unbundled_models_come_from_heartbeats(gateway, redis_client):
    beat = {"name": "w2", "models": ["speech-model"], "modalities": {"speech-model": ["text", "audio"]}}
    redis_client.set(keys.worker("w2"), json.dumps(beat), ex=10)
    models = {m["id"]: m["modalities"] for m in gateway.get("/v1/models").json()["data"]}
    assert models["speech-model"] == ["text", "audio"]
    image = {"type": "image_url", "image_url": {"url": "https://images.example.com/a.png"}}
    body = job(model="speech-model", messages=[{"role": "user", "content": [image]}])
    assert error_of(gateway.post("/v1/jobs", json=body), 400)["code"] == "unsupported_modality"
