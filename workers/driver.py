"""The driver: claims queued jobs from Redis, runs their search on Ray, and records how they end.

Run it as `darwinfront driver` (the embedded `serve` starts one for you). Several drivers may share one Redis:
each claim is atomic, so a job runs once.

SIGTERM or SIGINT (`docker stop`, a pod eviction, Ctrl-C) stops the driver: the running job stops at its next
safe point (between evaluations, batches or training steps), goes back to the queue with its lease released and
what it recorded kept, and the driver exits. When the job reaches no safe point within the grace period, the
driver requeues it anyway and exits at once; a requeue that cannot be written (Redis away) is left to the lease
expiry.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

import redis

from darwinfront.core.errors import InvalidTransition
from darwinfront.core.methods import method_of
from darwinfront.core.settings import Settings
from darwinfront.core.status import JobStatus
from darwinfront.core.store import JobStore, connect
from workers.job import Cancelled, LeaseLost, Stopping
from workers.pool import describe_error, init_ray

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews a job's lease from a background thread; `lost` is set once the job is no longer ours.

    A renewal that fails because Redis is away is retried at the next beat: the job is only lost when Redis
    answers that another driver holds it.
    """

    def __init__(self, store: JobStore, job_id: str, driver_id: str, seconds: float):
        self.store, self.job_id, self.driver_id, self.seconds = store, job_id, driver_id, seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.store.renew_lease(self.job_id, self.driver_id, self.seconds):
                    self.lost.set()
                    return
            except redis.RedisError as exc:
                log.warning("lease renewal of %s failed (%s); retrying", self.job_id, exc)


class Driver:
    """Claims jobs one at a time and runs each to a terminal status.

    Args:
        redis_url: the job store's Redis (also Optuna's).
        data_dir: where sliced-model archives go (the API serves them from there).
        ray_address: a Ray cluster to join; None starts a local one.
        lease_seconds: how long a job stays ours without a heartbeat before another driver may take it.
        grace_seconds: after `stop()`, how long the running job has to reach a safe point before the driver
            requeues it and exits without waiting further.
    """

    def __init__(
        self, redis_url: str, data_dir: Path, *, ray_address: str | None = None, lease_seconds: float = 30.0,
        grace_seconds: float = 20.0,
    ):
        self.redis_url = redis_url
        self.data_dir = Path(data_dir)
        self.ray_address = ray_address
        self.lease_seconds = lease_seconds
        self.grace_seconds = grace_seconds
        self.store = JobStore(connect(redis_url))
        self.driver_id = f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = threading.Event()
        self.current_job: str | None = None
        self._grace: threading.Timer | None = None
        self._exit = os._exit  # what the grace timer calls; a test swaps it

    def run_forever(self, poll_seconds: float = 1.0) -> None:
        """Claim and run jobs until `stop()` is called (or `terminate()`, on SIGTERM / SIGINT in the main thread)."""
        init_ray(self.ray_address)
        if threading.current_thread() is threading.main_thread():
            # After ray.init, which installs handlers of its own: stop the job at its next safe point.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.terminate())
        log.info("driver %s waiting for jobs", self.driver_id)
        while not self.stopping.is_set():
            try:
                for job_id in self.store.requeue_expired():
                    log.warning("job %s lost its driver; requeued", job_id)
                job_id = self.store.claim(self.driver_id, timeout=poll_seconds, lease_seconds=self.lease_seconds)
                if job_id is not None and self.stopping.is_set():  # claimed as the stop came: hand it back
                    self.store.requeue_held(job_id, self.driver_id, "driver stopping")
                    job_id = None
            except redis.RedisError as exc:
                log.warning("Redis unavailable (%s); waiting", exc)
                self.stopping.wait(poll_seconds)
                continue
            if job_id is not None:
                self.run_job(job_id)

    def run_job(self, job_id: str) -> JobStatus | None:
        """Run a claimed job to its terminal status; None if the job was lost to another driver.

        A job's own failure becomes its status and error, never an exception here. When Redis goes away
        mid-job the driver waits for it and resumes the job from its checkpoint and recorded candidates. A job
        stopped because the driver is stopping is requeued (`queued` is returned).
        """
        self.current_job = job_id
        try:
            return self._run_held(job_id)
        finally:
            self.current_job = None

    def _run_held(self, job_id: str) -> JobStatus | None:
        with LeaseKeeper(self.store, job_id, self.driver_id, self.lease_seconds) as lease:
            while True:
                try:
                    status, error = self._attempt(job_id, lease)
                    if status is None:
                        return None
                    if status is JobStatus.queued:
                        self.store.requeue_held(job_id, self.driver_id, "driver stopping")
                    else:
                        self._finish(job_id, status, error)
                except redis.RedisError as exc:
                    log.warning("Redis unavailable during job %s (%s); pausing", job_id, exc)
                    if not self._wait_for_redis():
                        return None
                    continue
                log.info("job %s %s%s", job_id, status.value, f": {error}" if error else "")
                return status

    def _attempt(self, job_id: str, lease: LeaseKeeper) -> tuple[JobStatus | None, str | None]:
        self.store.append_event(job_id, "started", {"driver": self.driver_id})
        try:
            runner = method_of(self.store.get(job_id).spec).load_runner()
            runner(self.store, job_id, redis_url=self.redis_url, data_dir=self.data_dir, lease_lost=lease.lost,
                   stopping=self.stopping).run()
        except Cancelled:
            return JobStatus.cancelled, None
        except Stopping:
            log.info("job %s stopped at a safe point; requeueing it", job_id)
            return JobStatus.queued, None
        except LeaseLost:
            log.warning("job %s was taken over by another driver; leaving it", job_id)
            return None, None
        except redis.RedisError:
            raise
        except Exception as exc:  # any failure of the job becomes its readable error
            log.exception("job %s failed", job_id)
            return JobStatus.failed, describe_error(exc)
        return JobStatus.succeeded, None

    def _finish(self, job_id: str, status: JobStatus, error: str | None) -> None:
        try:
            self.store.set_status(job_id, status, error=error)
        except InvalidTransition:
            # A retried write whose first reply was lost finds the job already moved: that is success.
            if self.store.get(job_id).status is not status:
                raise

    def _wait_for_redis(self, poll_seconds: float = 1.0) -> bool:
        while not self.stopping.is_set():
            try:
                if self.store.ping():
                    return True
            except redis.RedisError:
                pass
            self.stopping.wait(poll_seconds)
        return False

    def stop(self) -> None:
        """Stop the running job at its next safe point (it is requeued), then return from `run_forever`."""
        self.stopping.set()

    def terminate(self) -> None:
        """`stop()`, and end the process once the grace period is over, wherever the job or Ray's shutdown is.

        The signal handler's call: the driver owns its process then. Only the first call counts.
        """
        if self._grace is not None:
            return
        log.info("driver %s stopping (grace %.0f s)", self.driver_id, self.grace_seconds)
        self.stop()
        self._grace = threading.Timer(self.grace_seconds, self._grace_over)
        self._grace.daemon = True
        self._grace.start()

    def _grace_over(self) -> None:
        """The job reached no safe point in time: requeue it (it stays as it last recorded) and exit now."""
        job_id = self.current_job
        try:
            if job_id is not None:
                self.store.requeue_held(job_id, self.driver_id, "driver stopping: grace period over")
                log.warning("job %s reached no safe point in %.0f s; requeued", job_id, self.grace_seconds)
        except redis.RedisError as exc:
            log.warning("could not requeue %s (%s); its lease will lapse", job_id, exc)
        finally:  # exit whatever happened: the lease expiry covers a job we could not requeue
            for handler in logging.getLogger().handlers:
                handler.flush()  # os._exit skips it
            self._exit(1)


def main() -> None:
    """Entry point of `darwinfront driver`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    url = settings.redis_url
    if not url:
        raise SystemExit("darwinfront driver: set REDIS_URL (or DARWINFRONT_REDIS_URL) to the job store's Redis")
    driver = Driver(
        url, settings.data_dir, ray_address=os.environ.get("RAY_ADDRESS"), lease_seconds=settings.lease_seconds,
        grace_seconds=settings.shutdown_grace_seconds,
    )
    driver.run_forever()


if __name__ == "__main__":
    main()
