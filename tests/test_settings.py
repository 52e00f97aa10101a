"""Settings, API keys, settings-dependent spec checks and the embedded Redis."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from darwinfront.core.errors import InvalidSpec
from darwinfront.core.methods import parse_spec
from darwinfront.core.settings import Settings, get_settings
from service.app import create_app
from service.auth import KeyRing, generate_key, hash_key, tenant_for
from service.embedded import EmbeddedRedis, EmbeddedRedisError, redis_url
from service.validation import check_data_source, check_model_source, validate_spec

pytest_plugins = ["service_fixtures"]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("DARWINFRONT_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("DARWINFRONT_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_settings_read_the_prefixed_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("DARWINFRONT_MAX_PAGE_SIZE", "7")
    clean_env.setenv("DARWINFRONT_API_KEYS", json.dumps({"df_k_0123456789": "team-a"}))
    clean_env.setenv("DARWINFRONT_ALLOWED_MODEL_ROOTS", json.dumps([str(tmp_path / "m")]))
    settings = Settings()
    assert settings.max_page_size == 7 and settings.api_keys == {"df_k_0123456789": "team-a"}
    assert settings.allowed_model_roots == [tmp_path / "m"]
    assert settings.data_dir == tmp_path / "data" and settings.keys_file == tmp_path / "data" / "api_keys.json"
    assert settings.allowed_data_roots == [tmp_path / "data" / "data", settings.cache_dir, Path.cwd()]
    assert get_settings() is get_settings()


def test_redis_url_falls_back_to_plain_redis_url(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings().redis_url is None and redis_url(Settings()) is None
    clean_env.setenv("REDIS_URL", "redis://plain:6379/0")
    assert Settings().redis_url == "redis://plain:6379/0"
    clean_env.setenv("DARWINFRONT_REDIS_URL", "redis://prefixed:6379/1")
    assert redis_url(Settings()) == "redis://prefixed:6379/1"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DARWINFRONT_API_KEYS", '{"changeme": "alpha"}', "placeholder key"),
        ("DARWINFRONT_API_KEYS", '{"": "alpha"}', "placeholder key"),
        ("DARWINFRONT_API_KEYS", '{"Secret": "alpha"}', "placeholder key"),
        ("DARWINFRONT_API_KEYS", '{"df_k_0123456789": " "}', "empty tenant"),
        ("REDIS_URL", "redis://:changeme@redis:6379/0", "placeholder password"),
    ],
)
def test_placeholder_secrets_stop_the_start(clean_env: pytest.MonkeyPatch, name: str, value: str, message: str):
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()
    with pytest.raises(ValidationError, match=message):
        create_app()


def test_generated_keys_are_stored_hashed_and_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", api_keys={"df_env_key_0123": "env-team"})
    first, second = generate_key(settings), generate_key(settings, tenant="team-b")
    text = settings.keys_file.read_text()
    assert first not in text and second not in text
    assert json.loads(text) == {"tenants": {"local": [hash_key(first)], "team-b": [hash_key(second)]}}
    assert stat.S_IMODE(settings.keys_file.stat().st_mode) == 0o600
    assert tenant_for(first, settings) == "local" and tenant_for(second, settings) == "team-b"
    assert tenant_for("df_env_key_0123", settings) == "env-team"
    assert tenant_for(first + "x", settings) is None and tenant_for("", settings) is None
    with pytest.raises(ValueError, match="tenant"):
        generate_key(settings, tenant="no spaces")


def test_keyring_sees_keys_added_after_it_started(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    ring, cached = KeyRing(settings, recheck_seconds=0), KeyRing(settings, recheck_seconds=3600)
    assert ring.tenant_for("df_anything") is None and cached.tenant_for("df_anything") is None
    key = generate_key(settings, tenant="late")
    assert ring.tenant_for(key) == "late"
    assert cached.tenant_for(key) is None  # not looked at again within the hour


def test_a_malformed_keys_file_is_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    settings.keys_file.write_text(json.dumps({"tenants": {"a": ["not-a-hash"]}}))
    with pytest.raises(ValueError, match="sha256"):
        tenant_for("df_whatever", settings)


@pytest.fixture
def roots(tmp_path: Path) -> Settings:
    for name in ("models", "corpora", "outside"):
        (tmp_path / name).mkdir()
    return Settings(
        data_dir=tmp_path / "data", allowed_model_roots=[tmp_path / "models"],
        allowed_data_roots=[tmp_path / "corpora"], max_evaluations_per_job=1000,
    )


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_model_sources(roots: Settings, tmp_path: Path) -> None:
    inside = _model_dir(tmp_path / "models" / "llama")
    check_model_source(str(inside), roots)
    check_model_source("builtin:tiny-llama", roots)
    check_model_source("meta-llama/Llama-3.2-1B", roots)
    outside = _model_dir(tmp_path / "outside" / "llama")
    cases = {
        str(outside): "outside the allowed directories",
        str(tmp_path / "models" / "missing"): "does not exist",
        str(tmp_path / "models" / ".." / "outside" / "llama"): "must not contain '..'",
        "not a model": "neither a local model directory",
        "org/name/extra": "neither a local model directory",
    }
    (tmp_path / "models" / "no-config").mkdir()
    cases[str(tmp_path / "models" / "no-config")] = "no config.json"
    (tmp_path / "models" / "escape").symlink_to(outside)
    cases[str(tmp_path / "models" / "escape")] = "outside the allowed directories"
    for source, message in cases.items():
        with pytest.raises(InvalidSpec, match=message) as caught:
            check_model_source(source, roots)
        assert caught.value.field == "model.source"


def test_data_sources(roots: Settings, tmp_path: Path) -> None:
    corpus = tmp_path / "corpora" / "text.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    check_data_source(str(corpus), roots)
    check_data_source("builtin:pydoc", roots)
    check_data_source("wikitext", roots)
    (tmp_path / "corpora" / "blank.txt").write_text("  \n\n ")
    (tmp_path / "corpora" / "table.csv").write_text("a,b\n")
    (tmp_path / "outside" / "text.txt").write_text("hello")
    cases = {
        str(tmp_path / "corpora" / "blank.txt"): "is empty",
        str(tmp_path / "corpora" / "table.csv"): "must end in .txt or .jsonl",
        str(tmp_path / "corpora" / "missing.txt"): "does not exist",
        str(tmp_path / "outside" / "text.txt"): "outside the allowed directories",
        "missing.txt": "outside the allowed directories",
    }
    for source, message in cases.items():
        with pytest.raises(InvalidSpec, match=message) as caught:
            check_data_source(source, roots)
        assert caught.value.field == "data.source"


def test_budget_cap(roots: Settings) -> None:
    small = parse_spec({"model": {"source": "builtin:tiny-llama"}, "search": {"generations": 2}})
    assert small.planned_evaluations() <= roots.max_evaluations_per_job
    validate_spec(small, roots)
    big = parse_spec(
        {"model": {"source": "builtin:tiny-llama"}, "search": {"generations": 500, "offspring": 64}}
    )
    with pytest.raises(InvalidSpec, match=f"plans {big.planned_evaluations()} candidate evaluations") as caught:
        validate_spec(big, roots)
    assert caught.value.field == "search"


def test_embedded_redis_is_private_per_data_dir_and_reachable_from_other_processes(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        assert server.url.startswith("unix://") and server.running
        with pytest.raises(EmbeddedRedisError, match="already runs"):
            EmbeddedRedis(tmp_path).start()
        code = "import redis, sys; redis.Redis.from_url(sys.argv[1]).set('df:probe', 'from-child')"
        subprocess.run([sys.executable, "-c", code, server.url], check=True, timeout=60)
        assert redis.Redis.from_url(server.url, decode_responses=True).get("df:probe") == "from-child"
        socket_dir = Path(server.url.removeprefix("unix://")).parent
    assert not server.running and not socket_dir.exists()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_optuna_journal_runs_on_the_embedded_url(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalRedisBackend

    from darwinfront.core import keys

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with EmbeddedRedis(tmp_path) as server:
        backend = JournalRedisBackend(server.url, prefix=keys.optuna_prefix("0123456789abcdef"))
        study = optuna.create_study(storage=JournalStorage(backend), study_name="s", directions=["minimize"])
        study.enqueue_trial({"x": 0.25})
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1) ** 2, n_trials=1)
        assert study.best_value == pytest.approx(0.0625)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.keys("df:optuna:0123456789abcdef:*")
        client.close()


def test_one_resolver_per_directory(monkeypatch, tmp_path):
    from darwinfront.core import settings

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("DARWINFRONT_DATA_DIR", "DARWINFRONT_CACHE_DIR", "DARWINFRONT_DATABASE_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    assert settings.data_dir() == home / ".local/share/darwinfront" == settings.Settings().data_dir
    assert settings.cache_dir() == home / ".cache/darwinfront" == settings.Settings().cache_dir
    assert settings.database_dir() == home / ".cache/darwinfront/databases"
    monkeypatch.setenv("DARWINFRONT_CACHE_DIR", str(tmp_path / "cache"))
    assert settings.database_dir() == tmp_path / "cache/databases"  # databases follow the cache
    monkeypatch.setenv("DARWINFRONT_DATABASE_DIR", "~/big")
    assert settings.database_dir() == home / "big"
