#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it. Idempotent: a second run is quick.
#   XLSTM7B_TORCH   torch requirement to install first (default torch==2.13.0; on a GPU machine pass
#                   the build you want, e.g. XLSTM7B_TORCH="torch" for the registry's default CUDA build)
#   XLSTM7B_TRITON  triton requirement next to a CPU build of torch (default triton==3.7.1)
#   XLSTM7B_EXTRAS  extra requirement groups of the project (default: none; the tests use "test")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "xlstm7b needs Python >= 3.11; found $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check "${XLSTM7B_TORCH:-torch==2.13.0}"
# A CUDA build of torch brings the Triton it was built with; a CPU build brings none. Install the
# one torch 2.13's CUDA build pins, so the kernels are compiled for the GPU (tests/test_kernels_compile.py)
# by the compiler a GPU user gets. (-W ignore: torch warns that numpy is not installed yet.)
if python -W ignore -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then
    pip install -q --disable-pip-version-check "${XLSTM7B_TRITON:-triton==3.7.1}"
fi
extras=${XLSTM7B_EXTRAS:-}
pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
