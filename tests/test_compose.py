"""No Docker engine runs here, so the compose file is checked against the code it starts."""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from darwinfront.cli import build_parser
from darwinfront.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
# Variables the code reads outside `Settings`.
OTHER_ENV = {"DARWINFRONT_CACHE_DIR", "RAY_ADDRESS", "HF_HOME", "REDIS_URL"}
RAY_AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}  # Ray reads them (token authentication)


def _command(service: str) -> str:
    command = SERVICES[service]["command"]
    return " ".join(command) if isinstance(command, list) else command


def _settings_env_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"DARWINFRONT_{name.upper()}")
        alias = field.validation_alias
        names.update(getattr(alias, "choices", []) or [])
    return names


def test_services_present():
    assert {"redis", "api", "head", "gpu-worker"} <= set(SERVICES)


def test_redis_persists_and_is_health_checked():
    assert "--appendonly yes" in _command("redis")
    assert SERVICES["redis"]["healthcheck"]["test"]
    assert SERVICES["api"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_api_command_names_the_app_factory():
    words = shlex.split(_command("api"))
    assert words[0] == "uvicorn" and "--factory" in words
    module, attr = words[1].split(":")
    factory = getattr(importlib.import_module(module), attr)
    assert callable(factory)


def test_head_runs_a_ray_head_and_our_driver():
    command = _command("head")
    assert "ray start --head" in command
    entry = re.search(r"darwinfront (\w+)", command).group(1)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["darwinfront"] == "darwinfront.cli:main"
    args = build_parser().parse_args([entry])
    assert args.func.__name__ == f"cmd_{entry}"
    port = re.search(r"--port=(\d+)", command).group(1)
    assert f"--address=head:{port}" in _command("gpu-worker")


def test_gpu_workers_reserve_devices():
    devices = SERVICES["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("service", ["api", "head", "gpu-worker"])
def test_environment_names_are_read_by_the_code(service):
    known = _settings_env_names() | OTHER_ENV | RAY_AUTH_ENV
    for name in SERVICES[service].get("environment", {}):
        assert name in known, f"{service} sets {name}, which nothing reads"


@pytest.mark.parametrize("service", ["api", "head", "gpu-worker"])
def test_dockerfiles_exist_and_copy_real_paths(service):
    dockerfile = ROOT / SERVICES[service]["build"]["dockerfile"]
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"


def test_compose_env_values_parse_as_settings(monkeypatch, tmp_path):
    for name, value in SERVICES["api"]["environment"].items():
        if name.startswith("DARWINFRONT_") and "${" not in str(value):
            monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("DARWINFRONT_API_KEYS", '{"a-real-looking-key-0123456789": "team"}')
    settings = Settings()
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.allowed_model_roots == [Path("/models")]
