"""The one place media bytes come from: data URLs, allow-listed HTTP(S), S3 and a local directory.

Security decisions, each against a known attack:
- One parser (`httpx.URL`, in `shared.media_policy`) for the check and the
  connection.
- The host is resolved once; every address it resolves to must be public
  (unless VLMQ_MEDIA_ALLOW_PRIVATE_NETWORKS), and the connection goes to
  the address that was checked, with the original name as Host and TLS
  SNI: a DNS answer that changes between check and connect (rebinding)
  cannot redirect the fetch. Addresses written as numbers never reach the
  resolver at all.
- Redirects are not followed unless VLMQ_MEDIA_ALLOW_REDIRECTS; then each
  hop is checked like the first (scheme, allow-list, addresses), at most
  `MAX_REDIRECTS` of them: a public host could otherwise bounce us to an
  internal one.
- Size is capped while streaming (a lying or missing Content-Length does
  not help), time by a deadline over the whole fetch including redirects.
- Local files: the path is resolved (symlinks, `..`) and must stay under
  VLMQ_ALLOWED_LOCAL_MEDIA_PATH; the opened descriptor is checked again, so
  swapping a symlink between the check and the open does not escape.
- Only transient failures (timeouts, connection errors, 5xx) are retried.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.errors import MediaError, MediaFetchTransientError, MediaNotAllowedError
from shared.media_policy import (
    Address,
    MediaPolicy,
    address_is_public,
    literal_address,
    parse_fetch_url,
    parse_file_url,
    parse_s3_url,
)

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
# Comma-separated base64 JPEG frames, as vLLM takes a video given frame by frame.
FRAME_LIST_TYPES = ("video/jpeg",)

Resolver = Callable[..., list[Any]]

__all__ = ["Address", "FetchLimits", "Fetched", "MediaFetcher", "S3Options", "address_is_public", "decode_base64"]


@dataclass(frozen=True)
class FetchLimits:
    timeout: float
    max_bytes: int


@dataclass
class Fetched:
    data: bytes
    media_type: str | None = None
    # Set for a `data:video/jpeg;base64,<frame>,<frame>,...` frame list.
    frames: list[bytes] | None = None


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None


def _too_large(max_bytes: int, param: str | None) -> MediaError:
    return MediaError(f"Media is larger than {max_bytes} bytes.", param=param, code="media_too_large")


def decode_base64(payload: str, max_bytes: int, param: str | None, code: str = "invalid_base64") -> bytes:
    """Strict base64 (no stray characters), refused before decoding when too large."""
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise _too_large(max_bytes, param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("The media is not valid base64.", param=param, code=code) from None


def decode_data_url(url: str, max_bytes: int, param: str | None, *, frame_lists: bool = False) -> Fetched:
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(
            "data: URLs must be base64 ('data:<type>;base64,<data>').", param=param, code="invalid_data_url"
        )
    media_type = header.split(";", 1)[0].strip().lower() or None
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise _too_large(max_bytes, param)
    if frame_lists and media_type in FRAME_LIST_TYPES:
        frames = [decode_base64(chunk, max_bytes, param, "invalid_data_url") for chunk in payload.split(",")]
        return Fetched(data=b"", media_type=media_type, frames=frames)
    return Fetched(decode_base64(payload, max_bytes, param, "invalid_data_url"), media_type)


@dataclass
class MediaFetcher:
    policy: MediaPolicy
    limits: dict[str, FetchLimits]
    allow_redirects: bool = False
    retries: int = 2
    backoff: float = 0.25
    s3: S3Options = field(default_factory=S3Options)
    transport: httpx.BaseTransport | None = None
    # The DNS boundary: injectable so tests can make any name resolve anywhere.
    resolver: Resolver = socket.getaddrinfo

    def __post_init__(self) -> None:
        self._client = httpx.Client(follow_redirects=False, transport=self.transport, trust_env=False)
        self._s3_clients: dict[float, Any] = {}
        self._s3_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> MediaFetcher:
        secret = settings.s3_secret_access_key
        options: dict[str, Any] = {
            "policy": MediaPolicy.from_settings(settings),
            "limits": {
                "image": FetchLimits(settings.image_fetch_timeout, settings.media_max_bytes),
                "video": FetchLimits(settings.video_fetch_timeout, settings.video_max_bytes),
                "audio": FetchLimits(settings.audio_fetch_timeout, settings.media_max_bytes),
            },
            "allow_redirects": settings.media_allow_redirects,
            "retries": settings.media_fetch_retries,
            "s3": S3Options(
                endpoint_url=settings.s3_endpoint_url,
                region=settings.s3_region,
                access_key_id=settings.s3_access_key_id,
                secret_access_key=secret.get_secret_value() if secret is not None else None,
            ),
        }
        options.update(overrides)
        return cls(**options)

    def close(self) -> None:
        self._client.close()

    def limits_for(self, modality: str) -> FetchLimits:
        return self.limits.get(modality) or self.limits["image"]

    def fetch(self, url: str, *, modality: str = "image", param: str | None = None) -> Fetched:
        limits = self.limits_for(modality)
        scheme = url.partition(":")[0].lower()
        if scheme == "data":
            return decode_data_url(url, limits.max_bytes, param, frame_lists=modality == "video")
        if scheme == "file":
            return Fetched(self._read_file(url, limits, param))
        attempt = 0
        while True:
            try:
                if scheme == "s3":
                    return Fetched(self._fetch_s3(url, limits, param))
                return self._fetch_http(url, limits, param)
            except MediaFetchTransientError:
                if attempt >= self.retries:
                    raise
                time.sleep(self.backoff * 2**attempt)
                attempt += 1

    def decode_base64(self, payload: str, *, modality: str, param: str | None) -> bytes:
        return decode_base64(payload, self.limits_for(modality).max_bytes, param)

    # --- http(s) ---------------------------------------------------------------

    def _resolve(self, host: str, port: int, param: str | None) -> Address:
        literal = literal_address(host)
        if literal is not None:
            addresses: list[Address] = [literal]
        else:
            try:
                infos = self.resolver(host, port, type=socket.SOCK_STREAM)
                addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
            except (OSError, UnicodeError, ValueError):
                raise MediaError(f"Host '{host}' does not resolve.", param=param, code="dns_failed") from None
            if not addresses:
                raise MediaError(f"Host '{host}' does not resolve.", param=param, code="dns_failed")
        if not self.policy.allow_private_networks:
            # All of them, not just the first: the resolver's order is not ours to trust.
            for ip in addresses:
                if not address_is_public(ip):
                    raise MediaNotAllowedError(
                        f"Host '{host}' resolves to a non-public address.", param=param, code="private_address"
                    )
        return addresses[0]

    def _fetch_http(self, url: str, limits: FetchLimits, param: str | None) -> Fetched:
        deadline = time.monotonic() + limits.timeout
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            parsed = parse_fetch_url(current, self.policy, param)
            location = self._get(parsed, limits, deadline, param)
            if isinstance(location, Fetched):
                return location
            if not self.allow_redirects:
                raise MediaNotAllowedError(
                    "The media URL redirects, and redirects are not followed (VLMQ_MEDIA_ALLOW_REDIRECTS).",
                    param=param,
                    code="redirect",
                )
            try:
                current = str(parsed.join(location)) if "\\" not in location else location
            except Exception:
                raise MediaError("The media host sent a malformed redirect.", param=param, code="invalid_url") from None
        raise MediaNotAllowedError(
            f"The media URL redirects more than {MAX_REDIRECTS} times.", param=param, code="too_many_redirects"
        )

    def _get(self, parsed: httpx.URL, limits: FetchLimits, deadline: float, param: str | None) -> Fetched | str:
        """One hop: the body, or the Location of a redirect."""
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        ip = self._resolve(parsed.host, port, param)
        pinned = parsed.copy_with(host=str(ip))
        host_header = parsed.host if parsed.port is None else f"{parsed.host}:{parsed.port}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out(limits, param)
        try:
            with self._client.stream(
                "GET",
                pinned,
                headers={"Host": host_header, "Accept": "image/*,video/*,audio/*,*/*;q=0.5"},
                extensions={"sni_hostname": parsed.host},
                timeout=remaining,
            ) as response:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise MediaError("The media host redirects nowhere.", param=param, code="invalid_url")
                    return location
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
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise _too_large(limits.max_bytes, param)
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise _too_large(limits.max_bytes, param)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("deadline")
                media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower() or None
                return Fetched(bytes(body), media_type)
        except httpx.TimeoutException:
            raise self._timed_out(limits, param) from None
        except httpx.TransportError as exc:
            raise MediaFetchTransientError(
                f"Could not connect to the media host ({type(exc).__name__}).", param=param, code="connect_error"
            ) from None

    @staticmethod
    def _timed_out(limits: FetchLimits, param: str | None) -> MediaFetchTransientError:
        return MediaFetchTransientError(
            f"Fetching the media timed out after {limits.timeout:g}s.", param=param, code="timeout"
        )

    # --- s3:// -----------------------------------------------------------------

    def _s3_client(self, timeout: float) -> Any:
        with self._s3_lock:
            client = self._s3_clients.get(timeout)
            if client is None:
                import boto3
                from botocore.config import Config

                options: dict[str, Any] = {
                    "config": Config(
                        connect_timeout=timeout,
                        read_timeout=timeout,
                        retries={"max_attempts": 1, "mode": "standard"},  # retried here, by kind
                    )
                }
                if self.s3.endpoint_url:
                    options["endpoint_url"] = self.s3.endpoint_url
                if self.s3.region:
                    options["region_name"] = self.s3.region
                if self.s3.access_key_id and self.s3.secret_access_key:
                    options["aws_access_key_id"] = self.s3.access_key_id
                    options["aws_secret_access_key"] = self.s3.secret_access_key
                client = boto3.session.Session().client("s3", **options)
                self._s3_clients[timeout] = client
            return client

    def _fetch_s3(self, url: str, limits: FetchLimits, param: str | None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = parse_s3_url(url, self.policy, param)
        deadline = time.monotonic() + limits.timeout
        try:
            obj = self._s3_client(limits.timeout).get_object(Bucket=bucket, Key=key)
            if int(obj.get("ContentLength") or 0) > limits.max_bytes:
                obj["Body"].close()
                raise _too_large(limits.max_bytes, param)
            body = bytearray()
            with obj["Body"] as stream:
                while chunk := stream.read(CHUNK):
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise _too_large(limits.max_bytes, param)
                    if time.monotonic() > deadline:
                        raise self._timed_out(limits, param)
            return bytes(body)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(error.get("Code", ""))
            if status >= 500 or code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"):
                raise MediaFetchTransientError(
                    f"S3 answered {code or status}.", param=param, code="upstream_error"
                ) from None
            if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
                raise MediaError(f"s3://{bucket}/{key} does not exist.", param=param, code="s3_not_found") from None
            if status == 403 or code in ("AccessDenied", "403"):
                raise MediaError(
                    f"Access to s3://{bucket}/{key} is denied.", param=param, code="s3_access_denied"
                ) from None
            raise MediaError(f"S3 refused the request ({code or status}).", param=param, code="s3_error") from None
        except BotoCoreError as exc:
            # Connection failures and timeouts; credentials missing is the operator's to fix, but
            # looks the same to the caller: the media could not be read now.
            raise MediaFetchTransientError(
                f"Could not reach S3 ({type(exc).__name__}).", param=param, code="connect_error"
            ) from None

    # --- file:// ---------------------------------------------------------------

    def _read_file(self, url: str, limits: FetchLimits, param: str | None) -> bytes:
        lexical = parse_file_url(url, self.policy, param)
        not_found = MediaError(
            "No such file under the allowed local media directory.", param=param, code="file_not_found"
        )
        try:
            root = Path(self.policy.allowed_local_media_path).resolve(strict=True)
            real = Path(lexical).resolve(strict=True)
        except (OSError, RuntimeError):
            raise not_found from None
        escaped = MediaNotAllowedError(
            "The file is outside VLMQ_ALLOWED_LOCAL_MEDIA_PATH.", param=param, code="path_not_allowed"
        )
        if not real.is_relative_to(root):
            raise escaped
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            raise not_found from None
        try:
            # What was opened, not what was checked: a path swapped in between cannot escape.
            opened = Path(f"/proc/self/fd/{fd}")
            if opened.exists() and not Path(os.readlink(opened)).is_relative_to(root):
                raise escaped
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MediaError("The local media path is not a regular file.", param=param, code="not_a_file")
            if info.st_size > limits.max_bytes:
                raise _too_large(limits.max_bytes, param)
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = handle.read(limits.max_bytes + 1)
            if len(data) > limits.max_bytes:
                raise _too_large(limits.max_bytes, param)
            return data
        finally:
            os.close(fd)
