"""Ray, the way Ray's docs say: one actor per evaluator holding the model, results in completion order."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator

import ray

from darwinfront.core.settings import Settings
from workers import transfer
from workers.evaluator import Evaluator
from workers.modeling import resolve_source
from workers.placement import wait_placeable
from workers.prepare import level_layers, node_threads, prepare
from workers.progress import StepReport, format_seconds
from workers.reference import builtin_model_path
from workers.telemetry import Telemetry


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to `address` (or `RAY_ADDRESS`), else start a local Ray; idempotent.

    A cluster with token authentication (`ray start` with `RAY_AUTH_MODE=token`) takes this driver when it has the
    cluster's token, as `RAY_AUTH_TOKEN` or a file named by `RAY_AUTH_TOKEN_PATH`: given one, token mode is turned on
    here, since Ray does so by itself only for a local cluster it finds (docs/OPERATIONS.md, "Ray authentication").
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ):
        os.environ["RAY_AUTH_MODE"] = "token"
        config = getattr(ray._raylet, "Config", None)  # Ray read its environment when imported: read it again
        if config is not None:
            config.initialize("")
    kwargs = {"address": address} if address else {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False}
    try:
        ray.init(ignore_reinit_error=True, log_to_driver=False, logging_level="WARNING", **kwargs)
    except ConnectionError as exc:
        if not _refused_token(exc):
            raise
        raise ConnectionError(
            f"the Ray cluster at {address} refused this driver: it uses token authentication, so give the driver "
            "the cluster's token as RAY_AUTH_TOKEN or as a file named by RAY_AUTH_TOKEN_PATH (RAY_AUTH_MODE=token "
            "is then set for you); see docs/OPERATIONS.md, 'Ray authentication'"
        ) from exc


def _refused_token(exc: BaseException | None) -> bool:
    """Whether Ray's connection error comes from a refused token (its cause arrives as text, not as an object)."""
    while exc is not None:
        if isinstance(exc, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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

    settings = Settings()
    resources = settings.evaluator_resources
    wait_placeable(gpus, helpers + 1, timeout=settings.placement_timeout_seconds, resources=resources)
    options = {"num_gpus": gpus, "num_cpus": 1, "max_retries": 0, **({"resources": resources} if resources else {})}
    prepared = ray.get(ray.remote(task).options(**options).remote(spec, report))
    transfer.bring(prepared["files"], kinds=("model",))  # the driver keeps the builtin model for follow-ups
    return prepared


def built_folders(spec: dict, prepared: dict) -> dict:
    """The folders a prepare step built on its node that evaluators elsewhere copy (`transfer.bring`): the
    level database, and a builtin model (trained or converted into the cache; other sources load on every node
    from the hub or the path given)."""
    source = spec.get("model", {}).get("source", "")
    model = resolve_source(source) if source.startswith("builtin:") else None
    return transfer.job_files(prepared.get("database", {}).get("directory"), model)


def builtin_model_files(spec: dict) -> dict | None:
    """Where this process holds the builtin model of `spec` (`transfer.job_files`, for a follow-up's actor to
    `transfer.bring`), or None: not a builtin model, or none here (the actor then builds its own)."""
    source = spec.get("model", {}).get("source", "")
    if not source.startswith("builtin:"):
        return None
    path = builtin_model_path(source.removeprefix("builtin:"))
    return transfer.job_files(None, str(path)) if path.is_dir() else None


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
        resources = Settings().evaluator_resources
        task = ray.remote(level_layers).options(num_returns="streaming", num_gpus=self.gpus, num_cpus=1,
                                              max_retries=0, **({"resources": resources} if resources else {}))
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
    """A set of evaluator actors for one job, kept at `size` while the cluster can place them.

    Args:
        spec: the job spec as a dict.
        prepared: `prepare`'s output, put in the object store once and shared by every actor.
        size: number of actors.
        gpus: GPUs each actor reserves (0 on CPU); each also reserves `Settings.evaluator_resources`.
        max_retries: how often a request whose evaluator died is sent again.
        evaluator: the actor class (`Evaluator` for pruning, `KVEvaluator` for KV precision).
        meter, job_id: where evaluation latencies and live evaluators are reported for `/metrics`.
        on_event: `on_event(kind, data)` is told when an evaluator is lost (`evaluator_lost`), replaced
            (`evaluator_replaced`) or cannot be placed again (`evaluator_dropped`); a job writes them as events.
    """

    def __init__(
        self, spec: dict, prepared: dict, *, size: int, gpus: float = 0.0, max_retries: int = 2, evaluator=Evaluator,
        meter: Telemetry | None = None, job_id: str = "", on_event: Callable[[str, dict], None] | None = None,
    ):
        settings = Settings()
        resources = settings.evaluator_resources
        self.placement_timeout = settings.placement_timeout_seconds
        wait_placeable(gpus, size, timeout=self.placement_timeout, resources=resources)
        cpus = evaluator_cpus(resources)
        threads = max(1, int(cpus // size)) if gpus == 0 else 0
        shared = ray.put(prepared)
        options = {"num_cpus": min(1, cpus / size), "num_gpus": gpus, "max_restarts": 0}
        if resources:
            options["resources"] = dict(resources)
        self._new_actor = lambda: ray.remote(evaluator).options(**options).remote(spec, shared, threads)
        self.actors = [self._new_actor() for _ in range(size)]
        self.max_retries = max_retries
        self.lost = 0  # evaluators replaced after they died
        self.meter, self.job_id = meter, job_id
        self._on_event = on_event or (lambda kind, data: None)
        self._starting: dict[ray.ObjectRef, tuple[object, float]] = {}  # replacement's ready ref -> (actor, deadline)
        self._idle: list = []
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

        An evaluator that dies (killed process, lost node) is replaced by a new actor, which Ray places on a live
        node, and its request goes to the next free evaluator, at most `max_retries` times; then the request comes
        back as a failure with the reason. A replacement the cluster cannot place within the placement timeout is
        dropped and the job goes on with fewer evaluators; with none left it fails.
        """
        pending = list(requests)[::-1]
        attempts: dict[str, int] = {}
        in_flight: dict[ray.ObjectRef, tuple[dict, object]] = {}
        starting = {actor for actor, _ in self._starting.values()}
        self._idle = [actor for actor in self.actors if actor not in starting]
        while pending or in_flight:
            while pending and self._idle:
                request, actor = pending.pop(), self._idle.pop()
                in_flight[getattr(actor, method).remote(request)] = (request, actor)
            done = self._wait(list(in_flight))
            if done is None:
                continue
            request, actor = in_flight.pop(done)
            try:
                reply = ray.get(done)
            except ray.exceptions.RayActorError as exc:
                cid = request["candidate_id"]
                attempts[cid] = attempts.get(cid, 0) + 1
                retry = attempts[cid] <= self.max_retries
                self._replace(actor, exc, candidate_id=cid, retried=retry)
                if retry:
                    pending.append(request)
                    continue
                reply = _lost_reply(request, exc)
            else:
                self._idle.append(actor)
            if self.meter is not None and method == "evaluate":
                self.meter.evaluation(reply.get("seconds"), failed=bool(reply.get("error")))
            yield request, reply

    def _wait(self, in_flight: list[ray.ObjectRef]) -> ray.ObjectRef | None:
        """The next finished evaluation of `in_flight`, or None when a replacement started (it joins the idle
        evaluators), died, or found no place in time (it is dropped)."""
        timeout = None
        if self._starting:
            timeout = max(0.0, min(deadline for _, deadline in self._starting.values()) - time.monotonic())
        elif not in_flight:
            raise RuntimeError(f"every evaluator was lost ({self.lost} in all) and none could be placed again")
        done, _ = ray.wait(in_flight + list(self._starting), num_returns=1, timeout=timeout)
        if not done:
            self._drop_overdue()
            return None
        if done[0] in self._starting:
            actor, _ = self._starting.pop(done[0])
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as exc:  # its node went too
                self._replace(actor, exc, candidate_id=None, retried=False)
            else:
                self._idle.append(actor)
                self._on_event("evaluator_replaced", {"evaluators": len(self.actors) - len(self._starting)})
            return None
        return done[0]

    def _replace(self, dead, exc: BaseException, *, candidate_id: str | None, retried: bool) -> None:
        self.lost += 1
        if self.lost > len(self.actors) * (self.max_retries + 1):
            raise RuntimeError(f"evaluators keep dying ({self.lost} lost); last: {describe_error(exc)}")
        fresh = self._new_actor()
        self.actors[self.actors.index(dead)] = fresh
        self._starting[fresh.__ray_ready__.remote()] = (fresh, time.monotonic() + self.placement_timeout)
        self._on_event("evaluator_lost", {
            "candidate_id": candidate_id, "error": describe_error(exc), "retried": retried, "lost": self.lost,
        })
        if self.meter is not None:
            self.meter.evaluators(self.job_id, len(self.actors), lost=self.lost)

    def _drop_overdue(self) -> None:
        now = time.monotonic()
        for ref, (actor, deadline) in list(self._starting.items()):
            if deadline <= now:
                del self._starting[ref]
                self.actors.remove(actor)
                ray.kill(actor, no_restart=True)
                self._on_event("evaluator_dropped", {
                    "evaluators": len(self.actors),
                    "reason": "a replacement evaluator found no place in the cluster within "
                              f"{self.placement_timeout:g} s",
                })
                if self.meter is not None:
                    self.meter.evaluators(self.job_id, len(self.actors), lost=self.lost)

    def call(self, method: str, *args) -> object:
        """Run one method on a started evaluator and wait for it; one that dies meanwhile is replaced and the
        call sent again, at most `max_retries` times."""
        for attempt in range(self.max_retries + 1):
            starting = {actor for actor, _ in self._starting.values()}
            ready = [actor for actor in self.actors if actor not in starting]
            while not ready:
                self._wait([])
                ready = [actor for actor in self.actors if actor not in {a for a, _ in self._starting.values()}]
            try:
                return ray.get(getattr(ready[0], method).remote(*args))
            except ray.exceptions.RayActorError as exc:
                if attempt == self.max_retries:
                    raise
                self._replace(ready[0], exc, candidate_id=None, retried=True)
        raise AssertionError("unreachable")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        self._starting = {}
        if self.meter is not None:
            self.meter.evaluators(self.job_id, 0)


def evaluator_cpus(resources: dict[str, float]) -> float:
    """The CPUs evaluators may use: the cluster's, or only those of the nodes holding `resources`."""
    if not resources:
        return ray.cluster_resources().get("CPU", 1)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    held = [r.get("CPU", 0.0) for r in nodes if all(r.get(name, 0.0) >= amount for name, amount in resources.items())]
    return sum(held) or 1


def _lost_reply(request: dict, exc: BaseException) -> dict:
    return {**request, "error": f"evaluator lost: {describe_error(exc)}"}
