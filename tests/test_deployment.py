"""The multi-node deployment files against the code: compose's Ray services and the KubeRay example
(`examples/kuberay/raycluster.yaml`) keep token authentication on everywhere, pin evaluators to the GPU workers with
the resource the driver asks for, run the driver's real entry point, and set only environment names the code (or Ray)
reads, with values the settings accept. No Docker engine or Kubernetes runs here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_compose import OTHER_ENV, RAY_AUTH_ENV, SERVICES, _command, _settings_env_names

from darwinfront.cli import build_parser
from darwinfront.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "examples" / "kuberay" / "raycluster.yaml"
[RAYCLUSTER] = [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d and d.get("kind") == "RayCluster"]
HEAD = RAYCLUSTER["spec"]["headGroupSpec"]
[WORKERS] = RAYCLUSTER["spec"]["workerGroupSpecs"]
KNOWN_ENV = _settings_env_names() | OTHER_ENV | RAY_AUTH_ENV


def _containers() -> dict[str, dict]:
    pods = [HEAD["template"]["spec"], WORKERS["template"]["spec"]]
    return {c["name"]: c for pod in pods for c in pod["containers"]}


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def _settings_from(env: dict[str, str], monkeypatch) -> Settings:
    for name, value in env.items():
        if name.startswith("DARWINFRONT_"):
            monkeypatch.setenv(name, value)
    return Settings()


# compose


@pytest.mark.parametrize("service", ["head", "gpu-worker"])
def test_compose_ray_services_use_the_token_secret(service):
    env = SERVICES[service]["environment"]
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"
    assert "ray_auth_token" in SERVICES[service]["secrets"]
    assert "ray_auth_token" in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["secrets"]


def test_compose_workers_offer_the_resource_the_driver_pins_evaluators_to(monkeypatch):
    words = SERVICES["gpu-worker"]["command"]  # the exec form: one word per argument
    [offered] = [json.loads(w.split("=", 1)[1]) for w in words if w.startswith("--resources=")]
    env = {k: str(v) for k, v in SERVICES["head"]["environment"].items()}
    wanted = _settings_from(env, monkeypatch).evaluator_resources
    assert wanted and all(offered.get(name, 0) >= amount for name, amount in wanted.items())
    assert "--num-gpus=0" in _command("head")  # and the head offers no GPU: evaluators never land there


def test_compose_cache_is_on_the_shared_volume_for_driver_and_workers():
    for service in ("head", "gpu-worker"):
        cache = SERVICES[service]["environment"]["DARWINFRONT_CACHE_DIR"]
        assert re.fullmatch(r"\$\{DARWINFRONT_WORKER_CACHE_DIR:-/data/cache\}", cache)
        assert "data:/data" in SERVICES[service]["volumes"]


# KubeRay


def test_kuberay_every_ray_container_gets_token_auth_from_one_secret():
    secrets = set()
    for name, container in _containers().items():
        env = _env(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        secrets.add((ref["name"], ref["key"]))
        assert "value" not in env["RAY_AUTH_TOKEN"], f"{name} holds a literal token"
    assert len(secrets) == 1


def test_kuberay_environment_names_are_read_by_the_code():
    for name, container in _containers().items():
        for variable in _env(container):
            assert variable in KNOWN_ENV, f"{name} sets {variable}, which nothing reads"


def test_kuberay_driver_runs_our_entry_point_against_the_head(monkeypatch):
    driver = _containers()["driver"]
    command = driver["command"]
    assert command[0] == "darwinfront"
    args = build_parser().parse_args(command[1:])
    assert args.func.__name__ == f"cmd_{command[1]}"
    env = {k: v["value"] for k, v in _env(driver).items() if "value" in v}
    gcs = next(p["containerPort"] for p in _containers()["ray-head"]["ports"] if p["name"] == "gcs-server")
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{gcs}"
    settings = _settings_from(env, monkeypatch)
    assert settings.data_dir == Path("/data") and settings.placement_timeout_seconds == 600
    assert "DARWINFRONT_REDIS_URL" in _env(driver)  # from a Secret, as it may hold a password
    session = {m["mountPath"] for m in driver["volumeMounts"]} & {m["mountPath"] for m in
                                                                 _containers()["ray-head"]["volumeMounts"]}
    assert "/tmp/ray" in session  # the driver reaches the head's raylet through its session directory


def test_kuberay_gpu_workers_offer_one_gpu_and_the_evaluator_resource(monkeypatch):
    params = WORKERS["rayStartParams"]
    offered = json.loads(json.loads(params["resources"]))  # KubeRay passes the quoted JSON to `ray start`
    env = {k: v["value"] for k, v in _env(_containers()["driver"]).items() if "value" in v}
    wanted = _settings_from(env, monkeypatch).evaluator_resources
    assert wanted and all(offered.get(name, 0) >= amount for name, amount in wanted.items())
    worker = _containers()["ray-worker"]
    assert int(params["num-gpus"]) == worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert HEAD["rayStartParams"]["num-gpus"] == "0"
    assert _env(worker)["DARWINFRONT_CACHE_DIR"]["value"] == _env(_containers()["driver"])[
        "DARWINFRONT_CACHE_DIR"]["value"]
