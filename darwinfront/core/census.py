"""Counts over every tenant's jobs: by status, on the queue, claimed by drivers. Part of the job store (mixed
into `JobStore`, which holds the client); `/metrics` reads them at scrape time, so API replicas agree.
"""

from __future__ import annotations

import redis

from darwinfront.core import keys
from darwinfront.core.status import JobStatus


class JobCensus:
    """Read-only counts across tenants (mixed into `JobStore`)."""

    _r: redis.Redis

    def count_by_status(self) -> dict[JobStatus, int]:
        """How many jobs are in each status, over all tenants; every status is present (0 when none)."""
        known = {status.value: status for status in JobStatus}
        counts = dict.fromkeys(JobStatus, 0)
        index_keys = list(self._r.scan_iter(match=keys.jobs_by_status_pattern(), count=500))
        pipe = self._r.pipeline(transaction=False)
        for key in index_keys:
            pipe.zcard(key)
        for key, size in zip(index_keys, pipe.execute(), strict=True):
            status = known.get(keys.status_of_index(key))
            if status is not None:
                counts[status] += size
        return counts

    def queue_depth(self) -> int:
        """Jobs waiting on the queue for a driver."""
        return self._r.llen(keys.queue())

    def queued_ids(self) -> list[str]:
        """The ids on the queue, the next to be taken last (a job on it twice appears twice)."""
        return self._r.lrange(keys.queue(), 0, -1)

    def claimed_ids(self) -> list[str]:
        """Ids of the jobs drivers have taken off the queue and not finished (running, or a claim cut short),
        each once, in the order they were claimed, newest first."""
        return list(dict.fromkeys(self._r.lrange(keys.claimed(), 0, -1)))
