"""How good a job's front is, now and generation by generation: hypervolume from `search.pareto`.

The objectives live on different scales, so the hypervolume is taken on a fixed, bounded scaling that every job
shares, chosen by each objective's unit (the front carries its objectives): KL in nats as `1 - exp(-KL)` (0 for a
perfect copy, approaching 1 as the model is lost), parameters as a fraction of the dense model, bytes (a joint
job's memory at its deployment point) as a fraction of the dense model's at 16-bit KV, bits per element as a
fraction of 16 (half precision), milliseconds (a joint job's measured decoding latency) as `ms / (ms + dense)`
with the dense model's latency measured at prepare (0.5 for the dense model's speed; bounded, since a measured
latency may exceed the dense one), against the reference point (1, ..., 1). It lies in [0, 1), grows whenever
the front improves anywhere, and is comparable across generations of a job. A front with an objective of another
unit, or one to maximise, has no hypervolume.

The per-generation history reads the job's Optuna study (journal storage in the same Redis), so it is exact
for every generation, not only the ones a viewer happened to watch.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from darwinfront.core.methods import Objective
from darwinfront.core.store import JobStore
from darwinfront.core.studies import study_storage
from search.pareto import hypervolume

log = logging.getLogger(__name__)
# unit -> (value, the dense model's size in that unit) onto [0, 1) for a minimised objective
UNIT_SCALES: dict[str, Callable[[float, int], float]] = {
    "nats": lambda value, dense: -math.expm1(-value),
    "parameters": lambda value, dense: value / dense,
    "bytes": lambda value, dense: value / dense,
    "bits/element": lambda value, dense: value / 16,
    "ms": lambda value, dense: value / (value + dense),
}
SIZED = ("parameters", "bytes", "ms")  # the units scaled by the dense model's, known once the job is prepared
SCALING = ("by unit: nats as 1 - exp(-KL), parameters as a fraction of the dense model, bytes as a fraction of "
           "the dense model's memory at the deployment point, bits/element as a fraction of 16, ms as "
           "ms / (ms + the dense model's measured ms); against the reference point (1, ..., 1)")
Dense = Mapping[str, float]  # unit -> the dense model's size in it ("parameters", "bytes", "ms"), where known
optuna.logging.set_verbosity(logging.WARNING)


def scalable(objectives: Sequence[Objective], dense: Dense) -> bool:
    """Whether a front of these objectives has a hypervolume (every one minimised, of a known unit, and the dense
    size known in each unit that is `SIZED`)."""
    return bool(objectives) and all(
        o.direction == "minimize" and o.unit in UNIT_SCALES and (o.unit not in SIZED or bool(dense.get(o.unit)))
        for o in objectives
    )


def scaled(values: Mapping[str, float], objectives: Sequence[Objective], dense: Dense) -> tuple[float, ...]:
    """The point the hypervolume is measured on: each objective's value on its unit's scale, in their order.

    Raises:
        ValueError: The objectives are not `scalable`.
    """
    if not scalable(objectives, dense):
        raise ValueError(f"no hypervolume scaling for objectives {[o.model_dump() for o in objectives]} "
                         f"with dense sizes {dict(dense)}")
    return tuple(UNIT_SCALES[o.unit](values[o.name], dense.get(o.unit, 0)) for o in objectives)


def front_hypervolume(front: Mapping[str, Any], dense: Dense) -> float | None:
    """Hypervolume of a front snapshot (`objectives` and `points`) on the shared scaling; None if not `scalable`."""
    objectives = [Objective.model_validate(o) for o in front["objectives"]]
    if not scalable(objectives, dense):
        return None
    points = [scaled(p["objectives"], objectives, dense) for p in front["points"]]
    return hypervolume(points, (1.0,) * len(objectives))


def hypervolume_by_generation(
    trials: Iterable[tuple[int, Mapping[str, float]]], objectives: Sequence[Objective], dense: Dense
) -> dict[int, float]:
    """Hypervolume of everything scored up to each generation.

    Args:
        trials: (generation, objective values by name) of each final-stage candidate.
        objectives: The front's objectives (`scalable` ones).
        dense: The dense model's size by unit (`dense_sizes`).

    Returns:
        generation -> hypervolume of the candidates of that generation and all earlier ones (non-decreasing).
    """
    history: dict[int, float] = {}
    seen: list[tuple[float, ...]] = []
    reference = (1.0,) * len(objectives)
    for generation, values in sorted(trials, key=lambda t: t[0]):
        seen.append(scaled(values, objectives, dense))
        history[generation] = hypervolume(seen, reference)  # the last trial of a generation sets its value
    return history


def dense_sizes(store: JobStore, job_id: str) -> dict[str, float]:
    """The dense model's size by unit, from the job's `prepared` event: `parameters` (its `dense.params`) and, for
    a joint job, `bytes` (its `dense_memory`) and, when it measures latency, `ms` (its `dense_latency_ms`); {}
    before it is prepared."""
    for event in store.events(job_id, count=20):
        if event["kind"] == "prepared":
            data = event["data"]
            sizes = {"parameters": (data.get("dense") or {}).get("params"), "bytes": data.get("dense_memory"),
                     "ms": data.get("dense_latency_ms")}
            return {unit: float(size) if unit == "ms" else int(size) for unit, size in sizes.items() if size}
    return {}


@functools.lru_cache(maxsize=32)
def job_storage(redis_url: str, job_id: str) -> JournalStorage:
    """The Optuna storage of a job's study (cached: a journal replays its log once, then reads what is new).

    Open it in optuna-dashboard with `optuna_dashboard.run_server(job_storage(url, job_id))`.
    """
    return study_storage(redis_url, job_id)


def study_trials(redis_url: str, job_id: str) -> list[tuple[int, dict[str, float]]]:
    """(generation, objective values by name) of every complete (final-stage) trial of the job's study that
    records its generation; [] without a study."""
    storage = job_storage(redis_url, job_id)
    if not optuna.get_all_study_names(storage):
        return []
    study = optuna.load_study(study_name=None, storage=storage)
    trials = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        generation = trial.user_attrs.get("generation")
        if generation is not None:
            trials.append((int(generation), dict(zip(study.metric_names, trial.values, strict=True))))
    return trials


def job_history(store: JobStore, redis_url: str, job_id: str) -> dict[str, Any]:
    """Per generation: best fitness per target and front size (the driver's reports) and the hypervolume.

    Returns:
        `{dense_params, dense_bytes, dense_latency_ms, points: [{generation, best, front_size, hypervolume}]}`,
        oldest generation first; hypervolume is None when the front's objectives have no scaling yet (no front, or
        the dense size unknown).
    """
    reports = [e["data"] for e in store.events(job_id, count=10_000) if e["kind"] == "generation"]
    dense = dense_sizes(store, job_id)
    objectives = [Objective.model_validate(o) for o in store.get_front(job_id)["objectives"]]
    volumes = {}
    if scalable(objectives, dense):
        volumes = hypervolume_by_generation(study_trials(redis_url, job_id), objectives, dense)
    points = []
    for report in reports:
        generation = int(report["generation"])
        known = [g for g in volumes if g <= generation]
        points.append({"generation": generation, "best": report.get("best") or {},
                       "front_size": report.get("front_size"),
                       "hypervolume": volumes[max(known)] if known else None})
    return {"dense_params": dense.get("parameters"), "dense_bytes": dense.get("bytes"),
            "dense_latency_ms": dense.get("ms"), "points": points}
