#!/usr/bin/env bash
# Property-based API check: schemathesis (every check) against a live loopback server with a valid
# key, on a throw-away data folder (embedded defaults, tiny base model, no worker).
#   bash scripts/schemathesis.sh                 # full run
#   MAX_EXAMPLES=20 bash scripts/schemathesis.sh # quicker
# Extra arguments go to `schemathesis run`. Exit status: schemathesis's (0 = no failure).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" PYTHONPATH="$PWD"
DATA="$(mktemp -d)"
PORT="${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export SPARSESHOT_DATA_DIR="$DATA" SPARSESHOT_BASE_MODEL="sparseshot-tiny:random" SPARSESHOT_BROKER_URL=""
python -m app.cli --log-level WARNING migrate >/dev/null
KEY="$(python -m app.cli --log-level WARNING keys create --tenant schemathesis | tail -n 1)"
python -m app.cli --log-level WARNING serve --no-worker --no-migrate --port "$PORT" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
schemathesis run "http://127.0.0.1:$PORT/openapi.json" --checks all \
  --header "Authorization: Bearer $KEY" --max-examples "${MAX_EXAMPLES:-100}" \
  --workers "${WORKERS:-2}" --suppress-health-check all "$@"
