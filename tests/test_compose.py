"""compose.yaml is valid Compose and says what the product needs.

The schema is the official Compose Specification, kept in shared/ beside the
repo. Every `VLMQ_` variable the stack sets must be a field of the settings
class of the service that reads it, so a typo fails here rather than being
silently ignored (`extra="ignore"`) in production.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pydantic_settings import BaseSettings

from api_gateway.config import GatewaySettings
from worker.config import WebhookWorkerSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
SCHEMA_FILE = ROOT.parent / "shared" / "compose-spec.json"

# Which settings class reads the environment of a service, by `vlmq` subcommand.
SETTINGS_BY_COMMAND: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "worker": WorkerSettings,
    "webhook-worker": WebhookWorkerSettings,
}

_FROM_LINE = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?\s*$", re.IGNORECASE | re.MULTILINE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_words(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(word) for word in command]


def dockerfile_stages(path: Path) -> dict[str, str]:
    """Stage name -> the stage's own instructions plus those of the stages it is built FROM (comments dropped)."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    matches = list(_FROM_LINE.finditer(text))
    own: dict[str, tuple[str, str]] = {}
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        if match.group(2):
            own[match.group(2).lower()] = (match.group(1).lower(), text[match.start() : end])
    stages = {}
    for name in own:
        chain, current = [], name
        while current in own and current not in chain:
            chain.append(current)
            current = own[current][0]
        stages[name] = "\n".join(own[stage][1] for stage in chain)
    return stages


def seconds(duration: str) -> float:
    parts = _DURATION_PART.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a Compose duration: {duration!r}"
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def test_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    if not SCHEMA_FILE.is_file():
        pytest.skip(f"the Compose Specification schema is not at {SCHEMA_FILE}")
    schema = json.loads(SCHEMA_FILE.read_text())
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_redis_is_durable_and_never_evicts(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    args = command_words(redis)
    options = dict(zip(args[1::2], args[2::2], strict=False)) if args[:1] == ["redis-server"] else {}
    assert options.get("--appendonly") == "yes", "a job accepted with 202 must survive a Redis restart (AOF)"
    assert options.get("--maxmemory-policy") == "noeviction", "Redis must never evict queued jobs or job records"
    assert any(str(v).split(":")[-1] == "/data" for v in redis.get("volumes", [])), "the AOF needs a volume at /data"
    assert "redis-cli" in command_words({"command": redis["healthcheck"]["test"]})


@pytest.mark.parametrize("name", ["gateway", "worker", "webhook-worker"])
def test_waits_for_a_healthy_redis(services: dict[str, dict[str, Any]], name: str) -> None:
    depends_on = services[name].get("depends_on")
    assert isinstance(depends_on, dict), f"{name} must wait for redis with a condition, not a bare list"
    assert depends_on.get("redis", {}).get("condition") == "service_healthy"


def test_gateway_is_published_and_checks_its_health(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    assert command_words(gateway)[:2] == ["vlmq", "gateway"]
    assert any(str(port).split(":")[-1] == "8000" for port in gateway.get("ports", []))
    assert "/healthz" in " ".join(command_words({"command": gateway["healthcheck"]["test"]}))
    assert environment(gateway)["VLMQ_API_KEYS"].startswith("${VLMQ_API_KEYS:?"), "API keys must be required"


def test_worker_reserves_an_nvidia_gpu_and_drains_on_stop(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert command_words(worker)[:2] == ["vlmq", "worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert seconds(worker["stop_grace_period"]) >= 60, "running jobs need time to finish after SIGTERM"


def test_builds_name_existing_dockerfile_targets(services: dict[str, dict[str, Any]]) -> None:
    built = {name: service["build"] for name, service in services.items() if "build" in service}
    assert set(built) >= {"gateway", "worker"}
    for name, build in built.items():
        assert isinstance(build, dict) and build.get("target"), f"{name} must name a Dockerfile target"
        context = ROOT / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: no {dockerfile}"
        stages = dockerfile_stages(dockerfile)
        assert build["target"].lower() in stages, f"{name}: target {build['target']!r} is not one of {sorted(stages)}"


def test_only_the_worker_image_installs_torch(services: dict[str, dict[str, Any]]) -> None:
    stages = dockerfile_stages(ROOT / "Dockerfile")
    gateway = stages[services["gateway"]["build"]["target"].lower()]
    worker = stages[services["worker"]["build"]["target"].lower()]
    webhooks = stages[services["webhook-worker"]["build"]["target"].lower()]
    assert "[worker]" in worker
    for light in (gateway, webhooks):
        assert "[worker]" not in light and "torch" not in light.lower()


@pytest.mark.parametrize("name", ["gateway", "worker"])
def test_images_run_as_non_root(services: dict[str, dict[str, Any]], name: str) -> None:
    stage = dockerfile_stages(ROOT / "Dockerfile")[services[name]["build"]["target"].lower()]
    users = re.findall(r"^\s*USER\s+(\S+)", stage, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), f"the {name} image must not run as root"


def test_every_vlmq_variable_is_a_setting(services: dict[str, dict[str, Any]]) -> None:
    checked = 0
    for name, service in services.items():
        variables = [key for key in environment(service) if key.startswith("VLMQ_")]
        if not variables:
            continue
        words = command_words(service)
        assert words[:1] == ["vlmq"] and words[1:2], f"{name} sets VLMQ_ variables but does not run vlmq"
        settings = SETTINGS_BY_COMMAND[words[1]]
        unknown = [key for key in variables if key.removeprefix("VLMQ_").lower() not in settings.model_fields]
        assert not unknown, f"{name}: {unknown} are not fields of {settings.__name__}"
        checked += len(variables)
    assert checked, "no service sets a VLMQ_ variable"


def test_gateway_and_worker_share_broker_and_models(services: dict[str, dict[str, Any]]) -> None:
    gateway, worker = environment(services["gateway"]), environment(services["worker"])
    for key in ("VLMQ_REDIS_URL", "VLMQ_MODEL"):
        assert gateway[key] == worker[key], f"{key} differs: jobs would go to a queue no worker consumes"
    assert urlsplit(gateway["VLMQ_REDIS_URL"]).hostname in services


def test_minio_serves_s3_with_its_bucket_created_at_start(services: dict[str, dict[str, Any]]) -> None:
    minio = services["minio"]
    assert str(minio["image"]).startswith("minio/minio")
    assert command_words(minio)[:2] == ["server", "/data"]
    assert any(str(v).split(":")[-1] == "/data" for v in minio.get("volumes", [])), "objects need a volume"
    assert "mc" in command_words({"command": minio["healthcheck"]["test"]})
    assert environment(minio)["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD:?"), "no default password"

    init = services["minio-init"]
    assert str(init["image"]).startswith("minio/mc")
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert str(init.get("restart")) == "no", "bucket creation is one-shot"
    script = " ".join(command_words(init))
    assert "mc mb --ignore-existing" in script and "http://minio:9000" in script

    worker, gateway = services["worker"], services["gateway"]
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    worker_env = environment(worker)
    assert urlsplit(worker_env["VLMQ_S3_ENDPOINT_URL"]).hostname == "minio"
    assert worker_env["VLMQ_S3_ACCESS_KEY_ID"] == environment(minio)["MINIO_ROOT_USER"]
    assert worker_env["VLMQ_S3_SECRET_ACCESS_KEY"] == environment(minio)["MINIO_ROOT_PASSWORD"]
    # The bucket the init job creates is the one both services allow.
    bucket = environment(init)["MEDIA_BUCKET"]
    assert worker_env["VLMQ_S3_ALLOWED_BUCKETS"] == environment(gateway)["VLMQ_S3_ALLOWED_BUCKETS"] == bucket
