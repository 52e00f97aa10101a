"""The job spec: what a user submits, as JSON over REST or as a YAML/JSON file from the CLI.

Every field is validated with bounds and unknown fields are refused, so a bad spec is answered with a 422 that
names the field before any job exists. Checks that need the server's settings (allowed roots, budget caps) live
in `service.validation`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from search.schedule import evaluations_per_generation

BUILTIN_MODELS = ("tiny-llama", "micro-llama")
BUILTIN_DATA = ("pydoc",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which model to compress and where to run it."""

    source: str = Field(
        min_length=1,
        max_length=1024,
        description="A local Hugging Face directory, a hub id, or `builtin:<name>` "
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
    """Calibration and held-out evaluation text, cut into sequences of `seq_len` tokens."""

    source: str = Field(
        default="builtin:pydoc",
        min_length=1,
        max_length=1024,
        description="`builtin:pydoc` (Python's own help topics), a local .txt or .jsonl file "
        "(field `text`), or a `datasets` id.",
    )
    calibration_tokens: int = Field(default=4096, ge=256, le=4_000_000)
    eval_tokens: int = Field(default=4096, ge=256, le=4_000_000)
    seq_len: int = Field(default=128, ge=16, le=32_768)

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
        return self


Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class PruneSpec(_Strict):
    """Structured pruning: which fractions of the prunable parameters to remove, and how units are chosen."""

    targets: list[Fraction] = Field(
        default_factory=lambda: [0.5],
        min_length=1,
        max_length=8,
        description="Fractions of the prunable (attention + MLP) parameters to remove; the front spans them.",
    )
    criterion: Literal["wanda_sp", "magnitude", "random"] = "wanda_sp"
    mlp_multiple: int = Field(default=8, ge=1, le=1024, description="MLP channels removed per level step.")

    @field_validator("targets")
    @classmethod
    def _distinct(cls, value: list[float]) -> list[float]:
        if len(set(value)) != len(value):
            raise ValueError("targets must be distinct")
        return sorted(value)


class SearchSpec(_Strict):
    """The evolutionary budget: generations of a (1+λ) evolution per target."""

    generations: int = Field(default=10, ge=1, le=10_000)
    offspring: int = Field(default=8, ge=1, le=512)


class ResourceSpec(_Strict):
    """How many Ray evaluators score candidates in parallel, and the GPUs each one holds."""

    evaluators: int = Field(default=1, ge=1, le=256)
    gpus_per_evaluator: float = Field(default=0.0, ge=0.0, le=8.0)


class JobSpec(_Strict):
    """A compression job."""

    name: str | None = Field(default=None, max_length=200)
    method: Literal["structured_prune"] = "structured_prune"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)

    def planned_evaluations(self) -> int:
        """Candidate evaluations the search will run: the uniform start, then every stage of every generation."""
        per_generation = evaluations_per_generation(self.search.offspring)
        return len(self.prune.targets) * (1 + self.search.generations * per_generation)
