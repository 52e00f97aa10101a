"""Scoring candidates: the evaluator that Ray runs as an actor, one per device.

An evaluator loads the model, the token pools, the level database and the dense model's outputs on the fitness
pool once, then scores many candidates, each at its own size: it builds the candidate's physically sliced model
(`workers.candidate`: new decoder linears, embeddings and norms shared with the dense model), trains it briefly
when the job is training-aware (the shared weights put back afterwards), measures KL(dense ‖ candidate) on the
stage's sequences, drops it and hands back a small dict.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from darwinfront.core.errors import InvalidSpec
from darwinfront.core.methods import parse_spec
from search.genome import LevelSpace, PruneGenome
from workers import candidate, finetune, fitness, latency, levels, metrics, modeling, slicing, transfer
from workers.configuration import build_configuration
from workers.job_inputs import JobInputs, open_database


class Evaluator:
    """Scores candidates of one job. Ray runs it as an actor, one per device, holding the model once."""

    def __init__(self, spec_dict: dict, prepared: dict, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        transfer.bring(prepared.get("files"))  # the database (and builtin model) from the prepare step's node
        self.inputs = JobInputs.load(parse_spec(spec_dict), selection=prepared.get("data_selection"))
        spec = self.inputs.spec
        self.export_dtype = modeling.export_dtype(spec.model)
        self.space = LevelSpace.from_dict(prepared["space"])
        self.database = open_database(self.inputs)
        model = self.inputs.model
        like = model.model.layers[0].self_attn.o_proj.weight
        carries = self.database.stores_weights or bool(self.database.table.implant_ranks)
        self.weights = candidate.LevelWeights(self.database, like) if carries else None
        self.snapshot = finetune.Snapshot([p for p in candidate.shared_parameters(model) if p.requires_grad])
        self.train_settings = finetune.light_training(spec.prune)
        self.teacher = fitness.Teacher.of(model, self.inputs.calibration, topk=spec.search.kl_topk)
        self.teacher_held_out = fitness.Teacher.of(model, self.inputs.held_out, topk=spec.search.kl_topk)
        self._targets: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.current: torch.nn.Module | None = None  # the loaded candidate
        self._trained = False  # whether it trained (the shared weights then need putting back)

    def layout(self, genome: PruneGenome) -> slicing.Layout:
        return levels.layout(genome, self.database.orders, self.database.table)

    def load(self, genome: PruneGenome, *, train_tokens: int = 0, seed: int = 0) -> dict:
        """Build `genome`'s sliced candidate as `self.current`, then train it on the stage's batches if asked.

        Call `unload()` afterwards (loading again does it first). Returns the training record (empty without
        training): `seconds` of training and `teacher_seconds` spent on the dense outputs distillation needs.
        """
        self.unload()
        batches = finetune.stage_batches(self.inputs.training, train_tokens, seed, self.train_settings.batch_size)
        teacher, teacher_seconds = None, 0.0
        if batches and self.inputs.spec.prune.train_loss == "kd":
            started = time.perf_counter()
            teacher = self._distillation_targets((seed, train_tokens), batches)
            teacher_seconds = time.perf_counter() - started
        self.current = candidate.build(self.inputs.model, self.database, genome, weights=self.weights,
                                       trainable=bool(batches))
        if not batches:
            return {}
        self._trained = True
        record = finetune.finetune(self.current, batches, self.train_settings, teacher)
        return {**record, "teacher_seconds": teacher_seconds}

    def _distillation_targets(self, key: tuple[int, int], batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The dense model's log-probs on a stage's training batches, computed once per stage (the last two kept)."""
        if key not in self._targets:
            self._targets[key] = [metrics.teacher_logprobs(self.inputs.model, b, batch_size=len(b)) for b in batches]
            while len(self._targets) > 2:
                self._targets.pop(next(iter(self._targets)))
        return self._targets[key]

    def unload(self) -> None:
        """Drop the loaded candidate; after a training, put back the dense weights it shared and trained."""
        self.current = None
        if self._trained:
            self.snapshot.restore()
            self._trained = False

    def held_out_metrics(self) -> tuple[float, float]:
        """KL to the dense model and perplexity of the loaded candidate, on the held-out sequences."""
        return fitness.kl_and_perplexity(self.current, self.inputs.held_out, self.teacher_held_out)

    def evaluate(self, request: dict) -> dict:
        """Score one candidate on the stage's sequences; failures come back as `error`, never raise.

        `request` holds `genome`, `seed` (the stage's), `sequences` (fitness sequences), `train_tokens`
        (0 = score as cut) and `final` (also measure held-out KL and perplexity).
        """
        start = time.perf_counter()
        reply = {k: request[k] for k in ("candidate_id", "genome", "target", "generation", "stage") if k in request}
        reply.update({k: request[k] for k in ("seed", "train_tokens") if k in request})
        try:
            genome = PruneGenome.from_dict(request["genome"])
            reply["params"] = self.space.params(genome)
            tokens, teacher = self._stage_sequences(request["sequences"], request["seed"])
            record = self.load(genome, train_tokens=request.get("train_tokens", 0), seed=request["seed"])
            scoring = time.perf_counter()
            kl = fitness.kl(self.current, tokens, teacher)
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
            self.unload()
        reply["seconds"] = time.perf_counter() - start
        return reply

    def _stage_sequences(self, sequences: int, seed: int) -> tuple[torch.Tensor, fitness.Teacher]:
        """The stage's fitness sequences and their teacher outputs: the whole pool in order (not copied), or the
        same seeded subset for every candidate."""
        pool = self.inputs.calibration.shape[0]
        if sequences >= pool:
            return self.inputs.calibration, self.teacher
        generator = torch.Generator().manual_seed(seed % (2**63))
        idx = torch.randperm(pool, generator=generator)[:sequences].sort().values
        return self.inputs.calibration[idx], self.teacher.select(idx)

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
        document["metrics"].update(self.one_shot_metrics(genome))
        document["level_table"] = self.database.table.to_dict()
        document["database"] = {"key": self.database.key, "criterion": self.database.criterion,
                                "options": self.database.options}
        if self.inputs.selection is not None:  # `data.selection: kl`: the rows of the pool the database used
            document["database"]["selection_rows"] = self.inputs.selection["rows"]
        document["weights"] = "trained" if train_tokens else "database" if self.weights is not None else "dense"
        document["training"] = {"seed": int(request["seed"]), "tokens": train_tokens,
                                "lr": self.train_settings.lr, "batch_size": self.train_settings.batch_size,
                                "loss": self.inputs.spec.prune.train_loss,
                                **({"serene": self.inputs.spec.prune.train_serene.model_dump()}
                                   if self.inputs.spec.prune.train_serene else {})} if train_tokens else None
        one_shot = "kl_oneshot" if self.weights is not None else "kl_cut"
        document["gives"] = {"rebuild": one_shot, "apply_configuration": "kl_cut",
                             "archive": "kl" if train_tokens else one_shot}
        return document

    def one_shot_metrics(self, genome: PruneGenome) -> dict:
        """KL on the whole fitness pool of the structure cut from the dense weights (`kl_cut`) and, for a
        database that stores level weights, of the one-shot model with them (`kl_oneshot`): what
        `slicing.apply_configuration` and `configuration.rebuild` give, beside the front's `kl` after training."""
        out = {}
        variants = {"kl_cut": None, "kl_oneshot": self.weights} if self.weights is not None else {"kl_cut": None}
        for name, weights in variants.items():
            model = candidate.build(self.inputs.model, self.database, genome, weights=weights)
            out[name] = fitness.kl(model, self.inputs.calibration, self.teacher)
        return out

    def export(self, configuration: dict, directory: str, *, archive: str | None = None) -> dict:
        """Build the candidate of `configuration` as it was scored (its database weights, trained again on the
        same batches), time its forward pass against the dense one (into the configuration's metrics), and save it
        (safetensors, config, model card) under `directory`, or as `directory/<archive>.tar` with `archive`.

        Raises:
            InvalidSpec: when the configuration's layout or parameter count is not what its genome gives here.
        """
        genome = PruneGenome.from_dict(configuration["genome"])
        training = configuration.get("training") or {}
        self.unload()
        dense_latency = latency.forward_latency(self.inputs.model, seq_len=self.inputs.spec.data.seq_len)
        self.load(genome, train_tokens=training.get("tokens", 0), seed=training.get("seed", 0))
        try:
            model = self.current
            if slicing.Layout.from_dict(configuration).to_dict() != model.config.darwinfront_layout:
                raise InvalidSpec("configuration.layers", "the layout is not the one its genome gives on this model")
            params = slicing.count_parameters(model)
            if params != int(configuration["parameters"]):
                raise InvalidSpec("configuration.parameters", f"the candidate has {params} parameters, the "
                                  f"configuration says {configuration['parameters']}: made for a different model")
            sliced_latency = latency.forward_latency(model, seq_len=self.inputs.spec.data.seq_len)
            timing = {"latency_ms": sliced_latency["median_ms"], "dense_latency_ms": dense_latency["median_ms"]}
            configuration["metrics"].update(timing)
            configuration["export_dtype"] = modeling.dtype_name(self.export_dtype)
            slicing.save_pruned(model, self.inputs.tokenizer, Path(directory), dtype=self.export_dtype,
                                card=configuration, archive=archive)
        finally:
            self.unload()
        return {"params": params, **timing, "dtype": configuration["export_dtype"]}

    def export_point(self, request: dict) -> dict:
        """Export one front point where this evaluator runs: its configuration (`request["request"]` and
        `request["result"]`, as for `configuration`) and the saved model with its timing and model card, as
        `<candidate_id>.tar` in a fresh folder of this node's cache, which the driver then moves into its archive.

        Returns `candidate_id`, `configuration` (with the timing in its metrics), `timing` and `files` (the
        folder, `transfer.Located` as a dict).
        """
        configuration = self.configuration(request["request"], request["result"])
        folder = transfer.scratch("exports")
        try:
            exported = self.export(configuration, str(folder), archive=request["candidate_id"])
        except BaseException:
            transfer.remove(str(folder))
            raise
        timing = {k: exported[k] for k in ("latency_ms", "dense_latency_ms")}
        return {"candidate_id": request["candidate_id"], "configuration": configuration, "timing": timing,
                "files": transfer.here(folder).to_dict()}
