# Sourced by the container scripts: podman's settings for a machine where crun cannot use the
# cgroup layout and limits cannot be raised (sandboxes, CI runners). An existing CONTAINERS_CONF wins.
if [ -z "${CONTAINERS_CONF:-}" ]; then
  export CONTAINERS_CONF="$PWD/.cache/containers/containers.conf"
  mkdir -p "$(dirname "$CONTAINERS_CONF")"
  cat > "$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
fi
