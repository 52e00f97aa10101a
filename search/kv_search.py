"""The KV-cache precision search (KVTuner): Optuna's NSGA-II or TPE over one bit pair per layer group, as ask/tell.

Objectives, both minimised: the KL the driver measures (full precision ‖ quantized KV), and the average nominal
bits Σ(k + v) / 2L, which the search reads off the configuration itself. `max_bits` caps the memory as an Optuna
constraint. The search starts with the uniform presets (KV8, K8V4, KV4, K4V2, KV2) that survived the space's
pruning, then lets the sampler propose, a round (`batch` configurations) at a time.

The sampler works on a study of its own, in memory, so that a checkpoint can replay its asks and tells and
restore the sampler's random state exactly. Each finished round is copied, in ask order, into the `record`
study the job hands in (the job's journal in Redis; this module never opens it): the record's trial numbers
are the candidates' numbers, its `best_trials` honour the constraint, and a candidate the record already
holds (told again after a restart) is not copied twice. Pure Python besides Optuna: no torch, Ray or Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from search.kv_space import PRESETS, KVSpace, pair_name
from search.replay import Replayed, Rounds
from search.strategy import BestSoFar

OBJECTIVES = ("kl", "bits")


def _constraints(trial: FrozenTrial) -> list[float]:
    return trial.user_attrs.get("constraint", [0.0])


# NSGA-II with a small population, or multivariate TPE; both honour the memory cap as a constraint.
SAMPLERS: dict[str, Callable[[int, int], optuna.samplers.BaseSampler]] = {
    "nsga2": lambda seed, population: optuna.samplers.NSGAIISampler(
        population_size=population, seed=seed, constraints_func=_constraints
    ),
    "tpe": lambda seed, population: optuna.samplers.TPESampler(
        seed=seed, multivariate=True, constraints_func=_constraints
    ),
}


def distributions(space: KVSpace) -> dict[str, CategoricalDistribution]:
    """One categorical parameter per group, `g<i>`, over its candidate pairs' names."""
    return {f"g{i}": CategoricalDistribution([pair_name(p) for p in g.candidates]) for i, g in enumerate(space.groups)}


def layers_of(space: KVSpace, params: dict) -> list[list[int]]:
    """Per-layer `[k_bits, v_bits]` of a trial's `g<i>` parameters."""
    names = [[pair_name(p) for p in g.candidates] for g in space.groups]
    return space.expand([names[i].index(params[f"g{i}"]) for i in range(len(space.groups))])


def preset_params(space: KVSpace) -> dict[str, dict]:
    """The presets the space still allows, as trial parameters by preset name."""
    presets = {}
    for name in PRESETS:
        try:
            choice = space.uniform_choice(name)
        except ValueError:  # pruned from some group's candidates
            continue
        pairs = [g.candidates[c] for g, c in zip(space.groups, choice, strict=True)]
        presets[name] = {f"g{i}": pair_name(p) for i, p in enumerate(pairs)}
    return presets


@dataclass(frozen=True)
class KVRequest:
    """One configuration to evaluate: per-layer `[k_bits, v_bits]`, Optuna trial `trial`."""

    candidate_id: str
    trial: int
    layers: list[list[int]]

    def to_dict(self) -> dict:
        return {"candidate_id": self.candidate_id, "trial": self.trial, "layers": self.layers}


class KVSearch(Replayed):
    """The KV precision search of one job, as ask/tell.

    Args:
        space: the pruned, grouped pair space.
        record: the study every finished round is copied into (objectives kl, bits).
        sampler: a name in `SAMPLERS`.
        seed: the sampler's seed.
        population: NSGA-II's population.
        trials: configurations to evaluate.
        batch: configurations per round (asked together, as Optuna's samplers see them).
        max_bits: the memory cap on average nominal bits, or None.
    """

    name = "kv"

    def __init__(
        self,
        space: KVSpace,
        record: optuna.Study,
        *,
        sampler: str = "nsga2",
        seed: int,
        population: int = 16,
        trials: int,
        batch: int,
        max_bits: float | None = None,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown KV sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
        self._space, self._record, self._max_bits = space, record, max_bits
        self._study = optuna.create_study(directions=["minimize"] * len(OBJECTIVES),
                                          sampler=SAMPLERS[sampler](seed, population))
        for name, params in preset_params(space).items():
            self._study.enqueue_trial(params, user_attrs={"preset": name})
        self._dists = distributions(space)
        self._rounds = Rounds(trials, batch, first=batch)
        self._queue: list[KVRequest] = []  # asked of the sampler, not handed out yet
        self._open: dict[str, optuna.Trial] = {}  # asked of the sampler, not told
        self._finished: list[FrozenTrial] = []  # told in the open round, to record when it ends
        self._given = self._told = 0
        self._recorded = {t.user_attrs.get("candidate_id") for t in record.get_trials(deepcopy=False)}
        self._best: BestSoFar[list[list[int]] | None] = BestSoFar(None)

    def _ask(self, limit: int | None) -> list[KVRequest]:
        room = self._rounds.room(self._given, self._told)
        if room > 0 and not self._queue:  # a round opens: the sampler proposes all of it before any result
            for _ in range(room):
                trial = self._study.ask(self._dists)
                request = KVRequest(f"kv-{trial.number}", trial.number, layers_of(self._space, trial.params))
                self._open[request.candidate_id] = trial
                self._queue.append(request)
        fresh = self._queue if limit is None else self._queue[:limit]
        self._queue = self._queue[len(fresh):]
        self._given += len(fresh)
        return fresh

    def tell(
        self, candidate_id: str, fitness: float | None, error: str | None = None, *, attrs: dict | None = None
    ) -> None:
        """Record a configuration's KL (None, NaN or inf: it failed); `attrs`: measurements recorded with it
        (JSON-safe Optuna user attributes, e.g. `effective_bits`).

        Raises:
            ValueError: `candidate_id` was not asked, or was told already.
        """
        self._logged_tell(candidate_id, fitness, error, dict(attrs or {}))

    def _tell(self, candidate_id: str, fitness: float | None, error: str | None, attrs: dict) -> None:
        if candidate_id not in self._open or any(r.candidate_id == candidate_id for r in self._queue):
            raise ValueError(f"candidate {candidate_id!r} was not asked, or was told already")
        trial = self._open.pop(candidate_id)
        layers = layers_of(self._space, trial.params)
        trial.set_user_attr("candidate_id", candidate_id)
        trial.set_user_attr("layers", layers)
        if fitness is None:
            trial.set_user_attr("error", error)
            frozen = self._study.tell(trial, state=TrialState.FAIL)
        else:
            nominal = sum(k + v for k, v in layers) / (2 * self._space.num_layers)
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            over = nominal - self._max_bits if self._max_bits is not None else 0.0
            trial.set_user_attr("constraint", [over])
            frozen = self._study.tell(trial, [fitness, nominal])
            if over <= 0:
                self._best.offer(fitness, trial.number, layers)
        self._told += 1
        self._finished.append(frozen)
        if not self._open:
            self._record_round()

    def _record_round(self) -> None:
        for trial in sorted(self._finished, key=lambda t: t.number):
            if trial.user_attrs["candidate_id"] not in self._recorded:
                self._record.add_trial(trial)
                self._recorded.add(trial.user_attrs["candidate_id"])
        self._finished = []

    @property
    def finished(self) -> bool:
        return self._told >= self._rounds.budget

    @property
    def evaluations(self) -> int:
        return self._told

    @property
    def rounds(self) -> int:
        return self._rounds.completed(self._given, self._told, ended=self.finished)

    @property
    def best(self) -> list[list[int]] | None:
        """The lowest-KL configuration within the memory cap so far (None before one)."""
        return self._best.candidate

    @property
    def best_fitness(self) -> float | None:
        return self._best.fitness
