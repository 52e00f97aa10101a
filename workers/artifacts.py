"""The artifact area: sliced-model archives under `<data_dir>/artifacts/<job>/`, written atomically."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path


def archive(data_dir: Path, job_id: str, candidate_id: str, source: Path) -> dict:
    """Pack `source` (a saved model directory) as `<candidate_id>.tar.gz`; return the metadata the store keeps."""
    folder = Path(data_dir) / "artifacts" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{candidate_id}.tar.gz"
    partial = target.with_suffix(".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(source.iterdir()):
            tar.add(path, arcname=f"{candidate_id}/{path.name}")
    os.replace(partial, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    return {"path": f"{job_id}/{target.name}", "size": target.stat().st_size, "sha256": digest}
