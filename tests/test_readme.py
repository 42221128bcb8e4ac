"""The README is the settings reference: every setting any service reads is in it."""

from __future__ import annotations

import pytest

from api_gateway.config import GatewaySettings
from shared.settings import SharedSettings
from tests.conftest import REPO
from worker.config import WebhookWorkerSettings, WorkerSettings


@pytest.mark.parametrize("settings", [SharedSettings, GatewaySettings, WorkerSettings, WebhookWorkerSettings])
def test_every_setting_is_documented(settings):
    readme = (REPO / "README.md").read_text()
    missing = [f"VLMQ_{name.upper()}" for name in settings.model_fields if f"VLMQ_{name.upper()}" not in readme]
    assert not missing, f"document these in README.md's settings table: {missing}"


def test_readme_names_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "scripts/run" in readme and "scripts/test" in readme
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()
