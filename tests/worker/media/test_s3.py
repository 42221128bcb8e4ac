"""s3:// media through boto3 against moto's S3 server on 127.0.0.1, over real HTTP."""

from __future__ import annotations

import pytest

from shared.errors import MediaError, MediaFetchTransientError, MediaNotAllowedError
from shared.media_policy import MediaPolicy
from tests.conftest import free_port
from worker.media.fetch import FetchLimits, MediaFetcher, S3Options


def fetcher(s3_server, *, buckets=(), max_bytes=100_000, **options) -> MediaFetcher:
    s3 = S3Options(
        endpoint_url=options.pop("endpoint_url", s3_server.endpoint_url),
        region=s3_server.region,
        access_key_id=options.pop("access_key_id", s3_server.access_key_id),
        secret_access_key=s3_server.secret_access_key,
    )
    return MediaFetcher(
        policy=MediaPolicy(s3_allowed_buckets=list(buckets)),
        limits={"image": FetchLimits(2.0, max_bytes)},
        s3=s3,
        retries=options.pop("retries", 0),
        backoff=0.01,
    )


def test_reads_an_object(s3_server):
    url = s3_server.put("cats/a.png", b"\x89PNG-cat")
    assert fetcher(s3_server).fetch(url).data == b"\x89PNG-cat"
    assert fetcher(s3_server, buckets=["vlmq-media"]).fetch(url).data == b"\x89PNG-cat"


def test_bucket_allow_list(s3_server):
    url = s3_server.put("x.png", b"x", bucket="other-bucket")
    with pytest.raises(MediaNotAllowedError) as err:
        fetcher(s3_server, buckets=["vlmq-media"]).fetch(url, param="p")
    assert err.value.code == "bucket_not_allowed" and err.value.param == "p"


def test_missing_objects_and_buckets_are_client_errors(s3_server):
    for url in ("s3://vlmq-media/none.png", "s3://no-such-bucket/x.png"):
        with pytest.raises(MediaError) as err:
            fetcher(s3_server, retries=2).fetch(url)
        assert err.value.code == "s3_not_found"
        assert not isinstance(err.value, MediaFetchTransientError)


def test_malformed_urls(s3_server):
    for url in ("s3://vlmq-media", "s3://vlmq-media/", "s3://Bad_Bucket/x", "s3:///key"):
        with pytest.raises(MediaError) as err:
            fetcher(s3_server).fetch(url)
        assert err.value.code == "invalid_url"


def test_size_cap(s3_server):
    url = s3_server.put("big.bin", b"x" * 5000)
    with pytest.raises(MediaError) as err:
        fetcher(s3_server, max_bytes=1024).fetch(url)
    assert err.value.code == "media_too_large"


def test_unreachable_endpoint_is_transient(s3_server):
    f = fetcher(s3_server, endpoint_url=f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(MediaFetchTransientError) as err:
        f.fetch("s3://vlmq-media/x.png")
    assert err.value.code == "connect_error"
