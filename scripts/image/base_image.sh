#!/usr/bin/env bash
# Makes the local base image (default localhost/splitserve-base:bookworm) when
# it is missing: a Debian bookworm minbase root fs from debootstrap with
# Python 3.11 + venv + CA certificates, imported with `<engine> import`. For
# machines with no container registry; elsewhere pass BASE_IMAGE=<a registry
# image> to `make image` and this script is not used.
#
#   scripts/image/base_image.sh [IMAGE]      env: DEBIAN_MIRROR (default: this host's apt mirror)
#
# No compiler in the base: the Dockerfile's build stage installs gcc itself,
# the runtime stage stays without one (the C kernels are prebuilt).
set -euo pipefail

image=${1:-localhost/splitserve-base:bookworm}
here=$(cd "$(dirname "$0")" && pwd)
read -r -a engine <<<"$("$here/engine.sh")"

if "${engine[@]}" image exists "$image" 2>/dev/null; then
    echo "base image $image exists"
    exit 0
fi

mirror_of_this_host() {
    local uri
    uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
          | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}
mirror=${DEBIAN_MIRROR:-$(mirror_of_this_host)}

if ! command -v debootstrap >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || { echo "base_image.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
fi

work=$(mktemp -d /var/tmp/splitserve-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "debootstrap bookworm from $mirror into $work/rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$work/rootfs" "$mirror"
chroot "$work/rootfs" apt-get clean
rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin
tar -C "$work/rootfs" -c . | "${engine[@]}" import \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$image"
echo "base image $image made"
