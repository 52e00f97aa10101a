"""A job method defined outside darwinfront, as a plug-in would be: its spec class, its runner and its registry
entry, in this one module. `COUNT` is registered by the test that uses it (`tests/test_plugin_method.py`).

Its runner records a known front from a trivial computation: point i of n has error 1 / (i + 1) and size i.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from darwinfront.core.methods import JobMethod, Objective
from darwinfront.core.spec import JobSpec
from workers.job import Job


class CountOptions(BaseModel):
    """How many points the front has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    points: int = Field(default=3, ge=1, le=100)


class CountJobSpec(JobSpec):
    """A `count` job: a front of `count.points` points."""

    method: Literal["count"]
    count: CountOptions = Field(default_factory=CountOptions)

    def planned_evaluations(self) -> int:
        return self.count.points


def count_front(points: int) -> list[dict]:
    """The front a `count` job records."""
    return [{"candidate_id": f"c{i}", "objectives": {"error": 1 / (i + 1), "size": i}, "generation": 0}
            for i in range(points)]


class CountJob(Job):
    """Computes its front in one generation, then publishes it as final."""

    def run(self) -> None:
        points = self.spec.count.points
        front = count_front(points)
        self.generation_done(0, front=front, progress={"generation": 0, "evaluations": points, "planned": points},
                             event={"generation": 0, "front_size": points})
        self.publish_front(front, generation=None)


COUNT = JobMethod(
    name="count", spec=CountJobSpec, runner="plugin_method:CountJob",
    objectives=(Objective(name="error", direction="minimize", unit="ratio"),
                Objective(name="size", direction="minimize", unit="units")),
)
