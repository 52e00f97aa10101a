"""Loading models: where a source lives, which device and dtype it runs in, and whether we know its layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from darwinfront.core.errors import InvalidSpec
from darwinfront.gguf_files import is_gguf_source

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cpu`, `cuda` and `cuda:N` as given (cuda must be available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise InvalidSpec("model.device", f"unknown device {device!r}") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSpec("model.device", f"device {device!r} asked for, but CUDA is not available here")
    return resolved


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """`float32`, `bfloat16`, `float16` (or fp32/bf16/fp16, or a torch.dtype) -> the torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InvalidSpec("model.dtype", f"unknown dtype {name!r}; known: float32, bfloat16, float16")
    return DTYPES[name]


def stored_dtype(source: str, revision: str | None = None) -> torch.dtype | None:
    """The dtype a source's checkpoint is stored in (its config's `dtype` / `torch_dtype`), None when unknown."""
    path = Path(resolve_source(source))
    try:
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source, revision=revision).to_dict()
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(str(name).removeprefix("torch.")) if name else None


def export_dtype(model_spec) -> torch.dtype:
    """The dtype a job writes its models in: the one it ran in when that is 16-bit (what was scored), else the
    source checkpoint's own (bf16 stays bf16, fp32 stays fp32), so an export is never wider than its source."""
    ran = resolve_dtype(model_spec.dtype)
    if ran != torch.float32:
        return ran
    return stored_dtype(model_spec.source, getattr(model_spec, "revision", None)) or torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16`."""
    return str(dtype).removeprefix("torch.")


def resolve_source(source: str, cache_dir: Path | None = None) -> str:
    """Where `from_pretrained` finds a source.

    Args:
        source: `builtin:<name>` (built on first use, see `workers.reference`), a local `.gguf` file (converted
            once into the cache, see `workers.gguf_import`), a local directory holding config.json, or a hub id
            (passed through unchanged).
        cache_dir: the root builtin and converted models are built under (default: `settings.cache_dir()`).

    Raises:
        InvalidSpec: on an unknown builtin, a missing builtin package, a bad `.gguf` file, or a local directory
            without config.json.
    """
    if source.startswith("builtin:"):
        from workers.reference import builtin_model_dir

        return str(builtin_model_dir(source.removeprefix("builtin:"), cache_dir))
    path = Path(source).expanduser()
    if is_gguf_source(source) and not path.is_dir():
        from workers.gguf_import import gguf_model_dir

        return str(gguf_model_dir(path, cache_dir, source=source))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidSpec("model.source", f"local directory {source!r} has no config.json")
        return str(path)
    if source.startswith(("/", "./", "../", "~")) or path.exists():
        raise InvalidSpec("model.source", f"local path {source!r} is not a model directory")
    return source


def load_model(
    source: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "auto",
    revision: str | None = None,
    cache_dir: Path | None = None,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer in eval mode.

    Directories that `slicing.save_pruned` wrote (a `darwinfront_<family>` config) load with their per-layer
    sizes; everything else goes through `AutoModelForCausalLM.from_pretrained`.

    Returns:
        (model, tokenizer); the tokenizer's pad token falls back to its EOS token.

    Raises:
        InvalidSpec: on a bad source, device or dtype, or an architecture darwinfront cannot prune.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.pruned_hf.export import read_family

    path = resolve_source(source, cache_dir)
    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    if read_family(Path(path)) is not None:
        from workers.slicing import load_pruned

        model, tokenizer = load_pruned(path, dtype=torch_dtype, device=torch_device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=torch_dtype)
        model.to(torch_device)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    check_architecture(model)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def check_architecture(model: nn.Module) -> None:
    """Raise `InvalidSpec` unless `model` is of a supported family (`workers.families`) with the layout its
    adapter names; the message names the architecture and the supported ones."""
    from workers import families

    families.family_of(model).check(model)
