"""Ray, the way Ray's docs say: one actor per evaluator holding the model, results in completion order."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import ray

from workers.evaluator import Evaluator, prepare


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to `address` (or `RAY_ADDRESS`), else start a local Ray; idempotent."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"address": address} if address else {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False}
    ray.init(ignore_reinit_error=True, log_to_driver=False, logging_level="WARNING", **kwargs)


def describe_error(exc: BaseException) -> str:
    """One readable line for an exception that crossed Ray (the remote cause, not Ray's wrapping)."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".strip()


def run_prepare(spec: dict, *, gpus: float = 0.0) -> dict:
    """Run `prepare` as a Ray task and return its description."""
    task = ray.remote(prepare).options(num_gpus=gpus, num_cpus=1, max_retries=0)
    return ray.get(task.remote(spec))


class EvaluatorPool:
    """A fixed set of evaluator actors for one job.

    Args:
        spec: the job spec as a dict.
        prepared: `prepare`'s output, put in the object store once and shared by every actor.
        size: number of actors.
        gpus: GPUs each actor reserves (0 on CPU).
    """

    def __init__(self, spec: dict, prepared: dict, *, size: int, gpus: float = 0.0):
        cpus = ray.cluster_resources().get("CPU", 1)
        threads = max(1, int(cpus // size)) if gpus == 0 else 0
        shared = ray.put(prepared)
        actor = ray.remote(Evaluator).options(num_cpus=min(1, cpus / size), num_gpus=gpus, max_restarts=0)
        self.actors = [actor.remote(spec, shared, threads) for _ in range(size)]

    def map_unordered(self, requests: Iterable[dict]) -> Iterator[tuple[dict, dict]]:
        """Yield `(request, reply)` as replies arrive, keeping every actor busy with one request."""
        pending = list(requests)[::-1]
        in_flight: dict[ray.ObjectRef, tuple[dict, object]] = {}
        idle = list(self.actors)
        while pending or in_flight:
            while pending and idle:
                request, actor = pending.pop(), idle.pop()
                in_flight[actor.evaluate.remote(request)] = (request, actor)
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            request, actor = in_flight.pop(done)
            idle.append(actor)
            yield request, ray.get(done)

    def call(self, method: str, *args) -> object:
        """Run one method on the first actor and wait for it."""
        return ray.get(getattr(self.actors[0], method).remote(*args))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
