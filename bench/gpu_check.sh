#!/usr/bin/env bash
# One command that checks the GPU paths end to end on a small subset of a dataset (offline, under 8 minutes on
# one NVIDIA GPU): trains the 3x2 grid at 224 px, evaluates torch fp32/fp16, exports ONNX / FP16 ONNX (+ a
# TensorRT engine where TensorRT imports), benchmarks torch fp16 eager / CUDA graph, ONNX Runtime CUDA /
# TensorRT and the engine at batch 1/8/32, then prints one summary table and where the artifacts are.
# Without a GPU it runs the CPU fallback and says why each GPU step was skipped.
#
#   bench/gpu_check.sh DATASET [WEIGHTS_DIR] [python -m bench.gpu_check options, e.g. --images 2000 --out DIR]
#
# DATASET: a dataset directory (python -m train.data import ...) or a styles.csv + images/ folder.
# WEIGHTS_DIR: <arch>.<tag>.safetensors files (e.g. ../shared/weights); without it, the Hugging Face cache.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 DATASET [WEIGHTS_DIR] [options]   (options: python -m bench.gpu_check --help)" >&2
    exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$1"; shift
args=(--data "$data")
if [[ $# -gt 0 && "$1" != -* ]]; then
    args+=(--weights-dir "$1"); shift
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network: weights come from WEIGHTS_DIR or the local cache
exec "${PYTHON:-python}" -m bench.gpu_check "${args[@]}" "$@"
