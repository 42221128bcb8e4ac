"""Our signing, checked by the `standardwebhooks` library; our verifier, checked against it."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from shared.schemas import WebhookEvent
from shared.settings import SharedSettings
from shared.webhooks import (
    WebhookVerificationError as OurVerificationError,
)
from shared.webhooks import (
    decode_secret,
    message_id,
    parse_tenant_secrets,
    signed_headers,
    verify,
)
from tests.webhook_receiver import SECRET_A, SECRET_B

BODY = b'{"type":"job.completed","timestamp":"2025-01-01T00:00:00Z","data":{"id":"job_1"}}'


def test_the_library_accepts_what_we_sign():
    headers = signed_headers([decode_secret(SECRET_A)], "msg_job_1_completed", BODY)
    assert Webhook(SECRET_A).verify(BODY, headers) == {
        "type": "job.completed",
        "timestamp": "2025-01-01T00:00:00Z",
        "data": {"id": "job_1"},
    }
    assert headers["webhook-signature"].startswith("v1,")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_B).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(BODY.replace(b"job_1", b"job_2"), headers)


def test_the_signature_matches_the_library_byte_for_byte():
    now = 1_700_000_000
    ours = signed_headers([decode_secret(SECRET_A)], "msg_x", BODY, now=now)["webhook-signature"]
    theirs = Webhook(SECRET_A).sign("msg_x", datetime.fromtimestamp(now, UTC), BODY.decode())
    assert ours == theirs


def test_rotation_signs_with_every_secret_of_the_tenant():
    keys = parse_tenant_secrets([f"acme:{SECRET_A}", f"acme:{SECRET_B}", f"other:{SECRET_B}"])
    assert [len(k) for k in keys["acme"]] == [28, 28] and len(keys["other"]) == 1
    headers = signed_headers(keys["acme"], "msg_y", BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET_A, SECRET_B):  # a receiver holding either one accepts it
        Webhook(secret).verify(BODY, headers)


def test_our_verifier_agrees_with_the_library():
    key = decode_secret(SECRET_A)
    headers = signed_headers([key], "msg_z", BODY)
    verify(key, headers, BODY)
    with pytest.raises(OurVerificationError, match="no signature"):
        verify(decode_secret(SECRET_B), headers, BODY)
    with pytest.raises(OurVerificationError, match="no signature"):
        verify(key, headers, BODY + b" ")
    with pytest.raises(OurVerificationError, match="tolerance"):
        verify(key, headers, BODY, now=time.time() + 3600)
    with pytest.raises(OurVerificationError, match="missing"):
        verify(key, {"webhook-id": "x"}, BODY)


@pytest.mark.parametrize(
    "entry, words",
    [
        ("acme:secret", "whsec_"),
        ("acme:whsec_!!!", "base64"),
        ("acme:whsec_c2hvcnQ=", "16 bytes"),
        ("whsec_c2hvcnQ=", "tenant:"),
    ],
)
def test_bad_secrets_fail_at_start(entry, words):
    with pytest.raises(ValueError, match=words):
        SharedSettings(webhook_secrets=entry)


def test_message_ids_are_stable_per_job_and_event():
    assert message_id("job_1", WebhookEvent.completed) == "msg_job_1_completed"
    assert message_id("job_1", WebhookEvent.completed) != message_id("job_1", WebhookEvent.started)
