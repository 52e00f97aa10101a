"""The `posttrain` job: train one chosen candidate of a finished `structured_prune` job on more tokens.

The search only trains candidates lightly (training-aware selection); a user who has picked a front point can
have it post-trained before downloading it. The follow-up job starts from the candidate's exact weights (the
parent's exported archive, or the export rebuilt when the archive is not on this host), trains the physically
sliced model, so what was pruned stays pruned by construction, with a fresh AdamW on the parent's training text
(disjoint from the held-out evaluation text and from the fitness pool), and measures KL(dense ‖ candidate) and
perplexity before and after on the same tokens. The trained model is stored under the same candidate id.

The training runs in one Ray actor (on a GPU when the job's resources ask for one); the driver steps it one
batch at a time and checks for cancellation, a lost lease and a stopping driver between steps.
"""

from __future__ import annotations

import logging
import math
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from torch import nn

from darwinfront.core.errors import CandidateNotFound, InvalidSpec
from darwinfront.core.methods import parse_spec
from darwinfront.core.spec import PosttrainJobSpec, PosttrainOptions, PruneJobSpec
from workers import artifacts, data, finetune, fitness, metrics, modeling, slicing, transfer
from workers.job import Job
from workers.pruned_hf import model_card

log = logging.getLogger(__name__)
EVENTS_PER_RUN = 10  # `training` events over a whole run, whatever its length


def batch_rows(sequences: int, tokens: int, seq_len: int, seed: int, batch_size: int) -> list[torch.Tensor]:
    """Which of `sequences` training sequences each step trains on: `ceil(tokens / seq_len)` in all, in batches
    of `batch_size` (the last may be smaller), in an order drawn with `seed`.

    Each pass over the pool is a fresh seeded permutation, so a budget larger than the pool goes through it
    again, reshuffled. Rows, not tokens, so a long run does not hold its batches in memory twice.
    """
    if sequences == 0:
        raise InvalidSpec("data.source", "no training text: the calibration documents end with the fitness pool")
    wanted = math.ceil(tokens / seq_len)
    generator = torch.Generator().manual_seed(seed)
    passes = [torch.randperm(sequences, generator=generator) for _ in range(math.ceil(wanted / sequences))]
    return list(torch.cat(passes)[:wanted].split(batch_size))  # each (B,) row indices


@dataclass(frozen=True)
class Pools:
    """The parent job's fitness pool, a training pool after it, and the held-out evaluation sequences."""

    calibration: torch.Tensor  # (N, T): the search's fitness pool, where `kl` is measured
    training: torch.Tensor  # (M, T): what follows it in the calibration documents, up to what training needs
    held_out: torch.Tensor  # (E, T): other documents


def load_pools(spec: PruneJobSpec, tokenizer, tokens: int) -> Pools:
    """The pools of the parent `spec` (the same fitness and held-out sequences its search used).

    The training pool holds up to `tokens` tokens of the calibration documents after the fitness pool (more
    than the search's `data.train_tokens` when asked, as far as the documents go).
    """
    d, t = spec.data, spec.data.seq_len
    texts = data.load_texts(d.source)
    n_fit = d.calibration_sequences
    wanted = n_fit + math.ceil(tokens / t)
    stream = data.token_stream(tokenizer, data.split_documents(texts, "calibration", spec.seed), limit=wanted * t)
    have = min(wanted, stream.numel() // t)
    if have <= n_fit:
        raise InvalidSpec("data.calibration_tokens", f"the calibration documents hold {have} sequences of {t} "
                          f"tokens, none left for training after the {n_fit} of the fitness pool")
    pool = stream[: have * t].view(have, t)  # (have, T)
    held_out = data.token_sequences(tokenizer, texts, n_tokens=d.eval_tokens, seq_len=t, split="evaluation",
                                    seed=spec.seed)
    return Pools(pool[:n_fit].clone(), pool[n_fit:].clone(), held_out)


def load_candidate(
    spec_dict: dict, configuration: dict, archive: str | dict | None
) -> tuple[nn.Module, object, str]:
    """The candidate's sliced model exactly as its parent exported it, its tokenizer, and where it came from.

    From `archive` (the parent's `.tar`: a path here, or `{"node", "path", "name", "size"}`, file `name` of
    folder `path` on Ray node `node`, streamed here through Ray) when given; else rebuilt the way the parent
    exported it (dense model, level database weights, the recorded light training, slicing), which costs a few
    model loads.
    """
    spec = parse_spec(spec_dict)
    dtype, device = modeling.resolve_dtype(spec.model.dtype), modeling.resolve_device(spec.model.device)
    with tempfile.TemporaryDirectory(prefix="darwinfront-posttrain-") as tmp:
        if isinstance(archive, dict):
            archive = str(transfer.fetch_file(transfer.Located.from_dict(archive), archive["name"],
                                              int(archive["size"]), Path(tmp) / "parent.tar"))
        if archive is not None:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            folder, source = Path(tmp) / configuration["candidate_id"], "archive"
        else:
            from workers.evaluator import Evaluator
            from workers.prepare import prepare

            Evaluator(spec_dict, prepare(spec_dict)).export(configuration, tmp)
            folder, source = Path(tmp), "rebuilt"
        model, tokenizer = slicing.load_pruned(folder, dtype=dtype, device=device)
    if slicing.count_parameters(model) != configuration["parameters"]:
        raise InvalidSpec("posttrain.candidate", f"the candidate's model has {slicing.count_parameters(model)} "
                          f"parameters, its configuration {configuration['parameters']}")
    return model, tokenizer, source


class Posttrainer:
    """Trains one sliced candidate against its dense model. Ray runs it as an actor; the driver steps it.

    Args:
        spec_dict: the parent job's spec (model, data, seed).
        configuration: the candidate's configuration document, as the parent stored it.
        archive: the parent's model archive of the candidate, or None to rebuild it.
        options: the `posttrain` options (tokens, lr, batch_size, loss, seed).
        threads: torch CPU threads (0 leaves torch's default).
    """

    def __init__(self, spec_dict: dict, configuration: dict, archive: str | None, options: dict, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        spec = parse_spec(spec_dict)
        self.export_dtype = modeling.export_dtype(spec.model)
        self.options = PosttrainOptions.model_validate(options)
        self.model, self.tokenizer, self.source = load_candidate(spec_dict, configuration, archive)
        device = next(self.model.parameters()).device
        dense, _ = modeling.load_model(spec.model.source, dtype=spec.model.dtype, device=str(device),
                                       revision=spec.model.revision)
        self.dense_params = slicing.count_parameters(dense)
        pools = load_pools(spec, self.tokenizer, self.options.tokens)
        self.calibration, self.held_out = pools.calibration.to(device), pools.held_out.to(device)
        self.teacher = fitness.Teacher.of(dense, self.calibration, topk=spec.search.kl_topk)
        self.teacher_held_out = fitness.Teacher.of(dense, self.held_out)
        self.dense = dense if self.options.loss == "kd" else None  # distillation asks it at every step
        self.training = pools.training  # (M, T), on the CPU; each step moves its batch
        self.batches = batch_rows(len(self.training), self.options.tokens, spec.data.seq_len, self.options.seed,
                                  self.options.batch_size)
        torch.manual_seed(self.options.seed)
        settings = finetune.TrainSettings(lr=self.options.lr, batch_size=self.options.batch_size)
        self.optimizer = finetune.make_optimizer(self.model, settings)
        self.done = self.tokens_done = 0
        self.losses: list[float] = []
        self.seconds = 0.0

    def describe(self) -> dict:
        """What the run will do: steps, tokens, where the weights came from, model sizes."""
        tokens = sum(len(rows) for rows in self.batches) * self.training.shape[1]
        return {"steps": len(self.batches), "tokens": tokens, "start": self.source,
                "parameters": slicing.count_parameters(self.model), "dense_parameters": self.dense_params,
                "training_sequences": len(self.training)}

    def measure(self) -> dict:
        """KL(dense ‖ model) on the fitness pool (`kl`) and held out, and held-out perplexity, as the model is now."""
        held_out_kl, perplexity = fitness.kl_and_perplexity(self.model, self.held_out, self.teacher_held_out)
        return {"kl": fitness.kl(self.model, self.calibration, self.teacher), "held_out_kl": held_out_kl,
                "perplexity": perplexity}

    def step(self) -> dict:
        """Train on the next batch; returns the step number (from 1), its loss and the tokens trained so far."""
        if self.done >= len(self.batches):
            raise RuntimeError(f"all {len(self.batches)} steps are done")
        started = time.perf_counter()
        batch = self.training[self.batches[self.done]]  # (B, T)
        teacher = None if self.dense is None else metrics.teacher_logprobs(self.dense, batch, len(batch))
        self.model.train()
        try:
            loss = finetune.train_step(self.model, self.optimizer, batch, teacher)
        finally:
            self.model.eval()
        self.done += 1
        self.tokens_done += batch.numel()
        self.losses.append(loss)
        self.seconds += time.perf_counter() - started
        return {"step": self.done, "loss": loss, "tokens": self.tokens_done}

    def record(self) -> dict:
        """The training so far: steps, first and last loss, seconds."""
        return {"steps": self.done, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "seconds": self.seconds}

    def save(self, directory: str) -> dict:
        """Save the trained sliced model (safetensors + config, in the model's own dtype) and its tokenizer under
        `directory`."""
        slicing.save_pruned(self.model.to("cpu"), self.tokenizer, Path(directory), dtype=self.export_dtype)
        return {"params": slicing.count_parameters(self.model)}

    def export(self, document: dict) -> dict:
        """Save the trained model with its model card (`document`) in a fresh folder of this node's cache; return
        the folder (`transfer.Located` as a dict) for the driver to stream into its archive."""
        folder = transfer.scratch("exports")
        try:
            self.save(str(folder))
            model_card.write(folder, document)
        except BaseException:
            transfer.remove(str(folder))
            raise
        return transfer.here(folder).to_dict()


class _Trainer:
    """A `Posttrainer` as a Ray actor, or in this process (`in_process`: tests and debugging)."""

    def __init__(self, args: tuple, *, gpus: float, in_process: bool):
        self.local = self.actor = None
        if in_process:
            self.local = Posttrainer(*args)
            return
        threads = max(1, int(ray.cluster_resources().get("CPU", 1))) if gpus == 0 else 0
        remote = ray.remote(Posttrainer).options(num_cpus=1, num_gpus=gpus, max_restarts=0)
        self.actor = remote.remote(*args, threads)

    def call(self, method: str, *args) -> object:
        if self.local is not None:
            return getattr(self.local, method)(*args)
        return ray.get(getattr(self.actor, method).remote(*args))

    def close(self) -> None:
        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)


@dataclass
class PosttrainJob(Job):
    """Runs one posttrain job to completion (or cancellation). The parent's archives are read from `data_dir` and
    the result written there; a stopping driver sends the job back to the queue, to train again from the start.

    Args:
        in_process: train in this process instead of a Ray actor.
    """

    in_process: bool = False

    def run(self) -> None:
        spec = self.spec
        options = spec.posttrain
        parent = self.store.get(options.job)
        configuration = self.store.get_result(options.job, options.candidate)
        archive = self._parent_archive(options.job, options.candidate)
        if archive is not None and not self.in_process:  # the trainer may run on another node: stream it there
            archive = {**transfer.here(Path(archive).parent).to_dict(), "name": Path(archive).name,
                       "size": Path(archive).stat().st_size}
        args = (parent.spec, configuration, archive, options.model_dump(exclude={"job", "candidate"}))
        trainer = _Trainer(args, gpus=spec.resources.gpus_per_evaluator, in_process=self.in_process)
        try:
            plan = trainer.call("describe")
            before = trainer.call("measure")
            event = {"parent": options.job, "candidate": options.candidate, "before": before,
                     "dense": {"params": plan["dense_parameters"]}, **plan}
            self.event("prepared", event)
            self._train(trainer, plan["steps"])
            after = trainer.call("measure")
            document = posttrained_configuration(configuration, spec, plan, trainer.call("record"), before, after)
            files = transfer.Located.from_dict(trainer.call("export", document))
            try:
                meta = artifacts.archive_from(self.data_dir, self.job_id, options.candidate, files)
            finally:
                transfer.discard(files)
        finally:
            trainer.close()
        self.store.put_result(self.job_id, options.candidate, document)
        self.store.put_artifact(self.job_id, options.candidate, meta)
        self.publish_front([front_point(document)], generation=None)
        self.event("posttrained", {"before": before, "after": after})

    def _parent_archive(self, parent_id: str, candidate_id: str) -> str | None:
        """The parent's archive of the candidate when it is on this host, else None (the trainer rebuilds it)."""
        try:
            meta = self.store.get_artifact(parent_id, candidate_id)
        except CandidateNotFound:
            meta = None
        path = None if meta is None else Path(self.data_dir) / "artifacts" / meta["path"]
        if path is None or not path.is_file():
            log.warning("no archive of %s/%s here; the candidate will be rebuilt", parent_id, candidate_id)
            return None
        return str(path)

    def _train(self, trainer: _Trainer, steps: int) -> None:
        """Step the trainer to the end, reporting progress; stop between steps on cancel, a lost lease or a stop."""
        every = max(1, steps // EVENTS_PER_RUN)
        for _ in range(steps):
            self.check_interrupts()
            done = trainer.call("step")
            step = done["step"]
            # evaluations / planned count steps here, so progress bars made for searches show the training
            self.progress({"step": step, "steps": steps, "tokens": done["tokens"], "loss": done["loss"],
                           "evaluations": step, "planned": steps})
            if step % every == 0 or step == steps:
                self.event("training", {"step": step, "steps": steps, "loss": done["loss"]})


def posttrained_configuration(parent: dict, spec: PosttrainJobSpec, plan: dict, record: dict, before: dict,
                              after: dict) -> dict:
    """The follow-up's configuration document: the parent's, with the post-trained metrics and a `posttrain`
    section (parent job, tokens, loss, lr, KL and perplexity before and after)."""
    options = spec.posttrain
    return {
        **parent,
        "weights": "posttrained",
        "metrics": dict(after),
        "posttrain": {
            "job": options.job, "candidate": options.candidate, "tokens": plan["tokens"], "steps": record["steps"],
            "lr": options.lr, "batch_size": options.batch_size, "loss": options.loss, "seed": options.seed,
            "weight_decay": finetune.TrainSettings().weight_decay, "start": plan["start"],
            "first_loss": record["first_loss"], "last_loss": record["last_loss"], "seconds": record["seconds"],
            "before": dict(before), "after": dict(after),
        },
    }


def front_point(document: dict) -> dict:
    """The follow-up job's front: its one candidate, with the objectives of a prune front (KL, parameters)."""
    post = document["posttrain"]
    return {
        "candidate_id": document["candidate_id"],
        "objectives": {"kl": post["after"]["kl"], "params": document["parameters"]},
        "target": document.get("target"),
        "generation": None,
        "held_out_kl": post["after"]["held_out_kl"],
        "perplexity": post["after"]["perplexity"],
        "parent_job": post["job"],
        "before": post["before"],
    }
