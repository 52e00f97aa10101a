"""Spec checks that need the server's settings: where local models and data may live, and the budget cap.

Each check raises `InvalidSpec(field, message)`; the API answers it with a 422 naming the field, before any
job exists. Paths are resolved (symlinks followed) and must land under an allowed root; `..` is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from darwinfront.architectures import SUPPORTED_ARCHITECTURES, unsupported
from darwinfront.core.errors import InvalidSpec
from darwinfront.core.settings import Settings
from darwinfront.core.spec import JobSpec
from darwinfront.gguf_files import check_gguf_file, is_gguf_source

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_DATASET_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
DATA_SUFFIXES = (".txt", ".jsonl")


def _expand(source: str, field: str, what: str) -> Path:
    """`source` as a path with `~` expanded; unusable paths (NUL bytes, unknown users) are an InvalidSpec."""
    if "\x00" in source:
        raise InvalidSpec(field, f"{what} path must not contain NUL characters")
    try:
        return Path(source).expanduser()
    except RuntimeError:  # `~someone` for an unknown user
        raise InvalidSpec(field, f"{what} path {source!r}: cannot expand '~' (unknown user)") from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, ...
        return False


def _looks_like_path(source: str, field: str, what: str) -> bool:
    return source.startswith(("/", ".", "~")) or _exists(_expand(source, field, what))


def _under_allowed_root(source: str, roots: list[Path], field: str, what: str) -> Path:
    """Resolve `source` and require it under one of `roots`; returns the resolved path."""
    raw = _expand(source, field, what)
    if ".." in raw.parts:
        raise InvalidSpec(field, f"{what} path {source!r} must not contain '..'")
    try:
        resolved = raw.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop, a name too long, ...
        reason = getattr(error, "strerror", None) or error
        raise InvalidSpec(field, f"{what} path {source!r} cannot be resolved: {reason}") from None
    allowed = [root.expanduser().resolve() for root in roots]
    if not any(resolved.is_relative_to(root) for root in allowed):
        shown = ", ".join(str(root) for root in allowed) or "(none configured)"
        raise InvalidSpec(field, f"{what} path {source!r} is outside the allowed directories: {shown}")
    return resolved


def _is(kind: str, path: Path) -> bool:
    """`path.is_dir()` / `path.is_file()`, False on any file system error instead of raising."""
    try:
        return getattr(path, kind)()
    except OSError:
        return False


def check_model_source(source: str, settings: Settings) -> None:
    """Accept `builtin:<name>`, a hub id `org/name`, or a local model directory or `.gguf` file under an allowed root.

    A `.gguf` file must parse whole and hold a family darwinfront prunes (see `darwinfront.gguf_files`).
    """
    field = "model.source"
    if source.startswith("builtin:"):
        return  # the spec itself checked the name
    if is_gguf_source(source):
        path = _under_allowed_root(source, settings.allowed_model_roots, field, "model")
        if not _is("is_dir", path):
            check_gguf_file(path, source)
            return
    if not _looks_like_path(source, field, "model"):
        if _HUB_ID.match(source):
            return
        raise InvalidSpec(field, f"{source!r} is neither a local model directory or .gguf file, a hub id "
                                 "'org/name', nor builtin:<name>")
    path = _under_allowed_root(source, settings.allowed_model_roots, field, "model")
    if not _is("is_dir", path):
        raise InvalidSpec(field, f"model directory {source!r} does not exist")
    if not _is("is_file", path / "config.json"):
        raise InvalidSpec(field, f"model directory {source!r} has no config.json (not a Hugging Face model)")
    check_architecture(path / "config.json", field)


def check_architecture(config: Path, field: str) -> None:
    """Refuse a model directory whose `config.json` names only architectures darwinfront does not prune (a pruned
    export, `Pruned<family>ForCausalLM`, is its family's); one that names none is left to the job to find out."""
    try:
        named = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as error:
        raise InvalidSpec(field, f"{config} is not a readable JSON config: {error}") from None
    known = set(SUPPORTED_ARCHITECTURES) | {f"Pruned{a}" for a in SUPPORTED_ARCHITECTURES}
    if named and not known & set(map(str, named)):
        raise InvalidSpec(field, unsupported(", ".join(map(str, named))))


def check_data_source(source: str, settings: Settings) -> None:
    """Accept `builtin:<name>`, a `datasets` id, or a non-empty .txt/.jsonl file under an allowed root."""
    field = "data.source"
    if source.startswith("builtin:"):
        return
    if not _looks_like_path(source, field, "data") and not source.endswith(DATA_SUFFIXES):
        if _DATASET_ID.match(source):
            return
        raise InvalidSpec(field, f"{source!r} is neither a local .txt/.jsonl file, a datasets id, "
                                 "nor builtin:<name>")
    path = _under_allowed_root(source, settings.allowed_data_roots, field, "data")
    if path.suffix not in DATA_SUFFIXES:
        raise InvalidSpec(field, f"data file {source!r} must end in .txt or .jsonl")
    if not _is("is_file", path):
        raise InvalidSpec(field, f"data file {source!r} does not exist")
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 20)
    except OSError as error:
        raise InvalidSpec(field, f"data file {source!r} cannot be read: {error.strerror}") from None
    if not head.strip():
        raise InvalidSpec(field, f"data file {source!r} is empty")


def check_budget(spec: JobSpec, settings: Settings) -> None:
    """Refuse a spec that plans more evaluations than the server allows per job."""
    planned = spec.planned_evaluations()
    if planned > settings.max_evaluations_per_job:
        raise InvalidSpec(
            "search",
            f"the job plans {planned} candidate evaluations (targets, generations and offspring); "
            f"this server allows at most {settings.max_evaluations_per_job} per job",
        )


def validate_spec(spec: JobSpec, settings: Settings) -> None:
    """Run every settings-dependent check on a spec that already passed its own validation.

    Raises:
        InvalidSpec: The first failed check, naming the field.
    """
    check_model_source(spec.model.source, settings)
    check_data_source(spec.data.source, settings)
    check_budget(spec, settings)
