"""What a running job produces, kept in Redis: progress, the event log, front snapshots, results, artifacts
and checkpoints (mixed into `JobStore`, which holds the client).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import redis

from darwinfront.core import keys
from darwinfront.core.errors import CandidateNotFound

EVENTS_MAXLEN = 1000
_MAX_STREAM_ID = 2**64 - 1  # each half of a stream id is an unsigned 64-bit number


def utc_now() -> str:
    """Now, as a UTC ISO-8601 string (how the store writes times)."""
    return datetime.now(UTC).isoformat()


def to_json(value: Any) -> str:
    """Compact JSON, refusing NaN and infinities (how the store writes documents)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks (a model archive, a GGUF source)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _after_id(after: str) -> str | None:
    """The exclusive XRANGE start for events after `after`, or None when no stream id can follow it."""
    ms_text, _, seq_text = after.partition("-")
    if not ms_text.isdigit() or not (seq_text or "0").isdigit():
        raise ValueError(f"event id {after!r} is not '<ms>-<seq>'")
    ms, seq = int(ms_text), min(int(seq_text or 0), _MAX_STREAM_ID)
    if ms > _MAX_STREAM_ID or (ms, seq) == (_MAX_STREAM_ID, _MAX_STREAM_ID):
        return None
    return f"({ms}-{seq}"


def _event_fields(kind: str, data: dict[str, Any]) -> dict[str, str]:
    return {"time": utc_now(), "kind": kind, "data": to_json(data)}


def queue_event(pipe: redis.client.Pipeline, maxlen: int, job_id: str, kind: str, data: dict[str, Any]) -> None:
    """Queue an event append on a transaction pipeline (so it commits with the change it reports)."""
    pipe.xadd(keys.events(job_id), _event_fields(kind, data), maxlen=maxlen, approximate=True)


class JobOutputs:
    """Progress, events, fronts, results, artifacts and checkpoints of jobs (mixed into `JobStore`)."""

    _r: redis.Redis
    _events_maxlen: int

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Replace the progress report (generation, generations, evaluations, planned, best)."""
        self._r.set(keys.progress(job_id), to_json(progress))

    def append_event(self, job_id: str, kind: str, data: dict[str, Any]) -> str:
        """Append an event to the job's capped stream; returns its stream id."""
        return self._r.xadd(keys.events(job_id), _event_fields(kind, data),
                            maxlen=self._events_maxlen, approximate=True)

    def events(self, job_id: str, after: str = "0-0", count: int = 100) -> list[dict[str, Any]]:
        """Up to `count` events after stream id `after` (`<ms>-<seq>`), oldest first: dicts of id, time, kind,
        data. An id past the largest a stream can hold has nothing after it."""
        start = _after_id(after)
        if start is None:
            return []
        entries = self._r.xrange(keys.events(job_id), min=start, max="+", count=count)
        return [
            {"id": entry_id, "time": f["time"], "kind": f["kind"], "data": json.loads(f["data"])}
            for entry_id, f in entries
        ]

    def set_front(
        self, job_id: str, points: list[dict[str, Any]], *, objectives: list[dict[str, str]],
        generation: int | None = None,
    ) -> None:
        """Replace the front snapshot.

        Args:
            job_id: The job.
            points: Dicts of candidate_id, objectives (e.g. {"kl": .., "params": ..}), target, generation.
            objectives: The front's objectives, as its method declares them (dicts of name, direction, unit).
            generation: The search generation of the snapshot; default the largest among the points.
        """
        if generation is None:
            generations = [p["generation"] for p in points if p.get("generation") is not None]
            generation = max(generations, default=None)
        snapshot = {"objectives": objectives, "points": points, "updated_at": utc_now(), "generation": generation}
        self._r.set(keys.front(job_id), to_json(snapshot))

    def get_front(self, job_id: str) -> dict[str, Any]:
        """The latest front snapshot: {objectives, points, updated_at, generation} (empty before the first one)."""
        raw = self._r.get(keys.front(job_id))
        return json.loads(raw) if raw else {"objectives": [], "points": [], "updated_at": None, "generation": None}

    def get_scored_front(self, job_id: str) -> dict[str, Any]:
        """`get_front`, each point of a candidate that an evaluate job scored carrying its `scores` (what the API
        shows)."""
        snapshot, scores = self.get_front(job_id), self.get_scores(job_id)
        for point in snapshot["points"]:
            if point["candidate_id"] in scores:
                point["scores"] = scores[point["candidate_id"]]
        return snapshot

    def put_result(self, job_id: str, candidate_id: str, configuration: dict[str, Any]) -> None:
        """Store a candidate's configuration document."""
        self._r.hset(keys.results(job_id), candidate_id, to_json(configuration))

    def get_result(self, job_id: str, candidate_id: str) -> dict[str, Any]:
        """A candidate's configuration; raises `CandidateNotFound` if none was stored."""
        raw = self._r.hget(keys.results(job_id), candidate_id)
        if raw is None:
            raise CandidateNotFound(f"job {job_id!r} has no candidate {candidate_id!r}")
        return json.loads(raw)

    def result_ids(self, job_id: str) -> list[str]:
        """Ids of the candidates with a stored configuration, sorted."""
        return sorted(self._r.hkeys(keys.results(job_id)))

    def put_artifact(self, job_id: str, candidate_id: str, meta: dict[str, Any]) -> None:
        """Record an exported model archive.

        Args:
            job_id: The job.
            candidate_id: The exported candidate.
            meta: path (relative to `<data_dir>/artifacts/`, inside the job's folder: `<job_id>/<file>`),
                size (bytes), sha256 (hex).
        """
        path = meta.get("path")
        parts = PurePosixPath(path) if isinstance(path, str) else None
        if parts is None or parts.is_absolute() or ".." in parts.parts or parts.parts[:1] != (job_id,):
            raise ValueError(f"artifact path {path!r} must be relative to the artifacts directory and inside "
                             f"the job's folder, like '{job_id}/<file>'")
        self._r.hset(keys.artifacts(job_id), candidate_id, to_json(meta))

    def get_artifact(self, job_id: str, candidate_id: str) -> dict[str, Any]:
        """An exported model's metadata; raises `CandidateNotFound` if the candidate was not exported."""
        raw = self._r.hget(keys.artifacts(job_id), candidate_id)
        if raw is None:
            raise CandidateNotFound(f"candidate {candidate_id!r} of job {job_id!r} has no exported model")
        return json.loads(raw)

    def add_artifact_checksum(self, job_id: str, candidate_id: str, sha256: str) -> dict[str, Any] | None:
        """Record the SHA-256 of an archive hashed after its export (on its first download); returns the record,
        or None when it went away meanwhile (its job deleted), which this leaves gone."""

        def write(pipe: redis.client.Pipeline) -> dict[str, Any] | None:
            raw = pipe.hget(keys.artifacts(job_id), candidate_id)
            if raw is None:
                return None
            meta = {**json.loads(raw), "sha256": sha256}
            pipe.multi()
            pipe.hset(keys.artifacts(job_id), candidate_id, to_json(meta))
            return meta

        return self._r.transaction(write, keys.artifacts(job_id), value_from_callable=True)

    def merge_scores(self, job_id: str, candidate_id: str, scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Add lm-eval scores (task -> entry) to a candidate's; a task scored again is replaced. Returns them all."""

        def write(pipe: redis.client.Pipeline) -> dict[str, Any]:
            raw = pipe.hget(keys.scores(job_id), candidate_id)
            merged = {**(json.loads(raw) if raw else {}), **scores}
            pipe.multi()
            pipe.hset(keys.scores(job_id), candidate_id, to_json(merged))
            return merged

        return self._r.transaction(write, keys.scores(job_id), value_from_callable=True)

    def get_scores(self, job_id: str) -> dict[str, dict[str, Any]]:
        """Every scored candidate's lm-eval scores: candidate id -> task -> entry (empty when none was scored)."""
        return {cid: json.loads(raw) for cid, raw in self._r.hgetall(keys.scores(job_id)).items()}

    def get_dense_score(self, job_id: str, setting: str) -> dict[str, Any] | None:
        """The dense model's cached score of one task under `setting` (a key the evaluator builds), or None."""
        raw = self._r.hget(keys.dense_scores(job_id), setting)
        return json.loads(raw) if raw else None

    def put_dense_score(self, job_id: str, setting: str, score: dict[str, Any]) -> None:
        """Cache the dense model's score of one task under `setting`."""
        self._r.hset(keys.dense_scores(job_id), setting, to_json(score))

    def put_sensitivity(self, job_id: str, table: dict[str, Any]) -> None:
        """Store a KV-precision job's sensitivity profile (per layer, per bit pair: e_o, e_k, e_v)."""
        self._r.set(keys.sensitivity(job_id), to_json(table))

    def get_sensitivity(self, job_id: str) -> dict[str, Any] | None:
        """The sensitivity profile, or None before profiling (and for pruning jobs)."""
        raw = self._r.get(keys.sensitivity(job_id))
        return json.loads(raw) if raw else None

    def save_checkpoint(self, job_id: str, generation: int, state: dict[str, Any]) -> None:
        """Replace the search checkpoint."""
        self._r.set(keys.checkpoint(job_id), to_json({"generation": generation, "state": state}))

    def load_checkpoint(self, job_id: str) -> tuple[int, dict[str, Any]] | None:
        """The latest checkpoint as (generation, state), or None if none was saved."""
        raw = self._r.get(keys.checkpoint(job_id))
        if raw is None:
            return None
        saved = json.loads(raw)
        return saved["generation"], saved["state"]

