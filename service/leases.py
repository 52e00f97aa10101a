"""Driver leases on running jobs, so a job whose driver died is found and handed to another driver.

A driver holds a lease (a key with a TTL) on each job it runs and renews it from a heartbeat. When the driver
dies the key expires; any driver's sweep then moves the job back to the queue, and the next claim resumes it
from its checkpoint. A driver whose renewal fails has lost the job and must stop working on it.
"""

from __future__ import annotations

import redis

from service import keys
from service.status import JobStatus

DEFAULT_LEASE_SECONDS = 30.0

# Renew if we hold the lease; re-take it if it lapsed while the job is still ours (a pause longer than the
# TTL, e.g. Redis away); else the job is someone else's now.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  local fields = redis.call('HMGET', KEYS[2], 'status', 'driver')
  if fields[1] == 'running' and fields[2] == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
  end
end
return 0
"""


class Leases:
    """Lease operations of the job store (mixed into `JobStore`; uses its client and status machine)."""

    _r: redis.Redis

    def grant_lease(self, job_id: str, driver_id: str, seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        """Give `driver_id` the lease on a job it just claimed."""
        self._r.set(keys.lease(job_id), driver_id, px=int(seconds * 1000))

    def renew_lease(self, job_id: str, driver_id: str, seconds: float = DEFAULT_LEASE_SECONDS) -> bool:
        """Extend the lease; False means the job is no longer this driver's (stop working on it)."""
        return bool(self._r.eval(_RENEW, 2, keys.lease(job_id), keys.job(job_id), driver_id, int(seconds * 1000)))

    def release_lease(self, job_id: str) -> None:
        self._r.delete(keys.lease(job_id))

    def requeue_expired(self) -> list[str]:
        """Move every running job whose lease has lapsed back to the queue; return their ids."""
        moved = []
        for job_id in self._r.lrange(keys.claimed(), 0, -1):
            if self._r.exists(keys.lease(job_id)):
                continue

            def write(pipe: redis.client.Pipeline, job_id: str = job_id) -> bool:
                current = self._read_status(pipe, job_id)
                if current[0] is not JobStatus.running or pipe.exists(keys.lease(job_id)):
                    return False
                pipe.multi()
                self._queue_move(pipe, job_id, current, JobStatus.queued)
                return True

            if self._r.transaction(write, keys.job(job_id), keys.lease(job_id), value_from_callable=True):
                moved.append(job_id)
        return moved
