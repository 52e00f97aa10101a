"""The level table: how many units one level step removes, per group, with every step of a group the same size.

Equal steps are what keep a search's parameter budget exact: a level switch moves one step from one layer to
another in the same group, and every step of the group costs the same parameters. The table also turns a
genome and the database's removal orders into the `Layout` that slicing cuts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from darwinfront.core.errors import InvalidSpec
from search.genome import LevelSpace, PruneGenome
from workers import slicing
from workers.criteria.base import UnitScores

KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class LevelTable:
    """Units per layer and units per level step, for the attention (KV groups or query heads) and MLP groups.

    Level k of a group removes `k * step` units; the top level removes `levels * step` (all of them when the
    step divides the width, which drops the whole sub-layer).
    """

    attn_units: int
    attn_step: int
    mlp_units: int
    mlp_step: int
    attention_unit: str = "kv_group"
    mlp_unit: str = "channel"  # or "expert": the MLP units of a mixture-of-experts model
    implant_ranks: tuple[tuple[str, int, int], ...] = ()  # (kind, level, rank) where a neural implant may go

    def __post_init__(self) -> None:
        object.__setattr__(self, "implant_ranks", tuple(sorted((str(k), int(lv), int(r))
                                                               for k, lv, r in self.implant_ranks)))
        if not (1 <= self.attn_step <= self.attn_units and 1 <= self.mlp_step <= self.mlp_units):
            raise InvalidSpec("prune.levels", f"bad level table {self}")
        if self.attention_unit not in slicing.ATTENTION_UNITS:
            known = ", ".join(slicing.ATTENTION_UNITS)
            raise InvalidSpec("prune.attention_unit", f"{self.attention_unit!r} is not one of {known}")

    @property
    def attn_levels(self) -> int:
        return self.attn_units // self.attn_step

    @property
    def mlp_levels(self) -> int:
        return self.mlp_units // self.mlp_step

    def units(self, kind: str) -> int:
        """Units per layer of `kind` ("attn" or "mlp")."""
        return self.attn_units if kind == "attn" else self.mlp_units

    def top(self, kind: str) -> int:
        """The highest level of `kind`."""
        return self.attn_levels if kind == "attn" else self.mlp_levels

    def removed(self, kind: str, level: int) -> int:
        """Units that level `level` of `kind` removes."""
        if not 0 <= level <= self.top(kind):
            raise InvalidSpec(f"genome.{kind}", f"level {level} outside 0..{self.top(kind)}")
        return level * (self.attn_step if kind == "attn" else self.mlp_step)

    def counts(self, kind: str) -> list[int]:
        """Removed units at every level 0..top, the snapshots a level database holds."""
        return [self.removed(kind, level) for level in range(self.top(kind) + 1)]

    def implant_rank(self, kind: str, level: int) -> int:
        """The rank of `kind`'s neural implant at `level`, 0 where the table has none."""
        return next((r for k, lv, r in self.implant_ranks if (k, lv) == (kind, level)), 0)

    def implant_levels(self, kind: str) -> tuple[int, ...]:
        return tuple(lv for k, lv, _ in self.implant_ranks if k == kind)

    def to_dict(self) -> dict:
        out = {"attn_units": self.attn_units, "attn_step": self.attn_step,
               "mlp_units": self.mlp_units, "mlp_step": self.mlp_step, "attention_unit": self.attention_unit}
        if self.mlp_unit != "channel":  # only experts are named: other databases keep their keys
            out["mlp_unit"] = self.mlp_unit
        if self.implant_ranks:  # only tables with implants carry it: other databases keep their keys
            out["implant_ranks"] = [list(x) for x in self.implant_ranks]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LevelTable:
        sizes = {k: int(data[k]) for k in ("attn_units", "attn_step", "mlp_units", "mlp_step")}
        ranks = tuple(tuple(x) for x in data.get("implant_ranks") or ())
        return cls(**sizes, attention_unit=data.get("attention_unit", "kv_group"),
                   mlp_unit=data.get("mlp_unit", "channel"), implant_ranks=ranks)


def attention_step(units: int, levels: int) -> int:
    """Attention units per level: `units / levels` when that divides evenly, else one unit per level."""
    return units // levels if levels <= units and units % levels == 0 else 1


def mlp_step(width: int, levels: int, multiple: int) -> int:
    """Channels per MLP level step: a multiple of `multiple`, as near to `width / levels` as equal steps allow.

    When `multiple` divides `width`, the step is `width / d` for the divisor d of `width / multiple` nearest
    to `levels` (ties go to more levels), so the top level removes the whole MLP. Otherwise the step is the
    multiple of `multiple` nearest to `width / levels`, and the top level leaves the remainder.
    """
    if multiple > width:
        raise InvalidSpec("prune.mlp_multiple", f"{multiple} is wider than the MLP ({width} channels)")
    if width % multiple == 0:
        blocks = width // multiple
        divisors = [d for d in range(1, blocks + 1) if blocks % d == 0]
        best = min(divisors, key=lambda d: (abs(d - levels), -d))
        return width // best
    return max(multiple, round(width / levels / multiple) * multiple)


def table_for(
    model: nn.Module, levels: int, multiple: int, attention_unit: str = "kv_group", implants: Sequence[str] = ()
) -> LevelTable:
    """The level table of a dense Llama-family model for `levels` target steps and MLP multiple `multiple`.

    `attention_unit` "kv_group" steps through KV groups, "q_head" through query heads (K/V heads kept).
    `implants` names the sub-layers ("attn", "mlp") that may become neural implants (`implant_ranks`).
    """
    d = slicing.dims(model)
    units = d.attn_units(attention_unit)
    table = LevelTable(
        attn_units=units,
        attn_step=attention_step(units, levels),
        mlp_units=d.mlp_units,
        # experts: as attention units, an even share per level or one each (no channel multiple applies)
        mlp_step=attention_step(d.experts, levels) if d.experts else mlp_step(d.intermediate, levels, multiple),
        attention_unit=attention_unit,
        mlp_unit=d.mlp_unit,
    )
    ranks = tuple((kind, level, rank) for kind in implants for level, rank in implant_ranks(d, table, kind).items())
    return LevelTable(**{**table.__dict__, "implant_ranks": ranks})


def implant_ranks(d: slicing.Dims, table: LevelTable, kind: str) -> dict[int, int]:
    """Level -> rank of the neural implant that costs exactly what `kind`'s sub-layer keeps at that level.

    An implant is a rank-r map hidden -> r -> hidden, 2·hidden·r parameters; a level gets one when what it keeps
    (its units' weights and biases, and under `q_head` the K/V heads; not the output bias, which an implant
    keeps too) is a multiple of 2·hidden with 1 <= r < hidden (a map of lower than full rank; above hidden / 2 its
    two factors hold more than one full hidden x hidden matrix would). Level 0 (dense) and the top level (nothing
    kept) never have one.
    """
    unit, channel = slicing.unit_params(d, table.attention_unit)
    shared = slicing.shared_attention_params(d, table.attention_unit)
    out = {}
    for level in range(1, table.top(kind)):
        left = table.units(kind) - table.removed(kind, level)
        params = left * unit + shared if kind == "attn" else left * channel
        rank, rest = divmod(params, 2 * d.hidden)
        if rest == 0 and 1 <= rank < d.hidden:
            out[level] = rank
    return out


def level_space(model: nn.Module, table: LevelTable) -> LevelSpace:
    """The search space of a dense model under `table`, with the exact parameter cost of each level step."""
    d = slicing.dims(model)
    units = d.attn_units(table.attention_unit)
    if (units, d.mlp_units, d.mlp_unit) != (table.attn_units, table.mlp_units, table.mlp_unit):
        raise InvalidSpec("prune.levels", f"level table {table} does not fit the model ({units}, {d.mlp_units} "
                          f"{d.mlp_unit}s)")
    unit, channel = slicing.unit_params(d, table.attention_unit)
    shared = slicing.shared_attention_params(d, table.attention_unit)
    return LevelSpace(
        n_layers=d.n_layers,
        attn_levels=table.attn_levels,
        mlp_levels=table.mlp_levels,
        attn_unit_params=table.attn_step * unit,
        mlp_level_params=table.mlp_step * channel,
        dense_params=slicing.count_parameters(model),
        # what the attention holds outside its units goes with it only when the top level removes every unit
        attn_shared_params=shared if table.removed("attn", table.attn_levels) == units else 0,
        attn_implant_levels=table.implant_levels("attn"),
        mlp_implant_levels=table.implant_levels("mlp"),
    )


def removal_order(scores: Sequence[float]) -> list[int]:
    """Units in removal order for per-unit scores (higher = keep): lowest first, the higher index first on ties.

    `layout` keeps every unit but the first ones of this order: the highest-scored, the lower index on ties.
    """
    keep_first = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return keep_first[::-1]


def removal_orders(scores: UnitScores) -> list[dict[str, list[int]]]:
    """Per layer, kind -> units in removal order (`removal_order`) of a criterion's unit scores."""
    return [{"attn": removal_order(s.attn.tolist()), "mlp": removal_order(s.mlp.tolist())} for s in scores.layers]


def layout(genome: PruneGenome, orders: Sequence[dict[str, Sequence[int]]], table: LevelTable) -> slicing.Layout:
    """The units every layer keeps: all but the first `table.removed(kind, level)` of its removal order."""
    if len(genome.attn) != len(orders) or len(genome.mlp) != len(orders):
        raise InvalidSpec("genome", f"{len(genome.attn)} layers in the genome, {len(orders)} in the database")
    layers = []
    implanted = set(genome.implants)
    for i, order in enumerate(orders):
        kept, implants = {}, []
        for kind, level in (("attn", genome.attn[i]), ("mlp", genome.mlp[i])):
            gone = set(order[kind][: table.removed(kind, level)])
            kept[kind] = tuple(u for u in range(table.units(kind)) if u not in gone)
            if (i, kind) in implanted:  # the implant replaces the whole sub-layer, at the level's cost
                if not table.implant_rank(kind, level):
                    raise InvalidSpec("genome.implants", f"layer {i} {kind} level {level} has no implant")
                kept[kind] = ()
                implants.append((kind, table.implant_rank(kind, level)))
        layers.append(slicing.LayerLayout(kept["attn"], kept["mlp"], tuple(implants)))
    return slicing.Layout(tuple(layers), table.attention_unit, table.mlp_unit)
