"""Read the tensors of a model directory's `*.safetensors` files with numpy alone (no torch, no safetensors package).

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range, and the raw little-endian data; the tensors are memory-mapped, so a large model is never read whole.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


class Weights:
    """The tensors of every `*.safetensors` file in `folder`, by name, as float32 numpy arrays on demand."""

    def __init__(self, folder: Path):
        self._where: dict[str, tuple[Path, dict, int]] = {}
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise ValueError(f"{Path(folder).name} holds no .safetensors weights")
        for path in files:
            try:
                with open(path, "rb") as handle:
                    (length,) = struct.unpack("<Q", handle.read(8))
                    header = json.loads(handle.read(length))
            except (struct.error, ValueError) as exc:  # ValueError: JSON and UTF-8 decoding
                raise ValueError(f"{path.name} is not a readable safetensors file ({exc})") from None
            header.pop("__metadata__", None)
            for name, info in header.items():
                self._where[name] = (path, info, 8 + length)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1]["shape"])

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a float32 array (bf16 widened exactly: its bits are float32's upper half)."""
        path, info, start = self._info(name)
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            return np.zeros(shape, dtype=np.float32)
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        if info["dtype"] == "BF16":
            return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {info['dtype']}, which the GGUF export does not read")
        return raw.view(np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")).reshape(shape).astype(np.float32)

    def _info(self, name: str) -> tuple[Path, dict, int]:
        if name not in self._where:
            raise ValueError(f"the weights hold no tensor {name}")
        return self._where[name]
