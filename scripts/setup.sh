#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything the service,
# the worker, the benchmarks and the tests need. Prints one line per step: the install downloads
# torch with its CUDA libraries (several GB), so the whole run takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { printf '[setup %s/4] %s\n' "$1" "$2"; }
if [ ! -x .venv/bin/python ]; then
  step 1 "creating the virtual environment .venv with $("$PY" --version 2>&1) (seconds)"
  "$PY" -m venv .venv
else
  step 1 "reusing the virtual environment .venv"
fi
step 2 "upgrading pip (seconds)"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
step 3 "installing sparseshot and its dependencies at the versions of constraints.txt: torch with CUDA libraries, about 6 GB on disk; this can take several minutes"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
step 4 "checking the install (seconds)"
.venv/bin/python -c "import sparseshot, app.main, worker.tasks" >/dev/null
echo "environment ready: .venv ($(du -sh .venv 2>/dev/null | cut -f1))"
