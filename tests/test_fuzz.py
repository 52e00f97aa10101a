"""A bounded schemathesis run against the API's own OpenAPI schema, on the ASGI app and a real embedded Redis.

Each operation gets schemathesis' examples, coverage and fuzzing phases (at most `MAX_EXAMPLES` random cases),
sent with a valid API key. Every response must be a non-5xx that the schema documents: status code, content
type, headers and body (errors in the one `ErrorBody` shape); schema-invalid input must be refused with a
4xx, and a request without the key must be refused too.
"""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest
import redis
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from darwinfront.core import methods
from darwinfront.core.settings import Settings
from darwinfront.core.store import JobStore, connect
from service.app import create_app
from service.embedded import EmbeddedRedis

pytest_plugins = ["service_fixtures"]

SEEDED: dict[str, str] = {}
CANDIDATE = "t0-g1-c0"
MAX_EXAMPLES = 25  # random cases per operation, after the deterministic examples and coverage cases
CHECKS = [
    not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
    response_schema_conformance, negative_data_rejection, ignored_auth,
]

# schemathesis needs the app when it collects the tests, before any fixture runs: build it now and point it at
# the session's real Redis in `fuzz_settings`, before its lifespan starts (on the first call).
APP = create_app(Settings(redis_url="redis://unused"))
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP  # what `from_asgi` does, without starting the lifespan now


@pytest.fixture(scope="module")
def fuzz_settings(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Settings]:
    """Settings on the session Redis (its own logical database, flushed before and after), installed in `APP`."""
    from service_fixtures import API_KEY, TENANT  # after pytest_plugins registered it (assertion rewriting)

    tmp = tmp_path_factory.mktemp("fuzz")
    for name in ("data", "models", "corpora"):
        (tmp / name).mkdir()
    settings = Settings(
        redis_url=f"{redis_server.url}?db=3", data_dir=tmp / "data", cache_dir=tmp / "cache",
        api_keys_file=tmp / "api_keys.json", api_keys={API_KEY: TENANT},
        allowed_model_roots=[tmp / "models"], allowed_data_roots=[tmp / "corpora"],
        max_active_jobs_per_tenant=5,
    )
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    _seed(JobStore(connect(settings.redis_url)), settings, TENANT)
    APP.state.settings = settings
    yield settings
    shutdown_lifespans()  # schemathesis started the app's lifespan on its first call
    client.flushdb()
    client.close()


def _seed(store: JobStore, settings: Settings, tenant: str) -> None:
    """One finished job with everything a job produces, so positive cases read real documents."""
    job_id = store.create(tenant, {"model": {"source": "builtin:tiny-llama"}}, planned=3).id
    store.claim("fuzz-driver", timeout=0)
    store.set_progress(job_id, {"generation": 1, "generations": 1, "evaluations": 3, "planned": 3})
    store.set_front(job_id, [{"candidate_id": CANDIDATE, "objectives": {"kl": 0.5, "params": 0.5}, "target": 0.5,
                              "generation": 1}], objectives=methods.get("structured_prune").stored_objectives())
    store.append_event(job_id, "generation", {"generation": 1})
    store.put_result(job_id, CANDIDATE, {"heads": [2, 1], "channels": [16, 8]})
    (settings.artifacts_dir / job_id).mkdir(parents=True)
    (settings.artifacts_dir / job_id / "c0.tar.gz").write_bytes(b"\x1f\x8b archive")
    store.put_artifact(job_id, CANDIDATE, {"path": f"{job_id}/c0.tar.gz", "size": 10, "sha256": ""})
    store.set_status(job_id, "succeeded")
    SEEDED["job_id"] = job_id


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_every_operation_answers_as_documented(case: schemathesis.Case, fuzz_settings: Settings) -> None:
    key = next(iter(fuzz_settings.api_keys))
    if case.meta.generation.mode is GenerationMode.POSITIVE and case.path_parameters:
        # Random ids only ever find nothing (404); valid cases address the seeded job and candidate instead.
        case.path_parameters = {**case.path_parameters, **SEEDED, "candidate_id": CANDIDATE}
        case.path_parameters = {name: case.path_parameters[name] for name in ("job_id", "candidate_id")
                                if name in case.operation.path}
    case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS)
