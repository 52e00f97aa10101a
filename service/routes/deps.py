"""Dependencies the routes share, as `Annotated` aliases: settings, store, the caller's tenant, owned job.

Routes and dependencies are `async def`; the store is synchronous, so its calls go through `blocking(...)`
(a worker thread). That costs one thread hop per store call, where a sync route would cost two (the route and
its response validation both run in threads), and no hop at all for dependencies that do no I/O.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool as blocking

from darwinfront.core.settings import Settings
from darwinfront.core.store import JobRecord, JobStore
from service.auth import KeyRing


async def app_settings(request: Request) -> Settings:
    """The settings the app was built with (`create_app(settings)`, else `get_settings()`).

    Tests may replace this dependency through `app.dependency_overrides`. The app itself never installs an
    override: with any override present, FastAPI re-analyses every dependency on every request (~5 ms).
    """
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(app_settings)]

__all__ = ["JobDep", "SettingsDep", "StoreDep", "TenantDep", "app_settings", "blocking", "get_store",
           "owned_job", "require_tenant"]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


async def get_store(request: Request) -> JobStore:
    """The job store the lifespan opened."""
    return request.app.state.store


StoreDep = Annotated[JobStore, Depends(get_store)]


def _keyring(request: Request, settings: Settings) -> KeyRing:
    ring = getattr(request.app.state, "keyring", None)
    if ring is None or ring.settings is not settings:
        ring = request.app.state.keyring = KeyRing(settings)
    return ring


async def require_tenant(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant of the caller's API key; 401 without a valid one."""
    if credentials is None:
        message = "missing API key: send 'Authorization: Bearer <key>'"
    else:
        tenant = _keyring(request, settings).tenant_for(credentials.credentials)
        if tenant is not None:
            return tenant
        message = "invalid API key"
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail={"code": "unauthorized", "message": message},
        headers={"WWW-Authenticate": "Bearer"},
    )


TenantDep = Annotated[str, Depends(require_tenant)]


async def owned_job(job_id: str, tenant: TenantDep, store: StoreDep) -> JobRecord:
    """The job `job_id` if the caller's tenant owns it; otherwise JobNotFound (404), never 403."""
    return await blocking(store.get, job_id, tenant)


JobDep = Annotated[JobRecord, Depends(owned_job)]
