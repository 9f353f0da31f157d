#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv, trains the toy model on the bundled corpus
# (the Python standard library of this interpreter, offline) and generates a sample from it.
# Extra arguments go to `xlstm7b train` (e.g. --train.steps=100); rerunning resumes the run.
set -euo pipefail
cd "$(dirname "$0")/.."
XLSTM7B_EXTRAS=plot bash scripts/setup.sh
. .venv/bin/activate
xlstm7b train configs/toy.toml "$@"
echo
echo "=== sample from runs/toy/model ==="
xlstm7b generate --checkpoint runs/toy/model --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 0
