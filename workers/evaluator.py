"""Scoring candidates: the evaluator that Ray runs as an actor, one per device.

An evaluator loads the model, the token pools, the level database and the dense model's outputs on the fitness
pool once, then scores many candidates in place: it swaps in the level weights of the layers that differ from
the previous candidate, trains the candidate briefly when the job is training-aware (masks kept, weights put
back afterwards), measures KL(dense ‖ candidate) on the stage's sequences and hands back a small dict.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from search.genome import LevelSpace, PruneGenome
from service.spec import JobSpec
from workers import database, finetune, fitness, latency, levels, metrics, slicing
from workers.configuration import build_configuration
from workers.job_inputs import JobInputs, open_database


class Evaluator:
    """Scores candidates of one job. Ray runs it as an actor, one per device, holding the model once."""

    def __init__(self, spec_dict: dict, prepared: dict, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        self.inputs = JobInputs.load(JobSpec.model_validate(spec_dict))
        spec = self.inputs.spec
        self.space = LevelSpace.from_dict(prepared["space"])
        self.database = open_database(self.inputs)
        self.swapper = database.LevelSwapper(self.inputs.model, self.database)
        model = self.inputs.model
        self.snapshot = finetune.Snapshot([p for p in model.parameters() if p.requires_grad])
        self.train_settings = finetune.TrainSettings(lr=spec.prune.train_lr, batch_size=spec.prune.train_batch_size)
        self.teacher = fitness.Teacher.of(model, self.inputs.calibration, topk=spec.search.kl_topk)
        self.teacher_held_out = fitness.Teacher.of(model, self.inputs.held_out)
        self._dense_genome = PruneGenome(attn=(0,) * self.space.n_layers, mlp=(0,) * self.space.n_layers)
        self._targets: dict[tuple[int, int], list[torch.Tensor]] = {}

    def layout(self, genome: PruneGenome) -> slicing.Layout:
        return levels.layout(genome, self.database.orders, self.database.table)

    def load(self, genome: PruneGenome, *, train_tokens: int = 0, seed: int = 0) -> dict:
        """Put `genome` in the model (database weights), then train it on the stage's batches if asked.

        Call `unload()` afterwards when it trained. Returns the training record (empty without training):
        `seconds` of training and `teacher_seconds` spent on the dense outputs that distillation needs.
        """
        batches = finetune.stage_batches(self.inputs.training, train_tokens, seed, self.train_settings.batch_size)
        teacher, teacher_seconds = None, 0.0
        if batches and self.inputs.spec.prune.train_loss == "kd":
            started = time.perf_counter()
            teacher = self._distillation_targets((seed, train_tokens), batches)
            teacher_seconds = time.perf_counter() - started
        self.swapper.apply(genome)
        if not batches:
            return {}
        record = finetune.finetune(self.inputs.model, batches, self.swapper.masks(genome), self.train_settings, teacher)
        return {**record, "teacher_seconds": teacher_seconds}

    def _distillation_targets(self, key: tuple[int, int], batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The dense model's log-probs on a stage's training batches, computed once per stage (the last two kept)."""
        if key not in self._targets:
            self.swapper.apply(self._dense_genome)
            self._targets[key] = [metrics.teacher_logprobs(self.inputs.model, b, batch_size=len(b)) for b in batches]
            while len(self._targets) > 2:
                self._targets.pop(next(iter(self._targets)))
        return self._targets[key]

    def unload(self) -> None:
        """Put the dense weights back after a training (the swapper's levels are then all 0)."""
        self.snapshot.restore()
        self.swapper.forget()

    def held_out_metrics(self) -> tuple[float, float]:
        """KL to the dense model and perplexity of the model as it is now, on the held-out sequences."""
        return fitness.kl_and_perplexity(self.inputs.model, self.inputs.held_out, self.teacher_held_out)

    def evaluate(self, request: dict) -> dict:
        """Score one candidate on the stage's sequences; failures come back as `error`, never raise.

        `request` holds `genome`, `seed` (the stage's), `sequences` (fitness sequences), `train_tokens`
        (0 = score as cut) and `final` (also measure held-out KL and perplexity).
        """
        start = time.perf_counter()
        reply = {k: request[k] for k in ("candidate_id", "genome", "target", "generation", "stage") if k in request}
        reply.update({k: request[k] for k in ("seed", "train_tokens") if k in request})
        trains = request.get("train_tokens", 0) > 0 and self.inputs.training.numel() > 0
        try:
            genome = PruneGenome.from_dict(request["genome"])
            reply["params"] = self.space.params(genome)
            idx = _stage_indices(self.inputs.calibration.shape[0], request["sequences"], request["seed"])
            record = self.load(genome, train_tokens=request.get("train_tokens", 0), seed=request["seed"])
            scoring = time.perf_counter()
            kl = fitness.kl(self.inputs.model, self.inputs.calibration[idx], self.teacher.select(idx))
            if request.get("final"):
                reply["held_out_kl"], reply["perplexity"] = self.held_out_metrics()
            forward = time.perf_counter() - scoring
            reply["compute_seconds"] = forward + record.get("seconds", 0.0) + record.get("teacher_seconds", 0.0)
            if record:
                reply["train_seconds"], reply["train_loss"] = record["seconds"], record["last_loss"]
            if not torch.isfinite(torch.tensor(kl)):
                raise ValueError(f"non-finite KL {kl}")
            reply["kl"] = float(kl)
        except Exception as exc:  # reported back as the candidate's failure reason
            reply["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if trains:
                self.unload()
        reply["seconds"] = time.perf_counter() - start
        return reply

    def configuration(self, request: dict, result: dict) -> dict:
        """The downloadable configuration document of an evaluated candidate.

        `request` holds the `genome`, and for a trained candidate the `seed` and `train_tokens` of the stage
        that scored it: the export replays that training.
        """
        genome = PruneGenome.from_dict(request["genome"])
        document = build_configuration(
            spec=self.inputs.spec, space=self.space, genome=genome, layout=self.layout(genome),
            model=self.inputs.model, result=result,
        )
        train_tokens = int(request.get("train_tokens") or 0)
        document["level_table"] = self.database.table.to_dict()
        document["database"] = {"key": self.database.key, "criterion": self.database.criterion}
        document["weights"] = "trained" if train_tokens else "database" if self.database.stores_weights else "dense"
        document["training"] = {"seed": int(request["seed"]), "tokens": train_tokens,
                                "lr": self.train_settings.lr, "batch_size": self.train_settings.batch_size,
                                "loss": self.inputs.spec.prune.train_loss} if train_tokens else None
        return document

    def export(self, configuration: dict, directory: str) -> dict:
        """Slice the candidate of `configuration` (its database weights, trained again as it was scored) and
        save it (safetensors + config) under `directory`; also time its forward pass against the dense one."""
        genome = PruneGenome.from_dict(configuration["genome"])
        training = configuration.get("training") or {}
        self.swapper.apply(self._dense_genome)
        dense_latency = latency.forward_latency(self.inputs.model, seq_len=self.inputs.spec.data.seq_len)
        trained = bool(self.load(genome, train_tokens=training.get("tokens", 0), seed=training.get("seed", 0)))
        try:
            model = copy.deepcopy(self.inputs.model)
        finally:
            if trained:
                self.unload()
        slicing.apply_configuration(model, configuration)
        sliced_latency = latency.forward_latency(model, seq_len=self.inputs.spec.data.seq_len)
        slicing.save_pruned(model.to("cpu"), self.inputs.tokenizer, Path(directory))
        return {"params": slicing.count_parameters(model), "latency_ms": sliced_latency["median_ms"],
                "dense_latency_ms": dense_latency["median_ms"]}


def _stage_indices(pool: int, sequences: int, seed: int) -> torch.Tensor:
    """The stage's sequences: the whole pool in order, or the same seeded subset for every candidate."""
    if sequences >= pool:
        return torch.arange(pool)
    generator = torch.Generator().manual_seed(seed % (2**63))
    return torch.randperm(pool, generator=generator)[:sequences].sort().values
