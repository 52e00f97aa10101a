"""Plumbing shared by the criteria: model geometry, micro-batches, input statistics captured with hooks, and a
layer-by-layer walk of the decoder stack on cached hidden states (one layer's statistics in memory at a time).

Units (see saliency.md §1): an attention unit is one KV group (`kv_group`), i.e. the k and v head plus the
r = H/G query heads that share it; its o_proj input columns are the contiguous block [g·r·h, (g+1)·r·h) because
heads are head-major and query head q reads KV head q // r. With `q_head` units an attention unit is one query
head (its h q_proj rows and o_proj columns [q·h, (q+1)·h)) and every K/V head stays. An MLP unit is one
intermediate channel j (column j of down_proj), or in a mixture-of-experts layer one expert e, the block of
down_proj columns [e·w, (e+1)·w) of its w channels (`workers.families.moe`): a criterion scores it, as it scores a
KV group, by the sum of its columns' scores.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import nn

from workers import families

KINDS = ("attn", "mlp")
ATTENTION_UNITS = ("kv_group", "q_head")


@dataclass(frozen=True)
class Geometry:
    """The shape of a decoder stack as the criteria see it (read from `workers.families.shape`)."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    inter: int
    unit: str = "kv_group"  # what one attention unit is: a KV group or a query head
    experts: int = 0  # the MLP's experts (its units) in a mixture-of-experts model

    @property
    def mlp_units(self) -> int:
        """MLP units per layer: channels, or experts."""
        return self.experts or self.inter

    @property
    def mlp_width(self) -> int:
        """down_proj input columns per MLP unit: 1 for a channel, an expert's width."""
        return self.inter // self.experts if self.experts else 1

    @property
    def group_size(self) -> int:
        """Query heads per KV group (r)."""
        return self.n_heads // self.n_kv

    @property
    def group_width(self) -> int:
        """o_proj input columns per KV group (r·h)."""
        return self.group_size * self.head_dim

    @property
    def attn_units(self) -> int:
        """Attention units per layer: KV groups (G) or query heads (H)."""
        return self.n_heads if self.unit == "q_head" else self.n_kv

    @property
    def attn_width(self) -> int:
        """o_proj input columns per attention unit: r·h for a KV group, h for a query head."""
        return self.head_dim if self.unit == "q_head" else self.group_width

    @classmethod
    def of(cls, model: nn.Module, unit: str = "kv_group") -> Geometry:
        """The geometry of `model` with attention units `unit` ("kv_group" or "q_head")."""
        check_unit(unit)
        d = families.shape(model)
        return cls(d.n_layers, d.hidden, d.n_heads, d.n_kv, d.head_dim, d.intermediate, unit, d.experts)


def check_unit(unit: str) -> None:
    if unit not in ATTENTION_UNITS:
        raise ValueError(f"unknown attention unit {unit!r}; expected one of {ATTENTION_UNITS}")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM (`model.model.layers`)."""
    return list(model.model.layers)


def target_linear(layer: nn.Module, kind: str) -> nn.Linear:
    """The linear whose input columns are the units of `kind`: o_proj for "attn", down_proj for "mlp"."""
    if kind == "attn":
        return layer.self_attn.o_proj
    if kind == "mlp":
        return layer.mlp.down_proj
    raise ValueError(f"unknown unit kind {kind!r}; expected one of {KINDS}")


def check_kinds(kinds: tuple[str, ...]) -> None:
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown unit kinds {bad}; expected a subset of {KINDS}")


def micro_batches(calibration: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Split calibration token ids (N, T) into consecutive chunks of at most `batch_size` sequences."""
    if calibration.dim() != 2:
        raise ValueError(f"calibration must be token ids of shape (N, T), got {tuple(calibration.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    yield from calibration.split(batch_size)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_body(model: nn.Module, ids: torch.Tensor) -> None:
    """Run the decoder stack on `ids` (the LM head is not needed for input statistics)."""
    body = getattr(model, "model", model)
    body(input_ids=ids.to(model_device(model)), use_cache=False)


def group_reduce(col: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Sum per-column o_proj scores (H·h,) into per-attention-unit scores (G KV groups or H query heads)."""
    return col.reshape(geo.attn_units, geo.attn_width).sum(dim=1)


def unit_reduce(col: torch.Tensor, kind: str, geo: Geometry) -> torch.Tensor:
    """Per-column scores of `kind`'s target linear -> per-unit scores."""
    if kind == "attn":
        return group_reduce(col, geo)
    return col.reshape(geo.experts, geo.mlp_width).sum(dim=1) if geo.experts else col


def unit_columns(units: torch.Tensor, kind: str, geo: Geometry) -> torch.Tensor:
    """Bool mask over the target linear's input columns covered by `units` (attention units / channels)."""
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
    width = geo.attn_width if kind == "attn" else geo.mlp_width
    n = geo.attn_units if kind == "attn" else geo.mlp_units
    mask = torch.zeros(n, width, dtype=torch.bool)
    mask[units] = True
    return mask.reshape(-1)


def empty() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float64)


class ColumnStats:
    """Streaming per-column statistics of a linear's input, in fp64.

    Sums are taken about a shift (the first token seen) so that a constant column has exactly zero variance
    and the result does not depend on how the tokens were split into micro-batches (beyond rounding).
    """

    def __init__(self, width: int, gram: bool = False):
        self.width = width
        self.gram = gram
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1 = self.s2 = self.sq = torch.zeros(width, dtype=torch.float64)
        self.xtx: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (..., width); sums stay on the input's device, in fp64."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, width)
        if self.shift is None:
            self.shift = x[0].clone()
            self.s1, self.s2, self.sq = (torch.zeros_like(self.shift) for _ in range(3))  # Σd, Σd², Σx²
            if self.gram:
                self.xtx = x.new_zeros(self.width, self.width)  # Σ x xᵀ
        d = x - self.shift
        self.n += x.shape[0]
        self.s1 += d.sum(0)
        self.s2 += (d * d).sum(0)
        self.sq += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx += x.T @ x

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all tokens."""
        return self.sq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.shift + self.s1 / self.n

    @property
    def var(self) -> torch.Tensor:
        """Population variance (unbiased=False) of every column."""
        m = self.s1 / self.n
        return (self.s2 / self.n - m * m).clamp_min(0.0)


def _attach_stats(layer: nn.Module, kinds: tuple[str, ...], gram: bool, handles: list) -> dict[str, ColumnStats]:
    """Pre-hooks on one layer's o_proj / down_proj streaming their inputs into `ColumnStats` (handles appended)."""
    per_layer = {}
    for kind in kinds:
        lin = target_linear(layer, kind)
        per_layer[kind] = st = ColumnStats(lin.in_features, gram=gram)
        handles.append(lin.register_forward_pre_hook(lambda _m, args, st=st: st.update(args[0])))
    return per_layer


@contextmanager
def capture_inputs(
    model: nn.Module, kinds: tuple[str, ...], gram: bool = False
) -> Iterator[list[dict[str, ColumnStats]]]:
    """Attach pre-hooks that stream o_proj / down_proj inputs into `ColumnStats`, one dict per layer."""
    handles: list = []
    stats = [_attach_stats(layer, kinds, gram, handles) for layer in decoder_layers(model)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def input_stats(
    model: nn.Module, calibration: torch.Tensor, kinds: tuple[str, ...], batch_size: int, gram: bool = False
) -> list[dict[str, ColumnStats]]:
    """One no-grad pass over `calibration`: per-layer input statistics of each kind's target linear."""
    with capture_inputs(model, kinds, gram=gram) as stats, torch.no_grad():
        for ids in micro_batches(calibration, batch_size):
            run_body(model, ids)
    return stats


@dataclass
class LayerInput:
    """One micro-batch as the decoder layers receive it.

    Attributes:
        hidden: the hidden states (B, T, d), replaced by each layer's output as the stack is walked.
        kwargs: per decoder layer, the keyword arguments the model passes it (position embeddings, attention
            mask, position ids, cache settings). They differ between layers of different types (a sliding-window
            layer's mask and rotary base are its own: Gemma, Qwen3); layers of one type share the same tensors.
    """

    hidden: torch.Tensor
    kwargs: list[dict]


class _Caught(Exception):
    """Ends a forward pass once every decoder layer's inputs are stored."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer during `first_layer_inputs`: stores what it is called with, runs nothing."""

    def __init__(self, index: int, last: bool, calls: list):
        super().__init__()
        self.index, self.last, self.calls = index, last, calls

    def forward(self, *args, **kwargs):
        assert len(args) == 1, f"expected the hidden states as the only positional argument, got {len(args)}"
        self.calls.append((self.index, args[0], dict(kwargs)))
        if self.last:
            raise _Caught
        return args[0]


@torch.no_grad()
def first_layer_inputs(model: nn.Module, calibration: torch.Tensor, batch_size: int) -> list[LayerInput]:
    """The first decoder layer's hidden states and every layer's keyword arguments, for every micro-batch of
    `calibration`; no decoder layer runs (each is swapped for a recorder for the duration)."""
    layers = getattr(model, "model", model).layers
    dense = list(layers)
    calls: list = []
    inputs: list[LayerInput] = []
    try:
        for i in range(len(dense)):
            layers[i] = _Recorder(i, i == len(dense) - 1, calls)
        for ids in micro_batches(calibration, batch_size):
            calls.clear()
            with suppress(_Caught):
                run_body(model, ids)
            assert [i for i, _, _ in calls] == list(range(len(dense))), "the model skipped or repeated a layer"
            inputs.append(LayerInput(calls[0][1], [kwargs for _, _, kwargs in calls]))
    finally:
        for i, layer in enumerate(dense):
            layers[i] = layer
    return inputs


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput], index: int) -> None:
    """Run decoder layer `index` on every stored micro-batch, replacing its hidden states by the layer's output.

    In place, so that walking the stack holds one copy of the hidden states (N·T·d) at a time.
    """
    for x in inputs:
        x.hidden = layer(x.hidden, **x.kwargs[index])  # (B, T, d)


def layerwise_stats(
    model: nn.Module,
    calibration: torch.Tensor,
    kinds: tuple[str, ...],
    batch_size: int,
    *,
    gram: bool = False,
    layers: Collection[int] | None = None,
) -> Iterator[tuple[int, dict[str, ColumnStats]]]:
    """`input_stats` one decoder layer at a time: the dense stack walked layer by layer on cached hidden states.

    Yields (layer index, kind -> `ColumnStats`) for each of `layers` (default: all) in ascending order, each
    taken as `input_stats` takes it (the dense model's inputs, the same micro-batches). The layers before the
    first requested one still run; none after the last does. Memory: one copy of the hidden states and one
    layer's statistics, provided the caller drops the yielded statistics before asking for the next layer.
    """
    stack = decoder_layers(model)
    wanted = set(range(len(stack)) if layers is None else layers)
    inputs = first_layer_inputs(model, calibration, batch_size)
    for i, layer in enumerate(stack[: max(wanted, default=-1) + 1]):
        handles: list = []
        stats = _attach_stats(layer, kinds, gram, handles) if i in wanted else None
        try:
            run_layer(layer, inputs, i)
        finally:
            for h in handles:
                h.remove()
        if stats is not None:
            yield i, stats
        del stats
