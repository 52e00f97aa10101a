"""The `joint` job spec: structured pruning and KV-cache precision searched together against deployment memory.

It reuses the prune job's `prune` section (criterion, level table; its `targets` seed the first round with
uniform cuts, each with every uniform KV preset) and the KV job's `kv` section (mode, grouping, bits, profiling;
KVTuner's pair lists and layer groups are computed on the dense model), and adds `deployment` (batch size, context
length, dtype) and `joint` (strategy, budget, memory cap, seed jobs). Candidates are scored as cut (no light
training). `deployment.latency` asks for a third objective, the measured time of one decoding step of the
candidate as applied.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from darwinfront.core.spec import JobId, JobSpec, KVSpec, PruneSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
LATENCY_CONTEXT = 256  # tokens the cache holds before a timed decoding step, unless the deployment holds fewer
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: object) -> int:
    """Bytes of an int or a size string ("6GiB", "512 MB", "1.5gib"); a ValueError naming the value otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        number, unit = value, ""
    elif isinstance(value, str) and (match := _SIZE.match(value)) and match.group(2).lower() in _UNITS:
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ValueError(f"{value!r} is not a size: give bytes (an integer) or a string such as '6GiB' or '512MB'")
    size = int(number * _UNITS[unit])
    if size < 1:
        raise ValueError(f"{value!r} is not a positive size")
    return size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencySpec(_Strict):
    """The measured latency objective: the median wall time of one decoding step of `batch_size` sequences whose
    cache (the candidate's mixed-precision cache, as `generate` uses it) already holds `context` tokens."""

    context: int = Field(default=LATENCY_CONTEXT, ge=1, le=1_048_576, description="Tokens in the cache before the "
                         f"first timed step; default min(deployment.context, {LATENCY_CONTEXT}), at most it.")
    warmup: int = Field(default=2, ge=0, le=100, description="Untimed decoding steps first.")
    repeats: int = Field(default=5, ge=1, le=100, description="Timed decoding steps; their median is the objective.")


class DeploymentSpec(_Strict):
    """The point the memory objective is measured at: `batch_size` sequences of `context` tokens, weights and K/V
    activations in `dtype` (quantized K/V keep fp16 scales and zero points). `latency` (true, or its settings)
    adds the measured decoding latency at that batch size as an objective."""

    batch_size: int = Field(default=1, ge=1, le=4096)
    context: int = Field(default=4096, ge=1, le=1_048_576, description="Tokens held in the KV cache per sequence.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="Weights' and full-precision K/V bytes per element (4 or 2).")
    latency: LatencySpec | None = Field(
        default=None, description="Also minimise the measured latency (ms) of one decoding step of the candidate as "
        "applied: `true` for the defaults, or its settings. Noisy on a shared machine.")

    @model_validator(mode="before")
    @classmethod
    def _latency_context(cls, data: object) -> object:
        """`latency: true` is the default settings, `false` none; an unset latency context is resolved here, so the
        stored spec says the workload measured."""
        if not isinstance(data, dict) or "latency" not in data:
            return data
        latency = data["latency"]
        latency = {} if latency is True else None if latency is False else latency
        if isinstance(latency, dict) and "context" not in latency:
            context = data.get("context", cls.model_fields["context"].default)
            latency = {**latency, "context": min(context, LATENCY_CONTEXT) if isinstance(context, int) else context}
        return {**data, "latency": latency}

    @field_validator("latency")
    @classmethod
    def _within_the_context(cls, value: LatencySpec | None, info: ValidationInfo) -> LatencySpec | None:
        context = info.data.get("context")
        if value is not None and context is not None and value.context > context:
            raise ValueError(f"latency.context {value.context} exceeds the deployment's context {context}")
        return value

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


class JointSearchSpec(_Strict):
    """How the joint genome is searched."""

    strategy: Literal["evolution", "nsga2"] = Field(
        default="evolution", description="`evolution`: Pareto evolution with mixed mutation (level moves and KV "
        "pair changes); `nsga2`: Optuna's NSGA-II over the whole genome.")
    evaluations: int = Field(default=200, ge=1, le=100_000, description="Distinct genomes to evaluate.")
    population: int = Field(default=16, ge=2, le=1024, description="Genomes per round (NSGA-II's population).")
    kv_rate: float = Field(default=0.5, ge=0.0, le=1.0, description="Evolution: chance a move changes a KV pair "
                           "at the start; it then follows which kind of move reached the front (0 and 1 stay fixed).")
    kv16: bool = Field(default=True, description="Also offer every group the unquantized 16-bit pair.")
    memory_cap: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="The most bytes a candidate may need at the deployment point (weights + KV "
        "cache): an integer or a size string such as '6GiB'; a genome over it is never evaluated.")
    seed_jobs: list[JobId] = Field(
        default_factory=list, max_length=8, description="Finished structured_prune and kv_precision jobs of "
        "yours on the same model: the first round adds every pair of their front points.")

    @field_validator("memory_cap", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return None if value is None else parse_bytes(value)


class JointJobSpec(JobSpec):
    """A `joint` job: per-layer pruning levels and per-group K/V bit pairs in one genome, against (KL, memory)."""

    method: Literal["joint"]
    prune: PruneSpec = Field(default_factory=lambda: PruneSpec(training_aware=False))
    kv: KVSpec = Field(default_factory=KVSpec)
    deployment: DeploymentSpec = Field(default_factory=DeploymentSpec)
    joint: JointSearchSpec = Field(default_factory=JointSearchSpec)

    @model_validator(mode="before")
    @classmethod
    def _untrained_by_default(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("prune"), dict):
            data = {**data, "prune": {"training_aware": False, **data["prune"]}}
        return data

    @model_validator(mode="after")
    def _scored_as_cut(self) -> JointJobSpec:
        if self.prune.training_aware:
            raise ValueError("prune.training_aware: a joint job scores candidates as cut (leave it out or false)")
        defaults = KVSpec()
        if any(getattr(self.kv, k) != getattr(defaults, k) for k in ("trials", "max_bits", "sampler", "population")):
            raise ValueError("kv.trials, kv.max_bits, kv.sampler and kv.population are the kv_precision job's: "
                             "a joint job's are joint.evaluations, joint.memory_cap, joint.strategy and "
                             "joint.population")
        return self

    def planned_evaluations(self) -> int:
        """One evaluation per distinct genome."""
        return self.joint.evaluations

    def asked_objectives(self) -> tuple[str, ...]:
        """`latency` when `deployment.latency` asks for it."""
        return ("latency",) if self.deployment.latency is not None else ()
