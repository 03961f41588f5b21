#!/usr/bin/env bash
# Build the raysft image with podman (`make image`): the Dockerfile as it is, on Ray's image where
# a registry can be reached (BASE=rayproject/ray:2.60.0-py311-cpu), otherwise (the default) on a
# Debian bookworm base bootstrapped here with mmdebstrap: Python 3.11, its headers, CA certificates.
#
#   IMAGE  the tag built                    (default localhost/raysft:dev)
#   BASE   the base image, or "bootstrap"   (default bootstrap)
#   FRESH  1: bootstrap the base again and build without podman's layer cache (CI does, so a
#          machine's cache never hides a broken build)
#
# Needs podman, and mmdebstrap to bootstrap (Debian: apt-get install podman buildah mmdebstrap runc
# uidmap slirp4netns containernetworking-plugins). The build uses the host's network and the
# host's pip configuration (its indexes, wheel directories and CA bundle, mounted read-only), so
# it installs what `make setup` installs here: the CPU torch wheel, never a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/raysft:dev}
BASE=${BASE:-bootstrap}
BOOTSTRAPPED=localhost/raysft-base:bookworm
PIP=${PIP:-.venv/bin/python -m pip}
source scripts/containers.sh

cache=()
if [ "${FRESH:-0}" = 1 ]; then
  cache=(--no-cache)
  podman rmi -f "$BOOTSTRAPPED" >/dev/null 2>&1 || true
fi
if [ "$BASE" = bootstrap ]; then
  if ! podman image exists "$BOOTSTRAPPED"; then
    started=$(date +%s)
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates,passwd \
      bookworm - | podman import --change 'CMD ["/bin/bash"]' - "$BOOTSTRAPPED" >/dev/null
    echo "bootstrapped $BOOTSTRAPPED in $(( $(date +%s) - started )) s"
  fi
  BASE=$BOOTSTRAPPED
fi

# The host's pip settings as build arguments, and every local path they name mounted where pip
# looks for it (a local index's whole tree). Only the keys the Dockerfile declares (the build stage's ARGs) are passed.
args=()
declare -A mounted
while IFS='=' read -r key value; do
  name=${key##*.}
  case "$name" in index-url|extra-index-url|find-links|cert) ;; *) continue ;; esac
  value=${value#\'}; value=${value%\'}
  var=PIP_$(echo "$name" | tr 'a-z-' 'A-Z_')
  args+=(--build-arg "$var=$value")
  for item in $value; do
    path=${item#file://}
    [ "$(basename "$path")" = simple ] && path=$(dirname "$path")  # a local index links to files beside it
    if [ "${path:0:1}" = / ] && [ -e "$path" ] && [ -z "${mounted[$path]:-}" ]; then
      mounted[$path]=1
      args+=(-v "$path:$path:ro")
    fi
  done
done < <($PIP config list 2>/dev/null)

started=$(date +%s)
podman build "${cache[@]}" --format docker --network host --build-arg "BASE=$BASE" "${args[@]}" -t "$IMAGE" .
echo "built $IMAGE on $BASE in $(( $(date +%s) - started )) s, $(podman image inspect "$IMAGE" --format '{{.Size}}' \
  | awk '{printf "%.2f GB", $1 / 1e9}')"
