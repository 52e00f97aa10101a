"""Whether a job's GPU tasks fit the Ray cluster: a job that asks for GPUs the cluster does not have fails in a
bounded time, saying what it asked and what is there, instead of waiting forever as an infeasible Ray task would.

Ray places a task or actor only on one node with all it reserves, so what counts is how many `gpus`-sized slots
the alive nodes hold together (each node gives floor(its GPUs / gpus)). An autoscaling cluster may add a node
while the job waits (`placement_timeout_seconds`).
"""

from __future__ import annotations

import math
import time

import ray

from darwinfront.core.errors import InvalidSpec


def slots(demand: dict[str, float], nodes: list[dict]) -> int:
    """How many tasks reserving `demand` (resource -> amount, e.g. `{"GPU": 1, "darwinfront_evaluator": 1}`) the
    alive `nodes` (`ray.nodes()` entries) hold at once: each node gives its fewest whole copies of any resource."""
    wanted = {name: amount for name, amount in demand.items() if amount > 0}
    assert wanted, "a demand of nothing fits anywhere"
    return sum(
        min(math.floor(n["Resources"].get(name, 0.0) / amount + 1e-9) for name, amount in wanted.items())
        for n in nodes if n.get("Alive")
    )


def gpu_slots(gpus: float, nodes: list[dict]) -> int:
    """How many tasks of `gpus` GPUs each the alive `nodes` (`ray.nodes()` entries) hold at once."""
    return slots({"GPU": gpus}, nodes)


def evaluator_demand(gpus: float, resources: dict[str, float] | None = None) -> dict[str, float]:
    """What one evaluator (or a job's model task) reserves beside its CPU: its GPUs and the operator's custom
    resources (`DARWINFRONT_EVALUATOR_RESOURCES`)."""
    return {**({"GPU": gpus} if gpus > 0 else {}), **(resources or {})}


def wait_placeable(
    gpus: float, count: int, *, timeout: float, poll: float = 1.0, resources: dict[str, float] | None = None
) -> None:
    """Return once the cluster holds `count` tasks of `gpus` GPUs and `resources` each (at once); at once when they
    ask for neither.

    Raises:
        InvalidSpec: naming `resources.gpus_per_evaluator` (or `resources.evaluators`, when the custom resources
            are what is short), when after `timeout` seconds it still does not.
    """
    demand = evaluator_demand(gpus, resources)
    if not demand:
        return
    deadline = time.monotonic() + timeout
    while True:
        nodes = ray.nodes()
        if slots(demand, nodes) >= count:
            return
        if time.monotonic() >= deadline:
            raise _unplaceable(gpus, count, resources or {}, nodes, timeout)
        time.sleep(poll)


def _unplaceable(gpus: float, count: int, resources: dict[str, float], nodes: list[dict], timeout: float):
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    if resources and (gpus <= 0 or gpu_slots(gpus, nodes) >= count):
        held = {name: sum(r.get(name, 0.0) for r in alive) for name in resources}
        return InvalidSpec(
            "resources.evaluators",
            f"the job needs {count} evaluator(s) reserving {resources} each, but the Ray cluster's {len(alive)} "
            f"node(s) hold {held} in all, after waiting {timeout:g} s for more; start evaluator nodes with "
            "`ray start --resources=...` naming them, change DARWINFRONT_EVALUATOR_RESOURCES, or lower "
            "resources.evaluators",
        )
    gpu = [r.get("GPU", 0.0) for r in alive]
    return InvalidSpec(
        "resources.gpus_per_evaluator",
        f"the job needs {count} task(s) of {gpus:g} GPU(s) at once, but the Ray cluster's "
        f"{len(gpu)} node(s) hold {sum(gpu):g} GPU(s) in all (at most {max(gpu, default=0):g} on one), "
        f"after waiting {timeout:g} s for more; lower resources.gpus_per_evaluator or resources.evaluators, "
        "or add GPU nodes",
    )
