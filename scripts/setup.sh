#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything the service,
# the worker, the benchmarks and the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "environment ready: .venv"
