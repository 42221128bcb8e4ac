"""Every source the fetcher reads, against real servers and a real disk."""

from __future__ import annotations

import base64
import ipaddress
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.errors import MediaError, MediaFetchTransientError, MediaNotAllowedError
from shared.media_policy import MediaPolicy, address_is_public
from tests.conftest import free_port
from worker.media.fetch import FetchLimits, MediaFetcher


def fetcher(*, max_bytes=100_000, timeout=2.0, retries=0, **policy) -> MediaFetcher:
    options = {"allowed_domains": ["127.0.0.1"], "allow_private_networks": True, **policy}
    return MediaFetcher(
        policy=MediaPolicy(**options),
        limits={"image": FetchLimits(timeout, max_bytes), "video": FetchLimits(timeout, max_bytes * 10)},
        retries=retries,
        backoff=0.01,
    )


def test_data_urls_decode_strictly():
    f = fetcher()
    fetched = f.fetch("data:image/png;base64," + base64.b64encode(b"hello").decode())
    assert (fetched.data, fetched.media_type) == (b"hello", "image/png")
    for bad in ("data:image/png;base64,a*b=", "data:image/png,plain", "data:image/png;base64", "data:;base64,a b"):
        with pytest.raises(MediaError) as err:
            f.fetch(bad, param="p")
        assert err.value.code == "invalid_data_url" and err.value.param == "p"


def test_data_url_size_cap_applies_before_decoding():
    with pytest.raises(MediaError) as err:
        fetcher(max_bytes=1024).fetch("data:image/png;base64," + base64.b64encode(b"x" * 5000).decode())
    assert err.value.code == "media_too_large"


def test_jpeg_frame_lists_split_only_for_video():
    frames = [base64.b64encode(bytes([i]) * 10).decode() for i in range(3)]
    url = "data:video/jpeg;base64," + ",".join(frames)
    assert fetcher().fetch(url, modality="video").frames == [bytes([i]) * 10 for i in range(3)]
    with pytest.raises(MediaError):
        fetcher().fetch(url, modality="image")


def test_fetches_from_allow_listed_host(media_server):
    assert fetcher().fetch(media_server.url("/red.png")).data.startswith(b"\x89PNG")


def test_host_off_the_allow_list_is_never_contacted(media_server):
    before = len(media_server.hits)
    with pytest.raises(MediaNotAllowedError) as err:
        fetcher().fetch(media_server.url("/red.png", host="localhost"))
    assert err.value.code == "domain_not_allowed"
    assert len(media_server.hits) == before


def test_empty_allow_list_admits_public_hosts_only(media_server):
    before = len(media_server.hits)
    with pytest.raises(MediaNotAllowedError) as err:
        fetcher(allowed_domains=[], allow_private_networks=False).fetch(media_server.url("/red.png"))
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
        ("64:ff9b::a00:1", False),
        ("8.8.8.8", True),
        ("::ffff:8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_address_classes(address, public):
    assert address_is_public(ipaddress.ip_address(address)) is public


def test_origin_errors_are_typed_and_4xx_is_not_retried(media_server):
    f = fetcher(retries=2)
    before = len(media_server.hits)
    with pytest.raises(MediaError) as err:
        f.fetch(media_server.url("/missing.png"))
    assert err.value.code == "http_404"
    assert len(media_server.hits) == before + 1
    with pytest.raises(MediaNotAllowedError) as err:
        f.fetch(media_server.url("/redirect"))
    assert err.value.code == "redirect"


def test_5xx_is_retried_with_backoff_then_transient(media_server):
    before = len(media_server.hits)
    with pytest.raises(MediaFetchTransientError) as err:
        fetcher(retries=2).fetch(media_server.url("/error500"))
    assert err.value.code == "upstream_error"
    assert len(media_server.hits) == before + 3


def test_a_flaky_origin_succeeds_on_retry():
    answers = iter([503, 502, 200])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status = next(answers)
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        assert fetcher(retries=2).fetch(f"http://127.0.0.1:{httpd.server_address[1]}/x").data == b"ok"
    finally:
        httpd.shutdown()


def test_streamed_size_cap_and_lying_content_length(media_server):
    with pytest.raises(MediaError) as err:
        fetcher(max_bytes=1024).fetch(media_server.url("/blue.png"))
    assert err.value.code == "media_too_large"


def test_slow_origin_times_out_as_transient():
    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(MediaFetchTransientError) as err:
            fetcher(timeout=0.5).fetch(f"http://127.0.0.1:{httpd.server_address[1]}/x")
        assert err.value.code == "timeout"
        assert time.monotonic() - started < 2
    finally:
        httpd.shutdown()


def test_unreachable_host_is_transient():
    with pytest.raises(MediaFetchTransientError):
        fetcher().fetch(f"http://127.0.0.1:{free_port()}/x.png")


# --- file:// ---------------------------------------------------------------------


@pytest.fixture
def media_dir(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"png-bytes")
    (tmp_path / "outside.txt").write_bytes(b"secret")
    os.symlink(tmp_path / "outside.txt", root / "escape.png")
    os.symlink(root / "sub" / "a.png", root / "inside-link.png")
    os.symlink(tmp_path, root / "up")
    return root


def test_local_files_under_the_allowed_directory(media_dir):
    f = fetcher(allowed_local_media_path=str(media_dir))
    assert f.fetch(f"file://{media_dir}/sub/a.png").data == b"png-bytes"
    assert f.fetch(f"file://{media_dir}/inside-link.png").data == b"png-bytes"
    assert f.fetch(f"file://localhost{media_dir}/sub/%61.png").data == b"png-bytes"


@pytest.mark.parametrize(
    "path, code",
    [
        ("{root}/../outside.txt", "path_not_allowed"),
        ("{root}/sub/../../outside.txt", "path_not_allowed"),
        ("{root}/escape.png", "path_not_allowed"),  # a symlink out
        ("{root}/up/outside.txt", "path_not_allowed"),  # a directory symlink out
        ("/etc/passwd", "path_not_allowed"),
        ("{root}/missing.png", "file_not_found"),
        ("{root}/sub", "not_a_file"),
    ],
)
def test_local_paths_cannot_escape(media_dir, path, code):
    f = fetcher(allowed_local_media_path=str(media_dir))
    with pytest.raises(MediaError) as err:
        f.fetch("file://" + path.format(root=media_dir), param="p")
    assert err.value.code == code
    assert str(media_dir.parent) not in err.value.message


def test_local_files_are_off_by_default(media_dir):
    with pytest.raises(MediaNotAllowedError) as err:
        fetcher().fetch(f"file://{media_dir}/sub/a.png")
    assert err.value.code == "local_media_disabled"


def test_local_file_size_cap(media_dir):
    (media_dir / "big.bin").write_bytes(b"x" * 5000)
    with pytest.raises(MediaError) as err:
        fetcher(max_bytes=1024, allowed_local_media_path=str(media_dir)).fetch(f"file://{media_dir}/big.bin")
    assert err.value.code == "media_too_large"
