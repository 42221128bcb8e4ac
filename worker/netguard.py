"""Outbound HTTP to addresses users give us, pinned to an address we checked.

The same rules as media fetching (`worker.media.fetch`), for callers that
send rather than fetch (webhooks):
- one parser (`httpx.URL`) for the check and the connection;
- the host is resolved once and every address it resolves to must be
  public (unless the caller allows private networks); the connection goes
  to the checked address with the original name as Host and TLS SNI, so a
  DNS answer that changes between check and connect (rebinding) cannot
  redirect the request;
- redirects are never followed (a public host could bounce us inward).
"""

from __future__ import annotations

import ipaddress
import socket

import httpx

from worker.media.fetch import Address, address_is_public


class DestinationRefused(Exception):
    """The URL may not be contacted at all (scheme, credentials, private address, no such host)."""


def resolve_checked(host: str, port: int, *, allow_private_networks: bool) -> Address:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise DestinationRefused(f"host '{host}' does not resolve") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not allow_private_networks:
        # All of them, not just the first: the resolver's order is not ours to trust.
        for ip in addresses:
            if not address_is_public(ip):
                raise DestinationRefused(f"host '{host}' resolves to a non-public address")
    return addresses[0]


def pinned_post(
    client: httpx.Client,
    url: str,
    *,
    content: bytes,
    headers: dict[str, str],
    timeout: float,
    allow_private_networks: bool,
) -> httpx.Response:
    """POST to `url` at the address its host resolved to and passed the check."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        raise DestinationRefused("the URL is malformed") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise DestinationRefused("only http(s) URLs with a host are allowed")
    if parsed.userinfo:
        raise DestinationRefused("URLs may not carry user:password@")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    ip = resolve_checked(parsed.host, port, allow_private_networks=allow_private_networks)
    pinned = parsed.copy_with(host=str(ip))
    host_header = parsed.host if parsed.port is None else f"{parsed.host}:{parsed.port}"
    return client.post(
        pinned,
        content=content,
        headers={**headers, "Host": host_header},
        extensions={"sni_hostname": parsed.host},
        timeout=timeout,
        follow_redirects=False,
    )
