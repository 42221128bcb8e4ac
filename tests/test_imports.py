"""The gateway and the contract must never pull in torch or transformers."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import importlib, pkgutil, sys

class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "PIL", "av", "numpy"):
            raise ImportError(f"forbidden import: {name}")
        return None

sys.meta_path.insert(0, Forbid())
import api_gateway, shared
for package in (shared, api_gateway):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)

from api_gateway.app import create_app
from api_gateway.config import GatewaySettings
create_app(GatewaySettings(api_keys=["t:k"]))
print("clean", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
"""


def test_gateway_and_shared_import_without_heavy_libraries():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean []"


def test_cli_help_is_light():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "shared.cli", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "torch" not in out.stderr and "transformers" not in out.stderr


WEBHOOK_PROBE = """
import sys

class Forbid:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "PIL", "av", "numpy"):
            raise ImportError(f"forbidden import: {name}")
        return None

sys.meta_path.insert(0, Forbid())
import shared.cli, worker.webhooks, worker.netguard, worker.config
worker.config.WebhookWorkerSettings()
print("clean")
"""


def test_webhook_worker_imports_without_torch():
    out = subprocess.run([sys.executable, "-c", WEBHOOK_PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
