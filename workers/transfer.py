"""Files that one Ray node made and another process needs, streamed through Ray in chunks: no shared disk.

A folder is named by where it lies (`Located`: a Ray node id and a path as that node sees it). A reader
elsewhere asks Ray to run small read tasks pinned to that node (`num_cpus=0`, so they run beside busy
evaluators), each returning one chunk of `CHUNK_BYTES` through the object store, `WINDOW` in flight at a time,
and writes each chunk as it arrives: memory stays a few chunks whatever the file size. Without a node (no Ray:
tests, in-process runs) the folder is read from the local disk.

Two paths use it: the level database (and a builtin model) that a job's prepare step built comes to each node
whose evaluators lack it (`bring`, once per node under a file lock), and the model an evaluator exported comes
back to the driver's data directory (`workers.artifacts.take`). The driver keeps its own copy of a
builtin model, which follow-up jobs (posttrain, evaluate) bring to their actor's node: their dense model is the
one the parent searched against, not one trained again elsewhere. When the cache directory is shared
storage (`DARWINFRONT_SHARED_CACHE=1`, `Settings.shared_cache`), `bring` copies nothing.

This module imports no torch: Ray's read tasks import it in fresh worker processes.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray

log = logging.getLogger(__name__)
CHUNK_BYTES = 8 << 20
WINDOW = 4


@dataclass(frozen=True)
class Located:
    """A folder on one Ray node: `node` (a Ray node id; None = this process's disk) and `path` as it sees it."""

    node: str | None
    path: str

    def to_dict(self) -> dict:
        return {"node": self.node, "path": self.path}

    @classmethod
    def from_dict(cls, data: dict) -> Located:
        return cls(data.get("node"), data["path"])


def node_id() -> str | None:
    """This process's Ray node id, or None without Ray."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def here(path: str | Path) -> Located:
    """`path` on this process's node."""
    return Located(node_id(), str(path))


def seen_here(where: Located) -> Located:
    """`where` as a folder of this process's disk when this process sees it (its Ray node, and the path is there:
    one machine, one filesystem), so it is read without Ray; else `where` unchanged. Export folders have fresh
    uuid names, so a path seen here is the same folder; containers of one Ray node with disks of their own do not
    see each other's and keep reading through Ray."""
    if where.node is not None and where.node == node_id() and Path(where.path).is_dir():
        return Located(None, where.path)
    return where


def list_files(directory: str) -> list[tuple[str, int]]:
    """The regular files under `directory`, recursively: (path relative to it, POSIX style; size), sorted."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def read_chunk(path: str, offset: int, length: int) -> bytes:
    """`length` bytes of file `path` from `offset` (fewer at its end)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def remove(path: str) -> None:
    """Delete folder `path` (what an evaluator exported, once the driver has it)."""
    shutil.rmtree(path, ignore_errors=True)


_REMOTE: dict = {}  # fn -> its Ray remote function, made once per process (each new one is exported to Ray again)


def _pinned(fn, node: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = _REMOTE.get(fn) or _REMOTE.setdefault(fn, ray.remote(fn))
    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return remote.options(num_cpus=0, scheduling_strategy=strategy, max_retries=2)


def _run(where: Located, fn, *args):
    """`fn(*args)` on `where`'s node (as a pinned Ray task), or here when it has none."""
    if where.node is None:
        return fn(*args)
    return ray.get(_pinned(fn, where.node).remote(*args))


def listing(where: Located) -> list[tuple[str, int]]:
    """`list_files` of the folder, run on its node."""
    return [(name, int(size)) for name, size in _run(where, list_files, where.path)]


def discard(where: Located) -> None:
    """Delete the folder on its node."""
    _run(where, remove, where.path)


def chunks(where: Located, relative: str, size: int, *, chunk: int | None = None) -> Iterator[bytes]:
    """The bytes of file `relative` in the folder (`size` bytes, from `listing`), chunk by chunk, in order.

    Raises:
        OSError: the file ended early (it changed or went away on its node).
    """
    path = str(Path(where.path) / relative)
    chunk = chunk or CHUNK_BYTES
    offsets = range(0, size, chunk)
    if where.node is None:
        parts: Iterator[bytes] = (read_chunk(path, offset, chunk) for offset in offsets)
    else:
        parts = _windowed(_pinned(read_chunk, where.node), path, offsets, chunk)
    got = 0
    for part in parts:
        if not part:
            break
        got += len(part)
        yield part
    if got != size:
        raise OSError(f"{relative} on node {where.node or 'local'}: read {got} of {size} bytes")


def _windowed(task, path: str, offsets: range, chunk: int) -> Iterator[bytes]:
    """Read tasks for `offsets`, `WINDOW` in flight, results in order (each dropped once yielded)."""
    pending: deque = deque()
    todo = iter(offsets)
    for offset in todo:
        pending.append(task.remote(path, offset, chunk))
        if len(pending) >= WINDOW:
            break
    while pending:
        ref = pending.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(task.remote(path, nxt, chunk))
        yield ray.get(ref)
        del ref


class ChunkReader:
    """A read-only file object over `chunks` (what `tarfile.addfile` reads from); no chunk is copied whole, and a
    read inside one `memoryview` chunk is a view of it (a tensor's bytes reach the file without a copy)."""

    def __init__(self, parts: Iterator[bytes]):
        self._parts, self._part, self._at = parts, b"", 0

    def read(self, size: int = -1) -> bytes:
        out = []
        while size != 0:
            if self._at >= len(self._part):
                self._part, self._at = next(self._parts, b""), 0
                if not self._part:
                    break
            end = len(self._part) if size < 0 else min(len(self._part), self._at + size)
            out.append(self._part[self._at : end] if (self._at, end) != (0, len(self._part)) else self._part)
            size -= (end - self._at) if size > 0 else 0
            self._at = end
        return out[0] if len(out) == 1 else b"".join(out)


def fetch_file(where: Located, relative: str, size: int, target: Path, digest=None) -> Path:
    """Copy file `relative` (`size` bytes) of the folder to `target` here, chunk by chunk, each also fed to
    `digest` (a hashlib object) when given."""
    with open(target, "wb") as handle:
        for part in chunks(where, relative, size):
            if digest is not None:
                digest.update(part)
            handle.write(part)
    return target


def fetch(where: Located, out: Path) -> int:
    """Copy the folder's files into `out` (an existing, empty folder); return the bytes copied.

    Raises:
        FileNotFoundError: the folder holds no files on its node.
    """
    files = listing(where)
    if not files:
        raise FileNotFoundError(f"{where.path} holds no files on node {where.node or 'local'}")
    for relative, size in files:
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        fetch_file(where, relative, size, out / relative)
    return sum(size for _, size in files)


def materialise(where: Located, final: Path) -> bool:
    """Make `final` a copy of the folder unless it exists; True when this call copied it.

    Processes of one node copy once: the first takes a file lock beside `final`, copies into a temporary
    folder and renames it into place; the others wait and find it done.
    """
    from workers.reference import build_once  # torch: not for read tasks

    copied = []
    build_once(Path(final), lambda out: copied.append(fetch(where, out)))
    return bool(copied)


def scratch(kind: str) -> Path:
    """A fresh folder under `<cache dir>/<kind>/` on this node (an export before it travels)."""
    from darwinfront.core import settings

    folder = settings.cache_dir() / kind / uuid.uuid4().hex
    folder.mkdir(parents=True)
    return folder


def job_files(database_directory: str | None, model_directory: str | None) -> dict:
    """What a prepare step tells the evaluators about the folders it built, on its node: `{"node": id,
    "database": path or None, "model": path or None}`."""
    return {"node": node_id(), "database": database_directory, "model": model_directory}


def bring(files: dict | None, kinds: tuple[str, ...] = ("database", "model")) -> list[str]:
    """Copy to this node what its evaluators need of a prepare step's folders (`job_files`), where missing.

    The level database lands in this node's database directory, a builtin model in its cache directory, under
    the same folder names, so opening them finds them and builds nothing. `kinds` picks which of the two. Nothing
    happens with a shared cache, without Ray, or when the folders are already here. Returns the folders copied.
    """
    from darwinfront.core import settings

    if not files or files.get("node") is None or settings.Settings().shared_cache:
        return []
    roots = {"database": settings.database_dir(), "model": settings.cache_dir()}
    copied = []
    for kind, root in roots.items():
        path = files.get(kind) if kind in kinds else None
        if not path:
            continue
        try:
            if materialise(Located(files["node"], path), root / Path(path).name):
                copied.append(kind)
        except Exception as exc:  # e.g. the prepare step's node is gone: this node builds its own
            log.warning("could not copy the job's %s from node %s (%s); building it here", kind, files["node"], exc)
    return copied
