"""The artifact area: sliced-model archives under `<data_dir>/artifacts/<job>/`, written atomically.

An archive is a plain (uncompressed) tar of the saved model directory: safetensors weights hardly compress
(zstd gains a few per cent on them, see docs/BENCHMARKS.md "Exports"), and gzip at its highest level ran at
about 2.4 MB/s here, minutes per front point of a 0.5 B model. The directory may lie on another Ray node (an
evaluator exported it there): its files come through Ray chunk by chunk (`workers.transfer`) straight into the
tar (read from the disk instead when this process sees the folder), and the SHA-256 is taken from the bytes as
they are written, so nothing holds a whole file in memory.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
from pathlib import Path

from workers import transfer

_BLOCK = 1 << 20


class _HashingWriter:
    """A binary file that hashes and counts what is written through it (what `tarfile` needs: write)."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)


def archive(data_dir: Path, job_id: str, candidate_id: str, source: Path) -> dict:
    """Pack `source` (a saved model directory here) as `<candidate_id>.tar`; return the metadata the store keeps.

    Raises:
        RuntimeError: `source` holds no files (an export that wrote nothing is never reported as a success).
    """
    return archive_from(data_dir, job_id, candidate_id, transfer.Located(None, str(source)))


def archive_exported(data_dir: Path, job_id: str, candidate_id: str, files: dict) -> dict:
    """`archive_from` the export folder an evaluator or trainer reported (`transfer.Located` as a dict), then
    delete that folder on its node, whether the archive was written or not."""
    source = transfer.Located.from_dict(files)
    try:
        return archive_from(data_dir, job_id, candidate_id, source)
    finally:
        transfer.discard(source)


def archive_from(data_dir: Path, job_id: str, candidate_id: str, source: transfer.Located, *,
                 through_ray: bool = False) -> dict:
    """Pack the saved model directory `source`, on whichever node holds it, as `<candidate_id>.tar` under
    `data_dir`; return the metadata the store keeps (path, size, sha256, files).

    A folder this process sees (`transfer.seen_here`: an evaluator on the driver's machine) is read from the
    disk; another node's comes through Ray. `through_ray` streams it through Ray even so (what another node's
    export costs, for benchmarks).

    Raises:
        RuntimeError: `source` holds no files (an export that wrote nothing is never reported as a success).
        OSError: a file came short (it changed or went away meanwhile); no archive is left behind.
    """
    source = source if through_ray else transfer.seen_here(source)
    files = transfer.listing(source)
    if not files:
        where = f" on node {source.node}" if source.node else ""
        raise RuntimeError(f"the export of {candidate_id} wrote no files to {source.path}{where}")
    folder = Path(data_dir) / "artifacts" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{candidate_id}.tar"
    partial = target.with_suffix(".partial")
    now = int(time.time())
    try:
        with open(partial, "wb") as handle:
            writer = _HashingWriter(handle)
            # 1 MiB blocks both ways: tar's stream copies its buffer on every block it passes on, so its buffer
            # must hold what each read brings (with 8 MiB reads into its 10 KiB records it ran at ~8 MB/s)
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_BLOCK,
                              copybufsize=_BLOCK) as tar:
                for relative, size in files:
                    info = tarfile.TarInfo(f"{candidate_id}/{relative}")
                    info.size, info.mtime, info.mode = size, now, 0o644
                    tar.addfile(info, transfer.ChunkReader(transfer.chunks(source, relative, size)))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return {"path": f"{job_id}/{target.name}", "size": writer.size, "sha256": writer.digest.hexdigest(),
            "files": len(files)}
