"""The GGUF of a stored model archive, converted on first request and kept beside it.

A candidate's archive (`<job>/<candidate>.tar`, a tar of one model directory) is unpacked into a temporary folder
next to it and written as `<candidate>.<type>.gguf` in the same job folder; a second request is served the file.
Torch-free, so the API process can do it (in a worker thread). A kept GGUF takes 2 bytes per parameter (f16) or
about 1.06 (q8_0) in the job's artifact folder.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from darwinfront.gguf_export import GGUF_TYPES, write_gguf


def gguf_path(archive: Path, gguf_type: str) -> Path:
    """Where the GGUF of `archive` in `gguf_type` is kept: `<candidate>.<type>.gguf` beside it."""
    stem = archive.name.removesuffix(".gz").removesuffix(".tar")
    return archive.with_name(f"{stem}.{gguf_type}.gguf")


def gguf_of_archive(archive: Path, gguf_type: str) -> Path:
    """The GGUF file of model archive `archive`, written first if it is not there yet.

    Raises:
        ValueError: an unknown `gguf_type`, an archive that is not one model directory, or a model the export
            cannot write (see `write_gguf`).
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    target = gguf_path(archive, gguf_type)
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".gguf-") as tmp:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")  # no links out, no absolute paths
        except (tarfile.TarError, EOFError) as exc:
            raise ValueError(f"{archive.name} is not a readable model archive ({exc.__class__.__name__})") from None
        folders = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if len(folders) != 1 or not (folders[0] / "config.json").is_file():
            raise ValueError(f"{archive.name} is not an archive of one model directory")
        write_gguf(folders[0], target, gguf_type, name=folders[0].name)
    return target
