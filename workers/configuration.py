"""The configuration document a user downloads: which units of which layers to keep, and what that buys."""

from __future__ import annotations

import hashlib
import json

import torch

import darwinfront
from darwinfront.core.spec import PruneJobSpec
from search.genome import LevelSpace, PruneGenome
from workers.slicing import Layout

FORMAT = "darwinfront.structured_prune/1"
_METRICS = ("kl", "held_out_kl", "perplexity", "latency_ms", "dense_latency_ms", "kl_cut", "kl_oneshot")


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
    *, spec: PruneJobSpec, space: LevelSpace, genome: PruneGenome, layout: Layout, model: torch.nn.Module, result: dict
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


@torch.no_grad()
def rebuild(model: torch.nn.Module, tokenizer, configuration: dict) -> torch.nn.Module:
    """Slice `model` (the dense model the job searched) to `configuration` with the job's one-shot weights.

    A configuration names its level database (criterion and its options, level table, the data section and seed
    that give its calibration tokens). For a criterion whose levels carry tensors (obs's updated weights, FLAP's
    bias compensation), those are what the front's one-shot KL was measured with, and cutting the structure
    alone gives a far worse model; so the database is opened (or rebuilt on this machine from the same tokens:
    minutes, once), each cut layer's o_proj / down_proj take their level's weights before slicing and its output
    shift after. Mask-only criteria slice the dense weights.

    Raises:
        InvalidSpec: the model is not the one the job pruned, or the database it rebuilds is another one.
    """
    from darwinfront.core.errors import InvalidSpec
    from darwinfront.core.spec import DataSpec
    from workers import calibration_select, criteria, database, implants, levels, slicing
    from workers.criteria._common import target_linear
    from workers.job_inputs import token_pools

    named = configuration.get("database") or {}
    if configuration.get("level_table") is None or not named.get("criterion"):
        return slicing.apply_configuration(model, configuration)
    fingerprint = configuration.get("model", {}).get("fingerprint")
    if fingerprint and model_fingerprint(model) != fingerprint:
        raise InvalidSpec("configuration.model", "this is not the model the job pruned (its fingerprint differs); "
                          "load the job's model.source as it was, in float32")
    table = levels.LevelTable.from_dict(configuration["level_table"])
    criterion, options = named["criterion"], named.get("options", {})
    genome = PruneGenome.from_dict(configuration["genome"])
    stores = criteria.stores_weights(criteria.get(criterion, attention_unit=table.attention_unit, **options))
    if not stores and not genome.implants:
        return slicing.apply_configuration(model, configuration)
    tokens = token_pools(tokenizer, DataSpec.model_validate(configuration["data"]), configuration["seed"])
    if "selection_pool" in tokens:  # `data.selection: kl`: the rows the job chose (recorded with the database)
        tokens["database"] = calibration_select.rows_of(tokens["selection_pool"], named["selection_rows"])
    db = database.build(model, tokens["database"].to(next(model.parameters()).device), criterion=criterion,
                        table=table, options=options)
    if named.get("key") and db.key != named["key"]:
        raise InvalidSpec("configuration.database", f"rebuilt database {db.key}, the configuration names "
                          f"{named['key']}: the model, data or criterion options differ from the job's")
    carried = {(i, kind): db.load_level(i, kind, level) for i in range(len(model.model.layers))
               for kind, level in (("attn", genome.attn[i]), ("mlp", genome.mlp[i]))
               if level and stores and (i, kind) not in genome.implants}
    for (i, kind), tensors in carried.items():
        if "weight" in tensors:
            linear = target_linear(model.model.layers[i], kind)
            linear.weight.copy_(tensors["weight"].to(linear.weight))
    slicing.apply_configuration(model, configuration)
    for (i, kind), tensors in carried.items():
        if "shift" in tensors:
            slicing.add_output_shift(model.model.layers[i], kind, tensors["shift"])
    for i, kind in genome.implants:  # HAP's implants, fitted in the database
        level = genome.attn[i] if kind == "attn" else genome.mlp[i]
        block = implants.block_of(model.model.layers[i], kind)
        stored = db.load_implant(i, kind, level)
        implants.load_into(block, {k: t.to(block.implant_in.weight) for k, t in stored.items()})
    return model
