"""Request body size limit, as pure ASGI middleware in front of the routes.

A declared `Content-Length` over the limit is refused at once, without reading the body. A body without one
(`Transfer-Encoding: chunked`) is read up to the limit and refused as soon as it passes it; a body within the
limit is handed to the application unchanged. The refusal is a 413 in the API's common error shape.

FastAPI's own `max_body_size` lets a route that never reads its body run, then swaps its response for a
plain-text 413; this one refuses before routing and authentication, in the same shape for every route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.errors import error_response

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class BodySizeLimit:
    """Refuse HTTP request bodies larger than `max_bytes` with 413 `payload_too_large`.

    Args:
        app: The ASGI application behind the limit.
        max_bytes: The largest body accepted, in bytes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if declared.strip().isdigit() and int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server delivers no more than the declared length
            return
        if b"chunked" not in (_header(scope, b"transfer-encoding") or b"").lower():
            await self.app(scope, receive, send)  # no body
            return
        body, complete = await self._read_within_limit(receive)
        if not complete:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_within_limit(self, receive: Receive) -> tuple[bytes, bool]:
        """The whole body and True, or what was read and False once it passes the limit or the client left."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return b"", False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), True

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than this server accepts ({self.max_bytes} bytes)"
        response = error_response(413, "payload_too_large", message, "body", headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` as one message, then defers to the original (for disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
