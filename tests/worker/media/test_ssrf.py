"""The SSRF guard, against a real HTTP server on 127.0.0.1 that must never be reached.

Every refused URL below points at that server in some disguise; after each
refusal the server's request log must still be empty. Names that look
public are made to resolve where the attack needs them by the fetcher's
resolver (its DNS boundary), and a test network routes a "public" address
to the local server where a test needs a reachable public host.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from shared.errors import MediaError, MediaFetchTransientError, MediaNotAllowedError
from shared.media_policy import MediaPolicy
from worker.media.fetch import FetchLimits, MediaFetcher

PUBLIC_IP = "93.184.216.34"  # a global unicast address; nothing is reachable there from the tests


class Target:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                target.requests.append((self.path, self.headers.get("Host")))
                status, headers, body = target.routes.get(self.path, (200, {}, b"secret"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def target():
    server = Target()
    yield server
    server.httpd.shutdown()


@pytest.fixture
def server(target):
    target.requests.clear()
    target.routes.clear()
    return target


def resolver(table: dict[str, list[str]]):
    """A DNS answering from `table`; counts its lookups."""
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        answer = table.get(host)
        if answer is None:
            raise socket.gaierror("no such name")
        family = lambda ip: socket.AF_INET6 if ":" in ip else socket.AF_INET  # noqa: E731
        return [(family(ip), socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]

    getaddrinfo.calls = calls  # type: ignore[attr-defined]
    return getaddrinfo


class Network(httpx.BaseTransport):
    """The wire: records where each connection goes; PUBLIC_IP is routed to the local server."""

    def __init__(self) -> None:
        self.connections: list[tuple[str, str]] = []
        self._real = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.connections.append((request.url.host, request.headers["host"]))
        if request.url.host == PUBLIC_IP:
            request.url = request.url.copy_with(host="127.0.0.1")
        elif not request.url.host.startswith("127."):
            raise httpx.ConnectError("no route to host")
        return self._real.handle_request(request)


def fetcher(*, allowed=(), private=False, redirects=False, table=None, transport=None) -> MediaFetcher:
    return MediaFetcher(
        policy=MediaPolicy(allowed_domains=list(allowed), allow_private_networks=private),
        limits={"image": FetchLimits(timeout=2.0, max_bytes=100_000)},
        allow_redirects=redirects,
        retries=0,
        resolver=resolver(table or {}),
        transport=transport,
    )


def refuse(f: MediaFetcher, url: str, server: Target) -> MediaError:
    with pytest.raises(MediaError) as err:
        f.fetch(url, param="p")
    assert server.requests == [], f"{url} reached the server"
    return err.value


LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "2130706433",  # decimal
    "0177.0.0.1",  # octal
    "0x7f.0.0.1",  # hex per octet
    "0x7f000001",  # hex whole
    "017700000001",  # octal whole
    "127.1",  # short
    "127.0.1",
    "0",  # 0.0.0.0, which Linux routes to loopback
    "0.0.0.0",
    "[::1]",
    "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]",
    "[::]",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_in_every_spelling_is_refused(server, host):
    err = refuse(fetcher(), f"http://{host}:{server.port}/x", server)
    assert isinstance(err, MediaNotAllowedError) or err.code == "invalid_url"


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # CGNAT
        "224.0.0.1",  # multicast
        "240.0.0.1",  # reserved
        "[fe80::1]",  # link-local
        "[fc00::1]",  # unique local
        "[fd00:ec2::254]",  # AWS metadata over IPv6
        "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
        "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
        "0xa9.0xfe.0xa9.0xfe",  # metadata, hex
        "2852039166",  # metadata, decimal
    ],
)
def test_private_link_local_and_metadata_addresses_are_refused(server, host):
    err = refuse(fetcher(), f"http://{host}:{server.port}/latest/meta-data/", server)
    assert err.code == "private_address"


def test_a_public_looking_allow_listed_name_resolving_to_loopback_is_refused(server):
    table = {"media.example.com": ["127.0.0.1"]}
    f = fetcher(allowed=["media.example.com"], table=table)
    err = refuse(f, f"http://media.example.com:{server.port}/cat.png", server)
    assert err.code == "private_address"
    # Control: with the address rule lifted the same fetch does reach the server, so the
    # empty log above means "refused", not "unreachable".
    fetcher(allowed=["media.example.com"], table=table, private=True).fetch(
        f"http://media.example.com:{server.port}/cat.png"
    )
    assert server.requests == [("/cat.png", f"media.example.com:{server.port}")]


def test_any_private_address_among_the_answers_refuses_the_name(server):
    table = {"mixed.example.com": [PUBLIC_IP, "10.0.0.7"]}
    refuse(fetcher(table=table), f"http://mixed.example.com:{server.port}/x", server)


def test_dns_rebinding_connects_to_the_checked_address(server):
    answers = iter([[PUBLIC_IP], ["127.0.0.1"]])

    def rebinding(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in next(answers)]

    network = Network()
    f = fetcher(transport=network)
    f.resolver = rebinding
    server.routes["/img"] = (200, {}, b"public bytes")
    assert f.fetch(f"http://rebind.example.com:{server.port}/img").data == b"public bytes"
    # One lookup, and the connection went to the address that lookup returned and was
    # checked; the second (rebound) answer was never asked for.
    assert network.connections == [(PUBLIC_IP, f"rebind.example.com:{server.port}")]
    assert next(answers) == ["127.0.0.1"]


def test_names_are_resolved_once_per_fetch(server):
    table = {"cdn.example.com": [PUBLIC_IP]}
    f = fetcher(table=table, transport=Network())
    f.fetch(f"http://cdn.example.com:{server.port}/a")
    assert f.resolver.calls == ["cdn.example.com"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:{port}/secret",
        "http://[::ffff:127.0.0.1]:{port}/secret",
        "http://2130706433:{port}/secret",
        "http://internal.example.com:{port}/secret",  # resolves to 10.0.0.5
        "http://169.254.169.254/latest/meta-data/",
        "http://evil.example.org:{port}/secret",  # not on the allow-list
        "file:///etc/passwd",
        "gopher://127.0.0.1:{port}/_secret",
    ],
)
def test_a_redirect_from_an_allowed_host_to_a_refused_one_is_refused(server, location):
    table = {"cdn.example.com": [PUBLIC_IP], "internal.example.com": ["10.0.0.5"], "evil.example.org": [PUBLIC_IP]}
    server.routes["/hop"] = (302, {"Location": location.format(port=server.port)}, b"")
    network = Network()
    f = fetcher(allowed=["cdn.example.com", "*.example.com"], redirects=True, table=table, transport=network)
    with pytest.raises(MediaNotAllowedError):
        f.fetch(f"http://cdn.example.com:{server.port}/hop")
    assert [path for path, _ in server.requests] == ["/hop"]
    assert len(network.connections) == 1


def test_redirects_are_refused_unless_enabled_and_capped_at_five_hops(server):
    table = {"cdn.example.com": [PUBLIC_IP]}
    for i in range(7):
        server.routes[f"/r{i}"] = (302, {"Location": f"/r{i + 1}"}, b"")
    server.routes["/r7"] = (200, {}, b"done")
    err = refuse_after(fetcher(table=table, transport=Network()), f"http://cdn.example.com:{server.port}/r0", server)
    assert err.code == "redirect"
    assert [p for p, _ in server.requests] == ["/r0"]

    server.requests.clear()
    f = fetcher(table=table, transport=Network(), redirects=True)
    with pytest.raises(MediaNotAllowedError) as too_many:
        f.fetch(f"http://cdn.example.com:{server.port}/r0")
    assert too_many.value.code == "too_many_redirects"
    assert len(server.requests) == 6  # the first request and five redirects, no more

    server.requests.clear()
    assert f.fetch(f"http://cdn.example.com:{server.port}/r3").data == b"done"


def refuse_after(f, url, server):
    with pytest.raises(MediaError) as err:
        f.fetch(url)
    return err.value


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pass@127.0.0.1:{port}/x",
        "http://cdn.example.com@127.0.0.1:{port}/x",
        "http://127.0.0.1:{port}\\@cdn.example.com/x",
        "http://cdn.example.com\\@127.0.0.1:{port}/x",
        "http://127.0.0.1:{port}/x\\y",
        "http://127.0.0.1:{port}/ x",
        "http://127.0.0.1:{port}/x\r\nHost: evil",
        "ftp://127.0.0.1:{port}/x",
        "gopher://127.0.0.1:{port}/_GET",
        "dict://127.0.0.1:{port}/",
        "file:///etc/passwd",
        "jar:http://127.0.0.1:{port}/x!/",
        "//127.0.0.1:{port}/x",
        "127.0.0.1:{port}/x",
    ],
)
def test_userinfo_backslash_and_scheme_tricks_are_refused(server, url):
    # The allow-list names the server's own address and private networks are allowed:
    # only the trick itself can be what refuses these.
    f = fetcher(allowed=["cdn.example.com"], private=True, table={"cdn.example.com": ["127.0.0.1"]})
    refuse(f, url.format(port=server.port), server)


def test_an_allow_listed_public_host_is_fetched(server):
    server.routes["/ok.png"] = (200, {"Content-Type": "image/png"}, b"png!")
    f = fetcher(allowed=["cdn.example.com"], table={"cdn.example.com": [PUBLIC_IP]}, transport=Network())
    fetched = f.fetch(f"http://cdn.example.com:{server.port}/ok.png")
    assert (fetched.data, fetched.media_type) == (b"png!", "image/png")


def test_unresolvable_and_unroutable_hosts_are_typed(server):
    with pytest.raises(MediaError) as err:
        fetcher().fetch("http://nowhere.example.com/x")
    assert err.value.code == "dns_failed"
    f = fetcher(table={"dark.example.com": ["8.8.8.8"]}, transport=Network())
    with pytest.raises(MediaFetchTransientError):
        f.fetch("http://dark.example.com/x")
    assert server.requests == []
