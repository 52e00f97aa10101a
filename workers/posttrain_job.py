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

import copy
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
from darwinfront.core.settings import Settings
from darwinfront.core.spec import PosttrainJobSpec, PosttrainOptions, PruneJobSpec
from workers import artifacts, block_distill, data, finetune, fitness, metrics, modeling, serene, slicing, transfer
from workers.job import Job
from workers.placement import wait_placeable
from workers.pool import builtin_model_files, evaluator_cpus

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


def shipped(archive: str | None, in_process: bool) -> str | dict | None:
    """The parent's archive as a follow-up's actor receives it: its path for one in this process, else where to
    stream it from (`{"node", "path", "name", "size"}`, read by `load_candidate`), as the actor may run on another
    node."""
    if archive is None or in_process:
        return archive
    path = Path(archive)
    return {**transfer.here(path.parent).to_dict(), "name": path.name, "size": path.stat().st_size}


def parent_archive(store, data_dir: Path, parent_id: str, candidate_id: str) -> str | None:
    """The parent's archive of the candidate when it is on this host, else None (a follow-up rebuilds it)."""
    try:
        meta = store.get_artifact(parent_id, candidate_id)
    except CandidateNotFound:
        meta = None
    path = None if meta is None else Path(data_dir) / "artifacts" / meta["path"]
    if path is None or not path.is_file():
        log.warning("no archive of %s/%s here; the candidate will be rebuilt", parent_id, candidate_id)
        return None
    return str(path)


class Posttrainer:
    """Trains one sliced candidate against its dense model. Ray runs it as an actor; the driver steps it.

    Args:
        spec_dict: the parent job's spec (model, data, seed).
        configuration: the candidate's configuration document, as the parent stored it.
        archive: the parent's model archive of the candidate, or None to rebuild it.
        options: the `posttrain` options (tokens, lr, batch_size, loss, seed).
        files: where the driver holds a builtin dense model (`pool.builtin_model_files`), brought to this node
            first so the teacher is the model the parent searched against; None loads the source as it is.
        threads: torch CPU threads (0 leaves torch's default).
    """

    def __init__(self, spec_dict: dict, configuration: dict, archive: str | None, options: dict,
                 files: dict | None = None, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        transfer.bring(files, kinds=("model",))
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
        regulariser = self.options.serene
        settings = finetune.TrainSettings(lr=self.options.lr, batch_size=self.options.batch_size,
                                          serene_strength=regulariser.strength if regulariser else 0.0,
                                          serene_threshold=regulariser.threshold if regulariser else 1.0)
        self.regulariser = settings.regulariser(self.model)
        self.norms_before = serene.unit_norms(self.model)
        self.block_weights = None
        if self.options.block_distill is not None:
            blocks = self.options.block_distill
            sensitivities = block_distill.block_sensitivities(self.model, self.calibration[: blocks.sequences])
            self.block_weights = block_distill.block_weights(sensitivities, cap=blocks.cap,
                                                             freeze_early=blocks.freeze_early)
            self.block_sensitivities = sensitivities
            self.optimizer = block_distill.make_optimizer(self.model, self.block_weights, settings.lr,
                                                          settings.weight_decay)
        else:
            self.optimizer = finetune.make_optimizer(self.model, settings)
        self.cut_model: nn.Module | None = None
        self.done = self.tokens_done = 0
        self.losses: list[float] = []
        self.seconds = 0.0

    def describe(self) -> dict:
        """What the run will do: steps, tokens, where the weights came from, model sizes."""
        tokens = sum(len(rows) for rows in self.batches) * self.training.shape[1]
        plan = {"steps": len(self.batches), "tokens": tokens, "start": self.source,
                "parameters": slicing.count_parameters(self.model), "dense_parameters": self.dense_params,
                "training_sequences": len(self.training)}
        if self.block_weights is not None:
            plan["block_sensitivities"] = self.block_sensitivities.tolist()
            plan["block_weights"] = self.block_weights.tolist()
        return plan

    def measure(self, which: str = "trained") -> dict:
        """KL(dense ‖ model) on the fitness pool (`kl`) and held out, and held-out perplexity, as the model is now
        (`which`: the trained model, or its SeReNe follow-up cut)."""
        model = self.model if which == "trained" else self.cut_model
        held_out_kl, perplexity = fitness.kl_and_perplexity(model, self.held_out, self.teacher_held_out)
        return {"kl": fitness.kl(model, self.calibration, self.teacher), "held_out_kl": held_out_kl,
                "perplexity": perplexity}

    def follow_up_cut(self) -> dict | None:
        """SeReNe's follow-up cut: a copy of the trained model without the units whose weight norm fell below
        `serene.cut` of what it was before training. None when SeReNe is off, the cut is 0 or no unit fell."""
        options = self.options.serene
        if options is None or options.cut == 0:
            return None
        drops = serene.cut_shrunk(self.norms_before, serene.unit_norms(self.model), options.cut)
        if not drops:
            return None
        self.cut_model = slicing.cut_further(copy.deepcopy(self.model), drops)
        return {"parameters": slicing.count_parameters(self.cut_model),
                "layout": self.cut_model.config.darwinfront_layout, "ratio": options.cut,
                "removed": {f"{i}.{kind}": len(units) for (i, kind), units in sorted(drops.items())}}

    def step(self) -> dict:
        """Train on the next batch; returns the step number (from 1), its loss and the tokens trained so far."""
        if self.done >= len(self.batches):
            raise RuntimeError(f"all {len(self.batches)} steps are done")
        started = time.perf_counter()
        batch = self.training[self.batches[self.done]]  # (B, T)
        teacher = None if self.dense is None else metrics.teacher_logprobs(self.dense, batch, len(batch))
        self.model.train()
        try:
            loss = finetune.train_step(self.model, self.optimizer, batch, teacher, self.regulariser)
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

    def save(self, directory: str, which: str = "trained", *, card: dict | None = None,
             archive: str | None = None) -> dict:
        """Save the trained sliced model (or its follow-up cut; safetensors + config, in the model's own dtype) with
        its tokenizer (and model card `card`) under `directory`, or as `directory/<archive>.tar`."""
        model = self.model if which == "trained" else self.cut_model
        slicing.save_pruned(model.to("cpu"), self.tokenizer, Path(directory), dtype=self.export_dtype, card=card,
                            archive=archive)
        return {"params": slicing.count_parameters(model)}

    def export(self, document: dict, which: str = "trained") -> dict:
        """Save the trained model (or its follow-up cut) with its model card (`document`) as
        `<candidate_id>.tar` in a fresh folder of this node's cache; return the folder (`transfer.Located` as a
        dict) for the driver to move into its archive."""
        folder = transfer.scratch("exports")
        try:
            self.save(str(folder), which, card=document, archive=document["candidate_id"])
        except BaseException:
            transfer.remove(str(folder))
            raise
        return transfer.here(folder).to_dict()


class FollowupActor:
    """A follow-up job's worker object (`cls(*args, threads)`, default a `Posttrainer`) as a Ray actor, or in this
    process (`in_process`: tests and debugging); its methods are called one at a time with `call`."""

    def __init__(self, args: tuple, *, gpus: float, in_process: bool, cls: type = None):
        cls = cls or Posttrainer
        self.local = self.actor = None
        if in_process:
            self.local = cls(*args)
            return
        settings = Settings()
        resources = settings.evaluator_resources
        wait_placeable(gpus, 1, timeout=settings.placement_timeout_seconds, resources=resources)
        threads = max(1, int(evaluator_cpus(resources))) if gpus == 0 else 0
        remote = ray.remote(cls).options(num_cpus=1, num_gpus=gpus, max_restarts=0,
                                         **({"resources": resources} if resources else {}))
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
        archive = shipped(parent_archive(self.store, self.data_dir, options.job, options.candidate), self.in_process)
        args = (parent.spec, configuration, archive, options.model_dump(exclude={"job", "candidate"}),
                builtin_model_files(parent.spec))
        trainer = FollowupActor(args, gpus=spec.resources.gpus_per_evaluator, in_process=self.in_process)
        try:
            plan = trainer.call("describe")
            before = trainer.call("measure")
            event = {"parent": options.job, "candidate": options.candidate, "before": before,
                     "dense": {"params": plan["dense_parameters"]}, **plan}
            self.event("prepared", event)
            self._train(trainer, plan["steps"])
            after = trainer.call("measure")
            document = posttrained_configuration(configuration, spec, plan, trainer.call("record"), before, after)
            documents = {"trained": document}
            cut = trainer.call("follow_up_cut")
            if cut is not None:
                documents["cut"] = serene_cut_configuration(document, cut, trainer.call("measure", "cut"))
                self.event("serene_cut", {"removed": cut["removed"], "parameters": cut["parameters"]})
            metas = {}
            for which, doc in documents.items():
                files = trainer.call("export", doc, which)
                metas[which] = artifacts.take_exported(self.data_dir, self.job_id, doc["candidate_id"], files)
        finally:
            trainer.close()
        for which, doc in documents.items():
            self.store.put_result(self.job_id, doc["candidate_id"], doc)
            self.store.put_artifact(self.job_id, doc["candidate_id"], metas[which])
        self.publish_front([front_point(doc) for doc in documents.values()], generation=None)
        self.event("posttrained", {"before": before, "after": after})

    def _train(self, trainer: FollowupActor, steps: int) -> None:
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
            "serene": None if options.serene is None else options.serene.model_dump(),
            "block_distill": None if options.block_distill is None else {
                **options.block_distill.model_dump(), "sensitivities": plan["block_sensitivities"],
                "weights": plan["block_weights"]},
        },
    }


def serene_cut_configuration(trained: dict, cut: dict, metrics: dict) -> dict:
    """The configuration document of SeReNe's follow-up cut of a post-trained candidate: its layout (the units it
    keeps, indices of the dense model), its parameters and metrics, and what was cut (`serene_cut`)."""
    post = trained["posttrain"]
    # no level_table: the cut is no level of the database, so a rebuild gives its structure (apply_configuration)
    return {
        **{k: v for k, v in trained.items() if k != "level_table"},
        "candidate_id": f"{trained['candidate_id']}.serene-cut",
        **cut["layout"],  # attention_unit and layers
        "parameters": cut["parameters"],
        "metrics": dict(metrics),
        "posttrain": {**post, "before": dict(post["after"]), "after": dict(metrics)},
        "serene_cut": {"from": trained["candidate_id"], "ratio": cut["ratio"], "removed": cut["removed"]},
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
