"""The `kv_precision` job: KVTuner's profile -> prune -> group, then the multi-objective KV search on Ray.

Objectives, both minimised: KL(full precision ‖ quantized KV) on calibration tokens with K/V quantized inside
the forward, and the average nominal bits Σ(k + v) / 2L (effective bits, with scales, zero points and the
residual window, are an attribute). The search (`search.kv_search`: sampler, presets, `kv.max_bits`
constraint) records every configuration in the job's study; the front is its `best_trials`.
"""

from __future__ import annotations

import logging

import optuna
from optuna.trial import TrialState

import darwinfront
from darwinfront.core.spec import KVJobSpec
from search.kv_search import KVSearch
from search.kv_space import KVSpace
from workers import tracking
from workers.job import Job
from workers.kv.cache import KVPrecisionConfig
from workers.kv_evaluator import KVEvaluator, prepare_kv
from workers.pool import EvaluatorPool, run_prepare
from workers.progress import StepReport
from workers.telemetry import Telemetry

log = logging.getLogger(__name__)
FORMAT = "darwinfront.kv_precision/1"


class KVJob(Job):
    """Runs one KV-precision job to completion (or cancellation); it stops after the running round when the
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
        study = tracking.open_study(self.redis_url, self.job_id, objectives=self.method.objectives_of(self.spec))
        search = self._strategy(spec, space, study)
        pool = EvaluatorPool(self.spec_dict, prepared, size=spec.resources.evaluators, gpus=gpus, evaluator=KVEvaluator,
                             meter=Telemetry.from_url(self.redis_url), job_id=self.job_id, on_event=self.event)
        try:
            pool.wait_ready(report, " (model, data, full-precision outputs)")
            self._search(spec, search, study, pool)
        finally:
            pool.shutdown()
        self._finish(spec, space, study, prepared)

    def _strategy(self, spec: KVJobSpec, space: KVSpace, study: optuna.Study) -> KVSearch:
        """The job's KV search, recording in `study`; a resumed job loads it from its checkpoint."""
        kv = spec.kv
        search = KVSearch(
            space, study, sampler=kv.sampler, seed=spec.seed, population=kv.population, trials=kv.trials,
            batch=min(kv.population, max(spec.resources.evaluators, 1) * 4), max_bits=kv.max_bits,
        )
        checkpoint = self.store.load_checkpoint(self.job_id)
        if checkpoint is not None:
            search.load_state_dict(checkpoint[1])
        return search

    def _search(self, spec: KVJobSpec, search: KVSearch, study: optuna.Study, pool: EvaluatorPool) -> None:
        """Ask a round, evaluate what the study does not hold yet (a restart re-asks what it had), tell, checkpoint."""
        while not search.finished:
            requests = search.ask()
            recorded = tracking.recorded(study)
            fresh = [r.to_dict() for r in requests if r.candidate_id not in recorded]
            replies = {req["candidate_id"]: reply for req, reply in pool.map_unordered(fresh)}
            for request in requests:  # tell in ask order: the same study whatever the completion order
                reply = recorded.get(request.candidate_id) or replies[request.candidate_id]
                if reply.get("error"):
                    search.tell(request.candidate_id, None, reply["error"])
                else:
                    measured = {"effective_bits": reply["bits"]["effective"]} if "bits" in reply else None
                    search.tell(request.candidate_id, reply["kl"], attrs=measured)
            self._report(spec, study, checkpoint=search.state_dict())

    def _report(self, spec: KVJobSpec, study: optuna.Study, checkpoint: dict) -> None:
        front = kv_front(study)
        done = _completed(study)
        generation = (done - 1) // spec.kv.population if done else 0
        best = min((p["objectives"]["kl"] for p in front), default=None)
        progress = {"generation": generation, "generations": -(-spec.kv.trials // spec.kv.population),
                    "evaluations": done, "planned": spec.kv.trials, "best": {"kl": best}}
        self.generation_done(generation, front=front, progress=progress, checkpoint=checkpoint,
                             event={"generation": generation, "front_size": len(front)})

    def _finish(self, spec: KVJobSpec, space: KVSpace, study: optuna.Study, prepared: dict) -> None:
        front = kv_front(study)
        if not front:
            raise RuntimeError("no configuration was evaluated successfully (or none meets kv.max_bits)")
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        for point in front:
            trial = trials[point["trial"]]
            precision = KVPrecisionConfig(tuple(trial.user_attrs["layers"]), spec.kv.mode, spec.kv.group_size,
                                          spec.kv.residual)
            self.store.put_result(self.job_id, point["candidate_id"], {
                "format": FORMAT,
                "darwinfront_version": darwinfront.__version__,
                "candidate_id": point["candidate_id"],
                "model": {"source": spec.model.source, "num_hidden_layers": prepared["num_layers"],
                          "head_dim": prepared["head_dim"]},
                "mode": spec.kv.mode, "group_size": spec.kv.group_size, "residual": spec.kv.residual,
                "layers": trial.user_attrs["layers"],
                "kv_map": precision.to_kv_map(prepared["head_dim"]),  # the same, as serving engines read it
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
