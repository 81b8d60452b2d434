#!/usr/bin/env bash
# Prints the container engine command for this machine as words to prefix a
# subcommand with, e.g. "env CONTAINERS_CONF=.../containers.conf podman
# --runtime runc" or "docker" (no word holds a space).
#
#   scripts/image/engine.sh            print it (installs podman when neither works)
#   scripts/image/engine.sh --no-install   print it, or fail when none works
#
# Choice: $SPLITSERVE_CONTAINER_ENGINE if set; else podman (with
# "--runtime runc" when runc is installed: crun fails on cgroup v1 "hybrid"
# hosts, runc works on v1 and v2); else docker when its daemon answers; else,
# as root on Debian/Ubuntu, `apt-get install podman runc` and podman.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
install=1
[[ "${1:-}" == "--no-install" ]] && install=0

podman_command() {
    local conf="" runtime=""
    # containers.conf beside this script: see the note in it (ulimits).
    [[ -z "${CONTAINERS_CONF:-}" ]] && conf="env CONTAINERS_CONF=$here/containers.conf "
    command -v runc >/dev/null 2>&1 && runtime=" --runtime runc"
    echo "${conf}podman${runtime}"
}

if [[ -n "${SPLITSERVE_CONTAINER_ENGINE:-}" ]]; then
    echo "$SPLITSERVE_CONTAINER_ENGINE"
    exit 0
fi
if command -v podman >/dev/null 2>&1; then
    podman_command
    exit 0
fi
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo "docker"
    exit 0
fi
if [[ $install == 1 && $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "engine.sh: no working podman or docker; installing podman + runc with apt-get" >&2
    # podman picks crun by default; runc must be named (see engine choice above).
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc; } >&2
    podman_command
    exit 0
fi
echo "engine.sh: no container engine: install podman (and runc) or start a docker daemon," \
     "or set SPLITSERVE_CONTAINER_ENGINE" >&2
exit 1
