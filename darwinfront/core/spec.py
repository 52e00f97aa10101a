"""The job spec: what a user submits, as JSON over REST or as a YAML/JSON file from the CLI.

A spec is a discriminated union on `method`: one class per job method (`PruneJobSpec`, `KVJobSpec`,
`PosttrainJobSpec`, `EvaluateJobSpec`, each a `JobSpec` holding only its own sections), chosen by
`darwinfront.core.methods.parse_spec` from the registered methods (`method` defaults to structured_prune). Every
field is validated with bounds and unknown fields are refused, so a bad spec is answered with a 422 that names the
field before any job exists.
Checks that need the server's settings (allowed roots, budget caps) live in `service.validation`.
"""

from __future__ import annotations

import itertools
import math
from abc import abstractmethod
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from darwinfront.core import criteria
from search import strategies
from search.schedule import halving_schedule
from search.strategy import evaluations_per_generation

# `workers.reference.RECIPES` (trained here) and `workers.gguf_import.PACKAGED_GGUF` (pretrained, from a package);
# a test holds the lists equal.
BUILTIN_MODELS = ("tiny-llama", "micro-llama", "smollm2-135m")
BUILTIN_DATA = ("pydoc",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which model to compress and where to run it."""

    source: str = Field(
        min_length=1,
        max_length=1024,
        description="A local Hugging Face directory, a local `.gguf` file, a hub id, or `builtin:<name>` "
        f"(builtins: {', '.join(BUILTIN_MODELS)}).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    revision: str | None = Field(default=None, max_length=128, description="Hub revision (hub ids only).")

    @field_validator("source")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        if value.startswith("builtin:") and value.removeprefix("builtin:") not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {value!r}; known: {', '.join(BUILTIN_MODELS)}")
        return value


class DataSpec(_Strict):
    """Text for the search, cut into sequences of `seq_len` tokens.

    The calibration documents hold three pools: the fitness pool (`calibration_tokens`; every candidate's KL is
    measured on it against cached teacher outputs), then, disjoint from it, the training pool (`train_tokens`;
    the light training of training-aware selection draws its minibatches from it). The level database is
    computed on the first `database_tokens` of both together. Held-out evaluation text (`eval_tokens`) comes
    from other documents.
    """

    source: str = Field(
        default="builtin:pydoc",
        min_length=1,
        max_length=1024,
        description="`builtin:pydoc` (Python's own help topics), a local .txt or .jsonl file "
        "(field `text`), or a `datasets` id.",
    )
    calibration_tokens: int = Field(default=2048, ge=16, le=4_000_000, description="The fitness pool.")
    train_tokens: int = Field(
        default=65_536, ge=0, le=64_000_000, description="The training pool of training-aware selection."
    )
    database_tokens: int = Field(
        default=16_384, ge=16, le=64_000_000, description="Tokens the level database is computed on."
    )
    eval_tokens: int = Field(default=4096, ge=16, le=4_000_000)
    seq_len: int = Field(default=128, ge=16, le=32_768)
    selection: Literal["first", "kl"] = Field(
        default="first",
        description="How the level database's sequences are chosen: `first` the first database_tokens of the "
        "calibration documents; `kl` NIRVANA's rule: of selection_candidates seeded draws from a larger pool, the "
        "one whose uniform cut at selection_sparsity (the criterion's lowest units) has the lowest KL to the dense "
        "model on the fitness pool.",
    )
    selection_candidates: int = Field(default=8, ge=2, le=64, description="`kl` only: draws compared.")
    selection_pool_tokens: int | None = Field(
        default=None, ge=16, le=64_000_000,
        description="`kl` only: the pool the draws come from (default 4 x database_tokens).",
    )
    selection_sparsity: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="`kl` only: the uniform cut each draw's scores are tried at."
    )

    @field_validator("source")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        if value.startswith("builtin:") and value.removeprefix("builtin:") not in BUILTIN_DATA:
            raise ValueError(f"unknown builtin dataset {value!r}; known: {', '.join(BUILTIN_DATA)}")
        return value

    @model_validator(mode="after")
    def _at_least_one_sequence(self) -> DataSpec:
        if self.calibration_tokens < self.seq_len:
            raise ValueError("calibration_tokens must hold at least one sequence of seq_len tokens")
        if self.eval_tokens < self.seq_len:
            raise ValueError("eval_tokens must hold at least one sequence of seq_len tokens")
        if self.database_tokens < self.seq_len:
            raise ValueError("database_tokens must hold at least one sequence of seq_len tokens")
        if 0 < self.train_tokens < self.seq_len:
            raise ValueError("train_tokens must be 0 or hold at least one sequence of seq_len tokens")
        if self.selection == "kl" and self.selection_pool < math.ceil(self.database_tokens / self.seq_len):
            raise ValueError("selection_pool_tokens must hold at least the database_tokens' sequences")
        return self

    @property
    def selection_pool(self) -> int:
        """Sequences of the pool `kl` selection draws from."""
        return math.ceil((self.selection_pool_tokens or 4 * self.database_tokens) / self.seq_len)

    @property
    def calibration_sequences(self) -> int:
        """Sequences in the fitness pool."""
        return math.ceil(self.calibration_tokens / self.seq_len)


Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class SereneOptions(_Strict):
    """SeReNe's neuron-sensitivity regulariser in training (workers/serene.py): after every optimiser step each
    MLP channel and KV group n is shrunk, w_n ← (1 − λ·S̄_n)·w_n, by its insensitivity S̄_n = ReLU(1 − S_n / (τ ·
    the layer's mean S)), with S_n the batch mean of |∂loss/∂(the unit's output)|."""

    strength: float = Field(default=0.01, gt=0.0, lt=1.0, description="λ: the share of a wholly insensitive "
                            "unit's weights removed per step.")
    threshold: float = Field(default=1.0, gt=0.0, le=100.0, description="τ: units below τ times their layer's "
                             "mean sensitivity shrink, the further below the faster.")


class SerenePosttrainOptions(SereneOptions):
    """SeReNe in post-training, with its follow-up cut."""

    cut: float = Field(default=0.5, ge=0.0, lt=1.0, description="After training, remove the units whose weight "
                       "norm fell below this fraction of their norm before it; the cut model is a second front point "
                       "(`<candidate>.serene-cut`). 0: no cut.")


class BlockDistillOptions(_Strict):
    """HierarchicalPrune's sensitivity-guided distillation (workers/block_distill.py): each decoder block trains
    at lr·w_l, w_l = min(cap, s̄ / s_l), s_l the candidate's block sensitivity
    (KL(candidate ‖ candidate without block l) on `sequences` calibration sequences) and s̄ their mean over the
    trained blocks; the first `freeze_early` blocks do not train."""

    freeze_early: int = Field(default=0, ge=0, le=1024, description="Early blocks kept frozen.")
    cap: float = Field(default=4.0, ge=1.0, le=1000.0, description="Largest per-block weight.")
    sequences: int = Field(default=8, ge=1, le=4096, description="Calibration sequences the sensitivities use.")


class PruneSpec(_Strict):
    """Structured pruning: which fractions of the prunable parameters to remove, and how units are chosen.

    A level table cuts every layer's attention units and MLP channels into `levels` equal steps (fewer when
    they do not divide evenly: one KV group per level, or the nearest count of `mlp_multiple`-wide MLP steps
    that divides the width), so every step of a group costs the same parameters and the search keeps the
    budget exactly. The criterion fills the level database once per model, calibration text and table.
    """

    targets: list[Fraction] = Field(
        default_factory=lambda: [0.5],
        min_length=1,
        max_length=8,
        description="Fractions of the prunable (attention + MLP) parameters to remove; the front spans them.",
    )
    criterion: str = Field(
        default="obs",
        description=f"How units are ranked and the level database filled; one of {', '.join(criteria.names())} "
        "(each a module of workers/criteria/). `obs` (ZipLM second-order removal with weight updates, DarwinLM's "
        "choice) stores updated weights; the others store their removal order.",
    )
    bias_compensation: bool = Field(
        default=False,
        description="FLAP's bias compensation: every cut o_proj / down_proj adds W[:, removed]·mean(x[removed]) to "
        "its output (the calibration mean of what the removed units gave), stored per level in the level database "
        "and saved with the model (a constant, not counted as a parameter). Only with criteria that support it: "
        f"{', '.join(criteria.supporting('bias_compensation'))}.",
    )
    criterion_options: dict[str, int | float] = Field(
        default_factory=dict,
        max_length=8,
        description="Settings of the criterion that the job may tune (each criterion's module declares them, with "
        "bounds): e.g. `probes` and `seed` of `hessian_trace` (Hutchinson probes), `probes`, `eps` and `seed` of "
        "`mini_llm` (SPSA). Part of the level database's name.",
    )
    attention_unit: Literal["kv_group", "q_head"] = Field(
        default="kv_group",
        description="Attention units: `kv_group` whole KV groups (their K/V heads and query heads), or `q_head` "
        "single query heads with every K/V head kept (finer steps under GQA). With `q_head` a target removes that "
        "fraction of the query heads and MLP channels; K/V heads go only with a whole attention (its top level), "
        "so candidates keep more parameters than `kv_group` ones at the same target.",
    )
    implants: list[Literal["attn", "mlp"]] = Field(
        default_factory=list,
        max_length=2,
        description="HAP's neural implants: sub-layers (`attn`, `mlp`) that may, at a level, be replaced by a "
        "rank-r linear map of their input fitted by least squares on the dense model's calibration activations "
        "(stored in the level database), with r chosen so the implant holds exactly the parameters the pruned "
        "level keeps; the evolution then chooses per layer between dense, the pruned level and the implant. "
        "Levels get an implant where that r is a whole number below the hidden size (workers/levels.py).",
    )
    levels: int = Field(default=10, ge=1, le=4096, description="Level steps per layer and group (the target).")
    mlp_multiple: int = Field(default=8, ge=1, le=1024, description="MLP level steps are multiples of this.")
    training_aware: bool = Field(
        default=True,
        description="DarwinLM: fine-tune every candidate briefly before scoring it; false = EvoPress (score as cut).",
    )
    train_loss: Literal["ce", "kd"] = Field(
        default="ce",
        description="Light-training loss: `ce` next-token cross-entropy (DarwinLM), or `kd` distillation, "
        "KL(dense ‖ candidate) on the dense model's outputs (the fitness's own measure).",
    )
    train_lr: float = Field(default=3e-4, gt=0.0, le=1.0, description="AdamW learning rate of the light training.")
    train_batch_size: int = Field(default=8, ge=1, le=4096, description="Sequences per light-training step.")
    train_serene: SereneOptions | None = Field(
        default=None, description="SeReNe's sensitivity regulariser in the light training (null: none).")

    @field_validator("targets")
    @classmethod
    def _distinct(cls, value: list[float]) -> list[float]:
        if len(set(value)) != len(value):
            raise ValueError("targets must be distinct")
        return sorted(value)

    @field_validator("implants")
    @classmethod
    def _distinct_implants(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("implants must be distinct")
        return sorted(value)

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, value: str) -> str:
        criteria.entry(value)  # a ValueError naming the known ones
        return value

    @field_validator("criterion_options")
    @classmethod
    def _criterion_takes(cls, value: dict, info: ValidationInfo) -> dict:
        criterion = info.data.get("criterion")
        return value if criterion is None else criteria.check_options(criterion, value)

    @field_validator("bias_compensation")
    @classmethod
    def _criterion_compensates(cls, value: bool, info: ValidationInfo) -> bool:
        criterion = info.data.get("criterion")  # absent when it was refused itself
        if value and criterion is not None and "bias_compensation" not in criteria.entry(criterion).supports:
            supported = ", ".join(criteria.supporting("bias_compensation"))
            raise ValueError(f"criterion {criterion!r} has no bias compensation; criteria that have one: {supported}")
        return value


class SearchSpec(_Strict):
    """The search per target: the strategy, and the (1+λ) evolution's generations and selection stages
    (DarwinLM's schedule, scaled for small models), which also set every other strategy's budget.

    Every generation λ = `offspring` mutants enter stage 0; stage s scores its candidates on `fitness_tokens[s]`
    tokens (after `train_tokens[s]` tokens of light training when training-aware) and keeps the best
    `survivors[s]`; the parent joins the last stage.
    """

    strategy: str = Field(
        default="evolution",
        description=f"One of {', '.join(strategies.names())}: `evolution` the staged (1+λ) evolution (EvoPress-"
        "style with prune.training_aware false); `random` and `nsga2` spend the evolution's budget on random or "
        "NSGA-II genomes, each scored on the last stage's terms; `uniform` scores the uniform cut alone; `pagcp` "
        "PAGCP's greedy pass, each layer pruned as far as a shared KL budget allows; `nirvana` NIRVANA's global "
        "ranking of the criterion's unit scores at the attention-vs-MLP balance `gamma`; `depth` "
        "HierarchicalPrune's whole-block removal, later blocks first unless the block ablations disagree.",
    )
    early_layer_prior: float = Field(
        default=0.0, ge=0.0, le=20.0,
        description="HierarchicalPrune's early-layer protection in the evolution's mutation: a switch prunes "
        "layer i more with weight exp(prior * i / (layers - 1)) and less with its inverse; 0 = uniform draws.",
    )
    gamma: float | None = Field(
        default=None, gt=0.0, le=100.0,
        description="`nirvana` only: MLP sparsity over attention sparsity (the paper: 3.36 for Llama-3.1-8B); "
        "null scores a grid of values and keeps the best.",
    )
    layer_order: Literal["forward", "reverse"] = Field(
        default="forward", description="`pagcp` only: visit layers first to last, or last to first."
    )
    generations: int = Field(default=30, ge=1, le=10_000)
    offspring: int = Field(default=16, ge=1, le=512)
    survivors: list[int] = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Survivors per stage; default halves the field down to 1 (16 offspring: 8/4/2/1).",
    )
    fitness_tokens: list[int] = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Tokens each stage scores on, capped by the fitness pool (data.calibration_tokens); "
        "default doubles up to 2048 in the last stage (256/512/1024/2048).",
    )
    train_tokens: list[int] = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Tokens of light training per candidate and stage (training-aware only); default the "
        "last entries of 2048/8192/16384/32768, halving further back for longer schedules.",
    )
    kl_topk: Annotated[int, Field(ge=1, le=1_000_000)] | Literal["auto"] | None = Field(
        default="auto",
        description="Score KL on the teacher's top-k tokens: an int, null (always the full vocabulary), or auto "
        "(full up to a 65,536-token vocabulary, the top 256 above it; see workers/fitness.py for the bytes).",
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in strategies.STRATEGIES:
            raise ValueError(f"unknown search strategy {value!r}; known: {', '.join(strategies.names())}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_stages(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("survivors") is None:
            offspring = data.get("offspring", cls.model_fields["offspring"].default)
            offspring = offspring if isinstance(offspring, int) and offspring >= 1 else 1
            data["survivors"] = [s for s, _ in halving_schedule(offspring, pool_sequences=1)]
        n = len(data["survivors"]) if isinstance(data["survivors"], list) else 1
        if data.get("fitness_tokens") is None:
            data["fitness_tokens"] = [max(16, 2048 >> (n - 1 - i)) for i in range(n)]
        if data.get("train_tokens") is None:
            paper = [2048, 8192, 16384, 32768]
            data["train_tokens"] = [2048 >> (n - 4 - i) for i in range(n - 4)] + paper[-n:] if n > 4 else paper[-n:]
        return data

    @model_validator(mode="after")
    def _consistent_stages(self) -> SearchSpec:
        n = len(self.survivors)
        if len(self.fitness_tokens) != n or len(self.train_tokens) != n:
            raise ValueError("survivors, fitness_tokens and train_tokens need one entry per stage")
        if self.survivors[-1] != 1:
            raise ValueError("the last stage keeps one survivor (the next parent)")
        if any(s < 1 for s in self.survivors) or any(b > a for a, b in itertools.pairwise(self.survivors)):
            raise ValueError(f"survivors must be positive and non-increasing, got {self.survivors}")
        if self.survivors[0] > self.offspring:
            raise ValueError(f"stage 0 keeps {self.survivors[0]} survivors of only {self.offspring} offspring")
        if any(t < 1 for t in self.fitness_tokens) or any(t < 0 for t in self.train_tokens):
            raise ValueError("fitness_tokens must be positive and train_tokens non-negative")
        return self

    def evaluations_per_generation(self) -> int:
        """Evaluations of one generation: λ offspring, the survivors of every stage but the last, the parent."""
        return evaluations_per_generation(self.offspring, self.survivors)


class KVSpec(_Strict):
    """KV-cache precision search (KVTuner): per-layer key/value bit pairs, profiled, pruned, grouped, searched."""

    mode: Literal["per_token", "kivi"] = Field(
        default="kivi", description="per_token: K and V per token; kivi: keys per channel, values per token."
    )
    group_size: int | None = Field(default=None, ge=1, le=4096, description="Quantization group (None: mode's).")
    residual: int | None = Field(default=None, ge=0, le=65_536, description="Full-precision window in tokens.")
    bits: list[Literal[2, 4, 8]] = Field(default_factory=lambda: [2, 4, 8], min_length=1, max_length=3)
    sampler: Literal["nsga2", "tpe"] = "nsga2"
    trials: int = Field(default=100, ge=1, le=100_000, description="Configurations to evaluate.")
    population: int = Field(default=16, ge=2, le=1024, description="NSGA-II population; also the ask batch.")
    eps: float = Field(default=0.05, gt=0.0, le=10.0, description="DBSCAN radius when grouping layers.")
    max_bits: float | None = Field(
        default=None, gt=0.0, le=16.0, description="Memory cap: largest average nominal bits per K/V element."
    )
    profile_sequences: int = Field(default=8, ge=1, le=4096, description="Calibration sequences to profile on.")


class PosttrainOptions(_Strict):
    """How a chosen candidate is post-trained: AdamW on `tokens` tokens of the parent job's training text.

    The model is the candidate's physically sliced weights, so what was pruned stays pruned; `kd` distils from
    the dense model (KL(dense ‖ candidate), the fitness's own measure), `ce` is plain next-token loss.
    """

    tokens: int = Field(
        default=131_072, ge=1, le=1_000_000_000,
        description="Training tokens (rounded up to whole sequences); default 4x the search's last-stage "
        "training (32768). When the training text is shorter, it is gone through again, reshuffled.",
    )
    lr: float = Field(default=1e-4, gt=0.0, le=1.0, description="AdamW learning rate (constant).")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Sequences per step.")
    loss: Literal["kd", "ce"] = Field(
        default="kd", description="`kd` distillation from the dense model, or `ce` next-token cross-entropy."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the batch order (same seed, same weights).")
    serene: SerenePosttrainOptions | None = Field(
        default=None, description="SeReNe's sensitivity regulariser, then a follow-up cut (null: none).")
    block_distill: BlockDistillOptions | None = Field(
        default=None, description="HierarchicalPrune's per-block distillation weights (loss kd only; null: none).")

    @field_validator("block_distill")
    @classmethod
    def _distillation(cls, value: BlockDistillOptions | None, info: ValidationInfo) -> BlockDistillOptions | None:
        if value is not None and info.data.get("loss", "kd") != "kd":
            raise ValueError("block_distill weights a distillation: it needs loss kd")
        return value


JobId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
CandidateRef = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]


class PosttrainSpec(PosttrainOptions):
    """Post-train one candidate of a finished `structured_prune` job (its parent) before downloading it."""

    job: JobId = Field(description="The parent structured_prune job.")
    candidate: CandidateRef = Field(description="A candidate of the parent with a stored result (a front point).")


TaskName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]


class EvaluateOptions(_Strict):
    """How a chosen candidate is scored with lm-evaluation-harness (`lm_eval.simple_evaluate`).

    Task names are lm_eval's (hub tasks such as arc_easy, hellaswag, piqa, winogrande) or those of the task
    folders the driver has (`workers/eval_tasks/`, e.g. `darwinfront_pydoc_mc`, and `DARWINFRONT_EVAL_TASKS`);
    an unknown name fails the job with the names it has.
    """

    tasks: list[TaskName] = Field(min_length=1, max_length=32, description="lm_eval task names, each scored.")
    limit: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Score only the first `limit` documents of each task."
    )
    num_fewshot: int | None = Field(default=None, ge=0, le=64, description="Few-shot examples (None: the task's).")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Requests per forward pass.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the few-shot sampling.")

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("tasks must be distinct")
        return value


class EvaluateSpec(EvaluateOptions):
    """Score one candidate of a finished job (its parent: structured_prune, posttrain or kv_precision)."""

    job: JobId = Field(description="The parent job.")
    candidate: CandidateRef = Field(description="A candidate of the parent with a stored result (a front point).")


class ResourceSpec(_Strict):
    """How many Ray evaluators score candidates in parallel, and the GPUs each one holds."""

    evaluators: int = Field(default=1, ge=1, le=256)
    gpus_per_evaluator: float = Field(default=0.0, ge=0.0, le=8.0)


class JobSpec(_Strict):
    """What every job spec holds, whatever its method; each method's spec subclasses it with its own sections.

    A spec is one of the registered methods' classes, chosen by `method`: parse a spec dict with
    `darwinfront.core.methods.parse_spec` (this class is abstract).
    """

    name: str | None = Field(default=None, max_length=200)
    method: str
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)

    @abstractmethod
    def planned_evaluations(self) -> int:
        """Candidate evaluations the job will run at most (its progress bar's end and its quota's charge)."""

    def asked_objectives(self) -> tuple[str, ...]:
        """Names of the method's optional objectives (`JobMethod.optional`) this spec asks for; none by default."""
        return ()


class PruneJobSpec(JobSpec):
    """A `structured_prune` job: a (1+λ) evolution of per-layer levels at each target size (the default method)."""

    method: Literal["structured_prune"] = "structured_prune"
    prune: PruneSpec = Field(default_factory=PruneSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)

    @model_validator(mode="after")
    def _training_has_data(self) -> PruneJobSpec:
        if self.prune.training_aware and any(self.search.train_tokens) and self.data.train_tokens == 0:
            raise ValueError("training-aware selection needs a training pool: set data.train_tokens > 0 "
                             "(or prune.training_aware: false)")
        return self

    def planned_evaluations(self) -> int:
        """Candidate evaluations the search will run: per target, the evolution's (the uniform start, then every
        stage of every generation), which `random` and `nsga2` spend too, or the start alone for `uniform`.

        A run can stop early (no unseen offspring left in a small space), never run more.
        """
        search = self.search
        per_target = strategies.planned_evaluations(
            search.strategy, generations=search.generations, offspring=search.offspring, survivors=search.survivors
        )
        return len(self.prune.targets) * per_target


class KVJobSpec(JobSpec):
    """A `kv_precision` job: per-layer key/value bit pairs searched by Optuna (KVTuner)."""

    method: Literal["kv_precision"]
    kv: KVSpec = Field(default_factory=KVSpec)

    def planned_evaluations(self) -> int:
        """One evaluation per trial."""
        return self.kv.trials


class PosttrainJobSpec(JobSpec):
    """A `posttrain` job: train one front candidate of a finished structured_prune job on more tokens."""

    method: Literal["posttrain"]
    model: ModelSpec | None = Field(
        default=None, description="The parent job's: filled in when the job is created (leave it out)."
    )
    posttrain: PosttrainSpec = Field(
        default=None, validate_default=True, description="The parent job, its candidate and the training options."
    )

    @field_validator("posttrain", mode="before")
    @classmethod
    def _required(cls, value: object) -> object:
        if value is None:
            raise PydanticCustomError("missing", "Field required for method posttrain (job and candidate)")
        return value

    def planned_evaluations(self) -> int:
        """One candidate, trained and measured."""
        return 1


class EvaluateJobSpec(JobSpec):
    """An `evaluate` job: lm-evaluation-harness scores of one front candidate, the dense model's beside them."""

    method: Literal["evaluate"]
    model: ModelSpec | None = Field(
        default=None, description="The parent job's: filled in when the job is created (leave it out)."
    )
    evaluate: EvaluateSpec = Field(
        default=None, validate_default=True, description="The parent job, its candidate and the tasks."
    )

    @field_validator("evaluate", mode="before")
    @classmethod
    def _required(cls, value: object) -> object:
        if value is None:
            raise PydanticCustomError("missing", "Field required for method evaluate (job, candidate and tasks)")
        return value

    def planned_evaluations(self) -> int:
        """One per task (the dense model's scores are cached on the parent)."""
        return len(self.evaluate.tasks)
