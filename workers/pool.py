"""Ray, the way Ray's docs say: one actor per evaluator holding the model, results in completion order."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator

import ray

from darwinfront.core.settings import Settings
from workers import transfer
from workers.evaluator import Evaluator
from workers.modeling import resolve_source
from workers.placement import wait_placeable
from workers.prepare import level_layers, node_threads, prepare
from workers.progress import StepReport, format_seconds
from workers.telemetry import Telemetry


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


def run_prepare(
    spec: dict, *, gpus: float = 0.0, fn=prepare, report: StepReport | None = None, helpers: int = 0
) -> dict:
    """Run a job's prepare step `fn(spec, report, threads=..)` as a Ray task and return its description.

    The task reserves one CPU but runs torch on the cores of its node (`node_threads`): nothing else of the job
    runs until it is done. `report` goes with it and reports its steps. With `helpers` > 0 (a prune job with
    several evaluators), as many more Ray tasks, each with the evaluators' GPUs, build a share of an obs
    database's layers meanwhile, and the node's cores are split between them.
    """

    def task(spec: dict, report: StepReport | None) -> dict:
        threads = max(1, node_threads() // (helpers + 1)) if gpus == 0 else node_threads()
        if not helpers:
            prepared = fn(spec, report, threads=threads)
        else:
            layers = RemoteLayers(spec, helpers, gpus=gpus, threads=threads)
            prepared = fn(spec, report, threads=threads, helpers=layers)
        return {**prepared, "files": built_folders(spec, prepared)}

    wait_placeable(gpus, helpers + 1, timeout=Settings().placement_timeout_seconds)
    return ray.get(ray.remote(task).options(num_gpus=gpus, num_cpus=1, max_retries=0).remote(spec, report))


def built_folders(spec: dict, prepared: dict) -> dict:
    """The folders a prepare step built on its node that evaluators elsewhere copy (`transfer.bring`): the
    level database, and a builtin model (trained or converted into the cache; other sources load on every node
    from the hub or the path given)."""
    source = spec.get("model", {}).get("source", "")
    model = resolve_source(source) if source.startswith("builtin:") else None
    return transfer.job_files(prepared.get("database", {}).get("directory"), model)


class RemoteLayers:
    """`database.LayerHelpers` on Ray: each helper is a streaming task (`prepare.level_layers`) that loads the
    job's model and tokens and sends each finished layer's results back through the object store.

    Args:
        spec: the job spec.
        count: helpers to start.
        gpus, threads: what each helper holds and the torch threads it runs.
    """

    def __init__(self, spec: dict, count: int, *, gpus: float = 0.0, threads: int = 0):
        self.spec, self.count, self.gpus, self.threads = spec, count, gpus, threads
        self._streams: list[ray.ObjectRefGenerator] = []

    def start(self, shares: list[list[int]]) -> None:
        task = ray.remote(level_layers).options(num_returns="streaming", num_gpus=self.gpus, num_cpus=1,
                                              max_retries=0)
        self._streams = [task.remote(self.spec, share, self.threads) for share in shares if share]

    def poll(self) -> list[tuple[int, dict]]:
        return list(self._ready(timeout=0.0))

    def drain(self) -> Iterator[tuple[int, dict]]:
        while self._streams:
            yield from self._ready(timeout=None)

    def _ready(self, timeout: float | None) -> Iterator[tuple[int, dict]]:
        if not self._streams:
            return
        ready, _ = ray.wait(self._streams, num_returns=1, timeout=timeout)
        for stream in ready:
            try:
                ref = next(stream)
            except StopIteration:
                self._streams.remove(stream)
                continue
            yield ray.get(ref)


class EvaluatorPool:
    """A fixed set of evaluator actors for one job.

    Args:
        spec: the job spec as a dict.
        prepared: `prepare`'s output, put in the object store once and shared by every actor.
        size: number of actors.
        gpus: GPUs each actor reserves (0 on CPU).
        max_retries: how often a request whose evaluator died is sent again.
        evaluator: the actor class (`Evaluator` for pruning, `KVEvaluator` for KV precision).
        meter, job_id: where evaluation latencies and live evaluators are reported for `/metrics`.
    """

    def __init__(
        self, spec: dict, prepared: dict, *, size: int, gpus: float = 0.0, max_retries: int = 2, evaluator=Evaluator,
        meter: Telemetry | None = None, job_id: str = "",
    ):
        wait_placeable(gpus, size, timeout=Settings().placement_timeout_seconds)
        cpus = ray.cluster_resources().get("CPU", 1)
        threads = max(1, int(cpus // size)) if gpus == 0 else 0
        shared = ray.put(prepared)
        self._new_actor = lambda: (
            ray.remote(evaluator)
            .options(num_cpus=min(1, cpus / size), num_gpus=gpus, max_restarts=0)
            .remote(spec, shared, threads)
        )
        self.actors = [self._new_actor() for _ in range(size)]
        self.max_retries = max_retries
        self.lost = 0  # evaluators replaced after they died
        self.meter, self.job_id = meter, job_id
        if meter is not None:
            meter.evaluators(job_id, len(self.actors))

    def wait_ready(self, report: StepReport | None = None, what: str = "") -> None:
        """Block until every evaluator has started (model, data and teacher outputs loaded), reporting it."""
        if report is not None:
            report("evaluators", f"starting {len(self.actors)} evaluator(s){what}")
        started = time.perf_counter()
        ray.get([actor.__ray_ready__.remote() for actor in self.actors])
        if report is not None:
            seconds = format_seconds(time.perf_counter() - started)
            report("evaluators", f"{len(self.actors)} evaluator(s) ready in {seconds}")

    def map_unordered(self, requests: Iterable[dict], method: str = "evaluate") -> Iterator[tuple[dict, dict]]:
        """Yield `(request, reply)` as replies arrive, keeping every actor busy with one request to `method`
        (each request has a `candidate_id`; only `evaluate` replies count as evaluations in the telemetry).

        An evaluator that dies (killed process, lost node) is replaced and its request goes to the next free
        evaluator, at most `max_retries` times; then the request comes back as a failure with the reason.
        """
        pending = list(requests)[::-1]
        attempts: dict[str, int] = {}
        in_flight: dict[ray.ObjectRef, tuple[dict, object]] = {}
        idle = list(self.actors)
        while pending or in_flight:
            while pending and idle:
                request, actor = pending.pop(), idle.pop()
                in_flight[getattr(actor, method).remote(request)] = (request, actor)
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            request, actor = in_flight.pop(done)
            try:
                reply = ray.get(done)
            except ray.exceptions.RayActorError as exc:
                idle.append(self._replace(actor))
                cid = request["candidate_id"]
                attempts[cid] = attempts.get(cid, 0) + 1
                if attempts[cid] <= self.max_retries:
                    pending.append(request)
                    continue
                reply = _lost_reply(request, exc)
            else:
                idle.append(actor)
            if self.meter is not None and method == "evaluate":
                self.meter.evaluation(reply.get("seconds"), failed=bool(reply.get("error")))
            yield request, reply

    def _replace(self, dead) -> object:
        self.lost += 1
        if self.lost > len(self.actors) * (self.max_retries + 1):
            raise RuntimeError(f"evaluators keep dying ({self.lost} lost); last: see the driver log")
        fresh = self._new_actor()
        self.actors[self.actors.index(dead)] = fresh
        if self.meter is not None:
            self.meter.evaluators(self.job_id, len(self.actors), lost=self.lost)
        return fresh

    def call(self, method: str, *args) -> object:
        """Run one method on the first actor and wait for it."""
        return ray.get(getattr(self.actors[0], method).remote(*args))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.meter is not None:
            self.meter.evaluators(self.job_id, 0)


def _lost_reply(request: dict, exc: BaseException) -> dict:
    return {**request, "error": f"evaluator lost: {describe_error(exc)}"}
