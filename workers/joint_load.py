"""A downloaded joint configuration applied in one call: the sliced model and the factory of its mixed-precision
KV cache, ready for `generate`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from darwinfront.core.errors import InvalidSpec
from workers import slicing
from workers.joint_evaluator import CONFIG_FILE, FORMAT
from workers.kv.cache import KVPrecisionCache, KVPrecisionConfig, build_cache


def load_joint(source: str | Path | dict, *, model: nn.Module | None = None, dtype=torch.float32,
               device: str = "cpu") -> tuple[nn.Module, object | None, Callable[[], KVPrecisionCache]]:
    """The model and cache factory of a joint configuration.

    Args:
        source: an unpacked model archive of a joint job's front point (a directory holding the sliced model and
            `joint.json`), or the configuration document itself (`GET .../config`).
        model: with a configuration document, the dense model to slice (its structure is cut from the dense
            weights: what `slicing.apply_configuration` gives); unused with a directory.
        dtype, device: how a directory's model is loaded.

    Returns:
        `(model, tokenizer, cache)`: `cache()` is a fresh packed cache of the configuration's per-layer pairs
        (pass it as `past_key_values=`); the tokenizer is None for a configuration document.

    Raises:
        InvalidSpec: the source is not a joint configuration, or it does not fit the model.
    """
    tokenizer = None
    if isinstance(source, dict):
        configuration = source
        if model is None:
            raise InvalidSpec("model", "a joint configuration document needs the dense model to slice")
        _check(configuration)
        model = slicing.apply_configuration(model, configuration["prune"])
    else:
        path = Path(source)
        if not (path / CONFIG_FILE).is_file():
            raise InvalidSpec("source", f"{path} holds no {CONFIG_FILE}: not an unpacked joint model archive")
        configuration = json.loads((path / CONFIG_FILE).read_text())
        _check(configuration)
        model, tokenizer = slicing.load_pruned(path, dtype=dtype, device=device)
    precision = KVPrecisionConfig.from_dict(configuration["kv"])
    build_cache(model, precision)  # fails now, naming the field, if it does not fit the model
    return model, tokenizer, lambda: build_cache(model, precision, storage="packed")


def _check(configuration: dict) -> None:
    if not isinstance(configuration, dict) or configuration.get("format") != FORMAT:
        raise InvalidSpec("configuration.format", f"expected {FORMAT!r}")
