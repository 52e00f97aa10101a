"""Waiting for a job's next event without holding a thread: an `XREAD BLOCK` on an asyncio Redis client. Part
of the job store (it reads the event streams `JobOutputs` appends to); the SSE route (`service.routes.stream`)
sleeps on it between the changes it sends, and reads the events themselves through `JobStore.events`.
"""

from __future__ import annotations

import redis.asyncio as aredis

from darwinfront.core import keys

# A wait blocks the connection for its whole timeout: the socket must wait longer than any wait asks for.
SOCKET_TIMEOUT_SECONDS = 60.0


class EventWaiter:
    """Blocking waits on jobs' event streams, on one asyncio client; open it with `connect`, close with `aclose`.

    Args:
        client: An asyncio redis-py client whose socket timeout exceeds every `wait` timeout.
    """

    def __init__(self, client: aredis.Redis):
        self._r = client

    @classmethod
    def connect(cls, url: str) -> EventWaiter:
        """A waiter on the Redis at `url`, for waits shorter than `SOCKET_TIMEOUT_SECONDS` (nothing connects yet)."""
        return cls(aredis.Redis.from_url(url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT_SECONDS))

    async def wait(self, job_id: str, after: str, timeout: float) -> bool:
        """Wait until the job's stream holds an event after stream id `after` (`<ms>-<seq>`).

        Returns:
            True as soon as one is there (at once if one already is); False when `timeout` seconds passed first.
        """
        if not 0 < timeout < SOCKET_TIMEOUT_SECONDS:
            raise ValueError(f"timeout must lie in (0, {SOCKET_TIMEOUT_SECONDS}) seconds, got {timeout}")
        return bool(await self._r.xread({keys.events(job_id): after}, count=1, block=int(timeout * 1000)))

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._r.aclose()
