"""The shared media tier on a real redis-server: identity, tenants, TTL, the byte budget."""

from __future__ import annotations

import time

import pytest
import redis as redis_lib

from shared import keys
from shared.media_cache import MediaCache, content_digest, sniff_kind
from tests.conftest import png_bytes


@pytest.fixture
def binary(redis_server, redis_client):
    client = redis_lib.Redis.from_url(redis_server.url)  # media bytes: no decoding of replies
    yield client
    client.close()


def cache(binary, ttl: int = 60, max_bytes: int = 10_000, max_item: int = 5_000) -> MediaCache:
    return MediaCache(binary, ttl=ttl, max_bytes=max_bytes, max_item_bytes=max_item)


def accounted(redis_client) -> int:
    return int(redis_client.get(keys.MEDIA_BYTES) or 0)


def test_put_then_lookup_and_data_round_trip_binary(binary, redis_client):
    media = cache(binary)
    data = bytes(range(256)) * 4
    stored = media.put("alice", "sku-1", "image", data, "png")
    assert stored.stored and stored.evicted == 0
    entry = media.lookup("alice", "sku-1")
    assert entry is not None
    assert (entry.kind, entry.size, entry.format) == ("image", len(data), "png")
    assert entry.sha256 == content_digest("image", data)
    assert media.data("alice", "sku-1") == data
    assert accounted(redis_client) == len(data)


def test_tenants_never_see_each_others_uuids(binary):
    media = cache(binary)
    media.put("alice", "shared-name", "image", b"alice's bytes")
    assert media.lookup("bob", "shared-name") is None
    assert media.data("bob", "shared-name") is None
    media.put("bob", "shared-name", "image", b"bob's bytes")
    assert media.data("alice", "shared-name") == b"alice's bytes"
    assert media.data("bob", "shared-name") == b"bob's bytes"


def test_overwrite_replaces_content_and_keeps_the_accounting_exact(binary, redis_client):
    media = cache(binary)
    media.put("alice", "u", "image", b"x" * 100)
    media.put("alice", "u", "image", b"y" * 300)
    assert media.data("alice", "u") == b"y" * 300
    assert accounted(redis_client) == 300
    assert redis_client.zcard(keys.MEDIA_INDEX) == 1


def test_entries_expire_after_their_ttl_since_last_use(binary, redis_client):
    media = cache(binary, ttl=1)
    media.put("alice", "kept", "image", b"k" * 10)
    media.put("alice", "dropped", "image", b"d" * 10)
    time.sleep(0.6)
    assert media.lookup("alice", "kept") is not None  # a use renews the TTL
    time.sleep(0.6)
    assert media.lookup("alice", "dropped") is None
    assert media.lookup("alice", "kept") is not None
    time.sleep(1.2)
    assert media.lookup("alice", "kept") is None
    # The next write settles what expired: nothing is left counted against the budget.
    media.put("alice", "new", "image", b"n" * 7)
    assert accounted(redis_client) == 7
    assert redis_client.zcard(keys.MEDIA_INDEX) == 1


def test_the_budget_evicts_least_recently_used_first(binary, redis_client):
    media = cache(binary, max_bytes=1000, max_item=1000)
    for name in ("a", "b", "c"):
        media.put("alice", name, "image", name.encode() * 300)
        time.sleep(0.01)
    assert media.lookup("alice", "a") is not None  # "b" is now the least recently used
    stored = media.put("alice", "d", "image", b"d" * 300)
    assert stored.stored and stored.evicted == 1
    assert media.lookup("alice", "b") is None
    assert {n for n in "acd" if media.lookup("alice", n)} == set("acd")
    assert accounted(redis_client) == 900


def test_items_over_the_item_cap_are_not_stored(binary, redis_client):
    media = cache(binary, max_item=100)
    stored = media.put("alice", "big", "video", b"v" * 101)
    assert not stored.stored
    assert media.lookup("alice", "big") is None
    assert accounted(redis_client) == 0


def test_delete_removes_entry_and_its_bytes(binary, redis_client):
    media = cache(binary)
    media.put("alice", "u", "audio", b"a" * 50, "wav")
    assert media.delete("alice", "u")
    assert not media.delete("alice", "u")
    assert media.lookup("alice", "u") is None
    assert accounted(redis_client) == 0


def test_every_data_key_has_a_ttl(binary, redis_client):
    cache(binary, ttl=60).put("alice", "u", "image", b"z")
    (name,) = [k for k in redis_client.keys(f"{keys.PREFIX}:media:*")]
    assert 0 < redis_client.ttl(name) <= 60


def test_sniffing_recognises_media_by_magic_bytes():
    from tests.worker.media.test_video import mp4

    assert sniff_kind(png_bytes()) == ("image", "png")
    assert sniff_kind(mp4(4, 4, size=(32, 32)))[0] == "video"
    assert sniff_kind(b"RIFF\x00\x00\x00\x00WAVEfmt ") == ("audio", "wav")
    assert sniff_kind(b"fLaC\x00") == ("audio", "flac")
    assert sniff_kind(b"<html>not media</html>") is None
