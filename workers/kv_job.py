"""The `kv_precision` job: KVTuner's profile -> prune -> group, then a multi-objective Optuna search on Ray.

Objectives, both minimised: KL(full precision ‖ quantized KV) on calibration tokens with K/V quantized inside
the forward, and the average nominal bits Σ(k + v) / 2L (effective bits, with scales, zero points and the
residual window, are an attribute). `kv.max_bits` caps the memory as an Optuna constraint. The study is seeded
with the uniform presets (KV8, K8V4, KV4, K4V2, KV2) and is the record; the front is its `best_trials`.
"""

from __future__ import annotations

import logging

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

import darwinfront
from darwinfront.core.spec import KVJobSpec
from search.kv_space import PRESETS, KVSpace, pair_name
from workers import tracking
from workers.job import Job
from workers.kv_evaluator import KVEvaluator, prepare_kv
from workers.pool import EvaluatorPool, run_prepare
from workers.progress import StepReport
from workers.telemetry import Telemetry

log = logging.getLogger(__name__)
FORMAT = "darwinfront.kv_precision/1"


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return trial.user_attrs.get("constraint", [0.0])


def make_sampler(spec: KVJobSpec) -> optuna.samplers.BaseSampler:
    """NSGA-II with a small population, or multivariate TPE; both honour the memory cap as a constraint."""
    if spec.kv.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, constraints_func=_constraints)
    return optuna.samplers.NSGAIISampler(
        population_size=spec.kv.population, seed=spec.seed, constraints_func=_constraints
    )


def distributions(space: KVSpace) -> dict[str, CategoricalDistribution]:
    return {f"g{i}": CategoricalDistribution([pair_name(p) for p in g.candidates]) for i, g in enumerate(space.groups)}


def layers_of(space: KVSpace, params: dict) -> list[list[int]]:
    names = [[pair_name(p) for p in g.candidates] for g in space.groups]
    return space.expand([names[i].index(params[f"g{i}"]) for i in range(len(space.groups))])


class KVJob(Job):
    """Runs one KV-precision job to completion (or cancellation); it stops after the running batch when the
    driver stops."""

    def run(self) -> None:
        spec = self.spec
        gpus = spec.resources.gpus_per_evaluator
        report = StepReport(self.redis_url, self.job_id)
        prepared = run_prepare(self.spec_dict, gpus=gpus, fn=prepare_kv, report=report)
        space = KVSpace.from_dict(prepared["space"])
        self.store.put_sensitivity(self.job_id, prepared["table"])
        self.event("profiled", {
            "groups": [list(g.layers) for g in space.groups], "reduced_space": space.size(),
            "full_space": prepared["full_space"],
        })
        study = tracking.open_study(self.redis_url, self.job_id, objectives=self.method.objectives,
                                    sampler=make_sampler(spec))
        self._seed_presets(study, space)
        pool = EvaluatorPool(self.spec_dict, prepared, size=spec.resources.evaluators, gpus=gpus, evaluator=KVEvaluator,
                             meter=Telemetry.from_url(self.redis_url), job_id=self.job_id)
        try:
            pool.wait_ready(report, " (model, data, full-precision outputs)")
            self._search(spec, space, study, pool)
        finally:
            pool.shutdown()
        self._finish(spec, space, study, prepared)

    def _seed_presets(self, study: optuna.Study, space: KVSpace) -> None:
        if study.get_trials(deepcopy=False):
            return  # a resumed job: the presets were enqueued the first time
        for name in PRESETS:
            try:
                choice = space.uniform_choice(name)
            except ValueError:  # pruned from some group's candidates
                continue
            pairs = [g.candidates[c] for g, c in zip(space.groups, choice, strict=True)]
            params = {f"g{i}": pair_name(p) for i, p in enumerate(pairs)}
            study.enqueue_trial(params, user_attrs={"preset": name})

    def _search(self, spec: KVJobSpec, space: KVSpace, study: optuna.Study, pool: EvaluatorPool) -> None:
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(stale.number, state=TrialState.FAIL)  # asked by a driver that died; asked again below
        dists = distributions(space)
        batch_size = min(spec.kv.population, max(spec.resources.evaluators, 1) * 4)
        while (done := _completed(study)) < spec.kv.trials:
            trials = [study.ask(dists) for _ in range(min(batch_size, spec.kv.trials - done))]
            requests = [
                {"candidate_id": f"kv-{t.number}", "trial": t.number, "layers": layers_of(space, t.params)}
                for t in trials
            ]
            replies = {req["trial"]: reply for req, reply in pool.map_unordered(requests)}
            for trial in trials:  # tell in ask order: the same study whatever the completion order
                self._tell(study, trial, replies[trial.number], spec.kv.max_bits)
            self._report(spec, study)

    @staticmethod
    def _tell(study: optuna.Study, trial: optuna.Trial, reply: dict, max_bits: float | None) -> None:
        trial.set_user_attr("candidate_id", reply["candidate_id"])
        trial.set_user_attr("layers", reply["layers"])
        if reply.get("error"):
            trial.set_user_attr("error", reply["error"])
            study.tell(trial, state=TrialState.FAIL)
            return
        nominal = reply["bits"]["nominal"]
        trial.set_user_attr("effective_bits", reply["bits"]["effective"])
        trial.set_user_attr("constraint", [nominal - max_bits if max_bits is not None else 0.0])
        study.tell(trial, [reply["kl"], nominal])

    def _report(self, spec: KVJobSpec, study: optuna.Study) -> None:
        front = kv_front(study)
        done = _completed(study)
        generation = (done - 1) // spec.kv.population if done else 0
        best = min((p["objectives"]["kl"] for p in front), default=None)
        progress = {"generation": generation, "generations": -(-spec.kv.trials // spec.kv.population),
                    "evaluations": done, "planned": spec.kv.trials, "best": {"kl": best}}
        self.generation_done(generation, front=front, progress=progress,
                             event={"generation": generation, "front_size": len(front)})

    def _finish(self, spec: KVJobSpec, space: KVSpace, study: optuna.Study, prepared: dict) -> None:
        front = kv_front(study)
        if not front:
            raise RuntimeError("no configuration was evaluated successfully (or none meets kv.max_bits)")
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        for point in front:
            trial = trials[point["trial"]]
            self.store.put_result(self.job_id, point["candidate_id"], {
                "format": FORMAT,
                "darwinfront_version": darwinfront.__version__,
                "candidate_id": point["candidate_id"],
                "model": {"source": spec.model.source, "num_hidden_layers": prepared["num_layers"],
                          "head_dim": prepared["head_dim"]},
                "mode": spec.kv.mode, "group_size": spec.kv.group_size, "residual": spec.kv.residual,
                "layers": trial.user_attrs["layers"],
                "bits": {"nominal": trial.values[1], "effective": trial.user_attrs["effective_bits"]},
                "metrics": {"kl": trial.values[0]},
                "seed": spec.seed,
            })
        self.publish_front(front, generation=None)


def kv_front(study: optuna.Study) -> list[dict]:
    """The front as points sorted by bits; one per distinct per-layer configuration."""
    points, seen = [], set()
    for trial in sorted(study.best_trials, key=lambda t: (t.values[1], t.number)):
        key = str(trial.user_attrs.get("layers"))
        if key in seen:
            continue
        seen.add(key)
        points.append({
            "candidate_id": trial.user_attrs["candidate_id"], "trial": trial.number,
            "objectives": {"kl": trial.values[0], "bits": trial.values[1]},
            "effective_bits": trial.user_attrs.get("effective_bits"), "preset": trial.user_attrs.get("preset"),
        })
    return points


def _completed(study: optuna.Study) -> int:
    """Evaluations done: complete trials and evaluated failures (not trials a dead driver left unfinished)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    return sum(1 for t in trials if t.state == TrialState.COMPLETE or "error" in t.user_attrs)
