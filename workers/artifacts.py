"""The artifact area: sliced-model archives under `<data_dir>/artifacts/<job>/`, written once and moved into place.

An archive is a plain (uncompressed) tar of the saved model directory: safetensors weights hardly compress
(zstd gains a few per cent on them, see docs/BENCHMARKS.md "Exports"), and gzip at its highest level ran at
about 2.4 MB/s here, minutes per front point of a 0.5 B model. The evaluator that exports a point writes the tar
itself (`pack`), the weights streamed from the tensors straight into it, so the bytes are written once. The
driver then takes the tar (`take_exported`): renamed into the job's folder when it lies on the driver's
filesystem, copied when on another filesystem of this machine, streamed through Ray in chunks when on another
node (`workers.transfer`), nothing held whole in memory. The SHA-256 a download carries is taken from the bytes
as they arrive when they travel anyway; an archive renamed into place is hashed on its first download
(`file_sha256`, by the API), so the export does not pay a second pass over the bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tarfile
import time
from pathlib import Path
from typing import Protocol

from workers import transfer

_BLOCK = 1 << 20


class Streamed(Protocol):
    """A file written from memory as it is packed: its size up front, then its bytes (`SafetensorsPlan`)."""

    size: int

    def chunks(self): ...


def pack(folder: Path, target: Path, *, name: str, streamed: dict[str, Streamed] | None = None) -> Path:
    """Write `target`: a tar of `folder`'s files under `name/`, then each `streamed` file (relative name ->
    `Streamed`) from memory. Written beside `target` and renamed into place, so a reader never sees half of it.

    Raises:
        RuntimeError: nothing to pack (an export that wrote nothing is never reported as a success).
        OSError: a streamed file came short of its size; no archive is left behind.
    """
    files = transfer.list_files(str(folder))
    if not files and not streamed:
        raise RuntimeError(f"the export of {name} wrote no files to {folder}")
    partial = target.with_name(f".{target.name}.partial")
    now = int(time.time())
    try:
        with open(partial, "wb") as handle, tarfile.open(
            fileobj=handle, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_BLOCK
        ) as tar:
            members = [(relative, size, None) for relative, size in files]
            members += [(relative, item.size, item) for relative, item in (streamed or {}).items()]
            for relative, size, item in members:
                info = tarfile.TarInfo(f"{name}/{relative}")
                info.size, info.mtime, info.mode = size, now, 0o644
                if item is None:
                    with open(folder / relative, "rb") as source:
                        tar.addfile(info, source)
                else:
                    tar.addfile(info, transfer.ChunkReader(item.chunks()))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def archive(data_dir: Path, job_id: str, candidate_id: str, source: Path) -> dict:
    """Pack saved model directory `source` (on this machine) as the job's archive of `candidate_id`; return the
    metadata the store keeps (hashed on its first download)."""
    folder = Path(data_dir) / "artifacts" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    return _meta(job_id, pack(Path(source), folder / f"{candidate_id}.tar", name=candidate_id), None)


def take_exported(data_dir: Path, job_id: str, candidate_id: str, files: dict) -> dict:
    """`take` the archive an evaluator or trainer exported (`files`: `transfer.Located` of its export folder, as
    a dict), then delete the export folder on its node whether that worked or not."""
    source = transfer.Located.from_dict(files)
    try:
        return take(data_dir, job_id, candidate_id, source)
    finally:
        transfer.discard(source)


def take(data_dir: Path, job_id: str, candidate_id: str, source: transfer.Located, *,
         through_ray: bool = False) -> dict:
    """Move `<candidate_id>.tar` of export folder `source` (on whichever node holds it) to
    `<data_dir>/artifacts/<job_id>/`; return the metadata the store keeps (path, size, sha256 or None, files).

    A folder on this process's filesystem is renamed into place (no byte moves; hashed on its first download);
    one on another filesystem here, or another node's (through Ray), is copied chunk by chunk and hashed as it
    arrives. `through_ray` streams it through Ray even so (what another node's export costs, for benchmarks).

    Raises:
        RuntimeError: the export folder holds no such archive (an export that wrote nothing never succeeds).
        OSError: the archive came short (it changed or went away meanwhile); nothing is left behind.
    """
    name = f"{candidate_id}.tar"
    sizes = dict(transfer.listing(source))
    if name not in sizes:
        where = f" on node {source.node}" if source.node else ""
        raise RuntimeError(f"the export of {candidate_id} wrote no archive to {source.path}{where}")
    folder = Path(data_dir) / "artifacts" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    local = source if through_ray else transfer.seen_here(source)
    if local.node is None and not through_ray:
        try:
            os.replace(Path(local.path) / name, target)  # one filesystem: no byte moves
            return _meta(job_id, target, None)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    return _meta(job_id, target, _copy(local, name, sizes[name], target))


def _meta(job_id: str, target: Path, sha256: str | None) -> dict:
    with tarfile.open(target, "r:") as tar:
        count = sum(1 for member in tar if member.isfile())
    return {"path": f"{job_id}/{target.name}", "size": target.stat().st_size, "sha256": sha256, "files": count}


def _copy(source: transfer.Located, name: str, size: int, target: Path) -> str:
    """Copy file `name` of `source` (on any node) to `target` chunk by chunk; return its SHA-256."""
    partial = target.with_name(f".{target.name}.partial")
    digest = hashlib.sha256()
    try:
        transfer.fetch_file(source, name, size, partial, digest)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return digest.hexdigest()
