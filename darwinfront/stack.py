"""The embedded stack: a private Redis, a driver process (with a local Ray) and the API, in one command.

Used by `darwinfront serve`, `darwinfront demo` and the integration tests. `REDIS_URL` switches the private
Redis for an external one; `RAY_ADDRESS` makes the driver join a Ray cluster instead of starting one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from darwinfront.core.settings import Settings
from service.app import create_app
from service.auth import generate_key
from service.embedded import EmbeddedRedis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def credentials_path(data_dir: Path) -> Path:
    """Where `serve` leaves the URL and key of the local server for the CLI and client to pick up."""
    return Path(data_dir) / "local-credentials.json"


def _die_with_parent() -> None:
    """In the driver child: get SIGTERM if the process that started the stack dies, so none is left behind."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedStack:
    """Start Redis (unless external), a driver subprocess and the API server; stop them all on exit.

    Args:
        data_dir: holds the Redis database, the keys file, artifacts and the credentials file.

    Attributes:
        redis: the embedded Redis (None when `REDIS_URL` names an external one).
        host, port: where the API listens (port 0 picks a free one).
        driver: start a driver process (tests that only need the API can skip it).
    """

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, driver: bool = True):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host, self.port = host, port or free_port()
        self.with_driver = driver
        self._exit = contextlib.ExitStack()
        self.driver_process: subprocess.Popen | None = None
        self.key = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> EmbeddedStack:
        try:
            self._start()
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()

    def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env_url = os.environ.get("DARWINFRONT_REDIS_URL") or os.environ.get("REDIS_URL")
        self.redis = None if env_url else self._exit.enter_context(EmbeddedRedis(self.data_dir))
        self.redis_url = env_url or self.redis.url
        self.settings = Settings(redis_url=self.redis_url, data_dir=self.data_dir)
        self.key = generate_key(self.settings, tenant="local")
        credentials = credentials_path(self.data_dir)
        credentials.write_text(json.dumps({"url": self.url, "api_key": self.key}))
        credentials.chmod(0o600)
        if self.with_driver:
            self.start_driver()
        self._start_api()

    def start_driver(self) -> subprocess.Popen:
        """Start (or restart) the driver process; its log goes to `<data_dir>/driver.log`."""
        env = dict(os.environ, DARWINFRONT_REDIS_URL=self.redis_url, DARWINFRONT_DATA_DIR=str(self.data_dir))
        log = open(self.data_dir / "driver.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.driver_process = subprocess.Popen(
            [sys.executable, "-m", "workers.driver"], env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self._exit.callback(log.close)
        self._exit.callback(self._stop_driver, self.driver_process)
        return self.driver_process

    @staticmethod
    def _stop_driver(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _start_api(self) -> None:
        config = uvicorn.Config(
            create_app(self.settings), host=self.host, port=self.port, log_level="warning", access_log=False
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="darwinfront-api", daemon=True)
        thread.start()
        self._exit.callback(thread.join, 10)
        self._exit.callback(setattr, server, "should_exit", True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            if not thread.is_alive():
                break
            time.sleep(0.1)
        raise RuntimeError(f"the API did not start on {self.url}")
