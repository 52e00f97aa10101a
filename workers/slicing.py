"""Physical structured slicing of the supported model families (`workers.families`), and the same cut applied as
masks.

Units. An attention unit is one KV group (`kv_group`): its key and value heads and the `num_attention_heads /
num_key_value_heads` query heads that read them. Cutting whole groups keeps `num_key_value_groups` valid, and the
installed attention reshapes with `-1` heads, so a sliced layer needs no config change. With `q_head` units (DarwinLM's
`kv_ignore`) an attention unit is one query head: its q_proj rows and o_proj columns go, every K/V head stays, and
the layer's attention becomes a `QueryHeadAttention` that pairs each kept query head with its KV head. An MLP channel
is one row of gate_proj and up_proj and the matching column of down_proj; in a mixture-of-experts layer the MLP unit
is an expert, a block of such channels with its router row (`workers.families.moe`). A sub-block that keeps no
unit is replaced
by a module that returns its output bias (zeros without one), which is what the masked model computes too. The
stand-ins for a removed sub-block live in `workers.pruned_hf.pruned_layers`, beside the exported models' code;
`QueryHeadAttention` in `workers.sliced_modules`. `save_pruned` writes a directory stock transformers loads.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from darwinfront.core.errors import InvalidSpec
from workers import families
from workers.families import Shape
from workers.pruned_hf.pruned_layers import ImplantAttention, ImplantMLP, NoAttention, NoMLP
from workers.sliced_modules import QueryHeadAttention


@dataclass(frozen=True)
class LayerLayout:
    """The units one decoder layer keeps: attention-unit indices (KV groups or query heads) and MLP units
    (channels, or experts in a mixture-of-experts layer: `Layout.mlp_unit`).

    `implants` holds (kind, rank) for a sub-layer ("attn" / "mlp") replaced by a HAP neural implant, a rank-r
    linear map of its input (`workers.implants`); such a sub-layer keeps no unit of its own.
    """

    attn_units: tuple[int, ...]
    mlp_channels: tuple[int, ...]
    implants: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn_units", tuple(sorted(int(u) for u in self.attn_units)))
        object.__setattr__(self, "mlp_channels", tuple(sorted(int(c) for c in self.mlp_channels)))
        object.__setattr__(self, "implants", tuple(sorted((str(k), int(r)) for k, r in self.implants)))

    def implant_rank(self, kind: str) -> int:
        """The rank of `kind`'s implant, 0 when the sub-layer is not one."""
        return dict(self.implants).get(kind, 0)

    def to_dict(self) -> dict:
        out = {"attn_units": list(self.attn_units), "mlp_channels": list(self.mlp_channels)}
        if self.implants:  # only implanted layers carry the key: older documents stay as they were
            out["implants"] = dict(self.implants)
        return out


ATTENTION_UNITS = ("kv_group", "q_head")
MLP_UNITS = ("channel", "expert")


@dataclass(frozen=True)
class Layout:
    """What a sliced model keeps, layer by layer; indices refer to the dense model's units.

    `attention_unit` says what `attn_units` index: KV groups ("kv_group") or query heads ("q_head");
    `mlp_unit` what `mlp_channels` index: channels ("channel") or the experts of a mixture-of-experts model
    ("expert"; a document says so, one of channels does not name it).
    """

    layers: tuple[LayerLayout, ...]
    attention_unit: str = "kv_group"
    mlp_unit: str = "channel"

    def __post_init__(self) -> None:
        if self.attention_unit not in ATTENTION_UNITS:
            raise InvalidSpec("layout.attention_unit", f"{self.attention_unit!r} is not one of {ATTENTION_UNITS}")
        if self.mlp_unit not in MLP_UNITS:
            raise InvalidSpec("layout.mlp_unit", f"{self.mlp_unit!r} is not one of {MLP_UNITS}")

    def to_dict(self) -> dict:
        out = {"attention_unit": self.attention_unit, "layers": [layer.to_dict() for layer in self.layers]}
        if self.mlp_unit != "channel":
            out["mlp_unit"] = self.mlp_unit
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        """Read a layout document; one without `attention_unit` (written before query heads) means KV groups."""
        try:
            layers = tuple(LayerLayout(tuple(d["attn_units"]), tuple(d["mlp_channels"]),
                                       tuple(dict(d.get("implants") or {}).items())) for d in data["layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidSpec("layout", f"not a layout document: {e!r}") from e
        return cls(layers=layers, attention_unit=data.get("attention_unit", "kv_group"),
                   mlp_unit=data.get("mlp_unit", "channel"))


Dims = Shape  # the dense shape slicing reads, from the model's family adapter (`workers.families`)


def dims(model: nn.Module) -> Dims:
    """The dense dimensions of `model` (its family's reading of its config and first layer)."""
    return families.shape(model)


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def unit_params(d: Dims, attention_unit: str = "kv_group") -> tuple[int, int]:
    """Parameters of one attention unit (a KV group or a query head) and of one MLP unit (a channel, or an expert
    with its router row), biases included."""
    q_width = d.head_dim if attention_unit == "q_head" else d.group * d.head_dim
    norm = 1 if d.projection_norms else 0  # the unit's rows of a whole-projection q/k norm (OLMo 2)
    attn_unit = 2 * d.hidden * q_width + (q_width if d.attn_bias else 0) + norm * q_width  # q rows (+ bias), o
    if attention_unit != "q_head":
        attn_unit += 2 * (d.hidden + (1 if d.attn_bias else 0)) * d.head_dim + norm * d.head_dim  # k and v rows
    rows = 2 if d.gated else 1  # gate and up rows, or up rows alone (GPT-NeoX), each with its bias where any
    channel = (rows + 1) * d.hidden + (rows if d.mlp_bias else 0)  # ... and a down column
    if d.experts:
        return attn_unit, d.mlp_width * channel + d.hidden  # an expert's channels and its router row
    return attn_unit, channel


def shared_attention_params(d: Dims, attention_unit: str = "kv_group") -> int:
    """Attention parameters outside every unit, freed only with the whole attention: its own norms (Qwen3 and
    Gemma 3's per-head q/k norms), and the K/V heads under `q_head` (with their k-norm rows, OLMo 2)."""
    if attention_unit != "q_head":
        return d.attn_extra_params
    kv_row = 2 * (d.hidden + (1 if d.attn_bias else 0)) + (1 if d.projection_norms else 0)
    return d.attn_extra_params + kv_row * d.n_kv * d.head_dim


def dense_layout(model: nn.Module, attention_unit: str = "kv_group") -> Layout:
    """The layout that keeps every unit of `model`."""
    d = dims(model)
    attn = tuple(range(d.attn_units(attention_unit)))
    mlp = tuple(range(d.mlp_units))
    return Layout(tuple(LayerLayout(attn, mlp) for _ in range(d.n_layers)), attention_unit, d.mlp_unit)


def slice_model(model: nn.Module, layout: Layout) -> nn.Module:
    """Cut `model` to `layout` in place: smaller nn.Linear layers, empty sub-blocks for layers that keep nothing.

    The layout is recorded in `model.config.darwinfront_layout`, which `save_pruned` / `load_pruned` rely on.
    Returns the same model object.
    """
    _require_dense(model)
    family = families.family_of(model)
    d = family.shape(model)
    _check_layout(layout, d)
    for i, (layer, keep) in enumerate(zip(family.layers(model), layout.layers, strict=True)):
        _slice_attention(layer, i, keep.attn_units, d, layout.attention_unit, family)
        _slice_mlp(layer, keep.mlp_channels, d)
        _install_implants(layer, i, keep, d)
    model.config.darwinfront_layout = layout.to_dict()
    return model


@contextlib.contextmanager
def masked(model: nn.Module, layout: Layout) -> Iterator[nn.Module]:
    """Apply `layout` as masks for the duration of the block, without copying weights.

    Forward pre-hooks zero the inputs of o_proj (per head dimension of every dropped query head, or of every
    dropped KV group's query heads) and of down_proj (per dropped channel); the hooks are removed on exit. A
    mixture-of-experts layer's router never picks a dropped expert instead (its logit is -inf: what routing among
    the kept experts alone computes), and one that keeps no expert has its down_proj input zeroed. Where
    the q/k norms span the whole projection (OLMo 2), they are swapped for the block for norms whose statistic
    runs over the kept rows only, as the sliced model's do.
    """
    _require_dense(model)
    d = dims(model)
    _check_layout(layout, d)
    n_attn = d.attn_units(layout.attention_unit)
    width = d.n_heads * d.head_dim // n_attn  # o_proj columns per attention unit
    handles, swaps = [], contextlib.ExitStack()
    try:
        for layer, keep in zip(families.family_of(model).layers(model), layout.layers, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            head_mask = _mask(n_attn, keep.attn_units, attn.o_proj.weight).repeat_interleave(width)
            handles.append(attn.o_proj.register_forward_pre_hook(_multiply_input(head_mask)))
            unit_mask = _mask(d.mlp_units, keep.mlp_channels, mlp.down_proj.weight)
            if d.experts and keep.mlp_channels:
                swaps.enter_context(_expert_mask(mlp, unit_mask))
            else:
                channel_mask = unit_mask.repeat_interleave(d.mlp_width)
                handles.append(mlp.down_proj.register_forward_pre_hook(_multiply_input(channel_mask)))
            if d.projection_norms and keep.attn_units:  # (an attention that keeps nothing is zeroed whole)
                kv_mask = (None if layout.attention_unit == "q_head" else
                           _mask(d.n_kv, keep.attn_units, attn.o_proj.weight).repeat_interleave(d.head_dim))
                swaps.enter_context(kept_rows_norms(attn, head_mask, kv_mask))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        swaps.close()


def add_output_shift(layer: nn.Module, kind: str, shift: torch.Tensor) -> None:
    """Add the constant `shift` (hidden,) to the output of a cut layer's o_proj ("attn") / down_proj ("mlp"), or
    of the stand-in of a sub-block that keeps no unit (FLAP's bias compensation of the removed units).

    It joins the linear's bias where there is one. A linear without one gets it as a buffer named `bias` (what
    `nn.Linear` adds to its output): saved with the model, not among its parameters, since a candidate's
    parameters are those of its structure (what the search budgets).
    """
    block = layer.self_attn if kind == "attn" else layer.mlp
    if getattr(block, "darwinfront_empty", False):
        module, name = block, "o_bias" if kind == "attn" else "down_bias"
    else:
        module, name = (block.o_proj if kind == "attn" else block.down_proj), "bias"
    current = getattr(module, name)
    if current is not None:
        with torch.no_grad():
            current.add_(shift.to(current))
        return
    like = next(block.parameters(), None)
    delattr(module, name)  # an unset bias (None) makes way for the buffer
    module.register_buffer(name, shift.detach().to(like if like is not None else shift).clone())


def cut_further(model: nn.Module, drops: dict[tuple[int, str], list[int]]) -> nn.Module:
    """Cut more units out of a sliced model in place: (layer, kind) -> indices of its current units (MLP channels,
    or KV groups of a regularly grouped attention) to remove; `config.darwinfront_layout` follows.

    A sub-layer left with no unit becomes the stand-in for a removed one (its output bias kept). Used after
    SeReNe's training (`workers.serene`) to remove the units it drove down.
    """
    layout = Layout.from_dict(model.config.darwinfront_layout)
    if drops and any(kind == "attn" for _, kind in drops) and layout.attention_unit != "kv_group":
        raise InvalidSpec("layout.attention_unit", "only KV-group attention units can be cut further")
    layers = list(layout.layers)
    for (i, kind), gone in sorted(drops.items()):
        layer, dense = model.model.layers[i], layers[i]
        units = dense.attn_units if kind == "attn" else dense.mlp_channels
        keep = [j for j in range(len(units)) if j not in set(gone)]
        if kind == "mlp":
            _cut_mlp(layer, keep)
            layers[i] = LayerLayout(dense.attn_units, tuple(units[j] for j in keep), dense.implants)
        else:
            _cut_groups(layer, i, keep)
            layers[i] = LayerLayout(tuple(units[j] for j in keep), dense.mlp_channels, dense.implants)
    model.config.darwinfront_layout = Layout(tuple(layers), layout.attention_unit, layout.mlp_unit).to_dict()
    return model


def _cut_mlp(layer: nn.Module, keep: list[int]) -> None:
    mlp = layer.mlp
    if not keep:
        layer.mlp = NoMLP(mlp.down_proj.out_features, None)
        _carry_bias(mlp.down_proj, layer.mlp, "down_bias")
        return
    _keep_mlp_units(mlp, keep, getattr(mlp, "expert_width", 0))


def _cut_groups(layer: nn.Module, index: int, keep: list[int]) -> None:
    attn = layer.self_attn
    if not keep:
        layer.self_attn = NoAttention(index, attn.o_proj.out_features, None)
        _carry_bias(attn.o_proj, layer.self_attn, "o_bias")
        return
    h, device = attn.head_dim, attn.o_proj.weight.device
    width = attn.q_proj.out_features // (attn.k_proj.out_features // h)  # query rows per KV group
    q_rows, kv_rows = _spans(tuple(keep), width, device), _spans(tuple(keep), h, device)
    _take_norm_rows(attn, "q_norm", q_rows, attn.q_proj.out_features)
    _take_norm_rows(attn, "k_norm", kv_rows, attn.k_proj.out_features)
    attn.q_proj, attn.o_proj = _take(attn.q_proj, q_rows, dim=0), _keep_bias_kind(attn.o_proj,
                                                                                  _take(attn.o_proj, q_rows, dim=1))
    attn.k_proj, attn.v_proj = _take(attn.k_proj, kv_rows, dim=0), _take(attn.v_proj, kv_rows, dim=0)


def _keep_bias_kind(old: nn.Linear, new: nn.Linear) -> nn.Linear:
    """Keep an output bias that was a buffer (a compensation shift, not a parameter) a buffer after `_take`."""
    if old.bias is not None and "bias" in old._buffers:
        del new.bias
        new.register_buffer("bias", old.bias.detach().clone())
    return new


def _carry_bias(linear: nn.Linear, stand_in: nn.Module, name: str) -> None:
    """Give a removed sub-layer's stand-in the output bias of its last linear, as the same kind of tensor."""
    if linear.bias is None:
        return
    delattr(stand_in, name)
    if "bias" in linear._buffers:
        stand_in.register_buffer(name, linear.bias.detach().clone())
    else:
        setattr(stand_in, name, nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad))


def save_pruned(model: nn.Module, tokenizer, path: str | Path, *, dtype: torch.dtype | None = None,
                card: dict | None = None, extra: dict[str, str] | None = None, archive: str | None = None) -> Path:
    """Save a sliced model to `path` so that it loads without darwinfront (`workers.pruned_hf`): safetensors, its
    tokenizer, the pruned config (per-layer shapes, `darwinfront_layout`, `auto_map`) and the modeling code; with
    `card` (the configuration document) its model card, with `extra` more text files (name -> text).

    `dtype` (default: the model's) is what the floating-point weights are written in; the model itself is not
    cast (a candidate shares tensors with its dense model), only the saved copy, one tensor at a time. With
    `archive`, the directory is written as `path/<archive>.tar` instead (see `export.save`). Returns the folder
    or the archive.
    """
    from workers.pruned_hf import export

    if not getattr(model.config, "darwinfront_layout", None):
        raise InvalidSpec("model", "save_pruned expects a model cut by slice_model (no darwinfront_layout)")
    return export.save(model, tokenizer, Path(path), dtype=dtype, card=card, extra=extra, archive=archive)


def load_pruned(path: str | Path, *, dtype=torch.float32, device="cpu") -> tuple[nn.Module, object]:
    """Load a directory written by `save_pruned`, with darwinfront's copy of the code the directory carries
    (`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` gives the same model elsewhere)."""
    from transformers import AutoTokenizer

    from workers.pruned_hf import export

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never the directory's code
    return export.load(Path(path), dtype=dtype, device=device), tokenizer


def apply_configuration(model: nn.Module, config: dict) -> nn.Module:
    """Slice a dense model to a downloaded configuration document, checking it fits first.

    Args:
        model: the dense model the configuration was searched on.
        config: `{"attention_unit": "kv_group" | "q_head", "layers": [{"attn_units": [...], "mlp_channels": [...]},
            ...], "parameters": int, ...}`; without `attention_unit`, units are KV groups.

    Raises:
        InvalidSpec: when the layer count, unit indices or the resulting parameter count do not match.
    """
    if not isinstance(config, dict) or "layers" not in config or "parameters" not in config:
        raise InvalidSpec("configuration", "expected a document with 'layers' and 'parameters'")
    _require_dense(model)
    layout = Layout.from_dict(config)
    _check_layout(layout, dims(model), field="configuration")
    slice_model(model, layout)
    got = count_parameters(model)
    if got != int(config["parameters"]):
        raise InvalidSpec(
            "configuration.parameters",
            f"the sliced model has {got} parameters, the configuration says {config['parameters']}: "
            "it was made for a different model",
        )
    return model


def _check_layout(layout: Layout, d: Dims, field: str = "layout") -> None:
    if len(layout.layers) != d.n_layers:
        raise InvalidSpec(field, f"{len(layout.layers)} layers given, the model has {d.n_layers}")
    if layout.mlp_unit != d.mlp_unit:
        raise InvalidSpec(f"{field}.mlp_unit", f"the layout's MLP units are {layout.mlp_unit}s, the model's are "
                          f"{d.mlp_unit}s: it was made for a different model")
    limits = {"attn_units": d.attn_units(layout.attention_unit), "mlp_channels": d.mlp_units}
    for i, layer in enumerate(layout.layers):
        for name, limit in limits.items():
            units = getattr(layer, name)
            if len(set(units)) != len(units) or any(not 0 <= u < limit for u in units):
                raise InvalidSpec(f"{field}.layers[{i}].{name}", f"indices must be distinct and in 0..{limit - 1}")
        for kind, rank in layer.implants:
            kept = layer.attn_units if kind == "attn" else layer.mlp_channels
            if kind not in ("attn", "mlp") or not 1 <= rank <= d.hidden or kept:
                raise InvalidSpec(f"{field}.layers[{i}].implants", f"{kind}: {rank} needs kind attn or mlp, a rank "
                                  f"in 1..{d.hidden} and no unit of its own kept")


def _require_dense(model: nn.Module) -> None:
    if getattr(model.config, "darwinfront_layout", None):
        raise InvalidSpec("model", "the model is already sliced; slice or mask only a dense model")


def _slice_attention(layer: nn.Module, index: int, units: tuple[int, ...], d: Dims, unit: str,
                     family: families.Family) -> None:
    """Keep `units` (KV groups, or query heads with every K/V head) of one layer's attention."""
    attn = layer.self_attn
    if not units:
        layer.self_attn = NoAttention(index, d.hidden, attn.o_proj.bias)
        return
    if len(units) == d.attn_units(unit):
        return
    device = attn.o_proj.weight.device
    q_rows = _spans(units, d.head_dim if unit == "q_head" else d.group * d.head_dim, device)
    attn.q_proj = _take(attn.q_proj, q_rows, dim=0)
    attn.o_proj = _take(attn.o_proj, q_rows, dim=1)
    _take_norm_rows(attn, "q_norm", q_rows, d.n_heads * d.head_dim)
    if unit == "q_head":
        layer.self_attn = QueryHeadAttention(attn, units, d.group, family)
        return
    kv_rows = _spans(units, d.head_dim, device)
    attn.k_proj = _take(attn.k_proj, kv_rows, dim=0)
    attn.v_proj = _take(attn.v_proj, kv_rows, dim=0)
    _take_norm_rows(attn, "k_norm", kv_rows, d.n_kv * d.head_dim)


def _slice_mlp(layer: nn.Module, units: tuple[int, ...], d: Dims) -> None:
    """Keep `units` (channels, or experts) of one layer's MLP."""
    mlp = layer.mlp
    if not units:
        layer.mlp = NoMLP(d.hidden, mlp.down_proj.bias)
        return
    if len(units) == d.mlp_units:
        return
    _keep_mlp_units(mlp, list(units), d.mlp_width if d.experts else 0)


def _keep_mlp_units(mlp: nn.Module, keep: list[int], expert_width: int) -> None:
    """Keep the MLP units `keep` of `mlp`: channels, or with `expert_width` the experts (blocks of that many
    channels) and their router rows."""
    device = mlp.down_proj.weight.device
    idx = torch.tensor(keep, dtype=torch.long, device=device)
    if expert_width:
        mlp.router = _take(mlp.router, idx, dim=0)
        mlp.num_experts = len(keep)
        idx = _spans(tuple(keep), expert_width, device)
    if hasattr(mlp, "gate_proj"):  # (a non-gated MLP has none: GPT-NeoX)
        mlp.gate_proj = _take(mlp.gate_proj, idx, dim=0)
    mlp.up_proj = _take(mlp.up_proj, idx, dim=0)
    mlp.down_proj = _keep_bias_kind(mlp.down_proj, _take(mlp.down_proj, idx, dim=1))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(idx)


def _install_implants(layer: nn.Module, index: int, keep: LayerLayout, d: Dims) -> None:
    """Replace each implanted sub-layer (already cut to nothing) by a zero implant of its rank, in the dtype and on
    the device of the layer's norm; `workers.implants` fills in the fitted weights."""
    like = next(layer.parameters())  # (a norm's weight, in every family)
    if keep.implant_rank("attn"):
        bias = getattr(layer.self_attn, "o_bias", None)
        layer.self_attn = ImplantAttention(index, d.hidden, keep.implant_rank("attn"), bias, like=like)
    if keep.implant_rank("mlp"):
        layer.mlp = ImplantMLP(d.hidden, keep.implant_rank("mlp"), getattr(layer.mlp, "down_bias", None), like=like)


def _spans(units: tuple[int, ...], width: int, device) -> torch.Tensor:
    """Row indices of whole blocks of `width` rows: units (1, 3), width 2 -> [2, 3, 6, 7]."""
    base = torch.tensor(units, dtype=torch.long, device=device) * width
    return (base[:, None] + torch.arange(width, device=device)[None, :]).reshape(-1)


def _take(linear: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A new nn.Linear holding rows (dim 0: outputs) or columns (dim 1: inputs) `idx` of `linear`."""
    weight = linear.weight.detach().index_select(dim, idx).contiguous()
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, idx).contiguous()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return new


def _take_norm_rows(attn: nn.Module, name: str, rows: torch.Tensor, width: int) -> None:
    """Keep `rows` of the weight of `attn`'s q/k norm `name` where it spans the whole projection of `width` rows
    (OLMo 2). A per-head norm (one head_dim weight every head shares: Qwen3, Gemma 3) stays as it is; it has
    `width` entries only over a single head, whose rows are then all kept or the attention is gone."""
    norm = getattr(attn, name, None)
    if norm is None or norm.weight.numel() != width:
        return
    new = copy.copy(norm)  # the norm's settings (eps), a weight of its own
    new._parameters = {"weight": nn.Parameter(norm.weight.detach().index_select(0, rows).contiguous(),
                                              requires_grad=norm.weight.requires_grad)}
    setattr(attn, name, new)


def copy_linear(linear: nn.Linear) -> nn.Linear:
    """A new nn.Linear holding copies of `linear`'s weight and bias (every row kept)."""
    return _take(linear, torch.arange(linear.out_features, device=linear.weight.device), dim=0)


@contextlib.contextmanager
def kept_rows_norms(attention: nn.Module, q_keep: torch.Tensor, kv_keep: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `attention`'s whole-projection q/k norms (OLMo 2) take their statistic over the rows
    `q_keep` / `kv_keep` mark (1 kept, 0 dropped; None: every key row), as the sliced attention's norms do."""
    before = {name: getattr(attention, name) for name, keep in (("q_norm", q_keep), ("k_norm", kv_keep))
              if keep is not None}
    try:
        for name, keep in (("q_norm", q_keep), ("k_norm", kv_keep)):
            if keep is not None:
                setattr(attention, name, KeptRowsNorm(before[name], keep))
        yield
    finally:
        for name, norm in before.items():
            setattr(attention, name, norm)


class KeptRowsNorm(nn.Module):
    """A whole-projection RMS norm (OLMo 2's q/k norm) whose statistic runs over the rows `keep` marks (1 kept,
    0 dropped): on the kept rows, what the sliced model's norm over those rows alone computes."""

    def __init__(self, norm: nn.Module, keep: torch.Tensor):
        super().__init__()
        self.norm, self.keep = norm, keep.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        variance = (wide.pow(2) * self.keep).sum(-1, keepdim=True) / self.keep.sum()
        return (self.norm.weight * (wide * torch.rsqrt(variance + self.norm.variance_epsilon))).to(x.dtype)


@contextlib.contextmanager
def _expert_mask(mlp: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Within the block, the router of mixture-of-experts `mlp` never picks the experts `keep` marks 0."""
    mlp.expert_mask = torch.zeros_like(keep, dtype=torch.float32).masked_fill(keep == 0, float("-inf"))
    try:
        yield
    finally:
        mlp.expert_mask = None


def _mask(n: int, keep: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(n, dtype=like.dtype, device=like.device)
    mask[list(keep)] = 1
    return mask


def _multiply_input(mask: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * mask, *args[1:])

    return hook
