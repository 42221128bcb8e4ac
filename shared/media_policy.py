"""Which media URLs may be fetched at all: checks that need no network.

The gateway runs them at submit time so a refused URL is a 400 at once; the
worker runs them again before fetching (and then also checks the addresses
the host resolves to, which only it does). Both parse with `httpx.URL`, the
same parser the fetch connects with, so the check and the connection can
never disagree about which host a URL names.
"""

from __future__ import annotations

import httpx

from shared.errors import MediaError, MediaNotAllowedError

FETCH_SCHEMES = ("http", "https")


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Exact host match, or `*.example.com` for its subdomains (not the apex).

    An empty allow-list admits any host; the address rules still apply.
    """
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def parse_fetch_url(url: str, allowed: list[str], param: str | None) -> httpx.URL:
    """Parse an http(s) media URL and apply the scheme and allow-list rules."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        raise MediaError("The media URL is malformed.", param=param, code="invalid_url") from None
    if parsed.scheme not in FETCH_SCHEMES:
        raise MediaNotAllowedError(f"URL scheme '{parsed.scheme}' is not allowed.", param=param, code="scheme")
    if not parsed.host:
        raise MediaError("The media URL has no host.", param=param, code="invalid_url")
    if parsed.userinfo:
        # Credentials in URLs are a classic way to confuse host parsing; nobody needs them here.
        raise MediaNotAllowedError("Media URLs may not carry user:password@.", param=param, code="userinfo")
    if not host_allowed(parsed.host, allowed):
        raise MediaNotAllowedError(
            f"Host '{parsed.host}' is not in VLMQ_ALLOWED_MEDIA_DOMAINS.", param=param, code="domain_not_allowed"
        )
    return parsed


def check_media_url(url: str, allowed: list[str], param: str | None) -> None:
    """Submit-time check of any media URL a job names."""
    if url.startswith("data:"):
        header = url[5:].split(",", 1)[0]
        if "," not in url or not header.endswith(";base64"):
            raise MediaError(
                "data: URLs must be base64 ('data:<type>;base64,<data>').", param=param, code="invalid_data_url"
            )
        return
    parse_fetch_url(url, allowed, param)
