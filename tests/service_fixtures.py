"""Pytest fixtures for the service: a real embedded Redis per session, a clean store per test, an API client.

Use from a test module with `pytest_plugins = ["service_fixtures"]` (tests/ is on sys.path) or a conftest. Two API keys
are known: `API_KEY` (tenant `alpha`) and `OTHER_KEY` (tenant `beta`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from darwinfront.core.settings import Settings
from darwinfront.core.store import JobStore
from service.app import create_app
from service.embedded import EmbeddedRedis

API_KEY = "df_test_alpha_8c1f0e77a2b94d3c"
OTHER_KEY = "df_test_beta_51d9a0e3f6c24b17"
TENANT = "alpha"
OTHER_TENANT = "beta"


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for `key`."""
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One real Redis server (embedded, persistence on) for the whole test session."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis-data")) as server:
        yield server


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client on an emptied database; emptied again afterwards."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    """A job store on a clean database."""
    return JobStore(redis_client)


@pytest.fixture
def service_settings(tmp_path: Path, redis_server: EmbeddedRedis) -> Settings:
    """Settings on the session Redis, with private allowed roots under `tmp_path` and the two test keys."""
    roots = {name: tmp_path / name for name in ("data", "models", "corpora")}
    for folder in roots.values():
        folder.mkdir()
    return Settings(
        redis_url=redis_server.url,
        data_dir=roots["data"],
        cache_dir=tmp_path / "cache",
        api_keys_file=tmp_path / "api_keys.json",
        api_keys={API_KEY: TENANT, OTHER_KEY: OTHER_TENANT},
        allowed_model_roots=[roots["models"]],
        allowed_data_roots=[roots["corpora"]],
    )


@pytest.fixture
def other_headers() -> dict[str, str]:
    """Headers authenticating as the other tenant (`beta`)."""
    return bearer(OTHER_KEY)


@pytest.fixture
def api_client(service_settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    """A TestClient of the app (lifespan run) sending `API_KEY`; the database is clean."""
    with TestClient(create_app(service_settings), headers=bearer(API_KEY)) as client:
        yield client
