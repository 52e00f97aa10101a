"""Dependencies the routes share, as `Annotated` aliases: settings, store, the caller's tenant, owned job."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import KeyRing
from service.settings import Settings, get_settings
from service.store import JobRecord, JobStore

SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def get_store(request: Request) -> JobStore:
    """The job store the lifespan opened."""
    return request.app.state.store


StoreDep = Annotated[JobStore, Depends(get_store)]


def _keyring(request: Request, settings: Settings) -> KeyRing:
    ring = getattr(request.app.state, "keyring", None)
    if ring is None or ring.settings is not settings:
        ring = request.app.state.keyring = KeyRing(settings)
    return ring


def require_tenant(
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


def owned_job(job_id: str, tenant: TenantDep, store: StoreDep) -> JobRecord:
    """The job `job_id` if the caller's tenant owns it; otherwise JobNotFound (404), never 403."""
    return store.get(job_id, tenant)


JobDep = Annotated[JobRecord, Depends(owned_job)]
