#!/usr/bin/env bash
# The whole GPU run in at most 8 minutes (issue 11): stages in priority order, each with its own
# time budget (a stage that runs out is cut and the next starts), each writing JSON into OUTPUT_DIR,
# and a one-screen summary printed last (benchmarks/gpu_summary.py).
#
#   bash benchmarks/gpu.sh OUTPUT_DIR             # on a CUDA machine
#   bash benchmarks/gpu.sh --dry-run OUTPUT_DIR   # the same stages with tiny shapes on the CPU
#   bash benchmarks/gpu.sh --only tests,generate OUTPUT_DIR   # a rerun of some stages
#
# OUTPUT_DIR (new or empty) gets gpu.log (everything printed), tests.json, kernels-<date>.json,
# generate_cuda.json, train.json, serve_cuda.json, speculative_cuda_random_7b.json and tune-<date>.json:
# 8 files, the most a GPU run may bring back (so the plots stay behind; the JSON has every number).
# The stage tune (benchmarks/kernels.py --tune: our kernels' launch settings and the one-pass
# forward, swept) runs only when --only names it.
# Peers: wheels that benchmarks/gpu_wheels.sh put in .whl/ are installed offline into a temporary
# folder on PYTHONPATH; without them the peer rows are skipped with a message.
# The project is installed (pip install --no-deps --no-build-isolation -e .) if it does not import.
# Exit status 0 when every stage finished, 1 otherwise (after the summary all the same).
# PYTHON picks the interpreter (default python3); GPU_RUN_SECONDS the total budget (default 480: the
# stages up to speculative get 460, the setup about 20).
set -uo pipefail

all_stages=(tests kernels generate train serve speculative tune)
usage="usage: bash benchmarks/gpu.sh [--dry-run] [--only STAGE,...] OUTPUT_DIR (stages: ${all_stages[*]})"
dry_run=0
only=
while [[ ${1:-} == --dry-run || ${1:-} == --only ]]; do
    if [[ $1 == --dry-run ]]; then
        dry_run=1
        shift
        continue
    fi
    only=${2:-}
    IFS=, read -ra names <<<"$only"
    ((${#names[@]})) || { echo "$usage" >&2; exit 2; }
    for name in "${names[@]}"; do
        known=0
        for stage_name in "${all_stages[@]}"; do
            [[ $name == "$stage_name" ]] && known=1
        done
        ((known)) || { echo "unknown stage '$name'; $usage" >&2; exit 2; }
    done
    shift 2
done
if [[ $# -ne 1 || $1 == -* ]]; then
    echo "$usage" >&2
    exit 2
fi
out=$1
if [[ -e $out && -n $(ls -A "$out" 2>/dev/null) ]]; then
    echo "OUTPUT_DIR $out is not empty: give a new folder, so that no old results are mixed in" >&2
    exit 2
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
exec > >(tee "$out/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${GPU_RUN_SECONDS:-480}))
incomplete=0  # the exit status: 1 if a stage failed, was cut or skipped (the summary says which)
: >"$work/stages.tsv"

# ---- setup: peers from .whl/, the project itself -------------------------------------------
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    echo "== installing ${#wheels[@]} wheels from .whl/ (offline) into $work/site"
    if "$python" -m pip install --quiet --no-index --no-deps --target "$work/site" "${wheels[@]}"; then
        export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "   the wheels did not install: the peer rows will be skipped"
    fi
else
    echo "== no .whl/ folder (benchmarks/gpu_wheels.sh makes it): the peer rows will be skipped"
fi
if ! "$python" -c "import xlstm7b.kernels" 2>/dev/null; then
    echo "== installing the project: pip install --no-deps --no-build-isolation -e ."
    "$python" -m pip install --quiet --no-deps --no-build-isolation -e . || { echo "the project does not install"; exit 1; }
fi
if ((dry_run)); then
    device=cpu
else
    "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run on a CPU')" || exit 1
    device=cuda
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
official=()
"$python" -c "import xlstm.xlstm_large.model" 2>/dev/null || {
    echo "== the official xlstm package does not import: generate measures xlstm7b only"
    official=(--no-official)
}

on_request=(tune)  # stages a full run leaves out
stage() {  # stage NAME BUDGET_SECONDS COMMAND...: runs it cut at min(budget, time left)
    local name=$1 budget=$2
    shift 2
    if [[ -z $only ]]; then
        [[ " ${on_request[*]} " != *" $name "* ]] || return 0
    else
        [[ ",$only," == *",$name,"* ]] || return 0
    fi
    local limit=$((deadline - SECONDS < budget ? deadline - SECONDS : budget))
    if ((limit < 10)); then
        echo "== $name: skipped, ${limit} s left"
        printf '%s\t%s\t%s\t%s\n' "$name" "$budget" 0 skipped >>"$work/stages.tsv"
        incomplete=1
        return
    fi
    echo "== $name (${limit} s): $*"
    local t0=$SECONDS
    # SIGINT first: the kernel benchmark writes the rows it has; KILL if it does not stop.
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local status=$?
    ((status == 0)) || incomplete=1
    echo "== $name: exit $status after $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$((SECONDS - t0))" "$status" >>"$work/stages.tsv"
}

# ---- stages, most important first ----------------------------------------------------------
if ((dry_run)); then
    stage tests 60 "$python" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$work/junit.xml"
    [[ ! -e $work/junit.xml ]] || "$python" benchmarks/gpu_summary.py junit "$work/junit.xml" "$out/tests.json"
    stage kernels 60 "$python" benchmarks/kernels.py --dry-run --profile --out "$out"
    stage generate 60 "$python" benchmarks/generate.py --device cpu --batches 1 --decode-tokens 4 \
        --prompt-lengths 16 --memory-tokens 8 --repeats 1 --no-compiled --profile "${official[@]}" --out "$out"
    stage train 60 "$python" benchmarks/train.py --presets debug --steps 1 --micro-batch 1 --seq-len 64 --profile --output "$out/train.json"
    stage serve 60 "$python" benchmarks/serve.py --device cpu --preset debug --concurrency 2 4 --requests 12 \
        --state-dtype bfloat16 --baseline-requests 2 --out "$work/serve"
    stage speculative 60 "$python" benchmarks/speculative.py --device cpu --cost-model-only --ks 2 --out "$out"
    stage tune 60 "$python" benchmarks/kernels.py --dry-run --tune --out "$out"
else
    stage tests 150 "$python" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$work/junit.xml"
    [[ ! -e $work/junit.xml ]] || "$python" benchmarks/gpu_summary.py junit "$work/junit.xml" "$out/tests.json"
    # the 7B head shape at 65,536 tokens; the step kernel at batch 1 and 256
    stage kernels 100 "$python" benchmarks/kernels.py --seq-lens 65536 --heads 8,256,512 \
        --providers xlstm7b-triton xlstm7b-triton-chunk128 tfla-exp-chunk128 fla-simple-gla --step-batches 1 256 --reps 50 \
        --profile --out "$out"
    # 7B shape, random bf16 weights shared with the official model; where the time of the 8k prefill
    # and of a decode step goes; memory in fresh processes
    stage generate 110 "$python" benchmarks/generate.py --device cuda --batches 1 256 --decode-tokens 64 \
        --prompt-lengths 8192 --memory-tokens 256 --repeats 2 --no-compiled --profile "${official[@]}" --out "$out"
    stage train 35 "$python" benchmarks/train.py --presets 1.3b --steps 5 --profile --output "$out/train.json"
    # the engine at the 7B shape, random bf16 weights; bfloat16 C and n: 512 slots hold 32 GiB, not 64
    stage serve 45 "$python" benchmarks/serve.py --device cuda --preset 7b --concurrency 64 512 \
        --state-dtype bfloat16 --baseline-requests 4 --out "$work/serve"
    stage speculative 20 "$python" benchmarks/speculative.py --device cuda --cost-model-only --ks 2 4 --out "$out"
    # the one-pass forward, then other tiles, warps and stages for our kernels at the 7B head shape and
    # 65,536 tokens, chunk 64 then 128 (only with --only tune)
    stage tune 90 "$python" benchmarks/kernels.py --tune --seq-lens 65536 --heads 8,256,512 --reps 50 --out "$out"
fi
mv "$out"/generate_*.png "$out"/kernels-*.png "$work"/ 2>/dev/null
cp "$work"/serve/serve_*.json "$out"/ 2>/dev/null

"$python" benchmarks/gpu_summary.py report "$out" "$work/stages.tsv"
exit $incomplete
