"""Asymmetric min/max quantization of K/V tensors and bit packing of the integer codes.

K/V tensors are (B, H, T, D). Two groupings:

- ``"token"`` (per-token): each token's D channels are cut into groups of ``group`` consecutive channels
  (``group`` divides D; default D).
- ``"channel"`` (per-channel, KIVI keys): each channel's T tokens are cut into groups of ``group`` consecutive
  tokens. When T is not a multiple of ``group`` the last group of every channel is shorter; a group never
  borrows tokens from the next channel, nor channels from the next token.

Per group: zero = min, scale = (max - min) / (2^bits - 1), code = round((x - zero) / scale) in
[0, 2^bits - 1], x_hat = code * scale + zero. Scale and zero are stored in fp16, rounded *outward* (zero down,
scale up) so that the fp16 grid still covers the group: every element is then within scale / 2 of its
reconstruction, up to fp32 arithmetic. All the math runs in fp32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

BITS = (2, 4, 8)
Axis = Literal["token", "channel"]
_FP16_TINY = 2.0**-24  # the smallest positive fp16 value: the scale of a constant group


@dataclass(frozen=True)
class QTensor:
    """A quantized (B, H, T, D) tensor.

    Attributes:
        codes: uint8 codes (B, H, T, D), or when ``packed`` the same codes packed along D into
            (B, H, T, ceil(D * bits / 8)) bytes.
        scale: fp16 scales; (B, H, T, D // group) per-token, (B, H, ceil(T / group), D) per-channel.
        zero: fp16 zero points (group minima), same shape as ``scale``.
        bits: bits per code, one of ``BITS``.
        axis: ``"token"`` or ``"channel"``.
        group: elements per group (channels per-token, tokens per-channel).
        dim: D, needed to unpack.
        packed: whether ``codes`` holds packed bytes.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    axis: Axis
    group: int
    dim: int
    packed: bool = False

    @property
    def seq_len(self) -> int:
        """Number of tokens held (T)."""
        return self.codes.shape[-2]

    def nbytes(self) -> int:
        """Bytes held by codes, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def pack(self) -> QTensor:
        """The same tensor with its codes packed into bytes (a no-op when already packed)."""
        if self.packed:
            return self
        return replace(self, codes=pack(self.codes, self.bits), packed=True)

    def unpack(self) -> QTensor:
        """The same tensor with one uint8 per code."""
        if not self.packed:
            return self
        return replace(self, codes=unpack(self.codes, self.bits, self.dim), packed=False)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QTensor:
        """Apply ``fn`` to codes, scale and zero (for batch-dimension ops: ``index_select``, ``to``...)."""
        return replace(self, codes=fn(self.codes), scale=fn(self.scale), zero=fn(self.zero))


def quantize(x: torch.Tensor, bits: int, *, axis: Axis = "token", group: int | None = None) -> QTensor:
    """Quantize a (B, H, T, D) tensor to ``bits``-bit codes with fp16 scale and zero per group.

    Args:
        x: the tensor, any float dtype.
        bits: 2, 4 or 8.
        axis: ``"token"`` (groups along D) or ``"channel"`` (groups along T within one channel).
        group: group size; default D for ``"token"``, T (one group per channel) for ``"channel"``.
    """
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {BITS}")
    if x.dim() != 4:
        raise ValueError(f"expected a (B, H, T, D) tensor, got shape {tuple(x.shape)}")
    T, D = x.shape[-2:]
    group = group or (D if axis == "token" else max(T, 1))
    xf = x.float()
    mn, mx = _group_min_max(xf, axis, group)
    zero = _fp16_round(mn, up=False)
    levels = 2**bits - 1
    scale = _fp16_round(((mx - zero.float()) / levels).clamp_min(_FP16_TINY), up=True)
    grouped = _grouped(xf, axis, group)
    codes = torch.round((grouped - _bcast(zero, axis)) / _bcast(scale, axis)).clamp_(0, levels)
    codes = _ungrouped(codes.to(torch.uint8), axis, T)
    return QTensor(codes=codes, scale=scale, zero=zero, bits=bits, axis=axis, group=group, dim=D)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the (B, H, T, D) tensor in ``dtype`` (computed in fp32)."""
    q = q.unpack()
    x = _grouped(q.codes, q.axis, q.group).float() * _bcast(q.scale, q.axis) + _bcast(q.zero, q.axis)
    return _ungrouped(x, q.axis, q.seq_len).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, *, axis: Axis = "token",
                  group: int | None = None) -> torch.Tensor:
    """Quantize then dequantize, in ``x``'s dtype; ``bits=16`` returns ``x`` untouched."""
    if bits == 16:
        return x
    return dequantize(quantize(x, bits, axis=axis, group=group), x.dtype)


def cat_tokens(parts: list[QTensor]) -> QTensor:
    """Concatenate quantized tensors along T.

    Per-channel parts can only be joined when every part but the last holds whole groups, so that the result's
    groups still start every ``group`` tokens.
    """
    first = parts[0]
    def fmt(p: QTensor) -> tuple:
        return p.bits, p.axis, p.group, p.dim, p.packed

    for p in parts[1:]:
        if fmt(p) != fmt(first):
            raise ValueError("cannot concatenate quantized tensors of different formats")
    if first.axis == "channel":
        assert all(p.seq_len % first.group == 0 for p in parts[:-1]), "per-channel parts need whole groups"
    return replace(
        first,
        codes=torch.cat([p.codes for p in parts], dim=-2),
        scale=torch.cat([p.scale for p in parts], dim=-2),
        zero=torch.cat([p.zero for p in parts], dim=-2),
    )


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-bit uint8 codes (2, 4 or 8) along the last dim: 8 // bits codes per byte, low bits first.

    The last dim is zero-padded to a multiple of 8 // bits; ``unpack`` needs the original length back.
    """
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {BITS}")
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], dim=-1)
    grouped = codes.to(torch.int32).unflatten(-1, (-1, per))  # (..., n_bytes, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``n`` codes of every row of the last dim, as uint8."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {BITS}")
    if bits == 8:
        return packed[..., :n]
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., n_bytes, per)
    return codes.flatten(-2)[..., :n]


def _grouped(x: torch.Tensor, axis: Axis, group: int) -> torch.Tensor:
    """(B, H, T, D) -> per-token (B, H, T, D/g, g), or per-channel (B, H, T/g, g, D) with T padded by repeating
    the last token (so a padded group's min and max are those of its real tokens)."""
    T, D = x.shape[-2:]
    if axis == "token":
        if D % group:
            raise ValueError(f"per-token group {group} does not divide head_dim {D}")
        return x.unflatten(-1, (D // group, group))
    if axis != "channel":
        raise ValueError(f"axis={axis!r} is not 'token' or 'channel'")
    pad = (-T) % group
    if pad:
        x = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], pad, D)], dim=-2)
    return x.unflatten(-2, (-1, group))


def _ungrouped(x: torch.Tensor, axis: Axis, T: int) -> torch.Tensor:
    """Inverse of ``_grouped``, dropping the padding tokens."""
    if axis == "token":
        return x.flatten(-2)
    return x.flatten(-3, -2)[..., :T, :]


def _bcast(stat: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Per-group fp16 stats as fp32, shaped to broadcast against ``_grouped``."""
    return stat.float().unsqueeze(-1 if axis == "token" else -2)


def _group_min_max(xf: torch.Tensor, axis: Axis, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group minima and maxima, in the layout of ``QTensor.scale``."""
    g = _grouped(xf, axis, group)  # a group is the last dim per-token, dim -2 per-channel
    dim = -1 if axis == "token" else -2
    return g.amin(dim), g.amax(dim)


def _fp16_round(x: torch.Tensor, *, up: bool) -> torch.Tensor:
    """Round fp32 values to fp16 towards +inf (``up``) or -inf, so that the fp16 value bounds the fp32 one."""
    h = x.clamp(-65504.0, 65504.0).half()
    wrong_side = h.float() < x if up else h.float() > x
    toward = torch.full_like(h, float("inf") if up else float("-inf"))
    return torch.where(wrong_side, torch.nextafter(h, toward), h)
