"""The joint compression space: per-layer pruning levels and per-group K/V bit pairs in one genome, and the exact
inference memory a genome needs at a deployment point.

A `JointGenome` holds a `PruneGenome`'s levels (`attn`, `mlp`) and one candidate index per KV group of a
`KVSpace` (KVTuner's pruned pair lists and layer groups, computed on the dense model). `JointSpace.memory` is
what a deployment holds: the sliced model's parameters at the weight dtype, plus the packed KV cache of `batch`
sequences of `context` tokens as `workers.kv.cache` stores it: per K and V stream of every layer, the codes
(whole bytes per token and head), the fp16 scale and zero of every group and the full-precision residual window,
for the K/V heads the layer keeps after pruning. A layer whose attention is cut away writes a one-wide
full-precision placeholder (`NoAttention`), counted too. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from darwinfront.core.errors import InvalidSpec
from search.genome import LevelSpace, PruneGenome
from search.kv_space import KVSpace, Pair

SCALE_BYTES = 2  # fp16 scale and zero point per quantization group (workers.kv.quant)
PLACEHOLDER = (16, 16)  # the pair of a layer with no attention: its cache holds the placeholder unquantized


@dataclass(frozen=True)
class Deployment:
    """Where the model runs: `batch` sequences of `context` tokens, weights and K/V activations in a dtype of
    `dtype_bytes` bytes per element."""

    batch: int
    context: int
    dtype_bytes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CacheGeometry:
    """The dense model's K/V heads and how the cache quantizes them (defaults already resolved).

    Attributes:
        kv_heads: K/V heads per dense layer.
        head_dim: channels per head.
        heads_per_level: K/V heads one attention level removes (0 under query-head units: they go only with the
            whole attention, at the top level).
        mode: "per_token" or "kivi".
        token_group: channels per group of the per-token quantizer (values, and keys per-token).
        key_group: tokens per key group in KIVI mode (unused per-token).
        residual: the full-precision window in tokens.
    """

    kv_heads: int
    head_dim: int
    heads_per_level: int
    mode: str
    token_group: int
    key_group: int
    residual: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class JointGenome:
    """Levels removed per layer (`attn`, `mlp`) and the KV candidate index of every group (`kv`)."""

    attn: tuple[int, ...]
    mlp: tuple[int, ...]
    kv: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("attn", "mlp", "kv"):
            object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))

    @property
    def prune(self) -> PruneGenome:
        return PruneGenome(attn=self.attn, mlp=self.mlp)

    def key(self) -> str:
        return self.prune.key() + "-k" + ".".join(map(str, self.kv))

    def to_dict(self) -> dict:
        return {"attn": list(self.attn), "mlp": list(self.mlp), "kv": list(self.kv)}

    @classmethod
    def from_dict(cls, data: dict) -> JointGenome:
        return cls(attn=tuple(data["attn"]), mlp=tuple(data["mlp"]), kv=tuple(data["kv"]))


@dataclass(frozen=True)
class JointSpace:
    """Levels, KV groups, the cache geometry and the deployment point of one joint job."""

    levels: LevelSpace
    kv: KVSpace
    cache: CacheGeometry
    deployment: Deployment

    def __post_init__(self) -> None:
        if self.levels.n_layers != self.kv.num_layers:
            raise InvalidSpec("kv", f"{self.kv.num_layers} KV layers for {self.levels.n_layers} decoder layers")

    def check(self, genome: JointGenome) -> None:
        """Raise `InvalidSpec` unless `genome` fits this space."""
        self.levels.check(genome.prune)
        if len(genome.kv) != len(self.kv.groups):
            raise InvalidSpec("genome.kv", f"{len(genome.kv)} choices for {len(self.kv.groups)} KV groups")
        for i, (choice, group) in enumerate(zip(genome.kv, self.kv.groups, strict=True)):
            if not 0 <= choice < len(group.candidates):
                raise InvalidSpec(f"genome.kv[{i}]", f"index {choice} outside 0..{len(group.candidates) - 1}")

    def kept_heads(self, attn_level: int) -> int:
        """K/V heads a layer keeps at attention level `attn_level` (0: the attention is gone)."""
        if attn_level >= self.levels.attn_levels:
            return 0
        return self.cache.kv_heads - attn_level * self.cache.heads_per_level

    def pairs(self, genome: JointGenome) -> list[Pair]:
        """Per-layer (k_bits, v_bits) the cache is built with: the group's pair, 16/16 for a layer without
        attention (its placeholder is stored as it is)."""
        self.check(genome)
        layers = self.kv.expand(list(genome.kv))
        return [PLACEHOLDER if self.kept_heads(a) == 0 else (k, v) for (k, v), a in zip(layers, genome.attn,
                                                                                        strict=True)]

    def weight_bytes(self, genome: JointGenome) -> int:
        return self.levels.params(genome.prune) * self.deployment.dtype_bytes

    def cache_bytes(self, genome: JointGenome) -> int:
        """Bytes of the packed KV cache holding `batch` x `context` tokens (see the module docstring)."""
        total = 0
        for (k, v), a in zip(self.pairs(genome), genome.attn, strict=True):
            heads = self.kept_heads(a)
            width = self.cache.head_dim if heads else 1  # the placeholder is (B, 1, T, 1)
            rows = self.deployment.batch * max(heads, 1)
            total += rows * (self._stream(k, width, key=True) + self._stream(v, width, key=False))
        return total

    def memory(self, genome: JointGenome) -> int:
        """Inference memory of `genome` at the deployment point: weights plus KV cache, in bytes."""
        return self.weight_bytes(genome) + self.cache_bytes(genome)

    def _stream(self, bits: int, width: int, *, key: bool) -> int:
        """Bytes one head of one sequence spends on a K (`key`) or V stream of `context` tokens."""
        c, t, fp = self.cache, self.deployment.context, self.deployment.dtype_bytes
        if bits == 16:
            return t * width * fp
        codes_per_token = -(-width * bits // 8)
        if key and c.mode == "kivi":  # whole blocks of `residual` tokens, per-channel groups of key_group tokens
            quantized = t // c.residual * c.residual
            meta = 2 * SCALE_BYTES * (quantized // c.key_group) * width
        else:  # per token, once a token leaves the window; groups of token_group channels
            quantized = max(0, t - c.residual)
            meta = 2 * SCALE_BYTES * quantized * (width // c.token_group)
        return quantized * codes_per_token + meta + (t - quantized) * width * fp

    def uniform(self, target: float, kv_choice: Sequence[int]) -> JointGenome:
        """The uniform cut at `target` with the KV choice `kv_choice`."""
        prune = self.levels.uniform(target)
        return JointGenome(attn=prune.attn, mlp=prune.mlp, kv=tuple(kv_choice))

    def dense(self, kv_choice: Sequence[int]) -> JointGenome:
        n = self.levels.n_layers
        return JointGenome(attn=(0,) * n, mlp=(0,) * n, kv=tuple(kv_choice))

    def to_dict(self) -> dict:
        return {"levels": self.levels.to_dict(), "kv": self.kv.to_dict(), "cache": self.cache.to_dict(),
                "deployment": self.deployment.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> JointSpace:
        return cls(levels=LevelSpace.from_dict(data["levels"]), kv=KVSpace.from_dict(data["kv"]),
                   cache=CacheGeometry(**data["cache"]), deployment=Deployment(**data["deployment"]))


def kv_choice_for(space: KVSpace, layers: Sequence[Sequence[int]]) -> list[int]:
    """The group choice nearest per-layer pairs `layers` (a KV job's configuration): each group takes the candidate
    closest in (k, v) bits to its layers' pairs, summed (ties to the higher bits)."""
    choice = []
    for group in space.groups:
        def cost(pair: Pair, layers_of_group=group.layers) -> int:
            return sum(abs(pair[0] - layers[i][0]) + abs(pair[1] - layers[i][1]) for i in layers_of_group)
        choice.append(min(range(len(group.candidates)), key=lambda c, g=group: (cost(g.candidates[c]), c)))
    return choice
