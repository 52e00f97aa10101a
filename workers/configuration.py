"""The configuration document a user downloads: which units of which layers to keep, and what that buys."""

from __future__ import annotations

import hashlib
import json

import torch

import darwinfront
from search.genome import LevelSpace, PruneGenome
from service.spec import JobSpec
from workers.slicing import Layout

FORMAT = "darwinfront.structured_prune/1"
_METRICS = ("kl", "held_out_kl", "perplexity", "latency_ms", "dense_latency_ms")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's config and weights, sampled with a stride so it stays fast on large models."""
    digest = hashlib.sha256(json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def build_configuration(
    *, spec: JobSpec, space: LevelSpace, genome: PruneGenome, layout: Layout, model: torch.nn.Module, result: dict
) -> dict:
    """Assemble the JSON-safe configuration of one candidate."""
    return {
        "format": FORMAT,
        "darwinfront_version": darwinfront.__version__,
        "candidate_id": result["candidate_id"],
        "model": {
            "source": spec.model.source,
            "architecture": model.config.architectures[0] if model.config.architectures else type(model).__name__,
            "num_hidden_layers": space.n_layers,
            "fingerprint": model_fingerprint(model),
        },
        "target": result.get("target"),
        "seed": spec.seed,
        "criterion": spec.prune.criterion,
        "genome": genome.to_dict(),
        **layout.to_dict(),  # attention_unit and layers
        "parameters": space.params(genome),
        "dense_parameters": space.dense_params,
        "metrics": {k: result[k] for k in _METRICS if result.get(k) is not None},
        "data": spec.data.model_dump(),
    }
