"""The driver: claims queued jobs from Redis, runs their search on Ray, and records how they end.

Run it as `darwinfront driver` (the embedded `serve` starts one for you). Several drivers may share one Redis:
each claim is atomic, so a job runs once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

import redis

from service.settings import Settings
from service.status import JobStatus
from service.store import JobStore
from workers.pool import describe_error, init_ray
from workers.prune_job import Cancelled, PruneJob

log = logging.getLogger(__name__)


class Driver:
    """Claims jobs one at a time and runs each to a terminal status.

    Args:
        redis_url: the job store's Redis (also Optuna's).
        data_dir: where sliced-model archives go (the API serves them from there).
        ray_address: a Ray cluster to join; None starts a local one.
    """

    def __init__(self, redis_url: str, data_dir: Path, *, ray_address: str | None = None):
        self.redis_url = redis_url
        self.data_dir = Path(data_dir)
        self.ray_address = ray_address
        self.store = JobStore(redis.Redis.from_url(redis_url, decode_responses=True))
        self.driver_id = f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = threading.Event()

    def run_forever(self, poll_seconds: float = 1.0) -> None:
        """Claim and run jobs until `stop()` is called (or SIGTERM / SIGINT in the main thread)."""
        init_ray(self.ray_address)
        if threading.current_thread() is threading.main_thread():
            # After ray.init, which installs handlers of its own: stop cleanly between jobs.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        log.info("driver %s waiting for jobs", self.driver_id)
        while not self.stopping.is_set():
            job_id = self.store.claim(self.driver_id, timeout=poll_seconds)
            if job_id is not None:
                self.run_job(job_id)

    def run_job(self, job_id: str) -> JobStatus:
        """Run a claimed job and record its terminal status; never raises for a job's own failure."""
        self.store.append_event(job_id, "started", {"driver": self.driver_id})
        try:
            PruneJob(self.store, job_id, self.redis_url, self.data_dir).run()
        except Cancelled:
            status, error = JobStatus.cancelled, None
        except Exception as exc:  # any failure of the job becomes its readable error
            log.exception("job %s failed", job_id)
            status, error = JobStatus.failed, describe_error(exc)
        else:
            status, error = JobStatus.succeeded, None
        self.store.set_status(job_id, status, error=error)
        self.store.append_event(job_id, status.value, {"error": error} if error else {})
        log.info("job %s %s%s", job_id, status.value, f": {error}" if error else "")
        return status

    def stop(self) -> None:
        self.stopping.set()


def main() -> None:
    """Entry point of `darwinfront driver`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    url = settings.redis_url
    if not url:
        raise SystemExit("darwinfront driver: set REDIS_URL (or DARWINFRONT_REDIS_URL) to the job store's Redis")
    Driver(url, settings.data_dir, ray_address=os.environ.get("RAY_ADDRESS")).run_forever()


if __name__ == "__main__":
    main()
