"""A typed Python client for the darwinfront REST API, for scripts and notebooks.

It returns the server's own schema models (`service.schemas`), so what you read is what the API documents:

    from darwinfront.client import Client
    with Client("http://127.0.0.1:8000", api_key="...") as client:
        job = client.submit(spec)
        job = client.wait(job.id, on_progress=lambda j: print(j.progress.get("evaluations")))
        front = client.front(job.id)
        best = min(front.points, key=lambda p: p.objectives["kl"])
        configuration = client.configuration(job.id, best.candidate_id)

`job` and `front` revalidate with ETags: polling an unchanged job costs a 304 and no body.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from darwinfront.core import settings
from darwinfront.core.errors import DarwinfrontError
from darwinfront.core.spec import JobSpec
from service.schemas import Event, Front, History, JobList, JobPublic

TERMINAL = {"succeeded", "failed", "cancelled"}
Model = TypeVar("Model", bound=BaseModel)
_TAG_CACHE_SIZE = 256


class ApiError(DarwinfrontError):
    """The server answered with an error; `status` is the HTTP code and the message is the server's."""

    def __init__(self, status: int, message: str, field: str | None = None, code: str | None = None):
        super().__init__(f"{message} (HTTP {status})")
        self.status, self.message, self.field, self.code = status, message, field, code


@dataclass(frozen=True)
class StreamMessage:
    """One server-sent event of a job's stream.

    Attributes:
        event: `job`, `front`, `end`, or the kind of a job event (`generation`, `running`, `succeeded`, ...).
        data: A `JobPublic` for `job`, a `Front` for `front`, a dict for `end`, else an `Event`.
        id: The event's stream id (job events only); pass it as `after` to resume.
    """

    event: str
    data: Any
    id: str | None = None


def local_credentials(data_dir: Path | None = None) -> dict:
    """The URL and key that `darwinfront serve` left for local clients, or an empty dict."""
    path = Path(data_dir or settings.data_dir()) / "local-credentials.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _stream_message(event: str, data: str, event_id: str | None) -> StreamMessage:
    payload = json.loads(data) if data else None
    if event == "job":
        payload = JobPublic.model_validate(payload)
    elif event == "front":
        payload = Front.model_validate(payload)
    elif event != "end":
        payload = Event.model_validate(payload)
    return StreamMessage(event, payload, event_id)


def parse_sse(lines: Iterator[str]) -> Iterator[StreamMessage]:
    """Server-sent events from the lines of a `text/event-stream` body (comments skipped)."""
    event, data, event_id = "message", [], None
    for line in lines:
        if not line:
            if data:
                yield _stream_message(event, "\n".join(data), event_id)
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value


class Client:
    """Talks to one darwinfront server with one API key.

    Args:
        url: The server, e.g. `http://127.0.0.1:8000`; defaults to `DARWINFRONT_URL` or the local server.
        api_key: Defaults to `DARWINFRONT_API_KEY` or the local server's key.
        timeout: Seconds to wait for each answer (a stream waits this long between two of its messages).
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0):
        local = local_credentials() if not (url and api_key) else {}
        self.url = (url or os.environ.get("DARWINFRONT_URL") or local.get("url") or "http://127.0.0.1:8000").rstrip("/")
        key = api_key or os.environ.get("DARWINFRONT_API_KEY") or local.get("api_key")
        if not key:
            raise DarwinfrontError("no API key: pass api_key, set DARWINFRONT_API_KEY, or run `darwinfront serve`")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
        self._tags: dict[str, tuple[str, BaseModel]] = {}
        self.not_modified = 0  # answers the server could skip thanks to an ETag

    # ---- plumbing ---------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DarwinfrontError(f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            self._raise_for(response)
        return response

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        try:
            error = response.json()["error"]
            message, field, code = error["message"], error.get("field"), error.get("code")
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, response.text[:500]) from None
        raise ApiError(response.status_code, message, field, code)

    def _get_tagged(self, path: str, model: type[Model]) -> Model:
        """GET `path` as `model`, sending the ETag of the copy we hold; a 304 returns that copy."""
        held = self._tags.get(path)
        headers = {"If-None-Match": held[0]} if held else {}
        response = self._call("GET", path, headers=headers)
        if response.status_code == 304 and held:
            self.not_modified += 1
            return held[1]
        value = model.model_validate(response.json())
        if tag := response.headers.get("ETag"):
            self._tags.pop(path, None)
            self._tags[path] = (tag, value)
            if len(self._tags) > _TAG_CACHE_SIZE:
                self._tags.pop(next(iter(self._tags)))
        return value

    # ---- jobs -------------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec | dict, *, idempotency_key: str | None = None) -> JobPublic:
        """Create a job; returns it as the server describes it (queued)."""
        body = spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, JobSpec) else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobPublic.model_validate(self._call("POST", "/v1/jobs", json=body, headers=headers).json())

    def job(self, job_id: str) -> JobPublic:
        """One job: status, spec, progress (revalidated with its ETag)."""
        return self._get_tagged(f"/v1/jobs/{job_id}", JobPublic)

    def jobs(self, *, status: str | None = None, offset: int = 0, limit: int = 50) -> JobList:
        """A page of your jobs, newest first."""
        params = {"offset": offset, "limit": limit} | ({"status": status} if status else {})
        return JobList.model_validate(self._call("GET", "/v1/jobs", params=params).json())

    def posttrain(
        self, job_id: str, candidate_id: str, *, idempotency_key: str | None = None, **options: Any
    ) -> JobPublic:
        """Post-train a candidate of a finished structured_prune job on more tokens, as a follow-up job.

        Args:
            job_id: The parent job.
            candidate_id: One of its front candidates.
            idempotency_key: The same key returns the job the first request made.
            **options: `tokens`, `lr`, `batch_size`, `loss` (`kd` or `ce`), `seed`, `name`, `resources`; the
                server's defaults for those left out (or None).

        Returns:
            The follow-up job (queued). When it succeeds, its result is under the same candidate id:
            `configuration(followup.id, candidate_id)`, `download_model(followup.id, candidate_id, path)`.
        """
        body = {name: value for name, value in options.items() if value is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        path = f"/v1/jobs/{job_id}/candidates/{candidate_id}/posttrain"
        return JobPublic.model_validate(self._call("POST", path, json=body, headers=headers).json())

    def evaluate(
        self, job_id: str, candidate_id: str, tasks: list[str] | str, *, idempotency_key: str | None = None,
        **options: Any,
    ) -> JobPublic:
        """Score a candidate of a finished job with lm-evaluation-harness, as a follow-up job.

        Args:
            job_id: The parent job (structured_prune, posttrain or kv_precision).
            candidate_id: One of its front candidates.
            tasks: lm_eval task names (a list, or one string with commas).
            idempotency_key: The same key returns the job the first request made.
            **options: `limit`, `num_fewshot`, `batch_size`, `seed`, `name`, `resources`; the server's defaults
                for those left out (or None).

        Returns:
            The follow-up job (queued). When it succeeds, `scores(job_id, candidate_id)` and the parent's front
            carry the scores, the dense model's beside them.
        """
        names = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
        body = {"tasks": names} | {name: value for name, value in options.items() if value is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        path = f"/v1/jobs/{job_id}/candidates/{candidate_id}/evaluate"
        return JobPublic.model_validate(self._call("POST", path, json=body, headers=headers).json())

    def scores(self, job_id: str, candidate_id: str) -> dict[str, dict]:
        """A candidate's lm-eval scores per task (metric, value, stderr, `dense`, `delta`); empty before any."""
        return self._call("GET", f"/v1/jobs/{job_id}/candidates/{candidate_id}/scores").json()

    def cancel(self, job_id: str) -> JobPublic:
        """Cancel a job (a running one stops at the end of its generation)."""
        return JobPublic.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel").json())

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        on_progress: Callable[[JobPublic], None] | None = None,
    ) -> JobPublic:
        """Poll until the job is final and return it; `on_progress(job)` sees the first state and every change.

        Raises:
            DarwinfrontError: The job is still not final after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        shown = None
        while True:
            job = self.job(job_id)
            if on_progress is not None and job is not shown:
                on_progress(job)
                shown = job
            if job.status in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise DarwinfrontError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(poll)

    # ---- what a job produces ------------------------------------------------------------------------------

    def front(self, job_id: str) -> Front:
        """The latest Pareto front snapshot (revalidated with its ETag)."""
        return self._get_tagged(f"/v1/jobs/{job_id}/front", Front)

    def history(self, job_id: str) -> History:
        """Best fitness per target and front hypervolume, one point per finished generation."""
        return History.model_validate(self._call("GET", f"/v1/jobs/{job_id}/history").json())

    def events(self, job_id: str, after: str = "0-0", limit: int = 100) -> list[Event]:
        """Up to `limit` events after stream id `after`, oldest first."""
        params = {"after": after, "limit": limit}
        return [Event.model_validate(e) for e in self._call("GET", f"/v1/jobs/{job_id}/events", params=params)
                .json()["events"]]

    def stream(self, job_id: str, *, after: str = "0-0") -> Iterator[StreamMessage]:
        """Follow the job live: its events, `job` and `front` changes, until `end` (the job is final)."""
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/stream", params={"after": after}) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                yield from parse_sse(response.iter_lines())
        except httpx.HTTPError as exc:
            raise DarwinfrontError(f"lost the stream of job {job_id} from {self.url}: {exc}") from exc

    def configuration(self, job_id: str, candidate_id: str) -> dict:
        """A front candidate's configuration document (apply it with `workers.slicing.apply_configuration`)."""
        return self._call("GET", f"/v1/jobs/{job_id}/candidates/{candidate_id}/config").json()

    def download_configuration(self, job_id: str, candidate_id: str, path: Path) -> Path:
        """Save a candidate's configuration as JSON to `path`."""
        path = Path(path)
        path.write_text(json.dumps(self.configuration(job_id, candidate_id), indent=2))
        return path

    def download_model(self, job_id: str, candidate_id: str, path: Path) -> Path:
        """Save the sliced model's archive (.tar) to `path`, streamed to disk and checked against the SHA-256
        the server sends (`X-Checksum-SHA256`) as it is written; a mismatch removes the file and raises."""
        return self._download(f"/v1/jobs/{job_id}/candidates/{candidate_id}/model", Path(path))

    def download_gguf(self, job_id: str, candidate_id: str, path: Path, gguf_type: str = "f16") -> Path:
        """Save the sliced model as a GGUF file for llama.cpp / Ollama (`gguf_type` f16, q8_0 or f32) to `path`.

        The server writes it from the archive on the first request, so this waits up to ten minutes for it.
        """
        url = f"/v1/jobs/{job_id}/candidates/{candidate_id}/gguf"
        return self._download(url, Path(path), params={"type": gguf_type}, timeout=600.0)

    def _download(self, url: str, path: Path, *, params: dict | None = None, timeout: float | None = None) -> Path:
        extra = {} if timeout is None else {"timeout": timeout}
        digest = hashlib.sha256()
        try:
            with self.http.stream("GET", url, params=params, **extra) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                expected = response.headers.get("x-checksum-sha256")
                with path.open("wb") as out:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.HTTPError as exc:
            raise DarwinfrontError(f"cannot download from {self.url}: {exc}") from exc
        if expected and digest.hexdigest() != expected:
            path.unlink(missing_ok=True)
            raise DarwinfrontError(f"the download of {url} from {self.url} does not match its SHA-256 "
                                   f"({digest.hexdigest()} != {expected}); download it again")
        return path

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
