"""NViT's global, latency-aware ranking: attention units, MLP channels and whole blocks of every layer in one list.

NViT (Yang et al., CVPR'23) scores every structure by the Fisher estimate of its removal's loss change,
I_S = E_b[(Σ_{i∈S} w_i g_i)²] (`workers.criteria.nvit.saliencies`), which is in loss units for a KV group, a
channel, an attention or MLP sub-layer and a whole decoder layer alike, so all of them are ranked in one global
list; the cost of keeping a structure is its latency. NViT's objective is I'_S = I_S − λ·ΔLat_S with ΔLat_S
the latency its removal saves, read from a table. Here the table is measured on this machine
(`measure_latency_table`, with `workers.latency.forward_latency`): per attention unit, per MLP channel and per
whole sub-layer, from the dense model and models cut in every layer. With `lam=None` the rank is by
I_S / ΔLat_S instead (loss per millisecond saved: the greedy order of a latency budget). `latency_cut` walks
the list until the predicted saving reaches a target and returns the per-layer removal counts.

What differs from NViT: NViT interpolates a latency table over its ViT's dimensions and prunes iteratively while
distilling (32 units every 100 batches); here the table is linear per unit (measured once, per unit of each kind
and per block) and the cut is one-shot. NViT's structures include the embedding width and QK / V dims; a Llama
decoder's units are KV groups (or query heads) and MLP channels, plus whole sub-layers and layers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from search.genome import PruneGenome
from workers import slicing
from workers.latency import forward_latency

BLOCK_KINDS = ("attn_block", "mlp_block", "layer")


@dataclass(frozen=True)
class LatencyTable:
    """Forward latency saved (ms) per removed structure, measured on one machine at one batch shape.

    Attributes:
        dense_ms: the dense model's median forward time.
        unit_ms: kind -> ms saved per attention unit ("attn") or MLP channel ("mlp") of one layer (≥ 0).
        block_ms: kind -> ms saved by removing one layer's whole attention ("attn") or MLP ("mlp") (≥ 0).
        setup: batch size, sequence length, repeats, device, attention unit.
    """

    dense_ms: float
    unit_ms: dict[str, float]
    block_ms: dict[str, float]
    setup: dict

    def saving(self, kind: str) -> float:
        """ms saved by one structure of `kind` (attn, mlp, attn_block, mlp_block, layer)."""
        if kind in ("attn", "mlp"):
            return self.unit_ms[kind]
        if kind == "layer":
            return self.block_ms["attn"] + self.block_ms["mlp"]
        return self.block_ms[kind.removesuffix("_block")]


def _keep(d: slicing.Dims, unit: str, attn: int, mlp: int) -> slicing.Layout:
    """Every layer keeps its first `attn` attention units and `mlp` MLP units (channels or experts; the timing does
    not care which)."""
    layer = slicing.LayerLayout(tuple(range(attn)), tuple(range(mlp)))
    return slicing.Layout((layer,) * d.n_layers, unit, d.mlp_unit)


def measure_latency_table(
    model: nn.Module, *, attention_unit: str = "kv_group", fraction: float = 0.5, batch_size: int = 1,
    seq_len: int = 128, repeats: int = 10,
) -> LatencyTable:
    """Time the dense model, then copies with `fraction` of every layer's attention units (then MLP channels)
    removed and with every layer's attention (then MLP) removed; savings per structure, clamped at 0 (noise).

    Memory: one sliced copy of the model at a time.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    d = slicing.dims(model)
    units = d.attn_units(attention_unit)

    def time_of(layout: slicing.Layout | None) -> float:
        cut = model if layout is None else slicing.slice_model(copy.deepcopy(model), layout)
        ms = forward_latency(cut, batch_size=batch_size, seq_len=seq_len, repeats=repeats)["median_ms"]
        del cut
        return ms

    dense = time_of(None)
    attn_cut, mlp_cut = max(1, round(fraction * units)), max(1, round(fraction * d.mlp_units))
    measured = {
        "attn": time_of(_keep(d, attention_unit, units - attn_cut, d.mlp_units)),
        "mlp": time_of(_keep(d, attention_unit, units, d.mlp_units - mlp_cut)),
        "attn_block": time_of(_keep(d, attention_unit, 0, d.mlp_units)),
        "mlp_block": time_of(_keep(d, attention_unit, units, 0)),
    }
    per_layer = {k: max(0.0, dense - ms) / d.n_layers for k, ms in measured.items()}
    return LatencyTable(
        dense_ms=dense,
        unit_ms={"attn": per_layer["attn"] / attn_cut, "mlp": per_layer["mlp"] / mlp_cut},
        block_ms={"attn": per_layer["attn_block"], "mlp": per_layer["mlp_block"]},
        setup={"batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "attention_unit": attention_unit,
               "device": str(next(model.parameters()).device)},
    )


@dataclass(frozen=True)
class Structure:
    """One removable structure of the global list: `kind` attn / mlp (one unit, `unit` its index) or a block
    (attn_block, mlp_block, layer; `unit` = -1), its saliency (loss units), latency saved and objective."""

    layer: int
    kind: str
    unit: int
    saliency: float
    latency_ms: float
    objective: float


def objective(saliency: float, latency_ms: float, lam: float | None) -> float:
    """NViT's I − λ·ΔLat, or with `lam=None` I / ΔLat (infinite when removing it saves nothing)."""
    if lam is not None:
        return saliency - lam * latency_ms
    return saliency / latency_ms if latency_ms > 0 else float("inf")


def global_ranking(
    units: list[dict[str, torch.Tensor]], blocks: list[dict[str, float]], table: LatencyTable,
    lam: float | None = None,
) -> list[Structure]:
    """Every unit and block of every layer, lowest objective (removed first) first; ties by layer, kind, unit."""
    out = []
    for i, (per_kind, per_block) in enumerate(zip(units, blocks, strict=True)):
        for kind, scores in per_kind.items():
            ms = table.saving(kind)
            out += [Structure(i, kind, j, s, ms, objective(s, ms, lam)) for j, s in enumerate(scores.tolist())]
        for block, s in per_block.items():
            kind = "layer" if block == "layer" else f"{block}_block"
            ms = table.saving(kind)
            out.append(Structure(i, kind, -1, s, ms, objective(s, ms, lam)))
    return sorted(out, key=lambda s: (s.objective, s.layer, s.kind, s.unit))


def latency_cut(ranking: list[Structure], table: LatencyTable, d: slicing.Dims, target_ms: float,
                attention_unit: str = "kv_group") -> tuple[PruneGenome, float]:
    """Walk `ranking` until the predicted saving reaches `target_ms`: per layer, attention units and MLP channels
    removed (a whole sub-layer = all of them; units of a removed sub-layer are skipped), and the predicted saving.

    Units are removed in the order the list gives them, which within a layer and kind is their saliency order, so
    the counts apply to the criterion's removal order (`levels.removal_orders`).
    """
    total = {"attn": d.attn_units(attention_unit), "mlp": d.mlp_units}
    removed = [{"attn": 0, "mlp": 0} for _ in range(d.n_layers)]
    saved = 0.0
    for s in ranking:
        if saved >= target_ms:
            break
        kinds = ("attn", "mlp") if s.kind == "layer" else (s.kind.removesuffix("_block"),)
        left = [k for k in kinds if removed[s.layer][k] < total[k]]
        if not left:
            continue
        if s.unit >= 0:
            removed[s.layer][s.kind] += 1
            saved += s.latency_ms
            if removed[s.layer][s.kind] == total[s.kind]:  # its last unit: the sub-layer is gone, at its own time
                saved += table.block_ms[s.kind] - total[s.kind] * table.unit_ms[s.kind]
            continue
        for k in left:  # a block: what is left of it goes, saving the block's time less its units already gone
            saved += table.block_ms[k] - removed[s.layer][k] * table.unit_ms[k]
            removed[s.layer][k] = total[k]
    genome = PruneGenome(attn=tuple(r["attn"] for r in removed), mlp=tuple(r["mlp"] for r in removed))
    return genome, saved
