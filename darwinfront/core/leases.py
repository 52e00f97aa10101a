"""Driver leases on running jobs, so a job whose driver died is found and handed to another driver. Part of the
job store: `Leases` is mixed into `JobStore` and moves jobs with the store's own status machine
(`_read_status`, `_queue_move`) inside its transactions.

A driver holds a lease (a key with a TTL) on each job it runs and renews it from a heartbeat. When the driver
dies the key expires; any driver's sweep then moves the job back to the queue, and the next claim resumes it
from its checkpoint. A driver whose renewal fails has lost the job and must stop working on it.

The sweep also finds strays: jobs in the claimed list that are not running. A claim moves the job there first
and marks it running next; when the claimer dies or loses Redis in between (or the move's reply is lost and the
retried move takes another job), the job would sit there forever. A stray is put back on the queue once it has
been seen for `STRAY_SECONDS`, far longer than a live claim takes, retries included.
"""

from __future__ import annotations

import redis

from darwinfront.core import keys
from darwinfront.core.outputs import queue_event
from darwinfront.core.status import JobStatus

DEFAULT_LEASE_SECONDS = 30.0
# A claim marks its job running within milliseconds; the store's retrying client gives up on a write after about
# a minute at worst (11 tries, 5 s socket timeout). Twice that is safe.
STRAY_SECONDS = 120.0

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
    _events_maxlen: int

    def grant_lease(self, job_id: str, driver_id: str, seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        """Give `driver_id` the lease on a job it just claimed."""
        self._r.set(keys.lease(job_id), driver_id, px=int(seconds * 1000))

    def renew_lease(self, job_id: str, driver_id: str, seconds: float = DEFAULT_LEASE_SECONDS) -> bool:
        """Extend the lease; False means the job is no longer this driver's (stop working on it)."""
        return bool(self._r.eval(_RENEW, 2, keys.lease(job_id), keys.job(job_id), driver_id, int(seconds * 1000)))

    def release_lease(self, job_id: str) -> None:
        self._r.delete(keys.lease(job_id))

    def requeue_held(self, job_id: str, driver_id: str, reason: str) -> bool:
        """Put a running job that `driver_id` holds back on the queue, first in line, releasing its lease.

        One transaction moves the job (running -> queued, the `queued` event) and appends a `requeued` event
        `{"driver", "reason"}`; what the job recorded (checkpoint, trials, front) stays for the next claim. A
        driver that stops mid-job calls this so another driver resumes the job now, not after the lease lapses.

        Returns:
            False, with nothing written, when the job is not running for `driver_id` (finished, cancelled,
            already requeued, or taken over by another driver).
        """

        def write(pipe: redis.client.Pipeline) -> bool:
            current = self._read_status(pipe, job_id)
            if current[0] is not JobStatus.running or pipe.hget(keys.job(job_id), "driver") != driver_id:
                return False
            pipe.multi()
            queue_event(pipe, self._events_maxlen, job_id, "requeued", {"driver": driver_id, "reason": reason})
            self._queue_move(pipe, job_id, current, JobStatus.queued)
            return True

        return self._r.transaction(write, keys.job(job_id), keys.lease(job_id), value_from_callable=True)

    def requeue_expired(self, stray_seconds: float = STRAY_SECONDS) -> list[str]:
        """Move every running job whose lease has lapsed, and every stray, back to the queue; return their ids.

        A stray (a claimed job that is not running: its claim was cut short) goes back once it has been seen
        for `stray_seconds`; a stray that was cancelled meanwhile just leaves the claimed list.
        """
        moved, strays = [], set()
        for job_id in self._r.lrange(keys.claimed(), 0, -1):
            if self._r.hget(keys.job(job_id), "status") != JobStatus.running.value:
                strays.add(job_id)
                if self._stray_is_old(job_id, stray_seconds) and self._return_stray(job_id):
                    moved.append(job_id)
                continue
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
        settled = set(self._r.hkeys(keys.strays())) - strays  # claimed after all, or already put back
        if settled:
            self._r.hdel(keys.strays(), *settled)
        return moved

    def _stray_is_old(self, job_id: str, seconds: float) -> bool:
        """Note when `job_id` was first seen as a stray (Redis time, shared by every driver); True once it is
        older than `seconds`."""
        seconds_now, micros = self._r.time()
        now = seconds_now + micros / 1e6
        if self._r.hsetnx(keys.strays(), job_id, now):
            return seconds <= 0
        first = self._r.hget(keys.strays(), job_id)
        return first is not None and now - float(first) >= seconds

    def _return_stray(self, job_id: str) -> bool:
        """Take a stray off the claimed list; put it back on the queue if it is still queued (True then)."""

        def write(pipe: redis.client.Pipeline) -> bool:
            status = pipe.hget(keys.job(job_id), "status")
            if status == JobStatus.running.value:
                pipe.multi()
                pipe.hdel(keys.strays(), job_id)
                return False  # a claim finished after all: the lease sweep looks after it
            requeue = status == JobStatus.queued.value and pipe.lpos(keys.queue(), job_id) is None
            pipe.multi()
            pipe.lrem(keys.claimed(), 0, job_id)
            pipe.hdel(keys.strays(), job_id)
            if requeue:
                pipe.rpush(keys.queue(), job_id)  # the right end: taken next, as it was
            return requeue

        return self._r.transaction(write, keys.job(job_id), keys.claimed(), keys.queue(), value_from_callable=True)
