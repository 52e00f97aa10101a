"""Entity tags for the job and front endpoints: a 304 instead of the same body again.

The tag is a hash of the response body as JSON, so it changes exactly when the body does (the driver's
progress, a status change, a new front snapshot). Responses carry `Cache-Control: private, no-cache`: a
browser or client may keep them but must revalidate with `If-None-Match` before reusing one.
"""

from __future__ import annotations

import hashlib

from fastapi import Request, Response, status
from pydantic import BaseModel

CACHE_CONTROL = "private, no-cache"


def etag_of(model: BaseModel) -> str:
    """A strong entity tag (quoted) for the JSON form of `model`."""
    digest = hashlib.sha256(model.model_dump_json().encode()).hexdigest()
    return f'"{digest[:32]}"'


def matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an `If-None-Match` header value names `etag` (weak comparison, as RFC 9110 asks for GET).

    Args:
        if_none_match: The header value: `*` or a comma-separated list of tags, possibly `W/`-prefixed.
        etag: The current tag, quoted.
    """
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == wanted for tag in if_none_match.split(","))


def conditional(request: Request, response: Response, model: BaseModel) -> BaseModel | Response:
    """Tag the response; answer 304 with no body when the client already holds this version.

    Args:
        request: The incoming request (its `If-None-Match` header is read).
        response: The route's response, whose headers get the tag.
        model: The body the route would send.

    Returns:
        `model` (to be serialised as usual), or a bodiless 304 response carrying the same tag.
    """
    etag = etag_of(model)
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    response.headers.update(headers)
    return model
