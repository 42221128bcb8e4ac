"""One job, end to end, for real: gateway -> Redis -> Celery worker -> result."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.conftest import MODEL, data_url, png_bytes

pytestmark = pytest.mark.slow


def image_job(url: str, question: str = "What color is this image?", **extra) -> dict:
    return {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
            }
        ],
        "max_tokens": 24,
        "metadata": {"case": "e2e"},
        **extra,
    }


def test_data_url_job_succeeds_field_by_field(stack):
    with stack.client() as client:
        reply = client.post("/v1/jobs", json=image_job(data_url(png_bytes((30, 180, 40)))))
        assert reply.status_code == 202, reply.text
        created = reply.json()
        assert created["id"].startswith("job_")
        assert created["object"] == "job"
        assert created["status"] in ("queued", "running")
        assert created["model"] == MODEL
        assert created["result"] is None and created["error"] is None
        assert reply.headers["location"] == f"/v1/jobs/{created['id']}"

        job = stack.wait_job(client, created["id"])
    assert job["status"] == "succeeded", job
    assert job["metadata"] == {"case": "e2e"}
    assert job["created_at"] <= job["started_at"] <= job["completed_at"]
    assert job["error"] is None
    assert job["attempts"] == 1
    result = job["result"]
    assert result["object"] == "chat.completion"
    assert result["id"].startswith("chatcmpl-")
    assert result["model"] == MODEL
    (choice,) = result["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "The image is mostly green."
    assert choice["finish_reason"] == "stop"
    usage = result["usage"]
    assert usage["prompt_tokens"] > 20  # chat template + image tokens + question
    assert 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert job["timings"]["inference_ms"] > 0 and job["timings"]["batch_size"] >= 1


def test_http_image_from_allow_listed_host(stack, media_server):
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=image_job(media_server.url("/red.png"))).json()["id"]
        job = stack.wait_job(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["result"]["choices"][0]["message"]["content"] == "The image is mostly red."
    assert "/red.png" in media_server.hits


def test_openai_client_gets_a_chat_completion(stack):
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="key-alice")
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What color is this image?"},
                    {"type": "image_url", "image_url": {"url": data_url(png_bytes((30, 60, 220)))}},
                ],
            }
        ],
        max_tokens=16,
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "The image is mostly blue."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0
    models = client.models.list()
    assert MODEL in [m.id for m in models.data]


def test_concurrent_jobs_are_batched_and_match_single_runs(stack):
    colors = [(220, 30, 30), (30, 180, 40), (30, 60, 220), (240, 220, 30), (250, 140, 20), (140, 40, 170)] * 2
    bodies = [image_job(data_url(png_bytes(c, (40 + 8 * i, 60))), max_tokens=12) for i, c in enumerate(colors)]
    with stack.client() as client:

        def submit(body):
            return client.post("/v1/jobs", json=body).json()["id"]

        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            ids = list(pool.map(submit, bodies))
        together = [stack.wait_job(client, job_id) for job_id in ids]
        alone = []
        for body in bodies:
            job_id = submit(body)
            alone.append(stack.wait_job(client, job_id))
    assert all(j["status"] == "succeeded" for j in together + alone)
    # The worker serves the tiny Qwen2-VL with continuous batching: concurrent jobs decode together.
    assert max(j["timings"]["batch_size"] for j in together) > 1, "concurrent jobs should share decode steps"
    assert [j["result"]["choices"][0]["message"]["content"] for j in together] == [
        j["result"]["choices"][0]["message"]["content"] for j in alone
    ]
    assert [j["result"]["usage"] for j in together] == [j["result"]["usage"] for j in alone]


def test_bad_inputs_get_documented_errors_and_worker_keeps_serving(stack, media_server):
    with stack.client() as client:
        anonymous = client.post("/v1/jobs", json=image_job("data:image/png;base64,AAAA"), headers={"Authorization": ""})
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["type"] == "authentication_error"
        wrong = client.post("/v1/jobs", json=image_job("x"), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401

        unknown = image_job("data:image/png;base64,AAAA")
        unknown["messages"][0]["content"][0] = {"type": "hologram", "hologram": {}}
        reply = client.post("/v1/jobs", json=unknown)
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "messages[0].content[0]"
        assert "hologram" in error["message"]

        refused = client.post("/v1/jobs", json=image_job("http://localhost/cat.png"))
        assert refused.status_code == 400
        assert refused.json()["error"]["type"] == "media_not_allowed"
        assert refused.json()["error"]["param"] == "messages[0].content[0].image_url.url"

        # Well-formed at the gateway, broken at the worker: a failed job, typed.
        malformed = client.post("/v1/jobs", json=image_job("data:image/png;base64,not*base64!")).json()
        truncated = client.post("/v1/jobs", json=image_job(media_server.url("/broken.png"))).json()
        failed = [stack.wait_job(client, j["id"]) for j in (malformed, truncated)]
        assert [j["status"] for j in failed] == ["failed", "failed"]
        assert failed[0]["error"]["type"] == "invalid_media"
        assert failed[0]["error"]["code"] == "invalid_data_url"
        assert failed[1]["error"]["code"] == "image_decode_failed"
        assert failed[1]["error"]["param"] == "messages[0].content[0]"

        after = stack.wait_job(
            client, client.post("/v1/jobs", json=image_job(media_server.url("/red.png"))).json()["id"]
        )
        assert after["status"] == "succeeded"
    assert stack.processes["worker"].poll() is None


def test_sync_endpoint_reports_failed_job_as_error(stack):
    with stack.client() as client:
        reply = client.post("/v1/chat/completions", json=image_job("data:image/png;base64,!!!!"))
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_data_url"


def test_tenants_see_only_their_own_jobs(stack):
    with stack.client("alice") as alice, stack.client("bob") as bob:
        job_id = alice.post("/v1/jobs", json=image_job(data_url(png_bytes()))).json()["id"]
        assert bob.get(f"/v1/jobs/{job_id}").status_code == 404
        assert bob.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert job_id not in [j["id"] for j in bob.get("/v1/jobs").json()["data"]]
        assert job_id in [j["id"] for j in alice.get("/v1/jobs").json()["data"]]
        stack.wait_job(alice, job_id)
