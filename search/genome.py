"""Per-layer level genomes for structured pruning, and the level space they live in.

A genome says, for every decoder layer, how many attention level steps (KV groups or query heads) and how many
MLP level steps (`mlp_step` channels each) are removed. All layers of a model have the same shape, so every level
step of a group costs the same number of parameters: a mutation that raises one layer and lowers another in the
same group keeps the parameter count exactly. (A layer whose attention reaches the top level also frees what
the attention holds outside its units, `attn_shared_params`: its K/V heads under query-head units, its per-head q/k
norms; moving a layer to or from the top changes the count by it.)
"""

from __future__ import annotations

from dataclasses import dataclass

from darwinfront.core.errors import InvalidSpec


@dataclass(frozen=True)
class LevelSpace:
    """The shape of a model as the search sees it.

    Attributes:
        n_layers: decoder layers.
        attn_levels: attention level steps per layer (the top level drops the attention).
        mlp_levels: MLP level steps per layer; level k removes k * mlp_step channels.
        attn_unit_params: parameters one attention level step holds (its q rows and o columns, and its k and v
            rows for KV-group units; biases included).
        mlp_level_params: parameters one MLP level step holds.
        dense_params: parameters of the whole dense model (embeddings included).
        attn_shared_params: attention parameters outside the steps, freed only at the top level (the
            attention's own norms, such as per-head q/k norms, and the K/V heads under query-head units).
    """

    n_layers: int
    attn_levels: int
    mlp_levels: int
    attn_unit_params: int
    mlp_level_params: int
    dense_params: int
    attn_shared_params: int = 0
    attn_implant_levels: tuple[int, ...] = ()
    mlp_implant_levels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.attn_levels < 1 or self.mlp_levels < 1:
            raise InvalidSpec("model", f"nothing to prune in {self}")
        object.__setattr__(self, "attn_implant_levels", tuple(sorted(int(x) for x in self.attn_implant_levels)))
        object.__setattr__(self, "mlp_implant_levels", tuple(sorted(int(x) for x in self.mlp_implant_levels)))

    def implant_levels(self, kind: str) -> tuple[int, ...]:
        """The levels of `kind` ("attn" / "mlp") at which the sub-layer may be a neural implant instead: a rank-r
        map with exactly the parameters the pruned level keeps, so choosing it never changes the count."""
        return self.attn_implant_levels if kind == "attn" else self.mlp_implant_levels

    @property
    def has_implants(self) -> bool:
        return bool(self.attn_implant_levels or self.mlp_implant_levels)

    def implant_slots(self, genome: PruneGenome) -> list[tuple[int, str]]:
        """The (layer, kind) of `genome` whose current level may be an implant."""
        return [(i, kind) for kind in ("attn", "mlp") for i, level in enumerate(getattr(genome, kind))
                if level in self.implant_levels(kind)]

    def settle(self, genome: PruneGenome) -> PruneGenome:
        """`genome` less the implants its levels no longer allow (after a level switch moved them)."""
        allowed = set(self.implant_slots(genome))
        kept = tuple(x for x in genome.implants if x in allowed)
        return genome if kept == genome.implants else PruneGenome(genome.attn, genome.mlp, kept)

    @property
    def prunable_params(self) -> int:
        """Parameters the levels can remove: every attention unit and MLP step of every layer."""
        attn = self.attn_levels * self.attn_unit_params + self.attn_shared_params
        return self.n_layers * (attn + self.mlp_levels * self.mlp_level_params)

    def params(self, genome: PruneGenome) -> int:
        """Exact parameter count of the sliced model that `genome` describes (an implant costs what its level
        keeps, so implants do not enter the sum)."""
        self.check(genome)
        removed = sum(genome.attn) * self.attn_unit_params + sum(genome.mlp) * self.mlp_level_params
        removed += sum(a == self.attn_levels for a in genome.attn) * self.attn_shared_params
        return self.dense_params - removed

    def uniform(self, target: float) -> PruneGenome:
        """The genome that removes `target` of each group's units, spread as evenly as the levels allow."""
        if not 0.0 < target < 1.0:
            raise InvalidSpec("prune.targets", f"target {target} is not in (0, 1)")
        attn_total = round(target * self.n_layers * self.attn_levels)
        mlp_total = round(target * self.n_layers * self.mlp_levels)
        return PruneGenome(attn=_spread(attn_total, self.n_layers), mlp=_spread(mlp_total, self.n_layers))

    def check(self, genome: PruneGenome) -> None:
        """Raise `InvalidSpec` unless `genome` fits this space."""
        if len(genome.attn) != self.n_layers or len(genome.mlp) != self.n_layers:
            raise InvalidSpec("genome", f"expected {self.n_layers} layers, got {len(genome.attn)}/{len(genome.mlp)}")
        if any(not 0 <= a <= self.attn_levels for a in genome.attn):
            raise InvalidSpec("genome.attn", f"levels {genome.attn} outside 0..{self.attn_levels}")
        if any(not 0 <= m <= self.mlp_levels for m in genome.mlp):
            raise InvalidSpec("genome.mlp", f"levels {genome.mlp} outside 0..{self.mlp_levels}")
        bad = set(genome.implants) - set(self.implant_slots(genome))
        if bad:
            raise InvalidSpec("genome.implants", f"{sorted(bad)}: no implant at those layers' levels "
                              f"(attn levels {self.attn_implant_levels}, mlp levels {self.mlp_implant_levels})")

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        for key in ("attn_implant_levels", "mlp_implant_levels"):  # only where there are implants
            out[key] = list(out[key])
            if not out[key]:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LevelSpace:
        return cls(**data)


@dataclass(frozen=True)
class PruneGenome:
    """Levels removed per layer: `attn[i]` attention units and `mlp[i]` MLP steps of layer i.

    `implants` lists the (layer, kind) whose sub-layer is a neural implant at its level instead of pruned
    (HAP; see `LevelSpace.implant_levels`), sorted; empty for a plain genome.
    """

    attn: tuple[int, ...]
    mlp: tuple[int, ...]
    implants: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn", tuple(int(a) for a in self.attn))
        object.__setattr__(self, "mlp", tuple(int(m) for m in self.mlp))
        implants = tuple(sorted({(int(i), str(kind)) for i, kind in self.implants}))
        if any(kind not in ("attn", "mlp") for _, kind in implants):
            raise InvalidSpec("genome.implants", f"kinds must be attn or mlp, got {implants}")
        object.__setattr__(self, "implants", implants)

    def key(self) -> str:
        """A short stable text form, used to spot duplicates (implants as `-i<layer><a|m>...`)."""
        key = "a" + ".".join(map(str, self.attn)) + "-m" + ".".join(map(str, self.mlp))
        return key + ("-i" + ".".join(f"{i}{kind[0]}" for i, kind in self.implants) if self.implants else "")

    def to_dict(self) -> dict:
        out = {"attn": list(self.attn), "mlp": list(self.mlp)}
        if self.implants:
            out["implants"] = [[i, kind] for i, kind in self.implants]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PruneGenome:
        implants = tuple((i, kind) for i, kind in data.get("implants") or ())
        return cls(attn=tuple(data["attn"]), mlp=tuple(data["mlp"]), implants=implants)


def _spread(total: int, n: int) -> tuple[int, ...]:
    base, extra = divmod(total, n)
    return tuple(base + (1 if i < extra else 0) for i in range(n))
