"""Load: concurrent clients submitting, polling, listing and cancelling jobs; then no job may be lost or altered.

Starts an embedded Redis and the API (uvicorn in a subprocess, settings from the environment as in production)
with no driver: jobs stay queued until their owner cancels them, so what is measured is the API and the store,
and the final check is exact. `--clients` clients, spread over `--tenants` tenants with a key each, run for
`--duration` seconds; each repeatedly picks (seeded) one of: submit a job (a random small spec, with an
`Idempotency-Key`), resubmit its last key (must return the same job), poll one of its jobs (status and spec must
be what it knows), list its queued jobs, cancel one of its queued jobs (must answer `cancelled`). The tenant
quota (`--max-active-jobs`) refuses some submissions with 429: counted apart, not as errors.

Afterwards every accepted job is read back from Redis: it must exist, belong to its tenant, hold the spec the
API returned, be `cancelled` or `queued` as its client last saw it, and each queued job must be on the queue
exactly once; no tenant may have a job no client accepted.

    .venv/bin/python benchmarks/load.py --clients 16 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import redis
from api_latency import cpu_seconds, free_port, redis_pid, start_server  # benchmarks/, the script's folder

from darwinfront.core.settings import Settings
from darwinfront.core.store import JobStore
from service.auth import generate_key
from service.embedded import EmbeddedRedis

ACTIONS = {"submit": 3, "resubmit": 1, "poll": 4, "list": 2, "cancel": 2}
EXPECTED = {"submit": {201, 429}, "resubmit": {201}, "poll": {200}, "list": {200}, "cancel": {202}}


@dataclass
class Client:
    """One simulated user: its tenant's key and what it believes about its jobs."""

    index: int
    tenant: str
    key: str
    rng: random.Random
    jobs: dict[str, dict] = field(default_factory=dict)  # id -> {"spec": ..., "status": ...}
    last_key: tuple[str, str] | None = None  # (idempotency key, job id)
    submitted: int = 0


@dataclass
class Tally:
    """Latencies per action (after warm-up), response statuses, refusals by quota, and errors."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    sent: int = 0


def _spec(client: Client) -> dict:
    rng = client.rng
    targets = sorted(rng.sample([0.3, 0.5, 0.7], rng.randint(1, 3)))
    return {
        "name": f"load-{client.index}-{client.submitted}",
        "model": {"source": "builtin:micro-llama"},
        "prune": {"targets": targets},
        "search": {"generations": rng.randint(1, 3), "offspring": rng.randint(2, 6)},
        "seed": rng.randint(0, 1000),
    }


async def _submit(http: httpx.AsyncClient, client: Client) -> tuple[httpx.Response, str | None]:
    client.submitted += 1
    idem = f"load-{client.index}-{client.submitted}"
    response = await http.post("/v1/jobs", json=_spec(client), headers={"Idempotency-Key": idem})
    if response.status_code == 201:
        job = response.json()
        client.jobs[job["id"]] = {"spec": job["spec"], "status": "queued"}
        client.last_key = (idem, job["id"])
    return response, None


async def _resubmit(http: httpx.AsyncClient, client: Client) -> tuple[httpx.Response | None, str | None]:
    if client.last_key is None:
        return None, None
    idem, job_id = client.last_key
    response = await http.post("/v1/jobs", json={"model": {"source": "builtin:micro-llama"}},
                               headers={"Idempotency-Key": idem})
    if response.status_code == 201 and response.json()["id"] != job_id:
        return response, f"resubmit of {idem} made {response.json()['id']}, not {job_id}"
    return response, None


async def _poll(http: httpx.AsyncClient, client: Client) -> tuple[httpx.Response | None, str | None]:
    if not client.jobs:
        return None, None
    job_id = client.rng.choice(sorted(client.jobs))
    response = await http.get(f"/v1/jobs/{job_id}")
    known = client.jobs[job_id]
    if response.status_code == 200:
        job = response.json()
        if job["status"] != known["status"] or job["spec"] != known["spec"]:
            return response, f"poll of {job_id}: {job['status']} where {known['status']} was expected, or spec changed"
    return response, None


async def _list(http: httpx.AsyncClient, client: Client) -> tuple[httpx.Response, str | None]:
    response = await http.get("/v1/jobs", params={"status": "queued", "limit": 20})
    return response, None


async def _cancel(http: httpx.AsyncClient, client: Client) -> tuple[httpx.Response | None, str | None]:
    queued = sorted(job_id for job_id, known in client.jobs.items() if known["status"] == "queued")
    if not queued:
        return None, None
    job_id = client.rng.choice(queued)
    response = await http.post(f"/v1/jobs/{job_id}/cancel")
    if response.status_code == 202:
        client.jobs[job_id]["status"] = response.json()["status"]
        if response.json()["status"] != "cancelled":
            return response, f"cancel of queued {job_id} answered {response.json()['status']}"
    return response, None


STEPS = {"submit": _submit, "resubmit": _resubmit, "poll": _poll, "list": _list, "cancel": _cancel}


async def _run_client(base: str, client: Client, tally: Tally, *, warm_until: float, until: float) -> None:
    names, weights = list(ACTIONS), list(ACTIONS.values())
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {client.key}"},
                                 timeout=30) as http:
        while time.perf_counter() < until:
            action = client.rng.choices(names, weights)[0]
            start = time.perf_counter()
            try:
                response, problem = await STEPS[action](http, client)
            except httpx.HTTPError as error:
                tally.errors.append(f"{action}: {type(error).__name__}: {error}")
                continue
            if response is None:
                continue
            elapsed = time.perf_counter() - start
            tally.sent += 1
            tally.statuses[(action, response.status_code)] += 1
            if response.status_code not in EXPECTED[action]:
                tally.errors.append(f"{action}: HTTP {response.status_code} {response.text[:200]}")
            if problem:
                tally.errors.append(problem)
            if start >= warm_until:
                tally.seconds[action].append(elapsed)


def _verify(url: str, clients: list[Client], tenants: list[str]) -> list[str]:
    """Every accepted job as its client last saw it, queued ones on the queue once, nothing extra."""
    client = redis.Redis.from_url(url, decode_responses=True)
    store = JobStore(client)
    queue = Counter(store.queued_ids())
    problems = []
    accepted: dict[str, set[str]] = defaultdict(set)
    for user in clients:
        for job_id, known in user.jobs.items():
            accepted[user.tenant].add(job_id)
            try:
                job = store.get(job_id, user.tenant)
            except KeyError:
                problems.append(f"lost: {job_id} of {user.tenant}")
                continue
            if job.spec != known["spec"] or job.status.value != known["status"]:
                problems.append(f"altered: {job_id} is {job.status.value}, its client saw {known['status']}")
            if queue[job_id] != (1 if known["status"] == "queued" else 0):
                problems.append(f"queue: {job_id} ({known['status']}) is on the queue {queue[job_id]} times")
    for tenant in tenants:
        total = store.list(tenant, limit=1)[1]
        if total != len(accepted[tenant]):
            problems.append(f"tenant {tenant} has {total} jobs; its clients were given {len(accepted[tenant])}")
    client.close()
    return problems


def _report(tally: Tally, duration: float, cpu: list[float], problems: list[str], accepted: int) -> None:
    print(f"{'action':10s} {'requests':>9s} {'p50 ms':>8s} {'p99 ms':>8s}  statuses")
    for action in ACTIONS:
        values = tally.seconds.get(action, [])
        statuses = ", ".join(f"{code}: {n}" for (name, code), n in sorted(tally.statuses.items()) if name == action)
        if len(values) >= 2:
            cuts = statistics.quantiles(values, n=100)
            print(f"{action:10s} {len(values):9d} {cuts[49] * 1e3:8.2f} {cuts[98] * 1e3:8.2f}  {statuses}")
        else:
            print(f"{action:10s} {len(values):9d} {'-':>8s} {'-':>8s}  {statuses}")
    measured = sum(len(v) for v in tally.seconds.values())
    refused = sum(n for (name, code), n in tally.statuses.items() if code == 429)
    print(f"throughput: {measured / duration:.1f} requests/s measured; {tally.sent} sent in all; "
          f"{accepted} jobs accepted, {refused} submissions refused by the quota (429, expected)")
    if tally.sent:
        print(f"CPU per request: API {1e3 * cpu[0] / tally.sent:.2f} ms, Redis {1e3 * cpu[1] / tally.sent:.3f} ms")
    print(f"errors: {len(tally.errors)}" + (f" (first: {tally.errors[:5]})" if tally.errors else ""))
    print(f"lost or altered jobs: {len(problems)}" + (f" (first: {problems[:5]})" if problems else ""))


def _clients(settings: Settings, count: int, tenants: int, seed: int) -> tuple[list[Client], list[str]]:
    names = [f"tenant{t}" for t in range(tenants)]
    tenant_keys = {name: generate_key(settings, tenant=name) for name in names}
    clients = [Client(i, names[i % tenants], tenant_keys[names[i % tenants]], random.Random(seed * 1000 + i))
               for i in range(count)]
    return clients, names


async def _load(base: str, clients: list[Client], *, duration: float, warmup: float) -> Tally:
    tally = Tally()
    start = time.perf_counter()
    warm_until, until = start + warmup, start + warmup + duration
    await asyncio.gather(*(_run_client(base, c, tally, warm_until=warm_until, until=until) for c in clients))
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--tenants", type=int, default=4, help="tenants the clients are spread over")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--max-active-jobs", type=int, default=16, help="the per-tenant quota of the server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uvicorn", default="", help="extra uvicorn flags, e.g. '--http h11 --loop asyncio'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="df-load-") as tmp, EmbeddedRedis(Path(tmp)) as server:
        settings = Settings(data_dir=Path(tmp), redis_url=server.url)
        clients, tenants = _clients(settings, args.clients, args.tenants, args.seed)
        port = free_port()
        env = dict(os.environ, DARWINFRONT_REDIS_URL=server.url, DARWINFRONT_DATA_DIR=tmp,
                   DARWINFRONT_API_KEYS_FILE=str(settings.keys_file),
                   DARWINFRONT_MAX_ACTIVE_JOBS_PER_TENANT=str(args.max_active_jobs))
        env.pop("DARWINFRONT_API_KEYS", None)
        api = start_server(env, port, shlex.split(args.uvicorn))
        try:
            processes = (psutil.Process(api.pid), psutil.Process(redis_pid(server.url)))
            before = [cpu_seconds(p) for p in processes]
            tally = asyncio.run(_load(f"http://127.0.0.1:{port}", clients, duration=args.duration,
                                      warmup=args.warmup))
            cpu = [cpu_seconds(p) - b for p, b in zip(processes, before, strict=True)]
        finally:
            api.terminate()
            api.wait(timeout=30)
        problems = _verify(server.url, clients, tenants)
    print(f"darwinfront load: {args.clients} clients over {args.tenants} tenants, {args.duration:.0f} s "
          f"(+{args.warmup:.0f} s warm-up), quota {args.max_active_jobs} active jobs per tenant, no driver, "
          f"uvicorn {args.uvicorn or '(defaults)'}, {os.cpu_count()} CPUs shared by clients, API and Redis, "
          f"load average {os.getloadavg()[0]:.1f}")
    _report(tally, args.duration, cpu, problems, sum(len(c.jobs) for c in clients))
    if tally.errors or problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
