"""HAP's neural implants for LLM sub-layers: a low-rank linear map fitted by least squares in place of a whole
attention or MLP block.

HAP (Yu et al., WACV'22) keeps the most sensitive of the channels it would prune as a small implant (a 1x1 conv,
trained in fine-tuning) instead of deleting them. Here an implant replaces a whole sub-layer of a decoder layer
by `y ≈ x·A·B`, A (hidden, r), B (r, hidden), fitted on the dense model's calibration activations: x is the
sub-layer's input (the normed hidden state), y its output (what o_proj / down_proj add to the residual stream).
The fit is reduced-rank least squares: W = (XᵀX + λI)⁻¹XᵀY, then the projection of the fitted outputs XW onto
their top-r principal directions V (eigenvectors of WᵀXᵀXW), so A = W·V and B = Vᵀ. It is exact when the
sub-layer is a rank-r linear map of its input, and the best rank-r linear map otherwise.

Its rank is chosen so that it holds exactly the parameters its pruned level keeps (`levels.implant_ranks`): the
search then picks, per layer and at no cost to the budget, the pruned level or the implant. Implants are fitted
on the dense model's activations, like OBS's updates, so that any layer's choice combines with any other's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from workers.criteria._common import decoder_layers, micro_batches, model_device, run_body

KINDS = ("attn", "mlp")


def fit_low_rank(xtx: torch.Tensor, xty: torch.Tensor, rank: int, rel_damp: float = 1e-8) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The rank-`rank` least-squares map from the moments XᵀX (in, in) and XᵀY (in, out).

    Returns `implant_in`'s weight (r, in) and `implant_out`'s weight (out, r), in float64: the map is
    x ↦ implant_out(implant_in(x)) = x·Wᵀ_in·Wᵀ_out.
    """
    if not 1 <= rank <= min(xty.shape):
        raise ValueError(f"rank {rank} outside 1..{min(xty.shape)}")
    xtx, xty = xtx.to(torch.float64), xty.to(torch.float64)
    damped = xtx.clone()
    damped.diagonal().add_(rel_damp * damped.diagonal().mean().clamp_min(1e-30))
    weight = torch.linalg.solve(damped, xty)  # (in, out): the full-rank least-squares map
    fitted = weight.T @ xtx @ weight  # (out, out): Ŷᵀ Ŷ of the fitted outputs
    _, vectors = torch.linalg.eigh(fitted)  # ascending eigenvalues
    top = vectors[:, -rank:]  # (out, r): the fitted outputs' top-r directions
    return (weight @ top).T.contiguous(), top.contiguous()


def block_of(layer: nn.Module, kind: str) -> nn.Module:
    """The sub-layer of `kind`: the self-attention ("attn") or the MLP ("mlp")."""
    if kind not in KINDS:
        raise ValueError(f"unknown sub-layer {kind!r}; expected one of {KINDS}")
    return layer.self_attn if kind == "attn" else layer.mlp


@torch.no_grad()
def moments(
    model: nn.Module, calibration: torch.Tensor, kinds: Sequence[str], *, layers: Sequence[int] | None = None,
    batch_size: int = 8,
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, kind) -> (XᵀX, XᵀY) in float64 over every calibration token, X the sub-layer's input (tokens, hidden)
    and Y its output, from forward hooks on the dense model (one pass over `calibration` (N, T))."""
    stack = decoder_layers(model)
    wanted = list(range(len(stack))) if layers is None else list(layers)
    device = model_device(model)
    sums: dict[tuple[int, str], list[torch.Tensor]] = {}

    def hook(key: tuple[int, str]):
        def record(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = output[0] if isinstance(output, tuple) else output
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, hidden)
            y = y.reshape(-1, y.shape[-1]).to(torch.float64)
            if key not in sums:
                sums[key] = [x.new_zeros(x.shape[1], x.shape[1]), x.new_zeros(x.shape[1], y.shape[1])]
            sums[key][0] += x.T @ x
            sums[key][1] += x.T @ y

        return record

    handles = [block_of(stack[i], kind).register_forward_hook(hook((i, kind)), with_kwargs=True)
               for i in wanted for kind in kinds]
    try:
        for ids in micro_batches(calibration, batch_size):
            run_body(model, ids.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {key: (xtx, xty) for key, (xtx, xty) in sums.items()}


def implant_levels(
    model: nn.Module, calibration: torch.Tensor, ranks: dict[str, dict[int, int]], *,
    layers: Sequence[int] | None = None, batch_size: int = 8,
) -> Iterator[tuple[int, dict[str, dict[int, dict[str, torch.Tensor]]]]]:
    """Per decoder layer of `layers`, kind -> level -> {"in": (r, hidden), "out": (hidden, r)} for every
    (kind, level, rank) of `ranks` (kind -> level -> rank), in the dense weights' dtype."""
    kinds = [kind for kind in KINDS if ranks.get(kind)]
    stack = decoder_layers(model)
    wanted = list(range(len(stack))) if layers is None else list(layers)
    stats = moments(model, calibration, kinds, layers=wanted, batch_size=batch_size)
    dtype = next(stack[0].parameters()).dtype
    for i in wanted:
        out = {}
        for kind in kinds:
            xtx, xty = stats.pop((i, kind))
            fitted = {}
            for level, rank in ranks[kind].items():
                w_in, w_out = fit_low_rank(xtx, xty, rank)
                fitted[level] = {"in": w_in.to(dtype), "out": w_out.to(dtype)}
            out[kind] = fitted
        yield i, out


@torch.no_grad()
def load_into(block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a fitted implant ({"in", "out"}) into an installed implant block (`ImplantAttention` / `ImplantMLP`)."""
    block.implant_in.weight.copy_(tensors["in"])
    block.implant_out.weight.copy_(tensors["out"])
