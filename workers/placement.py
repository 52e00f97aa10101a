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


def gpu_slots(gpus: float, nodes: list[dict]) -> int:
    """How many tasks of `gpus` GPUs each the alive `nodes` (`ray.nodes()` entries) hold at once."""
    return sum(math.floor(n["Resources"].get("GPU", 0.0) / gpus + 1e-9) for n in nodes if n.get("Alive"))


def wait_placeable(gpus: float, count: int, *, timeout: float, poll: float = 1.0) -> None:
    """Return once the cluster holds `count` tasks of `gpus` GPUs each (at once); at once when `gpus` is 0.

    Raises:
        InvalidSpec: naming `resources.gpus_per_evaluator`, when after `timeout` seconds it still does not.
    """
    if gpus <= 0:
        return
    deadline = time.monotonic() + timeout
    while True:
        nodes = ray.nodes()
        if gpu_slots(gpus, nodes) >= count:
            return
        if time.monotonic() >= deadline:
            alive = [n["Resources"].get("GPU", 0.0) for n in nodes if n.get("Alive")]
            raise InvalidSpec(
                "resources.gpus_per_evaluator",
                f"the job needs {count} task(s) of {gpus:g} GPU(s) at once, but the Ray cluster's "
                f"{len(alive)} node(s) hold {sum(alive):g} GPU(s) in all (at most {max(alive, default=0):g} on one), "
                f"after waiting {timeout:g} s for more; lower resources.gpus_per_evaluator or resources.evaluators, "
                "or add GPU nodes",
            )
        time.sleep(poll)
