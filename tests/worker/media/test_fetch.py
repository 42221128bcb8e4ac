from __future__ import annotations

import base64
import ipaddress

import pytest

from shared.errors import MediaError, MediaFetchTransientError, MediaNotAllowedError
from worker.media.fetch import MediaFetcher, address_is_public


def fetcher(**overrides) -> MediaFetcher:
    options = {
        "allowed_domains": ["127.0.0.1"],
        "allow_private_networks": True,
        "max_bytes": 100_000,
        "timeout": 2.0,
    }
    options.update(overrides)
    return MediaFetcher(**options)


def test_data_urls_decode_strictly():
    f = fetcher()
    assert f.fetch("data:image/png;base64," + base64.b64encode(b"hello").decode()) == b"hello"
    for bad in ("data:image/png;base64,a*b=", "data:image/png,plain", "data:image/png;base64"):
        with pytest.raises(MediaError) as err:
            f.fetch(bad, param="p")
        assert err.value.code == "invalid_data_url" and err.value.param == "p"


def test_data_url_size_cap():
    with pytest.raises(MediaError) as err:
        fetcher(max_bytes=1024).fetch("data:image/png;base64," + base64.b64encode(b"x" * 5000).decode())
    assert err.value.code == "media_too_large"


def test_fetches_from_allow_listed_host(media_server):
    assert fetcher().fetch(media_server.url("/red.png")).startswith(b"\x89PNG")


def test_host_off_the_allow_list_is_never_contacted(media_server):
    before = len(media_server.hits)
    with pytest.raises(MediaNotAllowedError) as err:
        fetcher().fetch(media_server.url("/red.png", host="localhost"))
    assert err.value.code == "domain_not_allowed"
    assert len(media_server.hits) == before


def test_private_addresses_refused_unless_allowed(media_server):
    before = len(media_server.hits)
    for url in (media_server.url("/red.png"), f"http://2130706433:{media_server.port}/red.png"):
        with pytest.raises(MediaNotAllowedError) as err:
            fetcher(allowed_domains=[], allow_private_networks=False).fetch(url)
        assert err.value.code == "private_address"
    assert len(media_server.hits) == before


@pytest.mark.parametrize(
    "address, public",
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1", False),
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_address_classes(address, public):
    assert address_is_public(ipaddress.ip_address(address)) is public


def test_origin_errors_are_typed(media_server):
    f = fetcher()
    with pytest.raises(MediaError) as err:
        f.fetch(media_server.url("/missing.png"))
    assert err.value.code == "http_404"
    with pytest.raises(MediaFetchTransientError):
        f.fetch(media_server.url("/error500"))
    with pytest.raises(MediaNotAllowedError) as err:
        f.fetch(media_server.url("/redirect"))
    assert err.value.code == "redirect"


def test_streamed_size_cap(media_server):
    with pytest.raises(MediaError) as err:
        fetcher(max_bytes=1024).fetch(media_server.url("/blue.png"))
    assert err.value.code == "media_too_large"


def test_unreachable_host_is_transient():
    from tests.conftest import free_port

    with pytest.raises(MediaFetchTransientError):
        fetcher().fetch(f"http://127.0.0.1:{free_port()}/x.png")


def test_userinfo_and_other_schemes_refused():
    f = fetcher()
    for url in ("http://user:pw@127.0.0.1/x.png", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/"):
        with pytest.raises(MediaNotAllowedError):
            f.fetch(url)
