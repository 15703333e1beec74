#!/usr/bin/env bash
# The project's test command: lint, type-check, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
ruff check sparseshot app worker benchmarks tests
mypy
python -m pytest -q -p no:cacheprovider "$@"
