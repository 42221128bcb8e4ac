"""schemathesis against the gateway's own OpenAPI schema, over real HTTP, on
the whole stack (gateway, workers, Redis): whatever it sends, the gateway
answers without a 5xx and without hanging."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from api_gateway.app import create_app
from api_gateway.config import GatewaySettings
from tests.conftest import KEYS, MODEL

pytestmark = pytest.mark.slow


def gateway_settings(redis_url: str) -> GatewaySettings:
    """As the stack's gateway is configured (only the schema is taken from it)."""
    return GatewaySettings(
        redis_url=redis_url,
        api_keys=[f"{t}:{k}" for t, k in KEYS.items()],
        model=MODEL,
    )


@pytest.fixture(scope="module")
def gateway_url(stack):
    return stack.base_url


# The schema the app serves; building it touches no Redis.
schema = schemathesis.openapi.from_dict(create_app(gateway_settings("redis://127.0.0.1:1/0")).openapi())


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_no_hang(case, gateway_url):
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    started = time.monotonic()
    response = case.call(base_url=gateway_url, headers=headers, timeout=10)
    case.validate_response(response, checks=[not_a_server_error])
    assert time.monotonic() - started < 5
