#!/usr/bin/env bash
# The GPU check (about 5 minutes on one H100/H200): SmolLM2-135M in bf16 on CUDA.
#   1. the obs level database build (statistics + OBS per layer, fp64 Hessians on the GPU), with peak memory;
#   2. one candidate evaluation's cost, sliced, against the dense model (train 4,096 + KL on 2,048 tokens);
#   3. a short search at 50 % (uniform, random, evopress and darwinlm arms at a small equal budget).
# Run from the repository root after `make install TORCH="torch --index-url https://download.pytorch.org/whl/cu124"`;
# the figures go to docs/BENCHMARKS.md ("GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export DARWINFRONT_CACHE_DIR=${DARWINFRONT_CACHE_DIR:-$PWD/.gpu-cache} PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
start=$(date +%s)
echo "== 1. obs database build (8,192 tokens, 10 levels)"
$PY benchmarks/database_build.py --device cuda --dtype bfloat16
echo "== 2. one evaluation, sliced vs dense"
$PY benchmarks/evaluation_cost.py --models smollm2 --targets 0.5 --train-tokens 4096 --kl-tokens 2048 \
    --repeats 3 --device cuda --dtype bfloat16
echo "== 3. a short search at 50 %"
$PY benchmarks/prune_search.py --model builtin:smollm2-135m --device cuda --dtype bfloat16 --seeds 0 \
    --generations 3 --offspring 8 --train-scale 0.125 --post-train-tokens 16384 --reference-scale 1
echo "gpu check: $(( $(date +%s) - start )) s"
