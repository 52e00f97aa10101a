"""A safetensors file written tensor by tensor into any binary stream, its size known before the first byte.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte
range, then the tensors' bytes back to back. Its size follows from the tensors' shapes alone, so an archive
member can be opened with its final size and the weights written straight into it: one pass over the bytes,
with one tensor (cast to the export dtype, on the CPU) in memory at a time. `safetensors.safe_open` and
`from_pretrained` read the result like any other safetensors file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import torch

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned, as the reference writer does


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each tensor once, under its first name: tied weights (an LM head sharing the embedding's
    storage) are saved once, as `save_pretrained` does."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


class SafetensorsPlan:
    """The layout of a safetensors file of `state` with floating-point tensors in `dtype` (others as they are)."""

    def __init__(self, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                 metadata: dict[str, str] | None = None):
        self.state, self.dtype = state, dtype
        entries: dict[str, dict] = {}
        offset = 0
        for name, tensor in state.items():
            saved = self.saved_dtype(tensor)
            if saved not in _DTYPES:
                raise TypeError(f"{name}: safetensors has no dtype for {saved}")
            length = tensor.numel() * saved.itemsize
            entries[name] = {"dtype": _DTYPES[saved], "shape": list(tensor.shape), "data_offsets": [offset,
                                                                                                   offset + length]}
            offset += length
        header = json.dumps({"__metadata__": metadata or {"format": "pt"}, **entries},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % _ALIGN)
        self.prefix = struct.pack("<Q", len(header)) + header
        self.size = len(self.prefix) + offset

    def saved_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype

    def chunks(self) -> Iterator[memoryview | bytes]:
        """The file's bytes: the header, then each tensor's (a view of its CPU copy in the saved dtype)."""
        yield self.prefix
        for tensor in self.state.values():
            saved = tensor.detach().to(device="cpu", dtype=self.saved_dtype(tensor)).contiguous()
            if saved.numel():
                yield memoryview(saved.reshape(-1).view(torch.uint8).numpy())

    def write(self, handle) -> int:
        """Write the file into binary stream `handle`; return the bytes written (`size`)."""
        written = 0
        for part in self.chunks():
            handle.write(part)
            written += len(part)
        if written != self.size:
            raise RuntimeError(f"wrote {written} bytes of a safetensors file planned at {self.size}")
        return written
