"""ZipLM / OBS structured pruning: greedy removal of o_proj / down_proj input-column groups, with updates.

For a linear y = W x with calibration inputs X, H = XᵀX (dampened by rel_damp·mean(diag H)). A group g of
columns costs w_gᵀ (Hinv_gg)⁻¹ w_g summed over rows to remove when the other columns are refitted optimally;
the cheapest group goes first, the remaining columns get the OBS update W -= W_g (Hinv_gg)⁻¹ Hinv_g:, and Hinv
is downdated to the inverse over the remaining columns. One greedy pass yields every level, nested. The pass
applies its updates in blocks of steps (`_greedy_block`): same choices and weights as the step-by-step loop,
at a fraction of the memory traffic (SmolLM2-135M's down_proj: 0.7 s instead of 13 s at 2 threads).

`Obs.score` turns the removal order into scores (first removed = 0, higher = keep); `obs_levels` returns, per
layer, the removal order and the updated weights at requested removal counts (the level database's source).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from darwinfront.core.errors import InvalidSpec
from workers.criteria._common import (
    KINDS,
    Geometry,
    check_kinds,
    decoder_layers,
    empty,
    layerwise_stats,
    target_linear,
)
from workers.criteria.base import LayerScores, LinearLevels, UnitScores

CRITERIA = {"obs": {"class": "Obs"}}  # the catalog entry (darwinfront.core.criteria)


def _prepare(
    weight: torch.Tensor, hessian: torch.Tensor, rel_damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().to(device=hessian.device, dtype=torch.float64).clone()  # (out, in)
    h = hessian.to(torch.float64).clone()  # (in, in)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # a column that never sees input is free to remove: zero it, keep H invertible
    w[:, dead] = 0.0
    h.diagonal().add_(rel_damp * h.diagonal().mean())
    return w, torch.cholesky_inverse(torch.linalg.cholesky(h))


# The widest linear input OBS takes: its Hessian and inverse are N x N in fp64, 2 x 8 GiB at this width. A dense
# MLP of 28,672 channels (Llama-3-70B) fits; a mixture of experts' E·w columns (OLMoE 65,536, Mixtral-8x7B 114,688)
# does not.
MAX_COLUMNS = 32_768

# Greedy steps whose updates wait as low-rank factors before one GEMM applies them. Measured on SmolLM2-135M's
# down_proj (1536 steps, 1-2 threads): 64 and 128 equally fast, 32 and 256 ~10% slower, 16 ~40% slower.
BLOCK = 64


def _block_inverse(blocks: torch.Tensor) -> torch.Tensor:
    """Inverses of (n, g, g) diagonal blocks of Hinv (positive definite): a reciprocal when g == 1, else Cholesky.

    Not `torch.linalg.inv`: on CPU its batched LU runs MKL's dgetrf on several threads at once, which fails in
    DLASWP and hangs for blocks as wide as SmolLM2's KV groups (3 x 192 x 192 at 2 threads; pytorch#141358).
    """
    return 1.0 / blocks if blocks.shape[-1] == 1 else torch.cholesky_inverse(torch.linalg.cholesky(blocks))


def _times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b of (n, g, g) blocks (or a (g, g) b): elementwise when g == 1, where bmm only costs time."""
    return a * b if a.shape[-1] == 1 else a @ b


def _diagonal_blocks(hinv: torch.Tensor, group: int) -> torch.Tensor:
    n = hinv.shape[0] // group
    return hinv.reshape(n, group, n, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()  # (n, g, g)


def _row_grams(wt: torch.Tensor, group: int) -> torch.Tensor:
    """W_gᵀ W_g of every group from Wᵀ (n·g, out): (n, g, g)."""
    if group == 1:
        return (wt * wt).sum(1).reshape(-1, 1, 1)
    wg = wt.reshape(-1, group, wt.shape[1])  # (n, g, out)
    return wg @ wg.mT


def _greedy_block(
    wt: torch.Tensor, hinv: torch.Tensor, alive: torch.Tensor, group: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`steps` greedy OBS removals over the alive groups, applying their updates to W and Hinv only at the end.

    `wt` (n·g, out) is W transposed (a group's columns are contiguous rows) and `hinv` (n·g, n·g) is Hinv, both
    over the alive groups only; `alive` (n,) names them (ascending original indices, so ties go to the lower
    index as in a full-size argmin). Step s removes group u: with h = Hinv[u-rows] (g, n·g), m = (Hinv_uu)⁻¹
    and c = W[:, u-cols] m (out, g), the eager loop does Hinv -= hᵀ m h and W -= c h. Here those updates wait
    as factors, one g-row slab per step: the current Hinv is `hinv - hsᵀ mhs` and the current Wᵀ is
    `wt - hsᵀ cs`, with hs = h, mhs = m h, cs = cᵀ. A step reads only the rows it needs through the factors and
    keeps the costs' inputs (Hinv's diagonal blocks, W's column Grams) current by rank-g updates in O(n·g³).

    The eager loop zeroes a removed group's rows and columns of Hinv and W so that later updates leave them
    alone. Here they are dropped when the block is applied, and until then nothing reads them: entry (a, b) of
    every update depends only on entries a and b of h, so the removed groups' entries (rounding residue) only
    ever reach the removed groups' own rows and columns, whose costs are masked.

    Returns the updated wt and hinv over the groups still alive, their names, and the removed groups in order.
    """
    width, out = wt.shape
    g, n = group, width // group
    blocks = _diagonal_blocks(hinv, g)  # (n, g, g) of the current Hinv
    grams = _row_grams(wt, g)  # (n, g, g) of the current W
    gone = torch.zeros(n, dtype=torch.bool, device=wt.device)
    removed = torch.empty(steps, dtype=torch.long, device=wt.device)
    hs = wt.new_empty(steps * g, width)
    mhs = wt.new_empty(steps * g, width)
    cs = wt.new_empty(steps * g, out)
    span = torch.arange(g, device=wt.device)
    eye = torch.eye(g, dtype=wt.dtype, device=wt.device)
    for s in range(steps):
        r = s * g  # rank of the pending updates
        binv = _block_inverse(blocks)  # (n, g, g)
        cost = torch.where(gone, torch.inf, (binv * grams).sum((1, 2)))  # (n,)
        u = cost.argmin().reshape(1)  # stays on the device: no host round trip per step
        cols = u * g + span  # (g,)
        m = binv.index_select(0, u)[0]  # (g, g) = (Hinv_uu)⁻¹
        hu = hs[:r].index_select(1, cols).T  # (g, r)
        h = hinv.index_select(0, cols) - hu @ mhs[:r]  # (g, n·g) current Hinv rows
        ct = m.T @ (wt.index_select(0, cols) - hu @ cs[:r])  # (g, out) = cᵀ
        wc = (wt @ ct.T - hs[:r].T @ (cs[:r] @ ct.T)).view(n, g, g)  # W_jᵀ c of every group j
        hj = h.T.reshape(n, g, g)  # (n, g, g): h_jᵀ
        cross = _times(wc, hj.mT)
        grams -= cross + cross.mT - _times(_times(hj, ct @ ct.T), hj.mT)  # W_j -= c h_j
        blocks -= _times(_times(hj, m), hj.mT)  # Hinv_jj -= h_jᵀ m h_j
        blocks.index_copy_(0, u, eye[None])  # keeps the removed block invertible; its cost is masked
        hs[r : r + g] = h
        mhs[r : r + g] = m @ h
        cs[r : r + g] = ct
        gone.index_fill_(0, u, True)
        removed[s : s + 1] = alive.index_select(0, u)
    keep = (~gone).nonzero().squeeze(1)  # one host sync per block
    kept = (keep[:, None] * g + span).reshape(-1)  # (n'·g,) alive columns
    hk = hs.index_select(1, kept)  # (steps·g, n'·g)
    wt = wt.index_select(0, kept).addmm_(hk.T, cs, alpha=-1.0)  # (n'·g, out)
    hinv = hinv.index_select(0, kept).index_select(1, kept).addmm_(hk.T, mhs.index_select(1, kept), alpha=-1.0)
    return wt, hinv, alive.index_select(0, keep), removed


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group: int,
    counts: Sequence[int],
    rel_damp: float = 1e-2,
    block: int = BLOCK,
) -> LinearLevels:
    """Greedy OBS removal of `group`-wide column blocks of `weight` (out, in) given input Gram `hessian`.

    Runs until max(counts) groups are removed and snapshots the updated weight at every count in `counts`.
    The result is the eager greedy loop's (remove the cheapest group, update W and Hinv, repeat) with the
    arithmetic reassociated: the updates of `block` steps are applied together by one GEMM, and the removed
    groups are then dropped from W and Hinv, so the work shrinks as the layer does. Runs in fp64 on the
    Hessian's device.
    """
    n = weight.shape[1] // group
    if weight.shape[1] != n * group or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"weight {tuple(weight.shape)} / hessian {tuple(hessian.shape)} / group {group} mismatch"
        )
    if any(not 0 <= c <= n for c in counts):
        raise ValueError(f"removal counts {list(counts)} outside 0..{n}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    w, hinv = _prepare(weight, hessian, rel_damp)  # (out, in), (in, in)
    wt = w.T.contiguous()  # (in, out)
    alive = torch.arange(n, device=w.device)  # the groups wt and hinv still hold
    order = []
    snaps: dict[int, torch.Tensor] = {0: weight.detach()}  # level 0 is the dense weight, dead columns included
    done, stops = 0, sorted(set(counts) - {0})
    for stop in stops:
        while done < stop:
            steps = min(block, stop - done)
            wt, hinv, alive, removed = _greedy_block(wt, hinv, alive, group, steps)
            order.append(removed)
            done += steps
        snap = wt.new_zeros(n, group, wt.shape[1])  # (n, g, out)
        snap[alive] = wt.reshape(-1, group, wt.shape[1])
        snaps[stop] = snap.reshape(n * group, -1).T.contiguous()  # (out, in)
    weights = {c: snaps[c].to(device=weight.device, dtype=weight.dtype, copy=True) for c in sorted(counts)}
    order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    return LinearLevels(order=order.cpu(), weights=weights)


def _group_width(kind: str, geo: Geometry) -> int:
    return geo.attn_width if kind == "attn" else geo.mlp_width


def obs_levels(
    model: nn.Module,
    calibration: torch.Tensor,
    levels: Mapping[str, Sequence[int]],
    *,
    on_layer: Callable[[int, int, float], None] | None = None,
    **options,
) -> list[dict[str, LinearLevels]]:
    """Per layer, the nested OBS removal order and updated o_proj / down_proj weights at each removal count.

    `iter_obs_levels` collected: one kind -> `LinearLevels` dict per requested layer, aligned with `layers` (every
    layer in order when `layers` is None). `options` are `iter_obs_levels`'s; `on_layer` is called after each
    computed layer with (layers done, layers to do, seconds since the start).
    """
    started = time.perf_counter()
    found: dict[int, dict[str, LinearLevels]] = {}
    wanted = options.get("layers")
    total = len(model.model.layers) if wanted is None else len(wanted)
    for i, result in iter_obs_levels(model, calibration, levels, **options):
        found[i] = result
        if on_layer is not None:
            on_layer(len(found), total, time.perf_counter() - started)
    return [found[i] for i in (sorted(found) if wanted is None else wanted)]


def iter_obs_levels(
    model: nn.Module,
    calibration: torch.Tensor,
    levels: Mapping[str, Sequence[int]],
    *,
    rel_damp: float = 1e-2,
    batch_size: int = 8,
    attention_unit: str = "kv_group",
    layers: Sequence[int] | None = None,
) -> Iterator[tuple[int, dict[str, LinearLevels]]]:
    """Per layer, the nested OBS removal order and updated o_proj / down_proj weights at each removal count,
    yielded as (layer index, kind -> `LinearLevels`) as each layer finishes, so a caller can store a layer's level
    weights and drop them before the next (memory: one layer's results).

    The decoder is walked one layer at a time on cached hidden states (`layerwise_stats`): a layer's Hessians
    are gathered from the dense model's activations, pruned, and dropped before the next layer runs, so memory
    holds the hidden states and one layer's statistics, never every layer's.

    Args:
        model: a Llama-family causal LM; its weights are read, never written.
        calibration: token ids (N, T); H is gathered from the dense model for every layer.
        levels: kind ("attn" / "mlp") -> removal counts (attention units / channels), e.g. {"attn": [0, 1, 2]}.
        rel_damp: dampening added to diag H, relative to its mean.
        batch_size: sequences per forward pass.
        attention_unit: "kv_group" or "q_head" (query heads removed, K/V kept: DarwinLM's `kv_ignore`).
        layers: decoder layer indices to compute (distinct, any order); default all. The layers before the
            first of them still run forward; none after the last does.
    """
    kinds = tuple(levels)
    check_kinds(kinds)
    geo = Geometry.of(model, attention_unit)
    width = {"attn": geo.n_heads * geo.head_dim, "mlp": geo.inter}
    if any(width[kind] > MAX_COLUMNS for kind in kinds):
        kind = max(kinds, key=width.get)
        raise InvalidSpec("prune.criterion", f"obs needs a {width[kind]} x {width[kind]} Hessian per layer for the "
                          f"{kind} ({'its experts are ' if geo.experts and kind == 'mlp' else ''}{width[kind]} "
                          f"input columns, more than {MAX_COLUMNS}): choose wanda_sp, flap or magnitude")
    wanted = list(range(geo.n_layers)) if layers is None else [int(i) for i in layers]
    if len(set(wanted)) != len(wanted) or any(not 0 <= i < geo.n_layers for i in wanted):
        raise ValueError(f"layers {wanted} must be distinct indices in 0..{geo.n_layers - 1}")
    stack = decoder_layers(model)
    for i, stats in layerwise_stats(model, calibration, kinds, batch_size, gram=True, layers=wanted):
        result = {
            kind: obs_prune(
                target_linear(stack[i], kind).weight, stats[kind].xtx, _group_width(kind, geo), levels[kind], rel_damp
            )
            for kind in kinds
        }
        del stats  # one layer's Hessians at a time
        yield i, result


class Obs:
    """ZipLM / OBS criterion: units scored by greedy removal order (first removed = 0, higher = keep)."""

    name = "obs"
    stores_weights = True  # every level holds its OBS-updated o_proj / down_proj weight

    def __init__(self, rel_damp: float = 1e-2, batch_size: int = 8, attention_unit: str = "kv_group"):
        self.rel_damp = rel_damp
        self.batch_size = batch_size
        self.attention_unit = attention_unit

    def level_weights(
        self,
        model: nn.Module,
        calibration: torch.Tensor,
        counts: Mapping[str, Sequence[int]],
        *,
        layers: Sequence[int] | None = None,
    ) -> Iterator[tuple[int, dict[str, LinearLevels]]]:
        """`iter_obs_levels` with this criterion's settings: per layer, the removal order and updated weights."""
        return iter_obs_levels(model, calibration, counts, rel_damp=self.rel_damp, batch_size=self.batch_size,
                               attention_unit=self.attention_unit, layers=layers)

    def score(
        self, model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...] = KINDS
    ) -> UnitScores:
        """Remove every unit greedily with OBS updates; a unit's score is the step at which it went."""
        check_kinds(kinds)
        geo = Geometry.of(model, self.attention_unit)
        n_units = {"attn": geo.attn_units, "mlp": geo.mlp_units}
        per_layer = obs_levels(
            model,
            calibration,
            {k: [n_units[k]] for k in kinds},
            rel_damp=self.rel_damp,
            batch_size=self.batch_size,
            attention_unit=self.attention_unit,
        )
        layers = []
        for res in per_layer:
            out = {k: empty() for k in KINDS}
            for kind, lv in res.items():
                scores = torch.empty(n_units[kind], dtype=torch.float64)
                scores[lv.order] = torch.arange(n_units[kind], dtype=torch.float64)
                out[kind] = scores
            layers.append(LayerScores(**out))
        return UnitScores(layers=tuple(layers), criterion=self.name)
