"""Which media sources may be read at all: the checks that need no network.

The gateway runs them at submit time so a refused source is a 400 at once;
the worker runs them again before fetching and then also checks the
addresses a host name resolves to, which only it does. Both parse http(s)
URLs with `httpx.URL`, the same parser the fetch connects with, so the
check and the connection can never disagree about which host a URL names.

Security decisions, each against a known trick:
- Backslashes, whitespace and control characters are refused outright:
  parsers disagree about them (`http://good\\@evil/`), and no real media URL
  needs them.
- `user:password@` is refused: it exists to confuse host parsing.
- A host written as an address is recognised in every spelling the C
  resolver accepts (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`,
  `[::ffff:7f00:1]`), so a private address cannot hide behind a numeric
  form; the worker connects to the address it checked, never to a name.
- An empty allow-list admits any host; the address rule still applies.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx

from shared.errors import InvalidRequestError, MediaError, MediaNotAllowedError
from shared.schemas import ImageEmbedsPart, ImagePart, JobCreate
from shared.settings import format_modality_limits

FETCH_SCHEMES = ("http", "https")
SCHEMES = ("http", "https", "data", "s3", "file")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_FORBIDDEN_CHARS = re.compile(r"[\\\s\x00-\x1f\x7f]")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: list[str] = field(default_factory=list)
    allow_private_networks: bool = False
    s3_allowed_buckets: list[str] = field(default_factory=list)
    allowed_local_media_path: str = ""

    @classmethod
    def from_settings(cls, settings: Any) -> MediaPolicy:
        """From any settings object with the `VLMQ_` media fields (see shared.settings)."""
        return cls(
            allowed_domains=list(settings.allowed_media_domains),
            allow_private_networks=settings.media_allow_private_networks,
            s3_allowed_buckets=list(settings.s3_allowed_buckets),
            allowed_local_media_path=settings.allowed_local_media_path,
        )


def address_is_public(ip: Address) -> bool:
    """Globally routable unicast, judged on the IPv4 address inside any IPv6 wrapping."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_is_public(embedded)
    return ip.is_global and not ip.is_multicast


def literal_address(host: str) -> Address | None:
    """The address a host names without any lookup, in any spelling, or None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    # The legacy forms (decimal, octal, hex, short) that inet_aton, and so
    # getaddrinfo, turn into an IPv4 address.
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


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


def _scheme_of(url: str) -> str:
    scheme, sep, _ = url.partition(":")
    return scheme.lower() if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme) else ""


def parse_fetch_url(url: str, policy: MediaPolicy, param: str | None) -> httpx.URL:
    """Parse an http(s) media URL and apply the scheme, allow-list and literal-address rules."""
    if _FORBIDDEN_CHARS.search(url):
        raise MediaNotAllowedError(
            "Media URLs may not contain backslashes, whitespace or control characters.", param=param, code="invalid_url"
        )
    try:
        parsed = httpx.URL(url)
    except Exception:
        raise MediaError("The media URL is malformed.", param=param, code="invalid_url") from None
    if parsed.scheme not in FETCH_SCHEMES:
        raise MediaNotAllowedError(f"URL scheme '{parsed.scheme}' is not allowed.", param=param, code="scheme")
    if not parsed.host:
        raise MediaError("The media URL has no host.", param=param, code="invalid_url")
    if parsed.userinfo:
        raise MediaNotAllowedError("Media URLs may not carry user:password@.", param=param, code="userinfo")
    if not host_allowed(parsed.host, policy.allowed_domains):
        raise MediaNotAllowedError(
            f"Host '{parsed.host}' is not in VLMQ_ALLOWED_MEDIA_DOMAINS.", param=param, code="domain_not_allowed"
        )
    ip = literal_address(parsed.host)
    if ip is not None and not policy.allow_private_networks and not address_is_public(ip):
        raise MediaNotAllowedError(
            f"Host '{parsed.host}' is a non-public address.", param=param, code="private_address"
        )
    return parsed


def parse_s3_url(url: str, policy: MediaPolicy, param: str | None) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key), with the bucket allow-list applied."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if not _BUCKET.match(bucket) or not key or "\x00" in key:
        raise MediaError("S3 media URLs take the form s3://bucket/key.", param=param, code="invalid_url")
    if policy.s3_allowed_buckets and bucket not in policy.s3_allowed_buckets:
        raise MediaNotAllowedError(
            f"Bucket '{bucket}' is not in VLMQ_S3_ALLOWED_BUCKETS.", param=param, code="bucket_not_allowed"
        )
    return bucket, key


def parse_file_url(url: str, policy: MediaPolicy, param: str | None) -> str:
    """`file:///path` -> the absolute path, lexically inside the allowed directory.

    Only a lexical check: the worker resolves symlinks on its own disk and
    checks again before it opens anything.
    """
    if not policy.allowed_local_media_path:
        raise MediaNotAllowedError(
            "file:// media is off: set VLMQ_ALLOWED_LOCAL_MEDIA_PATH to allow a directory.",
            param=param,
            code="local_media_disabled",
        )
    rest = url[len("file://") :]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    path = unquote(rest)
    if not path.startswith("/") or "\x00" in path or "?" in rest or "#" in rest:
        raise MediaError("file:// URLs take the form file:///absolute/path.", param=param, code="invalid_url")
    root = posixpath.normpath(policy.allowed_local_media_path)
    normal = posixpath.normpath(path)
    if normal != root and not normal.startswith(root.rstrip("/") + "/"):
        raise MediaNotAllowedError(
            "The file is outside VLMQ_ALLOWED_LOCAL_MEDIA_PATH.", param=param, code="path_not_allowed"
        )
    return normal


def check_data_url(url: str, param: str | None) -> None:
    header = url[5:].split(",", 1)[0]
    if "," not in url or not header.endswith(";base64"):
        raise MediaError(
            "data: URLs must be base64 ('data:<type>;base64,<data>').", param=param, code="invalid_data_url"
        )


def check_media_url(url: str, policy: MediaPolicy, param: str | None) -> str:
    """Submit-time check of any media URL a job names; returns its scheme."""
    scheme = _scheme_of(url)
    if scheme == "data":
        check_data_url(url, param)
    elif scheme in FETCH_SCHEMES:
        parse_fetch_url(url, policy, param)
    elif scheme == "s3":
        parse_s3_url(url, policy, param)
    elif scheme == "file":
        parse_file_url(url, policy, param)
    else:
        shown = f"'{scheme}'" if scheme else "(none)"
        raise MediaNotAllowedError(
            f"URL scheme {shown} is not allowed; use http(s)://, data:, s3:// or file://.", param=param, code="scheme"
        )
    return scheme


def check_request_media(request: JobCreate, settings: Any, modalities: Iterable[str] | None) -> None:
    """Everything about a request's media that needs no fetch: modalities, limits, embeddings, sources.

    `settings` is a SharedSettings (or a subclass); `modalities` is what the
    model accepts, or None while nobody knows.
    """
    parts = request.media_parts()
    if not parts:
        return
    accepted = set(modalities) if modalities is not None else None
    for param, part in parts:
        if accepted is not None and part.modality not in accepted:
            media = ", ".join(sorted(accepted - {"text"})) or "no media"
            raise InvalidRequestError(
                f"The model '{request.model}' does not take {part.modality} input (it takes text and {media}).",
                param=param,
                code="unsupported_modality",
            )

    limits = settings.limit_mm_per_prompt
    for modality, count in request.modality_counts().items():
        limit = limits.get(modality, 0)
        if count > limit:
            raise InvalidRequestError(
                f"At most {limit} {modality} item(s) per request are allowed and this one has {count} "
                f"(VLMQ_LIMIT_MM_PER_PROMPT={format_modality_limits(limits)}).",
                param="messages",
                code="too_many_media_items",
            )

    embeds = [(param, part) for param, part in parts if isinstance(part, ImageEmbedsPart)]
    if embeds and not settings.enable_mm_embeds:
        raise InvalidRequestError(
            "Embedding inputs are off on this service (VLMQ_ENABLE_MM_EMBEDS).",
            param=embeds[0][0],
            code="mm_embeds_disabled",
        )
    if embeds and any(isinstance(part, ImagePart) for _, part in parts):
        # As in vLLM: one request gives a modality either as raw media or as embeddings.
        raise InvalidRequestError(
            "A request may carry images or image_embeds, not both.", param=embeds[0][0], code="mixed_image_inputs"
        )

    frames = request.media_io_kwargs.video.num_frames if request.media_io_kwargs else None
    if frames is not None and frames > settings.video_max_frames:
        raise InvalidRequestError(
            f"num_frames {frames} is over the limit of {settings.video_max_frames} (VLMQ_VIDEO_MAX_FRAMES).",
            param="media_io_kwargs.video.num_frames",
            code="too_many_frames",
        )

    policy = MediaPolicy.from_settings(settings)
    for param, part in parts:
        url = part.url
        if url is not None:
            check_media_url(url, policy, f"{param}.{part.url_param}")
