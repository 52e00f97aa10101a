"""A model directory (a pruned candidate's export, or a dense Hugging Face Llama / Mistral / Qwen2) as a GGUF file
that llama.cpp (and so Ollama) runs, written with the `gguf` package and numpy alone: no torch.

The architecture is llama.cpp's `deci`, which reads per-layer head counts, KV-head counts and MLP widths
(`deci.py` says how each pruned layer is expressed exactly). Matrices are written in the chosen type (`f16`,
`q8_0`, or `f32`); norms and biases stay float32, as llama.cpp's own converter keeps them, and a matrix whose rows
do not split into Q8_0 blocks of 32 stays f16. Tensors are converted one at a time and streamed to the file, so
memory holds one tensor, not the model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from darwinfront.gguf_export import deci, vocab
from darwinfront.gguf_export.weights import Weights

GGUF_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0}
_FILE_TYPES = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
               QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


def write_gguf(folder: str | Path, path: str | Path, gguf_type: str = "f16", *, name: str | None = None) -> dict:
    """Write the model in directory `folder` to GGUF file `path` (atomically: a `.partial` file renamed).

    Args:
        folder: a directory with `config.json`, `*.safetensors` and `tokenizer.json`.
        path: the file to write.
        gguf_type: `f16`, `q8_0` or `f32`: the type of the matrices.
        name: `general.name` (default: the directory's name).

    Returns:
        A summary: the architecture, per-layer `head_count` / `head_count_kv` / `feed_forward_length` as written,
        the tensors by type, the file's size.

    Raises:
        ValueError: naming what cannot be exported (the type, the family, the rotary scaling, the tokenizer).
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    qtype = GGUF_TYPES[gguf_type]
    folder, path = Path(folder), Path(path)
    config = json.loads((folder / "config.json").read_text())
    geo = deci.geometry(config)
    weights = Weights(folder)
    plans = deci.layer_plans(config, weights)
    planned = deci.tensors(geo, plans, weights)
    rows = weights.shape("model.embed_tokens.weight")[0]
    words = vocab.read_vocab(folder, rows)

    types = [_tensor_type(t, qtype) for t in planned]
    handle, name_of_partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)  # its own name: two requests converting at once never write into one file
    partial = Path(name_of_partial)
    writer = gguf.GGUFWriter(partial, "deci")
    try:
        _add_metadata(writer, geo, plans, rows, qtype, name or folder.name)
        vocab.add_to(writer, words)
        _stream_tensors(writer, planned, types)
        writer.close()
        partial.chmod(0o644)
        os.replace(partial, path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)  # a failure half-way: nothing half-written stays behind
    counts: dict[str, int] = {}
    for ggml_type in types:
        counts[ggml_type.name] = counts.get(ggml_type.name, 0) + 1
    return {"architecture": "deci", "gguf_type": gguf_type, "size": path.stat().st_size,
            "head_count": [p.heads for p in plans], "head_count_kv": [p.kv_heads for p in plans],
            "feed_forward_length": [p.ffn for p in plans], "tensor_types": dict(sorted(counts.items()))}


_NUMPY = {QT.F32: np.float32, QT.F16: np.float16}


def _stream_tensors(writer: gguf.GGUFWriter, planned: list[deci.Tensor], types: list[QT]) -> None:
    """Declare every tensor, write the header, then convert and write the tensors one at a time."""
    for tensor, ggml_type in zip(planned, types, strict=True):
        if ggml_type == QT.Q8_0:  # a quantized tensor is declared by its bytes (rows, bytes per row)
            byte_shape = gguf.quants.quant_shape_to_byte_shape(tensor.shape, ggml_type)
            writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                   raw_dtype=ggml_type)
        else:
            dtype = np.dtype(_NUMPY[ggml_type])
            writer.add_tensor_info(tensor.name, tensor.shape, dtype, int(np.prod(tensor.shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, ggml_type in zip(planned, types, strict=True):
        data = np.ascontiguousarray(tensor.make(), dtype=np.float32)
        if data.shape != tensor.shape:
            raise ValueError(f"{tensor.name}: the weights hold {data.shape}, the layer shapes say {tensor.shape}")
        writer.write_tensor_data(gguf.quants.quantize(data, ggml_type))


def _tensor_type(tensor: deci.Tensor, qtype: QT) -> QT:
    """Vectors stay float32; a matrix takes `qtype`, or f16 when its rows do not split into Q8_0 blocks."""
    if len(tensor.shape) == 1:
        return QT.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if tensor.shape[-1] % block == 0 else QT.F16


def _add_metadata(writer: gguf.GGUFWriter, geo: deci.Geometry, plans: list[deci.LayerPlan], rows: int, qtype: QT,
                  name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(rows)
    writer.add_context_length(geo.context)
    writer.add_embedding_length(geo.hidden)
    writer.add_block_count(geo.layers)
    writer.add_feed_forward_length([p.ffn for p in plans])
    writer.add_head_count([p.heads for p in plans])
    writer.add_head_count_kv([p.kv_heads for p in plans])
    writer.add_key_length(geo.head_dim)
    writer.add_value_length(geo.head_dim)
    writer.add_rope_dimension_count(geo.head_dim)
    writer.add_rope_freq_base(geo.rope_theta)
    writer.add_layer_norm_rms_eps(geo.rms_eps)
