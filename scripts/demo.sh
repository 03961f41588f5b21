#!/usr/bin/env bash
# `make demo`: the embedded default end to end. Starts `raysft serve` (a local Ray head with token
# auth, SQLite, artifacts under .cache/demo/service), submits the demo pipeline with the CLI,
# follows its progress, prints the result, and stops the service (and its Ray head).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DATA=.cache/demo/service
PORT=${RAYSFT_DEMO_PORT:-8765}
export RAYSFT_DATA_DIR=$DATA RAYSFT_URL=http://127.0.0.1:$PORT
export RAYSFT_ADMIN_API_KEY=${RAYSFT_ADMIN_API_KEY:-rsk_demo_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')}
export RAYSFT_API_KEY=$RAYSFT_ADMIN_API_KEY
export RAYSFT_SHARED_READ_PREFIXES="[\"$PWD/$DATA/models\"]"

rm -rf "$DATA" && mkdir -p "$DATA/artifacts/tenants/admin/inputs"
cp configs/data/* "$DATA/artifacts/tenants/admin/inputs/"
"$VENV/bin/python" -m jobs.scaffold_model "$DATA/models/tiny-model" > /dev/null

"$VENV/bin/raysft" serve --port "$PORT" > "$DATA/service.log" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1])" "$RAYSFT_URL/healthz" 2>/dev/null && break
  kill -0 $SERVE 2>/dev/null || { tail -20 "$DATA/service.log"; exit 1; }
  sleep 1
done

JOB=$("$VENV/bin/raysft" submit pipeline configs/pipelines/demo.yaml)
echo "pipeline $JOB submitted; following it (service log: $DATA/service.log)"
"$VENV/bin/raysft" jobs wait "$JOB"
