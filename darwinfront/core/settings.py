"""The service's one settings class, read from `DARWINFRONT_*` environment variables.

Reach it through `get_settings()` (cached); tests pass their own `Settings` to `create_app` or override the
dependency. Placeholder secrets are refused when the settings are built, so a misconfigured server never
starts.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "changethis", "secret", "password"})


def data_dir() -> Path:
    """Embedded Redis, API keys, archives: `$DARWINFRONT_DATA_DIR`, else `~/.local/share/darwinfront`."""
    return Path(os.environ.get("DARWINFRONT_DATA_DIR") or "~/.local/share/darwinfront").expanduser()


def cache_dir() -> Path:
    """Built and converted models: `$DARWINFRONT_CACHE_DIR`, else `~/.cache/darwinfront`."""
    return Path(os.environ.get("DARWINFRONT_CACHE_DIR") or "~/.cache/darwinfront").expanduser()


def database_dir() -> Path:
    """Level databases (large: 100-200 GB for an 8B model, see docs/SCALING.md): `$DARWINFRONT_DATABASE_DIR`, else
    `<cache dir>/databases`."""
    explicit = os.environ.get("DARWINFRONT_DATABASE_DIR")
    return Path(explicit).expanduser() if explicit else cache_dir() / "databases"


class Settings(BaseSettings):
    """Server configuration.

    Attributes:
        redis_url: An external Redis (`redis://`, `rediss://` or `unix://`); also read from plain `REDIS_URL`.
            None means the service starts its own embedded Redis under `data_dir`.
        data_dir: Holds the embedded Redis database, the artifacts and the API keys file.
        api_keys_file: JSON `{"tenants": {"<tenant>": ["<sha256 hex of key>", ...]}}`;
            default `data_dir/api_keys.json`.
        api_keys: Extra keys from the environment, as JSON mapping plaintext key -> tenant.
        cache_dir: Where builtin reference models are built (`DARWINFRONT_CACHE_DIR`, as the workers read it).
        allowed_model_roots: Local model directories must resolve under one of these; default
            `data_dir/models`, `cache_dir` and the working directory.
        allowed_data_roots: Local calibration files must resolve under one of these; default
            `data_dir/data`, `cache_dir` and the working directory.
        max_evaluations_per_job: Refuse jobs that plan more candidate evaluations than this.
        max_page_size: The largest `limit` a list request may ask for.
        max_body_bytes: Request bodies larger than this are refused with 413 before they are parsed.
        max_active_jobs_per_tenant: Queued + running jobs one tenant may have; more are refused with 429.
        max_active_evaluations_per_tenant: Planned evaluations summed over a tenant's queued and running jobs,
            the new one included; a job that would exceed it is refused with 422.
        cors_origins: Origins allowed by CORS; empty (the default) disables the middleware.
        lease_seconds: How long a driver's lease on a running job lasts without a renewal.
        shutdown_grace_seconds: After SIGTERM, how long a driver waits for its job to reach a safe point before
            it requeues the job and exits regardless.
        placement_timeout_seconds: How long a job waits for the Ray cluster to offer the GPUs its evaluators ask
            for (an autoscaler may add a node meanwhile) before it fails saying what it asked and what is there.
        evaluator_resources: Ray custom resources every evaluator, prepare and layer task of a job reserves, as
            JSON (`{"darwinfront_evaluator": 1}`): they run only on nodes started with
            `ray start --resources='{"darwinfront_evaluator": N}'` (N evaluators each), not on the head.
        shared_cache: The cache directory (`DARWINFRONT_CACHE_DIR`, and the database directory) is one shared
            storage that every Ray node mounts (NFS or similar): evaluators then open the level database and
            builtin models where the prepare step built them, and nothing is copied between nodes. Off (the
            default), each node's evaluators receive what they lack through Ray (`workers.transfer`); read by
            the workers from `DARWINFRONT_SHARED_CACHE`.
        metrics_per_job: Show per-job series (job ids, their evaluations and fronts) on the keyless `/metrics`;
            off by default, since job ids and per-job figures tell what tenants run.
    """

    model_config = SettingsConfigDict(env_prefix="DARWINFRONT_", extra="ignore")

    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DARWINFRONT_REDIS_URL", "REDIS_URL", "redis_url")
    )
    data_dir: Path = Field(default_factory=data_dir)
    api_keys_file: Path | None = None
    api_keys: dict[str, str] = Field(default_factory=dict)
    cache_dir: Path = Field(default_factory=cache_dir)
    allowed_model_roots: list[Path] | None = None
    allowed_data_roots: list[Path] | None = None
    max_evaluations_per_job: int = Field(default=100_000, ge=1)
    max_page_size: int = Field(default=100, ge=1, le=10_000)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_active_jobs_per_tenant: int = Field(default=16, ge=1)
    max_active_evaluations_per_tenant: int = Field(default=400_000, ge=1)
    lease_seconds: float = Field(default=30.0, gt=0.5, le=3600)
    cors_origins: list[str] = Field(default_factory=list)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=3600)
    placement_timeout_seconds: float = Field(default=120.0, ge=0, le=86_400)
    evaluator_resources: dict[str, float] = Field(default_factory=dict)
    metrics_per_job: bool = False
    shared_cache: bool = False

    @model_validator(mode="after")
    def _resolve_defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        self.cache_dir = self.cache_dir.expanduser()
        if self.allowed_model_roots is None:
            self.allowed_model_roots = [self.data_dir / "models", self.cache_dir, Path.cwd()]
        if self.allowed_data_roots is None:
            self.allowed_data_roots = [self.data_dir / "data", self.cache_dir, Path.cwd()]
        return self

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        for key, tenant in self.api_keys.items():
            if key.strip().lower() in PLACEHOLDER_SECRETS:
                raise ValueError(
                    f"DARWINFRONT_API_KEYS holds a placeholder key {key!r} (tenant {tenant!r}); remove it and "
                    f"make a real key with `darwinfront keys create --tenant {tenant}` (kept hashed in the keys file)"
                )
            if not tenant.strip():
                raise ValueError("DARWINFRONT_API_KEYS maps a key to an empty tenant name")
        if self.redis_url:
            password = urlsplit(self.redis_url).password
            if password is not None and password.strip().lower() in PLACEHOLDER_SECRETS:
                raise ValueError("the Redis URL holds a placeholder password; set a real one")
        return self

    @model_validator(mode="after")
    def _check_evaluator_resources(self) -> Settings:
        for name, amount in self.evaluator_resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or amount <= 0:
                raise ValueError(
                    f"DARWINFRONT_EVALUATOR_RESOURCES holds {name!r}: {amount!r}; name custom Ray resources with "
                    "positive amounts (CPUs and GPUs come from the job's `resources`)"
                )
        return self

    @property
    def keys_file(self) -> Path:
        """Where API key hashes are stored."""
        return self.api_keys_file or self.data_dir / "api_keys.json"

    @property
    def artifacts_dir(self) -> Path:
        """Root of exported model archives: `<artifacts_dir>/<job id>/...`."""
        return self.data_dir / "artifacts"

    @property
    def redis_dir(self) -> Path:
        """Where the embedded Redis keeps its database."""
        return self.data_dir / "redis"


@functools.lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (a FastAPI dependency tests override)."""
    return Settings()
