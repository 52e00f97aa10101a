"""The `joint` job: pruning levels and KV pairs searched together against (KL, memory at the deployment point), and
the measured decoding latency when `deployment.latency` asks for it.

Prepare builds the level database and the KV profile of the dense model (`workers.joint_evaluator`); the search
(`search.joint_search`: evolution or NSGA-II) hands out genomes that fit `joint.memory_cap`, seeded with uniform
cuts and, when the job names them, every pair of the front points of finished prune and KV jobs. Every evaluation
is a trial of the job's Optuna study (values KL, memory and latency if asked: the job's objectives, in order); the
front is its `best_trials`. Each front point is
exported as a sliced model archive carrying its joint configuration (`joint.json`), which
`workers.joint_load.load_joint` turns into the model and its cache in one call.
"""

from __future__ import annotations

import logging

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from darwinfront.core.errors import CandidateNotFound, JobNotFound
from darwinfront.core.joint_spec import JointJobSpec
from darwinfront.core.methods import method_of
from search import joint_search
from search.genome import PruneGenome
from search.joint_space import JointGenome, JointSpace, kv_choice_for
from workers import artifacts, tracking
from workers.job import Job
from workers.joint_evaluator import JointEvaluator, prepare_joint
from workers.pool import EvaluatorPool, run_prepare
from workers.progress import StepReport
from workers.telemetry import Telemetry

log = logging.getLogger(__name__)


class JointJob(Job):
    """Runs one joint job to completion (or cancellation); resumes from its checkpoint and recorded trials."""

    def run(self) -> None:
        spec: JointJobSpec = self.spec
        gpus = spec.resources.gpus_per_evaluator
        report = StepReport(self.redis_url, self.job_id)
        prepared = run_prepare(self.spec_dict, gpus=gpus, fn=prepare_joint, report=report)
        space = JointSpace.from_dict(prepared["space"])
        self.store.put_sensitivity(self.job_id, prepared["sensitivity"])
        self.event("prepared", {"groups": [list(g.layers) for g in space.kv.groups],
                                "deployment": space.deployment.to_dict(), "database": prepared["database"],
                                "dense_memory": space.memory(space.dense([0] * len(space.kv.groups)))}
                   | {k: prepared[k] for k in ("dense_latency_ms",) if k in prepared})
        seeds = joint_search.seed_genomes(space, spec.prune.targets, self._seeds_from_jobs(spec, space))
        search = joint_search.build(
            spec.joint.strategy, space, seeds, seed=spec.seed, budget=spec.joint.evaluations,
            round_size=spec.joint.population, memory_cap=spec.joint.memory_cap, kv_rate=spec.joint.kv_rate,
            latency=spec.deployment.latency is not None,
        )
        checkpoint = self.store.load_checkpoint(self.job_id)
        if checkpoint is not None:
            search.load_state_dict(checkpoint[1])
        study = tracking.open_study(self.redis_url, self.job_id, objectives=self.method.objectives_of(spec))
        pool = EvaluatorPool(self.spec_dict, prepared, size=spec.resources.evaluators, gpus=gpus,
                             evaluator=JointEvaluator, meter=Telemetry.from_url(self.redis_url), job_id=self.job_id)
        try:
            pool.wait_ready(report, " (model, level database, dense outputs)")
            self._search(spec, space, search, study, pool)
            self._finish(space, study, pool)
        finally:
            pool.shutdown()

    def _seeds_from_jobs(self, spec: JointJobSpec, space: JointSpace) -> list[JointGenome]:
        """Every pair of a named prune job's front genomes and a named KV job's front configurations (the KV
        choice nearest each), the pruning alone with 16-bit KV or the KV alone on the dense model when only
        one kind is named."""
        genomes: list[PruneGenome] = []
        choices: list[list[int]] = []
        for job_id in spec.joint.seed_jobs:
            try:
                method = method_of(self.store.get(job_id).spec).name
                points = self.store.get_front(job_id)["points"]
                results = [self.store.get_result(job_id, p["candidate_id"]) for p in points]
            except (JobNotFound, CandidateNotFound) as exc:
                self.event("seed_job_skipped", {"job": job_id, "reason": str(exc)})
                continue
            if method == "structured_prune":
                genomes += [PruneGenome.from_dict(r["genome"]) for r in results]
            elif method == "kv_precision":
                choices += [kv_choice_for(space.kv, r["layers"]) for r in results]
        if not genomes and not choices:
            return []
        n = space.levels.n_layers
        genomes = genomes or [PruneGenome((0,) * n, (0,) * n)]
        choices = choices or [[0] * len(space.kv.groups)]  # the first candidate: the highest bits
        return [JointGenome(g.attn, g.mlp, tuple(c)) for g in genomes for c in choices][: spec.joint.evaluations]

    def _search(self, spec, space, search, study, pool) -> None:
        """Ask a round, evaluate what the study does not hold yet (a restart re-asks what it had), tell, report."""
        while not search.finished:
            requests = search.ask()
            recorded = recorded_results(study)
            fresh = [r.to_dict() for r in requests if r.candidate_id not in recorded]
            replies = dict(recorded)
            for request, reply in pool.map_unordered(fresh):
                record(study, space, reply)
                replies[request["candidate_id"]] = reply
                if reply.get("error"):
                    self.event("candidate_failed", {"candidate_id": reply["candidate_id"], "error": reply["error"]})
                self.check_stopping()
            for request in requests:  # tell in ask order: the same search whatever the completion order
                reply = replies[request.candidate_id]
                search.tell(request.candidate_id, None if reply.get("error") else reply["kl"], reply.get("error"),
                            latency=reply.get("latency"))
            front = joint_front(study)
            done = search.evaluations
            progress = {"generation": search.rounds, "generations": -(-spec.joint.evaluations // spec.joint.population),
                        "evaluations": done, "planned": spec.joint.evaluations,
                        "best": {"kl": search.best_fitness}, "memory_cap": spec.joint.memory_cap,
                        "deployment": spec.deployment.model_dump(exclude_none=True)}
            self.generation_done(search.rounds, front=front, progress=progress, checkpoint=search.state_dict(),
                                 event={"generation": search.rounds, "front_size": len(front)})

    def _finish(self, space: JointSpace, study: optuna.Study, pool: EvaluatorPool) -> None:
        """Write every front point's joint configuration and its sliced model archive (with `joint.json`)."""
        front = joint_front(study)
        if not front:
            raise RuntimeError("every candidate evaluation failed; see the job's events")
        points = {point["candidate_id"]: point for point in front}
        requests = [{"candidate_id": cid, "genome": point["genome"], "result": {"candidate_id": cid,
                                                                                  **_measured(point)}}
                    for cid, point in points.items()]
        # side by side on the evaluators, each into its own node's cache; the folders come back through Ray
        for job, reply in pool.map_unordered(requests, method="export_point"):
            cid = job["candidate_id"]
            if reply.get("error"):
                raise RuntimeError(f"the export of front point {cid} failed: {reply['error']}")
            meta = artifacts.take_exported(self.data_dir, self.job_id, cid, reply["files"])
            points[cid].update(reply["timing"])
            self.store.put_result(self.job_id, cid, reply["configuration"])
            self.store.put_artifact(self.job_id, cid, meta)
        self.publish_front(front, generation=None)


def _measured(point: dict) -> dict:
    """A front point's measured objectives (KL, and latency when asked), for its configuration's metrics."""
    return {k: point["objectives"][k] for k in ("kl", "latency") if k in point["objectives"]}


def record(study: optuna.Study, space: JointSpace, reply: dict) -> None:
    """Add one evaluated genome to the study: values (its objectives, in the study's order: KL, memory and latency
    if asked), or a failure with its reason."""
    genome = JointGenome.from_dict(reply["genome"])
    params = {f"attn_{i}": a for i, a in enumerate(genome.attn)} | {f"mlp_{i}": m for i, m in enumerate(genome.mlp)}
    params |= {f"kv_{g}": c for g, c in enumerate(genome.kv)}
    dists = {name: IntDistribution(0, top) for name, top in _tops(space).items()}
    attrs = {k: reply[k] for k in ("candidate_id", "genome", "round", "weight_bytes", "cache_bytes", "params",
                                   "seconds") if reply.get(k) is not None}
    if "round" in attrs:  # the generation whose report first holds it (round r completes generation r + 1)
        attrs["generation"] = attrs["round"] + 1
    if reply.get("error"):
        trial = optuna.trial.create_trial(state=TrialState.FAIL, params=params, distributions=dists,
                                          user_attrs={**attrs, "error": reply["error"]})
    else:
        trial = optuna.trial.create_trial(values=[float(reply[name]) for name in study.metric_names], params=params,
                                          distributions=dists, user_attrs=attrs)
    study.add_trial(trial)


def _tops(space: JointSpace) -> dict[str, int]:
    n = space.levels.n_layers
    tops = {f"attn_{i}": space.levels.attn_levels for i in range(n)} | {f"mlp_{i}": space.levels.mlp_levels
                                                                       for i in range(n)}
    return tops | {f"kv_{g}": len(group.candidates) - 1 for g, group in enumerate(space.kv.groups)}


def recorded_results(study: optuna.Study) -> dict[str, dict]:
    """Every recorded genome's reply by candidate id (its objectives: `kl`, `memory`, `latency` if asked; or
    `error`), for a resumed job."""
    out, names = {}, study.metric_names
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        cid = trial.user_attrs.get("candidate_id")
        if cid is None:
            continue
        out[cid] = dict(zip(names, trial.values, strict=True)) if trial.state == TrialState.COMPLETE else \
            {"error": trial.user_attrs.get("error", "failed")}
    return out


def joint_front(study: optuna.Study) -> list[dict]:
    """The front as points sorted by memory, one per genome, with the memory's parts: the study's best trials,
    non-dominated in all its objectives (KL, memory, and latency when the job measures it)."""
    points, seen, names = [], set(), study.metric_names
    for trial in sorted(study.best_trials, key=lambda t: (t.values[1], t.number)):
        key = JointGenome.from_dict(trial.user_attrs["genome"]).key()
        if key in seen:
            continue
        seen.add(key)
        attrs = trial.user_attrs
        points.append({
            "candidate_id": attrs["candidate_id"], "trial": trial.number, "generation": attrs.get("round"),
            "objectives": dict(zip(names, trial.values, strict=True)) | {"memory": int(trial.values[1])},
            "genome": attrs["genome"],
            "weight_bytes": attrs.get("weight_bytes"), "cache_bytes": attrs.get("cache_bytes"),
            "params": attrs.get("params"),
        })
    return points

