#!/usr/bin/env bash
# The GPU run in two calls of at most 8 minutes each (issues 11 and 24): stages in priority order,
# each with its own time budget (a stage that runs out is cut and the next starts), each writing
# JSON into OUTPUT_DIR as soon as it has measured something, and a one-screen summary printed last
# (benchmarks/gpu_summary.py).
#
#   bash benchmarks/gpu.sh OUTPUT_DIR             # on a CUDA machine: the first call
#   bash benchmarks/gpu.sh --second OUTPUT_DIR2   # the second call, if time is left
#   bash benchmarks/gpu.sh --dry-run [--second] OUTPUT_DIR   # the same stages, tiny shapes, on the CPU
#   bash benchmarks/gpu.sh --only tests,generate OUTPUT_DIR   # a rerun of some stages (of either call)
#
# First call: tests (the GPU-marked tests), kernels (benchmarks/kernels.py) and tune (its launch
# variants), generate (decoding at batch 1 in every mode and the official model compiled and
# graphed and eager; batch 256 with float32 and bfloat16 state; kernels per token; the 8k prefill's
# forward pass), train and train-compiled (1.3B eager with the fused optimizer and a micro-batch
# sweep, then compiled). Files: gpu.log, tests.json, kernels-<date>.json, tune-<date>.json,
# generate_cuda.json, train.json, train_compiled.json.
# Second call: serve and serve-decode (the engine at 64/256/512 concurrent requests on the
# prefill-heavy and the decode-heavy mix), speculative (the cost model, draft and verify replayed from
# CUDA graphs), quantize (int8/int4 weight-only decoding at batch 1, its logits against bf16) and
# offload (a 7B training step with the CPU-offloaded optimizer). Files: gpu.log, serve_cuda.json,
# serve_decode_cuda.json, speculative_cuda_random_7b.json, generate_cuda_quantized.json,
# train_7b_offload.json. At most 8 files come back per call (the plots stay behind).
# Peers: wheels that benchmarks/gpu_wheels.sh put in .whl/ are installed offline into a temporary
# folder on PYTHONPATH; without them the peer rows are skipped with a message.
# The project is installed (pip install --no-deps --no-build-isolation -e .) if it does not import.
# Exit status 0 when every stage finished, 1 otherwise (after the summary all the same).
# PYTHON picks the interpreter (default python3); GPU_RUN_SECONDS the total budget of a call
# (default 480: the stages get 450, the setup about 20).
set -uo pipefail

first=(tests kernels tune generate train train-compiled)
second=(serve serve-decode speculative quantize offload)
all_stages=("${first[@]}" "${second[@]}")
usage="usage: bash benchmarks/gpu.sh [--dry-run] [--second | --only STAGE,...] OUTPUT_DIR (stages: ${first[*]}; second call: ${second[*]})"
dry_run=0
group=first
only=
while [[ ${1:-} == --dry-run || ${1:-} == --second || ${1:-} == --only ]]; do
    case $1 in
    --dry-run) dry_run=1; shift; continue ;;
    --second) group=second; shift; continue ;;
    esac
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

stage() {  # stage NAME BUDGET_SECONDS COMMAND...: runs it cut at min(budget, time left)
    local name=$1 budget=$2
    shift 2
    if [[ -z $only ]]; then
        local members=("${first[@]}")
        [[ $group == first ]] || members=("${second[@]}")
        [[ " ${members[*]} " == *" $name "* ]] || return 0
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
    stage tune 120 "$python" benchmarks/kernels.py --dry-run --tune --out "$out"
    stage generate 60 "$python" benchmarks/generate.py --device cpu --batches 1 2 --state-dtypes float32 bfloat16 \
        --batch1-only official --decode-tokens 4 --prompt-lengths 16 --forward-only --memory-tokens --repeats 1 \
        --no-compiled --kernels-per-token --profile "${official[@]}" --out "$out"
    stage train 60 "$python" benchmarks/train.py --presets debug --steps 1 --micro-batch-sweep 1 2 --seq-len 64 \
        --optimizer foreach --profile --output "$out/train.json"
    # (a compilation of the blocks takes a minute on a CPU: the rehearsal leaves --compile out)
    stage train-compiled 60 "$python" benchmarks/train.py --presets debug --steps 1 --micro-batch 1 --seq-len 64 \
        --output "$out/train_compiled.json"
    stage serve 60 "$python" benchmarks/serve.py --device cpu --preset debug --concurrency 2 4 --requests 12 \
        --state-dtype bfloat16 --baseline-requests 2 --out "$work/serve"
    stage serve-decode 60 "$python" benchmarks/serve.py --device cpu --preset debug --mix decode --concurrency 4 \
        --requests 4 --state-dtype bfloat16 --baseline-requests 1 --out "$work/serve"
    stage speculative 60 "$python" benchmarks/speculative.py --device cpu --cost-model-only --ks 2 --out "$out"
    stage quantize 60 "$python" benchmarks/generate.py --device cpu --preset debug --quantize int8 int4 \
        --decode-tokens 4 --repeats 1 --out "$out"
    # (CPU offload needs an accelerator: the rehearsal trains without it)
    stage offload 60 "$python" benchmarks/train.py --presets debug --steps 1 --micro-batch 1 --seq-len 64 \
        --output "$out/train_7b_offload.json"
else
    stage tests 110 "$python" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$work/junit.xml"
    [[ ! -e $work/junit.xml ]] || "$python" benchmarks/gpu_summary.py junit "$work/junit.xml" "$out/tests.json"
    # the 7B head shape at 65,536 and 8,192 tokens in both launch orders; the step kernel at batch 1
    # and 256; then the launch variants
    stage kernels 115 "$python" benchmarks/kernels.py --seq-lens 65536 8192 --heads 8,256,512 \
        --providers xlstm7b-triton xlstm7b-triton-tiles xlstm7b-triton-chunk128 xlstm7b-triton-chunk128-tiles \
        xlstm7b-triton-chunk128-intra xlstm7b-triton-chunk128-intra-tiles xlstm7b-triton-split tfla-exp-chunk128 fla-simple-gla --step-batches 1 256 --reps 50 --profile --out "$out"
    stage tune 25 "$python" benchmarks/kernels.py --tune --seq-lens 65536 --heads 8,256,512 --reps 25 --out "$out"
    # 7B shape, random bf16 weights shared with the official model: batch 1 in every mode, then batch 256
    # with float32 and bfloat16 state, kernels per token, the 8k prefill's forward, where a step's time goes
    stage generate 120 "$python" benchmarks/generate.py --device cuda --batches 1 256 --state-dtypes float32 bfloat16 \
        --batch1-only eager compiled official-compiled --decode-tokens 64 --prompt-lengths 8192 --forward-only \
        --memory-tokens --repeats 2 --kernels-per-token --profile "${official[@]}" --out "$out"
    stage train 50 "$python" benchmarks/train.py --presets 1.3b --steps 5 --micro-batch-sweep 4 8 --optimizer fused foreach \
        --profile --output "$out/train.json"
    stage train-compiled 30 "$python" benchmarks/train.py --presets 1.3b --steps 5 --micro-batch 4 --optimizer fused \
        --compile --output "$out/train_compiled.json"
    # second call: the engine at the 7B shape, random bf16 weights, bfloat16 C and n (512 slots: 32 GiB)
    stage serve 75 "$python" benchmarks/serve.py --device cuda --preset 7b --concurrency 64 256 512 \
        --state-dtype bfloat16 --baseline-requests 4 --out "$work/serve"
    stage serve-decode 75 "$python" benchmarks/serve.py --device cuda --preset 7b --mix decode --concurrency 64 256 512 \
        --state-dtype bfloat16 --baseline-requests 2 --out "$work/serve"
    stage speculative 90 "$python" benchmarks/speculative.py --device cuda --cost-model-only --ks 2 4 8 --out "$out"
    stage quantize 120 "$python" benchmarks/generate.py --device cuda --quantize int8 int4 --decode-tokens 64 \
        --repeats 2 --out "$out"
    stage offload 90 "$python" benchmarks/train.py --presets 7b --steps 2 --micro-batch 1 --set train.cpu_offload=true \
        --output "$out/train_7b_offload.json"
fi
mv "$out"/generate_*.png "$out"/kernels-*.png "$work"/ 2>/dev/null
cp "$work"/serve/serve_*.json "$out"/ 2>/dev/null

"$python" benchmarks/gpu_summary.py report "$out" "$work/stages.tsv"
exit $incomplete
