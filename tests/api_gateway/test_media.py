"""`/v1/media` uploads and `/metrics` on the real gateway over HTTP, with a real Redis and no worker."""

from __future__ import annotations

import httpx
import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families

from api_gateway.config import GatewaySettings
from shared import metrics
from shared.media_cache import MediaCache
from tests.api_gateway.server import serve
from tests.conftest import KEYS, MODEL, png_bytes


@pytest.fixture
def gateway(redis_server, redis_client):
    settings = GatewaySettings(
        redis_url=redis_server.url,
        api_keys=[f"{t}:{k}" for t, k in KEYS.items()],
        model=MODEL,
        allowed_media_domains=["images.example.com"],
        media_cache_max_item_bytes=50_000,
    )
    with serve(settings) as base_url:
        yield base_url


def client(base_url: str, tenant: str = "alice") -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=30)


def test_an_upload_is_stored_under_its_uuid_for_its_tenant_only(gateway, redis_server):
    image = png_bytes((10, 200, 10))
    with client(gateway) as alice, client(gateway, "bob") as bob:
        reply = alice.post("/v1/media", files={"file": ("leaf.png", image, "image/png")}, data={"uuid": "leaf/1"})
        assert reply.status_code == 201, reply.text
        entry = reply.json()
        assert entry["id"] == "leaf/1" and entry["kind"] == "image" and entry["bytes"] == len(image)
        assert reply.headers["Location"] == "/v1/media/leaf/1"
        assert alice.get("/v1/media/leaf/1").json()["sha256"] == entry["sha256"]
        # Tenant isolation: bob's reads, deletes and the cache itself never reach alice's entry.
        missing = bob.get("/v1/media/leaf/1")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "media_cache_miss"
        assert bob.delete("/v1/media/leaf/1").status_code == 404
        assert alice.get("/v1/media/leaf/1").status_code == 200
    binary = redis_lib.Redis.from_url(redis_server.url)
    shared = MediaCache(binary, ttl=60, max_bytes=10**6, max_item_bytes=10**6)
    assert shared.data("alice", "leaf/1") == image  # what a worker will read
    assert shared.data("bob", "leaf/1") is None
    binary.close()


def test_an_upload_without_a_uuid_gets_one_and_can_be_deleted(gateway):
    with client(gateway) as alice:
        entry = alice.post("/v1/media", files={"file": ("a.png", png_bytes(), "image/png")}).json()
        assert entry["id"].startswith("media_")
        assert alice.delete(f"/v1/media/{entry['id']}").json()["deleted"] is True
        assert alice.get(f"/v1/media/{entry['id']}").status_code == 404


def test_uploads_are_refused_when_not_media_too_large_or_of_the_wrong_kind(gateway):
    with client(gateway) as alice:
        html = alice.post("/v1/media", files={"file": ("x.png", b"<html></html>", "image/png")})
        assert html.status_code == 400 and html.json()["error"]["type"] == "invalid_media"
        big = alice.post("/v1/media", files={"file": ("b.png", png_bytes(size=(400, 400), noise=True))})
        assert big.status_code == 413
        wrong = alice.post("/v1/media", files={"file": ("a.png", png_bytes())}, data={"kind": "video"})
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "media_kind_mismatch"
        no_file = alice.post("/v1/media", data={"uuid": "x"}, files={"other": ("a", b"x")})
        assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
        assert httpx.post(f"{gateway}/v1/media", files={"file": ("a.png", png_bytes())}).status_code == 401


def test_a_url_is_checked_at_once_and_needs_a_worker_to_fetch_it(gateway):
    with client(gateway) as alice:
        refused = alice.post("/v1/media", json={"url": "http://169.254.169.254/latest/meta-data"})
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "media_not_allowed"
        no_worker = alice.post("/v1/media", json={"url": "https://images.example.com/cat.png", "uuid": "cat"})
        assert no_worker.status_code == 503
        bad = alice.post("/v1/media", json={"uuid": "no-url"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"


def test_metrics_render_the_pools_counters_as_prometheus_text(gateway, redis_client):
    metrics.add(redis_client, {metrics.field("media_cache_hits", tier="shared"): 3})
    with client(gateway) as alice:
        alice.post("/v1/media", files={"file": ("a.png", png_bytes())})
        alice.post("/v1/jobs", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    reply = httpx.get(f"{gateway}/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }
    assert samples[("vlmq_media_cache_hits_total", (("tier", "shared"),))] == 3
    assert samples[("vlmq_media_cache_stores_total", (("tier", "shared"),))] == 1
    assert samples[("vlmq_jobs_submitted_total", (("model", MODEL),))] == 1
    assert samples[("vlmq_jobs_queued", (("model", MODEL),))] == 1
    assert samples[("vlmq_media_cache_shared_entries", ())] == 1
    assert samples[("vlmq_media_cache_shared_bytes", ())] == len(png_bytes())
