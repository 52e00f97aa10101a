"""API read latency under concurrent clients: GET a job and GET its front.

Starts an embedded Redis, stores one job with a front snapshot through the store, serves the app with uvicorn
in a subprocess, then runs `--clients` concurrent httpx clients for `--duration` seconds (after a warm-up) and
prints p50 / p99 per endpoint and requests per second. Goal: p99 < 50 ms. Client and server share the machine,
so the figures include the load generator's own cost.

    .venv/bin/python benchmarks/api_latency.py --duration 20 --clients 32 --ab 4000

The Python client costs about as much CPU per request as the server, and on a small machine it shares the
cores; `--ab N` then repeats both reads with ApacheBench (a client in C) to show the server on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import redis

from darwinfront.core import methods
from darwinfront.core.settings import Settings
from darwinfront.core.store import JobStore
from service.auth import generate_key
from service.embedded import EmbeddedRedis

SPEC = {"model": {"source": "builtin:tiny-llama"}, "prune": {"targets": [0.3, 0.5, 0.7]}}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed(url: str, points: int) -> str:
    """One running job with progress and a front of `points` points; returns its id."""
    store = JobStore(redis.Redis.from_url(url, decode_responses=True))
    job_id = store.create("bench", SPEC).id
    store.claim("bench-driver", timeout=0)
    store.set_progress(job_id, {"generation": 7, "generations": 10, "evaluations": 300, "planned": 400,
                                "best": {"0.5": 0.21}})
    front = [
        {"candidate_id": f"t{i % 3}-g7-s0-c{i}", "objectives": {"kl": 0.05 + 0.01 * i, "params": 1.0 - 0.01 * i},
         "target": (0.3, 0.5, 0.7)[i % 3], "generation": 7}
        for i in range(points)
    ]
    store.set_front(job_id, front, objectives=methods.get("structured_prune").stored_objectives())
    return job_id


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU of a process and its children (uvicorn --workers forks)."""
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


def redis_pid(url: str) -> int:
    """The process id of the Redis server at `url`."""
    return int(redis.Redis.from_url(url).info("server")["process_id"])


def start_server(env: dict[str, str], port: int, extra: list[str]) -> subprocess.Popen:
    """`uvicorn --factory service.app:create_app` in a subprocess with `env`; returns once /readyz answers."""
    command = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--no-access-log", *extra]
    server = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"uvicorn exited with code {server.returncode}")
        time.sleep(0.2)
    server.terminate()
    raise RuntimeError("the API did not become ready within 60 s")


async def _client(http: httpx.AsyncClient, paths: dict[str, str], until: float, warm_until: float,
                  samples: dict[str, list[float]], errors: list[str]) -> None:
    while (now := time.perf_counter()) < until:
        for name, path in paths.items():
            start = time.perf_counter()
            response = await http.get(path)
            elapsed = time.perf_counter() - start
            samples["sent"].append(elapsed)
            if response.status_code != 200:
                errors.append(f"{name}: {response.status_code}")
            elif now >= warm_until:
                samples[name].append(elapsed)


async def _load(base: str, key: str, job_id: str, *, clients: int, duration: float, warmup: float) -> dict:
    paths = {"GET /v1/jobs/{id}": f"/v1/jobs/{job_id}", "GET /v1/jobs/{id}/front": f"/v1/jobs/{job_id}/front"}
    samples: dict[str, list[float]] = {name: [] for name in paths} | {"sent": []}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=30) as http:
        start = time.perf_counter()
        warm_until, until = start + warmup, start + warmup + duration
        await asyncio.gather(*(_client(http, paths, until, warm_until, samples, errors) for _ in range(clients)))
    return {"samples": samples, "errors": errors, "seconds": duration}


def _report_header(args: argparse.Namespace) -> None:
    print(f"darwinfront API latency: {args.clients} clients, {args.duration:.0f} s, front of {args.points} points, "
          f"uvicorn {args.uvicorn or '(defaults)'}, {os.cpu_count()} CPUs shared by client and server, "
          f"load average {os.getloadavg()[0]:.1f}")


def _report(result: dict, clients: int) -> None:
    print(f"{'endpoint':28s} {'requests':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s}")
    total = 0
    sent = len(result["samples"].pop("sent"))
    for name, values in result["samples"].items():
        if not values:
            print(f"{name:28s} no samples")
            continue
        cuts = statistics.quantiles(values, n=100)
        rate = len(values) / result["seconds"]
        total += len(values)
        print(f"{name:28s} {len(values):9d} {cuts[49] * 1e3:8.2f} {cuts[98] * 1e3:8.2f} {rate:8.1f}")
    print(f"all: {total / result['seconds']:.1f} req/s with {clients} clients; errors: {len(result['errors'])}")
    if sent:
        api, store = (1e3 * seconds / sent for seconds in result["cpu"])
        print(f"CPU per request (over {sent} requests, warm-up included): API {api:.2f} ms, Redis {store:.3f} ms")
    if result["errors"]:
        print("first errors:", result["errors"][:5])


def _ab(base: str, key: str, job_id: str, *, clients: int, requests: int) -> None:
    """The same two reads from ApacheBench, one endpoint at a time: a client in C, whose own CPU is negligible."""
    paths = {"GET /v1/jobs/{id}": f"/v1/jobs/{job_id}", "GET /v1/jobs/{id}/front": f"/v1/jobs/{job_id}/front"}
    for name, path in paths.items():
        command = ["ab", "-q", "-k", "-c", str(clients), "-n", str(requests), "-H", f"Authorization: Bearer {key}",
                   f"{base}{path}"]
        subprocess.run([*command[:6], str(min(requests, 500)), *command[7:]], capture_output=True, check=True)  # warm
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rate = re.search(r"Requests per second:\s+([\d.]+)", out).group(1)
        cuts = dict(re.findall(r"^\s+(\d+)%\s+(\d+)", out, flags=re.M))
        failed = re.search(r"Failed requests:\s+(\d+)", out).group(1)
        print(f"ab {name:25s} {requests:9d} {cuts['50']:>8s} {cuts['99']:>8s} {float(rate):8.1f}  failed: {failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--points", type=int, default=40, help="points in the front snapshot")
    parser.add_argument("--uvicorn", default="", help="extra uvicorn flags, e.g. '--workers 2 --http h11'")
    parser.add_argument("--ab", type=int, default=0, metavar="N",
                        help="afterwards, N requests per endpoint from ApacheBench (`ab`, if installed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="df-bench-") as tmp, EmbeddedRedis(Path(tmp)) as server:
        settings = Settings(data_dir=Path(tmp), redis_url=server.url)
        key = generate_key(settings, tenant="bench")
        job_id = _seed(server.url, args.points)
        port = free_port()
        env = dict(os.environ, DARWINFRONT_REDIS_URL=server.url, DARWINFRONT_DATA_DIR=tmp,
                   DARWINFRONT_API_KEYS_FILE=str(settings.keys_file))
        env.pop("DARWINFRONT_API_KEYS", None)
        api = start_server(env, port, shlex.split(args.uvicorn))
        try:
            processes = (psutil.Process(api.pid), psutil.Process(redis_pid(server.url)))
            before = [cpu_seconds(p) for p in processes]
            result = asyncio.run(_load(f"http://127.0.0.1:{port}", key, job_id, clients=args.clients,
                                       duration=args.duration, warmup=args.warmup))
            result["cpu"] = [cpu_seconds(p) - b for p, b in zip(processes, before, strict=True)]
            _report_header(args)
            _report(result, args.clients)
            if args.ab and shutil.which("ab"):
                _ab(f"http://127.0.0.1:{port}", key, job_id, clients=args.clients, requests=args.ab)
        finally:
            api.terminate()
            api.wait(timeout=30)


if __name__ == "__main__":
    main()
