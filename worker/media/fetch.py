"""The one place media bytes come from: data URLs and allow-listed HTTP(S).

Security decisions, each against a known attack:
- One parser (`httpx.URL`) for the check and the connection.
- The host is resolved once; every address it resolves to must be public
  (unless VLMQ_MEDIA_ALLOW_PRIVATE_NETWORKS), and the connection goes to
  the address that was checked, with the original name as Host and TLS
  SNI: a DNS answer that changes between check and connect (rebinding)
  cannot redirect the fetch.
- Redirects are not followed: a public host could bounce us to an internal one.
- Size is capped while streaming, time by a whole-fetch deadline.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import time

import httpx

from shared.errors import MediaError, MediaFetchTransientError, MediaNotAllowedError
from shared.media_policy import parse_fetch_url

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_is_public(ip: Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return address_is_public(mapped)
    return ip.is_global and not ip.is_multicast


def decode_data_url(url: str, max_bytes: int, param: str | None) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(
            "data: URLs must be base64 ('data:<type>;base64,<data>').", param=param, code="invalid_data_url"
        )
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise MediaError(f"Media is larger than {max_bytes} bytes.", param=param, code="media_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("The data: URL is not valid base64.", param=param, code="invalid_data_url") from None


class MediaFetcher:
    def __init__(
        self,
        *,
        allowed_domains: list[str],
        allow_private_networks: bool,
        max_bytes: int,
        timeout: float,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.allowed_domains = allowed_domains
        self.allow_private_networks = allow_private_networks
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._client = httpx.Client(follow_redirects=False, transport=transport, trust_env=False)

    def close(self) -> None:
        self._client.close()

    def fetch(self, url: str, *, param: str | None = None) -> bytes:
        if url.startswith("data:"):
            return decode_data_url(url, self.max_bytes, param)
        return self._fetch_http(url, param)

    def _resolve(self, host: str, port: int, param: str | None) -> Address:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise MediaError(f"Host '{host}' does not resolve.", param=param, code="dns_failed") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not self.allow_private_networks:
            # All of them, not just the first: the resolver's order is not ours to trust.
            for ip in addresses:
                if not address_is_public(ip):
                    raise MediaNotAllowedError(
                        f"Host '{host}' resolves to a non-public address.", param=param, code="private_address"
                    )
        return addresses[0]

    def _fetch_http(self, url: str, param: str | None) -> bytes:
        parsed = parse_fetch_url(url, self.allowed_domains, param)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        ip = self._resolve(parsed.host, port, param)
        pinned = parsed.copy_with(host=str(ip))
        host_header = parsed.host if parsed.port is None else f"{parsed.host}:{parsed.port}"
        deadline = time.monotonic() + self.timeout
        try:
            with self._client.stream(
                "GET",
                pinned,
                headers={"Host": host_header, "Accept": "image/*,video/*,audio/*,*/*;q=0.5"},
                extensions={"sni_hostname": parsed.host},
                timeout=self.timeout,
            ) as response:
                if response.is_redirect:
                    raise MediaNotAllowedError(
                        "The media URL redirects, and redirects are not followed.", param=param, code="redirect"
                    )
                if response.status_code >= 500:
                    raise MediaFetchTransientError(
                        f"The media host answered {response.status_code}.", param=param, code="upstream_error"
                    )
                if response.status_code >= 400:
                    raise MediaError(
                        f"The media host answered {response.status_code} for this URL.",
                        param=param,
                        code=f"http_{response.status_code}",
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise MediaError(
                        f"Media is larger than {self.max_bytes} bytes.", param=param, code="media_too_large"
                    )
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise MediaError(
                            f"Media is larger than {self.max_bytes} bytes.", param=param, code="media_too_large"
                        )
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("deadline")
                return bytes(body)
        except httpx.TimeoutException:
            raise MediaFetchTransientError(
                f"Fetching the media timed out after {self.timeout:g}s.", param=param, code="timeout"
            ) from None
        except httpx.TransportError as exc:
            raise MediaFetchTransientError(
                f"Could not connect to the media host ({type(exc).__name__}).", param=param, code="connect_error"
            ) from None
