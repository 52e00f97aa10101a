"""The job methods: what each kind of job is, declared once for the API, the CLI, the driver and the front's readers.

A method names its spec class (its own sections, their validation and its planned evaluations), the objectives of
its front (name, direction, unit), those a spec may add (`optional`, asked by `JobSpec.asked_objectives`), and the
class that runs it as an import path string, so the API and the CLI read this registry without importing torch or
Ray; only the driver imports a runner. A job's objectives are `JobMethod.objectives_of(spec)`.

Adding a method is a spec class (a `JobSpec` subclass whose `method` is `Literal["<name>"]`), a runner (a
`workers.job.Job` subclass) and one `register` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from darwinfront.core.errors import InvalidSpec
from darwinfront.core.joint_spec import JointJobSpec
from darwinfront.core.spec import EvaluateJobSpec, JobSpec, KVJobSpec, PosttrainJobSpec, PruneJobSpec

DEFAULT_METHOD = "structured_prune"  # what a spec without `method` is


class Objective(BaseModel):
    """One objective of a method's front, as the front carries it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    direction: Literal["minimize", "maximize"]
    unit: str


@dataclass(frozen=True)
class JobMethod:
    """One kind of job.

    Attributes:
        name: The spec's `method`.
        spec: Its spec class; its `planned_evaluations()` is the job's budget.
        objectives: The objectives every front of the method has, in the order of its points' `objectives`.
        runner: `"module:Class"` of the `workers.job.Job` subclass that runs it.
        optional: Objectives a spec may add (its `asked_objectives()` names them); they follow `objectives`, in
            this order.
    """

    name: str
    spec: type[JobSpec]
    objectives: tuple[Objective, ...]
    runner: str
    optional: tuple[Objective, ...] = ()

    def objectives_of(self, spec: JobSpec | Mapping[str, Any]) -> tuple[Objective, ...]:
        """The objectives of a job of this method: `objectives`, then the `optional` ones `spec` asks for.

        Args:
            spec: The parsed spec, or a stored (already validated) spec dict.

        Raises:
            ValueError: The spec asks for an objective the method does not offer.
        """
        if not isinstance(spec, JobSpec):
            spec = self.spec.model_validate(dict(spec))
        asked = set(spec.asked_objectives())
        unknown = asked - {o.name for o in self.optional}
        if unknown:
            raise ValueError(f"job method {self.name!r} offers no optional objective {sorted(unknown)}")
        return self.objectives + tuple(o for o in self.optional if o.name in asked)

    def stored_objectives(self, spec: JobSpec | Mapping[str, Any] | None = None) -> list[dict[str, str]]:
        """A job's objectives (`objectives_of(spec)`; without a spec, `objectives`) as a front snapshot stores them
        (`JobStore.set_front`)."""
        return [o.model_dump() for o in (self.objectives if spec is None else self.objectives_of(spec))]

    def load_runner(self) -> type:
        """Import the runner class (the driver's call: it may import torch and Ray)."""
        module, _, attribute = self.runner.partition(":")
        return getattr(importlib.import_module(module), attribute)


_METHODS: dict[str, JobMethod] = {}


def register(method: JobMethod) -> JobMethod:
    """Add `method` to the registry; returns it.

    Raises:
        ValueError: The name is taken, the spec class's `method` is not `Literal[name]`, the runner is not
            `"module:Class"`, or the objectives are none or repeat a name (optional ones included).
    """
    if method.name in _METHODS:
        raise ValueError(f"job method {method.name!r} is already registered")
    if not issubclass(method.spec, JobSpec):
        raise ValueError(f"{method.spec.__name__} is not a JobSpec")
    if get_args(method.spec.model_fields["method"].annotation) != (method.name,):
        raise ValueError(f"{method.spec.__name__}.method must be Literal[{method.name!r}]")
    module, _, attribute = method.runner.partition(":")
    if not module or not attribute:
        raise ValueError(f"runner {method.runner!r} is not 'module:Class'")
    names = [o.name for o in method.objectives + method.optional]
    if not method.objectives or len(set(names)) != len(names):
        raise ValueError(f"job method {method.name!r} needs distinct objectives, got {names}")
    _METHODS[method.name] = method
    return method


def get(name: str) -> JobMethod:
    """The registered method `name`.

    Raises:
        InvalidSpec: No method of that name is registered in this process (for a stored job: the module that
            registers it is not installed where the driver runs).
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise InvalidSpec("method", f"no job method {name!r} is registered here (known: {', '.join(_METHODS)}); "
                          "install the module that registers it") from None


def names() -> tuple[str, ...]:
    """The registered methods, in registration order."""
    return tuple(_METHODS)


def method_of(spec: Mapping[str, Any]) -> JobMethod:
    """The method of a stored (already validated) spec dict; a spec without `method` is `structured_prune`."""
    return get(spec.get("method", DEFAULT_METHOD))


def parse_spec(data: object) -> JobSpec:
    """Validate a spec dict as the spec class of its `method` (default `structured_prune`): the one way to parse one.

    Raises:
        ValidationError: Each error's `loc` names the field as the user wrote it (`prune.targets.0`); an unknown
            method is an error at `method`, a section of another method an error at that section.
    """
    if not isinstance(data, Mapping):
        raise _invalid([{"type": "dict_type", "loc": (), "input": data}])
    name = data.get("method", DEFAULT_METHOD)
    method = _METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        expected = " or ".join(", ".join(repr(n) for n in _METHODS).rsplit(", ", 1))
        raise _invalid([{"type": "literal_error", "loc": ("method",), "input": name, "ctx": {"expected": expected}}])
    strays = [
        {"type": PydanticCustomError("section_of_another_method", "does not apply to method {method} (it is a "
                                     "section of {owners})", {"method": name, "owners": ", ".join(owners)}),
         "loc": (key,), "input": data[key]}
        for key in data
        if key not in method.spec.model_fields
        and (owners := [m.name for m in _METHODS.values() if key in m.spec.model_fields])
    ]
    if strays:
        raise _invalid(strays)
    return method.spec.model_validate(dict(data))


def spec_union(extra: type[BaseModel] | None = None) -> Any:
    """The discriminated union of the registered spec classes, for a JSON schema (each with `extra`'s fields).

    `parse_spec` does the validating: it names a bad field without the union's tag in its path.
    """
    members = []
    for method in _METHODS.values():
        cls = method.spec
        if extra is not None:
            cls = type(f"{cls.__name__}{extra.__name__}", (cls, extra), {"__doc__": cls.__doc__})
        members.append(Annotated[cls, Tag(method.name)])
    return Annotated[Union[tuple(members)], Discriminator(_tag)]  # noqa: UP007 - a Union built at run time


def _tag(value: object) -> str | None:
    if isinstance(value, Mapping):
        return value.get("method", DEFAULT_METHOD)
    return getattr(value, "method", None)


def _invalid(errors: list[InitErrorDetails]) -> ValidationError:
    return ValidationError.from_exception_data("JobSpec", errors)


register(JobMethod(
    name="structured_prune", spec=PruneJobSpec, runner="workers.prune_job:PruneJob",
    objectives=(Objective(name="kl", direction="minimize", unit="nats"),
                Objective(name="params", direction="minimize", unit="parameters")),
))
register(JobMethod(
    name="kv_precision", spec=KVJobSpec, runner="workers.kv_job:KVJob",
    objectives=(Objective(name="kl", direction="minimize", unit="nats"),
                Objective(name="bits", direction="minimize", unit="bits/element")),
))
register(JobMethod(
    name="posttrain", spec=PosttrainJobSpec, runner="workers.posttrain_job:PosttrainJob",
    objectives=(Objective(name="kl", direction="minimize", unit="nats"),
                Objective(name="params", direction="minimize", unit="parameters")),
))
register(JobMethod(
    name="evaluate", spec=EvaluateJobSpec, runner="workers.evaluate_job:EvaluateJob",
    objectives=(Objective(name="score", direction="maximize", unit="mean task metric"),),
))
register(JobMethod(
    name="joint", spec=JointJobSpec, runner="workers.joint_job:JointJob",
    objectives=(Objective(name="kl", direction="minimize", unit="nats"),
                Objective(name="memory", direction="minimize", unit="bytes")),
    optional=(Objective(name="latency", direction="minimize", unit="ms"),),  # deployment.latency
))
