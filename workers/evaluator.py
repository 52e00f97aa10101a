"""Scoring candidates: the job's inputs, loaded once, and the evaluator that Ray runs as an actor.

An evaluator loads the model, the calibration and held-out tokens and the dense model's log-probabilities once,
then scores many candidates: it applies a candidate's layout as masks (no copy of the model), measures
KL(dense ‖ candidate) on the stage's sequences and hands back a small dict.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from search.genome import LevelSpace, PruneGenome
from service.spec import JobSpec
from workers import criteria, data, metrics, modeling, slicing
from workers.configuration import build_configuration
from workers.criteria.base import UnitScores


@dataclass
class JobInputs:
    """What every evaluator of a job holds: the dense model and the token pools."""

    spec: JobSpec
    model: torch.nn.Module
    tokenizer: object
    calibration: torch.Tensor  # (N, T) token ids
    held_out: torch.Tensor  # (M, T) token ids

    @classmethod
    def load(cls, spec: JobSpec) -> JobInputs:
        model, tokenizer = modeling.load_model(
            spec.model.source, dtype=spec.model.dtype, device=spec.model.device, revision=spec.model.revision
        )
        modeling.check_architecture(model)
        texts = data.load_texts(spec.data.source)
        pools = {
            split: data.token_sequences(
                tokenizer, texts, n_tokens=n, seq_len=spec.data.seq_len, split=split, seed=spec.seed
            )
            for split, n in (("calibration", spec.data.calibration_tokens), ("evaluation", spec.data.eval_tokens))
        }
        return cls(spec, model, tokenizer, pools["calibration"], pools["evaluation"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def prepare(spec_dict: dict) -> dict:
    """Describe a job's model: its level space, the criterion's unit scores and the dense baseline.

    Runs once per job (as a Ray task); raises with a readable message when the model or data can't be used.
    """
    spec = JobSpec.model_validate(spec_dict)
    inputs = JobInputs.load(spec)
    space = slicing.level_space(inputs.model, spec.prune.mlp_multiple)
    options = {"seed": spec.seed} if spec.prune.criterion == "random" else {}
    criterion = criteria.get(spec.prune.criterion, **options)
    scores = criterion.score(inputs.model, inputs.calibration.to(inputs.device))
    return {
        "space": space.to_dict(),
        "scores": scores.to_dict(),
        "dense": {
            "params": space.dense_params,
            "perplexity": metrics.perplexity(inputs.model, inputs.held_out.to(inputs.device), batch_size=8),
        },
        "calibration_sequences": int(inputs.calibration.shape[0]),
    }


class Evaluator:
    """Scores candidates of one job. Ray runs it as an actor, one per device, holding the model once."""

    def __init__(self, spec_dict: dict, prepared: dict, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        self.inputs = JobInputs.load(JobSpec.model_validate(spec_dict))
        self.space = LevelSpace.from_dict(prepared["space"])
        self.scores = UnitScores.from_dict(prepared["scores"])
        device = self.inputs.device
        self.calibration = self.inputs.calibration.to(device)
        self.held_out = self.inputs.held_out.to(device)
        self.teacher = metrics.teacher_logprobs(self.inputs.model, self.calibration, batch_size=8)
        self.teacher_held_out = metrics.teacher_logprobs(self.inputs.model, self.held_out, batch_size=8)

    def layout(self, genome: PruneGenome) -> slicing.Layout:
        return slicing.layout_for(genome, self.scores, self.inputs.spec.prune.mlp_multiple)

    def evaluate(self, request: dict) -> dict:
        """Score one candidate on the stage's sequences; failures come back as `error`, never raise."""
        start = time.perf_counter()
        reply = {k: request[k] for k in ("candidate_id", "genome", "target", "generation", "stage")}
        try:
            genome = PruneGenome.from_dict(request["genome"])
            reply["params"] = self.space.params(genome)
            idx = _stage_indices(self.calibration.shape[0], request["sequences"], request["seed"])
            with slicing.masked(self.inputs.model, self.layout(genome)):
                kl = metrics.kl_to_teacher(self.inputs.model, self.calibration[idx], self.teacher[idx], batch_size=8)
                if request.get("final"):
                    reply["held_out_kl"] = metrics.kl_to_teacher(
                        self.inputs.model, self.held_out, self.teacher_held_out, batch_size=8
                    )
            if not torch.isfinite(torch.tensor(kl)):
                raise ValueError(f"non-finite KL {kl}")
            reply["kl"] = float(kl)
        except Exception as exc:  # reported back as the candidate's failure reason
            reply["error"] = f"{type(exc).__name__}: {exc}"
        reply["seconds"] = time.perf_counter() - start
        return reply

    def configuration(self, request: dict, result: dict) -> dict:
        """The downloadable configuration document of an evaluated candidate."""
        genome = PruneGenome.from_dict(request["genome"])
        return build_configuration(
            spec=self.inputs.spec,
            space=self.space,
            genome=genome,
            layout=self.layout(genome),
            model=self.inputs.model,
            result=result,
        )

    def export(self, configuration: dict, directory: str) -> dict:
        """Slice a copy of the model to `configuration` and save it (safetensors + config) under `directory`."""
        model = copy.deepcopy(self.inputs.model).to("cpu")
        slicing.apply_configuration(model, configuration)
        slicing.save_pruned(model, self.inputs.tokenizer, Path(directory))
        return {"params": slicing.count_parameters(model)}


def _stage_indices(pool: int, sequences: int, seed: int) -> torch.Tensor:
    """The stage's sequences: the whole pool in order, or the same seeded subset for every candidate."""
    if sequences >= pool:
        return torch.arange(pool)
    generator = torch.Generator().manual_seed(seed % (2**63))
    return torch.randperm(pool, generator=generator)[:sequences].sort().values
