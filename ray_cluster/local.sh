#!/usr/bin/env bash
# A local Ray head exactly as `raysft serve` starts its embedded default: token auth, the dashboard
# (job API) on 127.0.0.1 only, every port picked free. Runs in the foreground; Ctrl-C stops it.
#   ray_cluster/local.sh                       # writes .cache/local-ray/ray.env
#   set -a; . .cache/local-ray/ray.env; set +a  # in another shell: RAY_ADDRESS, RAY_AUTH_*
#   ray job submit -- python -m jobs.prepare --spec configs/datasets/demo.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/raysft ray-head --env-file "${RAY_ENV_FILE:-.cache/local-ray/ray.env}" "$@"
