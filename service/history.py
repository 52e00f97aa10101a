"""How good a job's front is, now and generation by generation: hypervolume from `search.pareto`.

The two objectives (KL, parameters) live on different scales, so the hypervolume is taken on a fixed, bounded
scaling that every job shares: parameters as a fraction of the dense model, KL as `1 - exp(-KL)` (0 for a
perfect copy, approaching 1 as the model is lost), against the reference point (1, 1). It lies in [0, 1), grows
whenever the front improves anywhere, and is comparable across generations of a job.

The per-generation history reads the job's Optuna study (journal storage in the same Redis), so it is exact
for every generation, not only the ones a viewer happened to watch.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from darwinfront.core.store import JobStore
from darwinfront.core.studies import study_storage
from search.pareto import hypervolume_2d

log = logging.getLogger(__name__)
REFERENCE = (1.0, 1.0)
SCALING = "params / dense params and 1 - exp(-KL), against the reference point (1, 1)"
optuna.logging.set_verbosity(logging.WARNING)


def scaled(kl: float, params: float, dense_params: int) -> tuple[float, float]:
    """The point (parameter fraction, 1 - exp(-KL)) the hypervolume is measured on."""
    if dense_params <= 0:
        raise ValueError(f"dense_params must be positive, got {dense_params}")
    return params / dense_params, -math.expm1(-kl)


def front_hypervolume(points: Iterable[dict[str, Any]], dense_params: int) -> float:
    """Hypervolume of front points (dicts with `objectives: {kl, params}`) on the shared scaling."""
    scaled_points = [scaled(p["objectives"]["kl"], p["objectives"]["params"], dense_params) for p in points]
    return hypervolume_2d(scaled_points, REFERENCE)


def hypervolume_by_generation(trials: Iterable[tuple[int, float, float]], dense_params: int) -> dict[int, float]:
    """Hypervolume of everything scored up to each generation.

    Args:
        trials: (generation, kl, params) of each final-stage candidate.
        dense_params: The dense model's parameter count.

    Returns:
        generation -> hypervolume of the candidates of that generation and all earlier ones (non-decreasing).
    """
    history: dict[int, float] = {}
    seen: list[tuple[float, float]] = []
    for generation, kl, params in sorted(trials):
        seen.append(scaled(kl, params, dense_params))
        history[generation] = hypervolume_2d(seen, REFERENCE)  # the last trial of a generation sets its value
    return history


def dense_params(store: JobStore, job_id: str) -> int | None:
    """The dense model's parameter count, from the job's `prepared` event (None before it is prepared)."""
    for event in store.events(job_id, count=20):
        if event["kind"] == "prepared":
            dense = (event["data"].get("dense") or {}).get("params")
            return int(dense) if dense else None
    return None


@functools.lru_cache(maxsize=32)
def job_storage(redis_url: str, job_id: str) -> JournalStorage:
    """The Optuna storage of a job's study (cached: a journal replays its log once, then reads what is new).

    Open it in optuna-dashboard with `optuna_dashboard.run_server(job_storage(url, job_id))`.
    """
    return study_storage(redis_url, job_id)


def study_trials(redis_url: str, job_id: str) -> list[tuple[int, float, float]]:
    """(generation, kl, params) of every complete (final-stage) trial of the job's study; [] without a study."""
    storage = job_storage(redis_url, job_id)
    if not optuna.get_all_study_names(storage):
        return []
    study = optuna.load_study(study_name=None, storage=storage)
    names = study.metric_names or ["kl", "params"]
    trials = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        values = dict(zip(names, trial.values, strict=True))
        generation = trial.user_attrs.get("generation")
        if generation is not None and "kl" in values and "params" in values:
            trials.append((int(generation), float(values["kl"]), float(values["params"])))
    return trials


def job_history(store: JobStore, redis_url: str, job_id: str) -> dict[str, Any]:
    """Per generation: best fitness per target and front size (the driver's reports) and the hypervolume.

    Returns:
        `{dense_params, points: [{generation, best, front_size, hypervolume}]}`, oldest generation first;
        hypervolume is None when the dense size is not known yet.
    """
    reports = [e["data"] for e in store.events(job_id, count=10_000) if e["kind"] == "generation"]
    dense = dense_params(store, job_id)
    volumes = hypervolume_by_generation(study_trials(redis_url, job_id), dense) if dense else {}
    points = []
    for report in reports:
        generation = int(report["generation"])
        known = [g for g in volumes if g <= generation]
        points.append({"generation": generation, "best": report.get("best") or {},
                       "front_size": report.get("front_size"),
                       "hypervolume": volumes[max(known)] if known else None})
    return {"dense_params": dense, "points": points}
