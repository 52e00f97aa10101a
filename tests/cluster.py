"""A real multi-node Ray cluster on one machine, for tests: a head and evaluator nodes started with `ray start`, each
in its own PID namespace (so killing its first process takes every process of the node with it) and each evaluator
node in its own mount namespace, with private tmpfs mounts over its own directories and over every directory of the
head and the driver (their Ray temp, cache and data directories), so a file one node writes is invisible to the
others, as on separate machines.

Token authentication stays on: the cluster's token reaches the nodes as `RAY_AUTH_TOKEN` (with
`RAY_AUTH_MODE=token`) and the driver as `RAY_AUTH_TOKEN_PATH`, a 0600 file.

Needs root (CI runs as root) for `unshare --mount --pid`; `available()` says whether it works here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parent.parent
EVALUATOR_RESOURCE = "darwinfront_evaluator"
# Ray puts `<root>/<node>/ray/session_<date>_<time>_<pid>/sockets/plasma_store` under the root: about 80
# characters past it, and an AF_UNIX path holds 107 bytes.
MAX_ROOT = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> str:
    """'' when namespaces work here, else why not."""
    if not shutil.which("unshare"):
        return "no unshare"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return "" if probe.returncode == 0 else f"unshare refused: {probe.stderr.decode().strip()}"


@dataclass
class Node:
    """One `ray start` process tree in its namespaces."""

    name: str
    root: Path
    process: subprocess.Popen
    log: Path

    def init_pid(self) -> int | None:
        """The node's first process (PID 1 in its namespace): `unshare`'s child."""
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def kill(self) -> None:
        """Kill the node at once, raylet and workers: the namespace's first process dies, the kernel kills the rest."""
        pid = self.init_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@dataclass
class Cluster:
    """A head (no evaluator resource) and evaluator nodes; `stop()` kills them all, whatever happened.

    Args:
        root: an empty directory: `head/` holds the head's Ray temp dir, and the driver's data and cache
            directories (`driver_env`); each evaluator node mounts a tmpfs over `<name>/`.
        hidden: more paths every evaluator node hides (the test session's cache and data directories).
        seed: directories copied into every node's cache (and the driver's) before the paths are hidden: the
            builtin models, so no node trains its own.
    """

    root: Path
    hidden: list[Path] = field(default_factory=list)
    seed: list[Path] = field(default_factory=list)
    head_cpus: int = 1
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: list[Node] = field(default_factory=list)
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def head_dir(self) -> Path:
        return self.root / "head"

    @property
    def token_file(self) -> Path:
        return self.head_dir / "ray_auth_token"

    def driver_env(self) -> dict[str, str]:
        """What the driver (the embedded stack) needs to join: the address, the token file, its own cache. No
        `RAY_AUTH_MODE`: given a token and an address, `init_ray` turns token mode on itself."""
        return {
            "RAY_ADDRESS": self.address, "RAY_AUTH_TOKEN_PATH": str(self.token_file),
            "DARWINFRONT_CACHE_DIR": str(self.head_dir / "cache"),
            "DARWINFRONT_EVALUATOR_RESOURCES": json.dumps({EVALUATOR_RESOURCE: 1}),
        }

    def start(self) -> Cluster:
        if len(str(self.root)) > MAX_ROOT:
            raise ValueError(f"cluster root {self.root} is longer than {MAX_ROOT} characters: Ray's socket "
                             "paths under it would pass the 107-byte AF_UNIX limit; use a short one under /tmp")
        cache = self.head_dir / "cache"
        cache.mkdir(parents=True)
        for source in self.seed:
            shutil.copytree(source, cache / source.name, symlinks=True)
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self.port = free_port()
        command = [
            RAY, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.head_cpus}", "--num-gpus=0",
            f"--temp-dir={self.head_dir / 'ray'}", "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}", *self._agent_ports(), "--block",
        ]
        env = {**self._base_env(), "DARWINFRONT_CACHE_DIR": str(cache), "HOME": str(self.head_dir)}
        self.nodes.append(self._spawn("head", self.head_dir, shlex.join(command), env))
        self._wait_for(1)
        return self

    def add_node(self, name: str, *, cpus: int, evaluators: int) -> Node:
        """Start an evaluator node offering `evaluators` slots of the evaluator resource, and wait until it joined."""
        root = self.root / name
        root.mkdir()
        hide = [self.head_dir, *self.hidden]
        seed = " ".join(f"cp -a {shlex.quote(str(s))} {shlex.quote(str(root / 'cache'))}/ &&" for s in self.seed)
        mounts = " ".join(f"{{ [ ! -d {shlex.quote(str(p))} ] || mount -t tmpfs tmpfs {shlex.quote(str(p))}; }} &&"
                          for p in hide)
        command = [
            RAY, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
            "--num-gpus=0", f"--resources={json.dumps({EVALUATOR_RESOURCE: evaluators})}",
            f"--temp-dir={root / 'ray'}", *self._agent_ports(), "--block",
        ]
        script = (f"mount -t tmpfs tmpfs {shlex.quote(str(root))} && mkdir -p {root}/ray {root}/cache {root}/tmp "
                  f"{root}/data && {seed} {mounts} exec {shlex.join(command)}")
        env = {**self._base_env(), "RAY_AUTH_TOKEN": self.token, "DARWINFRONT_CACHE_DIR": str(root / "cache"),
               "DARWINFRONT_DATA_DIR": str(root / "data"), "TMPDIR": str(root / "tmp"), "HOME": str(root)}
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        node = self._spawn(name, root, script, env)
        self.nodes.append(node)
        self._wait_for(len(self.nodes))
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        self.nodes = []

    def _spawn(self, name: str, root: Path, script: str, env: dict[str, str]) -> Node:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "--kill-child",
                 "sh", "-c", script],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return Node(name, root, process, log)

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DARWINFRONT_"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file), RAY_USAGE_STATS_ENABLED="0",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        return env

    def _agent_ports(self) -> list[str]:
        # fixed defaults (52365, ...) would clash between nodes of one machine
        return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}"]

    def _wait_for(self, count: int, timeout: float = 120.0) -> None:
        """Until `count` nodes are alive in the cluster, asked by a Ray client as the driver would join."""
        env = {**self._base_env(), "RAY_ADDRESS": self.address}
        waiter = subprocess.Popen([sys.executable, "-c", ALIVE_NODES, str(count), str(timeout)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while waiter.poll() is None:
            if any(node.process.poll() is not None for node in self.nodes):
                waiter.kill()
                break
            time.sleep(0.5)
        output = waiter.communicate()[0]
        if waiter.returncode != 0:
            logs = "\n".join(f"--- {n.name}\n{n.tail()}" for n in self.nodes)
            raise RuntimeError(f"the cluster never had {count} node(s):\n{output[-2000:]}\n{logs}")


ALIVE_NODES = """
import sys, time
import ray
count, timeout = int(sys.argv[1]), float(sys.argv[2])
ray.init(log_to_driver=False, logging_level="ERROR")
deadline = time.monotonic() + timeout
while sum(n["Alive"] for n in ray.nodes()) < count:
    if time.monotonic() > deadline:
        sys.exit(f"{sum(n['Alive'] for n in ray.nodes())} node(s) alive after {timeout} s")
    time.sleep(0.5)
"""
