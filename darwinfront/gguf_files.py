"""A `.gguf` file as a model source: the checks the API (at submission) and the workers (before converting) share.

Needs the `gguf` package (numpy only), not torch. Every failure is an `InvalidSpec` naming `model.source`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from darwinfront.architectures import GGUF_ARCHITECTURES
from darwinfront.core.errors import InvalidSpec

GGUF_SUFFIX = ".gguf"
FIELD = "model.source"


@dataclass(frozen=True)
class GgufSummary:
    """What a GGUF file's header says: its family, its tensors by ggml type (`{"F32": 61, "Q4_1": 210, ...}`), its
    size in bytes."""

    architecture: str
    tensor_types: dict[str, int]
    size: int


def is_gguf_source(source: str) -> bool:
    """Whether `source` names a GGUF file (by its suffix; such a source is always a local path, never a hub id)."""
    return source.lower().endswith(GGUF_SUFFIX)


def check_gguf_file(path: Path, source: str | None = None) -> GgufSummary:
    """Parse `path` as GGUF and require a family darwinfront prunes.

    Args:
        path: the file (already resolved and confined by the caller where that matters).
        source: how the user named it, for the messages (default: `path`).

    Raises:
        InvalidSpec: when the file is missing, not GGUF, truncated, or holds another architecture.
    """
    shown = repr(source if source is not None else str(path))
    try:
        from gguf import GGUFReader
    except ImportError:
        raise InvalidSpec(FIELD, "reading a .gguf model needs the gguf package: pip install gguf") from None
    try:
        size = path.stat().st_size if path.is_file() else -1
    except OSError:  # a name too long, a loop of links, ...
        size = -1
    if size < 0:
        raise InvalidSpec(FIELD, f"GGUF file {shown} does not exist")
    try:
        reader = GGUFReader(path)
    except Exception as error:  # an untrusted file: whatever the parser trips on (a cut tensor too), it is unusable
        raise InvalidSpec(
            FIELD, f"{shown} is not a readable GGUF file ({type(error).__name__}: {error}); "
            "if it was cut short, copy it again; or give a Hugging Face model directory"
        ) from None
    field = reader.fields.get("general.architecture")
    if field is None or not field.data:
        raise InvalidSpec(FIELD, f"GGUF file {shown} has no general.architecture, so its model family is unknown")
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if architecture not in GGUF_ARCHITECTURES:
        raise InvalidSpec(
            FIELD, f"GGUF file {shown} holds a {architecture!r} model; darwinfront prunes GGUF architectures "
            f"{', '.join(GGUF_ARCHITECTURES)} (or give a Hugging Face directory of a supported model)"
        )
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return GgufSummary(architecture=architecture, tensor_types=dict(sorted(types.items())), size=size)
