"""A mixed-precision KV cache: per-layer (key bits, value bits) as a transformers cache layer.

The cache is a plain transformers ``Cache`` whose layers are ``KVQuantLayer``s, one per decoder layer, each
with its own key and value bits. Two storage forms hold the same numbers:

- ``"simulated"``: quantize-dequantize, the history is kept dequantized in the model dtype (fast; for search).
- ``"packed"``: codes packed into bytes with fp16 scales and zeros (real memory savings); the history is
  dequantized at every step. Both give the same logits.

Two modes:

- ``"per_token"``: keys and values quantized per token, in groups of ``group_size`` channels (default the
  whole head_dim); the most recent ``residual`` tokens (default 0) stay in full precision.
- ``"kivi"``: keys quantized per channel in groups of ``group_size`` tokens (default 32), appended in blocks
  of ``residual`` tokens (default 32; a multiple of ``group_size``) when the full-precision residual fills;
  values quantized per token (groups of min(group_size, head_dim) channels) as they leave the ``residual``
  window.

Prefill semantics: by default the current forward attends to its own K/V in full precision and only the
stored history is quantized (serving semantics, as HF and KIVI). With ``quantize_in_forward=True`` the
current forward already sees its K/V as they are stored, so a teacher-forced objective (KL, perplexity) sees
the error.

This module and ``quant.py`` import only torch and transformers (``quant`` relatively), so the pair copies into
any package to build the cache without darwinfront: ``KVPrecisionConfig.from_kv_map`` reads the per-layer
precision map a configuration download carries (``to_kv_map`` writes it; its shape is in docs/OUTSIDE.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, DynamicLayer

from .quant import QTensor, cat_tokens, dequantize, quantize

TRANSFORMERS_RANGE = ("5.0", "5.30")  # [min, max): the layer API of 5.x; tested on 5.24
if not Version(TRANSFORMERS_RANGE[0]) <= Version(transformers.__version__) < Version(TRANSFORMERS_RANGE[1]):
    raise ImportError(
        f"workers.kv needs transformers >={TRANSFORMERS_RANGE[0]},<{TRANSFORMERS_RANGE[1]} (a cache is a "
        f"list of cache layers, with the 5.x layer signatures); found {transformers.__version__}"
    )

KV_BITS = (2, 4, 8, 16)
KV_MAP_FORMAT = "kv_precision_map/1"
MODES = ("per_token", "kivi")
STORAGES = ("simulated", "packed")
_KIVI_DEFAULT = 32


class InvalidKVConfig(ValueError):
    """A KV precision config (or the model it is for) is malformed; ``field`` names what (e.g. ``kv.layers[1]``).

    The module's own error, as it stands alone; darwinfront's ``InvalidKVConfig`` has the same message shape.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class KVPrecisionConfig:
    """Per-layer K/V precision and the quantization mode.

    Attributes:
        layers: one (k_bits, v_bits) pair per decoder layer, bits in {2, 4, 8, 16} (16 = untouched).
        mode: ``"per_token"`` or ``"kivi"``.
        group_size: channels per group per-token (None = head_dim); tokens per key group in KIVI mode
            (None = 32).
        residual: full-precision window in tokens (None = 0 per-token, 32 in KIVI mode).
    """

    layers: tuple[tuple[int, int], ...]
    mode: str = "per_token"
    group_size: int | None = None
    residual: int | None = None

    def __post_init__(self) -> None:
        layers = tuple(_pair(p, i) for i, p in enumerate(self.layers))
        if not layers:
            raise InvalidKVConfig("kv.layers", "at least one layer is needed")
        if self.mode not in MODES:
            raise InvalidKVConfig("kv.mode", f"{self.mode!r} is not one of {MODES}")
        group, residual = self.group_size, self.residual
        if self.mode == "kivi":
            group = _KIVI_DEFAULT if group is None else group
            residual = _KIVI_DEFAULT if residual is None else residual
        residual = 0 if residual is None else residual
        if group is not None and (not isinstance(group, int) or group < 1):
            raise InvalidKVConfig("kv.group_size", f"{group!r} is not a positive integer")
        if not isinstance(residual, int) or residual < 0:
            raise InvalidKVConfig("kv.residual", f"{residual!r} is not a non-negative integer")
        if self.mode == "kivi" and (residual == 0 or residual % group):
            raise InvalidKVConfig(
                "kv.residual", f"KIVI needs a positive multiple of group_size {group}, got {residual}"
            )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "group_size", group)
        object.__setattr__(self, "residual", residual)

    @classmethod
    def uniform(cls, k_bits: int, v_bits: int, num_layers: int, **kwargs) -> KVPrecisionConfig:
        """The same pair on every layer (e.g. ``uniform(4, 2, L)`` is K4V2)."""
        return cls(layers=((k_bits, v_bits),) * num_layers, **kwargs)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def token_group(self, head_dim: int) -> int:
        """Channels per group of the per-token quantizer (values in KIVI mode, K and V per-token)."""
        if self.group_size is None:
            return head_dim
        return min(self.group_size, head_dim) if self.mode == "kivi" else self.group_size

    def check_model(self, num_layers: int, head_dim: int) -> None:
        """Raise ``InvalidKVConfig`` unless this config fits a model of ``num_layers`` layers and ``head_dim``."""
        if self.num_layers != num_layers:
            raise InvalidKVConfig(
                "kv.layers", f"{self.num_layers} layer pairs given, the model has {num_layers} layers"
            )
        group = self.token_group(head_dim)
        if head_dim % group:
            raise InvalidKVConfig("kv.group_size", f"{group} does not divide head_dim {head_dim}")

    def to_dict(self) -> dict:
        return {"layers": [list(p) for p in self.layers], "mode": self.mode, "group_size": self.group_size,
                "residual": self.residual}

    @classmethod
    def from_dict(cls, data: dict) -> KVPrecisionConfig:
        """Read ``{"layers": [[k, v] | {"k": k, "v": v}, ...], "mode", "group_size", "residual"}``."""
        unknown = set(data) - {"layers", "mode", "group_size", "residual"}
        if unknown:
            raise InvalidKVConfig("kv", f"unknown fields {sorted(unknown)}")
        if "layers" not in data:
            raise InvalidKVConfig("kv.layers", "missing")
        return cls(**data)


    def to_kv_map(self, head_dim: int) -> dict:
        """The per-layer precision map serving engines read: each layer's key and value bits, group size (channels
        per group for a per-token ``axis: "token"``, tokens per group for KIVI keys' ``axis: "channel"``) and the
        full-precision ``residual`` window in tokens. 16-bit streams are unquantized (``group_size`` null)."""
        self.check_model(self.num_layers, head_dim)
        kivi = self.mode == "kivi"
        key_axis, key_group = ("channel", self.group_size) if kivi else ("token", self.token_group(head_dim))

        def stream(bits: int, axis: str, group: int) -> dict:
            return {"bits": bits, "axis": axis, "group_size": None if bits == 16 else group}

        return {"format": KV_MAP_FORMAT, "mode": self.mode, "head_dim": head_dim, "layers": [
            {"layer": i, "key": stream(k, key_axis, key_group),
             "value": stream(v, "token", self.token_group(head_dim)), "residual": self.residual}
            for i, (k, v) in enumerate(self.layers)]}

    @classmethod
    def from_kv_map(cls, kv_map: dict) -> KVPrecisionConfig:
        """Read a map written by ``to_kv_map``; one mode, group size and residual on every layer (what this cache
        implements), else ``InvalidKVConfig`` naming the layer."""
        if not isinstance(kv_map, dict) or kv_map.get("format") != KV_MAP_FORMAT:
            raise InvalidKVConfig("kv_map.format", f"expected {KV_MAP_FORMAT!r}")
        try:
            mode, head_dim, layers = kv_map["mode"], kv_map["head_dim"], kv_map["layers"]
            pairs = [(layer["key"]["bits"], layer["value"]["bits"]) for layer in layers]
        except (KeyError, TypeError) as e:
            raise InvalidKVConfig("kv_map", f"not a KV precision map: missing {e}") from None
        groups = [layer[s]["group_size"] for s in ("key", "value") for layer in layers if layer[s]["group_size"]]
        config = cls(layers=tuple(pairs), mode=mode, group_size=groups[0] if groups else None,
                     residual=layers[0].get("residual") if layers else None)
        expected = config.to_kv_map(head_dim)["layers"]
        for i, (got, want) in enumerate(zip(layers, expected, strict=True)):
            if got != want:
                raise InvalidKVConfig(f"kv_map.layers[{i}]", f"{got} differs from {want}: this cache needs one mode, "
                                      "group size and residual on every layer")
        return config


def _pair(p: object, i: int) -> tuple[int, int]:
    if isinstance(p, dict):
        p = (p.get("k"), p.get("v"))
    if not isinstance(p, Sequence) or len(p) != 2:
        raise InvalidKVConfig(f"kv.layers[{i}]", f"{p!r} is not a (k_bits, v_bits) pair")
    for name, b in zip(("k_bits", "v_bits"), p, strict=True):
        if isinstance(b, bool) or b not in KV_BITS:
            raise InvalidKVConfig(f"kv.layers[{i}]", f"{name}={b!r} is not one of {KV_BITS}")
    return int(p[0]), int(p[1])


class _Stream:
    """The keys or the values of one layer: a quantized history followed by a full-precision tail.

    ``flush="window"`` keeps the last ``residual`` tokens in the tail and quantizes older ones (per-token);
    ``flush="block"`` quantizes the tail in whole multiples of ``residual`` tokens once it holds that many
    (KIVI keys, per-channel groups of ``group`` tokens with ``residual % group == 0``).
    """

    def __init__(self, bits: int, axis: str, group: int, residual: int, flush: str, packed: bool):
        self.bits, self.axis, self.group, self.residual = bits, axis, group, residual
        self.flush, self.packed = flush, packed
        self.quant: QTensor | torch.Tensor | None = None  # packed codes, or the dequantized history
        self.tail: torch.Tensor | None = None

    @property
    def tail_len(self) -> int:
        return 0 if self.tail is None else self.tail.shape[-2]

    @property
    def seq_len(self) -> int:
        if self.quant is None:
            return self.tail_len
        return self.tail_len + (self.quant.shape[-2] if torch.is_tensor(self.quant) else self.quant.seq_len)

    def append(self, x: torch.Tensor) -> None:
        self.tail = x if self.tail is None else torch.cat([self.tail, x], dim=-2)
        n = self._n_to_flush(self.tail.shape[-2])
        if n:
            self._push(self.tail[..., :n, :])
            rest = self.tail[..., n:, :]
            self.tail = rest.clone() if rest.shape[-2] else None  # a view would keep the flushed tokens alive

    def _n_to_flush(self, held: int) -> int:
        if self.bits == 16:
            return 0
        if self.flush == "window":
            return max(0, held - self.residual)
        return held // self.residual * self.residual  # whole blocks; held == residual flushes too

    def _push(self, x: torch.Tensor) -> None:
        q = quantize(x, self.bits, axis=self.axis, group=self.group)
        if self.packed:
            q = q.pack()
            self.quant = q if self.quant is None else cat_tokens([self.quant, q])
        else:
            xh = dequantize(q, x.dtype)
            self.quant = xh if self.quant is None else torch.cat([self.quant, xh], dim=-2)

    def materialize(self, like: torch.Tensor) -> torch.Tensor:
        """The whole stream as a (B, H, T, D) tensor in ``like``'s dtype (T may be 0)."""
        parts = []
        if self.quant is not None:
            parts.append(dequantize(self.quant, like.dtype) if self.packed else self.quant)
        if self.tail is not None:
            parts.append(self.tail)
        if not parts:
            return like[..., :0, :]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def nbytes(self) -> int:
        """Bytes of the storage held (a view would keep its whole base tensor alive, so storages count)."""
        held = [] if self.tail is None else [self.tail]
        if self.quant is not None:
            held += [self.quant.codes, self.quant.scale, self.quant.zero] if self.packed else [self.quant]
        return sum(t.untyped_storage().nbytes() for t in held)

    def apply(self, fn) -> None:
        if self.tail is not None:
            self.tail = fn(self.tail)
        if self.quant is not None:
            self.quant = self.quant.apply(fn) if self.packed else fn(self.quant)


class KVQuantLayer(DynamicLayer):
    """One decoder layer's cache with its own key and value bits (see the module docstring)."""

    is_croppable = False

    def __init__(self, k_bits: int, v_bits: int, *, mode: str = "per_token", token_group: int,
                 key_group: int | None = None, residual: int = 0, storage: str = "packed",
                 quantize_in_forward: bool = False):
        super().__init__()
        if storage not in STORAGES:
            raise InvalidKVConfig("storage", f"{storage!r} is not one of {STORAGES}")
        self.k_bits, self.v_bits, self.mode, self.storage = k_bits, v_bits, mode, storage
        self.token_group, self.key_group, self.residual = token_group, key_group, residual
        self.quantize_in_forward = quantize_in_forward
        self._new_streams()

    def _new_streams(self) -> None:
        packed = self.storage == "packed"
        if self.mode == "kivi":
            self._k = _Stream(self.k_bits, "channel", self.key_group, self.residual, "block", packed)
        else:
            self._k = _Stream(self.k_bits, "token", self.token_group, self.residual, "window", packed)
        self._v = _Stream(self.v_bits, "token", self.token_group, self.residual, "window", packed)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new (B, H, t, D) K/V and return the (B, H, T, D) K/V attention should use."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.quantize_in_forward:
            self._k.append(key_states)
            self._v.append(value_states)
            return self._k.materialize(key_states), self._v.materialize(value_states)
        keys = torch.cat([self._k.materialize(key_states), key_states], dim=-2)
        values = torch.cat([self._v.materialize(value_states), value_states], dim=-2)
        self._k.append(key_states)
        self._v.append(value_states)
        return keys, values

    def get_seq_length(self) -> int:
        return self._k.seq_len

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if torch.is_tensor(query_length):  # transformers < 5.12 passes cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the pre-5.18 name of get_max_length
        return -1

    def nbytes(self) -> int:
        """Bytes held: codes, fp16 scales and zeros, and the full-precision tail."""
        return self._k.nbytes() + self._v.nbytes()

    def held(self) -> dict[str, int]:
        """Tokens held quantized and in full precision, for keys and values."""
        return {"k_quantized": self._k.seq_len - self._k.tail_len, "k_full": self._k.tail_len,
                "v_quantized": self._v.seq_len - self._v.tail_len, "v_full": self._v.tail_len}

    def reset(self) -> None:
        self._new_streams()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (no assisted decoding)")

    def _apply(self, fn) -> None:
        self._k.apply(fn)
        self._v.apply(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.to(self.device, non_blocking=True))


class KVPrecisionCache(Cache):
    """A transformers ``Cache`` made of ``KVQuantLayer``s; ``precision`` is the config it was built from."""

    def __init__(self, layers: list[KVQuantLayer], precision: KVPrecisionConfig):
        super().__init__(layers=layers)
        self.precision = precision

    def nbytes(self) -> int:
        """Bytes held by all layers (codes, scales, zeros and full-precision residual)."""
        return sum(layer.nbytes() for layer in self.layers)


def model_shape(model_or_config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a model or its config.

    Sliding-window layers (Mistral, Gemma 2 / 3, Qwen3's optional ones) are cached like full-attention ones: each
    layer keeps its whole history and the model's own sliding-window mask limits what the layer attends to, so
    the logits are those of transformers' sliding cache. What that costs: past the window, a sliding layer
    holds more tokens than transformers' sliding layer would (docs/FAMILIES.md).
    """
    config = getattr(model_or_config, "config", model_or_config).get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def build_cache(model, config: KVPrecisionConfig | dict, storage: str = "packed", *,
                quantize_in_forward: bool = False) -> KVPrecisionCache:
    """The cache to pass as ``past_key_values=`` (a new one per request: it holds state).

    Args:
        model: the model (or its config) the cache is for.
        config: a ``KVPrecisionConfig`` or its dict form.
        storage: ``"packed"`` (real memory savings) or ``"simulated"`` (quantize-dequantize).
        quantize_in_forward: let the current forward see its own K/V quantized.
    """
    if isinstance(config, dict):
        config = KVPrecisionConfig.from_dict(config)
    num_layers, _, head_dim = model_shape(model)
    config.check_model(num_layers, head_dim)
    layers = [
        KVQuantLayer(k, v, mode=config.mode, token_group=config.token_group(head_dim),
                     key_group=config.group_size, residual=config.residual, storage=storage,
                     quantize_in_forward=quantize_in_forward)
        for k, v in config.layers
    ]
    return KVPrecisionCache(layers, config)


def kv_bits(config: KVPrecisionConfig, *, seq_len: int = 2048, head_dim: int = 128,
            fp_bits: int = 16) -> dict:
    """Bits per cached K/V element.

    ``nominal`` is KVTuner's sum(k + v) / 2L. ``effective`` is what a packed cache holding ``seq_len`` tokens
    really spends: codes (padded to whole bytes per token), fp16 scale and zero per group, and ``fp_bits`` for
    the full-precision residual tokens and 16-bit layers.
    """
    nominal = sum(k + v for k, v in config.layers) / (2 * config.num_layers)
    tg = config.token_group(head_dim)
    n_v = max(0, seq_len - config.residual)  # values (and per-token keys) quantized once out of the window
    n_k = seq_len // config.residual * config.residual if config.mode == "kivi" else n_v
    k_meta = n_k * head_dim * 32 / config.group_size if config.mode == "kivi" else n_k * (head_dim // tg) * 32
    total = 0.0
    for k, v in config.layers:
        total += _stream_bits(k, seq_len, head_dim, n_k, k_meta, fp_bits)
        total += _stream_bits(v, seq_len, head_dim, n_v, n_v * (head_dim // tg) * 32, fp_bits)
    return {"nominal": nominal, "effective": total / (2 * config.num_layers * seq_len * head_dim)}


def _stream_bits(bits: int, seq_len: int, head_dim: int, n_quant: int, meta_bits: float,
                 fp_bits: int) -> float:
    """Bits one stream spends on one head: ``n_quant`` quantized tokens plus the full-precision rest."""
    if bits == 16:
        return seq_len * head_dim * fp_bits
    code_bits = 8 * -(-head_dim * bits // 8)  # whole bytes per token
    return n_quant * code_bits + meta_bits + (seq_len - n_quant) * head_dim * fp_bits
