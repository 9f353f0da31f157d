#!/usr/bin/env bash
# Sets up .venv with the test dependencies and the official peers used for parity tests, then runs
# the linter (ruff, configured in pyproject.toml) and the test suite. Extra arguments go to pytest
# (e.g. scripts/test.sh -k checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
XLSTM7B_EXTRAS=test bash scripts/setup.sh
. .venv/bin/activate
# The official xLSTM packages (parity tests) pin their own torch; install them without dependencies.
pip install -q --disable-pip-version-check --no-deps xlstm mlstm-kernels
ruff check .
exec python -m pytest -q "$@"
