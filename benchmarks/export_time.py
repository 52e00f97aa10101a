"""Export time and disk per front point, side by side in one run: the weights' safetensors alone, the archive as
the issue found it (fp32, gzip at level 9 in the driver), as the driver wrote it before (a saved directory, then a
plain tar of it hashed as written), and as it is now (an evaluator in another Ray process with its own cache
directory writes the tar itself in the model's dtype, the weights streamed straight into it; the driver renames
it into its data directory, as on one machine, or streams it through Ray in chunks and hashes it as it arrives,
as from another node). The SHA-256 a renamed archive gets on its first download is timed apart.

One candidate of `--model` with `--cut` of every layer's MLP channels removed stands for a front point. The
gzip arm compresses the first `--gzip-mib` MiB of the archive and is extrapolated linearly (level 9 on weights
runs at a near-constant rate); everything else is measured whole. zstd (the `zstd` command, levels 1 and 3, one
thread) is measured on the point's safetensors to say whether it would pay. Figures for an 8 B model follow on
paper from the measured rates.

    PYTHONPATH=. DARWINFRONT_CACHE_DIR=/work/.cache-dev .venv/bin/python benchmarks/export_time.py \\
        --model builtin:smollm2-135m --cut 0.3
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import torch

MiB = 1 << 20
LLAMA_8B_PARAMS = 8.03e9  # Llama-3.1-8B
LLAMA_8B_MLP = 32 * 3 * 4096 * 14336  # its MLP weights, what the cut removes a share of


def candidate(model, cut: float):
    """`model` with the first `cut` of every layer's MLP channels removed (attention kept), physically sliced."""
    from workers import slicing

    d = slicing.dims(model)
    keep = max(8, round(d.intermediate * (1 - cut) / 8) * 8)
    layout = slicing.Layout(tuple(slicing.LayerLayout(tuple(range(d.n_kv)), tuple(range(keep)))
                                  for _ in range(d.n_layers)), "kv_group")
    return slicing.slice_model(model, layout)


class Exporter:
    """An evaluator's half of the export, as a Ray actor in a process with its own cache directory."""

    def __init__(self, source: str, cut: float, files: dict):
        from workers import modeling, transfer

        transfer.bring(files)  # the builtin model, from the driver's cache (as an evaluator gets it)
        dense, self.tokenizer = modeling.load_model(source, device="cpu")
        self.model = candidate(dense, cut)

    def safetensors(self, dtype: str) -> float:
        """Seconds to write the point's weights alone with `safetensors.torch.save_file` in `dtype` (the cast
        included, tied weights once) here, in the evaluator's process: the goal's yardstick, side by side."""
        from safetensors.torch import save_file

        from workers import modeling, transfer
        from workers.safetensors_stream import unique_tensors

        folder = transfer.scratch("safetensors")
        os.sync()
        started = time.perf_counter()
        state = {k: v.to(modeling.resolve_dtype(dtype)).contiguous()
                 for k, v in unique_tensors(self.model.state_dict()).items()}
        save_file(state, folder / "model.safetensors")
        seconds = time.perf_counter() - started
        shutil.rmtree(folder)
        return seconds

    def export(self, dtype: str) -> tuple[dict, float]:
        from workers import modeling, slicing, transfer

        started = time.perf_counter()
        folder = transfer.scratch("exports")
        slicing.save_pruned(self.model, self.tokenizer, folder, dtype=modeling.resolve_dtype(dtype), archive="point")
        return transfer.here(folder).to_dict(), time.perf_counter() - started


def main_archive(folder: Path, target: Path) -> dict:
    """The archive as the main commit wrote it: `tar.add` of each file of `folder` into a tar hashed as written."""
    import hashlib

    digest, size = hashlib.sha256(), 0

    class Writer:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data: bytes) -> int:
            nonlocal size
            digest.update(data)
            size += len(data)
            return self.handle.write(data)

    with open(target, "wb") as handle, tarfile.open(fileobj=Writer(handle), mode="w|") as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.add(path, arcname=f"point/{path.name}")
    return {"size": size, "sha256": digest.hexdigest()}


def best(rows: dict, arm: str, row: dict) -> None:
    """Keep the fastest of an arm's repeats."""
    if arm not in rows or row["seconds"] < rows[arm]["seconds"]:
        rows[arm] = row


def timed(fn) -> tuple[object, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def gzip_rate(tar_path: Path, mib: int) -> float:
    """Bytes per second of gzip level 9 on the first `mib` MiB of `tar_path`."""
    with open(tar_path, "rb") as handle:
        sample = handle.read(mib * MiB)
    _, seconds = timed(lambda: gzip.compress(sample, compresslevel=9))
    return len(sample) / seconds


def zstd_figures(path: Path, level: int) -> dict:
    out = path.with_suffix(f".zst{level}")
    _, seconds = timed(lambda: subprocess.run(["zstd", "-q", "-f", f"-{level}", "-T1", str(path), "-o", str(out)],
                                              check=True))
    figures = {"ratio": out.stat().st_size / path.stat().st_size, "mb_s": path.stat().st_size / seconds / 1e6}
    out.unlink()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--cut", type=float, default=0.3, help="share of every layer's MLP channels removed")
    parser.add_argument("--gzip-mib", type=int, default=32, help="MiB of the archive the gzip arm compresses")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each export arm (the best is kept)")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    import ray
    from safetensors.torch import save_file

    from darwinfront.core.outputs import file_sha256
    from darwinfront.core.spec import ModelSpec
    from workers import artifacts, modeling, slicing, transfer

    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="export-time-", dir=args.dir))
    dense, tokenizer = modeling.load_model(args.model, device="cpu")
    model = candidate(dense, args.cut)
    params = slicing.count_parameters(model)
    stored = modeling.stored_dtype(args.model) or torch.float32
    rows: dict[str, dict] = {}

    for dtype in sorted({torch.float32, torch.bfloat16}, key=str):
        name = modeling.dtype_name(dtype)
        os.sync()
        unique = {}  # a tied LM head is one tensor under two names: saved once, as save_pretrained does
        for k, v in model.state_dict().items():
            unique.setdefault(v.data_ptr(), (k, v))
        state = {k: v.to(dtype).contiguous() for k, v in unique.values()}
        path = scratch / f"weights-{name}.safetensors"
        _, seconds = timed(lambda path=path, state=state: save_file(state, path))
        rows[f"safetensors {name}"] = {"seconds": seconds, "bytes": path.stat().st_size}
        rows[f"zstd -1 {name}"], rows[f"zstd -3 {name}"] = zstd_figures(path, 1), zstd_figures(path, 3)
        path.unlink()
        del state

    # before: save_pruned in fp32 on the driver's disk, then a tar of that folder (the main commit's code) and
    # the gzip -9 of the same tar; after: an evaluator in another process, with its own cache dir, saves
    # in the model's dtype and the driver packs the folder into its hashed tar, reading it from the disk (it sees
    # the folder: one machine) or streaming it through Ray (what an evaluator on another node costs). Arms interleaved,
    # `--repeats` times, the disk synced before each; the best of each arm is kept.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    env = {"env_vars": {"DARWINFRONT_CACHE_DIR": str(scratch / "evaluator-cache"), "OMP_NUM_THREADS": "1"}}
    files = transfer.job_files(None, modeling.resolve_source(args.model) if args.model.startswith("builtin:") else None)
    exporter = ray.remote(Exporter).options(num_cpus=1, runtime_env=env).remote(args.model, args.cut, files)
    ray.get(exporter.__ray_ready__.remote())
    warm = scratch / "warm"
    warm.mkdir()
    (scratch / "warm-files").mkdir()
    (scratch / "warm-files" / "w.bin").write_bytes(b"0" * (transfer.WINDOW * transfer.CHUNK_BYTES))
    artifacts.pack(scratch / "warm-files", warm / "w.tar", name="w")
    artifacts.take(scratch / "data", "warm", "w", transfer.here(warm), through_ray=True)  # starts Ray's readers
    own = modeling.dtype_name(modeling.export_dtype(ModelSpec(source=args.model, dtype="float32")))

    def before() -> dict:
        folder = scratch / "before"
        slicing.save_pruned(model, tokenizer, folder)
        meta = main_archive(folder, scratch / "before.tar")
        shutil.rmtree(folder)
        return meta

    def after(dtype: str, through_ray: bool) -> dict:
        where, save_seconds = ray.get(exporter.export.remote(dtype))
        where = transfer.Located.from_dict(where)
        peak = sum(size for _, size in transfer.listing(where))
        meta, take_seconds = timed(lambda: artifacts.take(scratch / "data", "after", "point", where,
                                                          through_ray=through_ray))
        transfer.discard(where)
        archived = scratch / "data" / "artifacts" / meta["path"]
        _, hash_seconds = timed(lambda: file_sha256(archived)) if meta["sha256"] is None else (None, 0.0)
        archived.unlink()
        return {"seconds": save_seconds + take_seconds, "save_s": save_seconds, "take_s": take_seconds,
                "hash_s": hash_seconds, "bytes": meta["size"],
                "peak_bytes": meta["size"] + (peak if through_ray else 0)}

    rate = None
    for _ in range(args.repeats):
        os.sync()
        meta, seconds = timed(before)
        if rate is None:
            rate = gzip_rate(scratch / "before.tar", args.gzip_mib)
        (scratch / "before.tar").unlink()
        best(rows, "before: fp32 + plain tar, driver's disk",
             {"seconds": seconds, "bytes": meta["size"], "peak_bytes": 2 * meta["size"]})
        best(rows, "before: fp32 + gzip -9 (issue)",
             {"seconds": seconds + meta["size"] / rate, "bytes": None, "gzip_mb_s": rate / 1e6})
        for dtype in sorted({own, "bfloat16"}):
            yardstick = ray.get(exporter.safetensors.remote(dtype))
            best(rows, f"safetensors {dtype}, in the evaluator", {"seconds": yardstick})
            for through_ray, how in ((False, "renamed here"), (True, "Ray stream")):
                os.sync()
                best(rows, f"after: {dtype}, evaluator save + {how}", after(dtype, through_ray))
    ray.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)

    print(f"{args.model}: front point of {params:,} parameters (MLP cut {args.cut:.0%}); source stored in "
          f"{modeling.dtype_name(stored)}; torch threads 1; machine shared (load {os.getloadavg()[0]:.1f})")
    base = rows[f"safetensors {modeling.dtype_name(stored)}"]["seconds"]
    print(f"{'arm':44} {'seconds':>8} {'× safetensors':>14} {'archive MB':>11} {'peak disk MB':>13}")
    for arm, row in rows.items():
        if arm.startswith("zstd"):
            continue
        size = f"{row['bytes'] / 1e6:11.1f}" if row.get("bytes") else f"{'':11}"
        peak = f"{row['peak_bytes'] / 1e6:13.1f}" if row.get("peak_bytes") else f"{'':13}"
        print(f"{arm:44} {row['seconds']:8.2f} {row['seconds'] / base:14.2f} {size} {peak}")
    for arm, row in rows.items():
        if arm.startswith("zstd"):
            print(f"{arm:44} size × {row['ratio']:.3f} at {row['mb_s']:.0f} MB/s")

    for dtype in sorted({own, "bfloat16"}):
        yardstick = rows[f"safetensors {dtype}, in the evaluator"]["seconds"]
        point = rows[f"after: {dtype}, evaluator save + renamed here"]["seconds"]
        print(f"goal, {dtype} on one machine: export {point:.2f} s / safetensors in the same process "
              f"{yardstick:.2f} s = {point / yardstick:.2f} (goal ≤ 2)")
    after = rows["after: bfloat16, evaluator save + Ray stream"]
    for arm, row in rows.items():
        if "save_s" in row:
            print(f"{arm:44} archive {row['save_s']:.2f} s (evaluator) + take {row['take_s']:.2f} s (driver): "
                  f"× {row['save_s'] / base:.2f} and × {row['take_s'] / base:.2f} safetensors; first download's "
                  f"hash {row['hash_s']:.2f} s")
    kept = LLAMA_8B_PARAMS - args.cut * LLAMA_8B_MLP
    paper_bytes = {d: kept * b for d, b in (("fp32", 4), ("bf16", 2))}
    rate_after = after["bytes"] / after["seconds"]
    print(f"\non paper, Llama-3.1-8B with the same cut ({kept / 1e9:.2f} B of its parameters kept):")
    print(f"  bf16 point {paper_bytes['bf16'] / 1e9:.1f} GB: now ~{paper_bytes['bf16'] / rate_after / 60:.1f} min at "
          f"the {rate_after / 1e6:.0f} MB/s measured here; fp32 + gzip -9 as before: "
          f"{paper_bytes['fp32'] / 1e9:.1f} GB at {rate / 1e6:.1f} MB/s = "
          f"{paper_bytes['fp32'] / rate / 3600:.1f} h")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
