"""Optuna as the record of every evaluated candidate, kept in the job's Redis (journal storage).

One study per job. A candidate scored in the final selection stage becomes a COMPLETE trial with values
(KL, parameters); one screened out in an earlier stage becomes a PRUNED trial whose intermediate value is its
partial-data fitness, so nothing evaluated is lost and the front only compares like with like. The front is
Optuna's own `best_trials`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from darwinfront.core import methods
from darwinfront.core.methods import Objective
from darwinfront.core.studies import study_storage
from search.genome import LevelSpace, PruneGenome

PRUNE_OBJECTIVES = methods.get("structured_prune").objectives  # (kl, params): what `record` and `front` write
optuna.logging.set_verbosity(logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="workers.tracking")


def open_study(
    redis_url: str, job_id: str, *, objectives: Sequence[Objective] = PRUNE_OBJECTIVES,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Create or reopen the job's study over its method's objectives (default: a prune job's)."""
    study = optuna.create_study(
        storage=study_storage(redis_url, job_id),
        study_name=f"darwinfront-{job_id}",
        directions=[o.direction for o in objectives],
        load_if_exists=True,
        sampler=sampler,
    )
    study.set_metric_names([o.name for o in objectives])
    return study


def genome_params(space: LevelSpace, genome: PruneGenome) -> tuple[dict, dict]:
    """The genome as Optuna params and distributions, one integer level per layer and group."""
    params, dists = {}, {}
    for i, (a, m) in enumerate(zip(genome.attn, genome.mlp, strict=True)):
        params[f"attn_{i}"], dists[f"attn_{i}"] = a, IntDistribution(0, space.attn_levels)
        params[f"mlp_{i}"], dists[f"mlp_{i}"] = m, IntDistribution(0, space.mlp_levels)
    return params, dists


def record(study: optuna.Study, space: LevelSpace, result: dict, *, final: bool) -> None:
    """Add one evaluated candidate to the study; `result` is an evaluator's reply plus its request fields."""
    genome = PruneGenome.from_dict(result["genome"])
    params, dists = genome_params(space, genome)
    attrs = {k: result[k] for k in ("candidate_id", "target", "generation", "stage", "genome", "seed", "train_tokens")
             if k in result}
    attrs.update({k: result[k] for k in ("held_out_kl", "perplexity", "seconds") if result.get(k) is not None})
    if result.get("error"):
        attrs["error"] = result["error"]
        trial = optuna.trial.create_trial(
            state=TrialState.FAIL, params=params, distributions=dists, user_attrs=attrs
        )
    elif final:
        trial = optuna.trial.create_trial(
            values=[result["kl"], float(result["params"])], params=params, distributions=dists, user_attrs=attrs
        )
    else:
        trial = optuna.trial.create_trial(
            state=TrialState.PRUNED,
            params=params,
            distributions=dists,
            user_attrs=attrs,
            intermediate_values={int(result["stage"]): result["kl"]},
        )
    study.add_trial(trial)


def front(study: optuna.Study) -> list[dict]:
    """The Pareto front as points (one per distinct genome), sorted by parameter count."""
    points, seen = [], set()
    for trial in study.best_trials:
        key = PruneGenome.from_dict(trial.user_attrs["genome"]).key()
        if key in seen:
            continue
        seen.add(key)
        points.append(
            {
                "candidate_id": trial.user_attrs["candidate_id"],
                "objectives": dict(zip([o.name for o in PRUNE_OBJECTIVES], trial.values, strict=True)),
                "target": trial.user_attrs.get("target"),
                "generation": trial.user_attrs.get("generation"),
                "trial": trial.number,
                "held_out_kl": trial.user_attrs.get("held_out_kl"),
            }
        )
    points.sort(key=lambda p: p["objectives"]["params"])
    for p in points:
        p["objectives"]["params"] = int(p["objectives"]["params"])
    return points


def recorded(study: optuna.Study) -> dict[str, dict]:
    """Every recorded candidate's result by candidate id: `kl` (final or partial-data fitness) or `error`."""
    results = {}
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if trial.state == TrialState.COMPLETE:
            results[attrs["candidate_id"]] = {"kl": trial.values[0]}
        elif trial.state == TrialState.PRUNED:
            results[attrs["candidate_id"]] = {"kl": next(iter(trial.intermediate_values.values()))}
        elif trial.state == TrialState.FAIL:
            results[attrs["candidate_id"]] = {"kl": None, "error": attrs.get("error", "failed")}
    return results


def trial_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False))
