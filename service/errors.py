"""The one error shape of the API, `{"error": {"code", "message", "field"}}`, and the handlers that produce it.

Domain errors map to HTTP statuses in `DOMAIN_ERRORS`; Starlette's own errors (unknown route 404, 405, ...)
and validation errors are reshaped; anything else is a 500 whose traceback goes to the log, never the client.
Middleware that answers before the routes (the body size limit) builds its reply with `error_response` too.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from darwinfront.core.errors import CandidateNotFound, InvalidSpec, InvalidTransition, JobNotFound
from darwinfront.core.quotas import EvaluationBudgetExceeded, TooManyActiveJobs

log = logging.getLogger(__name__)

DOMAIN_ERRORS: dict[type[Exception], tuple[int, str]] = {
    InvalidSpec: (422, "invalid_spec"),
    EvaluationBudgetExceeded: (422, "budget_exceeded"),
    TooManyActiveJobs: (429, "too_many_active_jobs"),
    JobNotFound: (404, "job_not_found"),
    CandidateNotFound: (404, "candidate_not_found"),
    InvalidTransition: (409, "invalid_transition"),
    redis.ConnectionError: (503, "store_unavailable"),
    redis.TimeoutError: (503, "store_unavailable"),
}
HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    429: "too_many_requests", 500: "internal_error", 503: "unavailable",
}
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def error_body(code: str, message: str, field: str | None = None) -> dict[str, dict[str, str | None]]:
    """The JSON document of every error response."""
    return {"error": {"code": code, "message": message, "field": field}}


def error_response(
    status: int, code: str, message: str, field: str | None = None, *, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error response in the common shape."""
    return JSONResponse(error_body(code, message, field), status_code=status, headers=headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    return ".".join(str(p) for p in parts) or str(loc[0] if loc else "body")


async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the first bad field; every problem is listed in the message (inputs are never echoed)."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        bad = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (bad.get("ctx") or {}).get("error", "invalid JSON")
        where = f" at position {bad['loc'][1]}" if len(bad.get("loc", ())) > 1 else ""
        return error_response(422, "malformed_json", f"request body is not valid JSON{where}: {reason}", "body")
    messages = []
    for e in errors:
        text = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        messages.append(f"{_field_path(tuple(e.get('loc', ())))}: {text}")
    first = _field_path(tuple(errors[0].get("loc", ()))) if errors else None
    return error_response(422, "invalid_request", "; ".join(messages), first)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    allowed = [
        method for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in request.app.routes)
    ]
    return ", ".join(allowed)


async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and the routes' HTTP errors, reshaped; `detail` may be a dict of code, message, field."""
    detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
    code = detail.get("code") or HTTP_CODES.get(exc.status_code, "error")
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return error_response(exc.status_code, code, detail.get("message", ""), detail.get("field"),
                          headers=headers or None)


async def on_domain(request: Request, exc: Exception) -> JSONResponse:
    """A domain error (see `DOMAIN_ERRORS`) as its HTTP status."""
    for kind in type(exc).__mro__:
        if kind in DOMAIN_ERRORS:
            status, code = DOMAIN_ERRORS[kind]
            break
    else:  # pragma: no cover - only registered kinds reach this handler
        status, code = 500, "internal_error"
    if status == 503:
        log.warning("Redis unavailable: %s", exc)
        return error_response(status, code, "the job store is unavailable; retry later",
                              headers={"Retry-After": "5"})
    return error_response(status, code, str(exc), getattr(exc, "field", None))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """500 without details; the traceback goes to the log."""
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler above on `app`."""
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for kind in DOMAIN_ERRORS:
        app.add_exception_handler(kind, on_domain)
    app.add_exception_handler(Exception, on_unexpected)
