"""The `structured_prune` job: one search per target (`search.strategy`), scored on Ray, recorded in Optuna and Redis.

The searches of all targets run side by side, a round (an evolution's generation) at a time; their final
candidates make one front across sizes (KL against parameters). Every front point is exported as a sliced
model, with its held-out KL and perplexity and its measured forward latency as attributes.
"""

from __future__ import annotations

import logging
import math

from darwinfront.core.spec import PruneJobSpec
from search import strategies
from search.genome import LevelSpace
from search.nirvana import UnitSaliency
from search.strategy import Request, Stage, Strategy
from workers import artifacts, tracking
from workers.job import Job
from workers.job_inputs import stores_weights
from workers.pool import EvaluatorPool, run_prepare
from workers.progress import StepReport
from workers.telemetry import Telemetry

log = logging.getLogger(__name__)


class PruneJob(Job):
    """Runs one structured_prune job to completion (or cancellation); it stops at the next evaluation when the
    driver stops, and resumes from its checkpoint and the study's recorded candidates."""

    def run(self) -> None:
        spec = self.spec
        report = StepReport(self.redis_url, self.job_id)
        # a database whose levels carry tensors is built layer by layer: the other evaluators' devices share it
        helpers = spec.resources.evaluators - 1 if stores_weights(spec) else 0
        prepared = run_prepare(self.spec_dict, gpus=spec.resources.gpus_per_evaluator, report=report, helpers=helpers)
        space = LevelSpace.from_dict(prepared["space"])
        event = {k: prepared[k] for k in ("space", "dense", "database")}
        self.event("prepared", event)
        stages = stages_for(spec, prepared["calibration_sequences"])
        saliency = UnitSaliency.from_dict(prepared["saliency"]) if prepared.get("saliency") else None
        searches = self._strategies(spec, space, stages, saliency)
        study = tracking.open_study(self.redis_url, self.job_id)
        pool = EvaluatorPool(
            self.spec_dict, prepared, size=spec.resources.evaluators, gpus=spec.resources.gpus_per_evaluator,
            meter=Telemetry.from_url(self.redis_url), job_id=self.job_id, on_event=self.event,
        )
        try:
            teacher = f"{prepared['calibration_sequences'] * spec.data.seq_len:,} + {spec.data.eval_tokens:,} tokens"
            pool.wait_ready(report, f" (model, data, dense outputs on {teacher})")
            self._search(spec, space, searches, study, pool)
            self._finish(study, pool)
        finally:
            pool.shutdown()

    def _strategies(
        self, spec: PruneJobSpec, space: LevelSpace, stages: list[Stage], saliency: UnitSaliency | None
    ) -> list[Strategy[Request]]:
        """One strategy per target from the registry; a resumed job loads each from its checkpoint."""
        plan = search_plan(spec, stages)
        searches = [
            strategies.build(spec.search.strategy, space, space.uniform(target), seed=spec.seed, key=i, plan=plan,
                             saliency=saliency)
            for i, target in enumerate(spec.prune.targets)
        ]
        checkpoint = self.store.load_checkpoint(self.job_id)
        if checkpoint is not None:
            _, state = checkpoint
            log.info("job %s resumes from generation %s", self.job_id, state["generation"])
            for search, saved in zip(searches, state["strategies"], strict=True):
                search.load_state_dict(saved)
        return searches

    def _search(self, spec, space, searches, study, pool) -> None:
        planned = spec.planned_evaluations()
        evaluations = tracking.trial_count(study)  # a resumed job counts what it had done
        best: dict = {}
        while not all(s.finished for s in searches):
            generation = min(s.rounds for s in searches if not s.finished)
            progress = {"phase": "search", "generation": generation, "generations": spec.search.generations,
                        "evaluations": evaluations, "planned": planned, "best": best}
            self.progress({**progress, "message": f"running generation {generation}"})
            evaluations += self._round(spec, space, searches, study, pool)
            best = {str(t): s.best_fitness for t, s in zip(spec.prune.targets, searches, strict=True)}
            front = tracking.front(study)
            self.generation_done(
                generation, front=front, progress={**progress, "evaluations": evaluations, "best": best},
                event={"generation": generation, "best": best, "front_size": len(front)},
                checkpoint={"generation": generation, "strategies": [s.state_dict() for s in searches]},
            )

    def _round(self, spec, space, searches, study, pool) -> int:
        """Run one round (an evolution's generation, all its stages) of every search, side by side; return
        evaluations.

        A candidate already in the study (evaluated before a driver restart) is told its recorded result
        instead of being scored again: seeds make ids and results deterministic, so nothing counts twice.
        """
        start = {i: s.rounds for i, s in enumerate(searches) if not s.finished}
        recorded = tracking.recorded(study)
        count = 0
        while True:
            batch = [(i, r) for i in start if searches[i].rounds == start[i] for r in searches[i].ask()]
            if not batch:
                return count
            owner = {r.candidate_id: i for i, r in batch}
            requests = [_request_dict(r, spec.prune.targets[i], spec.data.seq_len) for i, r in batch]
            for cid in [r["candidate_id"] for r in requests if r["candidate_id"] in recorded]:
                searches[owner[cid]].tell(cid, recorded[cid].get("kl"), recorded[cid].get("error"))
            fresh = [r for r in requests if r["candidate_id"] not in recorded]
            for request, reply in pool.map_unordered(fresh):
                fitness = None if reply.get("error") else reply["kl"]
                searches[owner[request["candidate_id"]]].tell(request["candidate_id"], fitness, reply.get("error"))
                tracking.record(study, space, reply, final=request["final"])
                count += 1
                if reply.get("error"):
                    self.event("candidate_failed", {"candidate_id": reply["candidate_id"], "error": reply["error"]})
                self.check_stopping()  # safe mid-generation: a resumed job is told what was recorded

    def _finish(self, study, pool) -> None:
        """Export every front point on the evaluators, side by side: each writes the point's configuration, its
        sliced model (in the model's own dtype) with its model card and timing into its node's cache; the
        driver streams each folder through Ray into the archive under its data directory, then deletes it."""
        front = tracking.front(study)
        if not front:
            raise RuntimeError("every candidate evaluation failed; see the job's events")
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        points = {point["candidate_id"]: point for point in front}
        requests = []
        for point in front:
            attrs = trials[point["trial"]].user_attrs
            request = {k: attrs[k] for k in ("genome", "seed", "train_tokens") if k in attrs}
            result = {"candidate_id": point["candidate_id"], "target": point["target"], "kl": point["objectives"]["kl"],
                      "held_out_kl": point.get("held_out_kl"), "perplexity": attrs.get("perplexity")}
            requests.append({"candidate_id": point["candidate_id"], "request": request, "result": result})
        for job, reply in pool.map_unordered(requests, method="export_point"):
            cid = job["candidate_id"]
            if reply.get("error"):
                raise RuntimeError(f"the export of front point {cid} failed: {reply['error']}")
            meta = artifacts.take_exported(self.data_dir, self.job_id, cid, reply["files"])
            configuration, point = reply["configuration"], points[cid]
            metrics = configuration["metrics"]
            one_shot = {k: metrics[k] for k in ("kl_cut", "kl_oneshot") if k in metrics}
            perplexity = trials[point["trial"]].user_attrs.get("perplexity")
            point.update({**reply["timing"], **one_shot}, perplexity=perplexity, gives=configuration["gives"])
            self.store.put_result(self.job_id, cid, configuration)
            self.store.put_artifact(self.job_id, cid, meta)
        self.publish_front(front, generation=None)


def stages_for(spec: PruneJobSpec, calibration_sequences: int) -> list[Stage]:
    """The job's selection stages: fitness tokens capped by the fitness pool, training only when training-aware."""
    pool_tokens = calibration_sequences * spec.data.seq_len
    search = spec.search
    return [
        Stage(survivors=s, fitness_tokens=min(f, pool_tokens), train_tokens=t if spec.prune.training_aware else 0)
        for s, f, t in zip(search.survivors, search.fitness_tokens, search.train_tokens, strict=True)
    ]


def search_plan(spec: PruneJobSpec, stages: list[Stage]) -> strategies.Plan:
    """The strategy settings of a job's search section."""
    search = spec.search
    return strategies.Plan(search.generations, search.offspring, tuple(stages),
                           early_layer_prior=search.early_layer_prior, gamma=search.gamma,
                           layer_order=search.layer_order)


def _request_dict(request: Request, target: float, seq_len: int) -> dict:
    return {
        "candidate_id": request.candidate_id,
        "genome": request.genome.to_dict(),
        "target": target,
        "generation": request.generation,
        "stage": request.stage,
        "seed": request.seed,
        "sequences": max(1, math.ceil(request.stage_spec.fitness_tokens / seq_len)),
        "train_tokens": request.stage_spec.train_tokens,
        "final": request.final,
    }
