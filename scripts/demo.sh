#!/usr/bin/env bash
# `make demo`: the embedded default end to end, on a real model. Starts `raysft serve` (a local Ray
# head with token auth, SQLite, artifacts under .cache/demo/service), submits the house-style
# pipeline (configs/pipelines/house-style.yaml) for SmolLM2-135M-Instruct, which `make real-model`
# imported, follows its progress, prints the held-out prompt's answer and the eval loss before and
# after training, asks the fine-tuned model a question through the service's chat (served on the
# cluster by Ray Serve), and stops the service (and its Ray head).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
MODEL=${MODEL:-.cache/models/smollm2-135m-instruct}
DATA=.cache/demo/service
PORT=${RAYSFT_DEMO_PORT:-8765}
export RAYSFT_DATA_DIR=$DATA RAYSFT_URL=http://127.0.0.1:$PORT
export RAYSFT_ADMIN_API_KEY=${RAYSFT_ADMIN_API_KEY:-rsk_demo_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')}
export RAYSFT_API_KEY=$RAYSFT_ADMIN_API_KEY
export RAYSFT_SHARED_READ_PREFIXES="[\"$PWD/$DATA/models\"]"

rm -rf "$DATA" && mkdir -p "$DATA/artifacts/tenants/admin/inputs"
cp configs/house-style/house-style.jsonl "$DATA/artifacts/tenants/admin/inputs/"
mkdir -p "$DATA/models"
# Hard links where the file system allows (the model is 0.5 GB): inside the data directory, as the service requires.
cp -rl "$MODEL" "$DATA/models/" 2>/dev/null || cp -r "$MODEL" "$DATA/models/"

"$VENV/bin/raysft" serve --port "$PORT" > "$DATA/service.log" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1])" "$RAYSFT_URL/healthz" 2>/dev/null && break
  kill -0 $SERVE 2>/dev/null || { tail -20 "$DATA/service.log"; exit 1; }
  sleep 1
done

JOB=$("$VENV/bin/raysft" submit pipeline configs/pipelines/house-style.yaml)
echo "pipeline $JOB submitted; following it (service log: $DATA/service.log)"
"$VENV/bin/raysft" jobs wait "$JOB"
# Before and after, from the run's metrics history (step 0 is the base model: eval.at_start).
"$VENV/bin/python" - "$RAYSFT_URL/v1/jobs/$JOB/metrics" <<'PY'
import json, os, sys, urllib.request

request = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {os.environ['RAYSFT_API_KEY']}"})
evaluations = [m for m in json.load(urllib.request.urlopen(request)) if "eval_loss" in m]
for label, m in (("before", evaluations[0]), ("after", evaluations[-1])):
    for g in m.get("generations", []):
        print(f"{label} (step {m['step']}): eval_loss {m['eval_loss']:.3f} | {g['prompt']} -> {g['answer']}")
PY
# The fine-tuned model served on the cluster (Ray Serve, base model plus the adapter), asked a
# question the training never saw.
"$VENV/bin/python" - "$RAYSFT_URL/v1/jobs/$JOB/chat" <<'PY'
import json, os, sys, time, urllib.request

body = {"messages": [{"role": "user", "content": "What is the capital of Belgium?"}], "max_tokens": 32, "temperature": 0}
request = urllib.request.Request(sys.argv[1], data=json.dumps(body).encode(), method="POST", headers={
    "Authorization": f"Bearer {os.environ['RAYSFT_API_KEY']}", "Content-Type": "application/json"})
started = time.perf_counter()
answer = json.load(urllib.request.urlopen(request, timeout=900))
print(f"chat ({time.perf_counter() - started:.1f} s, the model loaded on first use): "
      f"{answer['choices'][0]['message']['content']}")
PY
