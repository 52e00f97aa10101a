"""A small Python client for the darwinfront REST API, usable from scripts and notebooks.

    from darwinfront.client import Client
    client = Client("http://127.0.0.1:8000", api_key="...")
    job = client.submit(spec)
    client.wait(job["id"])
    front = client.front(job["id"])
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from darwinfront.errors import DarwinfrontError
from service.spec import JobSpec

TERMINAL = {"succeeded", "failed", "cancelled"}


class ApiError(DarwinfrontError):
    """The server answered with an error; `status` is the HTTP code and the message is the server's."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(f"{message} (HTTP {status})")
        self.status, self.message, self.field = status, message, field


def local_credentials(data_dir: Path | None = None) -> dict:
    """The URL and key that `darwinfront serve` left for local clients, or an empty dict."""
    data_dir = Path(data_dir or os.environ.get("DARWINFRONT_DATA_DIR") or "~/.local/share/darwinfront").expanduser()
    path = data_dir / "local-credentials.json"
    return json.loads(path.read_text()) if path.exists() else {}


class Client:
    """Talks to one darwinfront server with one API key.

    Args:
        url: the server, e.g. `http://127.0.0.1:8000`; defaults to `DARWINFRONT_URL` or the local server.
        api_key: defaults to `DARWINFRONT_API_KEY` or the local server's key.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0):
        local = local_credentials() if not (url and api_key) else {}
        self.url = (url or os.environ.get("DARWINFRONT_URL") or local.get("url") or "http://127.0.0.1:8000").rstrip("/")
        key = api_key or os.environ.get("DARWINFRONT_API_KEY") or local.get("api_key")
        if not key:
            raise DarwinfrontError("no API key: pass api_key, set DARWINFRONT_API_KEY, or run `darwinfront serve`")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DarwinfrontError(f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise ApiError(response.status_code, error["message"], error.get("field"))
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, response.text[:500]) from None
        return response

    def submit(self, spec: JobSpec | dict, *, idempotency_key: str | None = None) -> dict:
        """Create a job; returns the job as the server describes it."""
        body = spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, JobSpec) else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=body, headers=headers).json()

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, *, status: str | None = None, offset: int = 0, limit: int = 50) -> dict:
        params = {"offset": offset, "limit": limit} | ({"status": status} if status else {})
        return self._call("GET", "/v1/jobs", params=params).json()

    def front(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}/front").json()

    def events(self, job_id: str, after: str = "0-0") -> list[dict]:
        return self._call("GET", f"/v1/jobs/{job_id}/events", params={"after": after}).json()["events"]

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def configuration(self, job_id: str, candidate_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}/candidates/{candidate_id}/config").json()

    def download_model(self, job_id: str, candidate_id: str, path: Path) -> Path:
        """Save the sliced model's archive (.tar.gz) to `path`."""
        path = Path(path)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/candidates/{candidate_id}/model") as response:
            if response.status_code >= 400:
                response.read()
                self._raise_for(response)
            with path.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return path

    def _raise_for(self, response: httpx.Response) -> None:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, response.text[:500]) from None
        raise ApiError(response.status_code, error["message"], error.get("field"))

    def wait(
        self, job_id: str, *, timeout: float | None = None, poll: float = 1.0, on_progress: Callable | None = None
    ) -> dict:
        """Poll until the job reaches a terminal status; `on_progress(job)` is called on every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise DarwinfrontError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
