#!/usr/bin/env bash
# Every GPU check in one go, most important first: the bf16/fp16/fp32 GPU tests, then the kernel,
# generation, training and speculative-decoding benchmarks (JSON + PNG in benchmarks/results/).
# Each step has its own time limit, so one that hangs or runs long does not starve the rest.
#
#   bash benchmarks/gpu.sh [LOG_DIR]      # logs: LOG_DIR/<step>.log (default: benchmarks/results/logs)
#
# Needs a CUDA GPU, the project installed, and for the side-by-side rows the peers:
# pip install --no-deps xlstm mlstm-kernels (and flash-linear-attention where it installs).
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-benchmarks/results/logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=30 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

$python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to run here')" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$logs/device.txt"
step tests 600 $python -m pytest -q -m gpu tests
step kernels 900 $python benchmarks/kernels.py
step generate 900 $python benchmarks/generate.py --device cuda
step train 900 $python benchmarks/train.py
step speculative 600 $python benchmarks/speculative.py --device cuda --cost-model-only
