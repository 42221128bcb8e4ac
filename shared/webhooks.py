"""Webhook signing and verification, as the Standard Webhooks spec defines them.

Pure functions, no I/O: the webhook worker signs with them, and receivers
written in Python may verify with them (or with the `standardwebhooks`
library; the tests use the library, so the two cannot drift apart).

A message is signed with HMAC-SHA256 over `"{webhook-id}.{webhook-timestamp}.{body}"`
and sent as `webhook-signature: v1,<base64>`. A tenant holding several
secrets (rotation) gets one signature per secret, space-separated, so a
receiver holding either secret accepts the message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping

from shared.schemas import WebhookEvent

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE = 5 * 60


class WebhookVerificationError(ValueError):
    pass


def decode_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("webhook secrets are written whsec_<base64>")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook secret is not valid base64 after whsec_") from None
    # Below 128 bits an HMAC key can be guessed offline from one signed message.
    if len(key) < 16:
        raise ValueError("webhook secrets need at least 16 bytes of key (24 base64 characters)")
    return key


def parse_tenant_secrets(entries: Iterable[str]) -> dict[str, list[bytes]]:
    """`tenant:whsec_…` entries -> tenant -> keys, in the order given (rotation keeps both)."""
    out: dict[str, list[bytes]] = {}
    for entry in entries:
        tenant, sep, secret = entry.partition(":")
        if not sep or not tenant or not secret:
            raise ValueError("VLMQ_WEBHOOK_SECRETS entries are tenant:whsec_<base64>")
        out.setdefault(tenant, []).append(decode_secret(secret))
    return out


def message_id(job_id: str, event: WebhookEvent) -> str:
    """The `webhook-id` of one event of one job: the same on every attempt and redelivery."""
    return f"msg_{job_id}_{event.value.removeprefix('job.')}"


def sign(keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: one `v1,<base64>` per key."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        f"{SIGNATURE_VERSION},{base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()}"
        for key in keys
    )


def signed_headers(keys: Iterable[bytes], msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(now if now is not None else time.time())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(keys, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(
    key: bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Raise WebhookVerificationError unless `body` was signed with `key` recently."""
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (lowered.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = now if now is not None else time.time()
    # Both directions: an old message may be a replay, a future one a forgery kept for later.
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance")
    expected = sign([key], msg_id, timestamp, body).split(",", 1)[1]
    for candidate in signatures.split(" "):
        version, _, value = candidate.partition(",")
        if version == SIGNATURE_VERSION and hmac.compare_digest(value, expected):
            return
    raise WebhookVerificationError("no signature matches")
