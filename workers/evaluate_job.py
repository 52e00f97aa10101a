"""The `evaluate` job: lm-evaluation-harness scores of one front candidate, with the dense model's beside them.

The candidate is loaded as its parent stored it: a `structured_prune` candidate's sliced model (its archive, or
rebuilt), a `posttrain` job's trained model (its archive), or a `kv_precision` candidate's model with its
quantized KV cache in every forward. lm_eval scores it through its own API (`HFLM` around the loaded model,
`simple_evaluate`), one task at a time so the driver can stop between tasks.

The dense model is scored once per parent job and settings: its score of each task is cached on the parent
(`JobStore.put_dense_score`, keyed by task, task version, limit, few-shot count, seed and lm_eval version), so an
evaluate of another candidate of the same job reads it. The candidate's scores are stored on the parent too
(`JobStore.merge_scores`), where the parent's front shows them, and in this job's result and front.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from darwinfront.core.errors import InvalidSpec
from darwinfront.core.methods import method_of, parse_spec
from darwinfront.core.spec import EvaluateOptions
from workers import harness, modeling, transfer
from workers.job import Job
from workers.kv.cache import KVPrecisionConfig
from workers.pool import builtin_model_files
from workers.posttrain_job import FollowupActor, load_candidate, parent_archive, shipped

PARENTS = ("structured_prune", "posttrain", "kv_precision")  # the methods whose candidates can be scored


class Scorer:
    """Scores one candidate and, when asked, its dense model. Ray runs it as an actor; the driver calls it.

    Args:
        parent_spec: the parent job's spec (its model: the dense one).
        configuration: the candidate's configuration document, as the parent stored it.
        archive: the parent's model archive of the candidate, or None (a prune candidate is then rebuilt).
        options: the `evaluate` options (tasks, limit, num_fewshot, batch_size, seed).
        files: where the driver holds a builtin dense model (`pool.builtin_model_files`), brought to this node
            first so the dense scores are those of the model the parent searched against.
        threads: torch CPU threads (0 leaves torch's default).
    """

    def __init__(self, parent_spec: dict, configuration: dict, archive: str | None, options: dict,
                 files: dict | None = None, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        transfer.bring(files, kinds=("model",))
        self.parent_spec, self.configuration, self.archive = parent_spec, configuration, archive
        self.method = method_of(parent_spec).name
        self.options = EvaluateOptions.model_validate(options)
        self.tasks: harness.Tasks | None = None
        self.models: dict[str, object] = {}  # which -> lm_eval model

    def prepare(self) -> dict:
        """Build the tasks (their datasets are read here); per task: its version and the tasks it is scored as.

        Raises:
            InvalidSpec: an unknown task, an unreadable dataset, or a generation task for a KV candidate.
        """
        self.tasks = harness.load_tasks(self.options.tasks)
        if self.method == "kv_precision" and (gen := [n for n in self.options.tasks if self.tasks.generative(n)]):
            raise InvalidSpec("evaluate.tasks", f"{', '.join(gen)} generate text; a kv_precision candidate is "
                              "scored with its quantized cache on log-likelihood tasks only (multiple choice, "
                              "perplexity)")
        return {n: {"version": self.tasks.version(n), "leaves": self.tasks.leaves(n)} for n in self.options.tasks}

    def _model(self, which: str):
        if which not in self.models:
            if which == "candidate" and self.method != "kv_precision":
                model, tokenizer, _ = load_candidate(self.parent_spec, self.configuration, self.archive)
            else:  # the dense model; a KV candidate is the dense model with its cache
                spec = parse_spec(self.parent_spec).model
                model, tokenizer = modeling.load_model(spec.source, dtype=spec.dtype, device=spec.device,
                                                       revision=spec.revision)
            kv = self._kv_config() if which == "candidate" else None
            self.models[which] = harness.wrap(model, tokenizer, batch_size=self.options.batch_size, kv_config=kv)
        return self.models[which]

    def _kv_config(self) -> KVPrecisionConfig | None:
        if self.method != "kv_precision":
            return None
        c = self.configuration
        return KVPrecisionConfig(tuple(map(tuple, c["layers"])), c["mode"], c["group_size"], c["residual"])

    def score(self, which: str, name: str) -> dict:
        """`harness.shape`d scores of `which` ("candidate" or "dense") on the requested task `name`."""
        if which not in ("candidate", "dense"):
            raise ValueError(f"which must be 'candidate' or 'dense', got {which!r}")
        assert self.tasks is not None, "prepare() first"
        o = self.options
        return harness.score(self._model(which), self.tasks, [name], limit=o.limit, num_fewshot=o.num_fewshot,
                             seed=o.seed)

    def release(self, which: str) -> None:
        """Drop a loaded model (the dense one, once its scores are cached)."""
        self.models.pop(which, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class EvaluateJob(Job):
    """Runs one evaluate job: the dense scores not yet cached, then the candidate's, each task a step.

    Args:
        in_process: score in this process instead of a Ray actor.
    """

    in_process: bool = False

    def run(self) -> None:
        options = self.spec.evaluate
        parent = self.store.get(options.job)
        parent_method = method_of(parent.spec).name
        configuration = self.store.get_result(options.job, options.candidate)
        archive = None if parent_method == "kv_precision" else parent_archive(self.store, self.data_dir,
                                                                               options.job, options.candidate)
        if parent_method == "posttrain" and archive is None:
            raise InvalidSpec("evaluate.candidate", f"the post-trained model of {options.candidate!r} is not on "
                              f"this host (job {options.job!r} has no archive of it here); evaluate it where "
                              "the posttrain job ran")
        args = (parent.spec, configuration, shipped(archive, self.in_process),
                options.model_dump(exclude={"job", "candidate"}), builtin_model_files(parent.spec))
        scorer = FollowupActor(args, gpus=self.spec.resources.gpus_per_evaluator, in_process=self.in_process,
                               cls=Scorer)
        try:
            plan = scorer.call("prepare")
            settings = {n: harness.setting_key(n, plan[n]["version"], limit=options.limit,
                                               num_fewshot=options.num_fewshot, seed=options.seed)
                        for n in options.tasks}
            dense = {n: cached for n in options.tasks
                     if (cached := self.store.get_dense_score(options.job, settings[n])) is not None}
            missing = [n for n in options.tasks if n not in dense]
            self.event("prepared", {"parent": options.job, "candidate": options.candidate, "tasks": plan,
                                    "dense_cached": sorted(dense), "dense_to_score": missing})
            steps = [("dense", n) for n in missing] + [("candidate", n) for n in options.tasks]
            candidate = {}
            for done, (which, name) in enumerate(steps, 1):
                self.check_interrupts()
                if which == "dense" and name == missing[0]:
                    self.progress({"message": "scoring the dense model", "evaluations": done - 1,
                                   "planned": len(steps)})
                result = scorer.call("score", which, name)
                if which == "dense":
                    dense[name] = result
                    self.store.put_dense_score(options.job, settings[name], result)
                    if name == missing[-1]:
                        scorer.call("release", "dense")
                else:
                    candidate.update(result)
                self.progress({"task": name, "model": which, "evaluations": done, "planned": len(steps)})
                self.event("scored", {"task": name, "model": which,
                                      "scores": {t: e["value"] for t, e in result.items()}})
        finally:
            scorer.close()
        flat_dense = {task: entry for n in options.tasks for task, entry in dense[n].items()}
        scores = harness.beside_dense(candidate, flat_dense, job_id=self.job_id, limit=options.limit)
        if not scores:
            raise RuntimeError(f"lm_eval reported no numeric metric for {', '.join(options.tasks)}")
        self._finish(configuration, scores, dense_scored=missing)

    def _finish(self, configuration: dict, scores: dict, *, dense_scored: list[str]) -> None:
        options = self.spec.evaluate
        self.store.merge_scores(options.job, options.candidate, scores)
        document = {**configuration, "evaluation": {
            "job": options.job, "candidate": options.candidate, **options.model_dump(exclude={"job", "candidate"}),
            "scores": scores, "dense_scored": dense_scored,
        }}
        self.store.put_result(self.job_id, options.candidate, document)
        self.publish_front([front_point(options.candidate, options.job, scores)], generation=None)
        self.event("evaluated", {"scores": {t: e["value"] for t, e in scores.items()}, "dense_scored": dense_scored})


def front_point(candidate_id: str, parent_id: str, scores: dict) -> dict:
    """The evaluate job's front: its one candidate, `score` the mean of its tasks' main metrics."""
    values = [e["value"] for e in scores.values()]
    return {"candidate_id": candidate_id, "objectives": {"score": sum(values) / len(values)}, "target": None,
            "generation": None, "parent_job": parent_id, "scores": scores}
