#!/usr/bin/env bash
# Builds the splitserve image from the root Dockerfile with podman or docker
# (scripts/image/engine.sh picks one, installing podman when neither works).
#
#   scripts/image/build.sh
#
# Environment (all optional):
#   IMAGE         tag to build              (default localhost/splitserve:0.1.0)
#   BASE_IMAGE    base image                (default localhost/splitserve-base:bookworm, made by
#                                            base_image.sh when missing; on a machine with a
#                                            registry e.g. python:3.11-slim-bookworm)
#   TORCH_SPEC    torch requirement         (default torch==2.13.0)
#   TORCH_WHEELS  folder with a local torch wheel (default /opt/wheels): when it holds one that
#                 matches TORCH_SPEC, the build installs it (--build-context wheels=...) instead
#                 of downloading torch
#   IMAGE_BUILD_ARGS  more words for the engine's build command (e.g. "--build-arg EXTRAS=triton")
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
read -r -a engine <<<"$("$root/scripts/image/engine.sh")"
image=${IMAGE:-localhost/splitserve:0.1.0}
base=${BASE_IMAGE:-localhost/splitserve-base:bookworm}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
wheels=${TORCH_WHEELS:-/opt/wheels}

if [[ $base == localhost/splitserve-base:* ]]; then
    "$root/scripts/image/base_image.sh" "$base"
fi

args=(build --network host -f "$root/Dockerfile" -t "$image"
      --build-arg "BASE_IMAGE=$base"
      --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -n1)"
      --build-arg "REVISION=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)")

# A local torch wheel of the wanted version: pin its exact version (e.g.
# 2.13.0+cpu) so pip cannot prefer an index's build of the same number.
version=${torch_spec#torch==}
wheel=""
if [[ $version != "$torch_spec" && -d $wheels ]]; then
    wheel=$(find "$wheels" -maxdepth 1 -name "torch-${version}[-+]*.whl" | sort | head -n1)
fi
if [[ -n $wheel ]]; then
    local_version=$(basename "$wheel" | cut -d- -f2)
    echo "using the local torch wheel $wheel"
    args+=(--build-context "wheels=$wheels" --build-arg "TORCH_PIP_ARGS=--find-links /wheels"
           --build-arg "TORCH_SPEC=torch==$local_version")
else
    args+=(--build-arg "TORCH_SPEC=$torch_spec")
fi

# podman: hand pip the host's CA bundle (TLS interception); docker has no build -v.
if [[ " ${engine[*]} " == *" podman "* && -f /etc/ssl/certs/ca-certificates.crt ]]; then
    args+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)
fi
# shellcheck disable=SC2206  # word-split on purpose
args+=(${IMAGE_BUILD_ARGS:-})

start=$(date +%s)
echo "+ ${engine[*]} ${args[*]} $root"
"${engine[@]}" "${args[@]}" "$root"
size=$("${engine[@]}" image inspect --format '{{.Size}}' "$image")
echo "built $image in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"
