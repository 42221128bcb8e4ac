"""The pinned POST: address rules, and the checked address is the one connected to."""

from __future__ import annotations

import httpx
import pytest

from tests.webhook_receiver import Receiver, serve
from worker.netguard import DestinationRefused, pinned_post


@pytest.fixture
def receiver():
    yield from serve(Receiver(secrets={}))


def post(url: str, allow: bool) -> httpx.Response:
    with httpx.Client(trust_env=False) as client:
        return pinned_post(client, url, content=b"{}", headers={}, timeout=2, allow_private_networks=allow)


def test_a_name_is_resolved_once_and_sent_as_host(receiver):
    url = f"http://localhost:{receiver.port}/pinned"
    assert post(url, allow=True).status_code == 200
    (got,) = receiver.at("/pinned")
    assert got.headers["host"] == f"localhost:{receiver.port}"  # connected to the address, named as given


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://127.0.0.1:9/x", "non-public"),
        ("http://localhost:9/x", "non-public"),
        ("http://[::1]:9/x", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://10.0.0.1/x", "non-public"),
        ("http://[::ffff:127.0.0.1]:9/x", "non-public"),
        ("http://no-such-host.invalid/x", "does not resolve"),
        ("ftp://example.com/x", "http"),
        ("http://user:pw@example.com/x", "user:password"),
    ],
)
def test_refused_destinations(url, words):
    with pytest.raises(DestinationRefused, match=words):
        post(url, allow=False)


def test_redirects_are_not_followed(receiver):
    receiver.script("/hop", (307, {"Location": "/elsewhere"}))
    assert post(receiver.url("/hop"), allow=True).status_code == 307
    assert receiver.at("/elsewhere") == []
