"""Write a sliced model as a directory that loads without darwinfront, and read one back.

The directory holds the weights (safetensors), the tokenizer, `config.json` in the family's pruned config
(`model_type: darwinfront_<family>`, the per-layer `layer_shapes`, an `auto_map` naming the modeling file), and the
modeling code (`modeling_pruned_<family>.py` with `pruned_layers.py`). darwinfront reads it back with the same
classes, imported from this package rather than run from the directory, so an archive's code is never executed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from darwinfront.core.errors import InvalidSpec
from workers import artifacts, families
from workers.families import Family
from workers.safetensors_stream import SafetensorsPlan, unique_tensors

_HERE = Path(__file__).resolve().parent
SHARED_CODE = "pruned_layers.py"
WEIGHTS = "model.safetensors"


def layer_shapes(model: nn.Module) -> list[dict]:
    """Each decoder layer's kept widths, read from its modules: what `config.layer_shapes` records."""
    config = model.config
    head_dim = families.head_dim(config)
    shapes = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        empty_attn = getattr(attn, "darwinfront_empty", False)
        heads = 0 if empty_attn else attn.q_proj.out_features // head_dim
        kv_heads = 0 if empty_attn else attn.k_proj.out_features // head_dim
        index = getattr(attn, "kv_head_of_query", None)
        index = None if index is None else list(index)
        if index is not None and heads % kv_heads == 0 and index == [j // (heads // kv_heads) for j in range(heads)]:
            index = None  # the usual grouping: the family's own attention runs it
        empty_mlp = getattr(mlp, "darwinfront_empty", False)
        width = 0 if empty_mlp else mlp.down_proj.in_features
        attn_bias = attn.o_bias if empty_attn else attn.o_proj.bias
        mlp_bias = mlp.down_bias if empty_mlp else mlp.down_proj.bias
        shape = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": width,
                 "kv_head_of_query": index, "attention_output_bias": attn_bias is not None,
                 "mlp_output_bias": mlp_bias is not None}
        for key, block in (("attention_implant_rank", attn), ("mlp_implant_rank", mlp)):
            if getattr(block, "rank", 0):  # a neural implant (only such layers carry the key)
                shape[key] = block.rank
        shapes.append(shape)
    return shapes


def write_code(model: nn.Module, path: Path, *, dtype: torch.dtype | None = None) -> None:
    """Turn a directory `model.save_pretrained` wrote into one stock transformers loads with trust_remote_code:
    the pruned config (`layer_shapes`, `auto_map`, and `dtype`: the weights' dtype when given) over
    `config.json`, and the modeling code beside it."""
    family = families.family_of(model)
    data = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "layer_shapes", "torch_dtype"):
        data.pop(key, None)
    if dtype is not None:
        data["dtype"] = str(dtype).removeprefix("torch.")
    # the class itself, not `from_dict` (which also formats the whole config for a log line: a tenth of a second
    # per export with a real model's layout of kept indices)
    config = family.config_class(**data, layer_shapes=layer_shapes(model))
    config.architectures = [family.causal_lm_class.__name__]
    config.auto_map = family.auto_map()
    config.save_pretrained(path)
    for name in (SHARED_CODE, f"{family.module}.py"):
        shutil.copyfile(_HERE / name, Path(path) / name)


def save(model: nn.Module, tokenizer, path: Path, *, dtype: torch.dtype | None = None, card: dict | None = None,
         extra: dict[str, str] | None = None, archive: str | None = None) -> Path:
    """Write the directory of sliced `model` into folder `path` (see `slicing.save_pruned`), or with `archive` as
    `path/<archive>.tar` (a tar of the directory under `<archive>/`).

    Both ways the weights are written once: the small files (config, code, tokenizer, model card, `extra`) go to
    the disk first, then the weights stream from the tensors into `model.safetensors` or straight into the tar,
    whose member size is known before its first byte (`SafetensorsPlan`). Returns the folder or the archive.
    """
    from workers.pruned_hf import model_card

    files = path / archive if archive else path
    files.mkdir(parents=True, exist_ok=True)
    weights = SafetensorsPlan(unique_tensors(model.state_dict()), dtype or next(model.parameters()).dtype)
    write_code(model, files, dtype=weights.dtype)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(files)
    if tokenizer is not None:
        tokenizer.save_pretrained(files)
    for name, text in (extra or {}).items():
        (files / name).write_text(text)
    if card is not None:
        model_card.write(files, card)
    if archive is None:
        with open(files / WEIGHTS, "wb") as handle:
            weights.write(handle)
        return files
    target = artifacts.pack(files, path / f"{archive}.tar", name=archive, streamed={WEIGHTS: weights})
    shutil.rmtree(files)
    return target


def read_family(path: Path) -> Family | None:
    """The family of a pruned directory (its `config.json` model type), or None for any other model source."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    model_type = json.loads(file.read_text()).get("model_type")
    return next((f for f in families.FAMILIES.values() if f.model_type == model_type), None)


def load(path: Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """Load a pruned directory with darwinfront's own copy of its classes; every saved tensor must fit.

    Raises:
        InvalidSpec: not a pruned directory of a supported family, or weights that do not fit its shapes.
    """
    path = Path(path)
    family = read_family(path)
    if family is None:
        raise InvalidSpec("model.source", f"{path} is not a pruned model directory (config.json model_type is none "
                          f"of {', '.join(f.model_type for f in families.FAMILIES.values())}); export it again")
    if not any(path.glob("*.safetensors")):
        raise InvalidSpec("model.source", f"{path} holds no .safetensors weights")
    model, info = family.causal_lm_class.from_pretrained(path, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise InvalidSpec("model.source", f"weights do not fit the layer shapes of {path}: {problems}")
    return model.to(device).eval()
