"""What the API reads and writes: one schema per direction."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, RootModel, TypeAdapter
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from darwinfront.core import methods
from darwinfront.core.methods import Objective, parse_spec
from darwinfront.core.spec import EvaluateOptions, JobSpec, PosttrainOptions, ResourceSpec
from darwinfront.core.status import JobStatus
from darwinfront.core.store import JobRecord

IdempotencyKey = Annotated[str, Field(
    min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
    description="Printable ASCII, no spaces; the same key from the same tenant returns the same job.",
)]


class Request(BaseModel):
    """What a job request holds beside its spec."""

    idempotency_key: IdempotencyKey | None = None


class JobCreate(RootModel[dict[str, Any]]):
    """A job spec of any registered method (`method`, default structured_prune), plus an optional idempotency
    key: resending the same key returns the first job.

    The body is read as it came and parsed by `parse_spec`, so a bad field is named as the user wrote it; the
    schema is the union of the methods' specs.
    """

    def parse(self) -> tuple[JobSpec, str | None]:
        """The job spec and the idempotency key.

        Raises:
            ValidationError: naming the bad field.
        """
        fields = dict(self.root)
        key = Request.model_validate({"idempotency_key": fields.pop("idempotency_key", None)}).idempotency_key
        return parse_spec(fields), key

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(TypeAdapter(methods.spec_union(Request)).core_schema)
        schema["examples"] = [{
            "name": "micro-llama, half the attention and MLP parameters",
            "model": {"source": "builtin:micro-llama"},
            "prune": {"targets": [0.5]},
            "search": {"generations": 2, "offspring": 4},
        }]
        return schema


class PosttrainCreate(PosttrainOptions):
    """Post-train a candidate of a finished structured_prune job: the training options, all optional."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"tokens": 65536, "loss": "kd"}]})

    name: str | None = Field(default=None, max_length=200)
    resources: ResourceSpec | None = Field(default=None, description="Default: the parent job's.")
    idempotency_key: IdempotencyKey | None = None


class EvaluateCreate(EvaluateOptions):
    """Score a candidate of a finished job with lm-evaluation-harness: the tasks, and optional settings."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"tasks": ["darwinfront_pydoc_mc"], "limit": 16}]})

    name: str | None = Field(default=None, max_length=200)
    resources: ResourceSpec | None = Field(default=None, description="Default: the parent job's.")
    idempotency_key: IdempotencyKey | None = None


class JobPublic(BaseModel):
    """A job as the API shows it to its owner."""

    id: str
    name: str | None
    status: JobStatus
    spec: dict[str, Any]
    progress: dict[str, Any] = Field(
        description="The driver's latest report: generation, generations, evaluations, planned, best "
        "(fitness per target). Empty until the first generation ends; keys not yet reported are absent.",
    )
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_record(cls, record: JobRecord) -> JobPublic:
        """Build from a stored job (the tenant and the driver id are not shown)."""
        return cls(
            id=record.id, name=record.spec.get("name"), status=record.status, spec=record.spec,
            progress=record.progress, error=record.error,
            created_at=record.created_at, started_at=record.started_at, finished_at=record.finished_at,
        )


class JobList(BaseModel):
    """One page of jobs, newest first."""

    items: list[JobPublic]
    total: int = Field(description="Jobs matching the filter, over all pages.")
    offset: int
    limit: int


class FrontPoint(BaseModel):
    """One non-dominated candidate."""

    model_config = ConfigDict(extra="allow")

    candidate_id: str
    objectives: dict[str, float] = Field(description="Objective values, e.g. {'kl': 0.12, 'params': 0.5}.")
    target: float | None = None
    generation: int | None = None


class Front(BaseModel):
    """The latest Pareto front snapshot of a job."""

    job_id: str
    objectives: list[Objective] = Field(
        description="The front's objectives, as its method declares them: the keys of every point's `objectives`."
    )
    points: list[FrontPoint]
    updated_at: datetime | None
    generation: int | None


class Event(BaseModel):
    """One entry of a job's event log."""

    id: str = Field(description="Stream id; pass it as `after` to read what follows.")
    time: datetime
    kind: str
    data: dict[str, Any]


class EventList(BaseModel):
    """A batch of events, oldest first."""

    events: list[Event]
    last_id: str = Field(description="Id of the last event returned (or the `after` given when none).")


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str = Field(description="Stable machine-readable code, e.g. `invalid_spec`, `job_not_found`.")
    message: str
    field: str | None = Field(default=None, description="Dotted path of the offending field, if any.")


class ErrorBody(BaseModel):
    """The one shape of every error response."""

    error: ErrorDetail


class HistoryPoint(BaseModel):
    """One generation of a job: the driver's report, and the front's hypervolume after it."""

    generation: int
    best: dict[str, float | None] = Field(description="Best fitness (KL) per target, keyed by the target.")
    front_size: int | None = None
    hypervolume: float | None = Field(
        default=None, description="Hypervolume of all candidates up to this generation (see `History.scaling`)."
    )


class History(BaseModel):
    """A job's progress over generations, oldest first."""

    job_id: str
    dense_params: int | None = Field(description="The dense model's parameters; None until the job is prepared.")
    dense_bytes: int | None = Field(default=None, description="A joint job's dense model's memory at its "
                                    "deployment point, every KV group at its first pair (16-bit unless joint.kv16 "
                                    "is off), bytes; None for other methods and until the job is prepared.")
    dense_latency_ms: float | None = Field(default=None, description="A joint job measuring latency: the dense "
                                           "model's decoding step with a 16-bit cache, measured at prepare (ms); "
                                           "None otherwise.")
    scaling: str = Field(description="How the objectives are scaled for the hypervolume.")
    points: list[HistoryPoint]
