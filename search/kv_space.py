"""The KV-cache precision search space: per-layer (key bits, value bits) pairs, pruned and grouped (KVTuner).

From a sensitivity table (``workers.kv.profile.profile_kv``: per layer, per pair, the relative
attention-output error e_o), the space is reduced in two steps:

1. intra-layer Pareto pruning: a layer keeps only the pairs no other pair beats on both equivalent bits
   (k + v) / 2 and e_o;
2. inter-layer grouping: layers with identical candidate lists are clustered by DBSCAN on their e_o vectors
   over those candidates; DBSCAN's noise points become singleton groups.

A search then picks one candidate per group; ``KVSpace.expand`` turns that choice into per-layer pairs.
Pure Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from darwinfront.core.errors import InvalidSpec

PAIR_BITS = (2, 4, 8)
Pair = tuple[int, int]
ALL_PAIRS: tuple[Pair, ...] = tuple(
    sorted(((k, v) for k in PAIR_BITS for v in PAIR_BITS), key=lambda p: (-(p[0] + p[1]), -p[0]))
)
PRESETS: dict[str, Pair] = {"KV8": (8, 8), "K8V4": (8, 4), "KV4": (4, 4), "K4V2": (4, 2), "KV2": (2, 2)}


def pair_name(pair: Pair) -> str:
    """KVTuner's name of a pair: ``(4, 4)`` -> ``"KV4"``, ``(8, 4)`` -> ``"K8V4"``."""
    k, v = pair
    return f"KV{k}" if k == v else f"K{k}V{v}"


def equivalent_bits(pair: Pair) -> float:
    """(k + v) / 2."""
    return (pair[0] + pair[1]) / 2


def preset(name: str, num_layers: int) -> list[list[int]]:
    """A uniform config: the preset's pair on every layer (``preset("K4V2", 3)`` -> ``[[4, 2]] * 3``)."""
    if name not in PRESETS:
        raise InvalidSpec("kv.preset", f"{name!r} is not one of {sorted(PRESETS)}")
    return [list(PRESETS[name]) for _ in range(num_layers)]


def pareto_pairs(entries: Sequence[tuple[int, int, float]]) -> list[Pair]:
    """The pairs of ``(k, v, error)`` entries that no other entry dominates on (equivalent bits, error).

    Dominating means no more bits and no more error, and strictly less of one. Ties on both are all kept.
    Returned high to low bits.
    """
    kept = []
    for k, v, err in entries:
        bits = equivalent_bits((k, v))
        dominated = any(
            b2 <= bits and e2 <= err and (b2 < bits or e2 < err)
            for b2, e2 in ((equivalent_bits((k2, v2)), e) for k2, v2, e in entries)
        )
        if not dominated:
            kept.append((k, v))
    return sorted(kept, key=lambda p: (-equivalent_bits(p), -p[0]))


def dbscan(points: Sequence[Sequence[float]], eps: float, min_samples: int = 2) -> list[int]:
    """DBSCAN with Euclidean distance: a cluster label per point, -1 for noise.

    A point is a core point when at least ``min_samples`` points (itself included) lie within ``eps``;
    clusters grow from core points through their neighbourhoods; labels are numbered in order of first point.
    """
    n = len(points)
    neighbours = [[j for j in range(n) if math.dist(points[i], points[j]) <= eps] for i in range(n)]
    labels = [-1] * n
    visited = [False] * n
    cluster = 0
    for i in range(n):
        if visited[i] or len(neighbours[i]) < min_samples:
            continue
        frontier = [i]
        while frontier:
            j = frontier.pop()
            if visited[j]:
                continue
            visited[j] = True
            labels[j] = cluster
            if len(neighbours[j]) >= min_samples:  # only core points spread the cluster
                frontier.extend(m for m in neighbours[j] if not visited[m])
        cluster += 1
    return labels


@dataclass(frozen=True)
class KVGroup:
    """Layers that share one choice, and the pairs they may take (high to low bits)."""

    layers: tuple[int, ...]
    candidates: tuple[Pair, ...]


@dataclass(frozen=True)
class KVSpace:
    """Groups that partition a model's layers, each with its candidate pairs."""

    groups: tuple[KVGroup, ...]
    num_layers: int

    def __post_init__(self) -> None:
        seen = sorted(layer for g in self.groups for layer in g.layers)
        if seen != list(range(self.num_layers)):
            expected = f"0..{self.num_layers - 1}"
            raise InvalidSpec("kv.groups", f"groups must partition layers {expected}, got {seen}")
        for g in self.groups:
            if not g.candidates:
                raise InvalidSpec("kv.groups", f"group {list(g.layers)} has no candidate pair")

    def size(self) -> int:
        """Number of distinct choices (the product of the groups' candidate counts)."""
        return math.prod(len(g.candidates) for g in self.groups)

    def expand(self, choice: Sequence[int]) -> list[list[int]]:
        """Per-layer ``[k_bits, v_bits]`` for a choice of one candidate index per group."""
        if len(choice) != len(self.groups):
            raise InvalidSpec("kv.choice", f"{len(choice)} indices given for {len(self.groups)} groups")
        layers: list[list[int]] = [[]] * self.num_layers
        for i, (g, c) in enumerate(zip(self.groups, choice, strict=True)):
            if not 0 <= c < len(g.candidates):
                raise InvalidSpec(f"kv.choice[{i}]", f"index {c} outside 0..{len(g.candidates) - 1}")
            for layer in g.layers:
                layers[layer] = list(g.candidates[c])
        return layers

    def nominal_bits(self, choice: Sequence[int]) -> float:
        """KVTuner's sum(k + v) / 2L of a choice."""
        return sum(k + v for k, v in self.expand(choice)) / (2 * self.num_layers)

    def uniform_choice(self, name: str) -> list[int]:
        """The choice that puts preset ``name`` on every group (to seed a search)."""
        pair = PRESETS.get(name)
        if pair is None:
            raise InvalidSpec("kv.preset", f"{name!r} is not one of {sorted(PRESETS)}")
        missing = [list(g.layers) for g in self.groups if pair not in g.candidates]
        if missing:
            raise InvalidSpec("kv.preset", f"{name} was pruned from the candidates of layers {missing}")
        return [g.candidates.index(pair) for g in self.groups]

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers,
                "groups": [{"layers": list(g.layers), "candidates": [list(p) for p in g.candidates]}
                           for g in self.groups]}

    @classmethod
    def from_dict(cls, data: dict) -> KVSpace:
        groups = tuple(
            KVGroup(layers=tuple(g["layers"]), candidates=tuple(tuple(p) for p in g["candidates"]))
            for g in data["groups"]
        )
        return cls(groups=groups, num_layers=data["num_layers"])


def build_space(table: dict, *, eps: float = 0.05, min_samples: int = 2, metric: str = "e_o") -> KVSpace:
    """Prune, group and cluster a sensitivity table into a ``KVSpace``.

    Args:
        table: ``{"layers": [{"layer": l, "pairs": [{"k", "v", metric...}, ...]}, ...]}``, as ``profile_kv``
            returns it; every layer must be present once.
        eps: DBSCAN radius in raw ``metric`` units.
        min_samples: DBSCAN core-point size (itself included).
        metric: the error to prune and cluster on.
    """
    rows = sorted(table["layers"], key=lambda r: r["layer"])
    errors = {r["layer"]: {(p["k"], p["v"]): p[metric] for p in r["pairs"]} for r in rows}
    candidates = {layer: tuple(pareto_pairs([(k, v, e) for (k, v), e in errs.items()]))
                  for layer, errs in errors.items()}
    buckets: dict[tuple[Pair, ...], list[int]] = {}
    for layer in sorted(candidates):
        buckets.setdefault(candidates[layer], []).append(layer)
    groups = []
    for cands, layers in buckets.items():
        vectors = [[errors[layer][p] for p in cands] for layer in layers]
        labels = dbscan(vectors, eps, min_samples)
        clusters: dict[int, list[int]] = {}
        for layer, label in zip(layers, labels, strict=True):
            clusters.setdefault(label if label >= 0 else -1 - layer, []).append(layer)  # noise: its own group
        groups.extend(KVGroup(layers=tuple(ls), candidates=cands) for ls in clusters.values())
    groups.sort(key=lambda g: g.layers[0])
    return KVSpace(groups=tuple(groups), num_layers=table.get("num_layers", len(rows)))
